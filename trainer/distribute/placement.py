"""Beyond one device: the tf.distribute strategy, who writes what, and preemption.

- `distribute=default`: TensorFlow's default strategy (one device).
- `distribute=mirrored`: MirroredStrategy over `distribute.devices` (all GPUs by default); on
  a CPU-only machine `distribute.logical_cpus=N` splits the CPU into N logical devices first
  (this must happen before TensorFlow initializes its devices, i.e. before any op runs).
- `distribute=multi_worker`: MultiWorkerMirroredStrategy from the TF_CONFIG environment
  variable (`scripts/launch_local_workers.py` sets it for local processes).

Writes follow TensorFlow's multi-worker convention: every worker takes part in checkpoint
saves and exports (they may involve collectives), but only the chief writes into the run
directory; the other workers write into a temporary directory that is deleted at exit.
All workers read (restore) from the chief's checkpoints in the run directory.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from trainer.checkpoint.manifest import list_checkpoints, read_manifest
from trainer.checkpoint.store import CheckpointStore
from trainer.config import UserError
from trainer.distribute import precision


def configure_logical_cpus(n: int) -> None:
    """Split the (first) physical CPU into `n` logical devices, before TF initializes them."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError:  # devices already initialized in this process
        have = len(tf.config.list_logical_devices("CPU"))
        if have != n:
            raise UserError(
                f"distribute.logical_cpus: received {n}, but TensorFlow already initialized "
                f"{have} CPU device(s) in this process; set it before anything else runs TF"
            ) from None


def make_strategy(cfg: DictConfig) -> tf.distribute.Strategy:
    """The tf.distribute strategy the `distribute` group names."""
    name = cfg.name
    n_cpus = cfg.get("logical_cpus")
    if n_cpus is not None and (name != "mirrored" or n_cpus < 1):
        raise UserError(
            f"distribute.logical_cpus: received {n_cpus!r} with distribute={name}; "
            "allowed: null, or an integer >= 1 with distribute=mirrored"
        )
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if n_cpus:
            configure_logical_cpus(int(n_cpus))
        devices = list(cfg.get("devices") or []) or None
        if devices:
            _check_devices(devices)
        if devices is None and n_cpus and not tf.config.list_physical_devices("GPU"):
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        try:
            return tf.distribute.MirroredStrategy(devices=devices)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"distribute.devices: received {devices!r}; {e}") from None
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise UserError(
                "distribute=multi_worker: the TF_CONFIG environment variable is not set "
                "(try: python scripts/launch_local_workers.py 2 -- <overrides>)"
            )
        try:
            spec = json.loads(os.environ["TF_CONFIG"])
            spec["cluster"], spec["task"]["type"], spec["task"]["index"]  # noqa: B018
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"TF_CONFIG: received {os.environ['TF_CONFIG']!r}; it must be JSON with "
                f'"cluster" and "task": {{"type", "index"}} ({type(e).__name__}: {e})'
            ) from None
        impl = {
            "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
            "ring": tf.distribute.experimental.CommunicationImplementation.RING,
            "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
        }[cfg.get("communication", "auto")]
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=impl
            )
        )
    raise UserError(
        f"distribute.name: received {name!r}; allowed: default | mirrored | multi_worker"
    )


def _check_devices(devices: list[str]) -> None:
    """Every listed device exists here (TensorFlow would silently place on another one)."""
    have = [tf.DeviceSpec.from_string(d.name) for d in tf.config.list_logical_devices()]
    known = {(d.device_type, d.device_index) for d in have}
    for name in devices:
        try:
            spec = tf.DeviceSpec.from_string(name)
        except ValueError:
            spec = None
        if spec is None or (spec.device_type, spec.device_index or 0) not in known:
            allowed = ", ".join(f"/{t.lower()}:{i}" for t, i in sorted(known))
            raise UserError(f"distribute.devices: received {name!r}; devices here: {allowed}")


def _worker_role(strategy: tf.distribute.Strategy) -> tuple[bool, str | None, int]:
    """(is_chief, task_type, task_id): the chief is task 'chief', else worker 0."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().jobs:
        return True, None, 0
    jobs = resolver.cluster_spec().as_dict()
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    if "chief" in jobs:
        return task_type == "chief", task_type, task_id
    return task_type == "worker" and task_id == 0, task_type, task_id


class _NonChiefStore(CheckpointStore):
    """Restores from the chief's checkpoints; saves (a collective) into its own temp dir."""

    defers_deletes = False  # retention deletes in the temp dir: no trash, no deleter thread

    def __init__(self, read_dir: str, write_dir: str, checkpoint, **kwargs):
        super().__init__(write_dir, checkpoint, **{**kwargs, "max_to_keep": 1})
        self.directory = read_dir  # latest_good()/has_checkpoints() look at the chief's

    def _write(self, step: int, before_write=None) -> None:
        """The save's collective part, into the temp dir: no manifest, retention or deleter."""
        if before_write is not None:
            before_write()
        self.manager.save(checkpoint_number=step)


@dataclass
class Placement:
    """Where this process runs in the job and where it may write.

    `write_dir` is the run directory on the chief and a temporary directory (deleted at
    exit) on other workers; everything a run writes goes under it.
    """

    strategy: tf.distribute.Strategy
    run_dir: str
    is_chief: bool = True
    task: str = "chief"
    write_dir: str = ""
    _preemption: object = field(default=None, repr=False)
    _pending_save: tuple | None = field(default=None, repr=False)
    _preempted: bool = False

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def multi_worker(self) -> bool:
        return isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)

    def checkpoint_store(self, ckpt_dir: str, checkpoint, **kwargs) -> CheckpointStore:
        """The chief's CheckpointStore over `ckpt_dir`; elsewhere a store writing to temp."""
        if self.is_chief:
            return CheckpointStore(ckpt_dir, checkpoint, **kwargs)
        tmp = os.path.join(self.write_dir, "checkpoints")
        return _NonChiefStore(ckpt_dir, tmp, checkpoint, **kwargs)

    def distribute_dataset(self, make, global_batch: int):
        """Split each global batch over the replicas: replica r gets rows [r*b, (r+1)*b).

        `make(i, n)`: input pipeline i of n's rows [i*B/n, (i+1)*B/n) of each global batch
        (one pipeline per worker; the data's stream is a pure function of seed and step), so
        the batch of step s is the same for any topology.
        """
        if not self.multi_worker:
            return self.strategy.experimental_distribute_dataset(make(0, 1))
        per_replica = global_batch // self.replicas

        def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            local = self.replicas // ctx.num_input_pipelines

            def slices(*parts):  # this worker's replicas' rows, one element per replica
                b = per_replica
                return tf.data.Dataset.from_tensor_slices(
                    tuple(tf.stack([t[r * b : (r + 1) * b] for r in range(local)]) for t in parts)
                )

            ds = make(ctx.input_pipeline_id, ctx.num_input_pipelines).flat_map(slices)
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = (
                tf.data.experimental.AutoShardPolicy.OFF
            )
            return ds.with_options(options)

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    # ------------------------------------------------------------ preemption (multi-worker)
    def watch_preemption(self) -> None:
        """Multi-worker: start tf.distribute's PreemptionCheckpointHandler (its SIGTERM handler).

        Call inside the loop's StopRequest block so that its handler wins. A SIGTERM on any
        worker makes every worker save the same step, then the loop ends (exit code 3).
        """
        if not self.multi_worker or self._preemption is not None:
            return
        config = tf.distribute.experimental.TerminationConfig(
            exit_fn=self._on_preempted_exit, save_fn=self._on_preempted_save
        )
        # Its own bookkeeping checkpoint lives in a scratch dir: our saves go through save_fn,
        # so they keep the manifests and chief-only rules of the run's own checkpoints.
        scratch = tempfile.mkdtemp(prefix="trainer-preemption-")
        atexit.register(shutil.rmtree, scratch, True)
        self._preemption = tf.distribute.experimental.PreemptionCheckpointHandler(
            self.strategy.cluster_resolver,
            tf.train.Checkpoint(),
            checkpoint_dir=os.path.join(scratch, "ckpt"),
            termination_config=config,
        )

    def preempted(self, save, step: int) -> bool:
        """After each chunk: if any worker was told to stop, all save `step` together -> True."""
        if self._preemption is None:
            return False
        self._pending_save = (save, step)
        self._preemption.save_checkpoint_if_preempted()
        return self._preempted

    def _on_preempted_save(self, *args, **kwargs) -> None:
        save, step = self._pending_save
        print(f"Preemption: every worker saves step {step}", file=sys.stderr)
        save(step)

    def _on_preempted_exit(self) -> None:
        self._preempted = True

    def in_run_dir(self, paths: dict[str, str]) -> dict[str, str]:
        """Paths written under `write_dir`, named where the run keeps them: a worker's copies
        are deleted at its end, the run's are the chief's (what a summary names)."""
        return {
            k: os.path.join(self.run_dir, os.path.relpath(p, self.write_dir))
            for k, p in paths.items()
        }

    def cleanup(self) -> None:
        """Delete this worker's temporary directory (non-chief only)."""
        if not self.is_chief and self.write_dir and os.path.isdir(self.write_dir):
            shutil.rmtree(self.write_dir, ignore_errors=True)


def _latest_manifest_config(run_dir: str) -> dict | None:
    """The config recorded in the newest readable checkpoint manifest of `run_dir`, if any."""
    for prefix in reversed(list_checkpoints(os.path.join(run_dir, "checkpoints"))):
        try:
            return read_manifest(prefix).get("config") or {}
        except (OSError, ValueError):
            continue
    return None


def check_resume(cfg: DictConfig, run_dir: str) -> None:
    """Before resuming: refuse a loss-scaling change, say so when the topology or the executor
    changed (_keep_executor)."""
    then = _latest_manifest_config(run_dir)
    if then is None or cfg.trainer.resume == "never":
        return
    was = (then.get("trainer") or {}).get("precision", "float32")
    now = cfg.trainer.get("precision", "float32")
    if (was == "mixed_float16") != (now == "mixed_float16"):
        raise UserError(
            f"trainer.precision: received {now!r}, but {run_dir}/checkpoints was written with "
            f"{was!r}; mixed_float16 adds loss-scale state to the optimizer, so it cannot be "
            "switched on or off across a resume (float32 <-> mixed_bfloat16 can)"
        )
    _keep_executor(cfg, (then.get("trainer") or {}).get("executor", "default"))
    old = {k: v for k, v in (then.get("distribute") or {}).items() if v is not None}
    new = {k: v for k, v in OmegaConf.to_container(cfg.distribute).items() if v is not None}
    if old != new:
        print(
            f"note: resuming a checkpoint written with distribute {old} under {new}: the state "
            "carries over, but the loss curve is bit-exact only on the same topology",
            file=sys.stderr,
        )


def _keep_executor(cfg: DictConfig, then: str) -> None:
    """A resumed run keeps the trainer.executor its checkpoints were written with ("default"
    before the key existed) unless another one is named (`auto`, the default, names none):
    the executors differ in last bits. A named other one is let through with a note."""
    now = cfg.trainer.get("executor", "auto")
    if now == "auto":
        cfg.trainer.executor = then
    elif now != then:
        print(
            f"note: resuming a checkpoint written with trainer.executor={then} under {now}: "
            "the state carries over, but the loss curve is bit-exact only on the same executor",
            file=sys.stderr,
        )


def check_global_batch(batch: int, replicas: int, name: str) -> None:
    """data.batch_size is the global batch: it must split evenly over the replicas."""
    if batch % replicas:
        raise UserError(
            f"data.batch_size: received {batch}; with distribute={name} it must be divisible "
            f"by the {replicas} replicas in sync (each replica gets batch_size/{replicas})"
        )


def setup(cfg: DictConfig, run_dir: str) -> Placement:
    """Precision policy, strategy (logging its replicas), batch check and this worker's role."""
    check_resume(cfg, run_dir)
    precision.set_policy(cfg.trainer.get("precision", "float32"))
    strategy = make_strategy(cfg.distribute)
    is_chief, task_type, task_id = _worker_role(strategy)
    task = "chief" if task_type is None else f"{task_type}:{task_id}"
    n = strategy.num_replicas_in_sync
    batch = int(cfg.data.batch_size)
    check_global_batch(batch, n, cfg.distribute.name)
    try:
        devices = tuple(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has no device list
        devices = ()
    print(
        f"distribute: {type(strategy).__name__}, {n} replica(s) in sync "
        f"(global batch {batch}, {batch // n} per replica; task {task}; "
        f"devices {', '.join(devices) or 'default'})",
        file=sys.stderr,
    )
    place = Placement(strategy, run_dir, is_chief=is_chief, task=task, write_dir=run_dir)
    if not is_chief:
        place.write_dir = tempfile.mkdtemp(prefix=f"trainer-{task_type}{task_id}-")
        atexit.register(place.cleanup)
    return place
