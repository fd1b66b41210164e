"""The bit allocator: budgets are met, more budget never hurts, unreachable budgets are errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrpcompress.allocation import allocate_optimal, allocate_tiers, layer_costs, weighted_error
from lrpcompress.errors import LrpcError
from lrpcompress.quantization import GroupLayout

OPTIONS = (0, 1, 2, 3, 4, 5, 6, 8)


def _tables(seed=0):
    torch.manual_seed(seed)
    out = []
    for i, shape in enumerate([(8, 27), (16, 72), (10, 16)]):
        w = torch.randn(shape) * torch.rand(shape[0], 1)
        imp = torch.rand(shape[0], 1).expand(shape).contiguous()
        out.append(layer_costs(f"l{i}", w, torch.ones(shape, dtype=torch.bool), GroupLayout(shape, shape[1]),
                               OPTIONS, imp))
    return out


def _cost(tables, bits):
    return sum(float(t.costs[np.arange(len(bits[t.name])), np.searchsorted(OPTIONS, bits[t.name])].sum())
               for t in tables)


@pytest.mark.parametrize("budget_bits", [2000, 5000, 9000, 20000])
def test_budget_is_met(budget_bits):
    tables = _tables()
    bits = allocate_optimal(tables, budget_bits)
    assert _cost(tables, bits) <= budget_bits


def test_larger_budget_never_gives_larger_weighted_error():
    tables = _tables(1)
    errs = [weighted_error(tables, allocate_optimal(tables, b)) for b in range(1500, 25000, 1500)]
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:]))
    assert errs[-1] < errs[0]


def test_importance_moves_bits_to_important_groups():
    shape = (2, 64)
    torch.manual_seed(0)
    w = torch.randn(shape)
    imp = torch.tensor([[100.0], [1.0]]).expand(shape).contiguous()
    t = layer_costs("l", w, torch.ones(shape, dtype=torch.bool), GroupLayout(shape, 64), OPTIONS, imp)
    bits = allocate_optimal([t], 64 * 8 + 48)
    assert bits["l"][0] > bits["l"][1]


def test_unreachable_budget_is_a_clear_error():
    with pytest.raises(LrpcError, match="unreachable"):
        allocate_optimal(_tables(), 10)


def test_tiers_split_by_rank():
    bits = allocate_tiers({"a": np.array([3.0, 2.0, 1.0]), "b": np.array([0.5, 4.0, 0.1])}, 4)
    assert bits["b"][1] == 5 and bits["a"][0] == 5 and bits["b"][2] == 3 and bits["b"][0] == 3
