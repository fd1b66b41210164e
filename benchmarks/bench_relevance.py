"""Cost of relevance scoring against one plain forward+backward pass over the same samples.

    python benchmarks/bench_relevance.py        # writes benchmarks/results/relevance_timing.md

ResNet-20/44 use the ../shared weights on 512 CIFAR-10 (JPEG q75) training images; torchvision ResNet-50
(random weights; time and memory do not depend on the values) runs on 32 random 224×224 images.
Peak memory is the process's resident-set growth during each phase (CPU).
"""

from __future__ import annotations

import datetime
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lrpcompress.data import ImageData, load_data, sample_indices  # noqa: E402
from lrpcompress.models import build_model, load_model  # noqa: E402
from lrpcompress.relevance import RelevanceConfig, compute_relevance  # noqa: E402
from lrpcompress.report import markdown_table, write_page  # noqa: E402

SHARED = ROOT.parent / "shared"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def grad_pass(model, data: ImageData, idx, batch: int) -> float:
    t = time.perf_counter()
    for x, y in data.batches(batch, idx):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def bench(name: str, model, data: ImageData, samples: int, batch: int, repeats: int = 3) -> dict:
    model.eval()
    idx = sample_indices(len(data), samples, 0, data.y)
    cfg = RelevanceConfig(samples=samples, batch_size=batch)
    compute_relevance(model, data.subset(idx[:batch]), RelevanceConfig(samples=batch, batch_size=batch),
                      show_progress=False)  # warm-up
    g_times, r_times = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        g_times.append(grad_pass(model, data, idx, batch))
        t = time.perf_counter()
        compute_relevance(model, data, cfg, show_progress=False)
        r_times.append(time.perf_counter() - t)
    g, r = min(g_times), min(r_times)
    return {"model": name, "samples": samples, "batch": batch, "grad_s": round(g, 2), "lrp_s": round(r, 2),
            "ratio": round(r / g, 2), "peak_rss_mb": round(peak_mb())}


def main() -> None:
    rows = []
    train = load_data(SHARED / "data" / "cifar10-jpeg", "train")
    for arch in ("resnet20", "resnet44"):
        rows.append(bench(arch, load_model(arch, SHARED / "models" / f"{arch}-cifar10jpeg.pt"), train, 512, 64))
        print(rows[-1], flush=True)
    rng = np.random.default_rng(0)
    big = ImageData(rng.integers(0, 256, (32, 224, 224, 3), dtype=np.uint8), np.arange(32) % 1000,
                    (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), tuple(map(str, range(1000))))
    torch.manual_seed(0)
    rows.append(bench("torchvision resnet50 (224×224)", build_model("resnet50", 1000), big, 32, 16, repeats=2))
    print(rows[-1], flush=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    cols = (("model", "model"), ("samples", "samples"), ("batch", "batch"), ("grad_s", "forward+backward s"),
            ("lrp_s", "LRP scoring s"), ("ratio", "ratio"), ("peak_rss_mb", "peak RSS MB (cumulative)"))
    text = ["# Relevance scoring cost", "",
            f"Command: `python benchmarks/bench_relevance.py`; {datetime.date.today()}; {platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}. Best of repeated, interleaved runs.",
            "Composite epsilon_plus (z⁺ on convolutions, ε on dense layers), BatchNorm folded, start at the true "
            "class. The gradient pass is one cross-entropy forward+backward over the same samples and batches.",
            "", markdown_table(rows, cols), ""]
    write_page(out / "relevance_timing.md", text)


if __name__ == "__main__":
    main()
