"""Throughput: our loop's and Model.fit's steady steps/s, in 200-step blocks after a warm-up,
from the loop's own per-window TensorBoard scalars and fit's epoch timer."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import keras
import numpy as np

from trainer import build, losses
from trainer.bench.common import NO_EVAL, REPO, compose, trainer_command
from trainer.data import memory as data_lib
from trainer.loop import fit
from trainer.optim import build_optimizer
from trainer.rewind import read_scalars

SAME_SPE = 10  # the shared steps_per_execution of the "same K" comparison
BLOCK = 200  # steps per throughput block (a Model.fit epoch; 20 of our loop's log windows)


def loop_windows(
    overrides: list[str],
    steps: int,
    workdir: str,
    during=None,
    scalars: dict | None = None,
    fresh: bool = False,
) -> list[tuple[int, int, float]]:
    """Run `trainer.loop.fit` for `steps` steps; return its log windows (end step, steps, seconds).

    The loop logs `steps_per_sec` for each window between log steps, from its own clock.
    `during(run_dir)`: a context manager held around the run (a background load, say).
    `scalars`: {tag: None}, filled with the run's (step, value) points of each tag.
    `fresh`: run `python -m trainer` in a new process, as users do, instead of `fit` in this
    one (which by then holds earlier runs' objects, threads and garbage: BENCHMARKS.md,
    section 10); not with `during`.
    """
    run_dir = tempfile.mkdtemp(prefix="loop-", dir=workdir)
    args = [
        f"trainer.max_steps={steps + 1}",  # stop_at < max_steps: no final eval or export
        f"trainer.stop_at={steps}",
        f"trainer.eval_every={NO_EVAL}",
        *overrides,
    ]
    if fresh:
        assert during is None, "a load beside the loop runs in the loop's process"
        run_checked(*trainer_command(args, run_dir), cwd=REPO)
    else:
        with during(run_dir) if during is not None else contextlib.nullcontext():
            fit(compose(args), run_dir)
    return read_windows(run_dir, scalars)


def run_checked(cmd: list[str], env: dict, cwd: str) -> None:
    """Run `cmd` (a training run) in a new process; RuntimeError with its stderr's tail if it
    fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")


def read_windows(run_dir: str, scalars: dict | None = None) -> list[tuple[int, int, float]]:
    """A finished run's log windows (windows_of); `scalars` ({tag: None}) filled with its
    (step, value) points of each tag; the run directory then removed."""
    logdir = os.path.join(run_dir, "tensorboard", "train")
    out = windows_of(read_scalars(logdir, "steps_per_sec"))
    for tag in scalars or {}:
        scalars[tag] = read_scalars(logdir, tag)
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def windows_of(points: list[tuple[int, float]]) -> list[tuple[int, int, float]]:
    """A run's log windows (end step, steps, seconds) from its `steps_per_sec` points."""
    out, prev = [], 0
    for step, rate in points:
        out.append((step, step - prev, (step - prev) / rate))
        prev = step
    return out


def steady_rate(block_seconds: list[float]) -> float:
    """steps/s of a run on a shared machine: the 80th percentile of its BLOCK-step blocks' rates
    (other jobs only ever slow a block down, so the upper blocks are the run's own speed)."""
    return float(np.percentile([BLOCK / t for t in block_seconds], 80))


def loop_rate(overrides: list[str], steps: int, warmup: int, workdir: str) -> float:
    windows = [w for w in loop_windows(overrides, steps, workdir) if w[0] > warmup]
    blocks, acc, n = [], 0.0, 0
    for _, k, t in windows:
        acc, n = acc + t, n + k
        if n >= BLOCK:
            blocks.append(acc * BLOCK / n)
            acc, n = 0.0, 0
    return steady_rate(blocks)


class _EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._t0)


def fit_rate(overrides: list[str], steps: int, warmup: int, spe: int) -> float:
    """Steady-state steps/s of Keras Model.fit on our model, optimizer, loss and data stream."""
    cfg = compose(overrides)
    build.setup_runtime(cfg)
    data = data_lib.load_data(cfg.data)
    model = build.build_model(cfg.model, data)
    optimizer = build_optimizer(cfg.optimizer, cfg.schedule, steps)
    model.compile(optimizer=optimizer, loss=losses.keras_loss(data.task), steps_per_execution=spe)
    dataset = data.train_dataset(int(cfg.data.batch_size), int(cfg.trainer.seed), 0)
    dataset = dataset.map(lambda x, y, _: (x, y))  # Model.fit trains on (x, y)
    timer = _EpochTimer()
    epochs = max(2, steps // BLOCK)  # BLOCK-step epochs; the warm-up ones are dropped
    model.fit(dataset, epochs=epochs, steps_per_epoch=BLOCK, verbose=0, callbacks=[timer])
    return steady_rate(timer.seconds[max(1, warmup // BLOCK) :])


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def throughput(m: dict, workdir: str, log) -> dict:
    """Our loop vs Model.fit: both at their defaults, then both at steps_per_execution=10."""
    default_k = int(compose([]).trainer.steps_per_execution)
    quiet = [f"checkpoint.every={NO_EVAL}"]  # only the final checkpoint, after the window
    runs = {
        "loop_default": lambda: loop_rate(quiet, m["steps"], m["warmup"], workdir),
        "fit_default": lambda: fit_rate([], m["steps"], m["warmup"], 1),
        "loop_k1": lambda: loop_rate(
            [*quiet, "trainer.steps_per_execution=1"], m["steps"], m["warmup"], workdir
        ),
        "loop_same_spe": lambda: loop_rate(
            [*quiet, f"trainer.steps_per_execution={SAME_SPE}"], m["steps"], m["warmup"], workdir
        ),
        "fit_same_spe": lambda: fit_rate([], m["steps"], m["warmup"], SAME_SPE),
    }
    if default_k == SAME_SPE:  # the same configuration twice: run it once per round
        runs.pop("loop_same_spe")
    rates = {k: [] for k in runs}
    for r in range(m["rounds"]):
        for name, run in runs.items():
            rates[name].append(run())
        log(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))
    if "loop_same_spe" not in rates:
        rates["loop_same_spe"] = rates["loop_default"]
    med = {k: median(v) for k, v in rates.items()}
    return {
        "loop_vs_fit": med["loop_default"] / med["fit_default"],
        "loop_vs_fit_same_spe": med["loop_same_spe"] / med["fit_same_spe"],
        "loop_k1_vs_fit": med["loop_k1"] / med["fit_default"],
        "steps_per_sec": med,
        "steps_per_sec_trials": rates,
        "loop_default_steps_per_execution": default_k,
        "same_steps_per_execution": SAME_SPE,
    }


def block_seconds(windows: list[tuple[int, int, float]], warmup: int, every: int) -> list[float]:
    """The time of each `every`-step block after the warm-up, blocks aligned on save steps:
    block (s, s + every] holds the save at step s (it runs between that step's log line and the
    next chunk) and what follows it (the write thread, copy-on-write, the log drain)."""
    # (the warm-up also keeps the first save out: one-time costs, thread start, tracing)
    blocks: dict[int, float] = {}
    for end, _, t in windows:
        b = (end - 1) // every
        if b * every >= warmup:
            blocks[b] = blocks.get(b, 0.0) + t
    full = sorted(blocks)[:-1] if len(blocks) > 1 else sorted(blocks)  # the last may be short
    return [blocks[b] for b in full]


def rotated(names: list[str], r: int) -> list[str]:
    """Round r's order of the variants: each goes first, second, ... in turn (the cycle
    itself stays: with none, sync, async, async follows sync unless it goes first)."""
    k = r % len(names)
    return names[k:] + names[:k]
