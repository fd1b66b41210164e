"""The embedded demo: train a small CNN on scikit-learn's digits, compress it two ways, compare.

Needs no download: the digits data set ships with scikit-learn.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .compress import compress, load_compressed, method_config
from .data import ImageData, load_digits_data
from .evaluation import accuracy
from .models import build_model, dense_bytes
from .progress import progress
from .report import format_table


def train_digits_cnn(train: ImageData, epochs: int = 12, seed: int = 0, lr: float = 3e-3) -> torch.nn.Module:
    """Train ``digits_cnn`` with Adam (seeded, deterministic on the CPU)."""
    torch.manual_seed(seed)
    model = build_model("digits_cnn", 10)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    bar = progress(range(epochs), total=epochs, desc="train digits_cnn", unit="epoch")
    for _ in bar:
        model.train()
        for x, y in train.batches(64, rng.permutation(len(train))):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def run_demo(seed: int = 0, epochs: int = 12, ratio: float = 8.0) -> str:
    """Train, compress with the default method and with magnitude + uniform 4-bit, return a table."""
    train, test = load_digits_data(seed)
    model = train_digits_cnn(train, epochs, seed)
    base = accuracy(model, test, show_progress=False)
    rows = [{"method": "float32 (trained)", "bytes": dense_bytes(model), "ratio": 1.0, "accuracy": base,
             "sparsity": 0.0, "mean_bits": 32.0}]
    runs = [
        ("lrp (default)", replace(method_config("lrp", seed=seed), target_ratio=ratio)),
        ("magnitude 30% + uniform 4-bit", replace(method_config("magnitude", seed=seed),
                                                  prune=replace(method_config("magnitude").prune, sparsity=0.3))),
        ("uniform 4-bit", method_config("uniform", seed=seed)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for label, cfg in runs:
            cfg = replace(cfg, relevance=replace(cfg.relevance, samples=min(512, len(train))))
            res = compress(model, train, cfg, "digits_cnn", show_progress=False)
            path = Path(tmp) / "model.lrpc"
            size = res.compressed.save(path)
            loaded, _ = load_compressed(path)
            st = res.compressed.stats()
            rows.append({"method": label, "bytes": size, "ratio": res.dense_bytes / size,
                         "accuracy": accuracy(loaded, test, show_progress=False),
                         "sparsity": st["sparsity"], "mean_bits": st["mean_bits"]})
    for r in rows:
        r["ratio"] = f"{r['ratio']:.2f}x"
        r["accuracy"] = f"{r['accuracy']:.2f}%"
        r["sparsity"] = f"{100 * r['sparsity']:.1f}%"
        r["mean_bits"] = f"{r['mean_bits']:.2f}"
    head = (f"digits_cnn on scikit-learn digits ({len(train)} train / {len(test)} test images); "
            f"sizes are real .lrpc files, accuracy measured on the models loaded back from them")
    cols = (("method", "method"), ("bytes", "file bytes"), ("ratio", "vs float32"), ("accuracy", "test accuracy"),
            ("sparsity", "sparsity"), ("mean_bits", "mean bits"))
    return head + "\n" + format_table(rows, cols)
