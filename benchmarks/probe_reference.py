"""Where channel relevance is measured from: zero (plain LRP) or the channel's mean (what pruning leaves).

    python benchmarks/probe_reference.py       # writes benchmarks/results/reference_probe.md (~6 min, 2 cores)
    python benchmarks/probe_reference.py --arch resnet44 --subsets "0,1,8" --out /tmp/r44.md

Removing a channel with mean compensation replaces it by its mean input to the next layer, so the change it
causes is (a − ā)·g summed over positions (g: relevance per unit of input, the gradient for ε → 0), not the
a·g that plain LRP assigns it. This probe scores the inner channels of every residual block both ways, with
the ε rule (≈ the gradient) and the z⁺ rule above the channel, aggregated four ways, and removes the lowest
scores with the library's cut (mean compensation on, no fine-tuning). Accuracy is on training images of the
classes held out from scoring (never the test split). The library's default scoring (``ChannelPruneConfig(reconstruct=False)``:
ε, mean, per image abs(Σ)) is recomputed through the library as a cross-check.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lrpcompress.data import ImageData, load_data, sample_indices, split_train_val  # noqa: E402
from lrpcompress.evaluation import accuracy  # noqa: E402
from lrpcompress.models import load_model, restrict_classes  # noqa: E402
from lrpcompress.relevance import _start_grad, lrp_pass  # noqa: E402
from lrpcompress.report import markdown_table, write_page  # noqa: E402
from lrpcompress.rules import get_composite  # noqa: E402
from lrpcompress.structured import (ChannelPruneConfig, _graph, _input_means, prunable_groups,  # noqa: E402
                                   prune_channels)
from run_benchmark import add_weights_option, checkpoint  # noqa: E402

SHARED = ROOT.parent / "shared"
COMPOSITES = {"ε (≈ gradient)": "epsilon", "z⁺": "epsilon_plus"}
AGGREGATES = {  # name -> (reference is the mean, reduction of d = (a − ref)·g of shape N×C×H×W)
    "zero, Σ (plain LRP)": (False, lambda d: d.sum((0, 2, 3))),
    "zero, per image abs(Σ)": (False, lambda d: d.sum((2, 3)).abs().sum(0)),
    "mean, Σ": (True, lambda d: d.sum((0, 2, 3)).abs()),
    "mean, per image abs(Σ)": (True, lambda d: d.sum((2, 3)).abs().sum(0)),
    "mean, per position abs(·)": (True, lambda d: d.abs().sum((0, 2, 3))),
    "mean, per image (Σ)²": (True, lambda d: d.sum((2, 3)).pow(2).sum(0)),
}


def scores(model: torch.nn.Module, data: ImageData, groups, composite: str, seed: int,
           samples: int = 512) -> dict[str, dict[str, torch.Tensor]]:
    """aggregate name -> {group root: score per channel}"""
    reader = {g.consumers[0]: g.root for g in groups}
    means = _input_means(model, data, list(reader), ChannelPruneConfig(0.0, samples=samples, seed=seed))
    mods = dict(model.named_modules())
    out = {k: {r: torch.zeros(mods[r].out_channels, dtype=torch.float64) for r in reader.values()} for k in AGGREGATES}
    seen: dict[str, torch.Tensor] = {}
    hooks = [mods[c].register_forward_pre_hook(lambda _m, inp, c=c: seen.__setitem__(c, inp[0])) for c in reader]
    idx = sample_indices(len(data), samples, seed, data.y)
    try:
        with lrp_pass(model, get_composite(composite), data.tensor(idx[:1])) as states:
            for x, y in data.batches(64, idx, "cpu"):
                for st in states.values():
                    st.reset()
                logits = model(x)
                acts = [seen[c] for c in reader]
                grads = torch.autograd.grad(logits, acts, grad_outputs=_start_grad(logits, y, "true"))
                for c, a, g in zip(reader, acts, grads):
                    a, g = a.detach().double(), g.double()
                    for name, (centred, reduce) in AGGREGATES.items():
                        ref = means[c].view(1, -1, 1, 1) if centred else 0.0
                        out[name][reader[c]] += reduce((a - ref) * g)
    finally:
        for h in hooks:
            h.remove()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--subsets", default="0,1,8;3,4,5;all", help="';'-separated: 'all' or comma lists")
    ap.add_argument("--fractions", default="0.3,0.5")
    ap.add_argument("--seeds", default="0", help="comma list: draws of the 512 scoring images")
    ap.add_argument("--val-size", type=int, default=1500)
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reference_probe.md"))
    add_weights_option(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    train_all = load_data(Path(args.shared) / "data" / "cifar10-jpeg", "train")
    dense_all = load_model(args.arch, checkpoint(args.arch, args))
    rows = {f"{c} · {a}": {"score": f"{c} · {a}"} for c in COMPOSITES for a in AGGREGATES}
    rows.update({k: {"score": k} for k in ("library default (ε, mean, per image abs(Σ))", "filter L1")})
    heads = []
    for sub in args.subsets.split(";"):
        classes = None if sub == "all" else [int(c) for c in sub.split(",")]
        dense = dense_all if classes is None else restrict_classes(dense_all, classes)
        fit, val = split_train_val(train_all if classes is None else train_all.restrict_classes(classes),
                                   args.val_size, 0)
        heads.append(f"{sub}: {accuracy(dense, val, show_progress=False):.2f}%")
        example = fit.tensor(np.arange(1))
        groups = [g for g in prunable_groups(dense, example, _graph(dense, example)) if not g.stream]
        for seed in seeds:
            got = {f"{c} · {a}": s for c, comp in COMPOSITES.items()
                   for a, s in scores(dense, fit, groups, comp, seed).items()}
            for f in fractions:
                col = f"{sub} @ {f:g}" + (f" s{seed}" if len(seeds) > 1 else "")

                def cut(cfg: ChannelPruneConfig, given=None) -> str:
                    res = prune_channels(dense, fit, cfg, show_progress=False, scores=given)
                    return f"{accuracy(res.model, val, show_progress=False):.2f}"

                for label, s in got.items():
                    rows[label][col] = cut(ChannelPruneConfig(f, seed=seed, reconstruct=False), s)
                rows["library default (ε, mean, per image abs(Σ))"][col] = cut(
                    ChannelPruneConfig(f, seed=seed, reconstruct=False))
                rows["filter L1"][col] = cut(ChannelPruneConfig(f, criterion="l1", seed=seed, reconstruct=False))
                print(col, {k: v[col] for k, v in rows.items()}, flush=True)
    cols = [("score", "score")] + [(k, k) for k in rows["filter L1"] if k != "score"]
    text = ["# Channel relevance measured from zero or from the mean (held-out training images)", "",
            f"Command: `{shlex.join(['python', 'benchmarks/probe_reference.py', *sys.argv[1:]])}`; "
            f"{datetime.date.today()}. {args.arch}, head cut to the classes, that fraction of every block's inner "
            f"channels removed (mean compensation on, no fine-tuning); accuracy (%) on {args.val_size} training "
            f"images of those classes held out from scoring (dense: {'; '.join(heads)}). Scores from 512 training "
            "images, relevance started at the true class; d = (a − ref)·g at each block's inner activation a, "
            "g the relevance per unit of a under the rule (the gradient for ε), ref = 0 or the channel's mean.", "",
            markdown_table(list(rows.values()), cols), ""]
    write_page(args.out, text)


if __name__ == "__main__":
    main()
