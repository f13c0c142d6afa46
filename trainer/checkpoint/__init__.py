"""Checkpoints on disk: what makes a run's state survive a restart and leave as artifacts.

The store (tf.train.CheckpointManager + a manifest per checkpoint), background writes and
their snapshots, integrity checks and recovery on resume, the structural fingerprint that
refuses an incompatible resume, warm start, and the `.keras` / SavedModel exports.

Used by the training core (trainer/loop.py, trainer/app.py). May import: trainer.config,
trainer.state, trainer.nonfinite, trainer.tfcall, trainer.executor (the async save's executor),
trainer.optim (warm start), and each other.
Never imports trainer.loop, trainer.app, trainer.verify or trainer.bench.
"""
