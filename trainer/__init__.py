"""resumable-trainer: train subclassed Keras models with full-state checkpoints and exact resume.

The training core lives at the top of this package, in the order a run goes through it:
`__main__` (the Hydra entry; `startup` holds TensorFlow's start-up lines back) -> `app` (exit
codes; `runlog`: train.log) -> `config`, `preflight` (the schema and value checks) -> `build`
(model, TrainState) with `targets` (the `_target_` plug points), `optim` and `losses` ->
`state` (what a checkpoint holds) -> `restore` -> `loop` (the fit loop: `fit` reads as a
page), which drives `session` (the run's parts) through `events` (how each event happens),
with `steps` and `tfcall` (the traced steps), `summaries` (the logs as written), `rewind`
(the logs cut back on resume), `signals`, `nonfinite`.

Subsystems, one package each:
- `data/`: in-memory data, records, user sources, standardization, the batch-id fingerprint;
- `sweep/`: sweeps' jobs, records, report, Optuna and joblib glue, Hydra callbacks, and a run
  read without TensorFlow;
- `checkpoint/`: the store and its manifests, async writes, integrity, fingerprint, warm
  start, exports, the file primitives;
- `distribute/`: strategies, preemption, mixed precision, the local launcher;
- `verify/` and `bench/`: the tools around training (scripts/*.py call them).

Imports go one way: the core and its subsystems never import `verify/` or `bench/`
(tests/test_layout.py reads every import to check it).
"""
