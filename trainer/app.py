"""From a composed config to an exit code: run `fit`, report errors and print the summary."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import traceback

import tensorflow as tf
from omegaconf import DictConfig

from trainer import hydra_callbacks
from trainer.checkpoint import integrity
from trainer.config import UserError
from trainer.loop import NonFiniteLoss, RunResult, fit

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 3


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
    for k, v in result.eval.items():
        lines.append(f"  eval {k:<14} {v:.6g}")
    lines.append(f"  checkpoints         {rel}/checkpoints/")
    lines.append(f"  metrics             {rel}/metrics.jsonl")
    lines.append(f"  tensorboard         tensorboard --logdir {rel}/tensorboard")
    for kind, path in result.exports.items():
        lines.append(f"  export ({kind:<11}) {os.path.relpath(path) if rel != rd else path}")
    return "\n".join(lines)


def run(cfg: DictConfig, run_dir: str) -> int:
    """Train and return the process exit code (README, "Exit codes": 0, 1, 2, 3)."""
    debug = bool(cfg.trainer.get("debug", False))
    for name in ("absl", "tensorflow"):  # TF's INFO chatter would bury our own output
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        result = fit(cfg, run_dir)
    except UserError as e:
        hydra_callbacks.restore()
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, tf.errors.OpError) as e:  # a full disk or an unwritable file (logs...)
        problem = integrity.disk_problem(e)
        if problem is None or debug:
            raise
        hydra_callbacks.restore()
        where = getattr(e, "filename", None) or f"in {run_dir}"
        print(
            f"error: cannot write {where} ({problem}); the checkpoints "
            "written so far are intact. Free space or fix permissions, then rerun the same "
            "command to resume.",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # SIGINT outside the training loop (start-up, export)
        print(
            "\ninterrupted (SIGINT) outside the training loop; the checkpoints written so far "
            f"are intact. Resume with:\n  {resume_command(run_dir)}",
            file=sys.stderr,
        )
        return 130
    print(summary(result))
    if result.status == "already_complete":
        wrote = ", ".join(result.exports) if result.exports else "nothing"
        print(
            f"Run is complete at step {result.step}; wrote {wrote} (missing exports only); "
            "checkpoints, logs and event files are unchanged."
        )
    if result.status == "interrupted":
        print(f"Checkpoint saved at step {result.step}. Resume with:\n  {resume_command(run_dir)}")
        return EXIT_INTERRUPTED
    return EXIT_OK
