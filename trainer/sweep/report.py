"""A sweep's outcome: one record per job, the table, sweep.csv, sweep.json and the HPARAMS
experiment that makes `tensorboard --logdir <sweep dir>` compare the jobs.

Each job writes its record to `<sweep>/.sweep/jobs/<its directory>.json` (record_store.py) from whichever
process ran it (the joblib launcher's workers too), tagged with the invocation (one run of
the sweep command) that wrote it. At the end, the process that started the sweep reports
every job directory of the sweep, as TensorBoard shows them: this invocation's jobs, and any
from earlier invocations that this one did not run (an Optuna study's earlier trials, a
value since dropped from the sweep), marked as such. The exit code is this invocation's.
Records are written atomically and fsynced; one that cannot be read all the same is a failed
job of this invocation (its file and the error), never left out of the table or the code.
Nothing here loads TensorFlow: TensorBoard's protos and record writer write the experiment.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import socket
import time
from dataclasses import asdict

from trainer.checkpoint.files import write_text_atomic
from trainer.sweep.record_store import Record, invocation, read_records

EXPERIMENT_SUFFIX = ".sweep-hparams"
# The sweep's exit code (README, "Exit codes"): 0 every job complete; 1 a job failed (and
# none was interrupted); 3 interrupted: a job saved and stopped, or did not start.
EXIT_OK, EXIT_JOB_FAILED, EXIT_INTERRUPTED = 0, 1, 3


def exit_code(records: list[Record]) -> int:
    if any(r.status in ("interrupted", "not_started") for r in records):
        return EXIT_INTERRUPTED
    return EXIT_JOB_FAILED if any(r.status == "failed" for r in records) else EXIT_OK


def _metric_names(records: list[Record]) -> list[str]:
    names = {k for r in records for k in r.eval if k != "loss"}
    return ["loss", *sorted(names)]


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def rows(records: list[Record], current: str) -> list[dict]:
    """One flat row per job: what sweep.csv holds and the table shows."""
    out = []
    for r in records:
        row = {
            "overrides": " ".join(r.overrides),
            "status": r.status,
            "detail": r.describe(current),
            "this_invocation": r.invocation == current,
            "exit_code": r.exit_code,
            "step": r.step,
            "max_steps": r.max_steps,
            "resumed_from": r.resumed_from,
            "train_loss": r.train_loss,
        }
        row.update({f"eval_{k}": r.eval.get(k) for k in _metric_names(records)})
        row.update({"seconds": round(r.seconds, 3), "dir": r.dir})
        out.append(row)
    return out


def table(records: list[Record], sweep_dir: str, code: int, current: str) -> str:
    """The table printed at the end of a sweep (status last: a failure's reason is long)."""
    counts: dict[str, int] = {}
    for r in records:
        key = r.status.replace("_", " ") if r.invocation == current else "from earlier runs"
        counts[key] = counts.get(key, 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no job ran"
    head = f"Sweep {sweep_dir}: {len(records)} job(s) ({tally}); exit code {code}"
    metrics = _metric_names(records)
    cols = ["job", "steps", "train loss", *[f"eval {m}" for m in metrics], "seconds", "status"]
    lines = []
    for r in records:
        steps = f"{r.step}/{r.max_steps}" if r.step is not None else f"-/{r.max_steps}"
        job = " ".join(r.overrides) or (r.dir if r.exit_code is None else "(no overrides)")
        cells = [job, steps, _fmt(r.train_loss)]
        cells += [_fmt(r.eval.get(m)) for m in metrics]
        lines.append([*cells, f"{r.seconds:.2f}", r.describe(current)])
    widths = [max([len(c), *(len(line[i]) for line in lines)]) for i, c in enumerate(cols[:-1])]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join([head, fmt.format(*cols), *(fmt.format(*line) for line in lines)])


def write_files(records: list[Record], sweep_dir: str, code: int, current: str) -> None:
    """`sweep.csv` (one row per job) and `sweep.json` (the records, with the exit code)."""
    flat = rows(records, current)
    buf = io.StringIO()
    if flat:
        writer = csv.DictWriter(buf, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    write_text_atomic(os.path.join(sweep_dir, "sweep.csv"), buf.getvalue())
    jobs = [{**asdict(r), "detail": r.describe(current)} for r in records]
    doc = {"sweep_dir": sweep_dir, "exit_code": code, "invocation": current, "jobs": jobs}
    write_text_atomic(os.path.join(sweep_dir, "sweep.json"), json.dumps(doc, indent=1))


def _domain(values: list):
    """A Discrete domain for the HPARAMS tab's filter when the values share one type."""
    from tensorboard.plugins.hparams import summary_v2 as hp

    kinds = {
        bool if isinstance(v, bool) else float if isinstance(v, int | float) else str
        for v in values
    }
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    return hp.Discrete(sorted({kind(v) for v in values}))


def write_experiment(records: list[Record], sweep_dir: str) -> None:
    """The one HPARAMS experiment of the sweep directory, as an event file at its root: every
    hyperparameter of its jobs (with the values they took: the tab's filters), and the final
    train loss and eval metrics as metric columns (each job's session is `<job>/tensorboard`,
    its metrics in train/ and eval/). The previous invocation's experiment file is replaced."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp
    from tensorboard.summary.writer.record_writer import RecordWriter  # TF-free, unlike
    # TensorBoard's EventFileWriter (it writes through tf.io.gfile when TF is installed)

    names = sorted({k for r in records for k in r.hparams})
    hparams = [
        hp.HParam(k, _domain([r.hparams[k] for r in records if k in r.hparams])) for k in names
    ]
    metrics = [hp.Metric("loss", group="train", display_name="train loss")]
    metrics += [
        hp.Metric(m, group="eval", display_name=f"eval {m}") for m in _metric_names(records)
    ]
    now = time.time()
    events = [
        event_pb2.Event(wall_time=now, file_version="brain.Event:2"),
        event_pb2.Event(wall_time=now, step=0, summary=hp.hparams_config_pb(hparams, metrics)),
    ]
    for old in glob.glob(os.path.join(glob.escape(sweep_dir), "*tfevents*" + EXPERIMENT_SUFFIX)):
        os.remove(old)
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}{EXPERIMENT_SUFFIX}"
    writer = RecordWriter(open(os.path.join(sweep_dir, name), "wb"))
    for event in events:
        writer.write(event.SerializeToString())
    writer.close()


def finish(sweep_dir: str, stopped: bool = False) -> int:
    """Report the sweep's jobs (module docstring); return this invocation's exit code.
    `stopped`: a signal ended the sweep before its sweeper was done (exit 3 whatever the
    records: the jobs it had yet to launch have none)."""
    records = read_records(sweep_dir)
    current = invocation(sweep_dir)
    code = exit_code([r for r in records if r.invocation == current])
    code = EXIT_INTERRUPTED if stopped else code
    print(table(records, sweep_dir, code, current), flush=True)
    write_files(records, sweep_dir, code, current)
    if records:
        write_experiment(records, sweep_dir)
    print(
        f"Wrote {os.path.join(sweep_dir, 'sweep.csv')} and sweep.json; compare the jobs with: "
        f"tensorboard --logdir {sweep_dir}",
        flush=True,
    )
    if code == EXIT_INTERRUPTED:
        print("The sweep was interrupted: rerun the same command to continue it.", flush=True)
    return code
