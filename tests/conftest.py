"""Shared fixtures: tiny data sets and checkpoints written to tmp folders, and paths into ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lrpcompress.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LRPC_SHARED", ROOT.parent / "shared"))

os.environ.setdefault("LRPC_PROGRESS", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))


def make_npz_folder(folder: Path, n_train: int = 40, n_test: int = 20, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        y = np.arange(n, dtype=np.int64) % 10
        np.savez(folder / f"{split}.npz", x=x, y=y)
    return folder


@pytest.fixture()
def tiny_data(tmp_path: Path) -> Path:
    return make_npz_folder(tmp_path / "data")


@pytest.fixture()
def resnet20_weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    path = tmp_path / "resnet20.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def digits():
    """A small CNN trained 3 epochs on scikit-learn's digits, with its train and test splits."""
    from lrpcompress.data import load_digits_data
    from lrpcompress.demo import train_digits_cnn

    train, test = load_digits_data(0)
    return train_digits_cnn(train, epochs=3, seed=0), train, test


def shared_or_skip(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"CI needs {p}")
        pytest.skip(f"{p} not available")
    return p
