"""Joint search of how many channels to remove and how to spend the bytes, under one size target.

At a fixed file size, removing channels physically leaves more bits for every surviving weight. Whether that
pays depends on how well the channel criterion knows what the task uses: on a class subset, LRP-z⁺ channel
relevance removes a third of the inner channels at little cost, and the slimmer model quantizes at more bits
per weight (docs/FINDINGS.md §6). :func:`compress_channel_search` tries a few channel fractions, runs the
size search of :func:`~lrpcompress.compress.compress_tuned` on each slimmed model, and keeps the candidate
most accurate on held-out training images (never the test split). Sizes count from the unpruned model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch.nn as nn

from .compress import CompressConfig, CompressResult, compress, compress_tuned, with_knobs
from .data import ImageData
from .errors import LrpcError
from .models import dense_bytes, is_builtin_arch, model_device
from .progress import progress
from .recovery import FinetuneConfig
from .structured import ChannelPruneConfig, StructuredResult, prune_channels

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
