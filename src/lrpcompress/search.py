"""Settings chosen on held-out training images (never the test split), under a size or accuracy target.

- The size search (:func:`compress_tuned`): at a byte budget, which magnitude sparsity before the allocation and
  which floor on the bit-widths (:func:`knob_grid`; a sparsity can be fitted to the budget,
  :func:`fit_sparsity`) give the most accurate file.
- The accuracy target (:func:`compress_max_drop`): the smallest file on a ladder of ratios whose held-out drop
  stays within a limit.
- The channel search (:func:`compress_channel_search`): at a fixed file size, removing channels physically
  leaves more bits for every surviving weight. Whether that pays depends on how well the channel criterion
  knows what the task uses: on a class subset, LRP-z⁺ channel relevance removes a third of the inner channels
  at little cost (docs/FINDINGS.md §6). It tries a few channel fractions, runs the size search on each slimmed
  model and keeps the most accurate candidate. Sizes count from the unpruned model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch.nn as nn

import numpy as np

from .compress import CompressConfig, CompressResult, allocation_target, compress
from .data import ImageData
from .errors import LrpcError
from .models import dense_bytes, is_builtin_arch, model_device
from .progress import progress
from .pruning import PruneConfig
from .recovery import FinetuneConfig
from .structured import ChannelPruneConfig, StructuredResult, prune_channels


def knob_grid(ratio: float) -> list[tuple[float | None, int]]:
    """(magnitude sparsity before allocation, smallest bit-width the allocator may use) worth trying at a
    compression ratio. Below 8× the allocator alone is best; beyond, unstructured sparsity and a floor on
    the bit-width can beat spreading 1–2-bit codes over every channel. Sparsity ``None`` means "fitted": the
    smallest sparsity at which the floor fits the size target (:func:`fit_sparsity`); on ResNet-44 at 12×
    accuracy falls steeply with every point of sparsity past that (FINDINGS.md), so no slack is left."""
    if ratio < 8:
        return [(0.0, 1)]
    if ratio < 12:
        return [(0.0, 1), (0.25, 1), (0.5, 1)]
    # a 2-bit floor without pruning: with entropy coding, zeros are cheap codes and the floor keeps the
    # allocator from spreading 1-bit (sign-only) groups; ResNet-20 at 16x: 53.6% -> 78.5% post-training
    return [(0.0, 1), (0.0, 2), (0.5, 1), (None, 3)]


def fit_sparsity(model: nn.Module, train: ImageData, config: CompressConfig, min_bits: int, arch: str,
                 step: float = 0.005, model_spec_extra: Mapping[str, Any] | None = None,
                 target_bytes: int | None = None, scores: dict[str, Any] | None = None) -> float:
    """The smallest magnitude sparsity (a multiple of ``step``) at which every weight at ``min_bits`` bits fits
    ``target_bytes`` (default: the bytes ``config``'s size target leaves the allocator, which keeps room for
    fine-tuning: :func:`~lrpcompress.compress.allocation_target`), measured on the real file (no bias
    correction: it never changes the size; the clip search stays, since with entropy coding the scales change
    the coded size). The size falls about linearly with the sparsity (exactly, for bit-packed codes with a bitmap
    index): two probes place a line, a few more confirm it. ``scores``: a cache shared with other
    :func:`~lrpcompress.compress.compress` calls (the probes need only the calibration Hessians of GPTQ rounding)."""
    if target_bytes is None and config.target_ratio is None and config.target_bytes is None:
        raise LrpcError("fitting a sparsity needs a size target (--target-ratio or --target-bytes)")
    target = target_bytes or allocation_target(config, dense_bytes(model))
    probe = replace(config, target_ratio=None, target_bytes=None, bias_correction=False,
                    finetune=replace(config.finetune, epochs=0),
                    quant=replace(config.quant, allocation="uniform", bits=min_bits, importance="none"))

    scores = {} if scores is None else scores

    def size(s: float) -> int:
        return compress(model, train, with_knobs(probe, s, 1), arch, scores=scores, show_progress=False,
                        model_spec_extra=model_spec_extra).file_bytes

    if size(0.0) <= target:
        return 0.0
    lo, hi = 0.5, 0.6
    s_lo, s_hi = size(lo), size(hi)
    guess = lo + (s_lo - target) / max(s_lo - s_hi, 1) * (hi - lo)
    s = min(max(np.ceil(guess / step - 1e-9) * step, step), 0.95)
    while size(s) > target:  # the estimate is a line through two probes: step up until the file fits
        s = round(s + step, 6)
        if s >= 0.95:
            raise LrpcError(f"even 95% sparsity does not fit {min_bits}-bit codes into {target} bytes")
    while s - step >= step and size(round(s - step, 6)) <= target:  # and down while it still fits
        s = round(s - step, 6)
    return float(round(s, 6))


def resolve_knobs(model: nn.Module, train: ImageData, config: CompressConfig, grid: list[tuple[float | None, int]],
                  arch: str, model_spec_extra: Mapping[str, Any] | None = None,
                  scores: dict[str, Any] | None = None) -> list[tuple[float, int]]:
    """:func:`knob_grid` with fitted sparsities computed (``scores``: a cache, :func:`fit_sparsity`); settings that
    cannot fit at all are dropped."""
    out = []
    for sparsity, min_bits in grid:
        if sparsity is None:
            try:
                sparsity = fit_sparsity(model, train, config, min_bits, arch, model_spec_extra=model_spec_extra,
                                        scores=scores)
            except LrpcError:
                continue
        if (sparsity, min_bits) not in out:
            out.append((sparsity, min_bits))
    return out


def with_knobs(config: CompressConfig, sparsity: float, min_bits: int) -> CompressConfig:
    """``config`` with magnitude pruning of ``sparsity`` and the allocator limited to ≥ ``min_bits`` bits (with a
    floor above 1 the allocator may no longer drop whole channels either: at 12× that trade removed channels
    to pay for wider ones and lost, see FINDINGS.md)."""
    if sparsity:
        config = replace(config, prune=PruneConfig("fraction", sparsity), prune_score="magnitude")
    if min_bits > 1:
        opts = tuple(b for b in config.quant.bit_options if b >= min_bits)
        config = replace(config, quant=replace(config.quant, bit_options=opts))
    return config


def compress_tuned(model: nn.Module, fit: ImageData, val: ImageData, config: CompressConfig, arch: str,
                   model_spec_extra: Mapping[str, Any] | None = None, teacher: nn.Module | None = None,
                   show_progress: bool = True, select_trained: bool = False) -> tuple[CompressResult, dict[str, Any]]:
    """Compress at ``config``'s size target with the :func:`knob_grid` setting that is most accurate on
    ``val`` (held out from the training data); fine-tuning, if any, runs only for the chosen setting.

    ``select_trained`` (needs ``config.finetune.epochs`` > 0) fine-tunes every setting and compares them after
    training instead: at 16x every setting is at chance before training, so the usual pick is blind there
    (benchmarks/results/recovery.md). It costs one fine-tuning per setting."""
    from .evaluation import accuracy

    if select_trained and config.finetune.epochs == 0:
        raise LrpcError("choosing the setting after fine-tuning needs fine-tuning epochs (--finetune-epochs N)")
    if config.target_ratio is None and config.target_bytes is None:
        if select_trained:
            raise LrpcError("choosing the setting after fine-tuning needs a size target (--target-ratio or "
                            "--target-bytes)")
        return compress(model, fit, config, arch, model_spec_extra=model_spec_extra, teacher=teacher,
                        show_progress=show_progress), {}
    ratio = config.target_ratio or dense_bytes(model) / config.target_bytes
    scores: dict[str, Any] = {}
    grid = resolve_knobs(model, fit, config, knob_grid(ratio), arch, model_spec_extra, scores)
    if len(grid) == 1:
        return compress(model, fit, config, arch, scores=scores, model_spec_extra=model_spec_extra, teacher=teacher,
                        show_progress=show_progress), {"sparsity": grid[0][0], "min_bits": grid[0][1]}
    best = None
    trials: list[dict[str, Any]] = []
    first_error: LrpcError | None = None
    no_ft = replace(config, finetune=replace(config.finetune, epochs=0))
    device = model_device(model)
    for sparsity, min_bits in progress(grid, desc="size search", unit="setting", disable=not show_progress):
        try:  # with select_trained each setting is fine-tuned as `compress` does it (room left for the codes)
            res = compress(model, fit, with_knobs(config if select_trained else no_ft, sparsity, min_bits), arch,
                           scores=scores, show_progress=select_trained and show_progress,
                           model_spec_extra=model_spec_extra, teacher=teacher)
        except LrpcError as exc:
            first_error = first_error or exc
            continue
        acc = accuracy(res.compressed.to_module().to(device), val, show_progress=False)
        trials.append({"sparsity": sparsity, "min_bits": min_bits, "val_accuracy": round(acc, 4)})
        if best is None or acc > best[0]:
            best = (acc, sparsity, min_bits, res)
    if best is None:  # the plain allocation's message says how far off the budget is
        raise first_error or LrpcError("cannot fit the model into the asked size; ask for a smaller ratio")
    acc, sparsity, min_bits, res = best
    knobs = {"sparsity": sparsity, "min_bits": min_bits, "val_accuracy": round(acc, 4)}
    if select_trained:
        knobs["selected_after_finetuning"] = True
        knobs["trials"] = trials  # held-out accuracy of every setting after its fine-tuning
    if config.finetune.epochs > 0 and not select_trained:
        res = compress(model, fit, with_knobs(config, sparsity, min_bits), arch, scores=scores,
                       show_progress=show_progress, model_spec_extra=model_spec_extra, teacher=teacher)
    return res, knobs


MAX_DROP_RATIOS = (24.0, 20.0, 16.0, 14.0, 12.0, 10.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0)


def compress_max_drop(model: nn.Module, fit: ImageData, val: ImageData, config: CompressConfig, arch: str,
                      max_drop: float, model_spec_extra: Mapping[str, Any] | None = None,
                      show_progress: bool = True, reference: nn.Module | None = None) -> tuple[CompressResult, float]:
    """The smallest file whose accuracy on ``val`` (held out from training data) drops at most ``max_drop`` points.

    Walks a ladder of size targets from the most compressed down and keeps the first that qualifies. The drop
    is measured from ``reference`` (default ``model``; pass the dense model when ``model`` was slimmed), and
    the ladder's ratios count from ``reference``'s float32 bytes too, so a slimmed model's file is "R× smaller"
    than the model the user started from.
    """
    from .evaluation import accuracy

    if config.quant.allocation != "optimal":
        raise LrpcError("--max-drop needs the optimal bit allocation (--allocation optimal)")
    ref = reference if reference is not None else model
    base = accuracy(ref, val, show_progress=False)
    ref_bytes = dense_bytes(ref)
    scores: dict[str, Any] = {}  # filled by the first compress call, reused by the rest
    for ratio in MAX_DROP_RATIOS:
        try:
            sized = replace(config, target_ratio=None, target_bytes=int(ref_bytes / ratio))
            res = compress(model, fit, sized, arch, scores=scores,
                           show_progress=False, model_spec_extra=model_spec_extra, teacher=reference)
        except LrpcError:
            continue
        qmodel = res.compressed.to_module().to(model_device(model))
        if base - accuracy(qmodel, val, show_progress=False) <= max_drop:
            return res, ratio
    raise LrpcError(f"no compression of at least 2x keeps the validation accuracy drop within {max_drop} points")


DEFAULT_FRACTIONS = (0.0, 0.3, 0.5)


@dataclass(frozen=True)
class ChannelSearch:
    """Inner-channel ``fractions`` tried, each cut as ``channels`` says (its own ``fraction`` is ignored)."""

    channels: ChannelPruneConfig
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS

    def __post_init__(self) -> None:
        if not self.fractions:
            raise LrpcError("give at least one channel fraction to try, e.g. 0,0.3,0.5")
        if any(not 0.0 <= f < 1.0 for f in self.fractions):
            raise LrpcError(f"channel fractions must be in [0, 1), got {self.fractions}")
        if len(set(self.fractions)) != len(self.fractions):
            raise LrpcError(f"channel fractions must differ, got {self.fractions}")
        if self.channels.scope == "auto":
            raise LrpcError("the channel-fraction search cuts in one scope; choose layer, global or macs")
        if self.channels.steps != 1:
            raise LrpcError("the channel-fraction search scores once; use steps=1")


@dataclass
class ChannelSearchResult:
    result: CompressResult  # the chosen candidate's compressed model
    fraction: float  # the chosen channel fraction
    structured: StructuredResult | None  # its channel cut (None for fraction 0)
    trials: dict[float, dict[str, Any]]  # per fraction: held-out accuracy, knobs, float bytes of the slim model


def compress_channel_search(model: nn.Module, fit: ImageData, val: ImageData, config: CompressConfig, arch: str,
                            search: ChannelSearch, model_spec_extra: Mapping[str, Any] | None = None,
                            recover: FinetuneConfig | None = None, show_progress: bool = True) -> ChannelSearchResult:
    """Compress ``model`` to ``config``'s size target (counted from ``model``'s float32 bytes) with the channel
    fraction of ``search`` and the size-search knobs that are most accurate on ``val``.

    Channel scores are computed once, on ``fit``. Candidates are compared without any training; ``recover``
    (float fine-tuning of the slim model before quantization) and ``config.finetune`` (through the quantizers)
    run only for the chosen one, with its knobs, distilling from ``model``. Ties go to the smaller fraction
    (fewer changes to the user's model)."""
    from .evaluation import accuracy

    if config.target_ratio is None and config.target_bytes is None:
        raise LrpcError("the channel-fraction search needs a size target (--target-ratio or --target-bytes)")
    target = config.target_bytes or int(dense_bytes(model) / config.target_ratio)
    sized = replace(config, target_ratio=None, target_bytes=target)
    no_ft = replace(sized, finetune=replace(sized.finetune, epochs=0))
    trials: dict[float, dict[str, Any]] = {}
    scores = None
    # only the leader is kept: fraction, result, cut, and the file's model spec extras (slim shapes)
    best: tuple[float, CompressResult, StructuredResult | None, dict[str, Any]] | None = None
    for f in progress(sorted(search.fractions), desc="channel search", unit="fraction", disable=not show_progress):
        cut = None
        slim, extra = model, dict(model_spec_extra or {})
        if f > 0 or search.channels.stream_fraction > 0:
            cut = prune_channels(model, fit, replace(search.channels, fraction=f), show_progress=False, scores=scores)
            scores = scores if scores is not None else cut.scores
            slim = cut.model
            if not is_builtin_arch(arch):
                extra["shapes"] = cut.shapes
        try:
            res, knobs = compress_tuned(slim, fit, val, no_ft, arch, model_spec_extra=extra or None,
                                        show_progress=False)
        except LrpcError as exc:
            trials[f] = {"error": str(exc)}
            continue
        acc = knobs.get("val_accuracy")
        if acc is None:  # a one-setting grid is not evaluated by compress_tuned
            acc = round(accuracy(res.compressed.to_module().to(model_device(model)), val, show_progress=False), 4)
        trials[f] = {"val_accuracy": acc, "knobs": {k: v for k, v in knobs.items() if k != "val_accuracy"},
                     "float_bytes": dense_bytes(slim), "file_bytes": res.file_bytes}
        if best is None or acc > trials[best[0]]["val_accuracy"]:
            best = (f, res, cut, extra)
    if best is None:
        raise LrpcError(next(iter(trials.values()))["error"])
    chosen, res, cut, extra = best
    if config.finetune.epochs > 0 or (recover is not None and recover.epochs > 0 and cut is not None):
        slim = model if cut is None else cut.model
        if cut is not None and recover is not None and recover.epochs > 0:
            from .recovery import finetune_model

            slim = finetune_model(slim, fit, recover, device=model_device(model), teacher=model,
                                  show_progress=show_progress)
        knobs = trials[chosen]["knobs"]
        res = compress(slim, fit, with_knobs(sized, knobs["sparsity"], knobs["min_bits"]), arch,
                       model_spec_extra=extra or None, teacher=model, show_progress=show_progress)
    return ChannelSearchResult(res, chosen, cut, trials)


__all__ = ["ChannelSearch", "ChannelSearchResult", "compress_channel_search", "DEFAULT_FRACTIONS"]
