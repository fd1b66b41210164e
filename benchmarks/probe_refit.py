"""Least-squares refit after a channel cut: does its head start survive recovery, and at which learning rate?

    python benchmarks/probe_refit.py        # writes benchmarks/results/refit_probe.md (~35 min, 2 cores)
    python benchmarks/probe_refit.py --subsets 0,1,8 --epochs 1 --arms "lrp:0:0.01|lrp:1:0.01" --out /tmp/r.md
    python benchmarks/probe_refit.py --epochs 0 --subsets "all;0,1,8;3,4,5" --fractions 0.3,0.5 \
        --arms "l1:0:0|l1:1:0|taylor:0:0|taylor:1:0|lrp:0:0|lrp:1:0"     # the cuts only, no recovery (~10 min)
    python benchmarks/probe_refit.py --subsets all --fractions 0.4@8 --epochs 2 --arms "lrp:d:0.01|lrp:d:0.02|lrp:d:0.04" \
        --out /tmp/a.md           # recovery learning rates (~17 min); with --batch-size 32 --arms "lrp:d:0.01|lrp:d:0.005"
                                  # the second half of benchmarks/results/recovery_lr_probe.md

ResNet-20 of ../shared (head cut to the classes where a subset is given), that fraction of every block's
inner channels removed (``0.3+0.125``: and 12.5% of every residual stream's channels; ``0.4@8``: every layer's
kept channels rounded to a multiple of 8, as in ``bench_channels.py``); each arm is
``criterion:refit:lr[:w]`` (refit 0 = mean compensation only, 1 = ``ChannelPruneConfig(reconstruct=True)``, the
readers of removed channels refitted; d = ``refit_scope='downstream'``, every later layer too),
then float recovery (the library's ``RECOVERY_RECIPE``: distillation from the unpruned model, BatchNorm
statistics updated, one-cycle SGD) at that peak learning rate, with ``w`` × the block-wise feature loss
(``FinetuneConfig.feature_distill``, default 0). Scoring, refit and training use the training
images minus ``--val-size`` held out; accuracy is on those held-out images only (never the test split), before
and after recovery.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lrpcompress.data import load_data, split_train_val  # noqa: E402
from lrpcompress.evaluation import accuracy  # noqa: E402
from lrpcompress.models import load_model, restrict_classes  # noqa: E402
from lrpcompress.recovery import RECOVERY_RECIPE, finetune_model  # noqa: E402
from lrpcompress.report import markdown_table, write_page  # noqa: E402
from lrpcompress.structured import ChannelPruneConfig, prune_channels  # noqa: E402
from run_benchmark import add_weights_option, checkpoint  # noqa: E402

from bench_channels import budget_name, parse_budget  # noqa: E402

SHARED = ROOT.parent / "shared"
ARMS = "lrp:0:0.01|lrp:1:0.01|lrp:1:0.003|lrp:1:0.001"
REFITS = {"0": {"reconstruct": False}, "1": {"reconstruct": True, "refit_scope": "readers"},
          "d": {"reconstruct": True, "refit_scope": "downstream"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--subsets", default="all", help="';'-separated: 'all' or comma lists")
    ap.add_argument("--fractions", default="0.5",
                    help="comma-separated inner-channel fractions, each optionally +stream fraction (0.3+0.125) "
                         "and @multiple that every kept channel count is rounded to (0.4@8)")
    ap.add_argument("--arms", default=ARMS,
                    help="'|'-separated criterion:refit(0/1/d):lr[:feature-loss weight (FinetuneConfig.feature_distill)]")
    ap.add_argument("--epochs", type=int, default=2, help="recovery epochs (0: the cuts only)")
    ap.add_argument("--batch-size", type=int, default=RECOVERY_RECIPE.batch_size, help="recovery batch size")
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "refit_probe.md"))
    add_weights_option(ap)
    args = ap.parse_args()
    arms = [(a[0], a[1], float(a[2]), float(a[3]) if len(a) > 3 else 0.0)
            for a in (arm.split(":") for arm in args.arms.split("|"))]
    if any(r not in REFITS for _, r, _, _ in arms):
        ap.error(f"the refit part of an arm must be one of {', '.join(REFITS)}")
    train_all = load_data(Path(args.shared) / "data" / "cifar10-jpeg", "train")
    dense_all = load_model(args.arch, checkpoint(args.arch, args))
    rows = []
    for subset in args.subsets.split(";"):
        classes = None if subset == "all" else [int(c) for c in subset.split(",")]
        dense = dense_all if classes is None else restrict_classes(dense_all, classes)
        fit, val = split_train_val(train_all if classes is None else train_all.restrict_classes(classes),
                                   args.val_size, args.seed)
        base = accuracy(dense, val, show_progress=False)
        for budget in map(parse_budget, args.fractions.split(",")):
            inner, stream, round_to, scope = budget
            if scope != "layer":
                ap.error("probe_refit cuts every layer alike: no g/m/a scope suffix")
            cuts = {}
            for crit, refit, lr, feat in arms:
                if (crit, refit) not in cuts:
                    cfg = ChannelPruneConfig(inner, crit, seed=args.seed, stream_fraction=stream, round_to=round_to,
                                             **REFITS[refit])
                    cut = prune_channels(dense, fit, cfg, show_progress=False).model
                    cuts[crit, refit] = (cut, accuracy(cut, val, show_progress=False))
                cut, before = cuts[crit, refit]
                row = {"classes": subset, "removed": budget_name(budget), "criterion": crit,
                       "refit": {"0": "no", "1": "readers", "d": "downstream"}[refit], "dense": round(base, 2),
                       "cut": round(before, 2)}
                if args.epochs > 0:
                    rcfg = replace(RECOVERY_RECIPE, epochs=args.epochs, lr=lr, batch_size=args.batch_size, seed=args.seed,
                                   feature_distill=feat)
                    after = accuracy(finetune_model(cut, fit, rcfg, teacher=dense), val, show_progress=False)
                    row.update({"lr": f"{lr:g}", "feature loss": f"{feat:g}", f"+ {args.epochs} ep": round(after, 2),
                                "drop": round(base - after, 2)})
                rows.append(row)
                print(rows[-1], flush=True)
    cmd = shlex.join(["python", "benchmarks/probe_refit.py", *sys.argv[1:]])
    cols = [(k, k) for k in rows[0]]
    write_page(args.out, [
        "# Least-squares refit after a channel cut, then recovery (held-out training images)", "",
        f"Command: `{cmd}`; {datetime.date.today()}. {args.arch}, that fraction of every block's inner channels "
        f"removed (a + b: and b of every residual stream's), {args.epochs} epoch(s) of float recovery "
        "(distillation, BatchNorm statistics updated, batch "
        f"{args.batch_size}, one-cycle peak lr as given) on the training images minus {args.val_size} held "
        "out; accuracy (%) on those held-out images (never the test split), after the cut and after recovery. "
        "The held-out images were part of the dense model's own training set (hence its ~95-99%): they are unseen "
        "by scoring, refit and recovery, not by the original training, so drops read larger than on the test split.",
        "",
        markdown_table(rows, cols), ""])


if __name__ == "__main__":
    main()
