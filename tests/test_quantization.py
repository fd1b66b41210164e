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


# ------------------------------------------------------------------ error-compensating rounding (GPTQ)

def _reference_obq(W: torch.Tensor, H: torch.Tensor, quant, damp: float = 0.01) -> torch.Tensor:
    """Optimal Brain Quantization written from its update rule (Frantar & Alistarh 2022, eq. 2-3), without
    GPTQ's Cholesky and block tricks: quantize the most active remaining input of every row, move the rest of
    the row by -(w_i - q_i) / [H⁻¹]_ii · H⁻¹[:, i], remove input i from H⁻¹ by Gaussian elimination."""
    W = W.double().clone()
    H = H.double().clone()
    H += damp * float(torch.diag(H).mean()) * torch.eye(len(H), dtype=H.dtype)
    order = torch.argsort(torch.diag(H), descending=True, stable=True).tolist()
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for i in order:
        q = quant(W[:, i], i)
        Q[:, i] = q
        W -= ((W[:, i] - q) / Hinv[i, i])[:, None] * Hinv[:, i][None, :]
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
    return Q


def _correlated_inputs(cols: int, n: int = 4000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3 + torch.rand(cols, generator=g)
    return (X.T @ X / n).double()


def _output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - Q).double()
    return float((D @ H * D).sum())


@pytest.mark.parametrize("grid", ["symmetric", "midrise"])
def test_gptq_round_matches_an_independent_obq_reference(grid):
    from lrpcompress.quantization import gptq_round

    torch.manual_seed(0)
    W = torch.randn(8, 40)
    H = _correlated_inputs(40)
    bits = np.array([2, 3, 4, 1, 3, 8, 2, 5])
    qt = quantize_tensor(W, bits, grid=grid)
    s = torch.from_numpy(qt.scales.astype(np.float64))
    h = torch.tensor([2.0 ** (b - 1) - (0.5 if grid == "midrise" else 1) for b in bits], dtype=torch.float64)

    def quant(w, i):
        b1 = torch.from_numpy(bits == 1)
        v = (w / s).clamp(-h, h)
        lev = (torch.floor(v) + 0.5 if grid == "midrise" else torch.round(v)).clamp(-h, h)
        return torch.where(b1, torch.where(w >= 0, s, -s), lev * s)

    ref = _reference_obq(W, H, quant)
    got = gptq_round(W, qt, H, block=16).dequantize().double()  # blocks smaller than the row: lazy updates tested
    assert torch.allclose(got, ref.float().double(), atol=1e-5)
    assert np.array_equal(gptq_round(W, qt, H, block=128).codes, gptq_round(W, qt, H, block=16).codes)


def test_gptq_round_keeps_the_quantizer_and_lowers_the_output_error():
    from lrpcompress.quantization import gptq_round

    torch.manual_seed(1)
    W = torch.randn(32, 72)
    mask = torch.rand(32, 72) > 0.3
    H = _correlated_inputs(72, seed=1)
    bits = np.r_[np.full(30, 3), 0, 16]
    qt = quantize_tensor(W, bits, mask=mask)
    g = gptq_round(W, qt, H)
    assert np.array_equal(g.bits, qt.bits) and np.array_equal(g.scales, qt.scales)
    assert np.array_equal(g.mask, qt.mask) and g.grid == qt.grid
    deq = g.dequantize()
    assert torch.all(deq[~mask] == 0) and torch.all(deq[30] == 0)
    # a float16 group stores float16 values (moved by the compensation of its pruned weights' error)
    assert torch.equal(deq[31], deq[31].half().float()) and not torch.equal(deq[31][mask[31]], W[31][mask[31]])
    # the removed row costs the same either way; the others lose a fifth of their error or more
    assert _output_error(W[:30], deq[:30], H) < 0.8 * _output_error(W[:30], qt.dequantize()[:30], H)


def test_gptq_round_is_nearest_rounding_when_inputs_are_uncorrelated():
    from lrpcompress.quantization import gptq_round

    torch.manual_seed(2)
    W = torch.randn(6, 30)
    qt = quantize_tensor(W, 3)
    H = torch.diag(torch.rand(30, dtype=torch.float64) + 0.5)  # no cross terms: nothing to compensate
    assert np.array_equal(gptq_round(W, qt, H).codes, qt.codes)


def test_gptq_round_refuses_a_hessian_of_the_wrong_size():
    from lrpcompress.quantization import gptq_round

    qt = quantize_tensor(torch.randn(4, 9), 3)
    with pytest.raises(LrpcError, match="9x9 Hessian"):
        gptq_round(torch.randn(4, 9), qt, torch.eye(8))


def test_unknown_rounding_is_a_clear_error():
    from lrpcompress.compress import QuantConfig

    with pytest.raises(LrpcError, match="choose one of nearest, gptq"):
        QuantConfig(rounding="adaround")


def test_gptq_round_many_is_gptq_round_per_quantizer():
    from lrpcompress.quantization import gptq_round, gptq_round_many

    torch.manual_seed(3)
    W = torch.randn(5, 27)
    H = _correlated_inputs(27, seed=3)
    qts = [quantize_tensor(W, b) for b in (1, 2, 3, 6)] + [quantize_tensor(W, np.array([0, 16, 2, 3, 4]))]
    many = gptq_round_many(W, qts, H)
    for qt, got in zip(qts, many):
        assert np.array_equal(got.codes, gptq_round(W, qt, H).codes)


def test_error_tables_under_a_hessian_are_the_output_errors_of_gptq_rounding():
    from lrpcompress.quantization import group_errors_and_rates, gptq_round

    torch.manual_seed(4)
    W = torch.randn(6, 36)
    mask = torch.rand(6, 36) > 0.2
    H = _correlated_inputs(36, seed=4)
    tilt = torch.arange(1.0, 7.0)[:, None].expand(6, 36)
    lay = GroupLayout((6, 36), 36)
    errs, rates = group_errors_and_rates(W, mask, lay, (0, 2, 3, 16), tilt, hessian=H)
    row_tilt = torch.arange(1.0, 7.0, dtype=torch.float64)
    for b in (2, 3, 16):  # float16 rows too: their pruned weights' error is compensated
        q = gptq_round(W, quantize_tensor(W, b, mask=mask), H).dequantize()
        D = (W - q).double()
        assert torch.allclose(errs[b], (D @ H * D).sum(1) * row_tilt)
        assert np.array_equal(rates[b], mask.sum(1).numpy() * b)
    assert torch.allclose(errs[0], (W.double() @ H * W.double()).sum(1) * row_tilt)  # a removed row
    with pytest.raises(LrpcError, match="one group per output channel"):
        group_errors_and_rates(W, mask, GroupLayout((6, 36), 12), (2,), hessian=H)


def test_a_row_wise_pick_of_gptq_candidates_is_gptq_at_mixed_widths():
    """GPTQ's rows are independent: the allocator's per-width results composed row by row are exactly what
    rounding the mixed allocation again gives, bytes included."""
    from lrpcompress.packing import quant_bytes
    from lrpcompress.quantization import compose_rows, gptq_candidates, gptq_round

    torch.manual_seed(5)
    W = torch.randn(9, 4, 3, 3)
    mask = torch.rand(9, 4, 3, 3) > 0.25
    H = _correlated_inputs(36, seed=5)
    lay = GroupLayout((9, 4, 3, 3), 36)
    cands = gptq_candidates(W, mask, lay, (0, 1, 2, 3, 5, 8, 16), H, grid="symmetric", entropy=True)
    bits = np.array([0, 1, 2, 3, 5, 8, 16, 3, 2])
    got = compose_rows(cands, bits)
    ref = gptq_round(W, quantize_tensor(W, bits, None, mask, entropy=True), H)
    for f in ("bits", "scales", "mask", "codes"):
        assert np.array_equal(getattr(got, f), getattr(ref, f)), f
    assert got.shape == (9, 4, 3, 3) and got.entropy and quant_bytes(got) == quant_bytes(ref)
