"""Per-weight Layer-wise Relevance Propagation.

How it works. Within a scoring pass every layer with weights gets a forward hook that replaces its
output ``z`` with a *surrogate*: equal to ``z`` in value, whose gradient is the rule's relevance
redistribution. The gradient that reaches a layer's output is then ``R_j / z_j`` (relevance per unit
of activation), so ReLU, max-pooling, average pooling and residual additions between rule layers
propagate relevance by ordinary autograd: a residual sum splits its relevance between the branches
in proportion to their contributions. The rule's terms are computed from detached, modified copies
of the weights (leaves); the relevance of weight ``w_ij`` is ``leaf ⊙ ∂/∂leaf``, which for LRP-ε is
``Σ_{n,positions} a_i w_ij R_j / (z_j + ε·sign z_j)`` — the same quantity ECQx computes.

Canonization: a BatchNorm that directly follows a conv/linear layer is folded into it for the pass
(its hook passes the already-normalised surrogate through). Nothing is written to the model: all
hooks are removed in ``finally``, parameters and buffers are only read, and ReLU modules run with
``inplace=False`` only inside the pass (restored afterwards).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageData, sample_indices
from .errors import LrpcError
from .models import model_device
from .rules import COMPOSITES, IDENTITY, NEGATIVE, POSITIVE, WEIGHTED, ZERO, Composite, Rule, get_composite
from .progress import progress

START_POINTS = ("true", "predicted", "all", "contrast")

# Modules between rule layers that autograd propagates correctly under the gradient-ratio scheme:
# linear maps without bias (pooling, flatten, padding, shortcuts) and ReLU / max selections.
PASS_THROUGH: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.ZeroPad2d, nn.BatchNorm1d, nn.BatchNorm2d,
)


@dataclass(frozen=True)
class RelevanceConfig:
    """How to score: composite name, where relevance starts, stabiliser, samples, batch size, seed."""

    composite: str = "epsilon_plus"
    start: str = "true"
    epsilon: float = 1e-6
    samples: int = 512
    batch_size: int = 64
    seed: int = 0
    classes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.composite not in COMPOSITES:
            raise LrpcError(f"unknown LRP composite {self.composite!r}; choose one of {', '.join(COMPOSITES)}")
        if self.start not in START_POINTS:
            raise LrpcError(f"unknown start point {self.start!r}; choose one of {', '.join(START_POINTS)}")
        if self.samples < 1:
            raise LrpcError(f"samples must be at least 1, got {self.samples}")
        if self.batch_size < 1:
            raise LrpcError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.epsilon >= 0:
            raise LrpcError(f"epsilon must be >= 0, got {self.epsilon}")


@dataclass
class Relevance:
    """Relevance scores: per weight tensor (same name and shape as the parameter) and per output channel.

    ``weights[name]`` sums the relevance of each weight over samples and positions; ``channels[name]``
    is the relevance each output channel of that layer receives (its neuron relevance: the weights' and
    the bias's shares; only the stabiliser's tiny absorption is left out); ``inputs[name]`` the relevance
    of each input channel (weight relevance summed over the other axes).
    """

    weights: dict[str, torch.Tensor]
    channels: dict[str, torch.Tensor]
    samples: int
    config: RelevanceConfig
    start_total: float = 0.0
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.inputs:
            self.inputs = {k: v.transpose(0, 1).reshape(v.shape[1], -1).sum(1) if v.dim() > 1 else v
                           for k, v in self.weights.items()}

    def metadata(self) -> dict[str, str]:
        c = self.config
        return {"composite": c.composite, "start": c.start, "epsilon": repr(c.epsilon), "samples": str(self.samples),
                "seed": str(c.seed), "classes": ",".join(map(str, c.classes)) if c.classes else "all"}

    def save(self, path: str | Path) -> None:
        """Write weight relevance (and ``channel::`` entries) to a safetensors file, atomically."""
        from safetensors.torch import save as st_save

        from .io import atomic_write_bytes

        tensors = {k: v.contiguous() for k, v in self.weights.items()}
        tensors.update({f"channel::{k}": v.contiguous() for k, v in self.channels.items()})
        atomic_write_bytes(path, st_save(tensors, metadata=self.metadata()))


def layer_names(model: nn.Module) -> list[str]:
    """Names of the layers with weights, in registration order."""
    return [n for n, m in model.named_modules() if isinstance(m, WEIGHTED)]


def check_supported(model: nn.Module) -> None:
    """Raise an error naming the first leaf module that has no rule and no safe pass-through."""
    from .models import Add, OptionAShortcut

    allowed = WEIGHTED + PASS_THROUGH + (Add, OptionAShortcut)
    for name, m in model.named_modules():
        if len(list(m.children())) == 0 and not isinstance(m, allowed):
            raise LrpcError(
                f"module {name!r} of type {type(m).__name__} has no LRP rule; supported layers: conv, linear, "
                "BatchNorm, ReLU, pooling, flatten, dropout, residual additions"
            )


def _find_folds(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, nn.Module]:
    """Map each BatchNorm whose input is exactly the output of a conv/linear layer to that layer (data flow)."""
    produced: dict[int, nn.Module] = {}
    keep: list[torch.Tensor] = []
    folds: dict[nn.Module, nn.Module] = {}

    def on_out(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        produced[id(out)] = mod
        keep.append(out)

    def on_bn(mod: nn.Module, inp: tuple) -> None:
        src = produced.get(id(inp[0]))
        if src is not None:
            folds[mod] = src

    handles = []
    try:
        for m in model.modules():
            if isinstance(m, WEIGHTED):
                handles.append(m.register_forward_hook(on_out))
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                handles.append(m.register_forward_pre_hook(on_bn))
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return folds


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = bn.running_var, bn.running_mean
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale.detach(), shift.detach()


class _Relay(torch.autograd.Function):
    """Value: the layer's true output ``z``. Gradient to each rule term ``z_k``: the incoming gradient
    (relevance per unit of output) times ``c_k · z / stab(z_k)``."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, *terms_and_ratios: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n = len(terms_and_ratios) // 2
        ctx.save_for_backward(*terms_and_ratios[n:])
        return z.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ratios = ctx.saved_tensors
        return (None, *[grad * r for r in ratios], *[None] * len(ratios))


def _layer_fn(module: nn.Module):
    if isinstance(module, nn.Linear):
        return lambda x, w, b: F.linear(x, w, b)
    return lambda x, w, b: module._conv_forward(x, w, b)  # conv modules keep padding/stride/groups here


@dataclass
class _LayerState:
    name: str
    module: nn.Module
    rule: Rule
    fold: nn.Module | None
    weight_leaves: list[torch.Tensor] = field(default_factory=list)
    bias_leaves: list[torch.Tensor] = field(default_factory=list)
    pending: torch.Tensor | None = None  # the layer's input, kept until its BatchNorm runs

    def reset(self) -> None:
        """Forget the previous batch's leaves and pending input (call before each forward pass)."""
        self.weight_leaves.clear()
        self.bias_leaves.clear()
        self.pending = None


def _folded_params(layer: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer``'s weight and bias with the BatchNorm ``bn`` that reads its output folded in (detached; ``bn`` None:
    the layer's own)."""
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if bn is not None:
        scale, shift = _bn_affine(bn)
        w = w * scale.view((-1,) + (1,) * (w.dim() - 1))
        b = shift if b is None else b * scale + shift
    return w, b


def _effective_params(st: _LayerState) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _folded_params(st.module, st.fold)


def _surrogate(st: _LayerState, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Value ``z``; gradient: the rule's redistribution. Records weight and bias leaves for relevance."""
    w_eff, b_eff = _effective_params(st)
    z = z.detach()
    fn = _layer_fn(st.module)
    nonneg = bool(x.min() >= 0)
    zks, ratios = [], []
    for term in st.rule.terms:
        zk = None
        for part in term.parts:
            if part.inp is POSITIVE and nonneg:
                xin = x
            elif part.inp is NEGATIVE and nonneg:
                continue  # the negative part of a non-negative input is zero: skip its convolution
            elif part.inp is IDENTITY:
                xin = x
            else:
                xin = part.inp(x)
            leaf = part.weight(w_eff).detach().requires_grad_(True)
            st.weight_leaves.append(leaf)
            y = fn(xin, leaf, None)
            zk = y if zk is None else zk + y
        if zk is None:
            continue
        if b_eff is not None and term.bias is not ZERO:
            bias = term.bias(b_eff).detach().requires_grad_(True)
            st.bias_leaves.append(bias)
            zk = zk + bias.view((1, -1) + (1,) * (zk.dim() - 2))
        ratio = z / st.rule.stabilize(zk.detach(), term.sign)
        if term.coefficient != 1.0:
            ratio = ratio * term.coefficient
        zks.append(zk)
        ratios.append(ratio)
    if not zks:
        return z.clone()
    return _Relay.apply(z, *zks, *ratios)


@contextlib.contextmanager
def _eval_out_of_place(model: nn.Module) -> Iterator[None]:
    """Scope in which ``model`` is in eval mode and its ReLUs do not overwrite their inputs (so tensors captured by
    hooks keep their values and their place in the graph); both restored on exit."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU) and m.inplace]
    was_training = model.training
    try:
        model.eval()
        for m in relus:
            m.inplace = False
        yield
    finally:
        for m in relus:
            m.inplace = True
        model.train(was_training)


@contextlib.contextmanager
def lrp_pass(model: nn.Module, composite: Composite, example: torch.Tensor) -> Iterator[dict[str, _LayerState]]:
    """Scope in which ``model``'s forward computes LRP surrogates; the model is restored on exit."""
    check_supported(model)
    folds = {v: k for k, v in _find_folds(model, example).items()}  # layer -> its BatchNorm
    states: dict[str, _LayerState] = {}
    handles = []
    with _eval_out_of_place(model):
        try:
            first = True
            for name, m in model.named_modules():
                if not isinstance(m, WEIGHTED):
                    continue
                st = _LayerState(name, m, composite.rule_for(m, first), folds.get(m))
                first = False
                states[name] = st
                if st.fold is None:
                    handles.append(m.register_forward_hook(lambda mod, inp, out, st=st: _surrogate(st, inp[0], out)))
                else:  # the surrogate is built where the BatchNorm's output (the folded layer's z) appears
                    handles.append(m.register_forward_hook(lambda mod, inp, out, st=st: setattr(st, "pending", inp[0])))
                    handles.append(st.fold.register_forward_hook(
                        lambda mod, inp, out, st=st: _surrogate(st, st.pending, out)))
            yield states
        finally:
            for h in handles:
                h.remove()


def _start_grad(logits: torch.Tensor, y: torch.Tensor, start: str) -> torch.Tensor:
    """Relevance at the output is ``logits * g``; ``g`` per start point."""
    if start == "all":
        return torch.ones_like(logits)
    if start == "contrast":
        # d log p_y / d logits: the true class against the competitors the model finds probable, so evidence
        # shared by every class cancels (contrastive LRP in the spirit of Gu et al. 2018 / Iwana et al. 2019).
        return F.one_hot(y, logits.shape[1]).to(logits.dtype) - logits.detach().softmax(1)
    target = y if start == "true" else logits.argmax(1)
    return F.one_hot(target, logits.shape[1]).to(logits.dtype)


def relevance_batches(
    model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], config: RelevanceConfig,
    total: int | None = None, show_progress: bool = True,
) -> Relevance:
    """Sum per-weight relevance over the given (x, y) batches."""
    composite = get_composite(config.composite, config.epsilon)
    it = iter(batches)
    try:
        first_x, first_y = next(it)
    except StopIteration:
        raise LrpcError("no reference samples to compute relevance from") from None
    dtype = next(model.parameters()).dtype
    dev = model_device(model)
    acc_w: dict[str, torch.Tensor] = {}
    acc_c: dict[str, torch.Tensor] = {}
    n = 0
    start_total = 0.0

    def chain() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield first_x, first_y
        yield from it

    with lrp_pass(model, composite, first_x[:1].to(dev, dtype)) as states:
        bar = progress(chain(), total=total, desc="relevance", unit="batch", disable=not show_progress)
        for x, y in bar:
            x, y = x.to(dev, dtype), y.to(dev)
            for st in states.values():
                st.reset()
            logits = model(x)
            g = _start_grad(logits, y, config.start)
            start_total += float((logits.detach() * g).sum())
            leaves = [leaf for st in states.values() for leaf in (*st.weight_leaves, *st.bias_leaves)]
            grads = iter(torch.autograd.grad(logits, leaves, grad_outputs=g, allow_unused=True))
            for name, st in states.items():
                w_rel = torch.zeros(st.module.weight.shape, dtype=torch.float64, device=dev)
                c_rel = torch.zeros(st.module.weight.shape[0], dtype=torch.float64, device=dev)
                for leaf in st.weight_leaves:
                    gr = next(grads)
                    if gr is not None:
                        w_rel += (leaf.detach() * gr).double()
                for leaf in st.bias_leaves:
                    gr = next(grads)
                    if gr is not None:
                        c_rel += (leaf.detach() * gr).double()
                c_rel += w_rel.reshape(w_rel.shape[0], -1).sum(1)
                acc_w[name] = acc_w[name] + w_rel if name in acc_w else w_rel
                acc_c[name] = acc_c[name] + c_rel if name in acc_c else c_rel
            n += len(x)
    weights = {f"{k}.weight": v.cpu() for k, v in acc_w.items()}
    channels = {f"{k}.weight": v.cpu() for k, v in acc_c.items()}
    return Relevance(weights, channels, n, config, start_total)


def compute_relevance(model: nn.Module, data: ImageData, config: RelevanceConfig = RelevanceConfig(),
                      show_progress: bool = True) -> Relevance:
    """Per-weight relevance of ``model`` summed over ``config.samples`` reference images of ``data``.

    Pass training data: the samples are drawn (class-balanced, seeded) from ``data``. The model is
    left exactly as it was.
    """
    idx = sample_indices(len(data), config.samples, config.seed, data.y)
    nb = -(-len(idx) // config.batch_size)
    rel = relevance_batches(model, data.batches(config.batch_size, idx), config, total=nb, show_progress=show_progress)
    return replace(rel, samples=len(idx))


def referenced_channel_relevance(model: nn.Module, data: ImageData, readers: Mapping[str, Sequence[str]],
                                 reference: Mapping[str, torch.Tensor], config: RelevanceConfig = RelevanceConfig(),
                                 show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Relevance of each input channel of the ``readers`` layers measured from a reference input, per key.

    For every reference sample and every input channel ``c`` of a reader: ``|Σ_positions (a − ā_c) · g|``,
    where ``a`` is the reader's input, ``ā = reference[layer]`` (one value per input channel) and ``g`` the
    relevance per unit of that input under ``config``'s composite (the gradient, for ε → 0), summed over
    samples. It is the first-order change of the start relevance when channel ``c`` is replaced by ``ā_c``:
    what removing the channel with mean compensation does, where plain relevance measures the distance to
    zero (Deep Taylor decomposition with the root point at ``ā``). A tensor read by several layers of one
    key counts once. Float64 on CPU, keyed like ``readers``.
    """
    idx = sample_indices(len(data), config.samples, config.seed, data.y)
    composite = get_composite(config.composite, config.epsilon)
    dev = model_device(model)
    dtype = next(model.parameters()).dtype
    mods = dict(model.named_modules())
    missing = sorted({n for ls in readers.values() for n in ls if n not in mods or n not in reference})
    if missing:
        raise LrpcError(f"no such layer or no reference input for: {', '.join(missing)}")
    seen: dict[str, torch.Tensor] = {}
    handles = [mods[n].register_forward_pre_hook(lambda _m, inp, n=n: seen.__setitem__(n, inp[0]))
               for n in {n for ls in readers.values() for n in ls}]
    acc: dict[str, torch.Tensor] = {}
    try:
        with lrp_pass(model, composite, data.tensor(idx[:1], dev).to(dtype)) as states:
            bar = progress(data.batches(config.batch_size, idx, dev), total=-(-len(idx) // config.batch_size),
                           desc="relevance", unit="batch", disable=not show_progress)
            for x, y in bar:
                seen.clear()
                for st in states.values():
                    st.reset()
                logits = model(x.to(dtype))
                pairs = []  # (key, layer, tensor), each tensor once per key
                for key, layers in readers.items():
                    ids: set[int] = set()
                    for n in layers:
                        t = seen.get(n)
                        if t is not None and t.requires_grad and id(t) not in ids:
                            ids.add(id(t))
                            pairs.append((key, n, t))
                grads = torch.autograd.grad(logits, [t for _, _, t in pairs],
                                            grad_outputs=_start_grad(logits, y, config.start), allow_unused=True)
                for (key, n, t), g in zip(pairs, grads):
                    if g is None:
                        continue
                    ref = reference[n].to(dev, torch.float64).view((1, -1) + (1,) * (t.dim() - 2))
                    d = (t.detach().double() - ref) * g.double()
                    if d.dim() > 2:  # positions; a flat input (N × features) has none
                        d = d.sum(tuple(range(2, d.dim())))
                    s = d.abs().sum(0)
                    acc[key] = acc[key] + s if key in acc else s
    finally:
        for h in handles:
            h.remove()
    for key, layers in readers.items():
        if key not in acc:
            raise LrpcError(f"no relevance reached the inputs of {', '.join(layers)}: are they on the path to the output?")
    return {k: v.cpu() for k, v in acc.items()}


REMOVAL_REFERENCES = ("zero", "mean")


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    """N × C sums over positions (a flat N × F tensor is its own)."""
    return t.flatten(2).sum(2) if t.dim() > 2 else t


@dataclass(frozen=True)
class ModulePass:
    """One batch of :func:`module_passes`: per module (keyed by name) its input, its output and ``g``, the
    relevance per unit of that output (or the plain gradient of the start), all detached; the start logits and
    the start gradient ``g0`` (``Σ logits · g0`` is the start relevance)."""

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    logits: torch.Tensor
    start_grad: torch.Tensor


def module_passes(model: nn.Module, data: ImageData, modules: Sequence[str],
                  config: RelevanceConfig = RelevanceConfig(), lrp: bool = True, desc: str = "module relevance",
                  show_progress: bool = True) -> Iterator[ModulePass]:
    """Yield, for each batch of ``config``'s reference samples, what reaches and leaves each named module.

    Each module must return a tensor of its input's shape (a residual block). ``g`` is taken under ``config``'s
    composite (``lrp=True``) or plain (``lrp=False``); a module the batch's graph does not reach gets ``g = 0``,
    one that did not run is left out of that batch. The hooks and the LRP scope are removed when the generator
    is exhausted or closed; the model is left as it was.
    """
    idx = sample_indices(len(data), config.samples, config.seed, data.y)
    dev = model_device(model)
    dtype = next(model.parameters()).dtype
    mods = dict(model.named_modules())
    unknown = [n for n in modules if n not in mods or not n]
    if unknown:
        raise LrpcError(f"no such module: {unknown[0]!r}")
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [mods[n].register_forward_hook(lambda _m, inp, out, n=n: seen.__setitem__(n, (inp[0], out)))
               for n in modules]
    scope = (lrp_pass(model, get_composite(config.composite, config.epsilon), data.tensor(idx[:1], dev).to(dtype))
             if lrp else _eval_out_of_place(model))
    try:
        with scope as states:  # LRP layer states, or None for plain gradients
            bar = progress(data.batches(config.batch_size, idx, dev), total=-(-len(idx) // config.batch_size),
                           desc=desc, unit="batch", disable=not show_progress)
            for x, y in bar:
                seen.clear()
                for st in (states or {}).values():
                    st.reset()
                x = x.to(dtype).requires_grad_(True)  # the graph reaches every module even with frozen weights
                logits = model(x)
                names = [n for n in modules if n in seen]
                for n in names:
                    if seen[n][0].shape != seen[n][1].shape:
                        raise LrpcError(f"{n} changes the shape of its input; only such modules can be removed")
                g0 = _start_grad(logits, y, config.start)
                grads = torch.autograd.grad(logits, [seen[n][1] for n in names], grad_outputs=g0, allow_unused=True)
                yield ModulePass(inputs={n: seen[n][0].detach() for n in names},
                                 outputs={n: seen[n][1].detach() for n in names},
                                 grads={n: torch.zeros_like(seen[n][1]) if g is None else g
                                        for n, g in zip(names, grads)},
                                 logits=logits.detach(), start_grad=g0)
    finally:
        for h in handles:
            h.remove()


def removal_relevance(model: nn.Module, data: ImageData, modules: Sequence[str],
                      config: RelevanceConfig = RelevanceConfig(), lrp: bool = True, reference: str = "zero",
                      show_progress: bool = True) -> dict[str, float]:
    """How much the start relevance rests on what each named module changes, per module (low: replaceable).

    Each module must return a tensor of its input's shape (a residual block). For every reference sample:
    ``|Σ (out − in − m) · g|``, where ``out − in`` is what the module adds to its input, ``g`` the relevance per unit
    of its output under ``config``'s composite (``lrp=False``: the plain gradient of the start, first-order
    Taylor), and ``m`` zero (``reference="zero"``) or the module's mean change per channel over the reference
    samples (``"mean"``: the part of the change a constant shift cannot replace; recovery training re-learns
    shifts), summed over samples. It is the first-order change of the start relevance when the module is replaced
    by the identity (plus ``m``), as :func:`referenced_channel_relevance` is for a channel replaced by its mean.
    The model is left as it was; float64 sums keyed like ``modules``.
    """
    if reference not in REMOVAL_REFERENCES:
        raise LrpcError(f"unknown reference {reference!r}; choose one of {', '.join(REMOVAL_REFERENCES)}")
    # per sample: Σ d·g, and Σ_positions g per channel; per module: Σ d per channel and the number of positions,
    # so that the mean change is subtracted after the pass (Σ (d − m)·g = Σ d·g − m · Σ_positions g)
    dg: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    g_sum: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    d_sum: dict[str, torch.Tensor] = {}
    positions = dict.fromkeys(modules, 0)
    passes = module_passes(model, data, modules, config, lrp, desc="block relevance" if lrp else "block taylor",
                           show_progress=show_progress)
    with contextlib.closing(passes):  # the hooks go even when a batch raises
        for step in passes:
            for n, g in step.grads.items():
                d = (step.outputs[n] - step.inputs[n]).double()
                g = g.double()
                dg[n].append((d * g).flatten(1).sum(1).cpu())
                g_sum[n].append(_per_channel(g).cpu())
                d_sum[n] = d_sum.get(n, 0) + _per_channel(d).sum(0).cpu()
                positions[n] += d[0, 0].numel() * len(d) if d.dim() > 2 else len(d)
    acc = {}
    for n in modules:
        if not dg[n]:
            raise LrpcError(f"{n} did not run in the model's forward pass")
        s = torch.cat(dg[n])
        if reference == "mean":
            s = s - torch.cat(g_sum[n]) @ (d_sum[n] / positions[n])
        acc[n] = float(s.abs().sum())
    return acc


def taylor_scores(model: nn.Module, data: ImageData, samples: int = 512, batch_size: int = 64, seed: int = 0,
                  show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Gradient×weight scores of the true-class logit, summed over samples (the first-order Taylor baseline)."""
    idx = sample_indices(len(data), samples, seed, data.y)
    names = layer_names(model)
    mods = dict(model.named_modules())
    params = [mods[n].weight for n in names]
    dev = model_device(model)
    acc = [torch.zeros(p.shape, dtype=torch.float64, device=dev) for p in params]
    with _eval_out_of_place(model):
        bar = progress(data.batches(batch_size, idx, dev), total=-(-len(idx) // batch_size), desc="taylor",
                       unit="batch", disable=not show_progress)
        for x, y in bar:
            logits = model(x)
            g = torch.autograd.grad(logits, params, grad_outputs=F.one_hot(y, logits.shape[1]).to(logits.dtype))
            for a, gi, p in zip(acc, g, params):
                a += (gi * p.detach()).double()
    return {f"{n}.weight": a.cpu() for n, a in zip(names, acc)}


def load_relevance(path: str | Path) -> tuple[dict[str, torch.Tensor], Mapping[str, str]]:
    """Read a relevance file written by :meth:`Relevance.save` (weights only) and its metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys() if not k.startswith("channel::")}, meta
    except Exception as exc:
        raise LrpcError(f"cannot read relevance file {path}: {exc}") from None


__all__ = ["RelevanceConfig", "Relevance", "compute_relevance", "relevance_batches", "taylor_scores",
           "referenced_channel_relevance", "removal_relevance", "module_passes", "ModulePass", "lrp_pass",
           "layer_names", "check_supported", "load_relevance", "START_POINTS"]
