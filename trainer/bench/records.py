"""`data=records` in the real loop: speed against the same data in memory, peak RSS on a
large dataset against a small one, and how long a resume late in an epoch takes to start.

- `records_vs_memory`: the default model, the loop as users run it, from records (16
  shards) against the same data in memory; interleaved rounds. On 200,000 examples (the
  figure), and on the default 2,048 (`records_vs_memory_default_data`: epochs of 51 steps).
- `records_rss_ratio`: peak RSS of `python -m trainer data=records` training on a large
  synthetic set (5 GB in the full mode) over the same on one 100x smaller, same model.
- `records_resume_late`: wall time of `python -m trainer` resuming at 90% of an epoch of the
  large set and training one step, over the same resuming at the epoch's step 1. Both verify
  every shard's CRC-32 at start (the default, data.verify=checksums); the same with
  data.verify=sizes isolates the cost of skipping to the position.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from trainer.bench.common import REPO, _rss, trainer_command

# (samples, features) of the large set per mode; the small set has 1/100 of the samples.
SIZES = {"full": (5_000_000, 250), "quick": (500_000, 250), "smoke": (20_000, 16)}
SAMPLES_VS_MEMORY = 200_000  # records_vs_memory's data: the default set's features, more rows
RESUME_BATCH = 4096  # large batches: the late-resume run reaches 90% of an epoch in minutes


def _convert(out: str, overrides: list[str], shards: int) -> dict:
    """scripts/make_records.py in a subprocess, as users run it; its description and time."""
    t0 = time.perf_counter()
    cmd = [sys.executable, os.path.join(REPO, "scripts", "make_records.py"), *overrides]
    cmd += ["--out", out, "--shards", str(shards), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "description.json")) as f:
        desc = json.load(f)
    desc["seconds"] = time.perf_counter() - t0
    return desc


def records_vs_memory(m: dict, workdir: str, log) -> dict:
    """steps/s of the default model trained from records over the same data in memory: on
    a 200,000-example synthetic set (epochs of 5,000 steps) and on the default 2,048-example
    set (epochs of 51 steps, where each epoch's pipeline set-up counts)."""
    from trainer.bench.common import NO_EVAL
    from trainer.bench.loop_rates import loop_rate

    quiet = [f"checkpoint.every={NO_EVAL}"]
    out: dict = {}
    datasets = (("", SAMPLES_VS_MEMORY), ("_default_data", None))
    if not m["records_all"]:  # smoke: the small default data only, under the main name
        datasets = (("", None),)
    for label, samples in datasets:
        source = [] if samples is None else [f"data.num_samples={samples}"]
        path = os.path.join(workdir, f"vs-memory{label}")
        _convert(path, ["data=synthetic_regression", *source], shards=16)
        variants = {
            "memory": [*quiet, *source],
            "records": [*quiet, "data=records", f"data.files={path}/train-*.tfrecord"],
        }
        rates = {k: [] for k in variants}
        for r in range(m["rounds"]):
            for name, extra in variants.items():
                rates[name].append(loop_rate(extra, m["steps"], m["warmup"], workdir))
            log(
                f"  {samples or 2048} examples, round {r + 1}: "
                + ", ".join(f"{k} {v[-1]:.0f} steps/s" for k, v in rates.items())
            )
        ratio = statistics.median(rates["records"]) / statistics.median(rates["memory"])
        out[f"records_vs_memory{label}"] = ratio
        out[f"records_vs_memory{label}_rounds"] = [
            b / a for a, b in zip(rates["memory"], rates["records"], strict=True)
        ]
        out[f"steps_per_sec{label}"] = rates
    return out


def _timed_run(args: list[str], run_dir: str) -> float:
    """Wall time of one `python -m trainer` run in a subprocess."""
    cmd, env = trainer_command(args, run_dir)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"trainer {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def records_large(mode: str, m: dict, workdir: str, log) -> dict:
    """Peak RSS large vs small, and resuming late in an epoch of the large set vs early."""
    n, features = SIZES[mode]
    sets = {}
    for name, samples, shards in (("large", n, 64), ("small", n // 100, 16)):
        out = os.path.join(workdir, f"{name}-records")
        src = [
            "data=synthetic_regression",
            f"data.num_samples={samples}",
            f"data.num_features={features}",
            "data.val_fraction=0.01",
        ]
        desc = _convert(out, src, shards)
        size = sum(os.path.getsize(os.path.join(out, s["file"])) for s in desc["shards"])
        sets[name] = {"dir": out, "bytes": size, "convert_seconds": desc["seconds"]}
        log(f"  {name}: {size / 1e9:.2f} GB in {desc['seconds']:.0f} s")
    rss = {}
    for name, s in sets.items():
        args = [
            "data=records",
            f"data.files={s['dir']}/train-*.tfrecord",
            f"trainer.max_steps={m['rss_steps'] + 1}",
            f"trainer.stop_at={m['rss_steps']}",
            "trainer.eval_every=100000000",
        ]
        rss[name] = _rss(args, os.path.join(workdir, f"rss-{name}"))
    log(f"  peak RSS: large {rss['large']:.0f} MB, small {rss['small']:.0f} MB")
    resume = _resume_late(sets["large"]["dir"], m, workdir, log)
    return {
        "records_rss_ratio": rss["large"] / rss["small"],
        "records_resume_late": resume.pop("ratio"),
        "peak_rss_mb": rss,
        "datasets": sets,
        "resume": resume,
    }


def _resume_late(path: str, m: dict, workdir: str, log) -> dict:
    """Resume at 90% of an epoch vs at step 1: runs stopped there, then resumed for a step."""
    from trainer.bench.common import compose
    from trainer.data.memory import load_data

    data = [
        "data=records",
        f"data.files={path}/train-*.tfrecord",
        f"data.batch_size={RESUME_BATCH}",
    ]
    spe = load_data(compose([*data, "data.verify=sizes"]).data).steps_per_epoch(RESUME_BATCH)
    late = int(0.9 * spe)
    common = [
        *data,
        f"trainer.max_steps={spe + 2 * m['big_rounds'] + 2}",  # room for the resumes
        "trainer.eval_every=100000000",
        "checkpoint.every=100000000",
    ]
    runs = {}
    for name, at in (("start", 1), ("late", late)):
        run_dir = os.path.join(workdir, f"resume-{name}")
        t = _timed_run([*common, f"trainer.stop_at={at}"], run_dir)  # the checkpoint at `at`
        runs[name] = (run_dir, at)
        log(f"  trained to step {at} of {spe} (batch {RESUME_BATCH}) in {t:.0f} s")
    verifies = ("checksums", "sizes") if m["records_all"] else ("checksums",)
    times = {f"{k}_{v}": [] for k in runs for v in verifies}
    for _ in range(m["big_rounds"]):
        for verify in verifies:
            for name, (run_dir, at) in runs.items():
                args = [*common, f"trainer.stop_at={at + 1}", f"data.verify={verify}"]
                times[f"{name}_{verify}"].append(_timed_run(args, run_dir))
                runs[name] = (run_dir, at + 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    log("  resume to the first step: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))
    return {
        "ratio": med["late_checksums"] / med["start_checksums"],
        "ratio_sizes_only": med["late_sizes"] / med["start_sizes"] if "late_sizes" in med else None,
        "steps_per_epoch": spe,
        "late_step": late,
        "seconds": times,
    }
