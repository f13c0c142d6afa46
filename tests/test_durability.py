"""A checkpoint counts only once it is on stable storage: the order of system calls, traced
with a real `strace -f -y` on a real training run (scripts/setup.sh installs strace)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
from conftest import REPO, env

pytestmark = pytest.mark.slow

_CALL = re.compile(
    r"^(?:\[pid\s+\d+\]\s*)?(\d+\s+)?(?P<name>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+)"
)
_UNFINISHED = re.compile(
    r"^(?:\[pid\s+)?(?P<pid>\d+)\]?\s+(?P<call>\w+\(.*?)\s*<unfinished \.\.\.>$"
)
_RESUMED = re.compile(r"^(?:\[pid\s+)?(?P<pid>\d+)\]?\s+<\.\.\. \w+ resumed>(?P<rest>.*)$")
_FD = re.compile(r"^\d+<(?P<path>[^>]*)>")
# a path argument, with the directory fd before it when there is one (the *at calls: with -y,
# `unlinkat(8</run/checkpoints/.deleting>, "ckpt-10.index", 0)`, as shutil.rmtree calls it)
_PATH_ARG = re.compile(r'(?:(?:AT_FDCWD|\d+)(?:<(?P<dir>[^>]*)>)?,\s*)?"(?P<path>(?:[^"\\]|\\.)*)"')
_OWN = re.compile(r"ckpt-(\d+)\.(?:index|data-\d+-of-\d+|manifest\.json)")  # not TF's temps
_SYNC = ("fsync", "fdatasync")


def parse(trace: str) -> list[tuple[str, list[str]]]:
    """[(syscall, [paths])] in the order the calls returned (completed calls, return >= 0);
    a relative path of an *at call is joined to its directory fd's path. A call that another
    thread's call interrupted in the trace (`fsync(5</f> <unfinished ...>`, later
    `<... fsync resumed>) = 0`: the fsyncs a save makes at once) is placed where it returned."""
    out, pending = [], {}
    for line in trace.splitlines():
        line = line.strip()
        if m := _UNFINISHED.match(line):
            pending[m.group("pid")] = m.group("call")
            continue
        if (m := _RESUMED.match(line)) and m.group("pid") in pending:
            line = pending.pop(m.group("pid")) + m.group("rest")
        m = _CALL.match(line)
        if not m or int(m.group("ret")) < 0:
            continue
        name, args = m.group("name"), m.group("args")
        if name in _SYNC:
            fd = _FD.match(args)
            if fd:
                out.append((name, [fd.group("path")]))
        elif name.startswith("rename") or name.startswith("unlink"):
            paths = [
                os.path.join(a["dir"], a["path"]) if a["dir"] else a["path"]
                for a in _PATH_ARG.finditer(args)
            ]
            out.append((name, paths))
    return out


def own_step(path: str, ckpt_dir: str) -> int | None:
    """The step of a checkpoint's own file in `ckpt_dir` (data, index, manifest), else None."""
    directory, base = os.path.split(path)
    m = _OWN.fullmatch(base)
    return int(m.group(1)) if m and directory == ckpt_dir else None


def run_traced(tmp_path, *overrides: str) -> tuple[list, str]:
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed (scripts/setup.sh installs it)")
    run = tmp_path / "run"
    trace = tmp_path / "trace.txt"
    cmd = [
        "strace", "-f", "-y", "-qq", "--seccomp-bpf", "-o", str(trace),
        "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat",
        sys.executable, "-m", "trainer", *overrides, f"hydra.run.dir={run}",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return parse(trace.read_text()), str(run / "checkpoints")


@dataclass
class Retired:
    """An older checkpoint's file leaving its name: unlinked, or moved (into .deleting/)."""

    at: int  # its index in the trace
    path: str
    step: int
    moved_to: str | None = None  # None: unlinked in place


def order_violations(calls: list, ckpt_dir: str, steps: list[int]) -> tuple[list[str], list]:
    """The rules a checkpoint's way to the disk must follow, checked on a trace; returns (the
    violations, one line each, in the order found; the retirements it checked).

    For each checkpoint of `steps`:
      manifest:      exactly one rename creates its manifest (the atomic write's);
      data synced:   its data and index were fsynced before that rename;
      dir synced:    the directory was fsynced after the last of them and before that rename
                     (their names are on the disk before the manifest can name them);
      manifest synced: the manifest's temporary file was fsynced before its rename;
      dir after:     the first fsync after the rename is the directory's (the new name is on
                     the disk: from then on the checkpoint is durable).
    And for every file of an older checkpoint that leaves its name in the directory,
    unlinked or moved (retention moves large checkpoints into checkpoints/.deleting/):
      retired late:  only after some newer checkpoint of `steps` is durable."""
    bad: list[str] = []
    durable_at: dict[int, int] = {}
    for step in steps:
        name = f"ckpt-{step}"
        manifest = f"{ckpt_dir}/{name}.manifest.json"
        made = [
            i for i, (c, p) in enumerate(calls) if c.startswith("rename") and p[-1:] == [manifest]
        ]
        if len(made) != 1:
            bad.append(f"{name}: {len(made)} renames create its manifest, not one")
            continue
        at = made[0]
        synced = [p[0] for c, p in calls[:at] if c in _SYNC]
        index = f"{ckpt_dir}/{name}.index"
        data = [p for p in synced if p.startswith(f"{ckpt_dir}/{name}.data-")]
        if index not in synced or not data:
            bad.append(f"{name}: data/index not fsynced before its manifest")
        files = [i for i, p in enumerate(synced) if p == index or p in data]
        if ckpt_dir not in synced[max(files, default=-1) + 1 :]:
            bad.append(f"{name}: no directory fsync between its files' fsyncs and its manifest")
        if calls[at][1][0] not in synced:
            bad.append(f"{name}: the manifest's temporary file not fsynced before its rename")
        after = [i for i in range(at + 1, len(calls)) if calls[i][0] in _SYNC]
        if after and calls[after[0]][1] == [ckpt_dir]:
            durable_at[step] = after[0]
        else:
            bad.append(f"{name}: the manifest's rename is not followed by a dir fsync")
    retired = []
    for u, (c, paths) in enumerate(calls):
        if c.startswith("unlink") and paths and (old := own_step(paths[0], ckpt_dir)) is not None:
            retired.append(Retired(u, paths[0], old))
        elif c.startswith("rename") and len(paths) == 2:
            old = own_step(paths[0], ckpt_dir)
            if old is not None:
                retired.append(Retired(u, paths[0], old, moved_to=paths[1]))
    for r in retired:
        if not any(n > r.step and d < r.at for n, d in durable_at.items()):
            how = f"moved to {r.moved_to}" if r.moved_to else "unlinked"
            bad.append(f"{r.path} {how} before a newer checkpoint was durable")
    return bad, retired


def check_order(calls: list, ckpt_dir: str, steps: list[int]) -> list[Retired]:
    """Assert every rule of order_violations; return the retirements it checked."""
    bad, retired = order_violations(calls, ckpt_dir, steps)
    assert not bad, "\n".join(bad)
    return retired


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_checkpoints_reach_the_disk_before_they_count_and_before_older_ones_go(
    tmp_path, async_save
):
    calls, ckpt_dir = run_traced(
        tmp_path,
        "trainer.max_steps=40",
        "checkpoint.every=10",
        "checkpoint.max_to_keep=1",
        f"checkpoint.async={async_save}",
    )
    retired = check_order(calls, ckpt_dir, [10, 20, 30, 40])
    # retention really deleted the older ones, in place (small checkpoints): the order above
    # was tested on their unlinks
    assert {r.step for r in retired} == {10, 20, 30}
    assert all(r.moved_to is None for r in retired)
    # the exports too: each swapped in after an fsync, then its directory fsynced
    export_dir = ckpt_dir.rsplit("/", 1)[0] + "/export"
    renames = [
        i
        for i, (c, p) in enumerate(calls)
        if c.startswith("rename") and p and p[-1].startswith(export_dir + "/")
    ]
    assert renames, "no export was renamed into place"
    for i in renames:
        assert any(c in ("fsync", "fdatasync") and p == [export_dir] for c, p in calls[i + 1 :])


# model=custom_dense on the default data (10 features): 12 * units + 1 float32 weights, and
# Adam's two slots as many again each: 144 bytes a unit, 43 MB a checkpoint at 300,000 units,
# above retention's DEFER_BYTES (32 MiB; there is no setting for it). Its 30 steps train in
# under a second: the run takes about as long as the small ones above under strace.
BIG_UNITS = 300_000


def test_large_checkpoints_are_moved_aside_only_once_a_newer_one_is_durable(tmp_path):
    """Retention's deferred deletes (CheckpointStore._retire): a checkpoint of DEFER_BYTES or
    more has its data and index moved into checkpoints/.deleting/, freed there by the
    deleter thread. The moves come only after the newer checkpoint's manifest rename and the
    directory fsync that follows it (order_violations' "retired late" rule)."""
    from trainer.checkpoint.store import DEFER_BYTES, TRASH_DIR

    calls, ckpt_dir = run_traced(
        tmp_path,
        "trainer.max_steps=1000",
        "trainer.stop_at=30",  # stopped, not completed: no exports of the large model
        "checkpoint.every=10",
        "checkpoint.max_to_keep=1",
        f"model.num_units={BIG_UNITS}",
    )
    last = [p for p in os.listdir(ckpt_dir) if p.startswith("ckpt-30.")]
    size = sum(os.path.getsize(os.path.join(ckpt_dir, p)) for p in last if "manifest" not in p)
    assert size >= DEFER_BYTES, f"{size} bytes: too small to be deferred, raise BIG_UNITS"
    retired = check_order(calls, ckpt_dir, [10, 20, 30])
    trash = f"{ckpt_dir}/{TRASH_DIR}"
    for step in (10, 20):
        mine = {os.path.basename(r.path): r for r in retired if r.step == step}
        data = f"ckpt-{step}.data-00000-of-00001"
        assert sorted(mine) == sorted([data, f"ckpt-{step}.index", f"ckpt-{step}.manifest.json"])
        for base in (data, f"ckpt-{step}.index"):  # deferred: moved, not unlinked in place
            assert mine[base].moved_to == f"{trash}/{base}", mine[base]
            # ...and freed there afterwards (by the deleter thread's rmtree)
            freed = [
                i
                for i, (c, p) in enumerate(calls)
                if c.startswith("unlink") and p[:1] == [f"{trash}/{base}"]
            ]
            assert freed and freed[0] > mine[base].at, f"{trash}/{base} was not freed"
        assert mine[f"ckpt-{step}.manifest.json"].moved_to is None  # the manifest goes in place
    assert not os.path.exists(trash)  # emptied before the run ended


def _save(d: str, step: int) -> list:
    """The calls of a durable save of ckpt-<step> in directory `d`, in the right order."""
    return [
        ("fsync", [f"{d}/ckpt-{step}.data-00000-of-00001"]),
        ("fsync", [f"{d}/ckpt-{step}.index"]),
        ("fsync", [d]),
        ("fsync", [f"{d}/ckpt-{step}.manifest.json.tmp-7"]),
        ("rename", [f"{d}/ckpt-{step}.manifest.json.tmp-7", f"{d}/ckpt-{step}.manifest.json"]),
        ("fsync", [d]),
    ]


D = "/r/checkpoints"
SAVE = _save(D, 10)
DATA, INDEX, DIR, TMP, RENAME, DIR_AFTER = SAVE
UNLINK_OLD = ("unlink", [f"{D}/ckpt-5.index"])
MOVE_OLD = ("rename", [f"{D}/ckpt-5.index", f"{D}/.deleting/ckpt-5.index"])
LATE = {  # one trace per rule, breaking that rule and no other: (trace, the one violation)
    "data fsynced after the manifest is durable": (
        [INDEX, DIR, TMP, RENAME, DIR_AFTER, DATA],
        "ckpt-10: data/index not fsynced before its manifest",
    ),
    "index never fsynced": (
        [DATA, DIR, TMP, RENAME, DIR_AFTER],
        "ckpt-10: data/index not fsynced before its manifest",
    ),
    "directory fsynced before the files, not after": (
        [DIR, DATA, INDEX, TMP, RENAME, DIR_AFTER],
        "ckpt-10: no directory fsync between its files' fsyncs and its manifest",
    ),
    "no directory fsync before the manifest": (
        [DATA, INDEX, TMP, RENAME, DIR_AFTER],
        "ckpt-10: no directory fsync between its files' fsyncs and its manifest",
    ),
    "manifest renamed unsynced": (
        [DATA, INDEX, DIR, RENAME, DIR_AFTER],
        "ckpt-10: the manifest's temporary file not fsynced before its rename",
    ),
    "manifest synced only after its rename": (
        [DATA, INDEX, DIR, RENAME, DIR_AFTER, ("fsync", [f"{D}/ckpt-10.manifest.json"])],
        "ckpt-10: the manifest's temporary file not fsynced before its rename",
    ),
    "no directory fsync after the rename": (
        [DATA, INDEX, DIR, TMP, RENAME],
        "ckpt-10: the manifest's rename is not followed by a dir fsync",
    ),
    "the manifest fsynced after its rename instead of the directory": (
        [DATA, INDEX, DIR, TMP, RENAME, ("fsync", [f"{D}/ckpt-10.manifest.json"])],
        "ckpt-10: the manifest's rename is not followed by a dir fsync",
    ),
    "no manifest": (
        [DATA, INDEX, DIR, TMP, DIR_AFTER],
        "ckpt-10: 0 renames create its manifest, not one",
    ),
    "manifest renamed twice": (
        [*SAVE, RENAME, DIR_AFTER],
        "ckpt-10: 2 renames create its manifest, not one",
    ),
    "older one unlinked before the newer one's files are synced": (
        [UNLINK_OLD, *SAVE],
        f"{D}/ckpt-5.index unlinked before a newer checkpoint was durable",
    ),
    "older one unlinked between the rename and the directory fsync": (
        [DATA, INDEX, DIR, TMP, RENAME, UNLINK_OLD, DIR_AFTER],
        f"{D}/ckpt-5.index unlinked before a newer checkpoint was durable",
    ),
    "older one moved to .deleting/ before the newer one's manifest": (
        [DATA, INDEX, DIR, TMP, MOVE_OLD, RENAME, DIR_AFTER],
        f"{D}/ckpt-5.index moved to {D}/.deleting/ckpt-5.index before a newer checkpoint was "
        "durable",
    ),
    "older one moved to .deleting/ between the rename and the directory fsync": (
        [DATA, INDEX, DIR, TMP, RENAME, MOVE_OLD, DIR_AFTER],
        f"{D}/ckpt-5.index moved to {D}/.deleting/ckpt-5.index before a newer checkpoint was "
        "durable",
    ),
    "a newer one unlinked, though only an older one is durable": (
        [*SAVE, ("unlink", [f"{D}/ckpt-20.data-00000-of-00001"])],
        f"{D}/ckpt-20.data-00000-of-00001 unlinked before a newer checkpoint was durable",
    ),
}


def test_the_order_check_passes_the_right_order_with_either_way_of_retiring():
    for retire in (UNLINK_OLD, MOVE_OLD):
        trace = [*SAVE, retire, ("unlink", [f"{D}/.deleting/ckpt-5.index"])]
        retired = check_order(trace, D, [10])
        assert [(r.step, r.moved_to is not None) for r in retired] == [(5, retire is MOVE_OLD)]
    # TensorFlow's temporary files, the manifest's temp and files in .deleting/ are not a
    # checkpoint's own: their unlinks and renames are not retirements
    others = [
        ("rename", [f"{D}/ckpt-10_temp/part-00000-of-00001.index", f"{D}/ckpt-10.index"]),
        ("unlink", [f"{D}/ckpt-10_temp/part-00000-of-00001.index"]),
        ("unlink", [f"{D}/ckpt-5.manifest.json.tmp-7"]),
        ("unlink", [f"{D}/.deleting/ckpt-5.index"]),
    ]
    assert check_order([*others, *SAVE], D, [10]) == []


@pytest.mark.parametrize("rule", list(LATE))
def test_the_order_check_fails_on_a_trace_breaking_one_rule_naming_it(rule):
    """The negative control of each rule of order_violations: the right order with that one
    rule broken is refused, for that rule alone."""
    trace, violation = LATE[rule]
    assert order_violations(trace, D, [10])[0] == [violation]
    with pytest.raises(AssertionError, match=re.escape(violation)):
        check_order(trace, D, [10])


def test_the_trace_parser_places_an_interrupted_call_where_it_returned():
    trace = "\n".join(
        [
            f"12 fsync(8<{D}/ckpt-10.index> <unfinished ...>",
            f"14 fsync(9<{D}> <unfinished ...>",
            f"13 fsync(7<{D}/ckpt-10.data-00000-of-00001>) = 0",
            "14 <... fsync resumed>) = 0",
            "12 <... fsync resumed>) = 0",
            f"15 fsync(6<{D}/x> <unfinished ...>",
            "15 <... fsync resumed>) = -1 EIO (Input/output error)",
        ]
    )
    assert parse(trace) == [
        ("fsync", [f"{D}/ckpt-10.data-00000-of-00001"]),
        ("fsync", [D]),
        ("fsync", [f"{D}/ckpt-10.index"]),
    ]


def test_the_trace_parser_reads_paths_relative_to_a_directory_fd():
    trace = "\n".join(
        [
            f"12 fsync(8<{D}/ckpt-10.index>) = 0",
            f'12 rename("{D}/ckpt-5.index", "{D}/.deleting/ckpt-5.index") = 0',
            f'12 renameat2(AT_FDCWD</srv>, "{D}/a", AT_FDCWD</srv>, "b", RENAME_NOREPLACE) = 0',
            f'13 unlinkat(9<{D}/.deleting>, "ckpt-5.index", 0) = 0',
            f'13 unlink("{D}/ckpt-5.manifest.json") = -1 ENOENT (No such file or directory)',
        ]
    )
    assert parse(trace) == [
        ("fsync", [f"{D}/ckpt-10.index"]),
        ("rename", [f"{D}/ckpt-5.index", f"{D}/.deleting/ckpt-5.index"]),
        ("renameat2", [f"{D}/a", "/srv/b"]),
        ("unlinkat", [f"{D}/.deleting/ckpt-5.index"]),
    ]


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_without_durability_the_trace_shows_no_fsync_of_the_data(tmp_path, async_save):
    """The negative control (checkpoint.durable=false): neither TensorFlow nor the project's
    writer of small async states (ckpt-20 here) fsyncs a checkpoint's files, and the same
    check fails on that real trace."""
    calls, ckpt_dir = run_traced(
        tmp_path,
        "trainer.max_steps=20",
        "checkpoint.every=10",
        "checkpoint.durable=false",
        f"checkpoint.async={async_save}",
    )
    bad, _ = order_violations(calls, ckpt_dir, [10, 20])
    for name in ("ckpt-10", "ckpt-20"):
        assert f"{name}: data/index not fsynced before its manifest" in bad, bad
        assert f"{name}: no directory fsync between its files' fsyncs and its manifest" in bad
        assert f"{name}: the manifest's rename is not followed by a dir fsync" in bad, bad
    with pytest.raises(AssertionError, match="data/index not fsynced before its manifest"):
        check_order(calls, ckpt_dir, [10, 20])
    # nothing of the checkpoints is fsynced: not the manifests' temporary files either
    assert not [p for c, p in calls if c in _SYNC and p[0].startswith(ckpt_dir)], calls
