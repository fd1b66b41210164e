"""Paired tests between two compressed models measured on the same test images.

A benchmark row keeps which test images its model got right (:func:`outcomes`: packed bits, base64, so a results page
stays text); two rows of one model and test split are then compared image by image with McNemar's exact test
(:func:`mcnemar`) instead of comparing two accuracies as if they were independent. :func:`sign_test` is the same exact
binomial tail, also used over runs (which of two criteria wins each seed).
"""

from __future__ import annotations

import base64
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lrpcompress.evaluation import predictions  # noqa: E402

TIE = 0.005  # accuracies are rounded to 0.01: closer than this is the same accuracy


def outcomes(net: torch.nn.Module, data) -> tuple[float, str]:
    """Accuracy (%) on ``data`` and which of its images were right: packed bits (one per image, in order, padded to a
    byte), base64."""
    right = predictions(net, data, show_progress=False) == data.y
    return 100.0 * float(right.mean()), pack_correct(right)


def pack_correct(right: np.ndarray) -> str:
    """One bool per image, in order, as the record rows keep: packed bits (padded to a byte), base64."""
    return base64.b64encode(np.packbits(right)).decode("ascii")


def unpack_correct(packed: str) -> np.ndarray:
    """:func:`pack_correct`'s record as bools (its padding bits included: they are 0 in every record, so never discordant)."""
    return np.unpackbits(np.frombuffer(base64.b64decode(packed), dtype=np.uint8)).astype(bool)


def mcnemar(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Test images only ``a`` gets right, only ``b`` gets right, and McNemar's exact two-sided p on them."""
    if a.shape != b.shape:
        raise ValueError(f"per-image records of different test sets: {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    return only_a, only_b, sign_test(only_a, only_b)


def sign_test(ahead: int, behind: int) -> float:
    """Two-sided exact sign test: the chance of a split at least as lopsided as ``ahead`` : ``behind`` if either side
    were equally likely to win each pair (ties dropped before). With the counts of images only one of two models
    gets right, this is McNemar's exact test."""
    n = ahead + behind
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(ahead, behind) + 1))
    return min(1.0, 2 * tail / 2 ** n)


@dataclass(frozen=True)
class RunDiffs:
    """Paired differences over runs (first minus second, in points): their mean and standard error (NaN for one
    run), how many runs the first is ahead of, level with (within :data:`TIE`) and behind, the sign test over the
    runs, and the range."""

    runs: int
    mean: float
    se: float
    ahead: int
    level: int
    behind: int
    p: float
    low: float
    high: float


def run_diffs(diffs: list[float]) -> RunDiffs:
    """:class:`RunDiffs` of a non-empty list of per-run differences."""
    ahead, behind = sum(d > TIE for d in diffs), sum(d < -TIE for d in diffs)
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return RunDiffs(len(diffs), statistics.fmean(diffs), se, ahead, len(diffs) - ahead - behind, behind,
                    sign_test(ahead, behind), min(diffs), max(diffs))
