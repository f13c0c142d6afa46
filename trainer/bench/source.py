"""`source_vs_memory`: the default model trained from a random-access source (`data=custom`)
whose rows each wait 50 us, as a file or a database read would, against the same rows in
memory (BENCHMARKS.md)."""

from __future__ import annotations

import statistics
import time

import numpy as np

ROW_SECONDS = 50e-6  # what one row costs the source: a wait (I/O), not CPU


class SlowRows:
    """The default synthetic regression set's rows, one at a time, each after a wait."""

    def __init__(self, delay: float = ROW_SECONDS):
        from omegaconf import OmegaConf

        from trainer.data.memory import read_source

        cfg = OmegaConf.create(
            {
                "name": "synthetic_regression",
                "task": "regression",
                "num_samples": 2048,
                "num_features": 10,
                "noise": 0.1,
            }
        )
        self.x, self.y, *_ = read_source(cfg)
        self.delay = delay

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        time.sleep(self.delay)
        return self.x[i], self.y[i]


def slow_rows(delay: float = ROW_SECONDS) -> SlowRows:
    return SlowRows(delay)


def source_vs_memory(m: dict, workdir: str, log, loop_rate) -> dict:
    """steps/s of the default run from the 50 us-a-row source over the same run in memory,
    in alternating order, `rounds` times; `loop_rate(overrides, steps, warmup, workdir)` is
    the steady steps/s of one run (trainer/bench/loop_rates.py)."""
    quiet = ["checkpoint.every=1000000000"]
    variants = {
        "memory": quiet,
        "source": [*quiet, "data=custom", "data._target_=trainer.bench.source.slow_rows"],
    }
    rates = {k: [] for k in variants}
    for r in range(m["rounds"]):
        for name in variants if r % 2 == 0 else reversed(list(variants)):
            rates[name].append(loop_rate(variants[name], m["steps"], m["warmup"], workdir))
        log(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} steps/s" for k, v in rates.items()))
    return {
        "source_vs_memory": statistics.median(rates["source"]) / statistics.median(rates["memory"]),
        "source_vs_memory_rounds": [
            float(b / a) for a, b in zip(rates["memory"], rates["source"], strict=True)
        ],
        "steps_per_sec": rates,
        "row_seconds": ROW_SECONDS,
        "rows_per_second_needed": float(np.median(rates["memory"]) * 32),
    }
