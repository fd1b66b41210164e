"""lrpcompress.evaluation: accuracy, MAC counts, the CPU line, the allocator and speed profiles, each against a direct
computation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from lrpcompress.data import ImageData
from lrpcompress.evaluation import (accuracy, count_macs, cpu_description, cpu_line, layer_macs, predictions,
                                    speed_profiles)


def _data(n: int = 37, seed: int = 0) -> ImageData:
    rng = np.random.default_rng(seed)
    return ImageData(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, n).astype(np.int64),
                     (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), ("a", "b", "c", "d"))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def test_accuracy_counts_argmax_hits_over_every_batch_and_restores_training_mode():
    data, net = _data(), _net()
    net.train()
    with torch.no_grad():
        net.eval()
        want = 100.0 * float((net(data.tensor(np.arange(len(data)))).argmax(1) == torch.from_numpy(data.y)).sum()) / len(data)
        net.train()
    assert accuracy(net, data, batch_size=5, show_progress=False) == want  # 37 images: a last, partial batch
    assert net.training
    idx = np.array([3, 7, 11])
    with torch.no_grad():
        net.eval()
        sub = 100.0 * float((net(data.tensor(idx)).argmax(1) == torch.from_numpy(data.y[idx])).sum()) / 3
        net.train()
    assert accuracy(net, data, indices=idx, show_progress=False) == sub


def test_predictions_are_the_argmax_per_image_in_index_order():
    data, net = _data(), _net()
    idx = np.array([11, 3, 7])
    with torch.no_grad():
        want = net.eval()(data.tensor(idx)).argmax(1).numpy()
    net.train()
    got = predictions(net, data, batch_size=2, indices=idx, show_progress=False)
    assert got.dtype == np.int64 and got.tolist() == want.tolist()
    assert net.training
    assert len(predictions(net, data, batch_size=5, show_progress=False)) == len(data)


def test_mac_counts_match_the_layer_formulas():
    x = torch.zeros(2, 3, 8, 8)
    macs = layer_macs(_net(), x)
    # per image: conv 3->6 3x3 on 8x8; grouped conv 6->6 (2 inputs per group) 3x3 stride 2 on 4x4; linear 6->4
    per_image = {"0": 8 * 8 * 6 * 3 * 9, "3": 4 * 4 * 6 * 2 * 9, "7": 6 * 4}
    assert macs == {k: 2 * v for k, v in per_image.items()}
    assert count_macs(_net(), x[:1]) == sum(per_image.values())


def test_cpu_line_names_the_kernels_and_threads():
    d = cpu_description()
    line = cpu_line()
    assert line.startswith(f"{d['machine']}, ") and f"{d['kernels']} kernels" in line
    assert line.endswith(f"{torch.get_num_threads()} threads, malloc: {d['allocator']}")


def test_speed_profiles_time_each_model_and_leave_them_untouched():
    net, small = _net(), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    profs = speed_profiles([net, small], torch.zeros(1, 3, 8, 8), batch_sizes=(1, 3), repeats=2)
    assert [p["params"] for p in profs] == [sum(p.numel() for p in m.parameters()) for m in (net, small)]
    assert profs[1]["macs"] == 12 and profs[0]["macs"] == count_macs(_net(), torch.zeros(1, 3, 8, 8))
    for p in profs:
        assert set(p["latency_ms"]) == {"1", "3"} and all(v > 0 for v in p["latency_ms"].values())
        assert all(v >= 4 * p["params"] for v in p["peak_memory_bytes"].values())
    assert net.training  # timed on copies: BatchNorm statistics and mode unchanged
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


_HEAP_PROBE = """
import ctypes, json, torch
from lrpcompress.evaluation import allocator, steady_allocator

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info

def sixteen_mb():  # bytes mmapped while a 16 MB tensor lives, and heap bytes left once it is freed
    t = torch.ones(4 * 1024 * 1024)
    mapped = libc.mallinfo2().hblkhd
    del t
    return mapped, libc.mallinfo2().arena

out = {"before": allocator(), "default": sixteen_mb(), "steady": steady_allocator(), "again": steady_allocator()}
out["kept"] = sixteen_mb()
print(json.dumps(out))
"""


def test_steady_allocator_keeps_large_tensors_on_the_heap_under_glibc():
    """A fresh process: under glibc's defaults a 16 MB tensor is mmapped (and unmapped when freed); after
    steady_allocator() it comes from the heap, which keeps the memory once the tensor is freed."""
    import ctypes
    import json
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD",) and not k.startswith("MALLOC_")}
    run = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, env=env, check=True)
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["before"] == "glibc"
    assert out["steady"] == out["again"] == "glibc, freed memory kept"
    (mapped_default, _), (mapped_kept, heap_kept) = out["default"], out["kept"]
    assert mapped_default >= 16 * 1024 * 1024  # the default: straight from mmap
    assert mapped_kept < 16 * 1024 * 1024 and heap_kept >= 16 * 1024 * 1024  # heap, not trimmed after the free
