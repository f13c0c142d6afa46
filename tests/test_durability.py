"""A checkpoint counts only once it is on stable storage: the order of system calls, traced
with a real `strace -f -y` on a real training run (scripts/setup.sh installs strace)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, env

pytestmark = pytest.mark.slow

_CALL = re.compile(
    r"^(?:\[pid\s+\d+\]\s*)?(\d+\s+)?(?P<name>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+)"
)
_FD = re.compile(r"^\d+<(?P<path>[^>]*)>")
_STR = re.compile(r'"((?:[^"\\]|\\.)*)"')
_CKPT = re.compile(r"/ckpt-(\d+)\.(?:index|data-|manifest)")  # a checkpoint's own files, not temps


def parse(trace: str) -> list[tuple[str, list[str]]]:
    """[(syscall, [paths])] in the order strace recorded them (completed calls, return >= 0)."""
    out = []
    for line in trace.splitlines():
        m = _CALL.match(line.strip())
        if not m or int(m.group("ret")) < 0:
            continue
        name, args = m.group("name"), m.group("args")
        if name in ("fsync", "fdatasync"):
            fd = _FD.match(args)
            if fd:
                out.append((name, [fd.group("path")]))
        elif name.startswith("rename") or name.startswith("unlink"):
            out.append((name, _STR.findall(args)))
    return out


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


def check_order(calls: list, ckpt_dir: str, steps: list[int]) -> None:
    """For each checkpoint: its data and index fsynced, then the directory, before the rename
    that creates its manifest; a directory fsync after that rename (it is durable then). And
    each older checkpoint's files are unlinked only once a newer checkpoint is durable."""
    durable_at = {}
    for step in steps:
        name = f"ckpt-{step}"
        manifest = f"{ckpt_dir}/{name}.manifest.json"
        (at,) = [
            i for i, (c, p) in enumerate(calls) if c.startswith("rename") and p[-1:] == [manifest]
        ]
        synced = [p[0] for c, p in calls[:at] if c in ("fsync", "fdatasync")]
        index = f"{ckpt_dir}/{name}.index"
        data = [p for p in synced if p.startswith(f"{ckpt_dir}/{name}.data-")]
        assert index in synced and data, f"{name}: data/index not fsynced before its manifest"
        last_file = max(i for i, p in enumerate(synced) if p == index or p in data)
        assert ckpt_dir in synced[last_file + 1 :], (
            f"{name}: no directory fsync before its manifest"
        )
        after = [i for i in range(at + 1, len(calls)) if calls[i][0] in ("fsync", "fdatasync")]
        assert after and calls[after[0]][1] == [ckpt_dir], (
            f"{name}: the manifest's rename is not followed by a dir fsync"
        )
        durable_at[step] = after[0]
    for u, (c, paths) in enumerate(calls):
        if not c.startswith("unlink"):
            continue
        for path in paths:
            m = _CKPT.search(path)
            if m and path.startswith(ckpt_dir + "/ckpt-"):
                old = int(m.group(1))
                assert any(n > old and at < u for n, at in durable_at.items()), (
                    f"{path} unlinked before a newer checkpoint was durable"
                )


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
    check_order(calls, ckpt_dir, [10, 20, 30, 40])
    # retention really deleted the older ones (so the ordering above was tested)
    gone = {
        int(m.group(1))
        for c, p in calls
        if c.startswith("unlink")
        for m in map(_CKPT.search, p)
        if m
    }
    assert {10, 20, 30} <= gone
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


def test_the_order_check_fails_on_a_manifest_renamed_before_its_data_is_synced():
    """check_order is strict: the same trace with the data's fsync after the rename fails."""
    d = "/r/checkpoints"
    good = [
        ("fsync", [f"{d}/ckpt-10.data-00000-of-00001"]),
        ("fsync", [f"{d}/ckpt-10.index"]),
        ("fsync", [d]),
        ("rename", [f"{d}/ckpt-10.manifest.json.tmp", f"{d}/ckpt-10.manifest.json"]),
        ("fsync", [d]),
    ]
    check_order(good, d, [10])
    late = [good[1], good[2], good[3], good[0], good[4]]
    with pytest.raises(AssertionError, match="not fsynced"):
        check_order(late, d, [10])
    early_unlink = [("unlink", [f"{d}/ckpt-5.index"]), *good]
    with pytest.raises(AssertionError, match="unlinked before a newer checkpoint was durable"):
        check_order(early_unlink, d, [10])


def test_without_durability_the_trace_shows_no_fsync_of_the_data(tmp_path):
    """The negative control (checkpoint.durable=false): TensorFlow alone does not fsync a
    checkpoint's files, and the same check fails on that real trace."""
    calls, ckpt_dir = run_traced(
        tmp_path, "trainer.max_steps=20", "checkpoint.every=10", "checkpoint.durable=false"
    )
    with pytest.raises(AssertionError, match="not fsynced"):
        check_order(calls, ckpt_dir, [10, 20])
