"""Size-search knobs chosen with recovery fine-tuning in the loop, at one size budget.

`compress --target-ratio R --finetune-epochs N` picks its knob (sparsity before the allocation, floor on the
bit-width) by post-training accuracy on held-out training images, then fine-tunes only that setting. At 16×
on ResNet-20 every setting is at chance before training (results.md), so that pick is blind. Here every
candidate of the size search (plus a 2-bit floor) is fine-tuned for N epochs through the quantizers, with the
scales learned (LSQ, `FinetuneConfig.learn_scales`, the default) and fixed; the pick is the most accurate on
held-out training images after training. Magnitude pruning + uniform bits (fitted sparsity, first/last layer at
8 bits or not) gets the same treatment, so the baseline is trained at equal bytes and epochs too. Every row is
the written file, loaded back, on the test split.

    python benchmarks/bench_recovery.py --device cuda                     # ResNet-20, 16x, 2 epochs
    python benchmarks/bench_recovery.py --budget 12 --epochs 1 --append
    python benchmarks/bench_recovery.py --grids midrise --methods lrp --scales learned --append
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

from run_benchmark import (SHARED, Runner, _machine, add_finetune_recipe_options, finetune_recipe,  # noqa: E402
                           provenance, recipe_name)

from lrpcompress.compress import allocation_target, finetune_result  # noqa: E402
from lrpcompress.evaluation import accuracy  # noqa: E402
from lrpcompress.quantization import GRIDS  # noqa: E402
from lrpcompress.recovery import FinetuneConfig  # noqa: E402
from lrpcompress.report import markdown_table  # noqa: E402
from lrpcompress.search import knob_grid, resolve_knobs, with_knobs  # noqa: E402


def candidates(r: Runner, method: str, budget: float, bits: tuple[int, ...], grid: str = "symmetric",
               epochs: int = 1) -> list[tuple[dict, object]]:
    """(knobs, config) of ``method`` at ``budget`` on ``grid``: the allocator's size search plus a 2-bit floor,
    or magnitude pruning at the fitted sparsity of each of ``bits`` (with and without 8-bit first/last layers).
    Knobs name the grid when it is not the default; sparsities are fitted on that grid's own files."""
    tag = {} if grid == "symmetric" else {"grid": grid}
    if method == "magnitude":
        return [(dict(k, **tag), c) for k, c in r.magnitude_candidates(budget, grid) if k["bits"] in bits]
    # the epochs make fitted sparsities leave fine-tuning its room, as `compress --finetune-epochs` does
    base = replace(r.cfg(method, grid), target_ratio=budget, finetune=FinetuneConfig(epochs=epochs))
    knobs = resolve_knobs(r.model, r.fit, base, knob_grid(budget) + [(None, 2)], r.arch)
    return [({"sparsity": s, "min_bits": mb, **tag}, with_knobs(base, s, mb)) for s, mb in dict.fromkeys(knobs)]


LEGACY_RECIPE = "lr 0.01, batch 128"  # what rows without a finetune_recipe were trained with


def row_key(row: dict) -> tuple:
    return (row["model"], row["budget"], row["epochs"], row["method"], row["scales"], json.dumps(row["knobs"]),
            row.get("finetune_recipe", LEGACY_RECIPE))


def run(args: argparse.Namespace, log, emit, measured: set[tuple]) -> None:
    r = Runner(args.model, args)
    if args.fit_images:  # smoke runs: fewer training images for scores, calibration and training alike
        r.fit = r.fit.subset(np.arange(min(args.fit_images, len(r.fit))))
    log(f"{args.model}: float test {r.base_test:.2f}%, held-out {r.base_val:.2f}%")
    limit = int(r.dense_bytes() / args.budget)
    t_start = time.perf_counter()
    cands = {m: [c for g in args.grids for c in candidates(r, m, args.budget, args.bits, g, args.epochs)]
             for m in args.methods}
    for scales in args.scales:  # in the order asked: a deadline cuts the last
        ft = FinetuneConfig(epochs=args.epochs, seed=args.seed, learn_scales=scales == "learned",
                            **finetune_recipe(args))
        for method in args.methods:
            for knobs, cfg in cands[method]:
                # the file before training is what `compress` trains: the allocator filled the target less the
                # room fine-tuning needs (allocation_target); the trained file is then held to the full target
                room = allocation_target(replace(cfg, finetune=ft), r.dense_bytes())
                res = r.run(replace(cfg, target_ratio=None, target_bytes=room, finetune=FinetuneConfig(epochs=0)))
                if res is not None and res.target_bytes is not None:
                    res = replace(res, target_bytes=limit)
                if res is None or res.file_bytes > limit:
                    log(f"  {method} {knobs}: does not fit")
                    continue
                if row_key({"model": args.model, "budget": args.budget, "epochs": args.epochs, "method": method,
                            "scales": scales, "knobs": knobs, "finetune_recipe": recipe_name(args)}) in measured:
                    continue  # --append --skip-measured: resume a run cut by its deadline
                if time.perf_counter() - t_start > args.deadline:
                    log("  deadline reached, stopping")
                    return
                post_val = r.val_acc(repr(cfg), res)
                t0 = time.perf_counter()
                trained = finetune_result(res, r.fit, ft, r.device, r.model, show_progress=False)
                if trained.file_bytes > limit:  # a fixed grid has no allocator to take the bytes back
                    log(f"  {method} {knobs}: the trained file grew to {trained.file_bytes} B, over the cap "
                        f"{limit} B; no row")
                    continue
                val = accuracy(trained.compressed.to_module().to(r.device), r.val, show_progress=False)
                row = r.finish(method, args.budget, trained, dict(knobs))
                row.update(epochs=args.epochs, scales=scales, finetune_recipe=recipe_name(args),
                           post_val=round(post_val, 2), val_accuracy=round(val, 2), drop=round(r.base_test - row["accuracy"], 2),
                           ft_seconds=round(time.perf_counter() - t0, 1))
                emit(row)
                log(f"  {method} {knobs} scales {row['scales']}: held-out {post_val:.2f} -> {val:.2f}, "
                    f"test {row['accuracy']:.2f}% {row['file_bytes']} B ({row['ft_seconds']} s)")


def mark_picks(rows: list[dict]) -> None:
    """Per (model, budget, epochs, method, scales): the setting most accurate on held-out images after training,
    and (for comparison) the one the post-training search would have picked."""
    for r in rows:
        r["pick"] = ""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["budget"], r["epochs"], r["method"], r["scales"]), []).append(r)
    for g in groups.values():
        max(g, key=lambda r: r["val_accuracy"])["pick"] = "trained"
        post = max(g, key=lambda r: r["post_val"])
        post["pick"] = "both" if post["pick"] else "post-training"


def write(rows: list[dict], out: Path, commands: list[str], started: str) -> None:
    mark_picks(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recovery.json").write_text(json.dumps(rows, indent=1) + "\n")
    for r in rows:
        r["setting"] = ", ".join(f"{k}={v}" for k, v in r["knobs"].items())
    lines = provenance("Knobs chosen with recovery fine-tuning in the loop", commands, started, rows) + [
             "Every setting of the size search fine-tuned for the same epochs (distillation from the float model, "
             "pruned weights kept at zero, through the quantizers), scales fixed or learned (LSQ). `held-out` "
             "columns: training images never used for scores, calibration or training; `pick`: `trained` = most "
             "accurate on held-out images after training (what to choose), `post-training` = what the search "
             "without training picks. Test accuracy is the written file, loaded back.", ""]
    cols = (("method", "method"), ("setting", "setting"), ("scales", "scales"), ("file_bytes", "file bytes"),
            ("ratio", "ratio"), ("post_val", "held-out before %"), ("val_accuracy", "held-out after %"),
            ("accuracy", "test %"), ("drop", "drop"), ("pick", "pick"), ("finetune_recipe", "recipe"),
            ("ft_seconds", "train s"))
    for key in sorted({(r["model"], r["budget"], r["epochs"]) for r in rows}):
        group = [r for r in rows if (r["model"], r["budget"], r["epochs"]) == key]
        lines += [f"## {key[0]}, {key[1]:g}×, {key[2]} epoch(s)", "", markdown_table(group, cols), ""]
    (out / "recovery.md").write_text("\n".join(lines))
    for r in rows:
        del r["setting"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--budget", type=float, default=16.0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--methods", default="lrp,magnitude")
    ap.add_argument("--bits", default="2,3", help="magnitude: uniform bit-widths tried (fitted sparsity each)")
    ap.add_argument("--scales", default="learned,fixed", help="learned, fixed or both (order = run order)")
    ap.add_argument("--grids", default="symmetric", help="quantization grids of 2..8-bit groups: symmetric, midrise "
                                                         "or both (each a setting of its own)")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-images", type=int, default=0, help="use only this many training images (smoke runs)")
    ap.add_argument("--deadline", type=float, default=float("inf"), help="seconds; no new training starts after")
    add_finetune_recipe_options(ap)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--append", action="store_true", help="keep the rows of recovery.json this run does not measure")
    ap.add_argument("--skip-measured", action="store_true", help="with --append: train only settings without a row")
    args = ap.parse_args()
    if args.skip_measured and not args.append:
        sys.exit("--skip-measured needs --append (it skips the rows of the existing recovery.json)")
    args.methods = [m for m in args.methods.split(",") if m]
    args.bits = tuple(int(b) for b in args.bits.split(","))
    args.scales = [s for s in args.scales.split(",") if s]
    bad = [s for s in args.scales if s not in ("learned", "fixed")]
    if bad:
        sys.exit(f"--scales: unknown {bad[0]!r}; use learned, fixed or both")
    args.grids = [g for g in args.grids.split(",") if g]
    bad = [g for g in args.grids if g not in GRIDS]
    if bad or not args.grids:
        sys.exit(f"--grids: unknown {bad[0] if bad else ''!r}; use {', '.join(GRIDS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but no CUDA device is available")
    args.machine = _machine(args.device)
    out = Path(args.out)
    rows: list[dict] = json.loads((out / "recovery.json").read_text()) if args.append and (out / "recovery.json").exists() else []
    command = shlex.join(["python", "benchmarks/bench_recovery.py", *sys.argv[1:]])
    commands = sorted({r.get("command", "") for r in rows} - {""} | {command})
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    log = lambda s: print(s, flush=True)  # noqa: E731

    def emit(row: dict) -> None:
        rows[:] = [x for x in rows if row_key(x) != row_key(row)]
        rows.append(dict(row, command=command))
        write(rows, out, commands, started)

    torch.manual_seed(args.seed)
    run(args, log, emit, {row_key(x) for x in rows} if args.skip_measured else set())
    log(f"wrote {out}/recovery.md and recovery.json")


if __name__ == "__main__":
    main()
