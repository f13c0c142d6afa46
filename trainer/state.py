"""TrainState: everything that must survive a restart, gathered in one tf.train.Checkpoint.

Complete by construction: the model's and the optimizer's variables are saved under their
Keras paths (`variable.path`, e.g. `custom_bn_model/batch_normalization/moving_mean`), taken
from `model.variables` and `optimizer.variables`, not reached through TensorFlow's object
graph. On Keras 3 that graph does not reach layers a model keeps in Python containers (a
list of tuples, a dict holding a Sequential): their BatchNorm statistics were not saved at
all. A path that occurs twice (two layers given the same name) gets `#1`, `#2`... in the
order of `model.variables`. Paths are reproducible because `build.setup_runtime` clears
Keras' name counters before the model is built (README, "How resume works").

What the checkpoint holds:
- model/<path>: every weight, trainable or not (BatchNorm moving statistics, add_weight vars);
- rng/<path>: Keras SeedGenerator states (Dropout...): `model.variables` minus its weights;
  without them a Dropout model diverges right after a resume (checkpoint.restore_rng=false
  leaves them out on purpose: the negative control);
- optimizer/<path>: iterations (and so the learning-rate schedule position) and slots (EMA
  weights and gradient accumulators included: they are the optimizer's variables);
- metrics/<path>: the totals of the `metrics=[...]` the user added (trainer/losses.py);
- step, epoch: the counters; the data position is the step (trainer/data/memory.py);
- loop: Python-side loop state that changes what is logged or decided (the running
  window behind logged metric averages, best eval loss so far), mirrored into variables
  before each save and read back after a restore.

`missing_from_checkpoint()` (before the first save) and `restore_problems()` (before a
restore) check completeness in both directions, and `untracked_in_step()` checks it against
what the traced train step really reads and writes: a layer Keras does not track (kept in a
SimpleNamespace or a plain object) is in none of the lists above, but the step still uses it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import keras
import tensorflow as tf
from tensorflow.python.trackable import trackable_utils

from trainer.checkpoint.fingerprint import STATE_LAYOUT  # noqa: F401 (defined without TF there)

_VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"
_UNESCAPE = re.compile(r"\.(.)")  # trackable_utils.escape_local_name: '.' -> '..', '/' -> '.S'
BOOKKEEPING = (  # TensorFlow's own entries: save counts, not training state
    "_CHECKPOINTABLE_OBJECT_GRAPH",
    "save_counter" + _VALUE,
)


@dataclass
class LoopState:
    """Loop state kept in Python between steps, persisted through TrainState.loop."""

    window_loss_sum: float = 0.0  # sum of per-step losses since the last log line
    window_metric_sum: float = 0.0  # same for the task metric (mae or accuracy)
    window_count: int = 0
    best_eval_loss: float = math.inf
    last_eval_step: int = 0  # so the final eval runs once, even after a stop in the last chunk

    def reset_window(self) -> None:
        self.window_loss_sum, self.window_metric_sum, self.window_count = 0.0, 0.0, 0


def seed_generator_states(model: keras.Model) -> list:
    """The state variables of every Keras SeedGenerator in `model` (model.variables minus weights)."""
    weight_ids = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weight_ids]


def keyed(variables) -> dict[str, object]:
    """{Keras path: variable}, in order; a repeated path gets '#1', '#2'... by occurrence."""
    out: dict[str, object] = {}
    for var in variables:
        path = str(getattr(var, "path", None) or var.name)
        key, n = path, 0
        while key in out:
            n += 1
            key = f"{path}#{n}"
        out[key] = var
    return out


def checkpoint_key(group: str, path: str) -> str:
    """The key TensorFlow writes for variable `path` of dict `group` (its '/' escaped)."""
    return f"{group}/{trackable_utils.escape_local_name(path)}{_VALUE}"


def readable(key: str) -> str:
    """'model/dense/kernel' for the checkpoint key of that variable (others unchanged)."""
    if not key.endswith(_VALUE):
        return key
    return _UNESCAPE.sub(lambda m: "/" if m.group(1) == "S" else m.group(1), key[: -len(_VALUE)])


def checkpoint_keys(prefix: str) -> set[str]:
    """The value keys checkpoint `prefix` holds (TensorFlow's bookkeeping left out)."""
    return {name for name, _ in tf.train.list_variables(prefix)} - set(BOOKKEEPING)


class TrainState:
    """The checkpointed state of one run. Create it inside the strategy scope, after the
    model and optimizer are built (restoring into unbuilt Keras objects silently drops slots)."""

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        include_rng: bool = True,
        metrics: list | tuple = (),
    ):
        self.model, self.optimizer, self.include_rng = model, optimizer, include_rng
        self.metrics = list(metrics)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.groups: dict[str, dict] = {
            "model": keyed(model.weights),
            "rng": keyed(seed_generator_states(model)) if include_rng else {},
            "optimizer": keyed(optimizer.variables),
        }
        if self.metrics:  # a key only when there are metrics: earlier checkpoints stay valid
            self.groups["metrics"] = keyed(v for m in self.metrics for v in m.variables)
        self.rng = list(self.groups["rng"].values())
        self.loop = LoopState()
        self._loop_vars = {
            f.name: tf.Variable(
                f.default,
                dtype=tf.int64 if f.type in (int, "int") else tf.float64,
                trainable=False,
                name=f.name,
            )
            for f in fields(LoopState)
        }
        self.checkpoint = tf.train.Checkpoint(
            **self.groups, step=self.step, epoch=self.epoch, loop=self._loop_vars
        )

    def expected_keys(self) -> dict[str, str]:
        """{checkpoint key: readable name} of every value a checkpoint of this state holds."""
        out = {
            checkpoint_key(group, path): f"{group}/{path}"
            for group, variables in self.groups.items()
            for path in variables
        }
        out["step" + _VALUE], out["epoch" + _VALUE] = "step", "epoch"
        out.update({checkpoint_key("loop", name): f"loop/{name}" for name in self._loop_vars})
        return out

    def missing_from_checkpoint(self) -> list[str]:
        """Paths of variables of the model and the optimizer that a save would leave out now
        (a variable created after this state was built): what TensorFlow would write is
        walked, not assumed."""
        held = set()
        queue = [self.checkpoint]
        while queue:
            obj = queue.pop()
            if id(obj) in held:
                continue
            held.add(id(obj))
            queue.extend(obj._trackable_children(save_type="checkpoint").values())
        wanted = self.model.weights + self.optimizer.variables
        wanted += [v for m in self.metrics for v in m.variables]
        if self.include_rng:
            wanted += seed_generator_states(self.model)
        return [str(getattr(v, "path", v.name)) for v in wanted if id(v) not in held]

    def untracked_in_step(self, used) -> list:
        """The variables among `used` (those a traced train step reads or writes: its concrete
        function's `.variables`) that this state does not hold."""
        known = self.model.variables + self.optimizer.variables
        known += [v for m in self.metrics for v in m.variables]
        held = {id(h) for v in known for h in _handles(v)}
        return [v for v in used if id(v) not in held]

    def restore_problems(self, prefix: str) -> list[str]:
        """What stops an exact restore of `prefix`: variables of this run it has no value for,
        and values in it that no variable of this run takes (empty: restorable)."""
        have, want = checkpoint_keys(prefix), self.expected_keys()
        problems = [f"no value for {name}" for key, name in want.items() if key not in have]
        extra = sorted(have - want.keys())
        if not self.include_rng:  # checkpoint.restore_rng=false ignores saved RNG state
            extra = [k for k in extra if not k.startswith("rng/")]
        problems += [f"a value for {readable(k)}, which this run does not have" for k in extra]
        return problems

    def assignments(self, step: int, epoch: int) -> list[tuple[tf.Variable, object]]:
        """(variable, value) for the counters and Python loop state before a save of `step`:
        `CheckpointStore.save(assign=...)` writes them into the checkpointed variables."""
        loop = self.loop
        return [
            (self.step, step),
            (self.epoch, epoch),
            *((var, getattr(loop, name)) for name, var in self._loop_vars.items()),
        ]

    def after_restore(self) -> int:
        """Read the Python loop state back from the restored variables; return the step."""
        for name, var in self._loop_vars.items():
            value = var.numpy()
            setattr(self.loop, name, int(value) if var.dtype == tf.int64 else float(value))
        return int(self.step.numpy())


def _handles(var) -> list:
    """A Keras variable, the tf.Variable behind it, and its per-device components under a
    tf.distribute strategy: every object a traced function may capture for it."""
    out = [var]
    inner = getattr(var, "value", None)
    if inner is not None and not callable(inner):  # KerasVariable.value: the tf.Variable
        out.append(inner)
    for v in list(out):
        parts = getattr(v, "_values", None)  # a MirroredVariable's components
        if isinstance(parts, (list, tuple)):
            out += list(parts)
    return out


def find_layer(root, wanted, limit: int = 6) -> tuple[str, object] | None:
    """(attribute path from `root`, layer) of a Keras layer reachable from `root` through
    attributes, containers or plain objects whose variables include one of `wanted` (tf
    variables): the layer behind a variable that Keras' tracking missed."""
    wanted_ids = {id(v) for v in wanted}
    seen: set[int] = set()
    stack: list[tuple[str, object, int]] = [("", root, 0)]
    while stack:
        path, obj, depth = stack.pop()
        if id(obj) in seen or depth > limit:
            continue
        seen.add(id(obj))
        if obj is not root and isinstance(obj, keras.layers.Layer):
            if any(id(h) in wanted_ids for v in obj.variables for h in _handles(v)):
                return path, obj
        if isinstance(obj, dict):
            items = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple, set)):
            items = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, tf.Variable)):
            items = [
                (f"{path}.{k}" if path else k, v)
                for k, v in vars(obj).items()
                if not k.startswith("_") or k in ("_layers",)
            ]
        else:
            continue
        stack.extend((p, v, depth + 1) for p, v in reversed(items))
    return None
