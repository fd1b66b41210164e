"""Depth pruning: whole residual blocks replaced by their shortcut.

A channel cut leaves every layer narrower, and a CPU runs narrow convolutions below their share of the MACs
(docs/FINDINGS.md §12). Removing a whole block whose output has its input's shape (a residual block: its shortcut
then carries the signal alone) keeps every remaining layer at full width, so the speed follows the MACs removed
(§14). The public verb is :func:`prune_blocks`; scores, selection and the surgery are separate functions, so a
benchmark can rank with one criterion and cut with another.

Criteria (low score = removed first), each summed over ``samples`` reference images of the data given, so a
class subset ranks by what those classes use:

- ``norm``: ``‖out − in‖ / ‖in‖`` per image, how much the block changes its input (label-free magnitude);
- ``lrp``: ``|Σ (out − in) · g|`` per image with ``g`` the LRP relevance per unit of the block's output from the
  true class (:func:`~lrpcompress.relevance.removal_relevance`): the first-order change of that relevance when
  the block becomes the identity;
- ``taylor``: the same with the plain gradient of the true-class logit;
- (``norm``, ``lrp`` and ``taylor`` with ``reference="mean"``, the default of ``lrp`` and ``taylor``: on the change
  minus its mean per channel, the part a constant shift cannot replace;)
- ``l1``: mean ``|w|`` of the block's weights with BatchNorm folded in (no data);
- ``sensitivity``: the cross-entropy increase on the reference images when the block alone is removed;
- ``random``: seeded uniform scores.

Budgets: ``count`` blocks (the lowest scores), or a ``speedup`` target. Blocks of equal MACs differ in CPU time (on
CIFAR ResNets a stage-1 block, wide maps and few channels, saves about 1.8x a stage-3 block's time; 2-4x under
glibc's default malloc: docs/FINDINGS.md §23, §26), so a count says little about speed. With ``speedup`` each block's
cost is measured (:func:`measure_block_costs`: the CPU milliseconds its removal saves at batch 64, or its MACs) and
:func:`select_by_cost` removes the set of blocks with the smallest summed score whose summed cost reaches the saving
the target needs. Summed scores do not see that
emptying a stage costs more than its blocks one at a time; ``steps`` > 1 rescores the rest on the cut model after
each share of the saving.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageData, sample_indices
from .errors import LrpcError
from .evaluation import layer_macs, steady_allocator
from .models import model_device
from .progress import progress
from .relevance import (REMOVAL_REFERENCES, RelevanceConfig, _eval_out_of_place, _find_folds, _folded_params,
                        _per_channel, removal_relevance)
from .rules import WEIGHTED

BLOCK_CRITERIA = ("norm", "lrp", "taylor", "l1", "sensitivity", "random")
BLOCK_COSTS = ("cpu", "macs")  # what a speedup target counts: CPU time at batch 64, or multiply-accumulates
COST_UNITS = {"cpu": "ms", "macs": "MACs"}  # the unit of each cost in BlockCosts


@dataclass(frozen=True)
class BlockPruneConfig:
    """Which residual blocks to remove: the ``count`` lowest-scored by ``criterion``, or the ``names`` given.

    ``spread``: at most ceil(count / stages) blocks from one stage (a stage is the container holding the blocks);
    by default the lowest scores are taken wherever they are. ``reference="mean"`` measures the ``norm``, ``lrp``
    and ``taylor`` criteria on the block's change minus its mean change per channel (the part a constant shift
    cannot replace; recovery training re-learns shifts) instead of the whole change (``"zero"``); unset, it is
    ``"mean"`` for ``lrp`` and ``taylor`` (plain LRP ranks a stage-3 block low and loses 2-3 points after recovery
    on ResNet-20; from the mean it is level with ``norm``, docs/FINDINGS.md §15) and ``"zero"`` otherwise. ``composite`` / ``start`` / ``epsilon`` set the
    ``lrp`` criterion's relevance; ``samples`` reference images (class-balanced, seeded) feed every data-based
    criterion. ``speedup`` (instead of ``count`` or ``names``): remove the blocks of smallest summed score whose
    measured ``cost`` (``"cpu"``: milliseconds at batch 64 on this machine; ``"macs"``) makes the model that many
    times cheaper; no ``spread``. ``steps`` > 1 removes the blocks in that many rounds, rescoring the rest on the
    model cut so far: round r removes ``count`` * (r+1) // ``steps`` blocks in all, or with a ``speedup`` target it
    plans the cheapest-scored cut for all the saving still missing and removes that plan's lowest-scored blocks until
    the saving reaches (r+1) / ``steps`` of what the target needs (the last round: the whole plan; the costs measured
    once, on the dense model).
    """

    count: int = 0
    criterion: str = "norm"
    names: tuple[str, ...] = ()
    spread: bool = False
    reference: str | None = None
    composite: str = "epsilon_plus"
    start: str = "true"
    epsilon: float = 1e-6
    samples: int = 512
    batch_size: int = 64
    seed: int = 0
    steps: int = 1
    speedup: float | None = None
    cost: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise LrpcError(f"the number of blocks to remove must be an int >= 0, got {self.count!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise LrpcError(f"steps must be an int >= 1, got {self.steps!r}")
        if self.cost not in BLOCK_COSTS:
            raise LrpcError(f"unknown block cost {self.cost!r}; choose one of {', '.join(BLOCK_COSTS)}")
        if self.speedup is None:
            if self.cost != "cpu":
                raise LrpcError("a block cost applies to a speedup target: set speedup (e.g. 2.0) or leave cost as cpu")
        else:
            if isinstance(self.speedup, bool) or not isinstance(self.speedup, (int, float)) or not (
                    1.0 < self.speedup < math.inf):
                raise LrpcError(f"the block speedup target must be a number above 1 (e.g. 1.5), got {self.speedup!r}")
            if self.count or self.names:
                raise LrpcError("give a speedup target or a number of blocks or their names, not two of them")
            if self.spread:
                raise LrpcError("a speedup target chooses blocks by their costs, not by stage: drop spread, "
                                "or give a number of blocks instead")
        if self.steps > 1 and self.speedup is None and self.steps > self.count:
            raise LrpcError(f"steps={self.steps} rounds need at least as many blocks to remove (count={self.count}); "
                            f"use steps <= count, or steps=1 with named blocks")
        if self.criterion not in BLOCK_CRITERIA:
            raise LrpcError(f"unknown block criterion {self.criterion!r}; choose one of {', '.join(BLOCK_CRITERIA)}")
        if not isinstance(self.names, tuple) or not all(isinstance(n, str) and n for n in self.names):
            raise LrpcError("block names must be a tuple of module names such as ('layer1.0', 'layer2.2')")
        if self.names and self.count:
            raise LrpcError("give either a number of blocks to remove or their names, not both")
        if len(set(self.names)) != len(self.names):
            raise LrpcError(f"a block is named twice: {', '.join(self.names)}")
        if self.reference is None:  # the variant that works (docs/FINDINGS.md §15), recorded in the config
            object.__setattr__(self, "reference", "mean" if self.criterion in ("lrp", "taylor") else "zero")
        if self.reference not in REMOVAL_REFERENCES:
            raise LrpcError(f"unknown block reference {self.reference!r}; choose one of {', '.join(REMOVAL_REFERENCES)}")
        if self.reference == "mean" and self.criterion not in ("norm", "lrp", "taylor"):
            raise LrpcError(f"reference='mean' applies to the norm, lrp and taylor criteria, not {self.criterion}")
        self.relevance_config()  # composite, start, epsilon, samples, batch size: checked where they are defined

    def relevance_config(self) -> RelevanceConfig:
        """The scoring settings of the ``lrp`` and ``taylor`` criteria."""
        return RelevanceConfig(composite=self.composite, start=self.start, epsilon=self.epsilon, samples=self.samples,
                               batch_size=self.batch_size, seed=self.seed)


@dataclass
class BlockResult:
    """A block cut: the new model, the blocks removed (lowest score first, round by round) and every candidate's
    score (with ``steps`` > 1: a removed block's from the round that removed it, the others' from the last round)."""

    model: nn.Module
    removed: list[str]
    scores: dict[str, float] = field(default_factory=dict)  # empty when the blocks were named
    candidates: list[str] = field(default_factory=list)
    costs: BlockCosts | None = None  # with a speedup target: what the selection counted


@dataclass(frozen=True)
class BlockCosts:
    """What a model and each of its removable blocks cost: CPU milliseconds of one forward pass at a batch size
    (``unit="ms"``), or multiply-accumulates per image (``unit="MACs"``)."""

    unit: str
    total: float
    blocks: dict[str, float]

    def saving(self, speedup: float) -> float:
        """The cost the removed blocks must add up to for the model to become ``speedup`` times cheaper."""
        return self.total * (1.0 - 1.0 / speedup)

    def speedup(self, removed: Sequence[str]) -> float:
        """The speed-up these costs predict for removing ``removed`` (blocks' costs taken as additive)."""
        left = self.total - sum(self.blocks[b] for b in removed)
        return self.total / left if left > 0 else math.inf

    def as_dict(self) -> dict:
        return {"unit": self.unit, "total": round(self.total, 4), "blocks": {b: round(c, 4) for b, c in
                                                                            self.blocks.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "BlockCosts":
        """The inverse of :meth:`as_dict`; ValueError naming what is wrong (a unit this library does not write, a
        total that is not a positive number, a block cost that is negative or not a number)."""
        if not isinstance(d, Mapping) or not isinstance(d.get("blocks"), Mapping):
            raise ValueError("block costs need 'unit', 'total' and a 'blocks' mapping")
        unit = d.get("unit")
        if unit not in COST_UNITS.values():
            raise ValueError(f"cost unit {unit!r} is not one of {', '.join(COST_UNITS.values())}")

        def number(v: object, what: str) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{what} is {v!r}, not a finite non-negative number")
            return float(v)

        total = number(d.get("total"), "the total cost")
        if total <= 0:
            raise ValueError("the total cost is 0; a model costs something")
        return cls(unit, total, {str(b): number(v, f"the cost of {b}") for b, v in d["blocks"].items()})


def load_block_costs(path: str | Path, cost: str) -> BlockCosts:
    """Block costs an earlier run measured: a ``compress`` report (its ``block_pruning.costs``) or a bare mapping as
    :meth:`BlockCosts.as_dict` writes it, in ``cost``'s unit. Counting the same costs makes a ``cpu`` speed target
    choose the same blocks on every run: one measurement on a busy machine can tip a block at the boundary of the
    selection (docs/FINDINGS.md §28, §29). LrpcError naming the problem otherwise."""
    if cost not in BLOCK_COSTS:
        raise LrpcError(f"unknown block cost {cost!r}; choose one of {', '.join(BLOCK_COSTS)}")
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise LrpcError(f"cannot read block costs {path}: {e.strerror or e}") from None
    except ValueError as e:  # invalid JSON or not UTF-8
        raise LrpcError(f"block costs {path} are not a JSON file: {e}") from None
    if isinstance(doc, Mapping) and "block_pruning" in doc:
        info = doc["block_pruning"]
        doc = info.get("costs") if isinstance(info, Mapping) else None
        if doc is None:
            raise LrpcError(f"{path} is the report of a run without a block speed target: it holds no block costs")
    try:
        costs = BlockCosts.from_dict(doc)
    except ValueError as e:
        raise LrpcError(f"block costs {path}: {e}") from None
    if costs.unit != COST_UNITS[cost]:
        raise LrpcError(f"block costs {path} are in {costs.unit}; a {cost} target counts {COST_UNITS[cost]}")
    return costs


def removable_blocks(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Children of ``nn.Sequential`` containers that hold weights and return a tensor of their input's shape (the
    outermost such modules, in order): replacing one by the identity leaves a model that still runs."""
    same: dict[str, bool] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            for child_name, child in mod.named_children():
                full = f"{name}.{child_name}" if name else child_name
                if any(isinstance(m, WEIGHTED) for m in child.modules()):
                    hooks.append(child.register_forward_hook(
                        lambda _m, inp, out, full=full: same.__setitem__(
                            full, isinstance(out, torch.Tensor) and inp[0].shape == out.shape)))
    try:
        with _eval_out_of_place(model), torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    ok = [n for n, s in same.items() if s]
    return [n for n in ok if not any(n.startswith(o + ".") for o in ok)]


def remove_blocks(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` with each named module replaced by ``nn.Identity`` (the original is left as it was)."""
    net = copy.deepcopy(model)
    for name in names:
        net.set_submodule(name, nn.Identity())
    return net


def _signature(mod: nn.Module, x: torch.Tensor) -> tuple:
    """Blocks with one signature run the same computation: module types, parameter shapes and the input's shape."""
    return (tuple(type(m).__name__ for m in mod.modules()), tuple(tuple(p.shape) for p in mod.parameters()),
            tuple(x.shape[1:]))


def measure_block_costs(model: nn.Module, example: torch.Tensor, blocks: Sequence[str], cost: str = "cpu",
                        batch_size: int = 64, repeats: int = 50, show_progress: bool = False) -> BlockCosts:
    """Each block's cost and the whole model's. ``"macs"``: multiply-accumulates per image, exact. ``"cpu"``:
    milliseconds at ``batch_size`` (``example``: one image) on CPU copies, from what removing blocks saves: blocks of
    one signature (same layers, same input shape) do the same work, so each group is removed at once and its blocks
    share the saving equally. The dense model and one cut per group are timed in alternation, ``repeats`` rounds after
    3 warm-up ones, and a group's saving is the median over rounds of the dense pass's time minus the cut's in the same
    round, so a machine slowing down between rounds cancels out; timing a block inside the dense pass instead
    overstated the wide early blocks (a 2.3x prediction measured 1.8x). Timed under
    :func:`~lrpcompress.evaluation.steady_allocator`: glibc's default page faults made the same blocks' share swing
    with the VM's state (docs/FINDINGS.md §26)."""
    if cost not in BLOCK_COSTS:
        raise LrpcError(f"unknown block cost {cost!r}; choose one of {', '.join(BLOCK_COSTS)}")
    x1 = example[:1]
    if cost == "macs":
        macs = layer_macs(model, x1)
        per_block = {b: float(sum(v for n, v in macs.items() if n == b or n.startswith(b + "."))) for b in blocks}
        return BlockCosts(COST_UNITS["macs"], float(sum(macs.values())), per_block)
    steady_allocator()
    net = copy.deepcopy(model).cpu().eval()
    mods = dict(net.named_modules())
    signature: dict[str, tuple] = {}
    handles = [mods[b].register_forward_pre_hook(
        lambda m, inp, b=b: signature.__setitem__(b, _signature(m, inp[0]))) for b in blocks]
    try:
        with torch.inference_mode():
            net(x1.cpu())
    finally:
        for h in handles:
            h.remove()
    groups: dict[tuple, list[str]] = {}
    for b in blocks:
        groups.setdefault(signature[b], []).append(b)
    nets = [net, *(remove_blocks(net, members) for members in groups.values())]
    xb = x1.cpu().expand(batch_size, *x1.shape[1:]).contiguous()
    times: list[list[float]] = [[] for _ in nets]
    with torch.inference_mode():
        for r in progress(range(3 + repeats), desc="block costs", unit="pass", disable=not show_progress):
            for i, n in enumerate(nets):
                t = time.perf_counter()
                n(xb)
                if r >= 3:
                    times[i].append(time.perf_counter() - t)
    dense = np.asarray(times[0])
    saved = [1000.0 * float(np.median(dense - np.asarray(t))) for t in times[1:]]
    per_block = {b: max(saved[g], 0.0) / len(members) for g, members in enumerate(groups.values()) for b in members}
    return BlockCosts(COST_UNITS["cpu"], 1000.0 * float(np.median(dense)), per_block)


def select_by_cost(scores: Mapping[str, float], costs: Mapping[str, float], saving: float,
                   resolution: int = 2000) -> list[str]:
    """The blocks of smallest summed score whose summed cost reaches ``saving`` (exact up to cost steps of
    ``saving / resolution``, each cost rounded down so a chosen set truly reaches it), lowest score first.

    Ties: fewer blocks, then names. Negative scores (a loss that falls without the block) count as 0, so a block is
    never removed beyond what the saving needs just for its score."""
    names = sorted(scores)
    bad = [b for b in names if b not in costs or not 0 <= costs[b] < math.inf]
    if bad:
        raise LrpcError(f"block {bad[0]} has no cost or a cost that is not a finite number >= 0: "
                        f"{costs.get(bad[0])!r}")
    if saving <= 0:
        return []
    available = sum(costs[b] for b in names)
    if available < saving:
        raise LrpcError(f"the removable blocks cost {available:.4g} together, less than the "
                        f"{saving:.4g} the target needs: ask for a smaller speedup")
    units = [min(resolution, int(math.floor(costs[b] / saving * resolution))) for b in names]
    # best[j]: (summed score, blocks, chosen bit mask) reaching j cost steps (j = resolution: the saving or more)
    best: list[tuple[float, int, int] | None] = [None] * (resolution + 1)
    best[0] = (0.0, 0, 0)
    for i, (b, u) in enumerate(zip(names, units)):
        s = max(float(scores[b]), 0.0)
        new = list(best)
        for j, cur in enumerate(best):
            if cur is None:
                continue
            k = min(resolution, j + u)
            cand = (cur[0] + s, cur[1] + 1, cur[2] | (1 << i))
            if new[k] is None or cand[:2] < new[k][:2]:
                new[k] = cand
        best = new
    if best[resolution] is None:  # only where rounding down loses the last step: take every block
        return sorted(names, key=lambda b: (scores[b], b))
    chosen = [b for i, b in enumerate(names) if best[resolution][2] >> i & 1]
    return sorted(chosen, key=lambda b: (scores[b], b))


def round_pick(scores: Mapping[str, float], costs: Mapping[str, float], missing: float, share: float,
               last: bool) -> list[str]:
    """One round of a speed target in rounds: plan the cheapest-scored cut for all the ``missing`` saving
    (:func:`select_by_cost`) and take the plan's blocks, lowest score first, until they save ``share`` (``last``:
    the whole plan). Covering each round's share on its own instead let the shares' rounding add a block: ResNet-20
    at 1.75x took 1.0, 1.2, 2.1 and 2.2 (1.88x predicted, -2.05 after recovery) where the whole saving needs three
    stage-1 blocks (docs/FINDINGS.md §26)."""
    plan = select_by_cost(scores, costs, missing)
    if last:
        return plan
    taken: list[str] = []
    saved = 0.0
    for b in plan:
        if saved >= share * (1 - 1e-9):
            break
        taken.append(b)
        saved += costs[b]
    return taken


def _scoring_indices(data: ImageData, config: BlockPruneConfig) -> np.ndarray:
    return sample_indices(len(data), config.samples, config.seed, data.y)


def _norm_scores(model: nn.Module, data: ImageData, blocks: Sequence[str], config: BlockPruneConfig,
                 show_progress: bool) -> dict[str, float]:
    """Σ ‖d − m‖ / ‖in‖ per image, d = out − in and m zero or the mean of d per channel (``config.reference``);
    ‖d − m‖² = ‖d‖² − 2 m·S + P‖m‖² with S the per-channel sums of d and P the positions, so one pass suffices."""
    mods = dict(model.named_modules())
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {b: [] for b in blocks}
    positions: dict[str, int] = {}

    def hook(name: str):
        def record(_m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            x, d = inp[0].double(), out.double() - inp[0].double()
            parts[name].append((d.flatten(1).pow(2).sum(1), _per_channel(d), x.flatten(1).norm(dim=1)))
            positions[name] = d[0, 0].numel() if d.dim() > 2 else 1
        return record

    handles = [mods[b].register_forward_hook(hook(b)) for b in blocks]
    idx = _scoring_indices(data, config)
    try:
        with _eval_out_of_place(model), torch.no_grad():
            for x, _y in progress(data.batches(config.batch_size, idx, model_device(model)),
                                  total=-(-len(idx) // config.batch_size), desc="block norms", unit="batch",
                                  disable=not show_progress):
                model(x)
    finally:
        for h in handles:
            h.remove()
    score = {}
    for b in blocks:
        sq, sums, x_norm = (torch.cat(t).cpu() for t in zip(*parts[b]))
        if config.reference == "mean":
            m = sums.sum(0) / (positions[b] * len(sums))
            sq = sq - 2 * sums @ m + positions[b] * m.pow(2).sum()
        score[b] = float((sq.clamp_min(0).sqrt() / x_norm.clamp_min(1e-12)).sum())
    return score


def _sensitivity_scores(model: nn.Module, data: ImageData, blocks: Sequence[str], config: BlockPruneConfig,
                        show_progress: bool) -> dict[str, float]:
    mods = dict(model.named_modules())
    idx = _scoring_indices(data, config)
    dev = model_device(model)
    score = dict.fromkeys(blocks, 0.0)
    with _eval_out_of_place(model), torch.no_grad():
        for x, y in progress(data.batches(config.batch_size, idx, dev), total=-(-len(idx) // config.batch_size),
                             desc="block sensitivity", unit="batch", disable=not show_progress):
            base = float(F.cross_entropy(model(x), y, reduction="sum"))
            for b in blocks:
                h = mods[b].register_forward_hook(lambda _m, inp, _out: inp[0])  # the block as the identity
                try:
                    score[b] += float(F.cross_entropy(model(x), y, reduction="sum")) - base
                finally:
                    h.remove()
    return score


def _l1_scores(model: nn.Module, blocks: Sequence[str], example: torch.Tensor) -> dict[str, float]:
    folds = {layer: bn for bn, layer in _find_folds(model, example).items()}
    mods = dict(model.named_modules())
    score = {}
    for b in blocks:
        ws = [_folded_params(m, folds.get(m))[0] for m in mods[b].modules() if isinstance(m, WEIGHTED)]
        score[b] = float(sum(w.abs().double().sum() for w in ws) / sum(w.numel() for w in ws))
    return score


def block_scores(model: nn.Module, data: ImageData, blocks: Sequence[str], config: BlockPruneConfig,
                 show_progress: bool = True) -> dict[str, float]:
    """Each block's score under ``config.criterion`` (low = remove first); see the module docstring."""
    crit = config.criterion
    if crit == "norm":
        return _norm_scores(model, data, blocks, config, show_progress)
    if crit in ("lrp", "taylor"):
        return removal_relevance(model, data, blocks, config.relevance_config(), lrp=crit == "lrp",
                                 reference=config.reference, show_progress=show_progress)
    if crit == "sensitivity":
        return _sensitivity_scores(model, data, blocks, config, show_progress)
    if crit == "l1":
        return _l1_scores(model, blocks, data.tensor(np.arange(1), model_device(model)))
    rng = np.random.default_rng(config.seed)
    return {b: float(v) for b, v in zip(blocks, rng.random(len(blocks)))}


def _check_count(count: int, candidates: Sequence[str]) -> None:
    if count > len(candidates):
        raise LrpcError(f"cannot remove {count} blocks: the model has {len(candidates)} removable blocks "
                        f"({', '.join(candidates) or 'none'})")


def select_blocks(scores: Mapping[str, float], count: int, spread: bool = False,
                  taken: Sequence[str] = ()) -> list[str]:
    """The ``count`` lowest-scored blocks (ties by name), lowest first; ``spread``: at most ceil(total / stages)
    from one stage (the blocks' parent container), where ``taken`` are blocks removed in earlier rounds: they count
    toward the total, the stages and each stage's cap."""
    _check_count(count, list(scores))
    ranked = sorted(scores, key=lambda b: (scores[b], b))
    if not spread:
        return ranked[:count]
    stage = {b: b.rpartition(".")[0] for b in [*ranked, *taken]}
    cap = math.ceil((count + len(taken)) / max(len(set(stage.values())), 1))
    chosen: list[str] = []
    for b in ranked:
        if len(chosen) == count:
            break
        if sum(stage[t] == stage[b] for t in [*taken, *chosen]) < cap:
            chosen.append(b)
    return chosen


def _prune_to_speedup(model: nn.Module, data: ImageData, config: BlockPruneConfig, candidates: list[str],
                      example: torch.Tensor, costs: BlockCosts | None, show_progress: bool) -> BlockResult:
    if costs is None:
        costs = measure_block_costs(model, example, candidates, config.cost, show_progress=show_progress)
    elif costs.unit != COST_UNITS[config.cost]:
        raise LrpcError(f"the block costs given are in {costs.unit}; a {config.cost} target counts "
                        f"{COST_UNITS[config.cost]}")
    elif set(costs.blocks) != set(candidates):
        missing = [b for b in candidates if b not in costs.blocks]
        extra = sorted(set(costs.blocks) - set(candidates))
        raise LrpcError("the block costs given are another model's: "
                        + (f"no cost for {missing[0]}" if missing else
                           f"a cost for {extra[0]}, which is not a removable block of this model")
                        + f" ({len(costs.blocks)} costs, {len(candidates)} removable blocks)")
    saving = costs.saving(config.speedup)
    if sum(costs.blocks.values()) < saving:  # before the scoring pass
        raise LrpcError(f"a {config.speedup:g}x target is out of reach: removing all {len(candidates)} removable "
                        f"blocks makes the model {costs.speedup(candidates):.2f}x cheaper ({config.cost}); "
                        "ask for less")

    def choose(r: int, chosen: list[str]) -> Callable[[dict[str, float]], list[str]] | None:
        done = sum(costs.blocks[b] for b in chosen)
        share = saving * (r + 1) / config.steps - done  # up to (r+1)/steps of the saving
        if share <= 1e-9 * saving:  # the earlier rounds' blocks already saved this round's share (up to rounding)
            return None
        last = r == config.steps - 1
        return lambda round_scores: round_pick(round_scores, costs.blocks, saving - done, share, last)

    return BlockResult(*_cut_in_rounds(model, data, config, candidates, choose, show_progress), candidates, costs)


def _cut_in_rounds(model: nn.Module, data: ImageData, config: BlockPruneConfig, candidates: list[str],
                   choose: Callable[[int, list[str]], Callable[[dict[str, float]], list[str]] | None],
                   show_progress: bool) -> tuple[nn.Module, list[str], dict[str, float]]:
    """``config.steps`` rounds, each scoring the blocks left on the model the earlier rounds cut and removing what
    ``choose(round, removed so far)`` picks from those scores (None: nothing to remove, and no scoring pass, this
    round). The cut model, the blocks removed in order, and every block's score from the last round that scored it."""
    net, chosen, scores = model, [], {}
    for r in range(config.steps):
        pick = choose(r, chosen)
        if pick is None:
            continue
        left = [b for b in candidates if b not in chosen]
        round_scores = block_scores(net, data, left, config, show_progress)
        scores.update(round_scores)  # a removed block keeps the score of the round that removed it
        chosen += pick(round_scores)
        net = remove_blocks(model, chosen)
    return net, chosen, scores


def prune_blocks(model: nn.Module, data: ImageData, config: BlockPruneConfig, show_progress: bool = True,
                 costs: BlockCosts | None = None) -> BlockResult:
    """Remove residual blocks from a copy of ``model`` (left unchanged), ranked on reference images of ``data``.

    With ``config.speedup``, ``costs`` (from :func:`measure_block_costs`, in the unit of ``config.cost``) are what the
    selection counts; measured here when not given (a benchmark gives every criterion one measurement)."""
    example = data.tensor(np.arange(1), model_device(model))
    candidates = removable_blocks(model, example)
    if config.names:
        unknown = [n for n in config.names if n not in candidates]
        if unknown:
            raise LrpcError(f"{unknown[0]} is not a removable block; the model's are: {', '.join(candidates) or 'none'}")
        return BlockResult(remove_blocks(model, config.names), list(config.names), {}, candidates)
    if config.speedup is not None:
        return _prune_to_speedup(model, data, config, candidates, example, costs, show_progress)
    _check_count(config.count, candidates)  # before the scoring pass
    if not config.count:
        return BlockResult(remove_blocks(model, []), [], {}, candidates)
    # round r removes blocks count*r//steps .. count*(r+1)//steps - 1, scored on the model cut by the earlier rounds
    sizes = [config.count * (r + 1) // config.steps - config.count * r // config.steps for r in range(config.steps)]
    return BlockResult(*_cut_in_rounds(
        model, data, config, candidates,
        lambda r, chosen: lambda round_scores: select_blocks(round_scores, sizes[r], config.spread, taken=chosen),
        show_progress), candidates)


def replaced_blocks(built: nn.Module, model: nn.Module) -> list[str]:
    """Modules of a freshly ``built`` architecture that ``model`` replaces by ``nn.Identity`` (outermost only):
    what a file must record for the loader to rebuild ``model``."""
    have = dict(model.named_modules())
    out = []
    for name, mod in built.named_modules():
        if (name and not isinstance(mod, nn.Identity) and isinstance(have.get(name), nn.Identity)
                and not any(name.startswith(o + ".") for o in out)):
            out.append(name)
    return out


def apply_removed(model: nn.Module, names: object) -> nn.Module:
    """Replace the named modules of a freshly built ``model`` by ``nn.Identity`` (a file's ``removed`` list);
    validates every entry. The weights are left for ``load_state_dict``, which then finds none of theirs."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LrpcError("the file's removed list must hold module names")
    if len(set(names)) != len(names):
        raise LrpcError("the file removes a module twice")
    mods = dict(model.named_modules())
    for n in names:
        if not n or n not in mods:
            raise LrpcError(f"the file removes {n!r}, which is not a module of this architecture")
        if any(n.startswith(o + ".") for o in names):
            raise LrpcError(f"the file removes {n!r} inside another removed module")
    for n in names:
        model.set_submodule(n, nn.Identity())
    return model


__all__ = ["BLOCK_COSTS", "BLOCK_CRITERIA", "BlockCosts", "BlockPruneConfig", "BlockResult", "apply_removed",
           "block_scores", "load_block_costs", "measure_block_costs", "prune_blocks", "removable_blocks",
           "remove_blocks", "replaced_blocks", "round_pick", "select_blocks", "select_by_cost"]
