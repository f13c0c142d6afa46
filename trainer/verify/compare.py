"""Compare two runs as TensorBoard shows them: scalar curves step by step, then final state.

Curves are read from the runs' event files with TensorBoard's own loader, every file of a
run in TensorBoard's order, so a step written twice (a killed run's steps that a resume
wrote again) is seen twice here as well and reported. Values are float32 in the event
files and compared exactly unless an absolute tolerance is given.
The final state is compared variable by variable under the variables' Keras paths: every
value of the two runs' newest checkpoints (bookkeeping that legitimately differs between an
interrupted and an uninterrupted run excepted), and, for each run, every variable of the
model and optimizer rebuilt from the run's recorded config: a variable missing from both
checkpoints is a difference too, not a tensor that neither side happens to hold.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import asdict, dataclass, field

from trainer.config import UserError

# Scalars that measure wall-clock time: they differ between any two runs.
TIMING_TAGS = (
    "steps_per_sec",
    "checkpoint_save_seconds",
    "checkpoint_cost_seconds",
    "checkpoint_overhead",
    "remote_lag_steps",  # (and _seconds) how far checkpoint.remote's upload is behind
    "remote_lag_seconds",
)


@dataclass
class Curve:
    """One scalar tag of one TensorBoard run, in file order (duplicates kept)."""

    logdir: str
    tag: str
    points: list[tuple[int, float]]

    @property
    def duplicate_steps(self) -> list[int]:
        seen, dup = set(), set()
        for step, _ in self.points:
            (dup if step in seen else seen).add(step)
        return sorted(dup)

    def by_step(self) -> dict[int, float]:
        """{step: value}; where a step repeats, the last value wins (as a resume writes it)."""
        return dict(self.points)


@dataclass
class CurveDiff:
    tag: str
    steps_compared: int
    first_divergent_step: int | None
    max_abs_diff: float
    missing_in_a: list[int] = field(default_factory=list)
    missing_in_b: list[int] = field(default_factory=list)
    duplicates_a: list[int] = field(default_factory=list)
    duplicates_b: list[int] = field(default_factory=list)
    ok: bool = True


@dataclass
class StateDiff:
    step_a: int
    step_b: int
    tensors_compared: int
    differing: list[str]  # Keras paths (model/..., optimizer/..., rng/...) and counters
    missing: list[str]  # held by one checkpoint only
    max_abs_diff: float
    equal: bool
    # variables of the model/optimizer rebuilt from the config that a checkpoint lacks:
    # {"a": [...], "b": [...]}; None where the model could not be rebuilt (see rebuild_error)
    not_saved: dict[str, list[str]] | None = None
    rebuild_error: str | None = None


# ---------------------------------------------------------------- reading
def tensorboard_dir(path: str, split: str = "train") -> str:
    """The directory holding `split` event files for `path`: a run dir, its tensorboard/, or the dir itself."""
    candidates = [os.path.join(path, "tensorboard", split), os.path.join(path, split)]
    for candidate in candidates + ([path] if split == "train" else []):
        if glob.glob(os.path.join(glob.escape(candidate), "*tfevents*")):
            return candidate
    if not os.path.isdir(path):
        raise UserError(f"run: received {path!r}; no such directory")
    raise UserError(
        f"run: received {path!r}; no TensorBoard event files in it, in its {split}/ "
        f"or in its tensorboard/{split}/ (allowed: a run directory or a TensorBoard log dir)"
    )


def _scalar(value) -> float | None:
    if value.HasField("tensor"):
        if value.metadata.plugin_data.plugin_name != "scalars":
            return None  # hparams, text, histograms...
        from tensorboard.util import tensor_util

        array = tensor_util.make_ndarray(value.tensor)
        return float(array) if array.size == 1 else None
    if value.HasField("simple_value"):
        return float(value.simple_value)
    return None


def read_all_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} for every scalar in `logdir`'s event files, in TensorBoard's file order."""
    from tensorboard.backend.event_processing import event_file_loader

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(logdir), "*tfevents*"))):
        for event in event_file_loader.EventFileLoader(path).Load():
            for value in event.summary.value:
                v = _scalar(value)
                if v is not None:
                    out.setdefault(value.tag, []).append((int(event.step), v))
    return out


def read_curve(run: str, tag: str = "loss", split: str = "train") -> Curve:
    """Scalar `tag` of `run` (see `tensorboard_dir`); UserError naming the tags there if absent."""
    logdir = tensorboard_dir(run, split)
    scalars = read_all_scalars(logdir)
    if tag not in scalars:
        raise UserError(
            f"--tag: received {tag!r}; {logdir} has scalar tags: {', '.join(sorted(scalars)) or 'none'}"
        )
    return Curve(logdir, tag, scalars[tag])


# ---------------------------------------------------------------- comparing
def _differs(a: float, b: float, atol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return not (math.isnan(a) and math.isnan(b))
    return a != b if atol == 0 else abs(a - b) > atol


def compare_curves(a: Curve, b: Curve, atol: float = 0.0, same_steps: bool = True) -> CurveDiff:
    """Step-by-step comparison; a step written twice, or (if `same_steps`) held by one run only, diverges."""
    va, vb = a.by_step(), b.by_step()
    common = sorted(set(va) & set(vb))
    gaps = [abs(va[s] - vb[s]) for s in common if not (math.isnan(va[s]) or math.isnan(vb[s]))]
    d = CurveDiff(
        tag=a.tag,
        steps_compared=len(common),
        first_divergent_step=None,
        max_abs_diff=max(gaps, default=0.0),
        missing_in_a=sorted(set(vb) - set(va)),
        missing_in_b=sorted(set(va) - set(vb)),
        duplicates_a=a.duplicate_steps,
        duplicates_b=b.duplicate_steps,
    )
    suspects = [s for s in common if _differs(va[s], vb[s], atol)]
    suspects += d.duplicates_a + d.duplicates_b
    if same_steps:
        suspects += d.missing_in_a + d.missing_in_b
    d.first_divergent_step = min(suspects, default=None)
    d.ok = d.first_divergent_step is None and (d.steps_compared > 0 or not same_steps)
    return d


def compare_other_tags(run_a: str, run_b: str, skip: str, atol: float) -> dict[str, CurveDiff]:
    """Every other scalar tag (train and eval) both runs hold, timing tags excepted, on common steps."""
    out = {}
    for split in ("train", "eval"):
        try:
            sa = read_all_scalars(tensorboard_dir(run_a, split))
            sb = read_all_scalars(tensorboard_dir(run_b, split))
        except UserError:
            continue
        for tag in sorted(set(sa) & set(sb)):
            if tag in TIMING_TAGS or (split == "train" and tag == skip):
                continue
            curves = Curve("", tag, sa[tag]), Curve("", tag, sb[tag])
            # eval points must be the same steps (a missing final eval is a difference); train
            # tags other than the compared one may be logged at other steps
            same = split == "eval"
            out[f"{split}/{tag}"] = compare_curves(*curves, atol=atol, same_steps=same)
    return out


def read_batch_ids(run: str) -> Curve | None:
    """`batch_ids_hash` of every logged step in `run`'s metrics.jsonl (the fingerprint of the
    examples each step trained on), or None if it records none (an older run)."""
    path = os.path.join(run, "metrics.jsonl")
    points = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a torn last line of a killed run
                if "batch_ids_hash" in row and "step" in row:
                    points.append((int(row["step"]), row["batch_ids_hash"]))
    except OSError:
        return None
    return Curve(path, "batch_ids_hash", points) if points else None


def metrics_rows(run: str) -> list[dict]:
    """Every row of `run`'s metrics.jsonl, in order, without the fields that measure
    wall-clock time (TIMING_TAGS): what two runs that trained the same must share, line for
    line and field for field. A line that does not parse is an error, not skipped."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rows = [{k: v for k, v in row.items() if k not in TIMING_TAGS} for row in rows]
    return [row for row in rows if set(row) != {"step"}]  # (a row of timings only: none)


def compare_batch_ids(run_a: str, run_b: str) -> CurveDiff | None:
    """The examples of every logged step must be the same, in the same order: a resume that
    trains on the right number of the wrong examples fails here even where the losses happen
    to be close. A step logged by one run only is a difference. None: neither records them."""
    a, b = read_batch_ids(run_a), read_batch_ids(run_b)
    if a is None and b is None:
        return None
    return compare_curves(
        a or Curve("", "batch_ids_hash", []), b or Curve("", "batch_ids_hash", []), atol=0.0
    )


def newest_checkpoint(run: str) -> str | None:
    """The newest checkpoint under `<run>/checkpoints` that verifies against its manifest, or None."""
    from trainer.checkpoint.manifest import list_checkpoints, verify

    for prefix in reversed(list_checkpoints(os.path.join(run, "checkpoints"))):
        if verify(prefix).ok:
            return prefix
    return None


def expected_variables(prefix: str) -> dict[str, str]:
    """{checkpoint key: Keras path} of every value a checkpoint of the run that wrote `prefix`
    must hold: its model and optimizer rebuilt, in this process, from the manifest's config.
    Raises UserError when that config cannot be rebuilt here."""
    from omegaconf import OmegaConf

    from trainer import build
    from trainer.checkpoint.manifest import read_manifest
    from trainer.data import memory as data_lib

    try:
        cfg = OmegaConf.create(read_manifest(prefix)["config"])
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{prefix}: its manifest holds no config ({e})") from None
    build.setup_runtime(cfg)
    return build.build_state(cfg, data_lib.load_data(cfg.data)).expected_keys()


def compare_checkpoints(prefix_a: str, prefix_b: str, atol: float = 0.0) -> StateDiff:
    """Every tensor of two checkpoints (weights, optimizer slots, counters, RNG and loop state),
    by Keras path, and each checked against the variables its run's config builds."""
    import numpy as np
    import tensorflow as tf

    from trainer.checkpoint.manifest import read_manifest, step_of
    from trainer.state import checkpoint_keys, readable

    ra, rb = tf.train.load_checkpoint(prefix_a), tf.train.load_checkpoint(prefix_b)
    ka, kb = checkpoint_keys(prefix_a), checkpoint_keys(prefix_b)
    differing, worst = [], 0.0
    for name in sorted(ka & kb):
        x, y = np.asarray(ra.get_tensor(name)), np.asarray(rb.get_tensor(name))
        if x.shape != y.shape or x.dtype != y.dtype:
            differing.append(name)
            continue
        if x.dtype.kind in "fc":
            with np.errstate(invalid="ignore"):  # inf - inf: equal infinities count as no gap
                equal = (x == y) | (np.isnan(x) & np.isnan(y))
                gaps = np.where(equal, 0.0, np.abs(x.astype(np.float64) - y.astype(np.float64)))
            gap = float(np.max(gaps, initial=0.0))  # NaN when only one side is NaN
            worst = max(worst, gap) if not math.isnan(gap) else worst
            same = gap <= atol  # False for NaN
        else:
            same = np.array_equal(x, y)
        if not same:
            differing.append(name)
    missing = sorted(readable(k) for k in ka ^ kb)
    not_saved, error = {}, None
    try:
        wanted: dict[str, dict[str, str]] = {}  # per config: rebuilt once
        for side, prefix, keys in (("a", prefix_a, ka), ("b", prefix_b, kb)):
            config = str(read_manifest(prefix).get("config"))
            if config not in wanted:
                wanted[config] = expected_variables(prefix)
            not_saved[side] = sorted(n for k, n in wanted[config].items() if k not in keys)
    except (UserError, OSError, ValueError, ImportError) as e:
        not_saved, error = None, f"cannot rebuild the model from the recorded config: {e}"
    complete = not_saved is not None and not not_saved["a"] and not not_saved["b"]
    return StateDiff(
        step_a=step_of(prefix_a),
        step_b=step_of(prefix_b),
        tensors_compared=len(ka & kb),
        differing=[readable(k) for k in differing],
        missing=missing,
        max_abs_diff=worst,
        equal=not differing and not missing and complete and step_of(prefix_a) == step_of(prefix_b),
        not_saved=not_saved,
        rebuild_error=error,
    )


def compare_runs(run_a: str, run_b: str, tag: str = "loss", atol: float = 0.0) -> dict:
    """The full comparison of two run directories as a JSON-ready report (key "ok": the verdict)."""
    a, b = read_curve(run_a, tag), read_curve(run_b, tag)
    curve = compare_curves(a, b, atol)
    others = compare_other_tags(run_a, run_b, tag, atol)
    ids = compare_batch_ids(run_a, run_b)
    if ids is not None:
        others["train/batch_ids_hash"] = ids
    pa, pb = newest_checkpoint(run_a), newest_checkpoint(run_b)
    state = compare_checkpoints(pa, pb, atol) if pa and pb else None
    # no verified checkpoint on one side: the final state cannot be compared, so no match
    ok = curve.ok and all(d.ok for d in others.values()) and state is not None and state.equal
    return {
        "ok": ok,
        "tag": tag,
        "atol": atol,
        "runs": {"a": run_a, "b": run_b},
        "logdirs": {"a": a.logdir, "b": b.logdir},
        "curve": asdict(curve),
        "other_tags": {k: asdict(v) for k, v in others.items()},
        "final_state": asdict(state) if state else None,
        "points": {"a": a.points, "b": b.points},
        "eval_points": _eval_points(run_a, run_b),
        "no_checkpoint": [side for side, p in (("a", pa), ("b", pb)) if p is None],
    }


def _eval_points(run_a: str, run_b: str) -> dict | None:
    """Both runs' eval loss curves, {"a": [(step, value)], "b": [...]}, or None."""
    try:
        sa = read_all_scalars(tensorboard_dir(run_a, "eval")).get("loss")
        sb = read_all_scalars(tensorboard_dir(run_b, "eval")).get("loss")
    except UserError:
        return None
    return {"a": sa, "b": sb} if sa and sb else None


def _keras_weights(path: str) -> dict:
    """{h5 path: array} of every array in a .keras file (weights and optimizer state)."""
    import io
    import zipfile

    import h5py
    import numpy as np

    out = {}
    with zipfile.ZipFile(path) as z, h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as f:
        f.visititems(
            lambda name, obj: (
                out.__setitem__(name, np.asarray(obj)) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out


def _saved_model_variables(path: str) -> dict:
    """{"<dtype><shape> #<n>": array} of a SavedModel's variables. `model.export` numbers them
    in an order that can differ between two processes (seen: the same values at other
    indices), so they are keyed by shape and sorted by value within a shape: equal sets of
    values compare equal, whatever their order."""
    import tensorflow as tf

    from trainer.state import BOOKKEEPING

    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    keys = [k for k in reader.get_variable_to_dtype_map() if k not in BOOKKEEPING]
    arrays = sorted(
        (reader.get_tensor(k) for k in keys), key=lambda x: (str(x.dtype), x.shape, x.tobytes())
    )
    out, count = {}, {}
    for x in arrays:
        shape = f"{x.dtype}{list(x.shape)}"
        count[shape] = count.get(shape, -1) + 1
        out[f"{shape} #{count[shape]}"] = x
    return out


def compare_exports(run_a: str, run_b: str, atol: float = 0.0) -> dict:
    """Both runs' exports, array by array: every weight and optimizer value in model.keras,
    every variable of the SavedModel. {"ok", "keras": {...}, "saved_model": {...}}."""
    import numpy as np

    out: dict = {"ok": True}
    readers = {
        "keras": ("model.keras", _keras_weights),
        "saved_model": ("saved_model", _saved_model_variables),
    }
    for kind, (name, read) in readers.items():
        pa, pb = (os.path.join(r, "export", name) for r in (run_a, run_b))
        missing = [side for side, p in (("a", pa), ("b", pb)) if not os.path.exists(p)]
        if missing:
            out[kind] = {"equal": False, "missing_in": missing}
            out["ok"] = False
            continue
        try:
            va, vb = read(pa), read(pb)
        except Exception as e:  # a torn or foreign artifact is a finding
            out[kind] = {"equal": False, "error": f"{type(e).__name__}: {e}"}
            out["ok"] = False
            continue
        differing = sorted(set(va) ^ set(vb))
        for key in sorted(set(va) & set(vb)):
            x, y = va[key], vb[key]
            if x.shape != y.shape or (
                not np.array_equal(x, y)
                and not (x.dtype.kind == "f" and np.allclose(x, y, rtol=0, atol=atol) and atol > 0)
            ):
                differing.append(key)
        out[kind] = {"equal": not differing, "arrays": len(va), "differing": differing[:20]}
        out["ok"] = out["ok"] and not differing
    return out
