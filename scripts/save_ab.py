"""A part of an async save, taken out or swapped on every other save of one run: what that
part costs the loop, with the run's own noise cancelled. How BENCHMARKS.md's "Saves measured
within one run" was measured.

    python scripts/save_ab.py no-write default-executor no-fsync no-log-sync [--rounds 4]

Each round is one fresh `python -m trainer` of the default model (`--steps` steps, an async
save every 500, sync for eager-sync, no evaluation) in which the saves after steps 500, 1500, 2500, ... run the
variant and the others run the code as it is. A save's cost is its 20 log windows against
the median window far from any save of the same run (trainer/bench/saves.py,
cost_per_save), taken over each half of the saves; the difference of the halves is the
variant's effect. Between-run comparisons (scripts/bench_ab.py) see the machine's drift
from run to run, 1-3 ms on this VM, larger than most parts of a save; alternating within a
run does not.

Variants (each swaps one part, on odd saves only):
  no-write          the snapshot only: nothing is written (the write's whole cost)
  default-executor  the snapshot and the save on TensorFlow's default executor
                    (trainer/executor.py, for_checkpoint)
  no-fsync          the checkpoint's fsyncs skipped (as checkpoint.durable=false)
  no-log-sync       the TensorBoard rows and metrics.jsonl not synced before the write
  sched-idle        the writer's thread under SCHED_IDLE (Linux) instead of nice +10 (as
                    root: an unprivileged thread cannot leave SCHED_IDLE for the even saves)
  commit-elsewhere  the manifest's work (fsyncs, sizes, checksum, manifest, rename) done by
                    a helper process (an experiment: what the GIL and this thread cost)
  tf-manager-save   TensorFlow's CheckpointManager.save and Checkpoint._write instead of
                    the manager's own save (trainer/checkpoint/manager.py); TF's size metric
                    answered without its glob, as the code before the change did (its
                    second increment of the save counter changes only the files' counter;
                    the state file, when due, is written before the sweep too)
  durable-floor     the least a durable save of these bytes can do, in place of the write
                    after the log sync: the last checkpoint's data, index and manifest sizes
                    written from a ready buffer with plain os calls, in the same order of
                    fsyncs (the files, the directory, the manifest's temporary file, its
                    rename, the directory), the previous such files then unlinked; no
                    TensorFlow, no serialization, no checksum. Against it, the save as is
                    shows what the code costs above what its durability costs on this disk
  tf-save-floor     as durable-floor, with the files written by the snapshot's traced
                    TensorFlow save (as is) instead of from the buffer: what the rest of
                    the write (manager, manifest, object-graph check, retention) costs
  traced-save       TensorFlow's traced save (async_save._compiled_save) writing the files
                    instead of bundle_save's writer (trainer/checkpoint/bundle_save.py)
  reread-commit     the commit as in session 14: bundle_save's files fsynced by the manifest
                    step (opened again), listed, their sizes and the index's SHA-256 read
                    from the disk; the save counter read by the writer; TensorFlow's
                    async_wait, the folder's makedirs and the trash's isdir on every save
  eager-sync        sync saves (checkpoint.async=false), TensorFlow's eager save on every
                    other save instead of the snapshot and the project's writer on the
                    loop's thread (CheckpointStore snapshot_sync)
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from trainer.startup import script_start  # noqa: E402

script_start(sys.argv[1:])  # TensorFlow's start-up lines held back

EVERY = 500
AFTER_SAVE, BASELINE_FROM, WARMUP = 20, 25, 1100
VARIANTS = (
    "no-write",
    "default-executor",
    "no-fsync",
    "no-log-sync",
    "sched-idle",
    "commit-elsewhere",
    "tf-manager-save",
    "durable-floor",
    "tf-save-floor",
    "traced-save",
    "reread-commit",
    "eager-sync",
)
SYNC_VARIANTS = ("eager-sync",)  # runs with checkpoint.async=false


def _odd(step: int) -> bool:
    return (step // EVERY) % 2 == 1


def patch(variant: str) -> None:
    """Swap `variant`'s part on odd saves, in this (the trainer's) process."""
    import types

    from trainer import executor
    from trainer.checkpoint import async_save, snapshot, store

    odd = [False]
    submit, run = async_save.AsyncCheckpointWriter.submit, async_save.AsyncCheckpointWriter._run

    def submit_(self, step, *a, **k):
        odd[0] = _odd(step)
        return submit(self, step, *a, **k)

    def run_(self, step, write, frozen):
        if odd[0] and variant == "no-write":
            return None
        return run(self, step, write, frozen)

    async_save.AsyncCheckpointWriter.submit = submit_
    async_save.AsyncCheckpointWriter._run = run_
    if variant == "default-executor":  # (the module's own name only: not the train step's)
        swap = types.SimpleNamespace(**vars(executor))
        swap.running_on = lambda e: executor.running_on("" if odd[0] else e)
        async_save.executor = snapshot.executor = swap
    elif variant == "no-fsync":
        write_manifest = store.CheckpointStore.write_manifest

        def write_manifest_(self, prefix, step):
            self.durable = not odd[0]
            return write_manifest(self, prefix, step)

        def submit_durable(self, step, *a, **k):  # the project's writer fsyncs its own files
            self.durable = not _odd(step)
            return submit_(self, step, *a, **k)

        async_save.AsyncCheckpointWriter.submit = submit_durable

        store.CheckpointStore.write_manifest = write_manifest_
    elif variant == "sched-idle":
        policy = {True: (os.SCHED_IDLE, 0), False: (os.SCHED_OTHER, 0)}

        def run_idle(self, step, write, frozen):
            which, prio = policy[odd[0]]
            # this thread (Linux); its nice value (+10) stays, and counts again under OTHER
            os.sched_setscheduler(0, which, os.sched_param(prio))
            return run(self, step, write, frozen)

        async_save.AsyncCheckpointWriter._run = run_idle
    elif variant == "commit-elsewhere":
        import json
        import subprocess
        import time

        from trainer.checkpoint.manifest import MANIFEST_SUFFIX, checkpoint_files

        helper = subprocess.Popen(
            [sys.executable, "-c", _HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        write_manifest = store.CheckpointStore.write_manifest

        def write_manifest_(self, prefix, step):
            if not odd[0]:
                return write_manifest(self, prefix, step)
            request = {
                "paths": checkpoint_files(prefix),
                "dir": self.directory,
                "step": step,
                "time": time.time(),
                "extra": self._extra_json,
                "manifest": prefix + MANIFEST_SUFFIX,
            }
            helper.stdin.write(json.dumps(request).encode() + b"\n")
            helper.stdin.flush()
            assert helper.stdout.readline() == b"ok\n"

        store.CheckpointStore.write_manifest = write_manifest_
    elif variant == "tf-manager-save":
        import tensorflow as tf
        from tensorflow.python.checkpoint import checkpoint as tf_checkpoint

        from trainer.checkpoint import manager

        tf_checkpoint._get_checkpoint_size = lambda prefix: 0
        save = manager.Manager.save

        def save_(self, number, written=None, counted=False):
            if odd[0]:  # as the code before: a callback in CheckpointOptions
                options = tf.train.CheckpointOptions(experimental_write_callbacks=[written])
                return tf.train.CheckpointManager.save(self, number, options=options)
            return save(self, number, written, counted)

        manager.Manager.save = save_
    elif variant in ("durable-floor", "tf-save-floor"):
        from trainer.checkpoint.files import fsync_path
        from trainer.checkpoint.manifest import MANIFEST_SUFFIX, checkpoint_files

        write_ = store.CheckpointStore._write
        last = {}  # the newest real checkpoint's file sizes, and the floor's previous files

        def floor_write(self, step, before_write=None):
            if not odd[0]:
                write_(self, step, before_write)
                prefix = os.path.join(self.directory, f"ckpt-{step}")
                last["sizes"] = [
                    os.path.getsize(p)
                    for p in [*checkpoint_files(prefix), prefix + MANIFEST_SUFFIX]
                ]
                return
            if before_write is not None:
                before_write()
            if "sizes" not in last:  # (no real checkpoint yet: the warm-up's first save)
                return
            *sizes, manifest_size = last["sizes"]
            prefix = os.path.join(self.directory, f"floor-{step}")
            if variant == "tf-save-floor":  # the snapshot's traced save (in _run's place)
                self.checkpoint._saver.save(file_prefix=prefix)
                paths = checkpoint_files(prefix)
            else:
                paths = [f"{prefix}.f{i}" for i in range(len(sizes))]
                for path, size in zip(paths, sizes, strict=True):
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.write(fd, _BUFFER[:size])
                    os.close(fd)
            for path in paths:
                fsync_path(path)
            fsync_path(self.directory)
            tmp = prefix + ".manifest.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, _BUFFER[:manifest_size])
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, prefix + ".manifest")
            fsync_path(self.directory)
            for path in last.get("floor", []):  # retention's unlinks
                os.remove(path)
            last["floor"] = [*paths, prefix + ".manifest"]

        store.CheckpointStore._write = floor_write
    elif variant == "traced-save":
        import tensorflow as tf

        saver_for = async_save.AsyncCheckpointWriter._saver_for

        def saver_for_(self, frozen):
            if odd[0]:
                key, flat = async_save.graph_key(frozen), tf.nest.flatten([t for _, t in frozen])
                return async_save._compiled_save(self.checkpoint, frozen, self._savers, key, flat)
            return saver_for(self, frozen)

        async_save.AsyncCheckpointWriter._saver_for = saver_for_
    elif variant == "reread-commit":
        from tensorflow.python.eager import context

        from trainer.checkpoint import bundle, manager

        write, take = bundle.write, async_save.AsyncCheckpointWriter.take_written
        bundle.write = lambda prefix, layout, values, sync=False: write(
            prefix, layout, values, sync and not odd[0]
        )
        async_save.AsyncCheckpointWriter.take_written = lambda self, p: (
            None if odd[0] else take(self, p)
        )
        saver_for, save, start = (
            async_save.AsyncCheckpointWriter._saver_for,
            manager.Manager.save,
            store.CheckpointStore._start_deleter,
        )

        def saver_for_(self, frozen):
            inner = saver_for(self, frozen)
            if not odd[0] or self.last_writer != "bundle":
                return inner

            def saver(file_prefix, options=None):
                self.checkpoint.save_counter.read_value()  # (values() read it)
                os.makedirs(os.path.dirname(file_prefix), exist_ok=True)
                return inner(file_prefix)

            return saver

        def save_(self, number, written=None, counted=False):
            if odd[0]:
                context.async_wait()
            return save(self, number, written, counted)

        def start_(self):
            if odd[0]:
                os.path.isdir(os.path.join(self.directory, store.TRASH_DIR))
            return start(self)

        async_save.AsyncCheckpointWriter._saver_for = saver_for_
        manager.Manager.save = save_
        store.CheckpointStore._start_deleter = start_
    elif variant == "eager-sync":
        save = store.CheckpointStore.save

        def save_(self, step, *a, **k):
            odd[0], inline = _odd(step), self._inline
            if odd[0]:
                self._inline = None
            try:
                return save(self, step, *a, **k)
            finally:
                self._inline = inline

        store.CheckpointStore.save = save_
    elif variant == "no-log-sync":
        write = store.CheckpointStore._write
        store.CheckpointStore._write = lambda self, s, before=None: write(
            self, s, None if odd[0] else before
        )


_BUFFER = bytes(range(256)) * (1 << 14)  # 4 MiB of ready bytes (durable-floor)

_HELPER = r"""
import json, os, sys
from trainer.checkpoint.files import fsync_path, sha256_file, write_text_atomic
os.nice(10)
for line in sys.stdin:  # as CheckpointStore.write_manifest, durable
    req = json.loads(line)
    paths = req["paths"]
    for p in paths:
        fsync_path(p)
    fsync_path(req["dir"])
    files = {os.path.basename(p): {"size": os.path.getsize(p)} for p in paths}
    for p in paths:
        if p.endswith(".index"):
            files[os.path.basename(p)]["sha256"] = sha256_file(p)
    own = {
        "step": req["step"],
        "time": req["time"],
        "files": files,
        "data_checksums": "crc32c of every tensor, stored in the .index by TensorFlow",
    }
    text = json.dumps(own, sort_keys=True)
    if req["extra"] != "{}":
        text = text[:-1] + ", " + req["extra"][1:]
    write_text_atomic(req["manifest"], text)
    sys.stdout.write("ok\n")
    sys.stdout.flush()
"""


def one_run(variant: str, steps: int, workdir: str) -> tuple[float, float]:
    """(cost of the even saves, of the odd saves), ms, in one fresh run."""
    from trainer.bench.common import NO_EVAL
    from trainer.bench.loop_rates import read_windows, run_checked

    run_dir = tempfile.mkdtemp(prefix="save-ab-", dir=workdir)
    args = [
        f"trainer.max_steps={steps + 1}",
        f"trainer.stop_at={steps}",
        f"trainer.eval_every={NO_EVAL}",
        f"checkpoint.every={EVERY}",
        f"checkpoint.async={'false' if variant in SYNC_VARIANTS else 'true'}",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONPATH": REPO}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--", *args]
    run_checked(cmd, env, cwd=REPO)
    return halves(read_windows(run_dir))


def halves(windows: list[tuple[int, int, float]]) -> tuple[float, float]:
    """cost_per_save's sum, for the even and the odd saves apart, against one baseline."""
    from trainer.bench.loop_rates import median

    by: dict[bool, dict[int, list[float]]] = {False: {}, True: {}}
    far = []
    for end, steps, seconds in windows:
        since = (end - 1) % EVERY + 1
        if end - since < WARMUP or steps <= 0:
            continue
        k = -(-since // steps)
        if k <= AFTER_SAVE:
            by[_odd(end - since)].setdefault(k, []).append(seconds / steps)
        elif since > BASELINE_FROM * steps:
            far.append(seconds / steps)
    base, steps = median(far), median([w[1] for w in windows])
    even, odd = (
        1000 * sum((median(v) - base) * steps for v in by[half].values()) for half in (False, True)
    )
    return even, odd


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # the trainer's process: swap the part, run the trainer
        patch(sys.argv[2])
        sys.argv = ["trainer", *sys.argv[4:]]  # (after "--child VARIANT --")
        runpy.run_module("trainer", run_name="__main__", alter_sys=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", metavar="VARIANT", help=", ".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30000)
    args = parser.parse_args()
    from trainer.bench.loop_rates import median

    if unknown := [v for v in args.variants if v not in VARIANTS]:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="save-ab-") as workdir:
        for variant in args.variants:
            diffs, even_all, odd_all = [], [], []
            for r in range(args.rounds):
                even, odd = one_run(variant, args.steps, workdir)
                diffs.append(odd - even)
                even_all.append(even)
                odd_all.append(odd)
                print(f"  {variant} round {r + 1}: as is {even:.2f} ms, {variant} {odd:.2f} ms")
            print(
                f"{variant}: a save as is {median(even_all):.2f} ms, with {variant} "
                f"{median(odd_all):.2f} ms; difference median {median(diffs):+.2f} ms "
                f"(rounds {min(diffs):+.2f}..{max(diffs):+.2f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
