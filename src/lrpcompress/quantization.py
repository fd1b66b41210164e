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
                           search_clip: bool = True, grid: str = "symmetric",
                           entropy: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, np.ndarray]]:
    """:func:`group_errors` and, per bit-width, the bits each group's surviving codes take: ``b`` per code,
    or with ``entropy`` their rANS cost under the table of the whole tensor quantized at ``b`` (the table
    the file would store if every group had that width; a subset coded with its own table costs no more
    than this estimate, up to the table and the lanes' states)."""
    from .entropy import code_lengths, normalize_freqs

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
