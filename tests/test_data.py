"""Data loading and sampling."""

from __future__ import annotations

import numpy as np
import pytest

from lrpcompress.data import (load_data, load_digits_data, parse_classes, sample_indices, split_train_val)
from lrpcompress.errors import LrpcError

from conftest import make_npz_folder, shared_or_skip


def test_npz_folder_and_normalisation(tmp_path):
    d = load_data(make_npz_folder(tmp_path / "d"), "train")
    x = d.tensor(np.arange(4))
    assert x.shape == (4, 3, 32, 32) and x.dtype.is_floating_point
    assert len(d) == 40 and d.num_classes == 10


def test_sampling_is_seeded_and_balanced():
    y = np.repeat(np.arange(10), 100)
    a, b = sample_indices(1000, 200, 3, y), sample_indices(1000, 200, 3, y)
    assert np.array_equal(a, b)
    assert np.all(np.bincount(y[a], minlength=10) == 20)
    assert not np.array_equal(a, sample_indices(1000, 200, 4, y))
    with pytest.raises(LrpcError, match="positive"):
        sample_indices(10, 0, 0)


def test_split_train_val_is_disjoint(tmp_path):
    d = load_data(make_npz_folder(tmp_path / "d", n_train=100), "train")
    fit, val = split_train_val(d, 20, 0)
    assert len(fit) == 80 and len(val) == 20


def test_parse_classes():
    names = ("airplane", "automobile", "bird")
    assert parse_classes("0,2", names) == [0, 2]
    assert parse_classes("bird,airplane", names) == [2, 0]
    with pytest.raises(LrpcError, match="unknown class"):
        parse_classes("zebra,bird", names)
    with pytest.raises(LrpcError, match="twice"):
        parse_classes("0,0", names)


def test_restrict_classes_relabels(tmp_path):
    d = load_data(make_npz_folder(tmp_path / "d"), "train").restrict_classes([8, 1])
    assert set(d.y.tolist()) == {0, 1} and d.classes == ("ship", "automobile")


def test_digits_ship_with_sklearn():
    train, test = load_digits_data(0)
    assert len(train) + len(test) == 1797 and train.x.shape[1:] == (8, 8, 1)


def test_shared_cifar_jpeg():
    shared_or_skip("data", "cifar10-jpeg", "test.npz")
    from conftest import SHARED

    d = load_data(SHARED / "data" / "cifar10-jpeg", "test")
    assert len(d) == 10000 and np.all(np.bincount(d.y) == 1000)


def test_image_folder_source(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = tmp_path / "imgs" / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    d = load_data(tmp_path / "imgs", "test")
    assert d.x.shape == (6, 32, 32, 3) and d.classes == ("cat", "dog") and sorted(d.y.tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(LrpcError, match="neither"):
        load_data(tmp_path / "imgs" / "train" / "cat", "train")
