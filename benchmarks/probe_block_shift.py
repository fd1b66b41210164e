"""Does a removed block's mean change, added back as a constant shift, help the cut? (It does not after recovery.)

A channel cut folds each removed channel's mean into the next layer (docs/FINDINGS.md §5; without it every criterion
loses 5-15 points). The block counterpart: replace a removed residual block by ``x + m`` instead of the identity,
``m`` its mean change ``out − in`` per channel over ``--samples`` reference images of the training data (what the
``reference="mean"`` block criteria already subtract). Each cut of ``--cuts`` is measured both ways, on
``--val-size`` held-out training images and (reported only) the test split, before and after ``--epochs`` of the
library's float recovery (``RECOVERY_RECIPE``; the shift is a trainable parameter there, as a bias would be).

    python benchmarks/probe_block_shift.py     # ResNet-20: the norm cut and plain LRP's cut, 2 epochs, ~13 min
    python benchmarks/probe_block_shift.py --cuts layer1.0,layer1.1,layer2.2   # the committed page, ~6 min
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lrpcompress.blocks import remove_blocks  # noqa: E402
from lrpcompress.data import ImageData, load_data, sample_indices, split_train_val  # noqa: E402
from lrpcompress.evaluation import accuracy  # noqa: E402
from lrpcompress.models import load_model  # noqa: E402
from lrpcompress.recovery import RECOVERY_RECIPE, finetune_model  # noqa: E402
from lrpcompress.relevance import _eval_out_of_place, _per_channel  # noqa: E402
from lrpcompress.report import markdown_table, write_page  # noqa: E402
from run_benchmark import checkpoint  # noqa: E402

SHARED = ROOT.parent / "shared"


class Shift(nn.Module):
    """``x + m`` with ``m`` one value per channel (dimension 1)."""

    def __init__(self, m: torch.Tensor) -> None:
        super().__init__()
        self.shift = nn.Parameter(m.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift.view(1, -1, *([1] * (x.dim() - 2)))


@torch.no_grad()
def mean_changes(model: nn.Module, data: ImageData, names: list[str], samples: int, seed: int) -> dict[str, torch.Tensor]:
    """Each named block's mean of ``out − in`` per channel (over images and positions), in eval mode."""
    mods = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook(name: str):
        def rec(_m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            d = (out - inp[0]).double()
            sums[name] = sums.get(name, 0) + _per_channel(d).sum(0)
            counts[name] += d.numel() // d.shape[1]
        return rec

    handles = [mods[b].register_forward_hook(hook(b)) for b in names]
    try:
        with _eval_out_of_place(model):
            for x, _y in data.batches(64, sample_indices(len(data), samples, seed, data.y)):
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {b: sums[b] / counts[b] for b in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--cuts", default="layer1.0,layer1.1,layer2.2;layer1.2,layer2.2,layer3.1",
                    help="block lists separated by ';' (default: the norm cut and plain LRP's, FINDINGS §15)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "block_shift_probe.md"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    data_dir = Path(args.shared) / "data" / "cifar10-jpeg"
    train_all, test = load_data(data_dir, "train"), load_data(data_dir, "test")
    dense = load_model(args.arch, checkpoint(args.arch, args))
    fit, val = split_train_val(train_all, args.val_size, args.seed)
    rows = [{"cut": "dense", "replaced by": "–", "held-out": round(accuracy(dense, val, show_progress=False), 2),
             "test": round(accuracy(dense, test, show_progress=False), 2)}]
    for cut in args.cuts.split(";"):
        names = cut.split(",")
        means = mean_changes(dense, fit, names, args.samples, args.seed)
        for mode in ("identity", "shift"):
            net = remove_blocks(dense, names)
            if mode == "shift":
                for b in names:
                    net.set_submodule(b, Shift(means[b]))
            row = {"cut": ", ".join(names), "replaced by": mode,
                   "held-out": round(accuracy(net, val, show_progress=False), 2),
                   "test": round(accuracy(net, test, show_progress=False), 2)}
            if args.epochs:
                trained = finetune_model(net, fit, replace(RECOVERY_RECIPE, epochs=args.epochs, seed=args.seed),
                                         teacher=dense, show_progress=False)
                row[f"held-out + {args.epochs} ep"] = round(accuracy(trained, val, show_progress=False), 2)
                row[f"test + {args.epochs} ep"] = round(accuracy(trained, test, show_progress=False), 2)
            rows.append(row)
            print(row, flush=True)
    cmd = shlex.join(["python", "benchmarks/probe_block_shift.py", *sys.argv[1:]])
    write_page(args.out, [
        f"# A removed block's mean change added back: {args.arch}", "",
        f"Command: `{cmd}`; {datetime.date.today()}; torch {torch.__version__}. Mean change `out − in` per channel "
        f"on {args.samples} reference images of the training data minus {len(val)} held out; `shift` replaces the "
        f"block by `x + m` (m trainable in recovery), `identity` by its shortcut. Recovery: {args.epochs} epoch(s) of "
        f"RECOVERY_RECIPE, seed {args.seed}. Accuracy (%) on held-out training images and, reported only, the test "
        "split.", "",
        markdown_table(rows, [(k, k) for k in dict.fromkeys(k for r in rows for k in r)]), ""])


if __name__ == "__main__":
    main()
