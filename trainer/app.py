"""From a composed config to an exit code: run `fit`, report errors and print the summary."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import traceback
from dataclasses import dataclass

import tensorflow as tf
from omegaconf import DictConfig

from trainer import runlog
from trainer.checkpoint import integrity
from trainer.config import UserError
from trainer.loop import NonFiniteLoss, RunResult, fit
from trainer.signals import ignore_stops, interrupted_by
from trainer.sweep import hydra_callbacks, runinfo

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 3
EXIT_REMOTE_BEHIND = 5  # trained and saved locally; checkpoint.remote could not be updated


def resume_command(run_dir: str) -> str:
    args = [a for a in sys.argv[1:] if not a.startswith("hydra.run.dir=")]
    return shlex.join(["python", "-m", "trainer", *args, f"hydra.run.dir={run_dir}"])


def summary(result: RunResult) -> str:
    rd = result.run_dir
    rel = os.path.relpath(rd) if not os.path.relpath(rd).startswith("..") else rd
    lines = [f"Run directory: {rel}"]
    how = {
        "completed": "completed",
        "stopped": "stopped early (trainer.stop_at)",
        "interrupted": f"interrupted by {result.signal_name}",
        "already_complete": "already complete (nothing to train)",
    }[result.status]
    start = f", resumed from step {result.resumed_from}" if result.resumed_from is not None else ""
    lines.append(f"  {how} at step {result.step}{start}")
    if result.final_loss is not None:
        lines.append(f"  last training loss  {result.final_loss:.6g}")
    earlier = result.eval_step is not None and result.eval_step != result.step
    for k, v in result.eval.items():
        label = f"{k} (step {result.eval_step})" if earlier else k
        lines.append(f"  eval {label:<14} {v:.6g}")
    lines.append(f"  checkpoints         {rel}/checkpoints/")
    lines.append(f"  metrics             {rel}/metrics.jsonl")
    lines.append(f"  tensorboard         tensorboard --logdir {rel}/tensorboard")
    for kind, path in result.exports.items():
        lines.append(f"  export ({kind:<11}) {os.path.relpath(path) if rel != rd else path}")
    return "\n".join(lines)


@dataclass
class Outcome:
    """How a run ended: its exit code, what it did (None if it failed) and the error line."""

    code: int
    result: RunResult | None = None
    error: str | None = None


def run(cfg: DictConfig, run_dir: str, last_in_process: bool = False) -> int:
    """Train and return the process exit code (README, "Exit codes": 0, 1, 2, 3).
    `last_in_process` (the CLI's single run): once `fit` has returned, the outcome is decided
    and a late SIGINT or SIGTERM is ignored until the process exits (trainer/__main__.py)."""
    return execute(cfg, run_dir, last_in_process=last_in_process).code


def _resume_hint(run_dir: str, sweep: bool) -> str:
    if sweep:
        return "Rerun the sweep's command to resume it."
    return f"Resume with:\n  {resume_command(run_dir)}"


def _failed(code: int, message: str) -> Outcome:
    print(f"error: {message}", file=sys.stderr)
    return Outcome(code, error=message)


def execute(
    cfg: DictConfig, run_dir: str, sweep: bool = False, last_in_process: bool = False
) -> Outcome:
    """Train, print what happened and return it with the exit code. `sweep`: one job of a
    sweep (no HPARAMS experiment of its own; rerunning the sweep resumes it). What it prints
    goes to `<run_dir>/train.log` too."""
    with runlog.tee_to_log(run_dir) as log:
        log.watch(os.path.join(run_dir, "metrics.jsonl"))  # has the run trained? (undo)
        return _execute(cfg, run_dir, sweep, log, last_in_process)


def _execute(
    cfg: DictConfig, run_dir: str, sweep: bool, log: runlog.RunLog, last_in_process: bool
) -> Outcome:
    debug = bool(cfg.trainer.get("debug", False))
    for name in ("absl", "tensorflow"):  # TF's INFO chatter would bury our own output
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        result = fit(cfg, run_dir, experiment=not sweep)
        if last_in_process:
            ignore_stops()  # the outcome is decided; a signal now would only misreport it
    except UserError as e:
        log.undo()  # a run refused before it trained changes nothing, train.log included
        hydra_callbacks.restore()
        if debug:
            traceback.print_exc()
        return _failed(EXIT_BAD_INPUT, str(e))
    except NonFiniteLoss as e:
        return _failed(EXIT_FAILED, str(e))
    except (OSError, tf.errors.OpError) as e:  # the disk refused a write (logs, exports...)
        if integrity.disk_problem(e) is None or debug:
            raise
        hydra_callbacks.restore()
        where = integrity.failed_path(e) or f"in {run_dir}"
        intact = integrity.newest_intact(os.path.join(run_dir, "checkpoints"))
        return _failed(
            EXIT_BAD_INPUT,
            f"cannot write {where} ({integrity.disk_problem(e)}); {intact}. Free space, fix "
            "permissions or the disk, then rerun the same command to resume.",
        )
    except KeyboardInterrupt as e:  # a signal outside the training loop (start-up, export)
        name = interrupted_by(e)
        if sweep:  # the sweep's table reports it (trainer/sweep/jobs.py)
            print(f"\ninterrupted ({name}) outside the training loop", file=sys.stderr)
            return Outcome(130, error=f"interrupted ({name}) outside the training loop")
        code, message = runinfo.interrupted_message(run_dir, name, _resume_hint(run_dir, False))
        print(f"\n{message}", file=sys.stderr)
        return Outcome(code, error=message)
    print(summary(result))
    if result.status == "already_complete":
        log.undo()  # byte for byte as it was (the summary is on screen)
        hydra_callbacks.restore()  # the run's .hydra/ too stays as it was (a sweep's rerun)
        wrote = ", ".join(result.exports) if result.exports else "nothing"
        print(
            f"Run is complete at step {result.step}; wrote {wrote} (missing exports only); "
            "checkpoints, logs and event files are unchanged."
        )
    behind = result.remote_problem
    if behind:
        print(
            f"error: {behind}. Nothing local is lost ({run_dir}); rerun the same command "
            "once the store is back to upload it.",
            file=sys.stderr,
        )
    if result.status == "interrupted":
        print(f"Checkpoint saved at step {result.step}. {_resume_hint(run_dir, sweep)}")
        return Outcome(EXIT_INTERRUPTED, result)
    if behind:
        return Outcome(EXIT_REMOTE_BEHIND, result, error=behind)
    return Outcome(EXIT_OK, result)
