"""Quantization numerics: pure functions on tensors, no model surgery.

A weight tensor of shape ``[C, ...]`` is viewed as ``C`` rows of ``K`` columns and cut into groups of
``group_size`` columns that never straddle rows (``group_size = K``: per output channel). Each group
has one bit-width and one float16 scale. Codes follow docs/FORMAT.md: ``(u - h) * s`` for 2..8 bits, with
``h = 2^(b-1) - 1`` on the ``symmetric`` grid (odd number of levels, zero among them; the top code unused)
or ``h = 2^(b-1) - 1/2`` on the ``midrise`` grid (all ``2^b`` codes used, no zero level: pruning supplies
the zeros); ``±s`` for 1 bit, raw float16 for 16 bits, nothing for 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from .errors import LrpcError

VALID_BITS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 16)
GRIDS = ("symmetric", "midrise")
# Clipping ratios (of the group's max-abs) the scale search tries. Deeper clipping lowers weight MSE but costs
# accuracy, at 3 bits most of all: searching down to 0.2 of max-abs at 2-3 bits (MSE-optimal there) took
# ResNet-20 at 12x from 77.71% to 29.82% (docs/FINDINGS.md). Large weights carry the function.
CLIP_RATIOS = tuple(np.round(np.linspace(1.0, 0.9, 11), 4))


def check_grid(grid: str) -> None:
    if grid not in GRIDS:
        raise LrpcError(f"unknown quantization grid {grid!r}; choose one of {', '.join(GRIDS)}")


def half_range(b, grid: str = "symmetric"):
    """Largest level magnitude ``h`` in units of the scale for 2..8 bits (works on ints, arrays, tensors)."""
    return 2 ** (b - 1) - (0.5 if grid == "midrise" else 1)


def max_code(b, grid: str = "symmetric"):
    """Largest valid code of a 2..8-bit group: ``2h`` (2^b − 2 symmetric, 2^b − 1 midrise)."""
    return 2 * half_range(b, grid)


def nearest_level(v, h, grid: str = "symmetric"):
    """The grid level nearest to ``v`` (scaled values, a tensor), clamped to ``±h`` (a number or a tensor)."""
    q = torch.floor(v) + 0.5 if grid == "midrise" else torch.round(v)
    return q.clamp(-h, h)


@dataclass(frozen=True)
class GroupLayout:
    """How a tensor is cut into groups."""

    shape: tuple[int, ...]
    group_size: int

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise LrpcError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def rows(self) -> int:
        return int(self.shape[0]) if self.shape else 1

    @property
    def cols(self) -> int:
        n = int(np.prod(self.shape)) if self.shape else 1
        return n // self.rows if self.rows else 0

    @property
    def per_row(self) -> int:
        return -(-self.cols // self.group_size)

    @property
    def n_groups(self) -> int:
        return self.rows * self.per_row

    def group_of_element(self) -> np.ndarray:
        """Group index of every element in flat row-major order."""
        r = np.repeat(np.arange(self.rows), self.cols)
        k = np.tile(np.arange(self.cols), self.rows)
        return r * self.per_row + k // self.group_size

    def to_groups(self, t: torch.Tensor, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_groups, group_size) view of ``t`` padded with ``fill``, and the validity mask."""
        t2 = t.reshape(self.rows, self.cols)
        pad = self.per_row * self.group_size - self.cols
        valid = torch.ones(self.rows, self.cols, dtype=torch.bool, device=t.device)
        if pad:
            t2 = torch.cat([t2, torch.full((self.rows, pad), fill, dtype=t2.dtype, device=t.device)], 1)
            valid = torch.cat([valid, torch.zeros(self.rows, pad, dtype=torch.bool, device=t.device)], 1)
        return t2.reshape(self.n_groups, self.group_size), valid.reshape(self.n_groups, self.group_size)

    def from_groups(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(self.rows, self.per_row * self.group_size)[:, : self.cols].reshape(self.shape)


@dataclass
class QuantTensor:
    """A pruned, group-quantized tensor: what a `.lrpc` file stores for one weight."""

    layout: GroupLayout
    bits: np.ndarray  # uint8 [n_groups]
    scales: np.ndarray  # float16 [n_groups]
    mask: np.ndarray  # bool [numel], survivors
    codes: np.ndarray  # int64 [mask.sum()], unsigned codes in flat order
    grid: str = "symmetric"  # levels of 2..8-bit groups (module docstring)
    entropy: bool = False  # the writer may entropy-code the index and the codes (rANS, format version 3)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    def element_bits(self) -> np.ndarray:
        return self.bits.astype(np.int64)[self.layout.group_of_element()]

    def dequantize(self) -> torch.Tensor:
        return dequantize_codes(self.layout, self.bits, self.scales, self.mask, self.codes, self.grid)

    def payload_bits(self) -> int:
        return int(self.element_bits()[self.mask].sum())


def dequantize_codes(layout: GroupLayout, bits: np.ndarray, scales: np.ndarray, mask: np.ndarray,
                     codes: np.ndarray, grid: str = "symmetric") -> torch.Tensor:
    """Rebuild the float32 tensor (pure; used by the writer and the reader alike)."""
    numel = int(np.prod(layout.shape)) if layout.shape else 1
    out = np.zeros(numel, dtype=np.float32)
    if codes.size:
        eb = bits.astype(np.int64)[layout.group_of_element()][mask]
        s = scales.astype(np.float32)[layout.group_of_element()][mask]
        u = codes.astype(np.int64)
        vals = np.empty(u.shape, dtype=np.float32)
        one = eb == 1
        vals[one] = (2 * u[one] - 1).astype(np.float32) * s[one]
        mid = (eb >= 2) & (eb <= 8)
        h = half_range(eb[mid].astype(np.float32), grid).astype(np.float32)
        vals[mid] = (u[mid].astype(np.float32) - h) * s[mid]  # u - h is exact: small ints or halves
        half = eb == 16
        vals[half] = u[half].astype(np.uint16).view(np.float16).astype(np.float32)
        out[mask] = vals
    return torch.from_numpy(out.reshape(layout.shape))


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(max=65504.0).to(torch.float16).to(torch.float32)


def quantize_bits(groups: torch.Tensor, valid: torch.Tensor, b: int, search_clip: bool = True,
                  grid: str = "symmetric") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize every group at ``b`` bits on ``grid``. Returns (codes, float16-exact scales, dequantized values).

    ``valid`` marks the elements that are stored (survivors); the scale minimises their squared error
    over a grid of clipping ratios (``search_clip``) or uses the max-abs scale.
    """
    g = torch.where(valid, groups, torch.zeros_like(groups)).float()
    n = g.shape[0]
    if b == 0:
        return torch.zeros_like(g, dtype=torch.long), torch.zeros(n), torch.zeros_like(g)
    if b == 16:
        h = g.clamp(-65504, 65504).to(torch.float16)
        codes = torch.from_numpy(h.numpy().view(np.uint16).astype(np.int64))
        return codes, torch.zeros(n), h.float()
    if b == 1:
        cnt = valid.sum(1).clamp(min=1)
        s = _fp16(g.abs().sum(1) / cnt)
        codes = (g >= 0).long()
        return codes, s, (2 * codes - 1).float() * s[:, None]
    h = half_range(b, grid)
    amax = g.abs().amax(1)
    best_err = torch.full((n,), float("inf"))
    best_s = _fp16(amax / h)
    for r in (CLIP_RATIOS if search_clip else (1.0,)):
        s = _fp16(amax * float(r) / h)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = nearest_level(g / safe[:, None], h, grid)
        err = ((q * s[:, None] - g) ** 2 * valid).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    safe = torch.where(best_s > 0, best_s, torch.ones_like(best_s))
    q = nearest_level(g / safe[:, None], h, grid)
    return (q + h).long(), best_s, q * best_s[:, None]


def group_errors(weight: torch.Tensor, mask: torch.Tensor, layout: GroupLayout, bit_options: tuple[int, ...],
                 importance: torch.Tensor | None = None, search_clip: bool = True,
                 grid: str = "symmetric") -> dict[int, torch.Tensor]:
    """Importance-weighted squared error ``Σ imp·(w - Q_b(w))²`` of every group at each bit-width.

    Pruned elements count as set to zero at every width; ``importance`` defaults to 1 (plain MSE).
    """
    return group_errors_and_rates(weight, mask, layout, bit_options, importance, search_clip, grid)[0]


def group_errors_and_rates(weight: torch.Tensor, mask: torch.Tensor, layout: GroupLayout,
                           bit_options: tuple[int, ...], importance: torch.Tensor | None = None,
                           search_clip: bool = True, grid: str = "symmetric", entropy: bool = False,
                           hessian: torch.Tensor | None = None,
                           candidates: Mapping[int, QuantTensor] | None = None,
                           ) -> tuple[dict[int, torch.Tensor], dict[int, np.ndarray]]:
    """:func:`group_errors` and, per bit-width, the bits each group's surviving codes take: ``b`` per code,
    or with ``entropy`` their rANS cost under the table of the whole tensor quantized at ``b`` (the table
    the file would store if every group had that width; a subset coded with its own table costs no more
    than this estimate, up to the table and the lanes' states).

    With ``hessian`` (one group per row only) the rounding is GPTQ's (:func:`gptq_candidates`, or the given
    ``candidates``) and a row's error is its output error ``(√imp ⊙ d)ᵀ H (√imp ⊙ d)`` with ``d = w − q``: the
    importance then should not carry the input power again (``H``'s diagonal is that power)."""
    from .entropy import code_lengths, normalize_freqs

    if hessian is not None:
        if candidates is None:
            candidates = gptq_candidates(weight, mask, layout, bit_options, hessian, search_clip, grid)
        return _output_errors_and_rates(weight, {b: candidates[b] for b in bit_options}, hessian, importance,
                                        entropy)
    groups, valid = layout.to_groups(weight.detach().float())
    mgroups, _ = layout.to_groups(mask.float())
    imp = layout.to_groups(importance.float())[0] if importance is not None else valid.float()
    imp = imp * valid
    keep = valid & (mgroups > 0)
    survivors = keep.sum(1).numpy().astype(np.float64)
    pruned_err = (groups ** 2 * imp * ~keep).sum(1)
    errors, rates = {}, {}
    for b in bit_options:
        codes, _, deq = quantize_bits(groups, keep, b, search_clip, grid)
        errors[b] = (((deq - groups) ** 2) * imp * keep).sum(1).double() + pruned_err.double()
        if entropy and 1 <= b <= 8 and survivors.sum() > 0:
            c = codes.numpy()
            k = keep.numpy()
            lengths = code_lengths(normalize_freqs(np.bincount(c[k], minlength=1 << b)))
            rates[b] = np.where(k, lengths[c.clip(0, (1 << b) - 1)], 0.0).sum(1)
        else:
            rates[b] = survivors * b
    return errors, rates


def _output_errors_and_rates(weight: torch.Tensor, candidates: Mapping[int, QuantTensor], hessian: torch.Tensor,
                             importance: torch.Tensor | None,
                             entropy: bool) -> tuple[dict[int, torch.Tensor], dict[int, np.ndarray]]:
    from .entropy import code_lengths, normalize_freqs

    lay = next(iter(candidates.values())).layout
    rows, cols = lay.rows, lay.cols
    w = weight.detach().float().reshape(rows, cols)
    root = importance.detach().double().reshape(rows, cols).sqrt() if importance is not None else 1.0
    H = hessian.detach().double()
    row_of = np.repeat(np.arange(rows), cols)
    errors, rates = {}, {}
    for b, qt in candidates.items():
        d = (w - qt.dequantize().reshape(rows, cols)).double() * root
        errors[b] = (d @ H * d).sum(1)
        if entropy and 1 <= b <= 8 and qt.codes.size:
            lengths = code_lengths(normalize_freqs(np.bincount(qt.codes, minlength=1 << b)))[qt.codes]
            rates[b] = np.bincount(row_of[qt.mask], weights=lengths, minlength=rows)
        else:
            rates[b] = qt.mask.reshape(rows, cols).sum(1).astype(np.float64) * b
    return errors, rates


def quantize_tensor(weight: torch.Tensor, bits: np.ndarray | int, group_size: int | None = None,
                    mask: torch.Tensor | None = None, search_clip: bool = True,
                    grid: str = "symmetric", entropy: bool = False) -> QuantTensor:
    """Quantize ``weight`` with per-group ``bits`` (an int for all groups) on ``grid``; ``mask`` marks
    survivors; ``entropy`` lets the writer entropy-code the result."""
    check_grid(grid)
    shape = tuple(weight.shape)
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    layout = GroupLayout(shape, group_size or cols)
    bits_arr = np.full(layout.n_groups, bits, dtype=np.int64) if np.isscalar(bits) else np.asarray(bits, np.int64)
    if bits_arr.shape != (layout.n_groups,):
        raise LrpcError(f"need {layout.n_groups} bit-widths for shape {shape}, got {bits_arr.shape}")
    bad = sorted(set(bits_arr.tolist()) - set(VALID_BITS))
    if bad:
        raise LrpcError(f"bit-widths must be 1..8 (or 0 for pruned groups, 16 for float16), got {bad}")
    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool)
    groups, valid = layout.to_groups(weight.detach().float())
    mgroups, _ = layout.to_groups(mask.to(torch.bool).float())
    keep = valid & (mgroups > 0) & torch.from_numpy(bits_arr > 0)[:, None]
    codes = torch.zeros(groups.shape, dtype=torch.long)
    scales = torch.zeros(layout.n_groups)
    for b in sorted(set(bits_arr.tolist()) - {0}):
        rows = torch.from_numpy(bits_arr == b)
        c, s, _ = quantize_bits(groups[rows], keep[rows], b, search_clip, grid)
        codes[rows] = c
        scales[rows] = s
    flat_keep = layout.from_groups(keep).reshape(-1).numpy().astype(bool)
    flat_codes = layout.from_groups(codes).reshape(-1).numpy()
    return QuantTensor(layout, bits_arr.astype(np.uint8), scales.numpy().astype(np.float16), flat_keep,
                       flat_codes[flat_keep].astype(np.int64), grid, entropy)


def requantize(w: torch.Tensor, qt: QuantTensor) -> QuantTensor:
    """Codes of ``w`` under ``qt``'s fixed bits, scales, mask and grid."""
    lay = qt.layout
    g, _ = lay.to_groups(w.detach().float())
    b = torch.from_numpy(qt.bits.astype(np.int64))[:, None]
    s = torch.from_numpy(qt.scales.astype(np.float32))[:, None]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    h = half_range(b.clamp(min=1).float(), qt.grid).clamp(min=0.5)
    mid = nearest_level(g / safe, h, qt.grid) + h
    one = (g >= 0).long()
    half = torch.from_numpy(g.clamp(-65504, 65504).half().numpy().view(np.uint16).astype(np.int64))
    codes = torch.where(b == 1, one, mid.long())
    codes = torch.where(b == 16, half, codes)
    flat = lay.from_groups(codes).reshape(-1).numpy()
    return QuantTensor(lay, qt.bits.copy(), qt.scales.copy(), qt.mask.copy(), flat[qt.mask].astype(np.int64),
                       qt.grid, qt.entropy)


def _gptq(W: torch.Tensor, H: torch.Tensor, bits: torch.Tensor, scales: torch.Tensor, keep: torch.Tensor,
          grid: str, damp: float, block: int) -> torch.Tensor:
    """GPTQ's column loop on ``[R, cols]`` float64 weights with per-element quantizers; returns the values."""
    cols = W.shape[1]
    W = W.clone()
    H = H.detach().double().clone()
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    H += damp * float(torch.diag(H).mean()) * torch.eye(cols, dtype=H.dtype)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    W, bits, scales, keep = W[:, perm], bits[:, perm], scales[:, perm], keep[:, perm]
    H = H[perm][:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    # the decoder's arithmetic per element, prepared once: level = clamp(round(w / s), ±h), value = level · s
    inv = torch.where(scales > 0, 1.0 / torch.where(scales > 0, scales, torch.ones_like(scales)), torch.zeros_like(scales))
    h = half_range(bits.clamp(min=1).double(), grid).clamp(min=0.5)
    live = (keep & (bits > 0)).double()
    one, f16 = bits == 1, bits == 16
    has_one, has_f16 = one.any(0).tolist(), f16.any(0).tolist()
    Q = torch.zeros_like(W)
    for i0 in range(0, cols, block):
        i1 = min(i0 + block, cols)
        Wb = W[:, i0:i1].clone()
        Eb = torch.zeros_like(Wb)
        for j in range(i1 - i0):
            i = i0 + j
            w = Wb[:, j]
            v = w * inv[:, i]
            lev = (torch.floor(v) + 0.5 if grid == "midrise" else torch.round(v))
            q = torch.minimum(torch.maximum(lev, -h[:, i]), h[:, i]) * scales[:, i]
            if has_one[i]:
                q = torch.where(one[:, i], torch.where(w >= 0, scales[:, i], -scales[:, i]), q)
            if has_f16[i]:
                q = torch.where(f16[:, i], w.clamp(-65504, 65504).half().double(), q)
            q = q * live[:, i]
            Q[:, i] = q
            e = (w - q) / U[i, i]
            Wb[:, j:] -= e[:, None] * U[i, i:i1][None, :]
            Eb[:, j] = e
        W[:, i1:] -= Eb @ U[i0:i1, i1:]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out


def _element_quantizer(qt: QuantTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qt``'s bits, scales (float64) and survivors per element, as ``[rows, cols]``."""
    lay = qt.layout
    el = lay.group_of_element().reshape(lay.rows, lay.cols)
    return (torch.from_numpy(qt.bits.astype(np.int64)[el]), torch.from_numpy(qt.scales.astype(np.float64)[el]),
            torch.from_numpy(qt.mask.reshape(lay.rows, lay.cols)))


def gptq_round(weight: torch.Tensor, qt: QuantTensor, hessian: torch.Tensor, damp: float = 0.01,
               block: int = 128) -> QuantTensor:
    """Error-compensating rounding (GPTQ, Frantar et al. 2023; OBQ for CNNs, Frantar & Alistarh 2022).

    Keeps ``qt``'s bit-widths, scales, survivor mask and grid and chooses new codes for ``weight`` (its
    ``[rows, cols]`` view) that minimise the layer's output error ``Σ_rows (w − q)ᵀ H (w − q)`` greedily:
    columns are rounded one at a time, most active input first, and each rounding error is spread over the
    columns not yet rounded through the inverse Hessian. ``hessian`` is ``E[x xᵀ]`` over the layer's
    inputs (``[cols, cols]``; for a convolution, its unfolded patches). Pruned weights are set to zero and
    their error compensated like any other. ``damp`` × mean(diag H) is added to the diagonal for stability.
    Rows are independent: each row's result depends only on that row, ``H`` and its quantizer.
    """
    return gptq_round_many(weight, [qt], hessian, damp, block)[0]


def gptq_round_many(weight: torch.Tensor, qts: list[QuantTensor], hessian: torch.Tensor, damp: float = 0.01,
                    block: int = 128) -> list[QuantTensor]:
    """:func:`gptq_round` of one weight under several quantizers (e.g. every candidate bit-width) in one pass:
    rows are independent, so the quantizers' rows are stacked and share one factorisation of ``H``."""
    lay = qts[0].layout
    rows, cols = lay.rows, lay.cols
    if tuple(hessian.shape) != (cols, cols):
        raise LrpcError(f"GPTQ needs a {cols}x{cols} Hessian for weight {tuple(weight.shape)}, "
                        f"got {tuple(hessian.shape)}")
    W = weight.detach().reshape(1, rows, cols).double().expand(len(qts), rows, cols).reshape(-1, cols)
    bits, scales, keep = (torch.cat(t) for t in zip(*(_element_quantizer(qt) for qt in qts)))
    Q = _gptq(W, hessian, bits, scales, keep, qts[0].grid, damp, block).float()
    return [requantize(Q[k * rows:(k + 1) * rows].reshape(lay.shape), qt) for k, qt in enumerate(qts)]


def gptq_candidates(weight: torch.Tensor, mask: torch.Tensor, layout: GroupLayout, bit_options,
                    hessian: torch.Tensor, search_clip: bool = True, grid: str = "symmetric",
                    entropy: bool = False) -> dict[int, QuantTensor]:
    """``weight`` rounded by GPTQ with every row at each width of ``bit_options`` (one group per output channel;
    scales from the clip search, as :func:`quantize_tensor`'s), in one pass. GPTQ's rows are independent, so
    any per-row mix of these widths is a row-wise pick of them: :func:`compose_rows`."""
    if layout.per_row != 1:
        raise LrpcError("output errors under a Hessian need one group per output channel (group_size=None)")
    qts = {b: quantize_tensor(weight, b, None, mask, search_clip, grid, entropy) for b in bit_options}
    rounded = [b for b in qts if b > 0]
    if rounded:
        qts.update(zip(rounded, gptq_round_many(weight, [qts[b] for b in rounded], hessian)))
    return qts


def compose_rows(candidates: Mapping[int, QuantTensor], bits: np.ndarray) -> QuantTensor:
    """The tensor whose row ``r`` is ``candidates[bits[r]]``'s row ``r`` (:func:`gptq_candidates`): what
    :func:`gptq_round` gives at those mixed widths, without rounding again."""
    first = next(iter(candidates.values()))
    lay = first.layout
    rows, cols = lay.rows, lay.cols
    bits = np.asarray(bits, dtype=np.int64)
    codes = np.zeros((rows, cols), np.int64)
    keep = np.zeros((rows, cols), bool)
    scales = np.zeros(rows, np.float16)
    for b in np.unique(bits).tolist():
        qt, sel = candidates[b], bits == b
        full = np.zeros(rows * cols, np.int64)
        full[qt.mask] = qt.codes
        codes[sel] = full.reshape(rows, cols)[sel]
        keep[sel] = qt.mask.reshape(rows, cols)[sel]
        scales[sel] = qt.scales[sel]
    flat = keep.reshape(-1)
    return QuantTensor(lay, bits.astype(np.uint8), scales, flat, codes.reshape(-1)[flat], first.grid, first.entropy)
