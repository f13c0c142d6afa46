"""What saves cost the loop as users run it: per-save cost from 500-step blocks aligned on the
saves, the 300 MB state's async cost, and the save budget's overhead."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from trainer.bench.common import NO_EVAL
from trainer.bench.loop_rates import block_seconds, loop_windows, median, rotated
from trainer.checkpoint.async_save import lower_thread_priority
from trainer.summaries import read_metrics

CKPT_EVERY = 500  # the checkpoint cadence of the overhead comparison (issue 6)
AFTER_SAVE = 20  # log windows after a save charged to it (its excess fades within ~10)
BASELINE_FROM = 25  # windows this far after a save, up to the next save, are its baseline


def cost_per_save(windows: list[tuple[int, int, float]], warmup: int, every: int) -> float | None:
    """What one save costs the loop, in seconds, from one run's own log windows (a window
    per log line; at the defaults one per 10-step chunk): for the k-th window after a save,
    the median over the run's saves, minus the median window far from any save (the
    BASELINE_FROM-th to the last before the next save), summed over the AFTER_SAVE windows
    after it. Drift between runs cancels (the baseline is the same run's, seconds away);
    medians, not means, so that a rare stall of the shared machine is no one's cost. The
    first window after a save holds the save call itself. None if the run is too short."""
    by_k: dict[int, list[float]] = {}
    far: list[float] = []
    for end, steps, t in windows:
        since = (end - 1) % every + 1  # steps since the last save step before this window
        if end - since < warmup or steps <= 0:
            continue
        k = -(-since // steps)  # 1 for the window right after the save
        if k <= AFTER_SAVE:
            by_k.setdefault(k, []).append(t / steps)
        elif since > BASELINE_FROM * steps:
            far.append(t / steps)
    if not far or len(by_k) < AFTER_SAVE:
        return None
    base, steps = median(far), median([w[1] for w in windows])
    return sum((median(v) - base) * steps for v in by_k.values())


def checkpoint_cost(m: dict, workdir: str, log) -> dict:
    """A checkpoint every 500 steps (sync, async) against none: the loop as users run it
    (nothing changed for the benchmark; each run a fresh `python -m trainer`), variants
    interleaved in rotating order, 2000-step blocks aligned on the saves; overhead = median
    block time with saves / median block time without - 1. Each run's cost per save seen
    within the run (cost_per_save) is reported beside it.

    2000 steps: four saves, and 200 log rows at the default log_every=10, the size at which
    the loop hands queued rows to TensorBoard (summaries.Writers). A save drains the queue
    too (its logs are written first), so with 500-step blocks every block with a save paid
    a drain while three of four blocks without saves did not, and the median charged the
    drain to the saves (0.13-0.16 of a block, measured). In 2000-step blocks both variants
    drain every row once per block."""
    # the warm-up covers the first save too: one-time costs (thread start, tracing) stay out
    steps, warmup = m["ckpt_steps"], min(CKPT_EVERY + 100, m["ckpt_steps"] // 3)
    every = min(CKPT_EVERY, max(10, steps // 4))  # smoke runs are shorter than 500 steps
    variants = {
        "none": [f"checkpoint.every={NO_EVAL}"],
        "sync": [f"checkpoint.every={every}", "checkpoint.async=false"],
        "async": [f"checkpoint.every={every}", "checkpoint.async=true"],
    }
    block = every * max(1, min(4, (steps - warmup) // (2 * every)))  # 2000 (smoke: less)
    blocks = {k: [] for k in variants}  # every block, pooled over the rounds
    per_round = {k: [] for k in variants}  # each round's own overhead (the spread)
    per_save = {"sync": [], "async": []}  # each run's cost_per_save, seconds
    for r in range(m["ckpt_rounds"]):
        medians = {}
        for name in rotated(list(variants), r):
            windows = loop_windows(variants[name], steps, workdir, fresh=True)
            b = block_seconds(windows, warmup, block)
            blocks[name] += b
            medians[name] = median(b)
            if name in per_save and (c := cost_per_save(windows, warmup, every)) is not None:
                per_save[name].append(c)
        for name in ("sync", "async"):
            per_round[name].append(medians[name] / medians["none"] - 1)
        log(
            f"  round {r + 1}: median {block}-step block "
            + ", ".join(f"{k} {1000 * medians[k]:.1f} ms" for k in variants)
            + f" | overhead sync {per_round['sync'][-1]:+.3f}, async {per_round['async'][-1]:+.3f}"
            + "".join(f" | {k} per save {1000 * v[-1]:.1f} ms" for k, v in per_save.items() if v)
        )
    med = {k: median(v) for k, v in blocks.items()}
    interval = med["none"] * every / block  # the loop's time for `every` steps without saves
    ms = {k: [1000 * c for c in v] for k, v in per_save.items()}
    return {
        # the headline: one async save's cost to the loop, ms (each run's median over its
        # saves, then the median over runs), beside the sync save's and the step's time
        "save_cost_ms": median(ms["async"]) if ms["async"] else None,
        "save_cost_ms_sync": median(ms["sync"]) if ms["sync"] else None,
        "step_ms": 1000 * med["none"] / block,
        "checkpoint_overhead": med["async"] / med["none"] - 1,
        "checkpoint_overhead_sync": med["sync"] / med["none"] - 1,
        "checkpoint_overhead_rounds": per_round,
        # the same cost seen save by save, within each run (cost_per_save), per round
        "cost_per_save_ms_rounds": ms,
        "per_save_overhead": {k: median(v) / interval if v else None for k, v in per_save.items()},
        "checkpoint_every": every,
        "block_steps": block,
        "block_ms": {k: 1000 * v for k, v in med.items()},
        "block_trials_s": blocks,
        "steps_per_sec": {k: block / v for k, v in med.items()},
    }


def big_state_async_cost(m: dict, workdir: str, log) -> dict:
    """The real loop on the ~300 MB state (`model.num_units`, `data.num_features`), a save
    every 10 steps: (time with async saves - without) / (time with sync saves - without), on
    the steps after the warm-up. Each of the three runs is a fresh `python -m trainer`, as
    users run it, in rotating order (as checkpoint_cost's: in one process, in a fixed order,
    later runs carry earlier runs' objects, threads and garbage; BENCHMARKS.md). Per-save
    costs are those differences over the number of saves.

    Two more runs, in this process, put the floor's work in the loop's way: the run without
    saves, then the same run while a thread at the async writer's priority does what the
    floor is (one in-memory copy of a state's worth of arrays and a numpy write of it to the
    page cache) once per 10 steps' time, from the warm-up to the end. Its cost per write,
    against the first of the two, is what the cheapest possible background save would cost
    this loop (`FloorLoad`)."""
    steps, every, warmup = m["big_steps"], 10, m["big_warmup"]
    big = [f"model.num_units={m['units']}", f"data.num_features={m['features']}"]
    big += ["trainer.log_every=10", "checkpoint.max_to_keep=1"]
    variants = {
        "none": [*big, f"checkpoint.every={NO_EVAL}"],
        "sync": [*big, f"checkpoint.every={every}", "checkpoint.async=false"],
        "async": [*big, f"checkpoint.every={every}", "checkpoint.async=true"],
    }
    load = FloorLoad(m["units"], m["features"], warmup, steps)
    seconds = {k: [] for k in [*variants, "floor_base", "floor"]}
    writes = []  # per round: the floor's writes while the measured steps ran

    def measured(windows) -> float:
        return sum(t for end, _, t in windows if end > warmup)

    for r in range(m["big_rounds"]):
        for name in rotated(list(variants), r):
            seconds[name].append(measured(loop_windows(variants[name], steps, workdir, fresh=True)))
        no_saves = variants["none"]
        seconds["floor_base"].append(measured(loop_windows(no_saves, steps, workdir)))
        load.period = seconds["floor_base"][-1] / (steps - warmup) * every  # once per 10 steps
        seconds["floor"].append(measured(loop_windows(no_saves, steps, workdir, load)))
        writes.append(load.writes)
        log(
            f"  round {r + 1}: steps {warmup + 1}-{steps}: "
            + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items())
            + f" ({load.writes} floor writes)"
        )
    saves = (steps - warmup) // every
    ratios = [
        (a - n) / (s - n)
        for n, s, a in zip(seconds["none"], seconds["sync"], seconds["async"], strict=True)
    ]
    med = {k: median(v) for k, v in seconds.items()}
    floor_cost = median(
        [
            (f - n) / max(w, 1)
            for n, f, w in zip(seconds["floor_base"], seconds["floor"], writes, strict=True)
        ]
    )
    async_cost = (med["async"] - med["none"]) / saves
    return {
        "big_state_async_cost": (med["async"] - med["none"]) / (med["sync"] - med["none"]),
        "big_state_async_cost_rounds": ratios,
        "sync_cost_per_save_s": (med["sync"] - med["none"]) / saves,
        "async_cost_per_save_s": async_cost,
        # the floor's work done beside the loop: its cost to the loop per write, and the
        # async save's cost over it (1.0: as cheap as a background save can be here). The
        # floor's runs are in this process, the saves' in fresh ones: these two ratios mix
        # the two ways of running (BENCHMARKS.md, session 13)
        "floor_in_loop_cost_s": floor_cost,
        "floor_in_loop_writes": writes,
        "async_cost_vs_floor_in_loop": async_cost / floor_cost if floor_cost > 0 else None,
        "floor_in_loop_vs_sync": floor_cost / ((med["sync"] - med["none"]) / saves),
        "saves": saves,
        "loop_seconds": med,
        "loop_seconds_trials": seconds,
    }


class FloorLoad:
    """A context manager for `loop_windows(during=...)`: while the run is between steps `start`
    and `end` (read from its metrics.jsonl), a thread at the async writer's priority copies
    three units x features float32 arrays (a weight matrix and Adam's two slots: the state's
    size) and writes the copies to a fresh file with numpy, every `period` seconds; `writes`
    counts the writes it started in that window."""

    def __init__(self, units: int, features: int, start: int, end: int):
        rng = np.random.default_rng(0)
        self.arrays = [rng.standard_normal((units, features), dtype=np.float32) for _ in range(3)]
        self.start, self.end, self.period, self.writes = start, end, 1.0, 0

    def __call__(self, run_dir: str):
        self.run_dir, self.writes = run_dir, 0
        return self

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _step(self) -> int:
        """The run's last logged step (its metrics.jsonl: a few dozen lines in these runs)."""
        return max((r.get("step", 0) for r in read_metrics(self.run_dir)), default=0)

    def _run(self) -> None:
        lower_thread_priority()  # the async writer's thread priority
        while not self._stop.is_set() and self._step() <= self.start:
            time.sleep(0.01)
        path = os.path.join(self.run_dir, "floor.bin")
        while not self._stop.is_set() and self._step() < self.end:
            t0 = time.perf_counter()
            self.writes += 1
            copies = [np.array(a, copy=True) for a in self.arrays]
            with open(path, "wb") as f:
                for c in copies:
                    np.save(f, c)
            del copies
            os.remove(path)
            self._stop.wait(max(0.0, self.period - (time.perf_counter() - t0)))


def budget_overhead(m: dict, workdir: str, log) -> dict:
    """The default model with `checkpoint.every=1 checkpoint.max_overhead=0.02` against no
    checkpoints, as users run it (each run a fresh `python -m trainer`): whole-run time after
    the warm-up, interleaved rounds in rotating order. Also
    the budget's own account at the end of each run (`checkpoint_overhead` in TensorBoard:
    the cost it measured over the run's time, first save included) and its number of saves."""
    steps, warmup = m["ckpt_steps"], min(CKPT_EVERY + 100, m["ckpt_steps"] // 3)
    variants = {
        "none": [f"checkpoint.every={NO_EVAL}"],
        "budget": ["checkpoint.every=1", "checkpoint.max_overhead=0.02"],
    }
    seconds = {k: [] for k in variants}
    own, saves = [], []  # per round: the budget's logged overhead, and its saves
    for r in range(m["ckpt_rounds"]):
        for name in rotated(list(variants), r):
            logged = {"checkpoint_overhead": None, "checkpoint_save_seconds": None}
            windows = loop_windows(variants[name], steps, workdir, scalars=logged, fresh=True)
            seconds[name].append(sum(t for end, _, t in windows if end > warmup))
            if name == "budget":
                own.append(
                    logged["checkpoint_overhead"][-1][1] if logged["checkpoint_overhead"] else 0.0
                )
                saves.append(len(logged["checkpoint_save_seconds"]))
        log(
            f"  round {r + 1}: "
            + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in seconds.items())
            + f" | budget's own account {own[-1]:.3f}, {saves[-1]} saves"
        )
    per_round = [b / n - 1 for n, b in zip(seconds["none"], seconds["budget"], strict=True)]
    return {
        "budget_overhead": median(seconds["budget"]) / median(seconds["none"]) - 1,
        "budget_overhead_rounds": per_round,
        "budget_own_account_rounds": own,
        "budget_saves_rounds": saves,
        "loop_seconds_trials": seconds,
    }
