"""Pruning: masks from scores (pure functions) and applying them to a model.

Criteria: the paper's literal rule (remove every weight whose score is <= 0) and removing a
fraction of the lowest-scoring weights, ranked globally or within each layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn

from .errors import LrpcError

CRITERIA = ("none", "nonpositive", "fraction")
SCOPES = ("global", "layer")


@dataclass(frozen=True)
class PruneConfig:
    """``criterion``: none | nonpositive | fraction; ``sparsity``: fraction of weights removed (for fraction);
    ``scope``: rank globally or per layer; ``normalize``: divide each layer's scores by their mean |score|
    before a global ranking, so layers with differently scaled scores compete fairly."""

    criterion: str = "none"
    sparsity: float = 0.0
    scope: str = "global"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise LrpcError(f"unknown pruning criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.scope not in SCOPES:
            raise LrpcError(f"unknown pruning scope {self.scope!r}; choose global or layer")
        if not 0.0 <= self.sparsity < 1.0:
            raise LrpcError(f"sparsity must be in [0, 1), got {self.sparsity}")


def prune_masks(scores: Mapping[str, torch.Tensor], config: PruneConfig) -> dict[str, torch.Tensor]:
    """Boolean keep-masks, one per scored tensor. Higher score = more important."""
    if config.criterion == "none" or (config.criterion == "fraction" and config.sparsity == 0):
        return {k: torch.ones(v.shape, dtype=torch.bool) for k, v in scores.items()}
    if config.criterion == "nonpositive":
        return {k: v > 0 for k, v in scores.items()}
    if config.scope == "layer":
        out = {}
        for k, v in scores.items():
            n_drop = int(round(config.sparsity * v.numel()))
            out[k] = _keep_top(v.reshape(-1).double(), v.numel() - n_drop).reshape(v.shape)
        return out
    flat = []
    for v in scores.values():
        v = v.reshape(-1).double()
        if config.normalize:
            v = v / v.abs().mean().clamp(min=1e-30)
        flat.append(v)
    allv = torch.cat(flat)
    keep = _keep_top(allv, allv.numel() - int(round(config.sparsity * allv.numel())))
    out, i = {}, 0
    for k, v in scores.items():
        out[k] = keep[i: i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def _keep_top(v: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` largest entries (ties broken by position, so the result is deterministic)."""
    mask = torch.zeros(v.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.argsort(v, descending=True, stable=True)
        mask[order[:k]] = True
    return mask


def sparsity_of(masks: Mapping[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def apply_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned weights of ``model`` in place (``masks`` keyed by parameter name)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, m in masks.items():
            if k not in params:
                raise LrpcError(f"mask for unknown parameter {k!r}")
            params[k].mul_(m.to(params[k].dtype))
    return model
