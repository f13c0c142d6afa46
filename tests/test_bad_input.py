"""Every user mistake: one message naming key, value received and what is allowed; exit 2; no
traceback; nothing in an existing run directory changed. Command-line mistakes go through the
real CLI (they fail before TensorFlow loads, so they are quick); data mistakes run in-process."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, train

CLI_CASES = {
    "unknown group option": (["model=nope"], ["model: received 'nope'", "custom_dense"]),
    "unknown key": (["trainer.foo=1"], ["trainer.foo: unknown key", "max_steps"]),
    "unknown appended key": (["+trainer.foo=1"], ["trainer.foo: unknown key", "max_steps"]),
    "wrong type": (["trainer.max_steps=abc"], ["trainer.max_steps: received 'abc'", "an integer"]),
    "zero steps": (["trainer.max_steps=0"], ["trainer.max_steps: received 0", "an integer > 0"]),
    "negative batch size": (["data.batch_size=-4"], ["data.batch_size: received -4", "> 0"]),
    "zero learning rate": (
        ["optimizer.learning_rate=0"],
        ["optimizer.learning_rate: received 0", "> 0"],
    ),
    "missing data path": (["data=csv"], ["data.path: no value given"]),
    "an unknown option of Hydra's own group": (
        ["hydra/launcher=nope"],
        ["hydra/launcher: received 'nope'", "basic | joblib"],
    ),
    "a schema chosen as an option": (
        ["data=csv_schema"],
        ["data: received 'csv_schema'", "csv | custom | digits"],
    ),
    "bad choice": (
        ["trainer.on_nonfinite=maybe"],
        ["trainer.on_nonfinite: received 'maybe'", "stop | rollback"],
    ),
    "negative thread pool": (
        ["trainer.inter_op_threads=-1"],
        ["trainer.inter_op_threads: received -1", "0 (TensorFlow's choice) or more"],
    ),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_mistake_is_one_message_and_exit_2(tmp_path, case):
    overrides, expected = CLI_CASES[case]
    r = train(tmp_path / "run", *overrides)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for text in expected:
        assert text in errors[0]
    assert not (tmp_path / "run").exists(), "a refused run creates nothing"
    assert "_schema'" not in errors[0].partition("allowed:")[2], "schemas are not options"


def test_help_lists_every_option_of_every_group_and_no_schema(tmp_path):
    """`python -m trainer --help`: the options are the YAML files of conf/ (not the
    schemas Hydra keeps beside them), then the composed config; nothing is written."""
    from trainer.config import CONF_DIR, group_options

    r = run_cli("trainer", "--help", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "_schema" not in r.stdout, r.stdout
    groups = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir())
    for group in [g for g in groups if g != "verify"]:  # (verify: scripts/verify_resume.py's)
        assert f"\n{group}: {', '.join(group_options(group))}\n" in r.stdout, (group, r.stdout)
    assert "\nverify: default" not in r.stdout, r.stdout
    assert "max_steps: 1000" in r.stdout  # the composed config
    assert list(tmp_path.iterdir()) == [], "help writes nothing"


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = train(blocker / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"hydra.run.dir: received '{blocker / 'run'}'" in r.stderr
    assert "is a file, not a directory" in r.stderr


def test_read_only_output_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True
    )
    if r.returncode:
        pytest.skip("cannot mount here (not root?)")
    try:
        r = train(ro / "run")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "Read-only file system" in r.stderr and "hydra.run.dir" in r.stderr
    finally:
        subprocess.run(["umount", "-l", str(ro)])


def _tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _csv(path: Path, n_features: int, target: str = "y", n: int = 120) -> Path:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, n_features))
    y = x.sum(axis=1) + 0.5
    header = ",".join([f"f{i}" for i in range(n_features)] + [target])
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=header, comments="")
    return path


def _run(compose, run_dir, *overrides) -> int:
    from trainer import app

    return app.run(compose(["trainer.max_steps=4", "checkpoint.every=2", *overrides]), str(run_dir))


def test_data_mistakes(tmp_path, compose, capsys):
    cases = [
        (["data=csv", f"data.path={tmp_path / 'nope.csv'}", "data.target=y"], "no such file"),
        (["data=csv", f"data.path={tmp_path}", "data.target=y"], "no such file"),
        (
            ["data=csv", f"data.path={_csv(tmp_path / 'a.csv', 3)}", "data.target=price"],
            "data.target: received 'price'",
        ),
    ]
    binary = tmp_path / "bin.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    cases.append((["data=csv", f"data.path={binary}", "data.target=y"], "data.path"))
    for overrides, expected in cases:
        assert _run(compose, tmp_path / "run", *overrides) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err


def test_resume_or_init_from_with_data_that_does_not_fit(tmp_path, compose, capsys):
    """Same config keys, another CSV with another feature count: refused on resume and on
    init_from, naming data.path and the shapes; the run directory is unchanged."""
    a, b = _csv(tmp_path / "a.csv", 4), _csv(tmp_path / "b.csv", 6)
    run = tmp_path / "run"
    assert _run(compose, run, "data=csv", f"data.path={a}", "data.target=y") == 0
    capsys.readouterr()
    before = _tree(run)
    assert _run(compose, run, "data=csv", f"data.path={b}", "data.target=y") == 2
    err = capsys.readouterr().err
    assert f"data.path: received '{b}'" in err and "feature_shape [4] -> [6]" in err, err
    assert _tree(run) == before
    other = tmp_path / "other"
    assert (
        _run(
            compose,
            other,
            "data=csv",
            f"data.path={b}",
            "data.target=y",
            f"trainer.init_from={run}",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "trainer.init_from: received" in err and "does not fit" in err, err


def test_resume_with_other_architecture_is_refused_and_changes_nothing(tmp_path, compose, capsys):
    run = tmp_path / "run"
    assert _run(compose, run) == 0
    capsys.readouterr()
    before = _tree(run)
    assert _run(compose, run, "model.num_units=8") == 2
    err = capsys.readouterr().err
    assert "resume refused" in err and "model.num_units: checkpoint 32 -> now 8" in err
    assert _tree(run) == before
    assert _run(compose, run, "trainer.max_steps=6", "trainer.log_every=3") == 0  # allowed changes
    shutil.rmtree(run)


def test_resume_asking_for_rng_state_the_checkpoint_lacks_is_refused(tmp_path, compose, capsys):
    """A run written with checkpoint.restore_rng=false saved no RNG state: turning it back on
    for the resume is refused with one line (it used to be a traceback from the restore)."""
    run = tmp_path / "run"
    no_rng = ["model=dropout_mlp", "checkpoint.restore_rng=false"]
    assert _run(compose, run, *no_rng, "trainer.stop_at=2") == 0
    capsys.readouterr()
    before = _tree(run)
    assert _run(compose, run, "model=dropout_mlp") == 2
    err = capsys.readouterr().err
    assert "resume refused" in err and "checkpoint.restore_rng: received true" in err, err
    assert "Traceback" not in err and _tree(run) == before
    assert _run(compose, run, *no_rng) == 0  # resuming as it was written still works


def test_restore_rng_may_change_for_a_model_without_random_state(tmp_path, compose):
    """The default model has no Dropout: its checkpoints are the same either way."""
    run = tmp_path / "run"
    assert _run(compose, run, "checkpoint.restore_rng=false", "trainer.stop_at=2") == 0
    assert _run(compose, run) == 0
