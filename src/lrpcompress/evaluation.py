"""Accuracy and timing of models."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from .data import ImageData
from .models import model_device
from .progress import progress


@torch.inference_mode()
def predictions(model: nn.Module, data: ImageData, batch_size: int = 500, show_progress: bool = True,
                indices: np.ndarray | None = None) -> np.ndarray:
    """Top-1 predicted class of every image of ``data`` (or of ``indices``, in that order), eval mode, as int64."""
    was = model.training
    model.eval()
    out: list[np.ndarray] = []
    n = len(data) if indices is None else len(indices)
    try:
        for x, _ in progress(data.batches(batch_size, indices, model_device(model)), total=-(-n // batch_size),
                             desc="eval", unit="batch", disable=not show_progress):
            out.append(model(x).argmax(1).cpu().numpy())
    finally:
        model.train(was)
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def accuracy(model: nn.Module, data: ImageData, batch_size: int = 500, show_progress: bool = True,
             indices: np.ndarray | None = None) -> float:
    """Top-1 accuracy in percent over ``data`` (or ``indices`` of it), eval mode."""
    pred = predictions(model, data, batch_size, show_progress, indices)
    labels = data.y if indices is None else data.y[indices]
    return 100.0 * int((pred == labels).sum()) / max(len(labels), 1)


@torch.inference_mode()
def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of every conv and linear layer (by module name) in one forward pass on
    ``example`` (per batch)."""
    macs: dict[str, int] = {}

    def hook(name: str):
        def fn(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            if isinstance(mod, nn.Conv2d):
                k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
            else:
                k = mod.in_features
            macs[name] = macs.get(name, 0) + int(out.numel()) * k
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return macs


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (conv and linear layers; per batch)."""
    return int(sum(layer_macs(model, example).values()))


@contextlib.contextmanager
def _quiet_stderr():
    """Silence native log lines the profiler prints on start (e.g. a CUDA build probing for GPUs)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@torch.inference_mode()
def peak_activation_bytes(model: nn.Module, example: torch.Tensor) -> int:
    """Peak bytes the CPU allocator holds during one forward pass beyond what existed before it
    (activations and workspaces), read from the PyTorch profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    model.eval()
    model(example)  # warm up lazily allocated state
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(example)
    events = [e for e in prof.events() if e.cpu_memory_usage != 0 and (e.name == "[memory]" or not e.cpu_children)]
    events.sort(key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.cpu_memory_usage
        peak = max(peak, cur)
    return int(peak)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # the largest threshold glibc accepts on 64-bit
_GLIBC_TRIM_NEVER = 2**31 - 1  # mallopt takes an int
_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")
_heap_kept = False  # glibc cannot be asked whether mallopt was called; this records that this process did


def allocator() -> str:
    """The malloc that serves this process's CPU tensors: a preloaded ``jemalloc``, ``tcmalloc`` or ``mimalloc``,
    ``glibc, freed memory kept`` after :func:`steady_allocator`, ``glibc`` (its defaults), or ``unknown``."""
    maps = ""
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as f:
            maps = f.read()
    for name in _PRELOADED:
        if f"lib{name}" in maps:
            return name
    if platform.libc_ver()[0] == "glibc":
        return "glibc, freed memory kept" if _heap_kept else "glibc"
    return "unknown"


def steady_allocator() -> str:
    """Make CPU timings count compute, not the kernel handing memory back: under glibc's defaults every tensor above
    its (sliding) mmap threshold is returned to the OS when freed and page-faulted in again on the next pass, a cost
    that grows with the activation's size and varies with the VM's state (docs/FINDINGS.md §26: the wide early blocks
    of a CIFAR ResNet then look 16-30% costlier than under tcmalloc). This sets glibc's mmap threshold to
    its 32 MB maximum and never trims the heap, so freed blocks are reused as a deployed runtime's arena reuses them.

    Process-wide and kept for the rest of the process (glibc cannot restore its sliding threshold), which only means
    the process holds on to its peak heap; a no-op under a preloaded jemalloc/tcmalloc/mimalloc or another libc.
    Returns :func:`allocator`. The timing functions of this package call it."""
    global _heap_kept
    if not _heap_kept and allocator() == "glibc":
        mallopt = ctypes.CDLL(None).mallopt
        if mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX) and mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_NEVER):
            _heap_kept = True
    return allocator()


def cpu_description() -> dict[str, object]:
    """The CPU that latencies are measured on: architecture, model name, the vector kernels torch dispatches to
    (e.g. AVX2, AVX512), the thread count and the allocator (:func:`allocator`). A slim model's speed-up depends on
    the CPU (docs/FINDINGS.md §12: the same ResNet-20 cut, 1.55-1.58x on the CPU of the earlier benchmark rows,
    1.27-1.40x on an AVX-512 Xeon) and on the allocator (§26)."""
    name = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    return {"machine": platform.machine(), "model": name or "unknown",
            "kernels": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "allocator": allocator()}


def cpu_line() -> str:
    """:func:`cpu_description` as one line for a results page, e.g. ``x86_64, Intel Xeon ..., AVX512 kernels, 2
    threads, malloc: glibc, freed memory kept``."""
    return "{machine}, {model}, {kernels} kernels, {threads} threads, malloc: {allocator}".format(**cpu_description())


def speed_profiles(models: Sequence[nn.Module], example: torch.Tensor, batch_sizes: tuple[int, ...] = (1, 64),
                   repeats: int = 30) -> list[dict]:
    """Params, MACs per image, CPU latency (ms, median) per batch size and peak memory of each model.

    Runs CPU copies with the current thread count, under :func:`steady_allocator`; ``example`` is one input image
    (1×C×H×W). The models are timed in alternation, so load on the machine affects them alike and their ratio stays
    meaningful."""
    import copy

    steady_allocator()

    nets = [copy.deepcopy(m).cpu().eval() for m in models]
    x1 = example[:1].cpu()
    out = [{"params": int(sum(p.numel() for p in n.parameters())), "macs": count_macs(n, x1), "latency_ms": {},
            "peak_memory_bytes": {}} for n in nets]
    with torch.inference_mode():
        for b in batch_sizes:
            xb = x1.expand(b, *x1.shape[1:]).contiguous()
            for n in nets:
                for _ in range(5):
                    n(xb)
            times: list[list[float]] = [[] for _ in nets]
            for _ in range(repeats):
                for i, n in enumerate(nets):
                    t = time.perf_counter()
                    n(xb)
                    times[i].append(time.perf_counter() - t)
            for o, n, ts in zip(out, nets, times):
                o["latency_ms"][str(b)] = round(1000.0 * float(np.median(ts)), 3)
                o["peak_memory_bytes"][str(b)] = peak_activation_bytes(n, xb) + 4 * o["params"]
    return out
