"""The README's example data (scripts/example_data.py) and the predict-the-mean baseline of
each: small seeded sets a newcomer can make in a second, with nothing downloaded.

- houses.csv: 600 houses, `sqft`, `rooms`, `age`, `distance` and a whole-number `price`
  (dollars) that depends on them nonlinearly, with noise;
- arrays.npz: `x` (1,000 x 8 floats on scales from 0.01 to 1,000) and `y` (one float each).
"""

from __future__ import annotations

import argparse

import numpy as np

from trainer.data.batch_ids import split_ids


def houses(n: int = 600, seed: int = 7) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    sqft = rng.integers(500, 4000, n)
    rooms = np.clip(np.round(sqft / 600 + rng.normal(0, 1, n)), 1, 8)
    age = rng.integers(0, 100, n)
    distance = rng.gamma(2.0, 4.0, n).round(1)  # km to the centre
    price = 40_000 + 110 * sqft + 9_000 * rooms - 600 * age + 260_000 * np.exp(-distance / 6)
    price = np.round(price * rng.lognormal(0, 0.08, n))
    return ["sqft", "rooms", "age", "distance", "price"], np.c_[sqft, rooms, age, distance, price]


def arrays(n: int = 1000, seed: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = np.array([0.01, 0.1, 1, 10, 100, 1000, 1, 1])
    x = rng.normal(size=(n, 8)) * scales
    z = x / scales
    y = 50 + 20 * np.tanh(z[:, 0] + z[:, 1] * z[:, 2]) + 10 * z[:, 3] - 5 * z[:, 5] ** 2
    return x.astype(np.float32), (y + rng.normal(0, 1, n)).astype(np.float32)[:, None]


def baseline(y: np.ndarray, val_fraction: float = 0.2) -> dict:
    """What predicting the training split's mean scores on the validation split: MAE in
    y's units, and the mean squared error in standardized units (the loss's scale)."""
    val, train = split_ids(len(y), val_fraction)
    mean, std = y[train].mean(axis=0), y[train].std(axis=0)
    return {
        "mae": float(np.abs(y[val] - mean).mean()),
        "standardized_mse": float((((y[val] - mean) / std) ** 2).mean()),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=".", help="directory to write houses.csv and arrays.npz into")
    args = p.parse_args(argv)
    header, table = houses()
    path = f"{args.out}/houses.csv"
    np.savetxt(path, table, fmt="%.10g", delimiter=",", header=",".join(header), comments="")
    b = baseline(table[:, -1:])
    print(
        f"wrote {path}: predicting the mean gives eval MAE {b['mae']:.0f}, eval loss {b['standardized_mse']:.3f}"
    )
    x, y = arrays()
    path = f"{args.out}/arrays.npz"
    np.savez(path, x=x, y=y)
    b = baseline(y)
    print(
        f"wrote {path}: predicting the mean gives eval MAE {b['mae']:.3f}, eval loss {b['standardized_mse']:.3f}"
    )
    return 0
