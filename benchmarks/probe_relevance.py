"""Why the paper's literal rule collapses, and how relevance ranks weights.

    python benchmarks/probe_relevance.py     # writes benchmarks/results/relevance_probe.md

On the fine-tuned ResNet-20 of ../shared: relevance from 1,000 training images (true-class start,
BatchNorm folded). For each composite: the share of weights with summed relevance <= 0, the share of
|w| mass they carry, and the accuracy after removing them (no quantization, no fine-tuning); then
unstructured pruning at 30/50/70% ranked by |w|, by signed relevance and by |relevance|.
Accuracy: 2,000 held-out training images (class-balanced), never the test split.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lrpcompress.data import load_data, split_train_val  # noqa: E402
from lrpcompress.evaluation import accuracy  # noqa: E402
from lrpcompress.models import load_model  # noqa: E402
from lrpcompress.pruning import PruneConfig, apply_masks_, prune_masks  # noqa: E402
from lrpcompress.relevance import RelevanceConfig, compute_relevance  # noqa: E402
from lrpcompress.report import markdown_table, write_page  # noqa: E402

SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "models" / "resnet20-cifar10jpeg.pt"


def pruned_accuracy(masks, val) -> float:
    m = load_model("resnet20", WEIGHTS)
    apply_masks_(m, masks)
    return accuracy(m, val, show_progress=False)


def main() -> None:
    train = load_data(SHARED / "data" / "cifar10-jpeg", "train")
    fit, val = split_train_val(train, 2000, 0)
    model = load_model("resnet20", WEIGHTS)
    base = accuracy(model, val, show_progress=False)
    weights = {n: p.detach() for n, p in model.named_parameters() if p.dim() > 1}
    rows, ranks = [], []
    for comp in ("epsilon", "epsilon_plus", "epsilon_alpha2_beta1", "epsilon_gamma"):
        rel = compute_relevance(model, fit, RelevanceConfig(composite=comp, samples=1000), show_progress=False)
        r = {k: rel.weights[k] for k in weights}
        masks = prune_masks(r, PruneConfig("nonpositive"))
        total = sum(w.numel() for w in weights.values())
        removed = sum(int((~m).sum()) for m in masks.values())
        mass = sum(float(weights[k].abs()[~m].sum()) for k, m in masks.items()) / sum(
            float(w.abs().sum()) for w in weights.values())
        rows.append({"composite": comp, "share R<=0": f"{100 * removed / total:.1f}%",
                     "share of |w| mass": f"{100 * mass:.1f}%",
                     "accuracy after removing them": f"{pruned_accuracy(masks, val):.2f}%"})
        print(rows[-1], flush=True)
        if comp in ("epsilon", "epsilon_plus"):
            for label, score in ((f"signed R ({comp})", r), (f"|R| ({comp})", {k: v.abs() for k, v in r.items()})):
                ranks.append((label, score))
    ranks.insert(0, ("|w| (magnitude)", {k: w.abs().double() for k, w in weights.items()}))
    prune_rows = []
    for label, score in ranks:
        row = {"ranking": label}
        for s in (0.3, 0.5, 0.7):
            row[f"{int(s * 100)}%"] = f"{pruned_accuracy(prune_masks(score, PruneConfig('fraction', s)), val):.2f}%"
        prune_rows.append(row)
        print(row, flush=True)
    text = ["# Relevance probe: the paper's rule and weight rankings", "",
            f"Command: `python benchmarks/probe_relevance.py`; {datetime.date.today()}. ResNet-20 fine-tuned on "
            f"CIFAR-10 (JPEG q75); relevance from 1,000 training images; accuracy on 2,000 held-out training "
            f"images (unpruned: {base:.2f}%). No quantization, no fine-tuning.", "",
            "## Removing every weight with summed relevance <= 0 (the paper's rule)", "",
            markdown_table(rows, [(k, k) for k in rows[0]]), "",
            "## Unstructured pruning by ranking (global; each layer's scores divided by their mean |score|)", "",
            markdown_table(prune_rows, [(k, k) for k in prune_rows[0]]), ""]
    out = ROOT / "benchmarks" / "results" / "relevance_probe.md"
    write_page(out, text)


if __name__ == "__main__":
    main()
