"""How to compute channel relevance for a class subset: start point, composite, rounds, scope, samples.

    python benchmarks/probe_channels.py      # writes benchmarks/results/channel_probe.md (~25 min, 2 cores)
    python benchmarks/probe_channels.py --subsets "all;0,1,8" --variants "MAC|L1" --out /tmp/p.md

ResNet-20 of ../shared, head cut to a class subset, inner channels of every block removed (mean
compensation on, no fine-tuning). Every variant of `ChannelPruneConfig` is compared on 1,500 training
images of those classes held out from scoring (never the test split); seeds 1 and 2 of the default show the
noise of the 512-image sample. The default of `bench_channels.py` and of the CLI is the first row.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lrpcompress.data import load_data, split_train_val  # noqa: E402
import numpy as np  # noqa: E402

from lrpcompress.evaluation import accuracy, count_macs  # noqa: E402
from lrpcompress.models import load_model, restrict_classes  # noqa: E402
from lrpcompress.report import markdown_table, write_page  # noqa: E402
from lrpcompress.structured import ChannelPruneConfig, prune_channels  # noqa: E402

SHARED = ROOT.parent / "shared"
VARIANTS = {  # label -> ChannelPruneConfig overrides
    "LRP-ε from the mean, true class, 512 images (default)": {},
    "· seed 1": {"seed": 1},
    "· seed 2": {"seed": 2},
    "· 2,048 images": {"samples": 2048},
    "· start: predicted class": {"start": "predicted"},
    "· start: all classes": {"start": "all"},
    "· start: contrast (d log p_y)": {"start": "contrast"},
    "· 3 rounds, rescored": {"steps": 3},
    "· global threshold": {"scope": "global"},
    "· global threshold, raw relevance": {"scope": "global", "normalise": False},
    "· MAC-aware ranking": {"scope": "macs"},
    "· MAC-aware ranking, seed 1": {"scope": "macs", "seed": 1},
    "· MAC-aware ranking, seed 2": {"scope": "macs", "seed": 2},
    "· MAC-aware ranking, raw relevance": {"scope": "macs", "normalise": False},
    "· from zero (plain LRP-ε)": {"reference": "zero"},
    "· no mean compensation (so from zero)": {"compensate": False, "reference": "zero"},
    "LRP-z⁺ from the mean": {"composite": "epsilon_plus"},
    "LRP-z⁺ from zero (the default until 2026-11-27)": {"composite": "epsilon_plus", "reference": "zero"},
    "LRP α2β1 on conv, from the mean": {"composite": "epsilon_alpha2_beta1"},
    "LRP γ on conv, from the mean": {"composite": "epsilon_gamma"},
    "Taylor": {"criterion": "taylor"},
    "Taylor, 3 rounds": {"criterion": "taylor", "steps": 3},
    "filter L1": {"criterion": "l1"},
    "filter L1, global threshold": {"criterion": "l1", "scope": "global"},
    "filter L1, MAC-aware ranking": {"criterion": "l1", "scope": "macs"},
    "Taylor, MAC-aware ranking": {"criterion": "taylor", "scope": "macs"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subsets", default="0,1,8;3,4,5", help="';'-separated: 'all' or comma lists")
    ap.add_argument("--variants", default="", help="regular expression: only the variants whose label matches")
    ap.add_argument("--fractions", default="0.3,0.5")
    ap.add_argument("--val-size", type=int, default=1500)
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "channel_probe.md"))
    args = ap.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    subsets = [None if s == "all" else [int(c) for c in s.split(",")] for s in args.subsets.split(";")]
    variants = {k: v for k, v in VARIANTS.items() if re.search(args.variants, k)}
    train_all = load_data(Path(args.shared) / "data" / "cifar10-jpeg", "train")
    dense_all = load_model("resnet20", Path(args.shared) / "models" / "resnet20-cifar10jpeg.pt")
    rows = {label: {"variant": label} for label in variants}
    heads = []
    example = train_all.tensor(np.arange(1), "cpu")
    for classes in subsets:
        dense = dense_all if classes is None else restrict_classes(dense_all, classes)
        fit, val = split_train_val(train_all if classes is None else train_all.restrict_classes(classes),
                                   args.val_size, 0)
        tag = "all" if classes is None else ",".join(map(str, classes))
        heads.append(f"{tag}: {accuracy(dense, val, show_progress=False):.2f}%")
        macs0 = count_macs(dense, example)
        for f in fractions:
            for label, kw in variants.items():
                # mean compensation only, as the committed table was measured (the refit came later)
                res = prune_channels(dense, fit, ChannelPruneConfig(f, **{"reconstruct": False, **kw}),
                                     show_progress=False)
                acc = accuracy(res.model, val, show_progress=False)
                share = 100 * count_macs(res.model, example) / macs0
                rows[label][f"{tag} @ {f:g}"] = f"{acc:.2f} ({share:.1f})"
                print(f"{tag} {f:g} {label}: {rows[label][f'{tag} @ {f:g}']}", flush=True)
    cols = [("variant", "variant")] + [(k, k) for k in rows[next(iter(variants))] if k != "variant"]
    text = ["# Channel relevance variants on class subsets (held-out training images)", "",
            f"Command: `{' '.join(['python', 'benchmarks/probe_channels.py'] + [repr(a) if ';' in a or '|' in a else a for a in sys.argv[1:]])}`; {datetime.date.today()}. ResNet-20, head cut to the "
            f"classes, that fraction of every block's inner channels removed, no fine-tuning; accuracy (%) on "
            f"{args.val_size} training images of those classes held out from scoring (dense: {'; '.join(heads)}), "
            "in brackets the MACs left (% of the dense model's). Rows marked · change one setting of the default; "
            "MAC-aware rows remove the same MACs as the fraction does in layer scope, spread by score per MAC "
            "(`scope='macs'`).", "",
            markdown_table(list(rows.values()), cols), ""]
    write_page(args.out, text)


if __name__ == "__main__":
    main()
