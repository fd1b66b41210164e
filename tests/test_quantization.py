"""Quantization numerics against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrpcompress.errors import LrpcError
from lrpcompress.quantization import GroupLayout, quantize_bits, quantize_tensor


def test_group_layout_never_straddles_rows():
    lay = GroupLayout((2, 5), 2)
    assert lay.per_row == 3 and lay.n_groups == 6
    assert lay.group_of_element().tolist() == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]
    t = torch.arange(10.0).reshape(2, 5)
    g, valid = lay.to_groups(t)
    assert torch.equal(lay.from_groups(g), t)
    assert valid.sum() == 10


@pytest.mark.parametrize("b", [2, 3, 4, 8])
def test_symmetric_levels_and_error_bound(b):
    torch.manual_seed(0)
    w = torch.randn(6, 50)
    q = quantize_tensor(w, b, search_clip=False)
    deq = q.dequantize()
    qmax = 2 ** (b - 1) - 1
    s = torch.from_numpy(q.scales.astype(np.float32))[:, None]
    levels = deq / s
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.abs().max() <= qmax
    assert q.codes.max() <= 2 ** b - 2
    # max-abs scale (rounded to float16): rounding error at most half a step, plus the fp16 scale rounding
    assert torch.all((deq - w).abs() <= s / 2 + w.abs() * 2e-3 + 1e-6)


def test_one_bit_is_sign_times_mean_abs():
    w = torch.tensor([[1.0, -3.0, 2.0, -2.0]])
    q = quantize_tensor(w, 1)
    assert torch.equal(q.dequantize(), torch.tensor([[2.0, -2.0, 2.0, -2.0]]))


def test_sixteen_bit_is_float16_and_zero_bits_prune():
    w = torch.tensor([[0.1, -7.25], [3.0, 4.0]])
    q = quantize_tensor(w, np.array([16, 0]))
    assert torch.equal(q.dequantize()[0], w[0].half().float())
    assert torch.equal(q.dequantize()[1], torch.zeros(2))
    assert q.mask.tolist() == [True, True, False, False]


def test_mask_zeroes_pruned_weights_and_scales_ignore_them():
    w = torch.tensor([[100.0, 1.0, -1.0, 0.5]])
    mask = torch.tensor([[False, True, True, True]])
    q = quantize_tensor(w, 4, mask=mask, search_clip=False)
    deq = q.dequantize()
    assert deq[0, 0] == 0
    assert float(q.scales[0]) == pytest.approx(1.0 / 7, rel=1e-3)


def test_clip_search_never_increases_error():
    torch.manual_seed(1)
    g = torch.randn(20, 64) * torch.rand(20, 1)
    valid = torch.ones_like(g, dtype=torch.bool)
    _, _, plain = quantize_bits(g, valid, 3, search_clip=False)
    _, _, clipped = quantize_bits(g, valid, 3, search_clip=True)
    assert torch.all(((clipped - g) ** 2).sum(1) <= ((plain - g) ** 2).sum(1) + 1e-6)


def test_invalid_bits_are_refused():
    with pytest.raises(LrpcError, match="bit-widths must be 1..8"):
        quantize_tensor(torch.ones(2, 2), 9)


@pytest.mark.parametrize("b", [2, 3, 4, 8])
def test_midrise_levels_use_every_code(b):
    torch.manual_seed(0)
    w = torch.randn(6, 400)
    q = quantize_tensor(w, b, search_clip=False, grid="midrise")
    deq = q.dequantize()
    s = torch.from_numpy(q.scales.astype(np.float32))[:, None]
    levels = deq / s
    h = 2 ** (b - 1) - 0.5
    assert torch.allclose(levels - 0.5, (levels - 0.5).round(), atol=1e-4)  # half-integers: no zero level
    assert levels.abs().max() <= h and levels.abs().min() >= 0.5 - 1e-6
    assert set(np.unique(q.codes).tolist()) == set(range(2 ** b)) if b <= 4 else q.codes.max() <= 2 ** b - 1
    # nearest level of the max-abs grid: error at most half a step (+ fp16 scale rounding)
    assert torch.all((deq - w).abs() <= s / 2 + w.abs() * 2e-3 + 1e-6)


def test_midrise_two_bits_beats_ternary_on_gaussian_weights():
    """Four levels against three at the same two bits, each with the scale search's clipping ratios."""
    torch.manual_seed(0)
    g = torch.randn(64, 256)
    valid = torch.ones_like(g, dtype=torch.bool)
    err = {grid: float(((quantize_bits(g, valid, 2, True, grid)[2] - g) ** 2).mean()) for grid in ("symmetric", "midrise")}
    assert err["midrise"] < 0.8 * err["symmetric"]
    # three bits: 8 levels still beat 7, by less
    err3 = {grid: float(((quantize_bits(g, valid, 3, True, grid)[2] - g) ** 2).mean()) for grid in ("symmetric", "midrise")}
    assert err3["midrise"] < err3["symmetric"]


def test_unknown_grid_is_a_clear_error():
    from lrpcompress.compress import QuantConfig

    with pytest.raises(LrpcError, match="choose one of symmetric, midrise"):
        QuantConfig(grid="nf4")
    with pytest.raises(LrpcError, match="unknown quantization grid"):
        quantize_tensor(torch.ones(2, 2), 2, grid="asym")
