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

from .data import ImageData, sample_indices
from .errors import LrpcError
from .models import model_device
from .progress import progress

CHANNEL_CRITERIA = ("lrp", "l1", "bn_scale", "taylor", "random")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class ChannelPruneConfig:
    """``fraction`` of the prunable channels removed, scored by ``criterion``.

    ``scope``: ``layer`` (every prunable layer loses the same fraction) or ``global`` (scores normalised by
    their layer's mean, one threshold). ``steps`` > 1 prunes in that many rounds and rescores in between.
    ``composite``/``start`` configure LRP; ``samples`` reference training images feed every data-driven
    criterion and the mean compensation.
    """

    fraction: float
    criterion: str = "lrp"
    composite: str = "epsilon_plus"
    start: str = "true"
    scope: str = "layer"
    steps: int = 1
    compensate: bool = True
    samples: int = 512
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise LrpcError(f"the channel fraction must be in [0, 1), got {self.fraction}")
        if self.criterion not in CHANNEL_CRITERIA:
            raise LrpcError(f"unknown channel criterion {self.criterion!r}; choose one of {', '.join(CHANNEL_CRITERIA)}")
        if self.scope not in ("layer", "global"):
            raise LrpcError(f"channel scope must be layer or global, got {self.scope!r}")
        if self.steps < 1:
            raise LrpcError(f"steps must be at least 1, got {self.steps}")
        if self.samples < 1 or self.batch_size < 1:
            raise LrpcError("samples and batch_size must be positive")


@dataclass
class ChannelGroup:
    """One prunable set of coupled channels, named by the layer that produces them."""

    root: str
    size: int
    consumers: list[str]  # layers reading these channels (their input channels shrink)


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


def _graph(model: nn.Module, example: torch.Tensor):
    tp = _tp()
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)
    except Exception as exc:  # tracing failures come from user models: name them in one line
        raise LrpcError(f"cannot trace the model's channel dependencies: {str(exc).splitlines()[0]}") from None


def _is_safe(group) -> bool:
    """True if pruning the group's channels touches no residual addition and no channel padding/slicing."""
    for dep, _ in group:
        mod = dep.target.module
        kind = type(mod).__name__
        if kind in ("_SliceOp", "_UnbindOp", "_SplitOp", "_ExpandOp"):
            return False
        if kind == "_ElementWiseOp":
            fn = str(getattr(mod, "_grad_fn", "") or mod)
            if "Add" in fn or "Sub" in fn or "Mul" in fn or "Pad" in fn or "Cat" in fn or "Div" in fn:
                return False
    return True


def prunable_groups(model: nn.Module, example: torch.Tensor, graph=None) -> list[ChannelGroup]:
    """Channel groups that can be removed without touching residual additions, in forward order."""
    tp = _tp()
    graph = graph or _graph(model, example)
    names = {m: n for n, m in model.named_modules()}
    seen: set[int] = set()
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Conv2d) or id(mod) in seen:
            continue
        group = graph.get_pruning_group(mod, tp.prune_conv_out_channels, idxs=[0])
        for dep, _ in group:  # convolutions whose outputs belong to this group are not roots of their own
            if isinstance(dep.target.module, nn.Conv2d) and getattr(dep.handler, "__name__", "") == "prune_out_channels":
                seen.add(id(dep.target.module))
        if mod.out_channels < 2 or not _is_safe(group):
            continue
        consumers = [names[dep.target.module] for dep, _ in group
                     if isinstance(dep.target.module, (nn.Conv2d, nn.Linear)) and dep.target.module is not mod
                     and getattr(dep.handler, "__name__", "") == "prune_in_channels"]
        out.append(ChannelGroup(name, mod.out_channels, consumers))
    return out


# ------------------------------------------------------------------ scores

def channel_scores(model: nn.Module, data: ImageData, groups: list[ChannelGroup], config: ChannelPruneConfig,
                   show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Score of every output channel of each group's root layer (higher = more important), float64 on CPU."""
    from .relevance import RelevanceConfig, _find_folds, compute_relevance, taylor_scores

    mods = dict(model.named_modules())
    roots = [g.root for g in groups]
    c = config
    if c.criterion == "lrp":
        rel = compute_relevance(model, data, RelevanceConfig(composite=c.composite, start=c.start, samples=c.samples,
                                                             batch_size=c.batch_size, seed=c.seed), show_progress)
        return {r: rel.channels[f"{r}.weight"].double() for r in roots}
    if c.criterion == "taylor":
        t = taylor_scores(model, data, c.samples, c.batch_size, c.seed, show_progress)
        return {r: t[f"{r}.weight"].reshape(mods[r].out_channels, -1).sum(1).abs() for r in roots}
    if c.criterion == "l1":
        return {r: mods[r].weight.detach().abs().reshape(mods[r].out_channels, -1).sum(1).double().cpu() for r in roots}
    if c.criterion == "bn_scale":
        example = data.tensor(np.arange(1), model_device(model))
        bn_of = {v: k for k, v in _find_folds(model, example).items()}
        out = {}
        for r in roots:
            bn = bn_of.get(mods[r])
            if bn is None or bn.weight is None:
                raise LrpcError(f"the bn_scale criterion needs a BatchNorm with a scale right after {r}")
            out[r] = bn.weight.detach().abs().double().cpu()
        return out
    g = torch.Generator().manual_seed(c.seed)
    return {r: torch.rand(mods[r].out_channels, generator=g, dtype=torch.float64) for r in roots}


def select_channels(scores: Mapping[str, torch.Tensor], sizes: Mapping[str, int], targets: Mapping[str, int],
                    scope: str) -> dict[str, list[int]]:
    """Indices (into the current layers) to remove so that each layer keeps ``targets[layer]`` channels
    (``layer`` scope) or the total kept equals ``sum(targets)`` (``global``); every layer keeps at least one."""
    remove: dict[str, list[int]] = {}
    if scope == "layer":
        for r, s in scores.items():
            k = sizes[r] - targets[r]
            order = torch.argsort(s, stable=True)
            remove[r] = sorted(int(i) for i in order[:max(k, 0)])
        return remove
    pool = []
    for r, s in scores.items():
        norm = s / s.abs().mean().clamp(min=1e-30)
        pool += [(float(v), r, i) for i, v in enumerate(norm)]
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

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in set(layers)]
    was = model.training
    model.eval()
    try:
        idx = sample_indices(len(data), config.samples, config.seed, data.y)
        for x, _ in data.batches(config.batch_size, idx, model_device(model)):
            model(x)
            count["n"] += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {k: (v / count["n"]).cpu() for k, v in sums.items()}


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
            if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                continue  # depthwise consumers lose the matching outputs too
            m = means[cname][idx].to(layer.weight)
            w = layer.weight[:, idx]
            delta = (w.reshape(w.shape[0], len(idx), -1).sum(2) * m).sum(1)
            bn = bn_of.get(layer)
            if bn is not None and bn.running_mean is not None:
                bn.running_mean -= delta.to(bn.running_mean)
            elif layer.bias is not None:
                layer.bias += delta.to(layer.bias)


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
        elif isinstance(mod, _BN) and len(shape) == 1:
            if not 1 <= shape[0] <= mod.num_features:
                raise LrpcError(f"the file's shape {shape} for {name} is outside 1..{mod.num_features}")
            new = type(mod)(shape[0], mod.eps, mod.momentum, mod.affine, mod.track_running_stats)
        else:
            raise LrpcError(f"the file resizes {name!r} ({type(mod).__name__}) with shape {shape!r}, which does not fit")
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], new)
    if hasattr(model, "widths"):
        _refresh_widths(model)
    return model


def _refresh_widths(model: nn.Module) -> None:
    """Keep a CIFAR ResNet's ``widths`` attribute truthful after its inner convolutions shrank."""
    convs = [m for n, m in model.named_modules() if n.endswith(".conv1") and n.count(".") == 2]
    if len(convs) == len(model.widths):
        model.widths = [int(m.out_channels) for m in convs]


def prune_channels(model: nn.Module, data: ImageData, config: ChannelPruneConfig,
                   show_progress: bool = True) -> StructuredResult:
    """Remove ``config.fraction`` of the prunable channels of a copy of ``model`` (left unchanged)."""
    import time

    tp = _tp()
    net = copy.deepcopy(model).eval()
    example = data.tensor(np.arange(1), model_device(net))
    before = module_shapes(net)
    graph = _graph(net, example)  # rebuilt only after each round's surgery
    groups = prunable_groups(net, example, graph)
    if not groups:
        raise LrpcError("the model has no channels that can be removed without touching residual additions")
    original = {g.root: g.size for g in groups}
    total = sum(original.values())
    removed: dict[str, list[int]] = {g.root: [] for g in groups}
    alive = {g.root: list(range(g.size)) for g in groups}  # original index of each current channel
    score_s = 0.0
    scores: dict[str, torch.Tensor] = {}
    for step in progress(range(1, config.steps + 1), desc="channels", unit="step",
                         disable=not show_progress or config.steps == 1):
        f = config.fraction * step / config.steps
        mods = dict(net.named_modules())
        sizes = {g.root: mods[g.root].out_channels for g in groups}
        if config.scope == "layer":
            targets = {r: max(1, original[r] - int(round(f * original[r]))) for r in sizes}
        else:
            keep_total = max(len(sizes), total - int(round(f * total)))
            targets = {r: 0 for r in sizes}
            targets[next(iter(targets))] = keep_total  # only the sum matters for global scope
        if sum(sizes.values()) <= sum(targets.values()):
            continue
        t0 = time.perf_counter()
        scores = channel_scores(net, data, groups, replace(config, seed=config.seed + step - 1),
                                show_progress=show_progress)
        score_s += time.perf_counter() - t0
        remove = select_channels(scores, sizes, targets, config.scope)
        if config.compensate:
            means = _input_means(net, data, [c for g in groups for c in g.consumers], config)
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
        graph = _graph(net, example)
        groups = [g for g in prunable_groups(net, example, graph) if g.root in original]
    if hasattr(net, "widths"):
        _refresh_widths(net)
    kept = sum(len(v) for v in alive.values()) / total
    return StructuredResult(net.eval(), {k: sorted(v) for k, v in removed.items()}, changed_shapes(before, net),
                            kept, score_s, scores)


__all__ = ["ChannelPruneConfig", "ChannelGroup", "StructuredResult", "CHANNEL_CRITERIA", "prunable_groups",
           "channel_scores", "select_channels", "prune_channels", "module_shapes", "changed_shapes", "apply_shapes"]
