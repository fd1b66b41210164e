"""Bit allocation: choose a bit-width for every group under a byte budget.

The optimal allocator minimises the importance-weighted quantization error
``Σ_g imp·‖w_g − Q_{b_g}(w_g)‖²`` subject to ``Σ_g bits_g ≤ budget`` by Lagrangian relaxation: for a
multiplier λ every group independently picks ``argmin_b D_g(b) + λ·C_g(b)``; λ is found by bisection.
Cost ``C_g(b)`` counts the codes of the group's surviving weights (``b`` bits each, or with entropy coding
their estimated rANS cost) plus its scale (16 bits) and its entry in the bit-width table (8 bits). Width 0
removes the group (a channel, by default) entirely.
Solutions on the convex hull are monotone: a larger budget never gives a larger weighted error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from .errors import LrpcError
from .quantization import GroupLayout, QuantTensor, group_errors_and_rates

GROUP_OVERHEAD_BITS = 16 + 8


@dataclass
class LayerCosts:
    """Per-group error and cost tables of one tensor, for each candidate bit-width."""

    name: str
    layout: GroupLayout
    options: tuple[int, ...]
    errors: np.ndarray  # [n_groups, n_options]
    costs: np.ndarray  # [n_groups, n_options] in bits


def layer_costs(name: str, weight: torch.Tensor, mask: torch.Tensor, layout: GroupLayout, options: tuple[int, ...],
                importance: torch.Tensor | None, search_clip: bool = True, grid: str = "symmetric",
                entropy: bool = False, hessian: torch.Tensor | None = None,
                candidates: Mapping[int, QuantTensor] | None = None) -> LayerCosts:
    """Error and cost tables of one tensor (``hessian``: errors at the layer's output under GPTQ rounding,
    ``candidates`` the GPTQ results if already computed: :func:`~lrpcompress.quantization.group_errors_and_rates`)."""
    errs, rates = group_errors_and_rates(weight, mask, layout, options, importance, search_clip, grid, entropy,
                                         hessian, candidates)
    E = np.stack([errs[b].numpy() for b in options], 1)
    C = np.stack([rates[b] + GROUP_OVERHEAD_BITS for b in options], 1)
    return LayerCosts(name, layout, options, E, C)


def _choose(tables: list[LayerCosts], lam: float) -> tuple[list[np.ndarray], float, float]:
    picks, cost, err = [], 0.0, 0.0
    for t in tables:
        j = np.argmin(t.errors + lam * t.costs, axis=1)
        picks.append(j)
        rows = np.arange(len(j))
        cost += float(t.costs[rows, j].sum())
        err += float(t.errors[rows, j].sum())
    return picks, cost, err


def allocate_optimal(tables: list[LayerCosts], budget_bits: float) -> dict[str, np.ndarray]:
    """Bit-widths per group minimising weighted error within ``budget_bits``; error if unreachable."""
    floor = sum(float(t.costs.min(1).sum()) for t in tables)
    if budget_bits < floor:
        raise LrpcError(f"the byte budget is unreachable: the weights need at least {int(np.ceil(floor / 8))} bytes "
                        f"at the smallest bit-widths, {int(budget_bits // 8)} are left; ask for a larger file")
    picks, cost, _ = _choose(tables, 0.0)
    if cost > budget_bits:
        lo, hi = 0.0, 1.0
        while _choose(tables, hi)[1] > budget_bits:
            hi *= 4.0
            if hi > 1e300:
                break
        for _ in range(100):
            mid = (lo + hi) / 2 if hi < 1e-300 or lo == 0 else float(np.sqrt(lo * hi))
            if _choose(tables, mid)[1] > budget_bits:
                lo = mid
            else:
                hi = mid
        picks, cost, _ = _choose(tables, hi)
    return {t.name: np.asarray(t.options)[j].astype(np.int64) for t, j in zip(tables, picks)}


def weighted_error(tables: list[LayerCosts], bits: Mapping[str, np.ndarray]) -> float:
    total = 0.0
    for t in tables:
        idx = np.searchsorted(np.asarray(t.options), bits[t.name])
        total += float(t.errors[np.arange(len(idx)), idx].sum())
    return total


def allocate_tiers(ranking: Mapping[str, np.ndarray], base_bits: int, spread: int = 1,
                   fractions: tuple[float, float] = (1 / 3, 1 / 3)) -> dict[str, np.ndarray]:
    """The paper's tiered scheme: groups ranked globally by score; the top share gets ``base+spread`` bits,
    the bottom share ``base-spread``, the rest ``base``."""
    names = list(ranking)
    allv = np.concatenate([np.asarray(ranking[n], dtype=np.float64) for n in names])
    order = np.argsort(-allv, kind="stable")
    n = len(allv)
    tiers = np.full(n, base_bits, dtype=np.int64)
    top, bottom = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    tiers[order[:top]] = min(8, base_bits + spread)
    tiers[order[n - bottom:]] = max(1, base_bits - spread)
    out, i = {}, 0
    for name in names:
        k = len(ranking[name])
        out[name] = tiers[i: i + k]
        i += k
    return out
