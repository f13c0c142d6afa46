"""scripts/verify_resume.py: prove that an interrupted, resumed run equals the uninterrupted one.

Three fresh `python -m trainer` processes with the user's overrides (trainer.log_every=1
unless given, so that every step is compared):
  1. reference: uninterrupted to trainer.max_steps                    -> <out>/reference
  2. the same run interrupted at verify.interrupt_at by verify.interrupt -> <out>/resumed
       stop: trainer.stop_at ends it there with a checkpoint (exit 0);
       sigterm / sigkill: trainer.pause_at holds it there, then it gets the real signal
       (SIGTERM: it saves and exits 3; SIGKILL: it dies, its resume redoes the steps
       since the last periodic checkpoint);
  3. the resume of (2) in a new process, to trainer.max_steps             -> <out>/resumed
(1) and (2) run side by side. trainer.verify.compare then compares the two runs from their
TensorBoard event files and checkpoints; report.json and curves.png go into <out>.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from omegaconf import DictConfig

from trainer.config import UserError, validate
from trainer.verify import chaos as chaos_lib

MODES = ("stop", "sigterm", "sigkill", "chaos")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SAFE_VALUE = re.compile(r"^[\w./:-]+$")


class PhaseFailed(Exception):
    """A training process did not do what its phase needs (crash, timeout, no resume)."""


@dataclass
class Phase:
    name: str
    log: str
    proc: subprocess.Popen
    t0: float
    seconds: float = 0.0
    exit_code: int | None = None


def check(cfg: DictConfig, out: str) -> None:
    """Validate the verify group and what it needs from the trainer config; UserError if not."""
    v, tc = cfg.verify, cfg.trainer
    if v.interrupt not in MODES:
        raise UserError(f"verify.interrupt: received {v.interrupt!r}; allowed: {' | '.join(MODES)}")
    validate(cfg)
    if v.interrupt == "chaos":
        chaos_lib.check(cfg)
    elif v.get("wipe"):
        raise UserError("verify.wipe: received true; allowed: with verify.interrupt=chaos only")
    elif not 0 < v.interrupt_at < tc.max_steps:
        raise UserError(
            f"verify.interrupt_at: received {v.interrupt_at}; allowed: a step in "
            f"1..trainer.max_steps-1 ({tc.max_steps - 1})"
        )
    if v.interrupt == "sigkill" and v.interrupt_at < cfg.checkpoint.every:
        raise UserError(
            f"verify.interrupt_at: received {v.interrupt_at}; with verify.interrupt=sigkill it must "
            f"be >= checkpoint.every ({cfg.checkpoint.every}), or no checkpoint exists to resume from"
        )
    if not v.atol >= 0:
        raise UserError(f"verify.atol: received {v.atol}; allowed: a number >= 0")
    if not v.timeout > 0:
        raise UserError(f"verify.timeout: received {v.timeout}; allowed: seconds > 0")
    for key in ("stop_at", "pause_at"):
        if tc[key] is not None:
            raise UserError(
                f"trainer.{key}: received {tc[key]}; verify_resume sets it (allowed: null)"
            )
    if tc.resume != "auto":
        raise UserError(f"trainer.resume: received {tc.resume!r}; verify_resume needs 'auto'")
    for sub in ("reference", "resumed"):
        if os.path.exists(os.path.join(out, sub)):
            raise UserError(
                f"verify.out: received {out!r}, which already holds a verification ({sub}/); "
                "choose another directory"
            )


def trainer_overrides(task_overrides: list[str]) -> list[str]:
    """The user's overrides minus the verify group, plus trainer.log_every=1 unless given."""
    keys = [o.lstrip("~+").split("=", 1)[0] for o in task_overrides]
    kept = [o for o, k in zip(task_overrides, keys, strict=True) if k.split(".")[0] != "verify"]
    return kept if "trainer.log_every" in keys else [*kept, "trainer.log_every=1"]


def _path_override(key: str, path: str) -> str:
    if _SAFE_VALUE.match(path):
        return f"{key}={path}"
    if "'" in path or "\\" in path:
        raise UserError(f"verify.out: received {path!r}; a path without quotes or backslashes")
    return f"{key}='{path}'"


def start(name: str, overrides: list[str], run_dir: str, out: str) -> Phase:
    """Start `python -m trainer <overrides> hydra.run.dir=<run_dir>`; output to <out>/logs/<name>.log."""
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    log = os.path.join(out, "logs", f"{name}.log")
    overrides = [chaos_lib.remote_override(o, run_dir) for o in overrides]  # URL/<run>
    cmd = [sys.executable, "-m", "trainer", *overrides, _path_override("hydra.run.dir", run_dir)]
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    return Phase(name, log, proc, time.perf_counter())


def _tail(phase: Phase, n: int = 15) -> str:
    with open(phase.log) as f:
        return "".join(f.readlines()[-n:])


def finish(phase: Phase, timeout: float, expect: tuple[int, ...]) -> Phase:
    """Wait for the process; PhaseFailed unless its exit code is in `expect` (UserError for 2)."""
    try:
        phase.exit_code = phase.proc.wait(timeout=max(1.0, timeout - _age(phase)))
    except subprocess.TimeoutExpired:
        phase.proc.kill()
        phase.proc.wait()
        raise PhaseFailed(f"{phase.name} run timed out (verify.timeout={timeout:g} s)") from None
    phase.seconds = _age(phase)
    if phase.exit_code == 2:
        errors = [ln for ln in _tail(phase, 40).splitlines() if ln.startswith("error:")]
        raise UserError(f"{phase.name} run refused its config: {errors[-1] if errors else ''}")
    if phase.exit_code not in expect:
        raise PhaseFailed(
            f"{phase.name} run exited with {phase.exit_code} (expected {expect}); "
            f"end of {phase.log}:\n{_tail(phase)}"
        )
    return phase


def _age(phase: Phase) -> float:
    return time.perf_counter() - phase.t0


def wait_paused(phase: Phase, run_dir: str, step: int, timeout: float) -> None:
    """Wait until the run announces `<run>/PAUSED` at `step` (trainer.pause_at)."""
    marker = os.path.join(run_dir, "PAUSED")
    while _age(phase) < timeout:
        if phase.proc.poll() is not None:
            finish(phase, timeout, expect=())  # exited before the pause: always a failure
        try:
            with open(marker) as f:
                paused = json.load(f)
            if paused["step"] == step and paused["pid"] == phase.proc.pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    phase.proc.kill()
    phase.proc.wait()
    raise PhaseFailed(
        f"interrupted run did not reach step {step} within verify.timeout={timeout:g} s"
    )


def interrupt(cfg: DictConfig, overrides: list[str], run_dir: str, out: str, say) -> Phase:
    """Phase 2: start the run and interrupt it at verify.interrupt_at by verify.interrupt."""
    v = cfg.verify
    at, timeout = int(v.interrupt_at), float(v.timeout)
    if v.interrupt == "stop":
        return start("interrupted", [*overrides, f"trainer.stop_at={at}"], run_dir, out)
    phase = start("interrupted", [*overrides, f"trainer.pause_at={at}"], run_dir, out)
    wait_paused(phase, run_dir, at, timeout)
    sig = signal.SIGTERM if v.interrupt == "sigterm" else signal.SIGKILL
    say(f"[2/3] interrupted run: at step {at}, sending {sig.name} to pid {phase.proc.pid}")
    phase.proc.send_signal(sig)
    return phase


def chaos(cfg: DictConfig, overrides: list[str], run_dir: str, out: str, say) -> list[dict]:
    """Phase 2 under verify.interrupt=chaos: verify.kills SIGKILLs at random moments, each
    run after the first being the resume of the one before (trainer/verify/chaos.py)."""
    import random

    from trainer.checkpoint.manifest import step_of
    from trainer.verify import compare

    v = cfg.verify
    rng = random.Random(int(v.seed))
    timeout = float(v.timeout)
    kills = []

    def newest(run: str) -> int | None:
        prefix = compare.newest_checkpoint(run)
        return step_of(prefix) if prefix else None

    for i, kind in enumerate(chaos_lib.plan(int(v.kills), int(v.seed))):
        before = newest(run_dir)
        wiped = bool(v.get("wipe") and i % 2)  # every other resume on a fresh machine
        if wiped:  # (its checkpoint comes from the store)
            before = chaos_lib.wipe(run_dir, overrides, say)
        phase = start(f"chaos-{i + 1}", overrides, run_dir, out)
        wipe_next = v.get("wipe") and i % 2 == 0 and i + 1 < int(v.kills)
        try:
            kill = chaos_lib.kill_at_random(
                phase.proc,
                run_dir,
                kind,
                rng,
                float(v.window),
                time.monotonic() + timeout,
                newest,
                need_checkpoint=i == int(v.kills) - 1,
                log=phase.log,
                brought_back=wiped and before is not None,
                # the kill before a wipe waits for the store to hold a checkpoint
                ready=chaos_lib.store_holds_one(run_dir, overrides) if wipe_next else None,
            )
            if kill is None:
                finish(phase, timeout, expect=())  # ended before the kill: report how
                raise PhaseFailed(
                    f"run {i + 1} finished before kill {i + 1} of {v.kills}; raise "
                    "trainer.max_steps (or lower verify.window)"
                )
        finally:
            if phase.proc.poll() is None:
                phase.proc.kill()
                phase.proc.wait()
        with open(phase.log) as f:
            text = f.read()
        if before is not None and f"Resuming from step {before}:" not in text:
            raise PhaseFailed(f"run {i + 1} did not resume from step {before}: {phase.log}")
        say(
            f"[2/3] kill {i + 1}/{v.kills} ({kind}) after {kill.delay:.3f} s of training: last "
            f"logged step {kill.last_logged_step}, newest checkpoint {kill.newest_checkpoint}; "
            f"{kill.landed}"
        )
        kills.append({**kill.as_dict(), "resumed_from": before})
    return kills


def _say(line: str) -> None:
    print(line, flush=True)


def _resume_point(v, res_dir: str) -> tuple[int, list[int]]:
    """After the interrupted run(s): the step its newest checkpoint holds (PhaseFailed unless
    there is one, at verify.interrupt_at for stop and sigterm), and the steps it logged past
    that, which the resume will redo."""
    from trainer.checkpoint.manifest import step_of
    from trainer.verify import compare

    at = int(v.interrupt_at)
    newest = compare.newest_checkpoint(res_dir)
    resume_from = step_of(newest) if newest else None
    train_dir = os.path.join(res_dir, "tensorboard", "train")
    logged = [step for step, _ in compare.read_all_scalars(train_dir).get("loss", [])]
    if v.interrupt in ("stop", "sigterm") and resume_from != at:
        raise PhaseFailed(f"interrupted run left its newest checkpoint at {resume_from}, not {at}")
    if not resume_from:  # every run started over: no resume was tested
        raise PhaseFailed(
            "the interrupted run left no checkpoint, so the last run would start from "
            "scratch and test no resume; save earlier (checkpoint.every) or kill later "
            "(verify.interrupt_at, verify.window)"
        )
    redone = sorted(s for s in logged if s > (resume_from or 0))
    return resume_from, redone


def _run_phases(
    cfg: DictConfig, overrides: list[str], ref_dir: str, res_dir: str, out: str, phases, say
) -> tuple[list[dict] | None, int, list[int]]:
    """The three phases, each started Phase appended to `phases` (the caller kills what still
    runs): (the chaos kills or None, the step resumed from, the steps redone)."""
    v, max_steps = cfg.verify, int(cfg.trainer.max_steps)
    at, timeout = int(v.interrupt_at), float(v.timeout)
    say(f"[1/3] reference run: started, uninterrupted to step {max_steps}")
    phases.append(start("reference", overrides, ref_dir, out))
    kills = None
    if v.interrupt == "chaos":
        say(f"[2/3] interrupted run: {v.kills} SIGKILLs at random moments (seed {v.seed})")
        kills = chaos(cfg, overrides, res_dir, out, say)
    else:
        say(f"[2/3] interrupted run: started, {v.interrupt} at step {at}")
        phases.append(interrupt(cfg, overrides, res_dir, out, say))
        expect = {"stop": (0,), "sigterm": (3,), "sigkill": (-signal.SIGKILL,)}[v.interrupt]
        finish(phases[1], timeout, expect)
    resume_from, redone = _resume_point(v, res_dir)
    note = f"; steps {redone[0]}..{redone[-1]} were logged and will be redone" if redone else ""
    how = (
        f"exit {phases[1].exit_code}) in {phases[1].seconds:.1f} s" if kills is None else "killed)"
    )
    say(
        f"[2/3] interrupted run: ended ({v.interrupt}, {how}; newest checkpoint: step "
        f"{resume_from}{note}"
    )
    finish(phases[0], timeout, (0,))
    say(f"[1/3] reference run: done, {max_steps} steps in {phases[0].seconds:.1f} s")
    say(f"[3/3] resumed run: started, from step {resume_from} to {max_steps}")
    phases.append(finish(start("resume", overrides, res_dir, out), timeout, (0,)))
    with open(phases[-1].log) as f:
        if resume_from and f"Resuming from step {resume_from}:" not in f.read():
            raise PhaseFailed(
                f"resumed run did not resume from step {resume_from}: {phases[-1].log}"
            )
    say(f"[3/3] resumed run: done in {phases[-1].seconds:.1f} s")
    return kills, resume_from, redone


def _plot_marks(interrupt: str, at: int, kills: list[dict] | None, resume_from) -> dict:
    """The steps marked on curves.png: the interruption (or each kill), the resume point."""
    marks = {f"{interrupt} at {at}": at} if kills is None else {}
    for i, kill in enumerate(kills or []):
        if kill["last_logged_step"]:
            marks[f"kill {i + 1} ({kill['kind']})"] = kill["last_logged_step"]
    if kills is None and resume_from != at:
        marks[f"resumed from {resume_from}"] = resume_from
    return marks


def verify(cfg: DictConfig, task_overrides: list[str], out: str, say=_say) -> dict:
    """Run the three phases and compare; return the report (report["ok"] is the verdict)."""
    from trainer.verify import compare, plot
    from trainer.verify.report import write_report

    v, max_steps = cfg.verify, int(cfg.trainer.max_steps)
    at = int(v.interrupt_at)
    overrides = chaos_lib.with_remote(trainer_overrides(task_overrides), cfg)
    ref_dir, res_dir = os.path.join(out, "reference"), os.path.join(out, "resumed")
    what = (
        f"{v.kills} SIGKILLs at random moments"
        if v.interrupt == "chaos"
        else f"{v.interrupt} at step {at}"
    )
    say(f"Verify resume in {out}: {what} of {max_steps} steps")
    say(f"  trainer overrides: {' '.join(overrides)}")
    phases: list[Phase] = []
    try:
        kills, resume_from, redone = _run_phases(cfg, overrides, ref_dir, res_dir, out, phases, say)
    finally:
        for p in phases:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
    report = compare.compare_runs(ref_dir, res_dir, atol=float(v.atol))
    report["exports"] = compare.compare_exports(ref_dir, res_dir, atol=float(v.atol))
    report["ok"] = report["ok"] and report["exports"]["ok"]
    report["verify"] = {
        "interrupt": v.interrupt,
        "interrupt_at": None if kills is not None else at,
        **({"kills": kills, "seed": int(v.seed)} if kills is not None else {}),
        "max_steps": max_steps,
        "resumed_from": resume_from,
        "steps_redone": [redone[0], redone[-1]] if redone else None,
        "trainer_overrides": overrides,
        "phases": {
            p.name: {"exit_code": p.exit_code, "seconds": round(p.seconds, 2)} for p in phases
        },
    }
    marks = _plot_marks(v.interrupt, at, kills, resume_from)
    report["plot"] = plot.plot_comparison(
        report, os.path.join(out, "curves.png"), ("reference", "resumed"), marks
    )
    write_report(report, os.path.join(out, "report.json"))
    return report


def run(cfg: DictConfig, out: str, task_overrides: list[str]) -> int:
    """verify_resume from a composed config to an exit code (0 match, 1 differ, 2 bad input)."""
    from trainer.sweep import hydra_callbacks
    from trainer.verify.report import format_report

    try:
        check(cfg, out)
        report = verify(cfg, task_overrides, out)
    except UserError as e:
        hydra_callbacks.restore()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PhaseFailed as e:
        print(f"error: verification could not finish: {e}", file=sys.stderr)
        return 1
    print(format_report(report, ("reference", "resumed")))
    print(f"report: {os.path.join(out, 'report.json')}  plot: {report['plot']}")
    print(f"both runs in TensorBoard: tensorboard --logdir {out}")
    return 0 if report["ok"] else 1


def main() -> None:
    """The Hydra entry behind scripts/verify_resume.py (config conf/verify_resume.yaml)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from trainer.config import CONF_DIR, register_schemas

    register_schemas()
    started = False

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="verify_resume")
    def entry(cfg: DictConfig) -> None:
        nonlocal started
        started = True
        hc = HydraConfig.get()
        code = run(cfg, hc.runtime.output_dir, list(hc.overrides.task))
        if code:
            sys.exit(code)

    try:
        entry()
    except SystemExit as e:
        if not started and e.code not in (0, None):  # Hydra could not compose: bad input
            sys.exit(2)
        raise
