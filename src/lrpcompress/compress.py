"""The compression pipeline: score → prune → allocate bits → quantize → pack.

One public verb, :func:`compress`, takes a model, training data and a frozen :class:`CompressConfig`
and returns a :class:`CompressedModel` that can be saved as `.lrpc`, rebuilt as an ``nn.Module``,
and measured. Named methods (``paper``, ``lrp``, ``magnitude``, …) are just configurations:
:func:`method_config`.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from .allocation import allocate_optimal, allocate_tiers, layer_costs
from .data import ImageData, sample_indices
from .errors import LrpcError
from .models import build_model, dense_bytes, is_builtin_arch, model_device
from .packing import Payload, decode, encode, load_payload, quant_bytes, save_payload
from .pruning import PruneConfig, prune_masks
from .recovery import FinetuneConfig, finetune
from .calibration import ActivationStats, activation_stats, input_hessians
from .quantization import (VALID_BITS, GroupLayout, QuantTensor, check_grid, compose_rows, gptq_candidates, gptq_round,
                           quantize_tensor)
from .relevance import RelevanceConfig, _bn_affine, _find_folds, compute_relevance, layer_names, taylor_scores

SCORES = ("lrp", "taylor", "deeplift", "magnitude", "random", "none")
ALLOCATIONS = ("uniform", "tiers", "optimal")
PRUNE_SCORES = ("relevance", "abs_relevance", "magnitude", "taylor", "deeplift", "random")
ROUNDINGS = ("nearest", "gptq")


@dataclass(frozen=True)
class QuantConfig:
    """Mixed-precision settings.

    ``allocation``: ``uniform`` (every group ``bits``), ``tiers`` (the paper's: top third of channels by
    importance ``bits+1``, bottom third ``bits-1``) or ``optimal`` (minimise importance-weighted error
    under the byte budget; without a budget, the budget of uniform ``bits``).
    ``importance``: the scores that weight the error (``lrp``, ``taylor``, ``random``, ``none`` = plain
    MSE); see :func:`channel_importance`. ``activation_aware`` weights errors by the input power.
    ``overrides``: fnmatch pattern → fixed bits for matching weight names (mixed precision as configuration).
    ``group_size``: columns per scale group (``None``: one group per output channel).
    ``grid``: levels of 2..8-bit groups: ``symmetric`` (zero is a level, one code of 2^b unused) or
    ``midrise`` (all 2^b codes, no zero level; 2 bits then give 4 levels instead of 3).
    ``entropy_coding``: the file may store survivor masks and codes with rANS (format version 3) where that
    is shorter, and the allocator prices codes by their estimated coded size instead of ``b`` bits each.
    ``rounding``: ``gptq`` (error-compensating rounding against each layer's input Hessian on the reference
    data, :func:`~lrpcompress.quantization.gptq_round`; the allocator then measures each channel's error at the
    layer's output through that Hessian) or ``nearest`` (every weight to its nearest level). Same bit-widths,
    scales and file layout either way; other codes.
    """

    allocation: str = "optimal"
    bits: int = 4
    importance: str = "lrp"
    power: float = 0.25
    activation_aware: bool = True
    group_size: int | None = None
    bit_options: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8)
    overrides: Mapping[str, int] = field(default_factory=dict)
    search_clip: bool = True
    float_dtype: str = "float16"
    grid: str = "symmetric"
    entropy_coding: bool = True
    rounding: str = "gptq"

    def __post_init__(self) -> None:
        check_grid(self.grid)
        if self.rounding not in ROUNDINGS:
            raise LrpcError(f"unknown rounding {self.rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        if self.allocation not in ALLOCATIONS:
            raise LrpcError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.importance not in SCORES:
            raise LrpcError(f"unknown importance {self.importance!r}; choose one of {', '.join(SCORES)}")
        if not 1 <= self.bits <= 8:
            raise LrpcError(f"bits must be between 1 and 8, got {self.bits}")
        bad = [b for b in (*self.bit_options, *self.overrides.values()) if b not in VALID_BITS]
        if bad or not self.bit_options:
            raise LrpcError(f"bit-widths must be 1..8 (0 = prune the group, 16 = float16), got {bad or '[]'}")
        if self.group_size is not None and self.group_size < 1:
            raise LrpcError(f"group_size must be a positive int or None, got {self.group_size}")
        if self.float_dtype not in ("float16", "float32"):
            raise LrpcError(f"float_dtype must be float16 or float32, got {self.float_dtype!r}")


@dataclass(frozen=True)
class CompressConfig:
    """Everything a compression run needs; ``target_ratio``/``target_bytes`` ask for a file size."""

    relevance: RelevanceConfig = RelevanceConfig()
    prune: PruneConfig = PruneConfig()
    prune_score: str = "magnitude"
    quant: QuantConfig = QuantConfig()
    target_ratio: float | None = None
    target_bytes: int | None = None
    fold_bn: bool = True
    bias_correction: bool = True
    finetune: FinetuneConfig = FinetuneConfig(epochs=0)
    seed: int = 0
    method: str = "custom"

    def __post_init__(self) -> None:
        if self.prune_score not in PRUNE_SCORES:
            raise LrpcError(f"unknown prune score {self.prune_score!r}; choose one of {', '.join(PRUNE_SCORES)}")
        if self.target_ratio is not None and self.target_bytes is not None:
            raise LrpcError("give either a target ratio or a target size in bytes, not both")
        if self.target_ratio is not None and not self.target_ratio > 1.0:
            raise LrpcError(f"target ratio must be > 1, got {self.target_ratio}")
        if self.target_bytes is not None and self.target_bytes < 1:
            raise LrpcError(f"target bytes must be positive, got {self.target_bytes}")
        if (self.target_ratio or self.target_bytes) and self.quant.allocation != "optimal":
            raise LrpcError("a size target needs the optimal bit allocation (--allocation optimal)")


def method_config(method: str, **overrides: Any) -> CompressConfig:
    """A named method as a configuration. ``overrides`` replace top-level fields."""
    rel = RelevanceConfig()
    table: dict[str, CompressConfig] = {
        # the paper's literal recipe: LRP-ε, prune every weight with relevance <= 0, relevance-tiered bits
        "paper": CompressConfig(relevance=replace(rel, composite="epsilon"), prune=PruneConfig("nonpositive"),
                                prune_score="relevance", bias_correction=False,
                                quant=QuantConfig(allocation="tiers", importance="lrp", bits=4, power=1.0,
                                                  activation_aware=False, rounding="nearest")),
        # the project's default: z+ channel relevance weights the quantization error of an optimal allocation
        "lrp": CompressConfig(relevance=rel, quant=QuantConfig(allocation="optimal", importance="lrp")),
        # plain baselines round to nearest, as their tools do; `gptq` is uniform bits with GPTQ's rounding
        "magnitude": CompressConfig(prune=PruneConfig("fraction", 0.0), prune_score="magnitude",
                                    quant=QuantConfig(allocation="uniform", importance="none", rounding="nearest")),
        "taylor": CompressConfig(quant=QuantConfig(allocation="optimal", importance="taylor")),
        "random": CompressConfig(quant=QuantConfig(allocation="optimal", importance="random")),
        "mse": CompressConfig(quant=QuantConfig(allocation="optimal", importance="none")),
        # Sabih et al. 2020 in spirit: DeepLIFT channel scores rank filters for pruning and set tiered bits
        "deeplift": CompressConfig(prune=PruneConfig("fraction", 0.0, scope="layer"), prune_score="deeplift",
                                   bias_correction=False,
                                   quant=QuantConfig(allocation="tiers", importance="deeplift", bits=4, power=1.0,
                                                     activation_aware=False, rounding="nearest")),
        "uniform": CompressConfig(quant=QuantConfig(allocation="uniform", importance="none", rounding="nearest")),
        "gptq": CompressConfig(prune=PruneConfig("fraction", 0.0), prune_score="magnitude",
                               quant=QuantConfig(allocation="uniform", importance="none", rounding="gptq")),
    }
    if method not in table:
        raise LrpcError(f"unknown method {method!r}; choose one of {', '.join(table)}")
    return replace(table[method], method=method, **overrides)


METHODS = ("paper", "lrp", "magnitude", "taylor", "deeplift", "random", "mse", "uniform", "gptq")


# ------------------------------------------------------------------ canonical (BN-folded) weights

@dataclass
class Canonical:
    """The model's state with BatchNorm folded into the preceding layer where possible."""

    weights: dict[str, torch.Tensor]  # name -> (folded) weight to quantize
    floats: dict[str, torch.Tensor]  # everything else that is stored
    folded: list[str]  # BatchNorm module names folded away
    fold_owner: dict[str, str] = field(default_factory=dict)  # BatchNorm name -> layer name


def canonicalize(model: nn.Module, example: torch.Tensor, fold_bn: bool = True) -> Canonical:
    """Fold every BatchNorm fed directly by a conv/linear layer into it (scale into the weight, shift kept)."""
    folds = _find_folds(model, example) if fold_bn else {}
    by_layer = {v: k for k, v in folds.items()}
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    weights, floats, folded, owner = {}, {}, [], {}
    skip: set[str] = set()
    for lname in layer_names(model):
        layer = modules[lname]
        w = layer.weight.detach().float().cpu().clone()
        b = layer.bias.detach().float().cpu().clone() if layer.bias is not None else None
        bn = by_layer.get(layer)
        if bn is not None:
            bname = names[bn]
            scale, shift = (t.float().cpu() for t in _bn_affine(bn))
            w = w * scale.view((-1,) + (1,) * (w.dim() - 1))
            shift = shift + (b * scale if b is not None else 0)
            floats[f"{bname}.bias"] = shift
            if b is not None:
                floats[f"{lname}.bias"] = torch.zeros_like(b)
            folded.append(bname)
            owner[bname] = lname
            skip.update(f"{bname}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))
        elif b is not None:
            floats[f"{lname}.bias"] = b
        weights[f"{lname}.weight"] = w
    for k, v in model.state_dict().items():
        if k in weights or k in floats or k in skip or not v.is_floating_point():
            continue
        floats[k] = v.detach().float().cpu().clone()
    return Canonical(weights, floats, folded, owner)


def _folded_bn_state(model: nn.Module, folded: list[str], floats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mods = dict(model.named_modules())
    out = {}
    for bname in folded:
        bn = mods[bname]
        n = bn.num_features
        out[f"{bname}.weight"] = torch.ones(n)
        out[f"{bname}.bias"] = floats[f"{bname}.bias"]
        out[f"{bname}.running_mean"] = torch.zeros(n)
        out[f"{bname}.running_var"] = torch.full((n,), 1.0 - bn.eps)
    return out


# ------------------------------------------------------------------ the compressed model

@dataclass
class CompressedModel:
    """Quantized weights plus float tensors and an architecture description; saves as `.lrpc`."""

    model_spec: dict[str, Any]
    tensors: dict[str, QuantTensor | torch.Tensor]
    float_dtype: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> Payload:
        return Payload(self.model_spec, self.tensors, self.float_dtype, self.metadata)

    def to_bytes(self) -> bytes:
        return encode(self.payload())

    def save(self, path: str | Path) -> int:
        return save_payload(self.payload(), path)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Float32 tensors exactly as the file stores them (dequantized; float16 round-tripped)."""
        out = {}
        for k, t in self.tensors.items():
            if isinstance(t, QuantTensor):
                out[k] = t.dequantize()
            else:
                dt = torch.float16 if self.float_dtype.get(k, "float16") == "float16" else torch.float32
                out[k] = t.to(dt).float()
        return out

    def to_module(self, model: nn.Module | None = None) -> nn.Module:
        """Rebuild a runnable model. In memory the architecture was named by the caller, so a user's
        ``package.module:function`` factory may be imported here (files never import code)."""
        if model is None:
            spec = self.model_spec
            model = build_model(spec["arch"], spec["num_classes"], spec.get("widths"), allow_import=True)
        return module_from_payload(self.payload(), model)

    def layer_table(self) -> list[dict[str, Any]]:
        rows = []
        for k, t in self.tensors.items():
            if not isinstance(t, QuantTensor):
                continue
            numel = t.mask.size
            eb = t.element_bits()[t.mask]
            rows.append({"name": k, "shape": list(t.shape), "kept": float(t.mask.mean()),
                         "mean_bits": float(eb.mean()) if eb.size else 0.0,
                         "bits": sorted(set(int(b) for b in np.unique(t.bits))), "grid": t.grid,
                         "bytes": quant_bytes(t), "numel": int(numel)})
        return rows

    def stats(self) -> dict[str, float]:
        q = [t for t in self.tensors.values() if isinstance(t, QuantTensor)]
        total = sum(t.mask.size for t in q)
        kept = sum(int(t.mask.sum()) for t in q)
        bits = sum(t.payload_bits() for t in q)
        return {"sparsity": 1.0 - kept / max(total, 1), "mean_bits": bits / max(kept, 1),
                "bits_per_weight": bits / max(total, 1)}


def module_from_payload(payload: Payload, model: nn.Module | None = None) -> nn.Module:
    """Build the architecture named in ``payload`` (or use ``model``) and load the stored tensors."""
    spec = payload.model
    arch = spec.get("arch")
    if model is None:
        if not isinstance(arch, str) or not is_builtin_arch(arch):
            raise LrpcError(f"the file's architecture {arch!r} is not built in; pass --arch (or a model) to load it")
        num_classes = spec.get("num_classes")
        widths = spec.get("widths")
        if not isinstance(num_classes, int) or num_classes < 1 or num_classes > 100000:
            raise LrpcError(f"the file's num_classes {num_classes!r} is invalid")
        if widths is not None and (not isinstance(widths, list) or not all(isinstance(w, int) for w in widths)):
            raise LrpcError("the file's widths must be a list of ints")
        model = build_model(arch, num_classes, widths, allow_import=False)
    if spec.get("removed") is not None:
        from .blocks import apply_removed

        model = apply_removed(model, spec["removed"])
    if spec.get("shapes") is not None:
        from .structured import apply_shapes

        model = apply_shapes(model, spec["shapes"])
    folded = spec.get("folded", [])
    if not isinstance(folded, list) or not all(isinstance(f, str) for f in folded):
        raise LrpcError("the file's folded list must hold module names")
    mods = dict(model.named_modules())
    for b in folded:
        if not isinstance(mods.get(b), nn.modules.batchnorm._BatchNorm):
            raise LrpcError(f"the file folds {b!r}, which is not a BatchNorm of this architecture")
        if f"{b}.bias" not in payload.tensors:
            raise LrpcError(f"the file folds {b!r} but stores no shift for it")
    tensors = CompressedModel(spec, payload.tensors, payload.float_dtype).state_dict()
    state = _folded_bn_state(model, folded, tensors)
    state.update({k: v for k, v in tensors.items() if k not in state})
    own = model.state_dict()
    needed = [k for k, v in own.items() if v.is_floating_point()]
    missing = [k for k in needed if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise LrpcError(f"the file does not match the architecture {arch!r}: "
                        f"missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise LrpcError(f"the file does not match the architecture: {k} is {tuple(v.shape)}, "
                            f"the model needs {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)
    return model.eval()


def load_compressed(path: str | Path, model: nn.Module | None = None) -> tuple[nn.Module, Payload]:
    """Load a `.lrpc` file into a runnable model (eval mode)."""
    payload = load_payload(path)
    return module_from_payload(payload, model), payload


# ------------------------------------------------------------------ scores and importance

@dataclass
class Scores:
    """Per-weight and per-output-channel scores from one source."""

    weights: dict[str, torch.Tensor]
    channels: dict[str, torch.Tensor]
    seconds: float = 0.0


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def score_key(source: str, config: CompressConfig) -> str:
    """Cache key of a score source under ``config`` (sources depend on the relevance settings)."""
    r = config.relevance
    key = f"{source}:{r.samples}:{r.seed}:{r.classes}"
    return f"{key}:{r.composite}:{r.start}:{r.epsilon}" if source == "lrp" else key


def compute_scores(source: str, model: nn.Module, data: ImageData, config: CompressConfig,
                   show_progress: bool = True) -> Scores:
    t0 = time.perf_counter()
    names = [f"{n}.weight" for n in layer_names(model)]
    params = dict(model.named_parameters())
    if source == "lrp":
        rel = compute_relevance(model, data, config.relevance, show_progress)
        return Scores(rel.weights, rel.channels, time.perf_counter() - t0)
    if source == "taylor":
        w = taylor_scores(model, data, config.relevance.samples, config.relevance.batch_size, config.relevance.seed,
                          show_progress)
        return Scores(w, {k: _channel_sum(v) for k, v in w.items()}, time.perf_counter() - t0)
    if source == "deeplift":
        from .baselines import deeplift_channels

        r = config.relevance
        ch = deeplift_channels(model, data, r.samples, r.batch_size, r.seed, show_progress)
        w = {k: v.view((-1,) + (1,) * (params[k].dim() - 1)).expand_as(params[k]).clone() for k, v in ch.items()}
        return Scores(w, ch, time.perf_counter() - t0)
    if source == "magnitude":
        w = {k: params[k].detach().abs().double().cpu() for k in names}
        return Scores(w, {k: _channel_sum(v) for k, v in w.items()}, time.perf_counter() - t0)
    if source == "random":
        g = torch.Generator().manual_seed(config.seed)
        w = {k: torch.rand(params[k].shape, generator=g, dtype=torch.float64) for k in names}
        return Scores(w, {k: _channel_sum(v) for k, v in w.items()}, time.perf_counter() - t0)
    raise LrpcError(f"unknown score source {source!r}")


def channel_importance(weights: Mapping[str, torch.Tensor], stats: ActivationStats | None,
                       channels: Mapping[str, torch.Tensor] | None, power: float,
                       input_power: bool = True) -> dict[str, torch.Tensor]:
    """Per-element weights of the squared quantization error.

    ``E[a_i²] · (ρ_c / mean_layer ρ)^power`` where ``a_i`` is the input feeding weight ``i`` (so the error is
    measured at the layer's output, as in activation-aware quantization) and ``ρ_c = |score_c| / E|z_c|`` is
    the score of output channel ``c`` per unit of its activation. ``channels=None`` drops the score factor;
    ``stats=None`` drops the activation factor (plain weight MSE); ``input_power=False`` drops ``E[a_i²]`` only
    (for errors measured through the input Hessian, whose diagonal it is).
    """
    out = {}
    for k, w in weights.items():
        imp = torch.ones_like(w)
        if input_power and stats is not None and k in stats.input_power:
            p = stats.input_power[k].float()
            if w.dim() >= 2 and p.numel() == w.shape[1]:
                imp = imp * p.view((1, -1) + (1,) * (w.dim() - 2))
            else:  # grouped convolutions: fall back to the layer's mean input power
                imp = imp * float(p.mean())
        if channels is not None:
            rho = channels[k].double().abs()
            if stats is not None and k in stats.output_abs:
                rho = rho / stats.output_abs[k].double().clamp(min=1e-12)
            rho = (rho / rho.mean().clamp(min=1e-30)).clamp(min=1e-3) ** power
            imp = imp * rho.float().view((-1,) + (1,) * (w.dim() - 1))
        out[k] = imp.expand_as(w).contiguous()
    return out


# ------------------------------------------------------------------ the verb

@dataclass
class CompressResult:
    compressed: CompressedModel
    file_bytes: int
    dense_bytes: int
    seconds: float
    score_seconds: float
    masks: dict[str, torch.Tensor]
    bits: dict[str, np.ndarray]
    # what fitting a fine-tuned version back into the size target needs (finetune_result)
    target_bytes: int | None = None
    quant: QuantConfig | None = None
    importance: dict[str, torch.Tensor | None] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.file_bytes


def _layout(w: torch.Tensor, group_size: int | None) -> GroupLayout:
    cols = int(np.prod(w.shape[1:])) if w.dim() > 1 else 1
    return GroupLayout(tuple(w.shape), min(group_size or cols, cols))


def compress(model: nn.Module, train: ImageData, config: CompressConfig, arch: str, num_classes: int | None = None,
             scores: dict[str, Any] | None = None, show_progress: bool = True,
             model_spec_extra: Mapping[str, Any] | None = None, teacher: nn.Module | None = None) -> CompressResult:
    """Compress ``model`` (left unchanged) with reference data ``train``; see :class:`CompressConfig`.

    ``teacher`` is the model fine-tuning distils from when ``config.finetune.distill`` > 0 (default ``model``;
    pass the dense model when ``model`` was slimmed by structured pruning).

    ``scores`` is a cache: precomputed :class:`Scores` by source name (and ``"stats"``) are reused, and
    what this call computes is added to it, so several configurations can share one scoring pass.
    """
    t0 = time.perf_counter()
    model.eval()
    example = train.tensor(np.arange(1), model_device(model))
    canon = canonicalize(model, example, config.fold_bn)
    scores = scores if scores is not None else {}
    needed = {config.quant.importance} - {"none"}
    prune_src = {"relevance": "lrp", "abs_relevance": "lrp"}.get(config.prune_score, config.prune_score)
    if config.prune.criterion != "none" and not (config.prune.criterion == "fraction" and config.prune.sparsity == 0):
        needed.add(prune_src)
    if config.quant.allocation == "tiers" and config.quant.importance == "none":
        raise LrpcError("tiered allocation needs an importance score (lrp, taylor or random)")
    score_seconds = 0.0
    for src in sorted(needed):
        if score_key(src, config) not in scores:
            scores[score_key(src, config)] = compute_scores(src, model, train, config, show_progress)
            score_seconds += scores[score_key(src, config)].seconds

    # pruning
    if prune_src in needed:
        pscore = scores[score_key(prune_src, config)].weights
        if config.prune_score == "abs_relevance":
            pscore = {k: v.abs() for k, v in pscore.items()}
        masks = prune_masks({k: pscore[k] for k in canon.weights}, config.prune)
    else:
        masks = {k: torch.ones(v.shape, dtype=torch.bool) for k, v in canon.weights.items()}

    # bit allocation
    q = config.quant
    fixed = {k: b for k in canon.weights for pat, b in q.overrides.items() if fnmatch.fnmatch(k, pat)}
    free = [k for k in canon.weights if k not in fixed]
    layouts = {k: _layout(w, q.group_size) for k, w in canon.weights.items()}
    imp_channels = scores[score_key(q.importance, config)].channels if q.importance != "none" else None
    bits: dict[str, np.ndarray] = {k: np.full(layouts[k].n_groups, b, np.int64) for k, b in fixed.items()}
    d_bytes = dense_bytes(model)
    spec = {"arch": arch, "num_classes": int(num_classes if num_classes is not None else _num_classes(model)),
            "widths": getattr(model, "widths", None) if arch in ("resnet20", "resnet32", "resnet44", "resnet56") else None,
            "classes": None, "folded": canon.folded}
    spec.update(model_spec_extra or {})
    if spec["widths"] is not None and spec["widths"] == _default_widths(arch):
        spec["widths"] = None
    if is_builtin_arch(arch) and not ("shapes" in spec and "removed" in spec):
        # a slimmed model (any tool) stores the blocks it removed and its channel counts
        from .blocks import apply_removed, replaced_blocks
        from .structured import changed_shapes, module_shapes

        fresh = build_model(arch, spec["num_classes"], spec["widths"], allow_import=False)
        spec.setdefault("removed", replaced_blocks(fresh, model))
        fresh = apply_removed(fresh, spec["removed"])
        spec.setdefault("shapes", changed_shapes(module_shapes(fresh), model) or None)
    for key in ("removed", "shapes"):  # absent when empty: files of unpruned models keep their bytes
        if not spec.get(key):
            spec.pop(key, None)

    hessians: Mapping[str, torch.Tensor] = {}
    if q.rounding == "gptq":
        if score_key("hessians", config) not in scores:
            r = config.relevance
            scores[score_key("hessians", config)] = input_hessians(
                model, train, sample_indices(len(train), r.samples, r.seed, train.y), r.batch_size)
        hessians = scores[score_key("hessians", config)]
    # per-channel layers under GPTQ: every width's result is computed once; an allocation picks rows of them
    rowwise = {k for k in canon.weights if k in hessians and layouts[k].per_row == 1}
    rounded: dict[str, dict[int, QuantTensor]] = {}

    def candidates(k: str, widths) -> dict[int, QuantTensor]:
        have = rounded.setdefault(k, {})
        missing = sorted(set(int(b) for b in widths) - set(have))
        if missing:
            have.update(gptq_candidates(canon.weights[k], masks[k], layouts[k], missing, hessians[k], q.search_clip,
                                        q.grid, q.entropy_coding))
        return have

    def build(bits_map: Mapping[str, np.ndarray], correct: bool = False) -> CompressedModel:
        tensors: dict[str, Any] = {}
        state = model.state_dict()
        for k in state:
            if k in rowwise:
                tensors[k] = compose_rows(candidates(k, np.unique(bits_map[k])), bits_map[k])
            elif k in canon.weights:
                tensors[k] = quantize_tensor(canon.weights[k], bits_map[k], layouts[k].group_size, masks[k],
                                             q.search_clip, q.grid, q.entropy_coding)
                if k in hessians:
                    tensors[k] = gptq_round(canon.weights[k], tensors[k], hessians[k])
            elif k in canon.floats:
                tensors[k] = canon.floats[k]
        cm = CompressedModel(spec, tensors, {k: q.float_dtype for k in canon.floats}, {})
        if correct:  # shifts are stored as floats of fixed size: correcting them never changes the file size
            r = config.relevance
            correct_biases_(cm, model, canon, train, sample_indices(len(train), r.samples, r.seed, train.y))
        return cm

    stats = None
    if q.activation_aware and q.allocation != "uniform":
        if score_key("stats", config) not in scores:
            r = config.relevance
            scores[score_key("stats", config)] = activation_stats(model, train, r.samples, r.batch_size, r.seed)
        stats = scores[score_key("stats", config)]
    if q.allocation == "uniform":
        bits.update({k: np.full(layouts[k].n_groups, q.bits, np.int64) for k in free})
    elif q.allocation == "tiers":
        ranking = {}
        for k in free:
            imp = channel_importance({k: canon.weights[k]}, stats, {k: imp_channels[k]}, q.power)[k]
            g, _ = layouts[k].to_groups(imp)
            ranking[k] = g[:, 0].numpy()
        bits.update(allocate_tiers(ranking, q.bits))
    else:
        imp = channel_importance({k: canon.weights[k] for k in free}, stats, imp_channels, q.power)
        options = tuple(b for b in q.bit_options)
        # under GPTQ rounding a channel's error is measured through the input Hessian (per-channel groups)
        tilt = channel_importance({k: canon.weights[k] for k in free if k in rowwise}, stats, imp_channels, q.power,
                                  input_power=False)
        tables = [layer_costs(k, canon.weights[k], masks[k], layouts[k], options, tilt.get(k, imp[k]), q.search_clip,
                              q.grid, q.entropy_coding, hessians[k] if k in tilt else None,
                              candidates(k, options) if k in tilt else None) for k in free]
        target = allocation_target(config, d_bytes)
        if target is None:  # the budget of uniform `bits`
            budget_bits = float(sum(t.costs[:, options.index(q.bits)].sum() for t in tables)) if q.bits in options \
                else float(sum(int(masks[k].sum()) * q.bits + 24 * layouts[k].n_groups for k in free))
            bits.update(allocate_optimal(tables, budget_bits))
        else:
            bits.update(_fit_budget(tables, bits, build, target))
    compressed = build(bits, correct=config.bias_correction)
    if config.finetune.epochs > 0:
        compressed = finetune(compressed, train, config.finetune, show_progress=show_progress,
                              device=model_device(model), teacher=teacher if teacher is not None else model)
    target = config.target_bytes or (int(d_bytes / config.target_ratio) if config.target_ratio else None)
    importance = dict(imp) if q.allocation == "optimal" else {}
    data = compressed.to_bytes()
    if config.finetune.epochs > 0 and target is not None and len(data) > target:
        compressed = shrink_to_budget(compressed, target, q, importance)
        data = compressed.to_bytes()
    seconds = time.perf_counter() - t0
    return CompressResult(compressed, len(data), d_bytes, seconds, score_seconds, masks, bits, target, q, importance)


# Training moves the codes and so the entropy-coded size (ResNet-20 at 16x: +2.0%): the allocator leaves this
# share of the target free when fine-tuning follows, and shrink_to_budget takes back what still overflows.
FINETUNE_RESERVE = 0.02


def allocation_target(config: CompressConfig, dense: int) -> int | None:
    """The bytes the allocator may fill under ``config``'s size target (None without one): the target itself,
    less :data:`FINETUNE_RESERVE` when fine-tuning will move entropy-coded codes. Anything fitted to the budget
    before the allocation (a sparsity, :func:`~lrpcompress.search.fit_sparsity`) must fit this, not the target."""
    target = config.target_bytes or (int(dense / config.target_ratio) if config.target_ratio else None)
    if target is not None and config.finetune.epochs > 0 and config.quant.entropy_coding:
        target = int(target * (1 - FINETUNE_RESERVE))
    return target


def edge_overrides(model: nn.Module, bits: int = 8) -> dict[str, int]:
    """``QuantConfig.overrides`` that fix the first and the last layer with weights (registration order: the
    stem and the classifier of common vision models) at ``bits`` — the usual practice for uniform
    quantization baselines, where those small layers cost few bytes and most accuracy (FINDINGS.md §3)."""
    import glob

    from .relevance import layer_names

    names = layer_names(model)
    if not names:
        raise LrpcError("the model has no convolution or linear layer to keep at high precision")
    return {glob.escape(f"{n}.weight"): bits for n in (names[0], names[-1])}


def finetune_result(res: CompressResult, train: ImageData, config: FinetuneConfig, device: torch.device | str,
                    teacher: nn.Module, show_progress: bool = True) -> CompressResult:
    """``res`` after :func:`~lrpcompress.recovery.finetune` (what ``compress`` does when its config asks for
    epochs), with the written bytes and the seconds updated."""
    t0 = time.perf_counter()
    cm = finetune(res.compressed, train, config, show_progress=show_progress, device=device, teacher=teacher)
    size = len(cm.to_bytes())
    if res.target_bytes is not None and res.quant is not None and size > res.target_bytes:
        cm = shrink_to_budget(cm, res.target_bytes, res.quant, res.importance)
        size = len(cm.to_bytes())
    return replace(res, compressed=cm, file_bytes=size, seconds=res.seconds + time.perf_counter() - t0)


def correct_biases_(cm: CompressedModel, model: nn.Module, canon: Canonical, data: ImageData,
                    indices: np.ndarray) -> None:
    """Shift each layer's stored bias so its mean output on reference data matches the float model's.

    Quantization moves a channel's mean output by ``Σ_i δ_i E[a_i]``; the correction (Nagel et al. 2019,
    empirical form) absorbs it into the folded BatchNorm shift or the layer bias. A channel whose weights
    were all removed becomes the constant it averaged to.
    """
    targets = {}
    layer_bn = {layer: bn for bn, layer in canon.fold_owner.items()}
    for wname in canon.weights:
        lname = wname[: -len(".weight")]
        key = f"{layer_bn[lname]}.bias" if lname in layer_bn else f"{lname}.bias"
        if isinstance(cm.tensors.get(key), torch.Tensor):
            targets[wname] = key
    if not targets:
        return
    ref = activation_stats(model, data, indices=indices).output_mean
    qmodel = cm.to_module().to(model_device(model))
    params = dict(qmodel.named_parameters())
    for wname, key in targets.items():  # in forward order: each correction sees the corrected layers above it
        got = activation_stats(qmodel, data, indices=indices, stop_at=wname[: -len(".weight")]).output_mean[wname]
        with torch.no_grad():
            params[key] += (ref[wname] - got).to(params[key])
        cm.tensors[key] = params[key].detach().cpu().clone()


def _fit_budget(tables, fixed_bits: Mapping[str, np.ndarray], build, target: int) -> dict[str, np.ndarray]:
    """Allocate so that the real file is at most ``target`` bytes and within 2% of it."""
    weight_bits = {t.name: np.full(t.layout.n_groups, 4, np.int64) for t in tables}
    probe = build({**fixed_bits, **weight_bits})
    size = len(probe.to_bytes())
    est_bits = sum(float(t.costs[:, list(t.options).index(4)].sum()) if 4 in t.options else 0.0 for t in tables)
    overhead = size - est_bits / 8.0
    budget = (target - overhead) * 8.0
    best = None
    floor = {t.name: np.asarray(t.options)[t.costs.argmin(1)].astype(np.int64) for t in tables}
    floor_bits = sum(float(t.costs.min(1).sum()) for t in tables)
    for _ in range(8):
        if budget < floor_bits:
            # the overhead estimate (from a 4-bit probe) can be off by the bytes that round each tensor's
            # codes; the real file decides whether the cheapest allocation fits
            if best is None:
                floor_size = len(build({**fixed_bits, **floor}).to_bytes())
                if floor_size > target:
                    raise LrpcError(f"the byte budget is unreachable: the file needs at least {floor_size} bytes "
                                    f"at the smallest bit-widths, {target} were asked for; ask for a larger file")
                best = floor
            break
        alloc = allocate_optimal(tables, budget)
        size = len(build({**fixed_bits, **alloc}).to_bytes())
        if size <= target:
            best = alloc
            if size >= 0.98 * target:
                break
            budget += (target - size) * 8.0 * 0.9
        else:
            budget -= (size - target) * 8.0 + 64
    if best is None:
        raise LrpcError(f"cannot fit the model into {target} bytes; ask for a smaller ratio")
    return best


def shrink_to_budget(cm: CompressedModel, target: int, quant: QuantConfig,
                     importance: Mapping[str, torch.Tensor | None]) -> CompressedModel:
    """Fit a fine-tuned model back into ``target`` bytes without training (:func:`_shrink`), lowering groups to
    no fewer than 3 bits if that is enough, else 2, else 1. The weighted error the allocator uses underrates
    what 1- and 2-bit groups cost a trained model: ResNet-20 at 16x, 0.4% over the cap after 2 epochs (90.1% on
    held-out images), fitted back with 1-bit groups allowed 47.3%, with 2 bits the least 89.35%, with 3 bits
    90.05%."""
    error: LrpcError | None = None
    for lowest in (3, 2, 1):
        try:
            return _shrink(cm, target, quant, importance, lowest)
        except LrpcError as exc:
            error = exc
    assert error is not None
    raise error


def _shrink(cm: CompressedModel, target: int, quant: QuantConfig, importance: Mapping[str, torch.Tensor | None],
            lowest: int) -> CompressedModel:
    """Fit a fine-tuned model back into ``target`` bytes with no group below ``lowest`` bits: with entropy
    coding the file's size follows the codes, and training moves them (learned scales shrink, more codes leave the zero level;
    ResNet-20 at 16x grew 2%). Groups may only lose bits (never all of them); a group that keeps its width
    keeps its trained codes and scale exactly, the others are requantized from their trained values. The
    choice minimises the same weighted error the allocator uses, on the real file. A floor the size search put
    on the bit-widths does not hold here: at the floor there is nothing to give up (ResNet-20 at 16x, 3-bit
    floor at the fitted sparsity: +4% after training), and a few narrower groups beat a failed run. Groups
    already below ``lowest`` keep their width."""
    quants = {k: t for k, t in cm.tensors.items() if isinstance(t, QuantTensor)}
    fixed = {k: t.bits.astype(np.int64) for k, t in quants.items() if k not in importance}
    options = tuple(range(lowest, 9))
    opts = np.asarray(options)
    trained = {k: (t.dequantize(), torch.from_numpy(t.mask.reshape(t.shape))) for k, t in quants.items()}
    tables = []
    for k, t in quants.items():
        if k in fixed:
            continue
        lc = layer_costs(k, *trained[k], t.layout, options, importance[k], quant.search_clip, t.grid,
                         quant.entropy_coding)
        cur = t.bits.astype(np.int64)
        keep = np.isin(cur, opts)  # 0- and 16-bit groups stay as they are
        lc.errors[opts[None, :] > cur[:, None]] = np.inf
        lc.errors[keep, np.searchsorted(opts, cur[keep])] = 0.0  # its trained codes are kept exactly
        lc.errors[~keep] = np.inf  # ... so their row is a dummy: first option, free (build ignores it)
        lc.errors[~keep, 0] = 0.0
        lc.costs[~keep] = 0.0
        tables.append(lc)
    if not tables:
        raise LrpcError(f"fine-tuning grew the file past {target} bytes and no layer can give up bits; "
                        "ask for a smaller ratio or use --no-entropy-coding")

    def build(bits_map: Mapping[str, np.ndarray]) -> CompressedModel:
        tensors = dict(cm.tensors)
        for k, t in quants.items():
            new = np.where(np.isin(t.bits, options), bits_map[k], t.bits).astype(np.int64)
            if np.array_equal(new, t.bits.astype(np.int64)):
                continue
            w, mask = trained[k]
            q = quantize_tensor(w, new, t.layout.group_size, mask, quant.search_clip, t.grid, t.entropy)
            same = new == t.bits.astype(np.int64)
            scales = np.where(same, t.scales, q.scales).astype(np.float16)
            same_el = same[t.layout.group_of_element()][t.mask]
            codes = np.where(same_el, t.codes, q.codes)
            tensors[k] = replace(t, bits=new.astype(np.uint8), scales=scales, codes=codes)
        return CompressedModel(cm.model_spec, tensors, cm.float_dtype, cm.metadata)

    return build(_fit_budget(tables, fixed, build, target))


def _num_classes(model: nn.Module) -> int:
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(lin[-1].out_features) if lin else 10


def _default_widths(arch: str) -> list[int] | None:
    from .models import CIFAR_DEPTHS

    n = CIFAR_DEPTHS.get(arch)
    return [16] * n + [32] * n + [64] * n if n else None


__all__ = ["CompressConfig", "QuantConfig", "CompressedModel", "CompressResult", "Scores", "compress", "edge_overrides",
           "allocation_target", "FINETUNE_RESERVE",
           "compute_scores", "method_config", "load_compressed", "module_from_payload", "canonicalize",
           "channel_importance", "METHODS", "decode", "load_payload"]
