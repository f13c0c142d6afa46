"""`scripts/verify_export.py RUN`: prove that the exported artifacts lose nothing.

In a fresh process: rebuild the run's data and model from the config its checkpoint
manifest recorded, restore the latest good checkpoint (the reference, "original"), load
`export/model.keras` (safe mode) and `export/saved_model` (its serving signature), then
compare on the validation split: outputs, loss and task metric (also against the eval the
training process logged at that step), every model variable, the optimizer state inside
model.keras, and inference latency. Exit 0 when nothing is lost, 1 when something differs,
2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from trainer.config import UserError

EXIT_OK, EXIT_DIFFERS, EXIT_BAD_INPUT = 0, 1, 2
MAX_RATIO = 1.1  # the reloaded model may be at most this much slower than the original


class _ArtifactError(Exception):
    """An artifact exists but cannot be loaded: a verification failure (exit 1)."""


def _check(checks: list, name: str, ok: bool, detail: str) -> None:
    checks.append({"name": name, "ok": bool(ok), "detail": detail})


def _max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def load_config(run_dir: str, prefix: str):
    """The run's full resolved config: from the checkpoint manifest, else `.hydra/config.yaml`."""
    from omegaconf import OmegaConf

    from trainer.checkpoint.manifest import read_manifest

    cfg = read_manifest(prefix).get("config")
    if cfg:
        return OmegaConf.create(cfg)
    path = os.path.join(run_dir, ".hydra", "config.yaml")
    if not os.path.isfile(path):
        raise UserError(f"RUN: {run_dir!r} has no recorded config (manifest or .hydra/config.yaml)")
    return OmegaConf.load(path)


def _artifact_paths(run_dir: str) -> tuple[str, str]:
    if not os.path.isdir(run_dir):
        raise UserError(f"RUN: received {run_dir!r}; no such directory")
    keras_path = os.path.join(run_dir, "export", "model.keras")
    sm_path = os.path.join(run_dir, "export", "saved_model")
    missing = [
        p for p in (keras_path, os.path.join(sm_path, "saved_model.pb")) if not os.path.isfile(p)
    ]
    if missing:
        raise UserError(
            f"RUN: {run_dir!r} has no export ({', '.join(missing)} missing); artifacts are "
            "written when a run completes trainer.max_steps"
        )
    return keras_path, sm_path


def _relpath(path: str, model_name: str) -> str:
    """A variable path without the model's own name in front (they differ across loads)."""
    return path.split("/", 1)[1] if path.startswith(model_name + "/") else path


def compare_variables(ref: list, other: list, names: list[str]) -> list[dict]:
    """Per-variable max |difference| (positional; shapes must agree)."""
    rows = []
    for i in range(max(len(ref), len(other))):
        a = ref[i].numpy() if i < len(ref) else None
        b = other[i].numpy() if i < len(other) else None
        diff = float("inf") if a is None or b is None else _max_diff(a, b)
        rows.append({"name": names[i] if i < len(names) else f"#{i}", "max_abs_diff": diff})
    return rows


def _serving_fn(saved_model):
    """The SavedModel's `serving_default` signature as a tensor -> tensor function."""
    signature = saved_model.signatures["serving_default"]
    (arg,) = signature.structured_input_signature[1]
    (out,) = signature.structured_outputs

    def serve(x):
        return signature(**{arg: x})[out]

    return serve


class _AsModel:
    """Lets a plain tensor function stand where `make_eval_fn` expects a model."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x, training=False):
        return self.fn(x)


def _logged_eval(run_dir: str, step: int) -> dict | None:
    path = os.path.join(run_dir, "metrics.jsonl")
    found = None
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r.get("split") == "eval" and r.get("step") == step:
                    found = r
    return found


def _reference(cfg, data, ckpt_dir: str, prefix: str):
    """A freshly built model + optimizer with checkpoint `prefix` restored, as a resume does
    (every value checked one to one first)."""
    from trainer import build
    from trainer.checkpoint.store import CheckpointStore

    state = build.build_state(cfg, data)
    problems = state.restore_problems(prefix)
    if problems:
        raise UserError(
            f"{prefix} does not match the model its config builds: {'; '.join(problems[:5])}"
        )
    reader = CheckpointStore(
        ckpt_dir,
        state.checkpoint,
        max_to_keep=1,
        keep_every_n_hours=None,
        manifest_extra={},
        write=False,  # read only: nothing in the run directory changes
    )
    reader.restore(prefix)
    return state.model, state.optimizer


def _load_artifacts(keras_path: str, sm_path: str, x_one):
    """(model.keras loaded in safe mode, the SavedModel, its serving function)."""
    import keras
    import tensorflow as tf

    import models  # noqa: F401  (registers the project's classes for safe-mode loading)

    try:
        reloaded = keras.models.load_model(keras_path, safe_mode=True)
        reloaded(x_one)  # build every layer (a no-op when already built)
    except Exception as e:  # a torn or foreign file is a finding, not a crash
        raise _ArtifactError(f"export/model.keras does not load: {type(e).__name__}: {e}") from None
    try:
        saved = tf.saved_model.load(sm_path)
        return reloaded, saved, _serving_fn(saved)
    except Exception as e:
        raise _ArtifactError(f"export/saved_model does not load: {type(e).__name__}: {e}") from None


_MAX_VAL = 65536  # validation inputs compared output by output (the metrics use all)


def verify_export(
    run_dir: str, *, atol: float = 0.0, rounds: int = 80, max_ratio: float = MAX_RATIO
) -> dict:
    """Run every comparison; return the report (`report["ok"]` is the verdict)."""
    run_dir = os.path.abspath(run_dir)
    keras_path, sm_path = _artifact_paths(run_dir)  # before importing TensorFlow: fast errors
    import tensorflow as tf

    from trainer import build
    from trainer.checkpoint.store import CheckpointStore
    from trainer.data import memory as data_lib
    from trainer.data.standardize import scaled_loss
    from trainer.losses import build_objective
    from trainer.verify.latency import compare_latency

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    finder = CheckpointStore(
        ckpt_dir, None, max_to_keep=1, keep_every_n_hours=None, manifest_extra={}, write=False
    )
    good = finder.latest_good()
    if good is None:
        raise UserError(f"RUN: {run_dir!r} has no checkpoint in {ckpt_dir}")
    cfg = load_config(run_dir, good.prefix)
    build.setup_runtime(cfg)
    data = data_lib.load_data(cfg.data)
    x_val = tf.constant(data.val_x(_MAX_VAL))
    model, optimizer = _reference(cfg, data, ckpt_dir, good.prefix)
    reloaded, saved, serve = _load_artifacts(keras_path, sm_path, x_val[:1])

    checks: list[dict] = []
    report: dict = {"run": run_dir, "checkpoint": good.prefix, "step": good.step, "atol": atol}

    # Every candidate runs as a graph, as served.
    original_fn = tf.function(lambda x: model(x, training=False))
    keras_fn = tf.function(lambda x: reloaded(x, training=False))
    candidates = {"checkpoint": original_fn, "model.keras": keras_fn, "saved_model": serve}
    _compare_outputs(candidates, x_val, atol, report, checks)

    # Task metrics on the run's own objective (a custom loss too), as the training eval does.
    objective = build_objective(cfg, data.task)
    objective.loss_fn = scaled_loss(objective.loss_fn, model)
    eval_ds = data.eval_dataset(int(cfg.data.batch_size))
    subjects = {"checkpoint": model, "model.keras": reloaded, "saved_model": _AsModel(serve)}
    logged = _logged_eval(run_dir, good.step)
    _compare_metrics(objective, eval_ds, subjects, logged, atol, report, checks)

    _compare_model_variables(model, reloaded, saved, atol, report, checks)

    # The optimizer inside model.keras: class, iterations and every slot.
    report["optimizer"] = _compare_optimizer(optimizer, getattr(reloaded, "optimizer", None))
    o = report["optimizer"]
    _check(checks, "optimizer model.keras", o["ok"], o["detail"])

    # The user's parts inside model.keras: the schedule driving its optimizer, and its loss.
    report["parts"] = _compare_parts(optimizer, objective.keras_loss, reloaded)
    p = report["parts"]
    _check(checks, "schedule, loss model.keras", p["ok"], p["detail"])

    # Inference latency on one validation batch, reloaded vs original.
    batch = x_val[: int(cfg.data.batch_size)]
    latency = compare_latency(candidates, batch, baseline="checkpoint", rounds=rounds)
    report["latency"] = latency
    for name, ratio in latency["ratio"].items():
        _check(checks, f"latency {name}", ratio <= max_ratio, f"{ratio:.3f}x the original")

    report["checks"] = checks
    report["ok"] = all(c["ok"] for c in checks)
    return report


def _compare_outputs(candidates: dict, x_val, atol: float, report: dict, checks: list) -> None:
    """Outputs on the validation split (its first _MAX_VAL examples), each reloaded candidate
    against the checkpoint's."""
    outputs = {name: fn(x_val).numpy() for name, fn in candidates.items()}
    report["outputs"] = {
        name: _max_diff(outputs["checkpoint"], out) for name, out in outputs.items()
    }
    for name in ("model.keras", "saved_model"):
        diff = report["outputs"][name]
        _check(checks, f"outputs {name}", diff <= atol, f"max |diff| {diff:.3g} vs checkpoint")


def _compare_metrics(
    objective, eval_ds, subjects: dict, logged: dict | None, atol: float, report: dict, checks: list
) -> None:
    """Task metrics, computed the way the training loop's eval computes them, for every subject
    (and as logged by training at that step, when it was)."""
    from trainer.steps import make_eval_fn

    metric_name, metric_fn, loss_fn = objective.metric_name, objective.metric_fn, objective.loss_fn
    metrics = {}
    for name, subject in subjects.items():
        loss, metric, _ = make_eval_fn(subject, loss_fn, metric_fn)(eval_ds)
        metrics[name] = {"loss": loss, metric_name: metric}
    if logged is not None:
        metrics["logged in training"] = {
            "loss": logged["eval_loss"],
            metric_name: logged[f"eval_{metric_name}"],
        }
    report["metrics"] = metrics
    for name, values in metrics.items():
        if name != "checkpoint":
            same = all(abs(values[k] - metrics["checkpoint"][k]) <= atol for k in values)
            detail = ", ".join(f"{k} {v:.9g}" for k, v in values.items())
            _check(checks, f"metrics {name}", same, detail)


def _compare_model_variables(
    model, reloaded, saved, atol: float, report: dict, checks: list
) -> None:
    """Every model variable (trainable, BatchNorm moving statistics, add_weight variables).
    The SavedModel also carries the SeedGenerator states (Dropout RNG); `.keras` stores
    weights only, which is all inference needs (the checkpoint holds the RNG for training)."""
    names = [_relpath(v.path, model.name) for v in model.variables]
    weight_ids = {id(w) for w in model.weights}
    weight_names = [n for n, v in zip(names, model.variables, strict=True) if id(v) in weight_ids]
    rng_names = [n for n, v in zip(names, model.variables, strict=True) if id(v) not in weight_ids]
    variables = {
        "model.keras": compare_variables(model.weights, reloaded.weights, weight_names),
        "saved_model": compare_variables(model.variables, list(saved.variables), names),
    }
    report["variables"] = variables
    report["rng_states_not_in_model_keras"] = rng_names
    for name, rows in variables.items():
        bad = [r["name"] for r in rows if r["max_abs_diff"] > atol]
        expected = len(weight_names) if name == "model.keras" else len(names)
        detail = f"{len(rows) - len(bad)}/{len(rows)} identical" + (
            f"; differ: {', '.join(bad)}" if bad else ""
        )
        if name == "model.keras" and rng_names:
            detail += f" (+{len(rng_names)} RNG states: not in .keras, training-only)"
        _check(checks, f"variables {name}", not bad and len(rows) == expected, detail)


def _compare_optimizer(ref, other) -> dict:
    if other is None or not other.variables:
        return {"ok": False, "detail": "model.keras holds no optimizer state", "variables": []}
    if type(ref) is not type(other):
        detail = f"{type(other).__name__} in model.keras, {type(ref).__name__} in the checkpoint"
        return {"ok": False, "detail": detail, "variables": []}
    names = [v.path for v in other.variables]
    rows = compare_variables(ref.variables, other.variables, names)
    bad = [r["name"] for r in rows if r["max_abs_diff"] != 0]
    it_ref, it_other = int(ref.iterations.numpy()), int(other.iterations.numpy())
    detail = f"{type(other).__name__}, iterations {it_other} (checkpoint {it_ref}), " + (
        f"{len(rows)}/{len(rows)} variables identical" if not bad else f"differ: {', '.join(bad)}"
    )
    ok = not bad and it_ref == it_other and len(ref.variables) == len(other.variables)
    return {"ok": ok, "detail": detail, "iterations": it_other, "variables": rows}


def _describe(obj) -> tuple[str, dict]:
    """(class name, config) of a schedule or loss; a constant rate as ('constant', {})."""
    if not hasattr(obj, "get_config"):
        return "constant", {}
    config = obj.get_config()
    return type(obj).__name__, {k: v for k, v in config.items() if k not in ("name", "dtype")}


def _compare_parts(optimizer, loss, reloaded) -> dict:
    """The reloaded artifact's learning-rate schedule and loss against the run's: same class,
    same configuration (a user's own must be registered to come back)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    other = getattr(reloaded, "optimizer", None)
    other = getattr(other, "inner_optimizer", other)
    if other is None or not other.variables:  # not compiled: the optimizer check says so
        return {"ok": True, "detail": "none in model.keras (no optimizer state, above)"}
    pairs = {
        "schedule": (
            _describe(inner._learning_rate),
            _describe(getattr(other, "_learning_rate", None)),
        ),
        "loss": (_describe(loss), _describe(getattr(reloaded, "loss", None))),
    }
    bad = [name for name, (a, b) in pairs.items() if a != b]
    detail = ", ".join(f"{name} {b[0]}" for name, (_, b) in pairs.items())
    if bad:
        detail += "; differ: " + ", ".join(
            f"{name} {a[0]} {a[1]} in the run, {b[0]} {b[1]} in model.keras"
            for name, (a, b) in pairs.items()
            if name in bad
        )
    return {"ok": not bad, "detail": detail}


def format_table(report: dict) -> str:
    """The human-readable verdict: one line per check, then the numbers behind them."""
    lines = [f"verify_export {report['run']}  (checkpoint step {report['step']})", ""]
    for c in report["checks"]:
        lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'}  {c['name']:<28} {c['detail']}")
    lat = report["latency"]
    lines.append("")
    lines.append(
        f"  latency, batch {lat['batch_size']}, {lat['rounds']} interleaved rounds x "
        f"{lat['calls_per_round']} calls (median per call):"
    )
    for name, sec in lat["median_seconds"].items():
        ratio = lat["ratio"].get(name)
        extra = f"  ratio {ratio:.3f}" if ratio is not None else "  (baseline)"
        lines.append(f"    {name:<14} {sec * 1e6:10.1f} us{extra}")
    lines.append("")
    lines.append("RESULT: " + ("nothing lost" if report["ok"] else "DIFFERENCES FOUND"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: print the table, write report.json, return the exit code."""
    parser = argparse.ArgumentParser(prog="verify_export.py", description=__doc__.splitlines()[0])
    parser.add_argument("run", metavar="RUN", help="a run directory with checkpoints/ and export/")
    parser.add_argument("--out", help="report file or directory (default: RUN/report.json)")
    parser.add_argument("--atol", type=float, default=0.0, help="allowed |difference| (CPU: 0)")
    parser.add_argument("--rounds", type=int, default=80, help="interleaved latency rounds")
    parser.add_argument(
        "--max-latency-ratio",
        type=float,
        default=MAX_RATIO,
        help=f"how much slower a reloaded model may be than the original (default {MAX_RATIO})",
    )
    args = parser.parse_args(argv)
    if not args.max_latency_ratio > 0:
        parser.error(f"--max-latency-ratio: received {args.max_latency_ratio}; allowed: > 0")
    try:
        report = verify_export(
            args.run, atol=args.atol, rounds=args.rounds, max_ratio=args.max_latency_ratio
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _ArtifactError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return EXIT_DIFFERS
    from trainer.checkpoint.manifest import write_json_atomic

    out = args.out or report["run"]
    if os.path.isdir(out):
        out = os.path.join(out, "report.json")
    write_json_atomic(out, report)
    print(format_table(report))
    print(f"report: {out}")
    return EXIT_OK if report["ok"] else EXIT_DIFFERS
