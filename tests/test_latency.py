"""The latency comparison tells a slower candidate from an equally fast one."""

import time

import numpy as np

from trainer.verify.latency import compare_latency


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
    # A 2x slower candidate, so that the test holds on a loaded 2-core machine too (seen:
    # an equally fast twin measured 1.14 while four other jobs ran).
    fns = {"original": _taking(200e-6), "same": _taking(200e-6), "slower": _taking(400e-6)}
    report = compare_latency(fns, np.zeros((8, 3)), baseline="original", rounds=25)
    assert report["batch_size"] == 8 and report["calls_per_round"] >= 3
    assert report["ratio"]["same"] <= 1.25 < 1.5 < report["ratio"]["slower"]
    assert report["ratio"]["slower"] < 2.5
    assert set(report["median_seconds"]) == set(fns)
