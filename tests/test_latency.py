"""The latency comparison tells a slower candidate from an equally fast one."""

import time

import numpy as np

from trainer.latency import compare_latency


class _Result:
    def numpy(self):
        return 0


def _taking(seconds: float):
    def fn(x):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:  # busy: CPU time, like inference
            pass
        return _Result()

    return fn


def test_compare_latency_flags_a_slower_candidate_only():
    fns = {"original": _taking(200e-6), "same": _taking(200e-6), "slower": _taking(300e-6)}
    report = compare_latency(fns, np.zeros((8, 3)), baseline="original", rounds=25)
    assert report["batch_size"] == 8 and report["calls_per_round"] >= 3
    assert report["ratio"]["same"] <= 1.1 < report["ratio"]["slower"]
    assert 1.3 < report["ratio"]["slower"] < 1.7
    assert set(report["median_seconds"]) == set(fns)
