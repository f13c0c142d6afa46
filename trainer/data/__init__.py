"""Data: every way rows reach the fit loop, and the fingerprint that proves which rows a step saw.

- `memory`: the in-memory sources (CSV, npz, digits, synthetic, `data=custom` arrays), the
  task (`data.task=auto`), the train/val split and the step-indexed batch order;
- `records`: sharded TFRecord files streamed in the same order (`record_files`: reading their
  description, choosing shards and checking them without TensorFlow; `make_records`: the
  converter behind scripts/make_records.py);
- `source`: a user's random-access source (`data=custom`) read ahead by threads;
- `standardize`: per-feature scaling stored in the model; `examples`: the README's example data;
- `batch_ids`: the split seed and each batch's row ids and their hash (metrics.jsonl).

Used by the training core (trainer/build.py, trainer/session.py) and the tools. May import:
trainer.config, trainer.targets, trainer.checkpoint.files, and each other (`batch_ids` and
`record_files` first: they import nothing else here). Never imports the loop, the session,
trainer.sweep, trainer.verify or trainer.bench.
"""
