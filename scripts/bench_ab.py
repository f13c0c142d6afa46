"""Before/after within one bench run: a save's cost and the step time of the default model,
for two or more variants (a git revision of this repository, plus overrides), in rounds
whose order rotates. How each change of BENCHMARKS.md's "What a save costs, change by
change" was measured and kept or dropped.

    python scripts/bench_ab.py --variant before HEAD~1 --variant after HEAD [--rounds 5]
    python scripts/bench_ab.py --variant k1 HEAD trainer.inter_op_threads=1 \\
        --variant k2 HEAD trainer.inter_op_threads=2 --every 0

Each run is a fresh `python -m trainer` of that revision (a git worktree of it), as users run
it: `--steps` steps, an async save every `--every` steps (0: none), no evaluation. A save's
cost is seen within each run (trainer/bench/saves.py, cost_per_save: the windows after a
save against the same run's windows far from one); the step time is the median window far
from any save. Reported: per variant the median over rounds and the rounds' spread, and
against the first variant the ratio of medians with the spread of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from trainer.startup import script_start  # noqa: E402

script_start(sys.argv[1:])  # TensorFlow's start-up lines held back

from trainer.bench.common import NO_EVAL  # noqa: E402
from trainer.bench.loop_rates import median, read_windows, rotated, run_checked  # noqa: E402
from trainer.bench.saves import BASELINE_FROM, cost_per_save  # noqa: E402


def worktree(rev: str, into: str) -> str:
    """A detached worktree of `rev` under `into` (the revision's code, this venv)."""
    path = os.path.join(into, rev.replace("/", "_").replace("~", "_"))
    if not os.path.isdir(path):
        subprocess.run(
            ["git", "-C", REPO, "worktree", "add", "--detach", "-q", path, rev], check=True
        )
    return path


def one_run(code: str, overrides: list[str], steps: int, every: int, workdir: str):
    """(cost of a save in ms or None, step ms) of one fresh run of the code at `code`."""
    run_dir = tempfile.mkdtemp(prefix="ab-", dir=workdir)
    saves = [f"checkpoint.every={every}", "checkpoint.async=true"] if every else []
    args = [
        f"trainer.max_steps={steps + 1}",
        f"trainer.stop_at={steps}",
        f"trainer.eval_every={NO_EVAL}",
        *(saves or [f"checkpoint.every={NO_EVAL}"]),
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": code}
    env.update(o[4:].split("=", 1) for o in args if o.startswith("env:"))  # env:NAME=VALUE
    args = [o for o in args if not o.startswith("env:")]
    cmd = [sys.executable, "-m", "trainer", *args, f"hydra.run.dir={run_dir}"]
    try:
        run_checked(cmd, env, cwd=code)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    windows = read_windows(run_dir)
    warmup = min(every + 100, steps // 3) if every else steps // 5
    period = every or NO_EVAL
    far = [
        t / k
        for end, k, t in windows
        if end > warmup and ((end - 1) % period + 1) > BASELINE_FROM * k
    ]
    cost = cost_per_save(windows, warmup, every) if every else None
    return (None if cost is None else 1000 * cost), 1000 * median(far)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--variant",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME REV", "OVERRIDE"),
        help="a name, a git revision, then `python -m trainer` overrides (env:NAME=VALUE: an "
        "environment variable of that run)",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=16_000)
    p.add_argument("--every", type=int, default=500, help="steps between async saves (0: none)")
    args = p.parse_args()
    if any(len(v) < 2 for v in args.variant):
        p.error("--variant needs a name and a revision")
    workdir = tempfile.mkdtemp(prefix="bench-ab-")
    try:
        code = {v[0]: (worktree(v[1], workdir), v[2:]) for v in args.variant}
        names = list(code)
        cost = {n: [] for n in names}
        step = {n: [] for n in names}
        for r in range(args.rounds):
            for n in rotated(names, r):
                c, s = one_run(*code[n], args.steps, args.every, workdir)
                if c is not None:
                    cost[n].append(c)
                step[n].append(s)
            print(
                f"round {r + 1}: "
                + ", ".join(
                    f"{n} save {cost[n][-1] if cost[n] else float('nan'):.2f} ms step "
                    f"{step[n][-1] * 1000:.1f} us"
                    for n in names
                ),
                flush=True,
            )
        _report(names, cost, step)
    finally:
        for path in os.listdir(workdir):
            if os.path.isdir(os.path.join(workdir, path, ".git")) or os.path.isfile(
                os.path.join(workdir, path, ".git")
            ):
                subprocess.run(
                    [
                        "git",
                        "-C",
                        REPO,
                        "worktree",
                        "remove",
                        "--force",
                        os.path.join(workdir, path),
                    ],
                    check=False,
                )
        shutil.rmtree(workdir, ignore_errors=True)


def _report(names: list[str], cost: dict, step: dict) -> None:
    first = names[0]
    for what, xs, unit, scale in (("save cost", cost, "ms", 1), ("step", step, "us", 1000)):
        for n in names:
            if not xs[n]:
                continue
            line = (
                f"{what:<9} {n:<14} median {median(xs[n]) * scale:8.3f} {unit} "
                f"(rounds {min(xs[n]) * scale:.3f}..{max(xs[n]) * scale:.3f})"
            )
            if n != first and xs[first] and len(xs[n]) == len(xs[first]):
                ratios = [b / a for a, b in zip(xs[first], xs[n], strict=True)]
                line += (
                    f"  {n}/{first} {median(xs[n]) / median(xs[first]):.3f} "
                    f"(rounds {min(ratios):.3f}..{max(ratios):.3f})"
                )
            print(line)


if __name__ == "__main__":
    main()
