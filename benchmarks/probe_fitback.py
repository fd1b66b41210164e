"""The fit-back after fine-tuning, traced (docs/FINDINGS.md §7).

With entropy coding a trained file can outgrow its cap; ``shrink_to_budget`` then lowers some groups' widths.
This trains one 16× setting of ResNet-20 the way ``compress`` does (2% room, 2 epochs, learned scales), keeps
the file before the fit-back, and fits it back with no group below 1, 2 or 3 bits, and with the default
(≥ 3 first, then 2, then 1). Held-out: training images never used for scores, calibration or training.

    python benchmarks/probe_fitback.py                       # no pruning, floor 1: ~7 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from run_benchmark import SHARED, Runner, add_finetune_recipe_options, finetune_recipe  # noqa: E402

from lrpcompress.compress import _shrink, allocation_target, shrink_to_budget  # noqa: E402
from lrpcompress.evaluation import accuracy  # noqa: E402
from lrpcompress.recovery import FinetuneConfig, finetune  # noqa: E402
from lrpcompress.search import with_knobs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--budget", type=float, default=16.0)
    ap.add_argument("--knobs", default="0:1", help="SPARSITY:FLOOR of the size search")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    add_finetune_recipe_options(ap)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shared", default=str(SHARED))
    args = ap.parse_args()
    sparsity, floor = (float(args.knobs.split(":")[0]), int(args.knobs.split(":")[1]))
    r = Runner(args.model, args)
    ft = FinetuneConfig(epochs=args.epochs, seed=args.seed, **finetune_recipe(args))
    cfg = with_knobs(replace(r.cfg("lrp"), target_ratio=args.budget, finetune=ft), sparsity, floor)
    cap = int(r.dense_bytes() / args.budget)
    res = r.run(replace(cfg, target_ratio=None, target_bytes=allocation_target(cfg, r.dense_bytes()),
                        finetune=FinetuneConfig(epochs=0)))

    def widths(cm) -> dict[int, int]:
        b = np.concatenate([t.bits for t in cm.tensors.values() if hasattr(t, "bits")])
        return {int(k): int(v) for k, v in zip(*np.unique(b, return_counts=True))}

    def held_out(cm) -> float:
        return accuracy(cm.to_module().to(r.device), r.val, show_progress=False)

    print(f"| file | bytes (cap {cap}) | held-out % | groups per width |\n|---|---|---|---|")
    print(f"| before training | {res.file_bytes} | {held_out(res.compressed):.2f} | {widths(res.compressed)} |")
    trained = finetune(res.compressed, r.fit, ft, teacher=r.model, show_progress=False, device=args.device)
    print(f"| trained, before the fit-back | {len(trained.to_bytes())} | {held_out(trained):.2f} | {widths(trained)} |")
    if len(trained.to_bytes()) <= cap:
        return
    for lowest in (1, 2, 3):
        try:
            out = _shrink(trained, cap, res.quant, res.importance, lowest)
        except Exception as exc:  # e.g. 3 bits cannot meet the cap
            print(f"| fit-back, no group below {lowest} bits | – | {exc} | |")
            continue
        print(f"| fit-back, no group below {lowest} bits | {len(out.to_bytes())} | {held_out(out):.2f} "
              f"| {widths(out)} |")
    out = shrink_to_budget(trained, cap, res.quant, res.importance)
    print(f"| fit-back, default | {len(out.to_bytes())} | {held_out(out):.2f} | test "
          f"{accuracy(out.to_module().to(r.device), r.test, show_progress=False):.2f}% |")


if __name__ == "__main__":
    main()
