"""Does training-mode BatchNorm undo a channel cut's refit? Re-estimate every BatchNorm's statistics, no weight change.

    python benchmarks/probe_bn_refit.py                      # ResNet-20, 10 classes, inner 50%, ~4 min on 2 cores
    python benchmarks/probe_bn_refit.py --refits downstream,none --fraction 0.3

For each refit scope (``none``: mean compensation only) the LRP cut of ``ChannelPruneConfig`` is evaluated as it is
and after its BatchNorm running statistics are re-estimated in training mode on ``--images`` training images (what
recovery's first steps do to them). Also printed: per BatchNorm, the variance of its input on 512 training images
over its running variance (below 1: the cut or the refit shrank what that layer passes on). Accuracy is on every
``--test-stride``-th test image; nothing is chosen from it.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lrpcompress.calibration import _hooked_eval  # noqa: E402
from lrpcompress.data import load_data  # noqa: E402
from lrpcompress.evaluation import accuracy  # noqa: E402
from lrpcompress.models import load_model  # noqa: E402
from lrpcompress.structured import ChannelPruneConfig, prune_channels  # noqa: E402
from run_benchmark import add_weights_option, checkpoint  # noqa: E402


def variance_ratios(model: torch.nn.Module, data, idx) -> dict[str, float]:
    """Per BatchNorm: the mean over channels of (input variance on ``idx``) / running variance."""
    seen: dict[str, list[torch.Tensor]] = {}
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    hooks = [(m, lambda _m, i, n=n: seen.setdefault(n, []).append(i[0].transpose(0, 1).flatten(1).var(1)))
             for n, m in bns.items()]
    with torch.no_grad(), _hooked_eval(model, hooks):
        for x, _ in data.batches(64, idx):
            model(x)
    return {n: float((torch.stack(v).mean(0) / bns[n].running_var).mean()) for n, v in seen.items()}


def recalibrated(model: torch.nn.Module, data, idx) -> torch.nn.Module:
    """A copy whose BatchNorm statistics are re-estimated (cumulative average) on ``idx``, weights unchanged."""
    net = copy.deepcopy(model)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for x, _ in data.batches(64, idx):
            net(x)
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--refits", default="downstream,none", help="comma list: downstream, readers, none")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--test-stride", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    add_weights_option(ap)
    args = ap.parse_args()
    shared = Path(args.shared)
    train = load_data(shared / "data" / "cifar10-jpeg", "train")
    test = load_data(shared / "data" / "cifar10-jpeg", "test")
    test = test.subset(np.arange(0, len(test), args.test_stride))
    dense = load_model(args.arch, checkpoint(args.arch, args))
    idx = np.random.default_rng(args.seed).permutation(len(train))[:args.images]
    for refit in args.refits.split(","):
        extra = {"reconstruct": False} if refit == "none" else {"refit_scope": refit}
        cut = prune_channels(dense, train, ChannelPruneConfig(args.fraction, "lrp", seed=args.seed, **extra),
                             show_progress=False).model
        before = accuracy(cut, test, show_progress=False)
        after = accuracy(recalibrated(cut, train, idx), test, show_progress=False)
        ratios = variance_ratios(cut, train, idx[:512])
        print(f"refit {refit}: as cut {before:.2f}%, BatchNorm re-estimated {after:.2f}% "
              f"({len(test)} test images); input variance / running variance "
              f"{min(ratios.values()):.2f}-{max(ratios.values()):.2f}: "
              + " ".join(f"{n} {r:.2f}" for n, r in ratios.items()), flush=True)


if __name__ == "__main__":
    main()
