"""Recovery fine-tuning recipes at one size budget, compared on held-out images.

`compress --target-ratio R --finetune-epochs N` trains with one recipe (``FinetuneConfig``: learning rate
0.005, batch 64, the pick of this benchmark on held-out images, since 2026-12-01; 0.01, batch 128
before; distillation at temperature 4, learned scales). Within a fixed number of epochs the
learning rate and the batch size (how many updates the epochs give) decide how far the quantized model
recovers. Each recipe here runs the same pipeline as the CLI (the size search's setting fixed by
``--knobs``, 2% room for training, ``shrink_to_budget`` after it) and writes a real file; the recipe to use is
the one most accurate on held-out training images (never scored, calibrated or trained on), and every row
also reports the written file, loaded back, on the test split.

    python benchmarks/bench_recipe.py                                   # ResNet-20, 16x, 2 epochs
    python benchmarks/bench_recipe.py --recipes 0.01:64,0.005:64 --seeds 0,1 --append
    python benchmarks/bench_recipe.py --recipes 0.01:128 --teacher resnet44 --append   # distil from a larger model
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_benchmark import SHARED, Runner, _machine, provenance  # noqa: E402

from lrpcompress.compress import compress  # noqa: E402
from lrpcompress.evaluation import accuracy  # noqa: E402
from lrpcompress.models import load_model  # noqa: E402
from lrpcompress.recovery import FinetuneConfig  # noqa: E402
from lrpcompress.report import markdown_table  # noqa: E402
from lrpcompress.search import with_knobs  # noqa: E402


def parse_recipes(text: str) -> list[tuple[float, int]]:
    """``"0.01:128,0.01:64"`` → [(0.01, 128), (0.01, 64)] (learning rate : batch size)."""
    out = []
    for item in (t for t in text.split(",") if t):
        lr, _, batch = item.partition(":")
        try:
            out.append((float(lr), int(batch)))
        except ValueError:
            sys.exit(f"--recipes: {item!r} is not LR:BATCH (e.g. 0.01:128)")
    return out


def parse_knobs(text: str) -> tuple[float, int]:
    """``"0:2"`` → (sparsity 0, floor 2 bits): the size search's setting every recipe trains."""
    s, _, f = text.partition(":")
    try:
        return float(s), int(f)
    except ValueError:
        sys.exit(f"--knobs: {text!r} is not SPARSITY:FLOOR (e.g. 0:2)")


def row_key(row: dict) -> tuple:
    return (row["model"], row["budget"], row["epochs"], row["method"], row["lr"], row["batch_size"], row["seed"],
            row.get("teacher", row["model"]))


def write(rows: list[dict], out: Path, commands: list[str], started: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipes.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = provenance("Recovery fine-tuning recipes at equal bytes and epochs", commands, started, rows) + [
        "One size-search setting (`knobs`) trained with each recipe through the quantizers (learned scales, "
        "distillation from the float model (`teacher`: from which), pruned weights kept at zero), 2% room left for "
        "training as "
        "`compress` does. `held-out %`: training images never used for scores, calibration or training (choose "
        "by this column); `test %`: the written file, loaded back, on the test split.", ""]
    for r in rows:
        r.setdefault("teacher", r["model"])
    cols = (("method", "method"), ("knobs", "knobs"), ("lr", "lr"), ("batch_size", "batch"), ("seed", "seed"),
            ("teacher", "teacher"),
            ("file_bytes", "file bytes"), ("ratio", "ratio"), ("val_accuracy", "held-out %"),
            ("accuracy", "test %"), ("drop", "drop"), ("seconds", "compress + train s"))
    for key in sorted({(r["model"], r["budget"], r["epochs"]) for r in rows}):
        group = sorted((r for r in rows if (r["model"], r["budget"], r["epochs"]) == key),
                       key=lambda r: (r["method"], r["teacher"] != r["model"], r["teacher"], r["lr"], r["batch_size"],
                                      r["seed"]))
        lines += [f"## {key[0]}, {key[1]:g}×, {key[2]} epoch(s)", "", markdown_table(group, cols), ""]
    (out / "recipes.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--budget", type=float, default=16.0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--method", default="lrp")
    ap.add_argument("--knobs", default="0:2", help="SPARSITY:FLOOR of the size search trained by every recipe")
    ap.add_argument("--recipes", default="0.01:128,0.01:64,0.02:128", help="LR:BATCH,...")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--teacher", default=None, help="distil from this model of ../shared/models instead of the "
                    "uncompressed one (e.g. resnet44 for a resnet20 student)")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--fit-images", type=int, default=0, help="use only this many training images (smoke runs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--append", action="store_true", help="keep the rows of recipes.json this run does not measure")
    args = ap.parse_args()
    recipes = parse_recipes(args.recipes)
    sparsity, floor = parse_knobs(args.knobs)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.epochs < 1:
        sys.exit("--epochs must be at least 1 (recipes are compared after training)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but no CUDA device is available")
    args.seed = 0  # scores, calibration and the held-out split; the recipe's seed only moves training
    args.machine = _machine(args.device)
    out = Path(args.out)
    rows: list[dict] = (json.loads((out / "recipes.json").read_text())
                        if args.append and (out / "recipes.json").exists() else [])
    command = shlex.join(["python", "benchmarks/bench_recipe.py", *sys.argv[1:]])
    commands = sorted({r.get("command", "") for r in rows} - {""} | {command})
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    r = Runner(args.model, args)
    if args.fit_images:  # smoke runs: fewer training images for scores, calibration and training alike
        r.fit = r.fit.subset(np.arange(min(args.fit_images, len(r.fit))))
    limit = int(r.dense_bytes() / args.budget)
    print(f"{args.model}: float test {r.base_test:.2f}%, held-out {r.base_val:.2f}%; cap {limit} B", flush=True)
    base = with_knobs(replace(r.cfg(args.method), target_ratio=args.budget), sparsity, floor)
    teacher_name = args.teacher or args.model
    teacher = r.model if args.teacher is None else load_model(
        args.teacher, Path(args.shared) / "models" / f"{args.teacher}-cifar10jpeg.pt").to(r.device).eval()
    if teacher is not r.model:
        print(f"teacher {teacher_name}: held-out {accuracy(teacher, r.val, show_progress=False):.2f}%", flush=True)
    for seed in seeds:
        for lr, batch in recipes:
            ft = FinetuneConfig(epochs=args.epochs, lr=lr, batch_size=batch, seed=seed)
            t0 = time.perf_counter()
            res = compress(r.model, r.fit, replace(base, finetune=ft), r.arch, scores=r.cache, show_progress=False,
                           teacher=teacher)
            seconds = round(time.perf_counter() - t0, 1)
            assert res.file_bytes <= limit, (res.file_bytes, limit)
            val = accuracy(res.compressed.to_module().to(r.device), r.val, show_progress=False)
            done = r.finish(args.method, args.budget, res, {})
            row = {"model": args.model, "budget": args.budget, "epochs": args.epochs, "method": args.method,
                   "knobs": args.knobs, "lr": lr, "batch_size": batch, "seed": seed, "teacher": teacher_name,
                   "file_bytes": done["file_bytes"], "ratio": done["ratio"], "val_accuracy": round(val, 2),
                   "accuracy": done["accuracy"], "drop": round(r.base_test - done["accuracy"], 2),
                   "seconds": seconds, "machine": args.machine, "command": command}
            rows[:] = [x for x in rows if row_key(x) != row_key(row)] + [row]
            write(rows, out, commands, started)
            print(f"  lr {lr:g} batch {batch} seed {seed} teacher {teacher_name}: held-out {val:.2f}, test {done['accuracy']:.2f}% "
                  f"{done['file_bytes']} B ({seconds} s)", flush=True)
    print(f"wrote {out}/recipes.md and recipes.json")


if __name__ == "__main__":
    main()
