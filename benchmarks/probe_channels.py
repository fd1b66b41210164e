"""How to compute channel relevance for a class subset: start point, composite, rounds, scope, samples.

    python benchmarks/probe_channels.py      # writes benchmarks/results/channel_probe.md (~10 min, 2 cores)

ResNet-20 of ../shared, head cut to a class subset, inner channels of every block removed (mean
compensation on, no fine-tuning). Every variant of `ChannelPruneConfig` is compared on 1,500 training
images of those classes held out from scoring (never the test split); seeds 1 and 2 of the default show the
noise of the 512-image sample. The default of `bench_channels.py` and of the CLI is the first row.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lrpcompress.data import load_data, split_train_val  # noqa: E402
from lrpcompress.evaluation import accuracy  # noqa: E402
from lrpcompress.models import load_model, restrict_classes  # noqa: E402
from lrpcompress.report import markdown_table  # noqa: E402
from lrpcompress.structured import ChannelPruneConfig, prune_channels  # noqa: E402

SHARED = ROOT.parent / "shared"
VARIANTS = {  # label -> ChannelPruneConfig overrides
    "LRP-z⁺, true class, 512 images (default)": {},
    "· seed 1": {"seed": 1},
    "· seed 2": {"seed": 2},
    "· 2,048 images": {"samples": 2048},
    "· start: predicted class": {"start": "predicted"},
    "· start: all classes": {"start": "all"},
    "· start: contrast (d log p_y)": {"start": "contrast"},
    "· 3 rounds, rescored": {"steps": 3},
    "· global threshold": {"scope": "global"},
    "· no mean compensation": {"compensate": False},
    "LRP-ε": {"composite": "epsilon"},
    "LRP α2β1 on conv": {"composite": "epsilon_alpha2_beta1"},
    "LRP γ on conv": {"composite": "epsilon_gamma"},
    "Taylor": {"criterion": "taylor"},
    "Taylor, 3 rounds": {"criterion": "taylor", "steps": 3},
    "filter L1": {"criterion": "l1"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subsets", default="0,1,8;3,4,5")
    ap.add_argument("--fractions", default="0.3,0.5")
    ap.add_argument("--val-size", type=int, default=1500)
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "channel_probe.md"))
    args = ap.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    subsets = [[int(c) for c in s.split(",")] for s in args.subsets.split(";")]
    train_all = load_data(Path(args.shared) / "data" / "cifar10-jpeg", "train")
    dense_all = load_model("resnet20", Path(args.shared) / "models" / "resnet20-cifar10jpeg.pt")
    rows = {label: {"variant": label} for label in VARIANTS}
    heads = []
    for classes in subsets:
        dense = restrict_classes(dense_all, classes)
        fit, val = split_train_val(train_all.restrict_classes(classes), args.val_size, 0)
        tag = ",".join(map(str, classes))
        heads.append(f"{tag}: {accuracy(dense, val, show_progress=False):.2f}%")
        for f in fractions:
            for label, kw in VARIANTS.items():
                res = prune_channels(dense, fit, ChannelPruneConfig(f, **kw), show_progress=False)
                rows[label][f"{tag} @ {f:g}"] = f"{accuracy(res.model, val, show_progress=False):.2f}"
                print(f"{tag} {f:g} {label}: {rows[label][f'{tag} @ {f:g}']}", flush=True)
    cols = [("variant", "variant")] + [(k, k) for k in rows[next(iter(VARIANTS))] if k != "variant"]
    text = ["# Channel relevance variants on class subsets (held-out training images)", "",
            f"Command: `python benchmarks/probe_channels.py`; {datetime.date.today()}. ResNet-20, head cut to the "
            f"classes, that fraction of every block's inner channels removed, no fine-tuning; accuracy (%) on "
            f"{args.val_size} training images of those classes held out from scoring (dense: {'; '.join(heads)}). "
            "Rows marked · change one setting of the default.", "",
            markdown_table(list(rows.values()), cols), ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
