"""Structured (channel) pruning: remove whole channels physically, so the model gets faster, not only smaller.

Which channels can go is decided by Torch-Pruning's dependency graph (BatchNorm, the next layer's input
channels, depthwise pairs, concatenations are kept consistent). A channel group is *prunable* here only if
removing it touches no residual addition and no channel padding: in a ResNet that is the inner width of
every block. Residual streams stay as they are; option-A shortcuts (pad) and additions are never cut.

Each prunable group is scored by the channel criterion (LRP channel relevance, filter L1, BatchNorm scale,
Taylor, random), the lowest-scored channels are removed per layer or globally, optionally in several
prune-and-rescore steps. Before a channel goes, its mean contribution to the next layer is folded into that
layer's shift (BatchNorm running mean or bias), so the next layer's mean output is unchanged on reference
data ("mean compensation"); no labels and no training needed.

The result records the new shape of every changed module; :func:`apply_shapes` rebuilds those shapes on a
freshly built architecture, which is how a `.lrpc` file stores a slimmer model without storing code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from .calibration import _StopForward, _hooked_eval, _patches, hessian_supported
from .data import ImageData, sample_indices
from .errors import LrpcError
from .models import OptionAShortcut, model_device
from .progress import progress
from .relevance import RelevanceConfig

CHANNEL_CRITERIA = ("lrp", "l1", "bn_scale", "taylor", "random")
CHANNEL_SCOPES = ("layer", "global", "macs")  # "auto" (a config value) tries these on held-out images
CHANNEL_REFERENCES = ("mean", "zero")
REFIT_SCOPES = ("readers", "downstream")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class ChannelPruneConfig:
    """``fraction`` of the inner channels removed (and ``stream_fraction`` of the residual-stream channels),
    scored by ``criterion``.

    ``scope``: ``layer`` (every prunable layer loses the same fraction), ``global`` (one threshold over all
    layers; the fraction counts channels), ``macs`` (one ranking of score per multiply-accumulate a channel
    carries; it removes the MACs that ``layer`` scope removes at the same fraction, spread where the scores
    say) or ``auto`` (the three tried on held-out images by ``prune_channels_auto``). ``normalise`` divides
    each layer's scores by their mean before a global or macs ranking (LRP relevance is conserved from layer
    to layer, so its raw values looked comparable without it; measured worse, docs/FINDINGS.md §5).
    ``steps`` > 1 prunes in that many rounds and rescores in between (after the round's refit, with ``reconstruct``).
    ``composite``/``start`` configure LRP; ``reference`` is where LRP channel relevance is measured from:
    ``mean`` (the channel's mean input to its readers, which is what a removal with mean compensation
    leaves in its place: ``referenced_channel_relevance``) or ``zero`` (the relevance the channel receives, as plain
    LRP has it). ``samples`` reference training images feed every data-driven
    criterion and the mean compensation. ``round_to`` > 1 rounds every pruned layer's kept channel count to
    the nearest multiple of it (at least one multiple; layers smaller than it are left alone), for hardware
    that wants aligned widths (tensor cores, NPUs; on a 2-core x86 CPU it gained nothing beyond the MACs);
    the fraction removed then deviates from ``fraction``. ``reconstruct`` refits, after the cut, every layer
    that lost input channels by least squares (weights and shift) so that it reproduces the input model's
    output of that layer on the reference samples, layer after layer in forward order, each from the inputs
    the already-refitted slim model gives it (the channel-pruning reconstruction of He et al. 2017 and
    ThiNet, solved in closed form); ``damp`` × mean(diag) is the ridge added to its Gram matrix.
    ``refit_scope``: ``downstream`` (default) refits every convolution and linear layer from the first layer
    that lost inputs on, so later layers also correct the drift of inputs no cut touched directly (a residual
    stream carrying a refitted block's small errors); ``readers`` refits only the layers that lost inputs.
    """

    fraction: float
    criterion: str = "lrp"
    composite: str = "epsilon"
    start: str = "true"
    reference: str = "mean"
    scope: str = "layer"
    steps: int = 1
    compensate: bool = True
    samples: int = 512
    batch_size: int = 64
    seed: int = 0
    stream_fraction: float = 0.0
    round_to: int = 1
    normalise: bool = True
    reconstruct: bool = True
    damp: float = 0.01
    refit_scope: str = "downstream"

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise LrpcError(f"the channel fraction must be in [0, 1), got {self.fraction}")
        if not 0.0 <= self.stream_fraction < 1.0:
            raise LrpcError(f"the residual-stream channel fraction must be in [0, 1), got {self.stream_fraction}")
        if self.criterion not in CHANNEL_CRITERIA:
            raise LrpcError(f"unknown channel criterion {self.criterion!r}; choose one of {', '.join(CHANNEL_CRITERIA)}")
        if self.scope not in CHANNEL_SCOPES + ("auto",):
            raise LrpcError(f"channel scope must be one of {', '.join(CHANNEL_SCOPES)} or auto, got {self.scope!r}")
        if not self.normalise and self.scope == "layer":
            raise LrpcError("normalise=False only changes a global or macs ranking; set scope='global' or 'macs'")
        if self.reference not in CHANNEL_REFERENCES:
            raise LrpcError(f"channel reference must be one of {', '.join(CHANNEL_REFERENCES)}, got {self.reference!r}")
        if self.reference == "mean" and not self.compensate and self.criterion == "lrp":
            raise LrpcError("reference='mean' scores a removal with mean compensation; set compensate=True or "
                            "reference='zero'")
        if self.steps < 1:
            raise LrpcError(f"steps must be at least 1, got {self.steps}")
        if self.samples < 1 or self.batch_size < 1:
            raise LrpcError("samples and batch_size must be positive")
        if self.round_to < 1:
            raise LrpcError(f"round_to must be at least 1 (1 = no rounding), got {self.round_to}")
        if not self.damp > 0:
            raise LrpcError(f"damp (the ridge of the least-squares refit) must be > 0, got {self.damp}")
        if self.refit_scope not in REFIT_SCOPES:
            raise LrpcError(f"refit_scope must be one of {', '.join(REFIT_SCOPES)}, got {self.refit_scope!r}")
        self.relevance_config()  # composite and start, checked where the LRP settings are defined

    def relevance_config(self) -> RelevanceConfig:
        """The LRP scoring settings of the ``lrp`` criterion."""
        return RelevanceConfig(composite=self.composite, start=self.start, samples=self.samples,
                               batch_size=self.batch_size, seed=self.seed)


@dataclass
class ChannelGroup:
    """One prunable set of coupled channels, named by the layer that produces them."""

    root: str
    size: int
    consumers: list[str]  # layers reading these channels (their input channels shrink)
    producers: list[str] = field(default_factory=list)  # convolutions writing them (root first)
    stream: bool = False  # a residual stream (written by several layers through additions)

    def __post_init__(self) -> None:
        if not self.producers:
            self.producers = [self.root]


@dataclass
class StructuredResult:
    model: nn.Module
    removed: dict[str, list[int]]  # root layer -> original channel indices removed
    shapes: dict[str, list[int]]  # module -> new shape (see module_shapes)
    kept_fraction: float  # prunable channels kept
    seconds_scoring: float = 0.0
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # last round's scores


# ------------------------------------------------------------------ dependency graph

def _tp():
    try:
        import torch_pruning as tp
    except ImportError:  # pragma: no cover - a declared dependency
        raise LrpcError("structured pruning needs torch-pruning: pip install torch-pruning") from None
    return tp


def _shortcut_pruner():
    """Torch-Pruning handler for :class:`OptionAShortcut`: its input and output channels are *not* coupled.

    Removing output channel j drops entry j of the channel map; removing input channel c turns the outputs
    that carried c into zero channels. So the residual streams of two stages are pruned independently.
    """
    tp = _tp()

    class ShortcutPruner(tp.pruner.function.BasePruningFunc):
        TARGET_MODULES = (OptionAShortcut,)

        def prune_out_channels(self, layer: OptionAShortcut, idxs):
            gone = set(int(i) for i in idxs)
            layer.set_channel_map([c for j, c in enumerate(layer.channel_map) if j not in gone], layer.in_planes)
            return layer

        def prune_in_channels(self, layer: OptionAShortcut, idxs):
            gone = set(int(i) for i in idxs)
            keep = [i for i in range(layer.in_planes) if i not in gone]
            new = {old: k for k, old in enumerate(keep)}
            layer.set_channel_map([new.get(c, -1) for c in layer.channel_map], len(keep))
            return layer

        def get_out_channels(self, layer: OptionAShortcut) -> int:
            return layer.out_planes

        def get_in_channels(self, layer: OptionAShortcut) -> int:
            return layer.in_planes

    return ShortcutPruner()


def _graph(model: nn.Module, example: torch.Tensor):
    tp = _tp()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:  # tracing follows autograd: a frozen model would have no graph
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                         customized_pruners={OptionAShortcut: _shortcut_pruner()})
    except Exception as exc:  # tracing failures come from user models: name them in one line
        raise LrpcError(f"cannot trace the model's channel dependencies: {str(exc).splitlines()[0]}") from None
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _group_kind(group) -> str | None:
    """``inner`` if pruning the group touches no residual addition, ``stream`` if it prunes a residual stream
    (additions whose inputs are all cut alike), ``None`` if it touches anything else that mixes channels
    (channel padding or slicing, concatenation, products, splits)."""
    kind = "inner"
    for dep, _ in group:
        mod = dep.target.module
        op = type(mod).__name__
        if op == "_SliceOp" and getattr(mod, "dim", 1) >= 2:
            kind = "stream"  # spatial subsampling (option-A shortcut): only shortcuts carry it
            continue
        if op in ("_SliceOp", "_UnbindOp", "_SplitOp", "_ExpandOp"):
            return None
        if op == "_ElementWiseOp":
            fn = str(getattr(mod, "_grad_fn", "") or mod)
            if "Sub" in fn or "Mul" in fn or "Pad" in fn or "Cat" in fn or "Div" in fn:
                return None
            if "Add" in fn:
                kind = "stream"
    return kind


def _handler(dep) -> str:
    return getattr(dep.handler, "__name__", "")


def prunable_groups(model: nn.Module, example: torch.Tensor, graph=None, streams: bool = False) -> list[ChannelGroup]:
    """Channel groups that can be removed, in forward order: the inner widths, and with ``streams`` the
    residual streams too (every layer writing to or reading from a stream is cut alike)."""
    tp = _tp()
    graph = graph or _graph(model, example)
    names = {m: n for n, m in model.named_modules()}
    seen: set[int] = set()
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Conv2d) or id(mod) in seen:
            continue
        group = graph.get_pruning_group(mod, tp.prune_conv_out_channels, idxs=[0])
        producers = []
        for dep, _ in group:  # convolutions whose outputs belong to this group are not roots of their own
            if isinstance(dep.target.module, nn.Conv2d) and _handler(dep) == "prune_out_channels":
                seen.add(id(dep.target.module))
                if dep.target.module.groups == 1 or dep.target.module is mod:
                    producers.append(names[dep.target.module])
        kind = _group_kind(group)
        if mod.out_channels < 2 or kind is None or (kind == "stream" and not streams):
            continue
        consumers = [names[dep.target.module] for dep, _ in group
                     if isinstance(dep.target.module, (nn.Conv2d, nn.Linear, OptionAShortcut))
                     and dep.target.module is not mod and _handler(dep) == "prune_in_channels"]
        producers = [name] + sorted(set(producers) - {name}, key=list(names.values()).index)
        out.append(ChannelGroup(name, mod.out_channels, consumers, producers, kind == "stream"))
    return out


# ------------------------------------------------------------------ scores

def channel_scores(model: nn.Module, data: ImageData, groups: list[ChannelGroup], config: ChannelPruneConfig,
                   show_progress: bool = True, means: Mapping[str, torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Score of every channel of each group (keyed by its root; higher = more important), float64 on CPU.

    A residual stream's channel is scored by the sum over every convolution that writes to it; LRP measured
    from the mean (``reference='mean'``) scores every group at its readers' inputs instead, from ``means`` (each
    reader's mean input on ``config``'s samples, measured here when not given).
    """
    from .relevance import _find_folds, compute_relevance, referenced_channel_relevance, taylor_scores

    mods = dict(model.named_modules())
    c = config

    def per_producer(fn) -> dict[str, torch.Tensor]:
        return {g.root: sum(fn(p) for p in g.producers) for g in groups}

    if c.criterion == "lrp" and c.reference == "mean":
        readers = {g.root: list(g.consumers) for g in groups}
        if means is None:
            means = _input_means(model, data, [n for g in groups for n in g.consumers], c)
        got = referenced_channel_relevance(model, data, readers, means, c.relevance_config(), show_progress)
        # a reader behind a flatten sees each channel as a block of features (channel-major)
        odd = [g.root for g in groups if got[g.root].numel() % g.size]
        if odd:
            raise LrpcError(f"the layers reading {odd[0]} see {got[odd[0]].numel()} features, not a multiple of its "
                            "channels: use another channel criterion or reference='zero'")
        return {g.root: got[g.root].view(g.size, -1).sum(1) for g in groups}
    if c.criterion == "lrp":
        rel = compute_relevance(model, data, c.relevance_config(), show_progress)
        return per_producer(lambda p: rel.channels[f"{p}.weight"].double())
    if c.criterion == "taylor":
        t = taylor_scores(model, data, c.samples, c.batch_size, c.seed, show_progress)
        return per_producer(lambda p: t[f"{p}.weight"].reshape(mods[p].out_channels, -1).sum(1).abs())
    if c.criterion == "l1":
        return per_producer(lambda p: mods[p].weight.detach().abs().reshape(mods[p].out_channels, -1).sum(1)
                            .double().cpu())
    if c.criterion == "bn_scale":
        example = data.tensor(np.arange(1), model_device(model))
        bn_of = {v: k for k, v in _find_folds(model, example).items()}

        def scale(p: str) -> torch.Tensor:
            bn = bn_of.get(mods[p])
            if bn is None or bn.weight is None:
                raise LrpcError(f"the bn_scale criterion needs a BatchNorm with a scale right after {p}")
            return bn.weight.detach().abs().double().cpu()

        return per_producer(scale)
    g = torch.Generator().manual_seed(c.seed)
    return {grp.root: torch.rand(grp.size, generator=g, dtype=torch.float64) for grp in groups}


def _normalised(s: torch.Tensor, normalise: bool) -> torch.Tensor:
    return s / s.abs().mean().clamp(min=1e-30) if normalise else s


def select_channels(scores: Mapping[str, torch.Tensor], sizes: Mapping[str, int], targets: Mapping[str, int],
                    scope: str, normalise: bool = True) -> dict[str, list[int]]:
    """Indices (into the current layers) to remove so that each layer keeps ``targets[layer]`` channels
    (``layer`` scope) or the total kept equals ``sum(targets)`` (``global``; scores divided by their layer's
    mean when ``normalise``); every layer keeps at least one."""
    remove: dict[str, list[int]] = {}
    if scope == "layer":
        for r, s in scores.items():
            k = sizes[r] - targets[r]
            order = torch.argsort(s, stable=True)
            remove[r] = sorted(int(i) for i in order[:max(k, 0)])
        return remove
    pool = []
    for r, s in scores.items():
        pool += [(float(v), r, i) for i, v in enumerate(_normalised(s, normalise))]
    pool.sort(key=lambda t: (t[0], t[1], t[2]))
    budget = sum(sizes.values()) - sum(targets.values())
    left = dict(sizes)
    remove = {r: [] for r in scores}
    for _, r, i in pool:
        if budget <= 0:
            break
        if left[r] > 1:
            remove[r].append(i)
            left[r] -= 1
            budget -= 1
    return {r: sorted(v) for r, v in remove.items()}


def select_by_cost(scores: Mapping[str, torch.Tensor], sizes: Mapping[str, int], costs: Mapping[str, float],
                   remove_cost: float, normalise: bool = True) -> dict[str, list[int]]:
    """Indices to remove, cheapest score per unit of cost first, until the removed channels' cost reaches
    ``remove_cost`` (stopping before the channel that would overshoot by more than it leaves short); every
    layer keeps at least one. Ties go to the earlier layer and the lower index, so the choice is deterministic."""
    pool = []
    for r, s in scores.items():
        c = float(costs[r])
        if c <= 0:
            raise LrpcError(f"channel cost of {r} must be positive, got {c}")
        pool += [(float(v) / c, r, i) for i, v in enumerate(_normalised(s, normalise))]
    order = {r: k for k, r in enumerate(scores)}
    pool.sort(key=lambda t: (t[0], order[t[1]], t[2]))
    left, done = dict(sizes), 0.0
    remove: dict[str, list[int]] = {r: [] for r in scores}
    for _, r, i in pool:
        if remove_cost - done <= 0:
            break
        c = float(costs[r])
        if left[r] <= 1 or done + c - remove_cost > remove_cost - done:
            continue  # a cheaper channel further down may still fit
        remove[r].append(i)
        left[r] -= 1
        done += c
    return {r: sorted(v) for r, v in remove.items()}


def channel_costs(model: nn.Module, groups: list[ChannelGroup], example: torch.Tensor) -> dict[str, float]:
    """Multiply-accumulates per image that one channel of each group carries: its share of every producer's
    output and of every consumer's input (a layer's MACs are linear in each of its channel counts; BatchNorm
    and additions, one operation per element, are left out as in ``count_macs``)."""
    from .evaluation import layer_macs

    mods = dict(model.named_modules())
    macs = layer_macs(model, example[:1])

    def share(name: str, attr: str) -> float:
        return macs[name] / getattr(mods[name], attr) if name in macs else 0.0  # a shortcut only moves channels

    def channels(m: nn.Module, side: str) -> str:
        return {"out": "out_features", "in": "in_features"}[side] if isinstance(m, nn.Linear) else f"{side}_channels"

    return {g.root: sum(share(p, channels(mods[p], "out")) for p in g.producers)
            + sum(share(c, channels(mods[c], "in")) for c in g.consumers) for g in groups}


def round_kept(kept: int, size: int, multiple: int) -> int:
    """``kept`` rounded to the nearest multiple of ``multiple`` (halves up), between one multiple and
    ``size``; a layer of fewer than ``multiple`` channels keeps ``kept``."""
    if multiple <= 1 or size < multiple:
        return kept
    return min(size, max(multiple, (kept + multiple // 2) // multiple * multiple))


# ------------------------------------------------------------------ surgery

@torch.no_grad()
def _input_means(model: nn.Module, data: ImageData, layers: list[str], config: ChannelPruneConfig) -> dict[str, torch.Tensor]:
    """Mean input per input channel of ``layers`` over the reference samples."""
    mods = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    count = {"n": 0}

    def hook(name):
        def fn(_m, inp):
            x = inp[0].detach().double()
            dims = [0] + list(range(2, x.dim()))
            sums[name] = sums.get(name, 0) + x.mean(dims)
        return fn

    idx = sample_indices(len(data), config.samples, config.seed, data.y)
    with _hooked_eval(model, [(mods[n], hook(n)) for n in set(layers)]):
        for x, _ in data.batches(config.batch_size, idx, model_device(model)):
            model(x)
            count["n"] += 1
    return {k: (v / count["n"]).cpu() for k, v in sums.items()}


def _features(channels: list[int], per_channel: int) -> list[int]:
    """Input indices of a reader for these channels: the channels themselves, or each channel's block of
    ``per_channel`` features where the reader sees them flattened (channel-major)."""
    if per_channel <= 1:
        return list(channels)
    return [c * per_channel + j for c in channels for j in range(per_channel)]


@torch.no_grad()
def _compensate(model: nn.Module, groups: list[ChannelGroup], remove: Mapping[str, list[int]],
                means: Mapping[str, torch.Tensor], example: torch.Tensor) -> None:
    """Fold the mean contribution of the channels about to be removed into each consumer's shift."""
    from .relevance import _find_folds

    mods = dict(model.named_modules())
    bn_of = {v: k for k, v in _find_folds(model, example).items()}
    for g in groups:
        idx = remove.get(g.root) or []
        if not idx:
            continue
        for cname in g.consumers:
            layer = mods[cname]
            if isinstance(layer, OptionAShortcut):
                _compensate_shortcut(model, cname, layer, idx, means[cname])
                continue
            if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                continue  # depthwise consumers lose the matching outputs too
            fidx = _features(idx, len(means[cname]) // g.size)
            m = means[cname][fidx].to(layer.weight)
            w = layer.weight[:, fidx]
            delta = (w.reshape(w.shape[0], len(fidx), -1).sum(2) * m).sum(1)
            bn = bn_of.get(layer)
            if bn is not None and bn.running_mean is not None:
                bn.running_mean -= delta.to(bn.running_mean)
            elif layer.bias is not None:
                layer.bias += delta.to(layer.bias)


def _compensate_shortcut(model: nn.Module, name: str, shortcut: OptionAShortcut, idx: list[int],
                         mean: torch.Tensor) -> None:
    """A removed stream channel stops flowing through the next stage's shortcut: add its mean to the
    shift of the BatchNorm (``bn2``) whose output the shortcut is added to, where the block has one."""
    block = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    bn = getattr(block, "bn2", None)
    if not isinstance(bn, nn.BatchNorm2d) or bn.bias is None or bn.num_features != shortcut.out_planes:
        return
    gone = set(idx)
    for j, c in enumerate(shortcut.channel_map):
        if c in gone:
            bn.bias[j] += mean[c].to(bn.bias)


def _capture(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input ``module`` receives when ``model`` runs on ``x`` (the forward pass stops there)."""
    box: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, inp: tuple) -> None:
        box["x"] = inp[0]
        raise _StopForward

    with _hooked_eval(model, [(module, hook)]):
        try:
            model(x)
        except _StopForward:
            pass
    if "x" not in box:
        raise LrpcError("a layer to refit was not reached by the forward pass")
    return box["x"]


def refit_solve(gram: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """Ridge least squares ``(G + λI)⁻¹ C`` with ``λ = damp`` × mean(diag G); ``gram`` = E[x xᵀ] of the new
    inputs, ``cross`` = E[x yᵀ] against the targets. Returns the new weights, ``[inputs, outputs]``."""
    g = gram.double()
    lam = damp * float(torch.diagonal(g).mean().clamp_min(1e-12))
    g = g + lam * torch.eye(g.shape[0], dtype=g.dtype)
    return torch.linalg.solve(g, cross.double())


@torch.no_grad()
def _reconstruct(net: nn.Module, dense: nn.Module, readers: list[str], out_keep: Mapping[str, list[int]],
                 data: ImageData, config: ChannelPruneConfig, show_progress: bool = True) -> None:
    """Refit each of ``readers`` in ``net`` (slim) so its output matches ``dense``'s same layer on the kept
    output channels (``out_keep``; all where absent), in forward order (see ``ChannelPruneConfig.reconstruct``);
    with ``refit_scope='downstream'`` also every later convolution and linear layer."""
    from .relevance import _find_folds

    dev = model_device(net)
    smods, dmods = dict(net.named_modules()), dict(dense.named_modules())
    example = data.tensor(np.arange(1), dev)
    order: list[str] = []  # supported layers in the order the forward pass reaches them
    with _hooked_eval(dense, [(m, lambda _m, _i, n=n: order.append(n)) for n, m in dmods.items()
                              if n in smods and hessian_supported(smods[n])]):
        dense(example)
    order = list(dict.fromkeys(order))
    chosen = {n for n in readers if n in order}  # shortcuts and depthwise readers keep their weights
    if not chosen:
        return
    if config.refit_scope == "downstream":
        todo = order[min(order.index(n) for n in chosen):]
    else:
        todo = [n for n in order if n in chosen]
    bn_of = {v: k for k, v in _find_folds(net, example).items()}
    dbn_of = {v: k for k, v in _find_folds(dense, example).items()}
    idx = sample_indices(len(data), config.samples, config.seed, data.y)
    for name in progress(todo, desc="refit", unit="layer", disable=not show_progress):
        ls, ld = smods[name], dmods[name]
        bn, dbn = bn_of.get(ls), dbn_of.get(ld)
        rows = list(out_keep.get(name, range(ld.weight.shape[0])))
        wd = ld.weight.reshape(ld.weight.shape[0], -1)[rows].float()
        bd = ld.bias[rows].float() if ld.bias is not None else None
        into_bn = bn is not None and bn.running_mean is not None and dbn is not None  # the shift lands there
        shift = into_bn or ls.bias is not None
        gram = cross = None
        count = 0
        for x, _ in data.batches(config.batch_size, idx, dev):
            # products in float32 (patches of a large input are big), sums in float64
            xs = _patches(ls, _capture(net, ls, x)).float()
            y = _patches(ld, _capture(dense, ld, x)).float() @ wd.T
            if bd is not None:
                y = y + bd
            if shift:
                xs = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype, device=xs.device)], 1)
            g, c = (xs.T @ xs).double().cpu(), (xs.T @ y).double().cpu()
            gram, cross = (g, c) if gram is None else (gram + g, cross + c)
            count += len(xs)
        sol = refit_solve(gram / count, cross / count, config.damp)  # [inputs (+1), outputs]
        cols = ls.weight[0].numel()
        ls.weight.copy_(sol[:cols].T.reshape(ls.weight.shape).to(ls.weight))
        if not shift:
            continue
        b = sol[cols]
        if not into_bn:
            ls.bias.copy_(b.to(ls.bias))
        else:
            if ls.bias is not None:
                ls.bias.zero_()
            bn.running_mean.copy_((dbn.running_mean[rows].double() - b).to(bn.running_mean))


def module_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Channel shape of every conv/linear ([out, in]) and BatchNorm ([features]) module."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[n] = [m.out_channels, m.in_channels]
        elif isinstance(m, nn.Linear):
            out[n] = [m.out_features, m.in_features]
        elif isinstance(m, _BN):
            out[n] = [m.num_features]
        elif isinstance(m, OptionAShortcut):
            out[n] = [m.out_planes, m.in_planes] + list(m.channel_map)
    return out


def changed_shapes(before: Mapping[str, list[int]], model: nn.Module) -> dict[str, list[int]]:
    now = module_shapes(model)
    return {k: v for k, v in now.items() if before.get(k) != v}


def apply_shapes(model: nn.Module, shapes: Mapping[str, object]) -> nn.Module:
    """Replace the named conv/linear/BatchNorm modules of a freshly built ``model`` by ones with the given
    (smaller) channel counts; weights are left for ``load_state_dict``. Validates every entry."""
    if not isinstance(shapes, Mapping):
        raise LrpcError("the file's shapes must map module names to channel counts")
    mods = dict(model.named_modules())
    for name, shape in shapes.items():
        mod = mods.get(name) if isinstance(name, str) else None
        if mod is None:
            raise LrpcError(f"the file resizes {name!r}, which is not a module of this architecture")
        if not isinstance(shape, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape):
            raise LrpcError(f"the file's shape for {name} must be a list of ints")
        if isinstance(mod, nn.Conv2d) and len(shape) == 2:
            out_c, in_c = shape
            if not (1 <= out_c <= mod.out_channels and 1 <= in_c <= mod.in_channels):
                raise LrpcError(f"the file's shape {shape} for {name} is outside 1..{[mod.out_channels, mod.in_channels]}")
            groups = mod.groups
            if groups != 1:
                if not (groups == mod.in_channels == mod.out_channels and out_c == in_c):
                    raise LrpcError(f"the file resizes grouped convolution {name} inconsistently")
                groups = in_c
            new: nn.Module = nn.Conv2d(in_c, out_c, mod.kernel_size, mod.stride, mod.padding, mod.dilation, groups,
                                       mod.bias is not None, mod.padding_mode)
        elif isinstance(mod, nn.Linear) and len(shape) == 2:
            out_c, in_c = shape
            if not (1 <= out_c <= mod.out_features and 1 <= in_c <= mod.in_features):
                raise LrpcError(f"the file's shape {shape} for {name} is outside 1..{[mod.out_features, mod.in_features]}")
            new = nn.Linear(in_c, out_c, mod.bias is not None)
        elif isinstance(mod, OptionAShortcut) and len(shape) >= 3:
            out_c, in_c, cmap = shape[0], shape[1], shape[2:]
            if not (len(cmap) == out_c and 1 <= out_c <= mod.out_planes and 1 <= in_c <= mod.in_planes
                    and all(-1 <= c < in_c for c in cmap)):
                raise LrpcError(f"the file's channel map for shortcut {name} is inconsistent: {shape}")
            new = OptionAShortcut(in_c, out_c, mod.stride, cmap)
        elif isinstance(mod, _BN) and len(shape) == 1:
            if not 1 <= shape[0] <= mod.num_features:
                raise LrpcError(f"the file's shape {shape} for {name} is outside 1..{mod.num_features}")
            new = type(mod)(shape[0], mod.eps, mod.momentum, mod.affine, mod.track_running_stats)
        else:
            raise LrpcError(f"the file resizes {name!r} ({type(mod).__name__}) with shape {shape!r}, which does not fit")
        model.set_submodule(name, new)
    if hasattr(model, "widths"):
        _refresh_widths(model)
    return model


def _refresh_widths(model: nn.Module) -> None:
    """Keep a CIFAR ResNet's ``widths`` attribute truthful after its inner convolutions shrank (a block replaced by
    the identity keeps its entry)."""
    blocks = [m for n, m in model.named_modules() if n.startswith("layer") and n.count(".") == 1]
    if len(blocks) == len(model.widths):
        model.widths = [int(b.conv1.out_channels) if isinstance(getattr(b, "conv1", None), nn.Conv2d) else w
                        for b, w in zip(blocks, model.widths)]


def prune_channels(model: nn.Module, data: ImageData, config: ChannelPruneConfig,
                   show_progress: bool = True, reference: Mapping[str, int] | None = None,
                   scores: Mapping[str, torch.Tensor] | None = None) -> StructuredResult:
    """Remove ``config.fraction`` of the inner channels (and ``config.stream_fraction`` of the residual-stream
    channels) of a copy of ``model`` (left unchanged).

    ``reference`` gives the channel count of each group (by root) that the fractions refer to, for a model
    that was pruned before (default: its current counts). ``scores``: this model's channel scores from an
    earlier result (``StructuredResult.scores`` of a one-step cut), to cut again in another scope without
    scoring again (one step only)."""
    import time

    if config.scope == "auto":
        raise LrpcError("scope 'auto' chooses on held-out images: call prune_channels_auto(model, fit, val, config)")
    if scores is not None and config.steps != 1:
        raise LrpcError("precomputed scores serve a one-step cut only; use steps=1 or let each round rescore")
    given = None if scores is None else {r: v.double().cpu() for r, v in scores.items()}

    tp = _tp()
    net = copy.deepcopy(model).eval()
    example = data.tensor(np.arange(1), model_device(net))
    before = module_shapes(net)
    streams = config.stream_fraction > 0
    graph = _graph(net, example)  # rebuilt only after each round's surgery
    groups = prunable_groups(net, example, graph, streams=streams)
    if not any(not g.stream for g in groups) and config.fraction > 0:
        raise LrpcError("the model has no channels that can be removed without touching residual additions")
    if streams and not any(g.stream for g in groups):
        raise LrpcError("the model has no residual stream that can be pruned; use a stream fraction of 0")
    original = {g.root: g.size for g in groups}
    groups0 = list(groups)  # the refit's layer names: a group cut to one channel drops out of later lists
    writer = {p: g.root for g in groups0 for p in g.producers}  # each refitted producer's group
    if reference is not None:
        original = {r: max(int(reference.get(r, n)), n) for r, n in original.items()}
    is_stream = {g.root: g.stream for g in groups}
    fraction = {False: config.fraction, True: config.stream_fraction}
    removed: dict[str, list[int]] = {g.root: [] for g in groups}
    alive = {g.root: list(range(g.size)) for g in groups}  # index (in the input model) of each current channel
    score_s = 0.0
    scores: dict[str, torch.Tensor] = {}
    # Compensation uses the input model's means in every round: means re-measured on the partly pruned
    # model (whose activations have drifted) compensate worse (docs/FINDINGS.md §5, iterative rescoring).
    means0 = (_input_means(net, data, [c for g in groups for c in g.consumers], config)
              if config.compensate else {})
    for step in progress(range(1, config.steps + 1), desc="channels", unit="step",
                         disable=not show_progress or config.steps == 1):
        mods = dict(net.named_modules())
        sizes = {g.root: mods[g.root].out_channels for g in groups}
        targets = {}
        for kind in (False, True):  # inner widths and residual streams each get their own budget
            roots = [r for r in sizes if is_stream[r] == kind]
            f = fraction[kind] * step / config.steps
            if not roots:
                continue
            if config.scope == "global":
                total = sum(original[r] for r in roots)
                targets.update({r: 0 for r in roots})
                targets[roots[0]] = max(len(roots), total - int(round(f * total)))  # only the sum matters
            else:  # macs: the per-layer targets price the MAC budget
                targets.update({r: max(1, original[r] - int(round(f * original[r]))) for r in roots})
        # what is left to cut, in channels (layer, global) or MACs (macs)
        costs = channel_costs(net, groups, example) if config.scope == "macs" else dict.fromkeys(sizes, 1.0)
        if sum((sizes[r] - targets[r]) * costs[r] for r in sizes) <= 0:
            continue
        t0 = time.perf_counter()
        if given is not None:
            if {r: len(v) for r, v in given.items()} != sizes:
                raise LrpcError("the given channel scores do not match this model's prunable channels")
            scores = dict(given)
        else:
            # the first round scores the input model on the compensation's samples: its means are measured
            scores = channel_scores(net, data, groups, replace(config, seed=config.seed + step - 1),
                                    show_progress=show_progress, means=means0 if step == 1 and means0 else None)
        score_s += time.perf_counter() - t0
        remove = {}
        for kind in (False, True):
            roots = [r for r in sizes if is_stream[r] == kind]
            if not roots:
                continue
            if config.scope == "macs":  # the MACs the layer cut would still remove, spread by score per MAC
                picked = select_by_cost({r: scores[r] for r in roots}, {r: sizes[r] for r in roots}, costs,
                                        sum((sizes[r] - targets[r]) * costs[r] for r in roots), config.normalise)
            else:
                picked = select_channels({r: scores[r] for r in roots}, {r: sizes[r] for r in roots},
                                         {r: targets[r] for r in roots}, config.scope, config.normalise)
            if config.round_to > 1:  # the scope chose how many each layer keeps; round that, then pick again
                kept = {r: round_kept(sizes[r] - len(picked[r]), original[r], config.round_to) for r in roots}
                picked = select_channels({r: scores[r] for r in roots}, {r: sizes[r] for r in roots},
                                         {r: min(kept[r], sizes[r]) for r in roots}, "layer")
            remove.update(picked)
        if config.compensate:
            means = {c: means0[c][_features(alive[g.root], len(means0[c]) // original[g.root])]
                     for g in groups for c in g.consumers}
            _compensate(net, groups, remove, means, example)
        mods = dict(net.named_modules())
        for g in groups:
            idx = remove.get(g.root) or []
            if not idx:
                continue
            gone = set(idx)
            removed[g.root] += [alive[g.root][i] for i in idx]
            alive[g.root] = [a for i, a in enumerate(alive[g.root]) if i not in gone]
            graph.get_pruning_group(mods[g.root], tp.prune_conv_out_channels, idxs=list(idx)).prune()
        if config.reconstruct:
            # refit after every round, so the next round scores (and compensates) the refitted model, not one
            # carrying the drift of the cuts so far; the targets stay the input model's outputs
            readers = sorted({c for g in groups0 if removed.get(g.root) for c in g.consumers})
            _reconstruct(net, model, readers, {p: alive[r] for p, r in writer.items()}, data, config,
                         show_progress)
        graph = _graph(net, example)
        groups = [g for g in prunable_groups(net, example, graph, streams=streams) if g.root in original]
    if hasattr(net, "widths"):
        _refresh_widths(net)
    kept = sum(len(v) for v in alive.values()) / sum(original.values())  # of the reference counts
    return StructuredResult(net.eval(), {k: sorted(v) for k, v in removed.items()}, changed_shapes(before, net),
                            kept, score_s, scores)


def prune_channels_auto(model: nn.Module, fit: ImageData, val: ImageData, config: ChannelPruneConfig,
                        scopes: tuple[str, ...] = CHANNEL_SCOPES, show_progress: bool = True
                        ) -> tuple[StructuredResult, str, dict[str, dict]]:
    """Cut ``model`` in every scope of ``scopes`` (scored once on ``fit`` when ``config.steps`` is 1) and keep
    the cut most accurate on ``val`` (training images held out from scoring; never the test split) among
    those that leave no more MACs than the per-layer cut, plus 0.5% of the dense model's (``global`` counts
    channels, so it can remove fewer MACs). Returns the result, the chosen scope, and per scope the held-out
    accuracy, MACs and eligibility."""
    from .evaluation import accuracy, count_macs

    if not scopes or any(sc not in CHANNEL_SCOPES for sc in scopes):
        raise LrpcError(f"scopes to try must come from {', '.join(CHANNEL_SCOPES)}, got {scopes!r}")
    example = fit.tensor(np.arange(1), model_device(model))
    dense_macs = count_macs(model, example)
    trials: dict[str, dict] = {}
    results: dict[str, StructuredResult] = {}
    scores = None
    for sc in ("layer",) + tuple(x for x in scopes if x != "layer"):
        res = prune_channels(model, fit, replace(config, scope=sc), show_progress=show_progress,
                             scores=scores if config.steps == 1 else None)
        if config.steps == 1 and scores is None:
            scores = res.scores
        results[sc] = res
        trials[sc] = {"val_accuracy": round(accuracy(res.model, val, show_progress=False), 2),
                      "macs": count_macs(res.model, example)}
    limit = trials["layer"]["macs"] + 0.005 * dense_macs
    for sc, t in trials.items():
        t["eligible"] = sc in scopes and t["macs"] <= limit
    best = max((sc for sc in trials if trials[sc]["eligible"]), key=lambda sc: trials[sc]["val_accuracy"],
               default="layer")
    return results[best], best, trials


def prune_gradually(model: nn.Module, data: ImageData, config: ChannelPruneConfig, finetune, rounds: int,
                    teacher: nn.Module | None = None, show_progress: bool = True,
                    device: torch.device | str | None = None) -> StructuredResult:
    """Gradual pruning inside a fixed training budget: ``rounds`` times, cut to the next ``r/rounds`` of the
    target fractions (rescoring the current model) and fine-tune (``finetune``, a FinetuneConfig) on the
    next ``1/rounds`` of the training images, so recovery as a whole sees every image ``finetune.epochs``
    times, as one cut followed by ``finetune.epochs`` epochs would. ``teacher`` defaults to ``model``."""
    from .recovery import finetune_model

    if rounds < 1:
        raise LrpcError(f"rounds must be at least 1, got {rounds}")
    if len(data) < rounds:
        raise LrpcError(f"{len(data)} training images cannot be split into {rounds} rounds")
    teacher = model if teacher is None else teacher
    chunks = np.array_split(np.random.default_rng(finetune.seed).permutation(len(data)), rounds)
    net, reference, alive, shapes0 = model, None, None, module_shapes(model)
    res = None
    score_s = 0.0
    for r in progress(range(1, rounds + 1), desc="prune+recover", unit="round", disable=not show_progress):
        step_cfg = replace(config, fraction=config.fraction * r / rounds,
                           stream_fraction=config.stream_fraction * r / rounds, seed=config.seed + 1000 * (r - 1))
        res = prune_channels(net, data, step_cfg, show_progress=False, reference=reference)
        score_s += res.seconds_scoring
        if reference is None:  # the first round's groups are the dense model's: kept + removed channels
            mods = dict(res.model.named_modules())
            reference = {root: mods[root].out_channels + len(idx) for root, idx in res.removed.items()}
            alive = {root: list(range(n)) for root, n in reference.items()}
        for root, idx in res.removed.items():
            gone = set(idx)
            alive[root] = [a for i, a in enumerate(alive[root]) if i not in gone]
        net = finetune_model(res.model, data.subset(np.sort(chunks[r - 1])),
                             replace(finetune, seed=finetune.seed + r - 1), show_progress=show_progress,
                             device=device, teacher=teacher)
    net = net.to(model_device(model)).eval()
    kept = sum(len(v) for v in alive.values()) / sum(reference.values())
    removed = {root: sorted(set(range(reference[root])) - set(v)) for root, v in alive.items()}
    return StructuredResult(net, removed, changed_shapes(shapes0, net), kept, score_s, res.scores)


__all__ = ["ChannelPruneConfig", "ChannelGroup", "StructuredResult", "CHANNEL_CRITERIA", "CHANNEL_SCOPES",
           "REFIT_SCOPES", "prunable_groups", "channel_scores", "channel_costs", "select_channels", "select_by_cost",
           "round_kept", "prune_channels", "prune_channels_auto", "prune_gradually", "module_shapes",
           "changed_shapes", "apply_shapes"]
