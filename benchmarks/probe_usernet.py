"""Where LRP-z⁺ channel relevance loses to filter L1 on the user's VGG-style network (docs/FINDINGS.md §10).

For each prunable convolution alone, the lowest-scored ``fraction`` of its output channels is switched off (its
BatchNorm's scale and shift set to 0, no mean compensation), by filter L1 and by LRP-z⁺ relevance from the
classes' training images; accuracy on those classes' test images. Then, per layer, the share of negative
(BatchNorm-folded) weight a channel feeds into the next convolution — z⁺ redistributes positive contributions
only, so a channel that mostly inhibits the next layer gets little relevance however much it matters.

    python benchmarks/probe_usernet.py --weights /tmp/un/vgg_small-cifar10jpeg.pt --classes 0,1,8 --fraction 0.3
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

from lrpcompress.data import load_data  # noqa: E402
from lrpcompress.evaluation import accuracy  # noqa: E402
from lrpcompress.models import load_model, restrict_classes  # noqa: E402
from lrpcompress.structured import ChannelPruneConfig, channel_scores, prunable_groups  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="usernet:vgg_small")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--classes", default="0,1,8")
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    args = ap.parse_args()
    torch.manual_seed(0)
    cls = [int(c) for c in args.classes.split(",")]
    model = restrict_classes(load_model(args.arch, args.weights), cls).eval()
    data = Path(args.shared) / "data" / "cifar10-jpeg"
    train, test = load_data(data, "train").restrict_classes(cls), load_data(data, "test").restrict_classes(cls)
    groups = prunable_groups(model, train.tensor(np.arange(1)))
    plain_zplus = {"composite": "epsilon_plus", "reference": "zero"}  # what this probe traced (FINDINGS §10)
    scores = {c: channel_scores(model, train, groups, ChannelPruneConfig(args.fraction, c, **plain_zplus),
                                show_progress=False)
              for c in ("l1", "lrp")}
    mods = dict(model.named_modules())
    bn = {g.root: mods[f"{g.root.rpartition('.')[0]}.{int(g.root.rpartition('.')[2]) + 1}"] for g in groups}

    def removed(crit: str, root: str) -> torch.Tensor:
        s = scores[crit][root]
        return torch.argsort(s)[:int(round(args.fraction * len(s)))]

    def switched_off(roots: list[str], crit: str) -> float:
        net = copy.deepcopy(model)
        nm = dict(net.named_modules())
        name = {id(m): n for n, m in mods.items()}
        with torch.no_grad():
            for r in roots:
                b = nm[name[id(bn[r])]]
                b.weight[removed(crit, r)] = 0
                b.bias[removed(crit, r)] = 0
        return accuracy(net, test, show_progress=False)

    print(f"{args.arch} on classes {args.classes}: dense {accuracy(model, test, show_progress=False):.2f}%; "
          f"{args.fraction:.0%} of one layer's channels switched off")
    print("| layer | L1 % | LRP-z+ % | channels both remove | negative share out: all / LRP-removed / L1-removed |"
          " corr(negative share, LRP score) |")
    print("|---|---|---|---|---|---|")
    roots = [g.root for g in groups]
    for i, r in enumerate(roots + ["all layers"]):
        layer = roots if r == "all layers" else [r]
        a, b = switched_off(layer, "l1"), switched_off(layer, "lrp")
        k = len(removed("l1", layer[0]))
        both = "–" if len(layer) > 1 else \
            f"{len(set(removed('l1', r).tolist()) & set(removed('lrp', r).tolist()))}/{k}"
        neg = "–"
        corr = "–"
        if r != "all layers" and i + 1 < len(roots):
            nxt = roots[i + 1]
            w = mods[nxt].weight.detach()
            s = (bn[nxt].weight / torch.sqrt(bn[nxt].running_var + bn[nxt].eps)).detach()
            wf = w * s[:, None, None, None]  # BatchNorm folded, as the relevance pass sees the weights
            share = (wf.clamp(max=0).abs().sum((0, 2, 3)) / wf.abs().sum((0, 2, 3))).double()
            neg = (f"{share.mean():.3f} / {share[removed('lrp', r)].mean():.3f} / "
                   f"{share[removed('l1', r)].mean():.3f}")
            corr = f"{np.corrcoef(share.numpy(), scores['lrp'][r].numpy())[0, 1]:+.2f}"
        print(f"| {r} | {a:.2f} | {b:.2f} | {both} | {neg} | {corr} |")


if __name__ == "__main__":
    main()
