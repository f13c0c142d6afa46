"""Fair inference timing: one batch, warm-up, interleaved rounds, paired ratios, medians.

Timing tiny models on a shared CPU is noisy, so the comparison is built to cancel noise
rather than average it away: every candidate runs the same input tensor; each is warmed up
(tracing, allocations) before anything is timed; the candidates are timed back to back in a
freshly shuffled order in every round, so load from other processes hits them alike; the
ratio is taken per round (candidate / baseline) and its median reported; the garbage
collector is off while a block is timed.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable


def time_block(fn: Callable, x, calls: int) -> float:
    """Seconds per call of `fn(x)` over `calls` back-to-back calls (results forced to host)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(x).numpy()
        return (time.perf_counter() - t0) / calls
    finally:
        if enabled:
            gc.enable()


def compare_latency(
    fns: dict[str, Callable],
    x,
    *,
    baseline: str,
    rounds: int = 80,
    block_seconds: float = 0.004,
    warmup: int = 10,
    seed: int = 0,
) -> dict:
    """Median seconds per call of each candidate and its median per-round ratio to `baseline`."""
    for fn in fns.values():
        for _ in range(warmup):
            fn(x).numpy()
    probe = min(time_block(fns[baseline], x, 5) for _ in range(3))
    calls = max(3, min(500, int(block_seconds / max(probe, 1e-7))))
    rng = random.Random(seed)
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            per_call[name].append(time_block(fns[name], x, calls))
    base = per_call[baseline]
    return {
        "batch_size": int(x.shape[0]),
        "rounds": rounds,
        "calls_per_round": calls,
        "median_seconds": {name: statistics.median(v) for name, v in per_call.items()},
        "ratio": {
            name: statistics.median(a / b for a, b in zip(v, base, strict=True))
            for name, v in per_call.items()
            if name != baseline
        },
    }
