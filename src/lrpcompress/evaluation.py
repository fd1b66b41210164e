"""Accuracy and timing of models."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn

from .data import ImageData
from .models import model_device
from .progress import progress


@torch.inference_mode()
def accuracy(model: nn.Module, data: ImageData, batch_size: int = 500, show_progress: bool = True,
             indices: np.ndarray | None = None) -> float:
    """Top-1 accuracy in percent over ``data`` (or ``indices`` of it), eval mode."""
    was = model.training
    model.eval()
    correct = total = 0
    n = len(data) if indices is None else len(indices)
    try:
        for x, y in progress(data.batches(batch_size, indices, model_device(model)), total=-(-n // batch_size), desc="eval",
                             unit="batch", disable=not show_progress):
            correct += int((model(x).argmax(1) == y).sum())  # int() syncs the device
            total += len(y)
    finally:
        model.train(was)
    return 100.0 * correct / max(total, 1)


@torch.inference_mode()
def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass on ``example`` in milliseconds."""
    model.eval()
    for _ in range(warmup):
        model(example)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(example)
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))
