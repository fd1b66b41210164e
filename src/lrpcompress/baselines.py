"""Attribution baselines from other libraries, for comparison with LRP.

DeepLIFT (Shrikumar et al. 2017) through captum, as used by Sabih et al. 2020 for XAI-guided pruning and
quantization: the attribution of every conv/linear output channel (after its BatchNorm) to the
true-class logit against a zero baseline, summed over reference samples.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .data import ImageData, sample_indices
from .errors import LrpcError
from .models import model_device
from .progress import progress
from .relevance import _find_folds, layer_names


def deeplift_channels(model: nn.Module, data: ImageData, samples: int = 256, batch_size: int = 64,
                      seed: int = 0, show_progress: bool = True) -> dict[str, torch.Tensor]:
    """|Σ DeepLIFT attribution| per output channel of every layer with weights (keys: ``<layer>.weight``)."""
    try:
        from captum.attr import LayerDeepLift
    except ImportError:
        raise LrpcError("the deeplift baseline needs captum: pip install captum") from None
    idx = sample_indices(len(data), samples, seed, data.y)
    mods = dict(model.named_modules())
    dev = model_device(model)
    folds = {v: k for k, v in _find_folds(model, data.tensor(idx[:1], dev)).items()}
    out = {}
    model.eval()
    for name in progress(layer_names(model), desc="deeplift", unit="layer", disable=not show_progress):
        layer = folds.get(mods[name], mods[name])
        dl = LayerDeepLift(model, layer)
        acc = None
        for x, y in data.batches(batch_size, idx, dev):
            a = dl.attribute(x, baselines=torch.zeros_like(x), target=y).detach()
            s = a.transpose(0, 1).reshape(a.shape[1], -1).sum(1).double() if a.dim() > 1 else a.double()
            acc = s if acc is None else acc + s
        out[f"{name}.weight"] = acc.abs().cpu()
    return out
