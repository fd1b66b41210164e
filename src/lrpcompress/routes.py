"""Which structure to cut for a CPU speed-up target: whole residual blocks, channels, or both, chosen on held-out
images of the user's task.

No route wins everywhere (docs/FINDINGS.md §29, §30): on {cat, dog, horse} ResNet-44 keeps most accuracy when only
blocks go (-0.61 on the test split's three-seed mean at 1.5x against -1.75 for a 1.15x block target followed by half
the inner channels), while on {airplane, automobile, ship} ResNet-20 prefers the mixed cut (-0.90 against -1.03 for
blocks alone). A route here is a channel fraction; the blocks make up whatever speed-up the channels leave missing.
Each route is cut, timed against the input model on this CPU (batch 64, in alternation), cut again with a larger block
target when it falls short, recovered, and scored on held-out training images; the most accurate route that reached
the target is kept. Nothing is decided on the test split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .blocks import (BLOCK_COSTS, BlockCosts, BlockPruneConfig, BlockResult, measure_block_costs, prune_blocks,
                     removable_blocks)
from .data import ImageData
from .errors import LrpcError
from .evaluation import accuracy, count_macs, speed_profiles
from .models import model_device
from .recovery import RECOVERY_RECIPE, FinetuneConfig, finetune_model
from .structured import ChannelPruneConfig, StructuredResult, prune_channels

DEFAULT_ROUTES = (0.0, 0.3, 0.5)  # blocks alone; a light and a heavy channel cut, blocks making up the rest


@dataclass(frozen=True)
class RouteSearch:
    """Reach ``speedup`` (input model over cut model, in ``cost``: ``"cpu"``, time at batch 64 measured on this
    machine, or ``"macs"``) by the most accurate of several routes, each a fraction of inner channels from
    ``channel_fractions`` removed after a block cut that supplies the rest of the speed-up (0: blocks alone). The
    block targets count the same cost.

    ``blocks`` ranks blocks (its criterion, reference, samples; its ``speedup`` and ``cost`` are set per route and
    must be left unset here); ``channels`` ranks and refits channels (its ``fraction`` is set per route and must be
    0 here). ``recover`` trains each route before it is scored (``epochs=0``: scored as cut). A route timed below
    the target is cut again, the speed-up its blocks were priced at raised by the shortfall, up to ``tries`` cuts
    in all. ``repeats``: timed passes of each model per measurement."""

    speedup: float
    channel_fractions: tuple[float, ...] = DEFAULT_ROUTES
    blocks: BlockPruneConfig = field(default_factory=BlockPruneConfig)
    channels: ChannelPruneConfig = field(default_factory=lambda: ChannelPruneConfig(0.0))
    recover: FinetuneConfig = RECOVERY_RECIPE
    cost: str = "cpu"
    tries: int = 3
    repeats: int = 30

    def __post_init__(self) -> None:
        if isinstance(self.speedup, bool) or not isinstance(self.speedup, (int, float)) or not (
                1.0 < self.speedup < math.inf):
            raise LrpcError(f"the speed-up target must be a number above 1 (e.g. 1.5), got {self.speedup!r}")
        fr = self.channel_fractions
        if not isinstance(fr, tuple) or not fr:
            raise LrpcError("channel_fractions must be a non-empty tuple of fractions, e.g. (0.0, 0.3, 0.5)")
        bad = [f for f in fr if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0]
        if bad:
            raise LrpcError(f"a route's channel fraction must be in [0, 1), got {bad[0]!r}")
        if len(set(fr)) != len(fr):
            raise LrpcError(f"a channel fraction is given twice: {', '.join(f'{f:g}' for f in fr)}")
        if self.blocks.speedup is not None or self.blocks.count or self.blocks.names:
            raise LrpcError("each route sets its own block target: leave the block config's speedup, count and "
                            "names unset")
        if self.cost not in BLOCK_COSTS:
            raise LrpcError(f"unknown cost {self.cost!r}; choose one of {', '.join(BLOCK_COSTS)}")
        if self.channels.fraction != 0.0:
            raise LrpcError("each route sets its own channel fraction: leave the channel config's fraction at 0")
        if self.channels.scope == "auto":
            raise LrpcError("routes cut channels in one scope: give layer, global or macs, not auto")
        if self.tries < 1:
            raise LrpcError(f"tries must be at least 1, got {self.tries}")
        if self.repeats < 5:
            raise LrpcError(f"repeats must be at least 5 (timed passes per measurement), got {self.repeats}")


@dataclass
class RouteTrial:
    """One route as tried: its channel fraction, the block target of its last cut (None: no blocks), the blocks
    it removed, its measured speed-up, how many cuts it took, and its held-out accuracy (None when it was not
    scored: ``note`` says why)."""

    channels: float
    block_target: float | None
    removed: list[str]
    speedup: float | None
    cuts: int
    val_accuracy: float | None = None
    note: str = ""

    @property
    def eligible(self) -> bool:
        return self.val_accuracy is not None

    def as_dict(self) -> dict:
        return {"channels": self.channels,
                "block_target": None if self.block_target is None else round(self.block_target, 4),
                "removed": list(self.removed), "speedup": None if self.speedup is None else round(self.speedup, 3),
                "cuts": self.cuts, "val_accuracy": self.val_accuracy, "note": self.note}


@dataclass
class RouteChoice:
    """The chosen route's recovered model and its cuts, and every route tried (in the order of the search)."""

    model: nn.Module
    chosen: RouteTrial
    blocks: BlockResult | None
    channels: StructuredResult | None
    trials: list[RouteTrial]
    costs: BlockCosts | None


def measured_speedup(dense: nn.Module, cut: nn.Module, example: torch.Tensor, cost: str = "cpu", repeats: int = 30,
                     batch_size: int = 64) -> float:
    """How many times cheaper ``cut`` is than ``dense`` (``example``: one image): ``"cpu"``, their CPU times at
    ``batch_size``, timed in alternation; ``"macs"``, their multiply-accumulates per image (exact)."""
    if cost == "macs":
        return count_macs(dense, example[:1]) / count_macs(cut, example[:1])
    if cost != "cpu":
        raise LrpcError(f"unknown cost {cost!r}; choose cpu or macs")
    prof = speed_profiles([dense, cut], example, batch_sizes=(batch_size,), repeats=repeats)
    key = str(batch_size)
    return prof[0]["latency_ms"][key] / prof[1]["latency_ms"][key]


def shape_alike(model: nn.Module, data: ImageData, config: ChannelPruneConfig, fraction: float) -> nn.Module:
    """``model`` with ``fraction`` of its inner channels cut in ``config``'s scope and streams, but without scores,
    compensation or refit (random channels): what a real cut's speed is, at none of its cost."""
    shaped = replace(config, fraction=fraction, criterion="random", compensate=False, reconstruct=False, steps=1)
    return prune_channels(model, data, shaped, show_progress=False).model


def _cut(model: nn.Module, fit: ImageData, search: RouteSearch, fraction: float, candidates: list[str],
         costs: BlockCosts | None, speed: Callable[[nn.Module, nn.Module], float], show_progress: bool
         ) -> tuple[RouteTrial, nn.Module | None, BlockResult | None, StructuredResult | None]:
    target = search.speedup
    guess = speed(model, shape_alike(model, fit, search.channels, fraction)) if fraction > 0 else 1.0
    block_target = target / guess
    trial = RouteTrial(fraction, None, [], None, 0)
    for k in range(1, search.tries + 1):
        net, bres, cres = model, None, None
        trial.cuts = k
        if block_target > 1.0 + 1e-6:
            reach = costs.speedup(candidates) if costs is not None and candidates else 1.0
            if block_target >= reach:
                trial.note = (f"a {block_target:.2f}x block target is out of reach (all removable blocks: "
                              f"{reach:.2f}x)")
                return trial, None, None, None
            bres = prune_blocks(model, fit, replace(search.blocks, speedup=block_target, cost=search.cost),
                                show_progress, costs)
            net = bres.model
        trial.block_target = block_target if bres is not None else None
        trial.removed = list(bres.removed) if bres is not None else []
        if fraction > 0:
            cres = prune_channels(net, fit, replace(search.channels, fraction=fraction), show_progress)
            net = cres.model
        trial.speedup = speed(model, net)
        if trial.speedup >= target:
            return trial, net, bres, cres
        # raise what the blocks actually supplied (their cover overshoots the target), so the next cover is larger
        supplied = costs.speedup(bres.removed) if bres is not None and costs is not None else 1.0
        block_target = max(block_target, supplied, 1.0) * target / trial.speedup
    trial.note = f"{trial.speedup:.2f}x after {search.tries} cut{'s' if search.tries > 1 else ''}, below {target:g}x"
    return trial, None, None, None


def choose_route(model: nn.Module, fit: ImageData, val: ImageData, search: RouteSearch,
                 costs: BlockCosts | None = None, show_progress: bool = True, device: torch.device | str | None = None,
                 on_trial: Callable[[RouteTrial, nn.Module | None], None] | None = None,
                 speed: Callable[[nn.Module, nn.Module], float] | None = None) -> RouteChoice:
    """Cut ``model`` (left unchanged) along every route of ``search`` on ``fit`` (scores, refits, recovery), and keep
    the route most accurate on ``val`` (training images held out from all of that; never the test split) among those
    whose measured speed-up reaches the target; ties go to the earlier route. ``costs``: the block costs the block
    targets count (measured once here when not given). ``on_trial`` is called with each route once it is decided and
    its recovered model (None for a route that fell short; a benchmark can audit the choice on other images).
    ``speed(model, cut)``: how many times faster ``cut`` runs, e.g. timed on the deployment device (default:
    :func:`measured_speedup` in ``search.cost`` on this machine); the block targets still count ``costs``.
    LrpcError when no route reaches the target."""
    example = fit.tensor(np.arange(1), model_device(model))
    candidates = removable_blocks(model, example)
    if speed is None:
        speed = lambda dense, cut: measured_speedup(dense, cut, example, search.cost, search.repeats)  # noqa: E731
    if costs is None and candidates:
        costs = measure_block_costs(model, example, candidates, search.cost, show_progress=show_progress)
    trials: list[RouteTrial] = []
    best: RouteChoice | None = None
    for fraction in search.channel_fractions:
        trial, net, bres, cres = _cut(model, fit, search, fraction, candidates, costs, speed, show_progress)
        if net is not None:
            if search.recover.epochs:
                net = finetune_model(net, fit, search.recover, show_progress, device=device, teacher=model)
            trial.val_accuracy = round(accuracy(net, val, show_progress=False), 2)
            if best is None or trial.val_accuracy > best.chosen.val_accuracy:
                best = RouteChoice(net, trial, bres, cres, trials, costs)
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial, net)
    if best is None:
        where = "on this CPU" if search.cost == "cpu" else f"in {search.cost}"
        raise LrpcError(f"no route reached {search.speedup:g}x {where} ("
                        + "; ".join(f"channels {t.channels:g}: {t.note}" for t in trials) + "); ask for less")
    return best


__all__ = ["DEFAULT_ROUTES", "RouteChoice", "RouteSearch", "RouteTrial", "choose_route",
           "measured_speedup", "shape_alike"]
