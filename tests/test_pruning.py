"""Pruning masks from scores."""

from __future__ import annotations

import pytest
import torch

from lrpcompress.errors import LrpcError
from lrpcompress.pruning import PruneConfig, apply_masks_, prune_masks, sparsity_of


def test_paper_rule_removes_nonpositive():
    s = {"a": torch.tensor([1.0, 0.0, -2.0, 3.0])}
    assert prune_masks(s, PruneConfig("nonpositive"))["a"].tolist() == [True, False, False, True]


def test_fraction_global_and_per_layer():
    s = {"a": torch.arange(10.0), "b": torch.arange(10.0) * 100 + 100}
    g = prune_masks(s, PruneConfig("fraction", 0.5, normalize=False))
    assert g["a"].sum() == 0 and g["b"].sum() == 10
    layer = prune_masks(s, PruneConfig("fraction", 0.5, scope="layer"))
    assert layer["a"].sum() == 5 and layer["b"].sum() == 5
    assert sparsity_of(layer) == pytest.approx(0.5)
    norm = prune_masks(s, PruneConfig("fraction", 0.5, normalize=True))
    assert norm["a"].sum() == norm["b"].sum() == 5


def test_ties_are_deterministic():
    s = {"a": torch.zeros(7)}
    m1 = prune_masks(s, PruneConfig("fraction", 0.4))
    m2 = prune_masks(s, PruneConfig("fraction", 0.4))
    assert torch.equal(m1["a"], m2["a"]) and int(m1["a"].sum()) == 4


def test_apply_masks_zeroes_weights():
    lin = torch.nn.Linear(3, 2)
    apply_masks_(lin, {"weight": torch.tensor([[True, False, True], [False, False, True]])})
    assert lin.weight[0, 1] == 0 and lin.weight[1, 0] == 0 and lin.weight[0, 0] != 0


def test_config_validation():
    with pytest.raises(LrpcError, match="sparsity"):
        PruneConfig("fraction", 1.5)
    with pytest.raises(LrpcError, match="criterion"):
        PruneConfig("weird")
