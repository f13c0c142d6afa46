"""Hydra multirun sweeps that resume (README, "Sweeps").

`python -m trainer -m model=a,b optimizer.learning_rate=0.01,0.1 hydra.sweep.dir=DIR` runs one
job per combination, each in `DIR/<its overrides>` (`hydra.sweep.subdir` through the
`job_dirname` resolver), so the same job finds the same directory on every invocation,
whatever the order or the other values of the sweep. Rerunning the command then skips a
complete job (`runinfo.finished`, from its manifest, before TensorFlow loads), resumes an
interrupted one from its checkpoint and starts a new one. A job's failure never stops the
sweep: each job's outcome is a record (trainer/sweep/record_store.py), and the sweep reports them
all at the end (table, sweep.csv, sweep.json, the HPARAMS experiment) with its exit code.

Jobs run one after another in one process with Hydra's basic launcher: each starts from a
clean slate (build.setup_runtime clears the Keras session and sets every seed), so it trains
exactly as it would alone. A SIGTERM or Ctrl-C makes the running job save and stop; no
further job starts (signals.SweepSignals, and the sweep's stop file for the joblib
launcher's workers, trainer/sweep/joblib_workers.py) and the sweep exits 3.

Nothing here loads TensorFlow: it loads with the first job that trains.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import traceback

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from trainer import signals
from trainer.signals import SweepInterrupted
from trainer.sweep import hydra_callbacks, record_store, runinfo
from trainer.sweep import report as sweep_report
from trainer.sweep.record_store import Record

_MAX_NAME = 200  # bytes of a job directory's name (file systems allow 255)
_sweep_dir: str | None = None  # set in the process that started the sweep
_exit_code: int | None = None


def job_dirname(override_dirname: str) -> str:
    """A job's directory name from Hydra's `hydra.job.override_dirname` (its overrides as
    typed, sorted, joined by commas): one path component, distinct for distinct overrides
    ('%' and '/' percent-encoded; no overrides: 'defaults'; past 200 bytes: cut and ended
    with a hash of the whole)."""
    name = str(override_dirname).replace("%", "%25").replace("/", "%2F")
    if not name:
        return "defaults"
    raw = name.encode()
    if len(raw) > _MAX_NAME:
        digest = hashlib.sha256(raw).hexdigest()[:16]
        name = raw[: _MAX_NAME - 17].decode(errors="ignore") + "-" + digest
    return name


OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)


def _multirun(config: DictConfig) -> bool:
    return config.hydra.mode == RunMode.MULTIRUN


def _execute(cfg: DictConfig, run_dir: str, record: Record) -> None:
    """Skip, resume or train one job; fill `record` with what happened."""
    # (checkpoint.remote: through the run, which brings the store up to date if it is behind)
    done = None if cfg.checkpoint.get("remote") else runinfo.finished(cfg, run_dir)
    if done is not None:  # read from its manifest: nothing of it is touched
        hydra_callbacks.restore()  # Hydra rewrote its .hydra/ before the job started
        record.status, record.step = "already_complete", done.step
        record.train_loss, record.eval = done.final_loss, done.eval
        print(f"{run_dir}: already complete at step {done.step}; nothing to do", flush=True)
        return
    from trainer import app  # TensorFlow loads here, with the first job that trains

    try:
        outcome = app.execute(cfg, run_dir, sweep=True)
    except Exception as e:  # one job's crash is reported in the table, the others run
        traceback.print_exc()
        record.status, record.exit_code = "failed", 1
        first = str(e).splitlines()[0] if str(e) else ""
        record.error = f"{type(e).__name__}: {first}" if first else type(e).__name__
        return
    record.exit_code, result = outcome.code, outcome.result
    if result is None:
        record.status, record.error = "failed", outcome.error
        if outcome.code == 130:  # a SIGINT before the loop: the job did not finish
            record.status, record.signal = "interrupted", "SIGINT"
        return
    record.step, record.resumed_from = result.step, result.resumed_from
    record.train_loss, record.eval = result.final_loss, dict(result.eval)
    record.signal = result.signal_name
    record.status = result.status
    if result.status == "completed" and result.resumed_from is not None:
        record.status = "resumed"
    if outcome.code == 5:  # trained, but checkpoint.remote stayed behind: rerun to upload
        record.status, record.error = "failed", outcome.error


def run_job(cfg: DictConfig, run_dir: str) -> float | None:
    """One job of a sweep (the Hydra task in MULTIRUN mode). Returns its final eval loss
    (the Optuna sweeper's objective), None if it did not complete."""
    hc = HydraConfig.get()
    sweep_dir = os.path.abspath(str(hc.sweep.dir))
    record = Record(
        num=int(hc.job.num),
        overrides=list(hc.overrides.task),
        dir=os.path.relpath(run_dir, sweep_dir),
        max_steps=int(cfg.trainer.max_steps),
        hparams=runinfo.hparams_of(cfg),
    )
    t0 = time.perf_counter()
    stop = signals.pending() or record_store.stop_requested(sweep_dir)
    if stop is None:
        _execute(cfg, run_dir, record)
    else:  # the sweep was asked to stop before this job began: it does not start
        record.signal = stop
    record.seconds = time.perf_counter() - t0
    record_store.save_record(sweep_dir, record)
    if record.status in ("interrupted", "not_started"):
        signals.mark_pending(record.signal or "SIGTERM")
        if _sweep_dir is not None:  # in the sweep's own process: stop the sweeper now
            raise SweepInterrupted(record.signal)
    done = record.status in ("completed", "resumed", "already_complete")
    return record.eval.get("loss") if done else None


def _close_job_log(config: DictConfig) -> None:
    """Detach the finished job's log file (Hydra's job logging), so that what is logged
    between jobs (the basic launcher's '#N : overrides') does not go into it."""
    out = os.path.abspath(str(config.hydra.runtime.output_dir))
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            if os.path.dirname(os.path.abspath(handler.baseFilename)) == out:
                root.removeHandler(handler)
                handler.close()


class SweepCallback(Callback):
    """The sweep's bookkeeping around Hydra's jobs (conf/config.yaml, hydra.callbacks.sweep)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        global _sweep_dir, _exit_code
        _sweep_dir, _exit_code = os.path.abspath(str(config.hydra.sweep.dir)), None
        os.makedirs(_sweep_dir, exist_ok=True)
        previous = record_store.start(_sweep_dir)
        if "optuna" in str(config.hydra.sweeper.get("_target_", "")):
            from trainer.sweep import optuna_study as sweep_optuna

            sweep_optuna.resume_study(config, previous)
        if "joblib" in str(config.hydra.launcher.get("_target_", "")):
            from trainer.sweep import joblib_workers as sweep_joblib

            sweep_joblib.install()
        signals.SweepSignals.install(os.path.join(_sweep_dir, record_store.STOP_FILE))

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if _multirun(config):
            signals.SweepSignals.install()  # in a launcher's worker process too

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if _multirun(config):
            _close_job_log(config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        finish()


def started() -> bool:
    """Whether this process started a sweep."""
    return _sweep_dir is not None


def finish(stopped: bool = False) -> int | None:
    """Report the sweep (once) and return its exit code; None if no sweep ran here.
    `stopped`: it ended on SweepInterrupted (exit 3)."""
    global _exit_code
    if _sweep_dir is None:
        return None
    if _exit_code is None:
        # every job has returned: the report decides the exit code, which the process exits
        # with (a second Ctrl-C now would print "exit code 0" in the table, then exit 130)
        signals.ignore_stops()
        sys.stdout.flush()
        _exit_code = sweep_report.finish(_sweep_dir, stopped)
    return _exit_code
