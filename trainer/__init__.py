"""resumable-trainer: train subclassed Keras models with full-state checkpoints and exact resume.

The training core lives at the top of this package, in the order a run goes through it:
`__main__` (the Hydra entry; `startup` holds TensorFlow's start-up lines back) -> `app` (exit
codes; `runlog`: train.log) -> `config`, `preflight` (the schema and value checks) -> `data`
(`batch_ids`, `source` for data=custom, `examples`) -> `build` (model, TrainState) with
`targets` (the `_target_` plug points), `optim`, `losses` and `standardize` -> `state` (what a
checkpoint holds) -> `loop` (the fit loop: `fit` reads as a page) with `steps` (the traced
train and eval steps), `summaries`, `signals`, `nonfinite`. Sweeps (`-m`): `sweep` (each job skipped, resumed or
trained, and the signals), `sweep_report` (the table, sweep.csv/json, the HPARAMS
experiment), `sweep_optuna` (an Optuna study that continues), `sweep_joblib` (the joblib
launcher's workers stop cleanly), and `runinfo` (what can be read about a run without
TensorFlow).

Subsystems, one package each:
- `checkpoint/`: the store and its manifests, async writes, integrity, fingerprint, warm
  start, exports;
- `distribute/`: strategies, preemption, mixed precision, the local launcher;
- `verify/` and `bench/`: the tools around training (scripts/*.py call them).

Imports go one way: the core and its subsystems never import `verify/` or `bench/`
(tests/test_layout.py reads every import to check it).
"""
