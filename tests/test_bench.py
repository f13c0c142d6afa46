"""scripts/bench.py runs end to end (its tiny smoke mode) and writes bench.json with the ratios."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_cli

RATIOS = [
    "loop_vs_fit",
    "loop_vs_fit_same_spe",
    "checkpoint_overhead",
    "big_state_async_cost",
    "async_cost_vs_floor",
    "budget_overhead",
    "save_vs_numpy",
    "source_vs_memory",
]


@pytest.mark.slow
def test_bench_writes_bench_json_with_the_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("scripts/bench.py", "--smoke", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in RATIOS:
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
        assert key in proc.stdout  # the printed table names every ratio
    assert result["state"]["checkpoint_mb"] > 0 and result["memory"]["train_default_mb"] > 0
    st = result["state"]
    assert st["data_position_bytes"] == 16  # two int64 counters, read from a real checkpoint
    assert 0 < st["data_position_checkpoint_bytes"] < st["tf_data_iterator_bytes"]
    assert len(st["save_vs_numpy_min_median_max"]) == 3
    assert result["big_state_loop"]["saves"] > 0 and result["budget"]["loop_seconds_trials"]
    # the floor's variant ran once per round (a 40-step smoke run may end before its first write)
    assert len(result["big_state_loop"]["floor_in_loop_writes"]) == 1
    assert result["budget"]["budget_saves_rounds"][0] >= 1
    assert result["source"]["row_seconds"] == 50e-6 and result["source"]["steps_per_sec"]["source"]
    # checkpoint.remote: a real upload against a plain put (the loop's cost is not run: too short)
    assert result["upload_vs_put"] > 0 and result["remote"]["checkpoint_mb"] > 0
    assert "upload_vs_put" in proc.stdout and "remote_cost_ratio" in proc.stdout
    # the headline: too short a run for a save's cost in smoke mode, but named, with the step
    assert "save_cost_ms" in proc.stdout and result["checkpoints"]["step_ms"] > 0


def test_cost_per_save_charges_the_windows_after_each_save():
    """saves.cost_per_save on log windows built by hand: a save every 500 steps adds 3 ms to
    the window after it and 1 ms to the next. Not charged: the window that ends at the save
    step (it runs before the save), saves inside the warm-up (costlier, and most of them),
    one save's stall among the windows after it (the median over saves), one stall far from
    any save (the baseline's median)."""
    from trainer.bench.saves import cost_per_save

    windows = []
    for end in range(10, 20_001, 10):
        since = (end - 1) % 500 + 1  # steps since the last save
        save = end - since
        t = 0.002 + {10: 0.003, 20: 0.001}.get(since, 0.0)
        if since == 500:
            t += 0.005  # the window ending at the next save step
        if save < 14_000 and since <= 20:
            t += 0.05  # a save during the warm-up: one-time costs
        if end in (15_020, 7_300, 16_300):
            t += 0.5  # stalls of the shared machine
        windows.append((end, 10, t))
    assert abs(cost_per_save(windows, warmup=14_000, every=500) - 0.004) < 1e-9
    assert cost_per_save(windows[:100], warmup=600, every=500) is None  # no save after warm-up


def test_save_ab_splits_a_runs_saves_into_the_variant_and_the_code_as_is():
    """scripts/save_ab.py's halves: the saves after steps 500, 1500, ... ran the variant,
    the others the code as is; each half's cost against the run's one baseline. Built by
    hand: odd saves add 2 ms to their first window, even ones 5 ms (then 1 ms more)."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("save_ab", f"{REPO}/scripts/save_ab.py")
    save_ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(save_ab)
    windows = []
    for end in range(10, 20_001, 10):
        since = (end - 1) % 500 + 1
        odd = ((end - since) // 500) % 2 == 1
        t = 0.002 + ({10: 0.002} if odd else {10: 0.005, 20: 0.001}).get(since, 0.0)
        if end - since < 1100 and since <= 20:
            t += 0.05  # the warm-up's saves: not counted
        windows.append((end, 10, t))
    even, odd = save_ab.halves(windows)
    assert abs(even - 6.0) < 1e-6 and abs(odd - 2.0) < 1e-6
