"""The Optuna sweeper (`hydra/sweeper=optuna`, package hydra-optuna-sweeper) made to resume.

The plugin keeps its study where `hydra.sweeper.storage` says (in memory by default) and, on
a rerun, loads it again but asks `n_trials` new trials whatever it already holds; a trial
whose job was stopped stays RUNNING for ever. Before the sweeper starts, `resume_study` makes
the rerun of a command continue its study instead:
- the study lives in the sweep directory, `sqlite:///<sweep dir>/optuna.db`, study `sweep`,
  unless `hydra.sweeper.storage` / `study_name` say otherwise;
- a trial left RUNNING (the sweep was killed, or stopped by a signal: it ends before the
  plugin tells the study, trainer/sweep/joblib_workers.py for the joblib launcher) or a failed one
  that the previous invocation's records show as interrupted or not started (a job stopped
  by a signal to its worker alone) is closed as failed, listed in the study's
  `sweep_interrupted` attribute, and its parameters are enqueued: the next trial asked is
  the same job, with the same overrides, so it resumes from its checkpoint;
- `hydra.sweeper.n_trials` becomes the number of trials still to run: the total asked for
  minus those finished (complete, pruned, or failed for a reason of their own);
- a seeded sampler (`hydra.sweeper.sampler.seed`) is seeded with seed + the number of trials
  the study holds: seeded as before, it would draw the first invocation's parameters again.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, open_dict, read_write

from trainer.sweep.record_store import Record

STUDY_FILE = "optuna.db"
_STOPPED = ("interrupted", "not_started")


def _overrides(trial) -> set[str]:
    """The overrides the sweeper gave the trial's job (it formats them as `name=value`)."""
    return {f"{name}={value}" for name, value in trial.params.items()}


def resume_study(config: DictConfig, previous: list[Record]) -> None:
    """Point the sweeper at the sweep directory's study and continue it (module docstring).
    `previous`: the records of the previous invocation of this sweep."""
    sweeper = config.hydra.sweeper
    sweep_dir = os.path.abspath(str(config.hydra.sweep.dir))
    with read_write(sweeper), open_dict(sweeper):
        if sweeper.get("storage") is None:
            sweeper.storage = f"sqlite:///{os.path.join(sweep_dir, STUDY_FILE)}"
        if sweeper.get("study_name") is None:
            sweeper.study_name = "sweep"
    import optuna

    try:
        study = optuna.load_study(study_name=str(sweeper.study_name), storage=str(sweeper.storage))
    except KeyError:  # no such study yet: the sweeper creates it
        return
    state = optuna.trial.TrialState
    stopped = [set(r.overrides) for r in previous if r.status in _STOPPED]
    interrupted = set(study.user_attrs.get("sweep_interrupted", []))
    trials = study.get_trials(deepcopy=False)
    waiting = [t.params for t in trials if t.state == state.WAITING]
    finished = 0
    for t in trials:
        if t.number in interrupted or t.state == state.WAITING:
            continue
        mine = _overrides(t)
        lost = t.state == state.FAIL and any(mine <= s for s in stopped)
        if t.state == state.RUNNING or lost:
            if t.state == state.RUNNING:
                study.tell(t.number, state=state.FAIL)
            interrupted.add(t.number)
            if t.params not in waiting:
                study.enqueue_trial(t.params)
                waiting.append(t.params)
        elif t.state.is_finished():
            finished += 1
    study.set_user_attr("sweep_interrupted", sorted(interrupted))
    with read_write(sweeper), open_dict(sweeper):
        sweeper.n_trials = max(0, int(sweeper.n_trials) - finished)
        if sweeper.get("sampler") is not None and sweeper.sampler.get("seed") is not None:
            sweeper.sampler.seed = int(sweeper.sampler.seed) + len(trials)
    print(
        f"Optuna study {study.study_name!r} ({sweeper.storage}): {finished} trial(s) done, "
        f"{len(waiting)} to resume or run first, {sweeper.n_trials} still to run.",
        flush=True,
    )
