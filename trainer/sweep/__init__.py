"""Sweeps (`python -m trainer -m ...`): many runs from one command, each resumable on its own.

- `jobs`: Hydra's glue. Each job is skipped (complete), resumed or trained; a signal stops the
  sweep after the running jobs saved; the job directory names (`job_dirname`);
- `report`: each job's record on disk (`record_store`) and the sweep's table, sweep.csv/json,
  exit code and HPARAMS experiment;
- `optuna_study`: an Optuna study that continues where it stopped;
- `joblib_workers`: the joblib launcher's workers, which stop cleanly;
- `hydra_callbacks`: puts a refused run's `.hydra/` back as it was (single runs too);
- `runinfo`: what can be read about a run without TensorFlow (its metrics, whether it is
  complete, the message of an interrupted one).

Nothing here loads TensorFlow until a job trains (`jobs` imports trainer.app then). May import:
trainer.config, trainer.signals, trainer.checkpoint (files, fingerprint, export's TF-free
part), trainer.data.record_files, and each other. The core imports `runinfo` and
`hydra_callbacks` only.
"""
