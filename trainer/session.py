"""One run's working parts: `Session.open` builds everything a run needs, in the order of a
run's data flow (README, "What lives where"): strategy, data, checkpoints verified, model and
optimizer, restore or initialize, logs, the train and eval steps. How each event of the loop
happens on them is trainer/events.py; when it happens, trainer/loop.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field

import tensorflow as tf
from omegaconf import DictConfig
from tqdm import tqdm

from trainer import build, summaries
from trainer.checkpoint import export, integrity
from trainer.checkpoint.fingerprint import manifest_extra
from trainer.checkpoint.manifest import list_checkpoints
from trainer.config import UserError
from trainer.data import memory as data_lib
from trainer.distribute import placement as distribute
from trainer.events import LoopEvents
from trainer.restore import (
    check_compatible,
    check_step_reads,
    restore_or_initialize,
)
from trainer.state import STATE_LAYOUT
from trainer.steps import make_chunk_fn, make_eval_fn
from trainer.sweep import runinfo


@dataclass
class RunResult:
    # "completed" | "stopped" (trainer.stop_at) | "interrupted" (signal) | "already_complete"
    # (a rerun of a run that had reached trainer.max_steps: nothing written but missing exports)
    status: str
    step: int
    resumed_from: int | None
    run_dir: str
    final_loss: float | None = None
    eval: dict = field(default_factory=dict)
    eval_step: int | None = None  # the step `eval` was measured at
    exports: dict = field(default_factory=dict)
    signal_name: str | None = None
    remote_problem: str | None = None  # checkpoint.remote could not be brought up to date


def already_complete(step: int, run_dir: str, exports: dict | None = None) -> RunResult:
    """The result of rerunning a run that had reached trainer.max_steps."""
    last = runinfo.last_records(run_dir)
    return RunResult(
        "already_complete",
        step,
        None,
        run_dir,
        final_loss=last.get("loss"),
        eval=last.get("eval", {}),
        eval_step=last.get("eval_step"),
        exports=exports or {},
    )


def _connect_remote(cfg: DictConfig, run_dir: str, place, sweep: bool):
    """checkpoint.remote's store, probed, the run brought back from it (None: no remote, or
    not the chief). Under multi-worker the chief brings the run back and the others wait for
    it before they read the run directory, so every worker restores the same checkpoint."""
    url = cfg.checkpoint.get("remote")
    if not url:
        return None
    remote, problem = None, None
    if place.is_chief:
        from trainer.remote.download import connect

        try:
            remote = connect(str(url), run_dir, sweep, str(cfg.trainer.resume))
        except UserError as e:
            problem = e
    if place.multi_worker:
        problem = _agree_on_remote(problem, place.is_chief, run_dir)
    if problem is not None:
        raise problem
    return remote


def _agree_on_remote(problem: UserError | None, chief: bool, run_dir: str) -> UserError | None:
    """The chief posts the outcome of its bring-back (an empty value: done) on the
    coordination service tf.distribute runs for MultiWorkerMirroredStrategy; the others wait
    for it (polling, so that a signal still gets through). Then all meet at a barrier before
    the chief goes on or stops, so that no worker asks a service that has gone. A worker whose
    chief refused stops with the chief's line; one whose chief died, with its own."""
    from tensorflow.python.eager import context  # the service's key-value store and barriers

    ctx = context.context()
    key = f"resumable-trainer/remote-ready/{os.path.abspath(run_dir)}"  # one per run
    if chief:
        ctx.set_config_key_value(key, str(problem or ""))
    else:
        said = None
        while said is None:
            try:
                said = ctx.get_config_key_value(key, timeout_in_ms=1000)
            except tf.errors.DeadlineExceededError:
                continue  # not posted yet: the chief is still bringing the run back
            except tf.errors.OpError as e:
                raise UserError(
                    "checkpoint.remote: the chief stopped before it brought the run back "
                    f"({type(e).__name__}); see its output"
                ) from None
        problem = UserError(f"{said} (on the chief)") if said else None
    try:
        ctx.wait_at_barrier(f"{key}/read", 120_000)
    except tf.errors.OpError:  # a worker gone: the launcher ends the others
        pass
    if chief:
        with contextlib.suppress(tf.errors.OpError):
            ctx.delete_config_key_value(key)
    return problem


def _sync_remote(remote, cfg: DictConfig, latest, result: RunResult) -> RunResult:
    """A rerun of a completed run: the store gets what it misses (the final checkpoint,
    the logs, the exports and the config), and the end waits for it like any run's."""
    if remote is None:
        return result
    from trainer.remote.uploader import Uploader, committed_steps

    uploader = Uploader(remote, result.run_dir, int(cfg.checkpoint.max_to_keep))
    try:
        held = committed_steps(remote)
    except Exception:  # a store failing now: the upload below retries, the wait decides
        held = []
    if latest.step not in held:
        uploader.committed(latest.prefix, latest.step)
    # not .hydra/ or train.log: a rerun that changed nothing puts the local ones back as
    # they were (app.py), and the store keeps those of the run that trained
    finish_remote(uploader, cfg, result, extras=("export",))
    return result


def finish_remote(uploader, cfg: DictConfig, result: RunResult, extras=None) -> None:
    """The end of a run with checkpoint.remote: wait for the upload; say how long it took,
    or record why the store is behind (app.py exits 5 then)."""
    timeout = float(cfg.checkpoint.get("remote_wait", 300))
    problem, waited = uploader.finish(timeout, *([extras] if extras is not None else []))
    result.remote_problem = problem
    if problem is None:
        held = f"ckpt-{uploader.remote_step}" if uploader.remote_step >= 0 else "the run"
        exports = os.path.isdir(os.path.join(result.run_dir, "export"))
        print(
            f"remote: {uploader.store.url} holds {held}, the logs, "
            f"{'exports ' if exports else ''}and config "
            f"(the end of the run waited {waited:.1f} s for the upload)",
            file=sys.stderr,
        )


class Session(LoopEvents):
    """Everything one run holds between steps (set up by `open`); the loop's events on it are
    LoopEvents' (trainer/events.py)."""

    uploader = None  # checkpoint.remote's Uploader (trainer/remote/uploader.py)

    @classmethod
    def open(cls, cfg: DictConfig, run_dir: str, experiment: bool = True) -> Session | RunResult:
        """Set a run up (resuming if `run_dir` holds checkpoints). A RunResult instead when
        the run had already completed: then nothing is written but a missing export.
        `experiment`: a fresh run declares its own HPARAMS experiment (False in a sweep,
        which declares one for all its jobs: Writers.hparams).

        Under multi-worker training only the chief writes into `run_dir`; the other workers
        write into `place.write_dir`, a temporary directory (trainer/distribute/placement.py).
        """
        tc = cfg.trainer
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        if tc.resume == "never" and list_checkpoints(ckpt_dir):
            raise UserError(
                f"trainer.resume: received 'never' but {ckpt_dir} already holds checkpoints; "
                "use another hydra.run.dir or trainer.resume=auto"
            )
        build.setup_runtime(cfg)
        place = distribute.setup(cfg, run_dir)  # strategy, replicas, chief or not
        data = data_lib.load_data(cfg.data)
        print(f"task: {data.task} ({data.task_reason})", file=sys.stderr)
        # checkpoint.remote: probed, and the run brought back from it if it holds a newer
        # checkpoint (a fresh machine), by the chief; the other workers wait for it here
        # (README, "Object storage")
        remote = _connect_remote(cfg, run_dir, place, sweep=not experiment)
        # Verify the checkpoints, refuse an incompatible config, move bad ones aside: all
        # before the CheckpointManager reads its state file.
        latest = integrity.recover(
            ckpt_dir,
            tidy=place.is_chief,
            check=lambda prefix: (
                check_compatible(cfg, prefix),
                integrity.check_data_fits(prefix, data, cfg.data.get("path")),
            ),
        )
        # A rerun of a completed run changes nothing; it only writes an export that is
        # missing (a run killed during export), from the restored final checkpoint.
        complete = latest is not None and latest.step >= int(tc.max_steps)
        # (the chief's run_dir on every worker: all take the same branch)
        missing_exports = export.missing(run_dir, latest.step) if complete else None
        if complete and not missing_exports:
            return _sync_remote(remote, cfg, latest, already_complete(latest.step, run_dir))
        with place.strategy.scope():
            state = build.build_state(cfg, data)
        store = place.checkpoint_store(
            ckpt_dir,
            state.checkpoint,
            max_to_keep=int(cfg.checkpoint.max_to_keep),
            keep_every_n_hours=cfg.checkpoint.keep_every_n_hours,
            manifest_extra={
                **manifest_extra(cfg),
                "data_shape": data.signature(),
                "state_layout": STATE_LAYOUT,
            },
            async_write=bool(cfg.checkpoint["async"]),
            durable=bool(cfg.checkpoint.get("durable", True)),
            # (as async saves: plain variables on one device)
            snapshot_sync=cfg.distribute.name == "default",
        )
        step, resumed_from = restore_or_initialize(
            cfg, store, state, place.write_dir, latest, complete
        )
        if complete:
            exports = export.export_all(
                state.model, place.write_dir, data.feature_shape, only=missing_exports, step=step
            )
            place.cleanup()
            exports = place.in_run_dir(exports)
            return _sync_remote(remote, cfg, latest, already_complete(step, run_dir, exports))
        run = cls(cfg, run_dir, place, data, state, store, step, resumed_from, experiment)
        if remote is not None:
            from trainer.remote.uploader import Uploader

            every = cfg.checkpoint.get("remote_every_seconds", 60.0)
            resumed = (latest.prefix, latest.step) if latest is not None else None
            keep = int(cfg.checkpoint.max_to_keep)
            run.uploader = Uploader(remote, run_dir, keep, every, resumed=resumed)
            store.on_commit = run.uploader.committed
        return run

    def __init__(
        self, cfg, run_dir, place, data, state, store, step: int, resumed_from, experiment=True
    ):
        self.cfg, self.place, self.data, self.state, self.store = cfg, place, data, state, store
        self.step, self.loop = step, state.loop
        self.write_dir = place.write_dir
        self.batch = int(cfg.data.batch_size)
        self.steps_per_epoch = data.steps_per_epoch(self.batch)
        self.log_every = int(cfg.trainer.log_every)  # plain ints: an OmegaConf read is ~25 us
        objective, model, optimizer = state.objective, state.model, state.optimizer
        self.metric_name = objective.metric_name
        self.extra_names = [m.name for m in objective.train_metrics]
        self._chunk_for = make_chunk_fn(
            place.strategy,
            model,
            optimizer,
            objective.loss_fn,
            objective.metric_fn,
            self.batch,
            metrics=objective.train_metrics,
            log_every=self.log_every,
            jit_compile=bool(cfg.trainer.get("jit_compile", False)),
            executor=str(cfg.trainer.get("executor", "auto")),
        )
        try:  # traced here, before the first step: the parts meet for the first time
            self._chunk = self._new_chunk()
        except (TypeError, ValueError) as e:
            raise UserError(
                "the train step cannot be built from this model, optimizer, loss and metrics "
                f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}). Check the "
                "arguments given to each; trainer.debug=true shows where it failed"
            ) from e
        check_step_reads(state, self._chunk.variables)  # before anything of the run is written
        self._evaluate = make_eval_fn(
            model, objective.loss_fn, objective.metric_fn, objective.eval_metrics
        )
        self._eval_ds = data.eval_dataset(self.batch)
        self.writers = summaries.Writers(self.write_dir)
        self.metrics = summaries.MetricsLog(self.write_dir)
        if resumed_from is None:  # once per run: a resume or a rerun adds no second session
            metrics = [("train", "loss"), ("eval", "loss"), ("eval", self.metric_name)]
            self.writers.hparams(runinfo.hparams_of(cfg), metrics if experiment else None)
        self._k_tensors: dict[int, tf.Tensor] = {}  # chunk lengths as tensors: one eager op less
        self.checked = model.variables + optimizer.variables  # never checkpointed with NaN/Inf
        self.result = RunResult("completed", step, resumed_from, run_dir)
        self.last_saved = step if resumed_from is not None else None
        self.rollbacks = 0
        self._complete_checked = False
        self.bar = tqdm(
            total=int(cfg.trainer.max_steps),
            initial=step,
            desc="train",
            unit="step",
            disable=None,
            mininterval=0.5,
            dynamic_ncols=True,
        )
        self._window_t0, self._window_steps = time.perf_counter(), 0

    def _new_chunk(self):
        """The train chunk over the data stream from this step (a new one after a rollback)."""
        seed, step = int(self.cfg.trainer.seed), self.step

        def make(i: int, parts: int):  # input pipeline i of `parts` (one per worker)
            self.data.check_parts(parts)
            return self.data.train_dataset(self.batch, seed, step, part=(i, parts))

        return self._chunk_for(iter(self.place.distribute_dataset(make, self.batch)))

    # ------------------------------------------------------------ the loop's events
