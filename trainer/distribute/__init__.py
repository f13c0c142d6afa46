"""Beyond one device: tf.distribute strategies, chief-only writes, preemption, mixed
precision, and the local multi-worker launcher (scripts/launch_local_workers.py).

Used by the training core. May import: trainer.config, trainer.checkpoint (a non-chief
worker's scratch store) and each other. Never imports trainer.loop, trainer.app,
trainer.verify or trainer.bench.
"""
