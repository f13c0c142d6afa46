"""Tools that prove a run right: resume verification (also under random SIGKILLs), export
verification, run comparison by TensorBoard curves and Keras paths, reports, plots, latency,
checkpoint inspection. Behind scripts/verify_resume.py, verify_export.py, compare_runs.py and
inspect_checkpoints.py.

May import anything in trainer (the core and its subsystems); nothing outside this package
and trainer.bench imports it (tests/test_layout.py checks it).
"""
