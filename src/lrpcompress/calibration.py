"""Calibration statistics of a model's layers on reference data (forward passes only, no relevance).

- :func:`activation_stats`: per-channel input power and output magnitude/mean of every layer with weights
  (BatchNorm folded): the weights of the allocator's error and the targets of bias correction.
- :func:`input_hessians`: ``E[x xᵀ]`` of every layer's input (a convolution's unfolded patches), what
  error-compensating rounding (:func:`~lrpcompress.quantization.gptq_round`) minimises the output error with.

Hooks are removed and the model's training mode restored in ``finally``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageData, sample_indices
from .models import model_device
from .relevance import _find_folds
from .rules import WEIGHTED


@dataclass
class ActivationStats:
    """Reference-data statistics per layer with weights (BatchNorm folded): ``input_power[name]`` is the mean
    squared input per input channel; ``output_abs[name]`` the mean |output| per output channel."""

    input_power: dict[str, torch.Tensor]
    output_abs: dict[str, torch.Tensor]
    output_mean: dict[str, torch.Tensor]


class _StopForward(Exception):
    pass


@contextmanager
def _hooked_eval(model: nn.Module, pre: list[tuple[nn.Module, Callable]],
                 post: list[tuple[nn.Module, Callable]] = ()) -> Iterator[None]:
    """The model in eval mode with forward pre-hooks and forward hooks on the given modules; all removed and
    the training mode restored on exit, whatever happened inside."""
    handles = []
    was = model.training
    model.eval()
    try:
        handles += [m.register_forward_pre_hook(h) for m, h in pre]
        handles += [m.register_forward_hook(h) for m, h in post]
        yield
    finally:
        for h in handles:
            h.remove()
        model.train(was)


@torch.no_grad()
def activation_stats(model: nn.Module, data: ImageData, samples: int = 512, batch_size: int = 64, seed: int = 0,
                     indices=None, stop_at: str | None = None) -> ActivationStats:
    """One forward pass over reference samples collecting per-channel input power and output magnitude.

    ``stop_at`` (a layer name) ends each forward pass once that layer's output is recorded; the layers
    before it get the same statistics as in a full pass."""
    idx = sample_indices(len(data), samples, seed, data.y) if indices is None else indices
    dev = model_device(model)
    folds = {v: k for k, v in _find_folds(model, data.tensor(idx[:1], dev)).items()}
    power: dict[str, torch.Tensor] = {}
    absz: dict[str, torch.Tensor] = {}
    meanz: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def chan(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(0, 1).reshape(t.shape[1], -1).double()

    def pre(name: str):
        def hook(mod: nn.Module, inp: tuple) -> None:
            x = inp[0]
            power[name] = power.get(name, 0) + chan(x * x).mean(1)
            counts[name] = counts.get(name, 0) + 1
        return hook

    def post(name: str):
        def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            c = chan(out)
            absz[name] = absz.get(name, 0) + c.abs().mean(1)
            meanz[name] = meanz.get(name, 0) + c.mean(1)
            if name == stop_at:
                raise _StopForward
        return hook

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHTED)]
    with _hooked_eval(model, [(m, pre(n)) for n, m in layers], [(folds.get(m, m), post(n)) for n, m in layers]):
        for x, _ in data.batches(batch_size, idx, dev):
            try:
                model(x)
            except _StopForward:
                pass
    key = lambda n: f"{n}.weight"  # noqa: E731
    absz = {n: v for n, v in absz.items() if n in counts}
    return ActivationStats({key(n): (v / counts[n]).cpu() for n, v in power.items()},
                           {key(n): (v / counts[n]).cpu() for n, v in absz.items()},
                           {key(n): (v / counts[n]).cpu() for n, v in meanz.items()})


def hessian_supported(module: nn.Module) -> bool:
    """Layers :func:`input_hessians` covers: linear layers and ungrouped 2-D convolutions."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of its weight's columns: ``[positions, cols]``."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    else:
        padding = module.padding
    cols = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)  # [N, C*kh*kw, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@torch.no_grad()
def input_hessians(model: nn.Module, data: ImageData, indices, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """``E[x xᵀ]`` (float64, ``[cols, cols]``) over the inputs of every layer :func:`hessian_supported` covers,
    keyed by weight name; ``cols`` follows the weight's flattened ``[rows, cols]`` view (for a convolution: input
    channel, then kernel row and column, as :func:`torch.nn.functional.unfold` orders them)."""
    dev = model_device(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def pre(name: str):
        def hook(mod: nn.Module, inp: tuple) -> None:
            X = _patches(mod, inp[0]).float()
            sums[name] = sums.get(name, 0) + (X.T @ X).double().cpu()
            counts[name] = counts.get(name, 0) + X.shape[0]
        return hook

    pres = [(m, pre(n)) for n, m in model.named_modules() if isinstance(m, WEIGHTED) and hessian_supported(m)]
    with _hooked_eval(model, pres):
        for x, _ in data.batches(batch_size, indices, dev):
            model(x)
    return {f"{n}.weight": s / counts[n] for n, s in sums.items()}
