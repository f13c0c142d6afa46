"""Data: deterministic, step-indexed streams; every source; the task decides the output size."""

import numpy as np
import pytest
from omegaconf import OmegaConf

from trainer.config import UserError
from trainer.data.memory import load_data


def data_cfg(compose, *overrides):
    return compose(list(overrides)).data


def batches(data, start, n, seed=0, bs=32):
    return [(x.numpy(), y.numpy()) for x, y, _ in data.train_dataset(bs, seed, start).take(n)]


def test_stream_is_a_function_of_seed_and_step(compose):
    data = load_data(data_cfg(compose))
    spe = data.steps_per_epoch(32)
    full = batches(data, 0, spe + 10)
    # Starting at step k (mid-epoch, at and across an epoch boundary) gives exactly the tail.
    for k in (7, spe - 1, spe, spe + 3):
        tail = batches(data, k, spe + 10 - k)
        for (xa, ya), (xb, yb) in zip(full[k:], tail, strict=True):
            assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    # An epoch draws distinct training rows (a permutation, remainder dropped); epochs differ;
    # another seed differs.
    train_rows = {r.tobytes() for r in data.x_train}
    epoch0 = np.concatenate([x for x, _ in full[:spe]])
    epoch1 = np.concatenate([x for x, _ in batches(data, spe, spe)])
    for epoch in (epoch0, epoch1):
        rows = {r.tobytes() for r in epoch}
        assert len(rows) == spe * 32 and rows <= train_rows
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(full[0][0], batches(data, 0, 1, seed=1)[0][0])


@pytest.mark.parametrize(
    "name,task,units,shape",
    [
        ("synthetic_regression", "regression", 1, (10,)),
        ("synthetic_sequence", "regression", 1, (16, 4)),
        ("digits", "classification", 10, (64,)),
    ],
)
def test_bundled_sources(compose, name, task, units, shape):
    data = load_data(data_cfg(compose, f"data={name}"))
    assert (data.task, data.output_units, data.feature_shape) == (task, units, shape)
    n = len(data.x_train) + len(data.x_val)
    assert abs(len(data.x_val) / n - 0.2) < 0.01
    again = load_data(data_cfg(compose, f"data={name}"))
    assert np.array_equal(data.x_val, again.x_val)  # the same split every time


def test_npz_and_csv_user_files(compose, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 3)).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x=x, y=x.sum(axis=1))
    np.savez(tmp_path / "cls.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    reg = load_data(data_cfg(compose, "data=npz", f"data.path={tmp_path / 'reg.npz'}"))
    cls = load_data(data_cfg(compose, "data=npz", f"data.path={tmp_path / 'cls.npz'}"))
    assert (reg.task, reg.output_units) == ("regression", 1)
    assert (cls.task, cls.output_units) == ("classification", 2)
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,price\n" + "\n".join(f"{i},{i * 2},{i * 0.5}" for i in range(60)))
    d = load_data(data_cfg(compose, "data=csv", f"data.path={csv}", "data.target=price"))
    assert d.feature_shape == (2,) and d.task == "regression"
    with pytest.raises(UserError, match="data.target: received 'cost'"):
        load_data(data_cfg(compose, "data=csv", f"data.path={csv}", "data.target=cost"))
    with pytest.raises(UserError, match="data.path: received .*no such file"):
        load_data(data_cfg(compose, "data=npz", f"data.path={tmp_path / 'missing.npz'}"))


def test_batch_larger_than_training_split_is_refused(compose):
    cfg = data_cfg(compose, "data=digits", "data.batch_size=5000")
    with pytest.raises(UserError, match="data.batch_size: received 5000"):
        load_data(cfg)
    assert OmegaConf.select(cfg, "task") == "classification"
