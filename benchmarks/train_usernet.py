"""Train a network the generalisation benchmarks need from scratch on the CIFAR-10 JPEG training split.

The pretrained models of ../shared are ResNet-20 and ResNet-44 only. This trains, with the library's own training
loop (SGD, one-cycle learning rate, crops and flips), either a plain VGG-style CNN (``usernet:vgg_small``,
benchmarks/usernet.py: a user's network is often not a ResNet) or a CIFAR ResNet depth that ../shared lacks
(``resnet32``, ``resnet56``), and writes its state dict; the benchmarks then compress it with ``--weights PATH``,
nothing retuned.

    python benchmarks/train_usernet.py --out /tmp/vgg_small-cifar10jpeg.pt     # 8 epochs, ~30 min on 2 cores
    python benchmarks/train_usernet.py --arch resnet32 --epochs 20 --lr 0.1 --out /tmp/resnet32-scratch.pt
        # ~2.2 min per epoch on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lrpcompress.data import load_data  # noqa: E402
from lrpcompress.evaluation import accuracy  # noqa: E402
from lrpcompress.io import atomic_write_bytes  # noqa: E402
from lrpcompress.models import build_model  # noqa: E402
from lrpcompress.recovery import FinetuneConfig, finetune_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="usernet:vgg_small")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    data = Path(args.shared) / "data" / "cifar10-jpeg"
    train, test = load_data(data, "train"), load_data(data, "test")
    torch.manual_seed(args.seed)
    model = build_model(args.arch, train.num_classes)
    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         weight_decay=args.weight_decay, distill=0.0,
                         train_bn=True, seed=args.seed)
    model = finetune_model(model, train, cfg)
    print(f"{args.arch}: test accuracy {accuracy(model, test, show_progress=False):.2f}% after {args.epochs} epochs")
    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(Path(args.out), buf.getvalue())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
