"""Restore-or-initialize, and the checks that make a resume exact or refuse it.

Resume order, in this one place (`restore_or_initialize`; README, "How resume works"):
  1. the run directory already has a checkpoint: resume from the newest one that verifies
     (already chosen by checkpoint.integrity.recover, which calls `check_compatible`);
  2. `trainer.init_from` names a .keras artifact or a checkpoint: warm start from it;
  3. otherwise start from scratch.
"""

from __future__ import annotations

import os
import sys

from omegaconf import DictConfig

from trainer import rewind
from trainer.checkpoint.manifest import read_manifest
from trainer.checkpoint.store import CheckpointStore
from trainer.checkpoint.warm_start import warm_start
from trainer.config import UserError, first_few
from trainer.optim import step_counter
from trainer.state import STATE_LAYOUT, TrainState, find_layer
from trainer.sweep import hydra_callbacks


def restore_or_initialize(
    cfg, store: CheckpointStore, state: TrainState, run_dir: str, latest, complete: bool = False
):
    """Returns (step, resumed_from). The order is the module docstring's; `latest` is
    the newest good checkpoint, already verified and checked by integrity.recover.
    `complete`: the run had finished; restore only (its logs stay as they are)."""
    if latest is not None:
        problems = state.restore_problems(latest.prefix)
        if problems:  # refused before anything of this run is touched
            raise UserError(_restore_mismatch(cfg, latest.prefix, problems))
        try:
            store.restore(latest.prefix)
        except AssertionError as e:  # objects of this run that the checkpoint has no values for
            raise UserError(_restore_mismatch(cfg, latest.prefix, [str(e)])) from None
        step = state.after_restore()
        iterations = int(step_counter(state.optimizer).numpy())
        if iterations != step:
            raise RuntimeError(f"restored step {step} but the optimizer's step count {iterations}")
        if complete:
            return step, None
        dropped = rewind.truncate_metrics(run_dir, step)
        dropped += rewind.truncate_events(os.path.join(run_dir, "tensorboard"), step)
        note = f" (dropped {dropped} log records past it)" if dropped else ""
        print(f"Resuming from step {step}: {latest.prefix}{note}", file=sys.stderr)
        return step, step
    dropped = rewind.truncate_metrics(run_dir, 0)
    # from scratch: even step 0 goes (the hparams a run killed before its first save wrote)
    dropped += rewind.truncate_events(os.path.join(run_dir, "tensorboard"), -1)
    if dropped:  # a run killed before its first checkpoint left logs: said, like a resume
        print(
            f"Starting from step 0: no checkpoint to resume from (dropped {dropped} log "
            "records of an earlier attempt)",
            file=sys.stderr,
        )
    if cfg.trainer.init_from:
        warm_start(cfg.trainer.init_from, state)  # prints what it copied
    return 0, None


def _restore_mismatch(cfg: DictConfig, prefix: str, problems: list[str]) -> str:
    """One line for a checkpoint that does not match this run's variables one to one
    (nothing is written yet)."""
    then = read_manifest(prefix).get("config", {}).get("checkpoint", {})
    if cfg.checkpoint.restore_rng and then.get("restore_rng", True) is False:
        why = (
            "checkpoint.restore_rng: received true, but it was written with "
            "checkpoint.restore_rng=false and holds no RNG state. Allowed: "
            "checkpoint.restore_rng=false, or another hydra.run.dir"
        )
    else:
        shown = first_few([p.splitlines()[0][:200] for p in problems], 5, "; ")
        why = f"It holds {shown}. Use another hydra.run.dir"
    return f"resume refused: {prefix} does not match this run's variables one to one. {why}."


def check_complete(state: TrainState, step: int) -> None:
    """Before the first save: refuse (exit 2) a checkpoint that would leave a variable out."""
    missing = state.missing_from_checkpoint()
    if missing:
        names = first_few(missing, 5)
        raise UserError(
            f"checkpoint: the checkpoint of step {step} would leave out {len(missing)} "
            f"variable(s) created after the model was built: {names}. Create every variable "
            "when the model is built (in __init__ or build()), not during training."
        )


def check_compatible(cfg: DictConfig, prefix: str) -> None:
    """Refuse to resume with a config that changes the architecture or the data, or from a
    checkpoint of the earlier layout (README, "How resume works")."""
    from trainer.checkpoint.fingerprint import structural_diff

    if read_manifest(prefix).get("state_layout") != STATE_LAYOUT:
        raise UserError(
            f"resume refused: {prefix} was written by an earlier version of resumable-trainer, "
            "whose checkpoints can miss variables of layers kept in lists or dicts (BatchNorm "
            "statistics); it cannot be resumed exactly. Use another hydra.run.dir (warm start "
            "with trainer.init_from=<its run>/export/model.keras)."
        )

    diff = structural_diff(cfg, prefix)
    if diff:
        lines = "; ".join(
            f"{k}: checkpoint {a!r} -> now {b!r}" for k, (a, b) in sorted(diff.items())
        )
        run_dir = os.path.dirname(os.path.dirname(prefix))
        command = hydra_callbacks.recorded_command(run_dir)
        resume = f" To resume it as it was: {command}" if command else ""
        raise UserError(
            f"resume refused: {os.path.dirname(prefix)} was written with a different model/data config "
            f"({lines}). Use another hydra.run.dir, or restore those values.{resume}"
        )


def check_step_reads(state: TrainState, used) -> None:
    """Before the first step: refuse (exit 2) a model whose traced train step uses variables
    no checkpoint would hold, naming the layer Keras did not track."""
    missing = state.untracked_in_step(used)
    if not missing:
        return
    found = find_layer(state.model, missing)
    names = first_few(sorted({v.name.split(":")[0] for v in missing}), 4)
    if found is not None:
        path, layer = found
        what = f"layer {type(layer).__name__} {layer.name!r} at {type(state.model).__name__}.{path}"
        names = first_few([v.path for v in layer.variables], 4)
    else:  # a bare tf.Variable (in the model, the optimizer, a metric...)
        raise UserError(
            f"the train step uses {len(missing)} variable(s) that no checkpoint would hold "
            f"({names}), so a resume would lose them. Create variables with add_weight or "
            "add_variable in a layer of the model, the optimizer's build() or a metric, not "
            "as plain tf.Variables"
        )
    raise UserError(
        f"model: the train step uses {what}, which Keras does not track, so no checkpoint or "
        f"export would hold its variables ({names}) and a resume would lose them. Keep layers "
        "in attributes of the model, or in lists or dicts assigned to them (not in a "
        "SimpleNamespace, a dataclass or another plain object)."
    )
