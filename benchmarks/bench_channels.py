"""Channel criteria × channel budgets × class subsets: structured pruning on the CIFAR ResNets of ../shared.

For every setting (all 10 classes, or a class subset with the head cut to it and scores from those classes'
training images) and every fraction of prunable channels (the inner width of every residual block), each
criterion removes channels physically (Torch-Pruning dependency graph, mean compensation on), and the slim
float model is evaluated on the test images of those classes, without and with 1 epoch of recovery
fine-tuning. Speed is measured once per fraction (the slim architecture does not depend on the criterion):
parameters, MACs, CPU latency at batch 1 and 64 and peak memory, dense model in the same run.

    python benchmarks/bench_channels.py            # full run, writes benchmarks/results/channels.*
    python benchmarks/bench_channels.py --quick    # ResNet-20, one subset, two criteria, no fine-tuning
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lrpcompress.data import load_data  # noqa: E402
from lrpcompress.evaluation import accuracy, speed_profiles  # noqa: E402
from lrpcompress.models import load_model, restrict_classes  # noqa: E402
from lrpcompress.recovery import FinetuneConfig, finetune_model  # noqa: E402
from lrpcompress.report import markdown_table  # noqa: E402
from lrpcompress.structured import ChannelPruneConfig, prune_channels  # noqa: E402

SHARED = ROOT.parent / "shared"
CRITERIA = {  # name -> ChannelPruneConfig overrides
    "l1": {"criterion": "l1"},
    "bn_scale": {"criterion": "bn_scale"},
    "taylor": {"criterion": "taylor"},
    "lrp_eps": {"criterion": "lrp", "composite": "epsilon"},
    "lrp_zplus": {"criterion": "lrp", "composite": "epsilon_plus"},
}


def measure_speed(arch: str, args: argparse.Namespace, train, example) -> dict[float, dict]:
    """CPU speed of the dense model and of its slim architecture at every fraction (timed in alternation).

    The slim architecture depends only on the fraction (layer scope), so it is measured once per model,
    before any other work, on a quiet machine."""
    dense = load_model(arch, Path(args.shared) / "models" / f"{arch}-cifar10jpeg.pt")
    out = {}
    for fraction in args.fractions:
        cfg = ChannelPruneConfig(fraction, criterion="random", compensate=False, samples=8, seed=args.seed)
        slim = prune_channels(dense, train, cfg, show_progress=False).model
        d, s = speed_profiles([dense, slim], example, repeats=50)
        out[fraction] = {"params": s["params"], "macs": s["macs"], "latency_b1_ms": s["latency_ms"]["1"],
                         "latency_b64_ms": s["latency_ms"]["64"],
                         "speedup_b64": round(d["latency_ms"]["64"] / s["latency_ms"]["64"], 3),
                         "peak_mem_b64_mb": round(s["peak_memory_bytes"]["64"] / 2**20, 2),
                         "dense": {"params": d["params"], "macs": d["macs"], "latency_b1_ms": d["latency_ms"]["1"],
                                   "latency_b64_ms": d["latency_ms"]["64"],
                                   "peak_mem_b64_mb": round(d["peak_memory_bytes"]["64"] / 2**20, 2)}}
    return out


def run(args: argparse.Namespace, emit, log) -> None:
    train_all = load_data(Path(args.shared) / "data" / "cifar10-jpeg", "train")
    test_all = load_data(Path(args.shared) / "data" / "cifar10-jpeg", "test")
    example = test_all.tensor(np.arange(1))
    for arch in args.models:
        speed = measure_speed(arch, args, train_all, example)
        dense_all = load_model(arch, Path(args.shared) / "models" / f"{arch}-cifar10jpeg.pt")
        for subset in args.subsets:
            classes = None if subset == "all" else [int(c) for c in subset.split(",")]
            dense = restrict_classes(dense_all, classes) if classes else dense_all
            train = train_all.restrict_classes(classes) if classes else train_all
            test = test_all.restrict_classes(classes) if classes else test_all
            base = accuracy(dense, test, show_progress=False)
            tag = "10 classes" if classes is None else "classes " + ",".join(map(str, classes))
            emit(dict(speed[args.fractions[0]]["dense"], model=arch, setting=tag, criterion="dense", fraction=0.0,
                      epochs=0, accuracy=round(base, 2), drop=0.0, speedup_b64=1.0))
            for fraction in args.fractions:
                for name, kw in CRITERIA.items():
                    if name not in args.criteria:
                        continue
                    cfg = replace(ChannelPruneConfig(fraction, samples=args.samples, seed=args.seed), **kw)
                    t0 = time.perf_counter()
                    res = prune_channels(dense, train, cfg, show_progress=False)
                    secs = time.perf_counter() - t0
                    sp = {k: v for k, v in speed[fraction].items() if k != "dense"}
                    common = dict(sp, model=arch, setting=tag, criterion=name, fraction=fraction,
                                  prune_s=round(secs, 1))
                    acc = accuracy(res.model, test, show_progress=False)
                    emit(dict(common, epochs=0, accuracy=round(acc, 2), drop=round(base - acc, 2)))
                    log(f"{arch} {tag} {name:9s} {fraction:.0%}: {acc:.2f}% (dense {base:.2f}%), "
                        f"speed-up {sp['speedup_b64']:.2f}x, MACs {sp['macs'] / speed[fraction]['dense']['macs']:.0%}")
                    if fraction in args.finetune_fractions and name in args.finetune_criteria:
                        ft = finetune_model(res.model, train, FinetuneConfig(epochs=1, lr=args.lr, distill=1.0,
                                                                             train_bn=True, seed=args.seed),
                                            show_progress=False, device=args.device, teacher=dense)
                        acc = accuracy(ft, test, show_progress=False)
                        emit(dict(common, epochs=1, accuracy=round(acc, 2), drop=round(base - acc, 2)))
                        log(f"    + 1 epoch: {acc:.2f}%")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["setting"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (m, s) in zip(axes[0], panels):
        sub = [r for r in rows if r["model"] == m and r["setting"] == s]
        base = next(r["accuracy"] for r in sub if r["criterion"] == "dense")
        for crit in [c for c in CRITERIA if any(r["criterion"] == c for r in sub)]:
            for ep, style in ((0, "-o"), (1, "--s")):
                pts = sorted((r["fraction"], r["accuracy"]) for r in sub if r["criterion"] == crit and r["epochs"] == ep)
                if pts:
                    ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], style,
                            label=crit + (" +1 ep" if ep else ""))
        ax.axhline(base, color="k", lw=0.8, ls=":", label="dense")
        ax.set_title(f"{m}, {s}")
        ax.set_xlabel("prunable channels removed (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(rows: list[dict], args: argparse.Namespace, out: Path, started: str, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "channels.json").write_text(json.dumps(rows, indent=1) + "\n")
    cols = (("criterion", "criterion"), ("fraction", "removed"), ("epochs", "recovery epochs"),
            ("accuracy", "accuracy %"), ("drop", "drop"), ("params", "params"), ("macs", "MACs"),
            ("latency_b1_ms", "CPU ms b1"), ("latency_b64_ms", "CPU ms b64"), ("speedup_b64", "speed-up b64"),
            ("peak_mem_b64_mb", "peak MiB b64"))
    lines = ["# Structured (channel) pruning benchmark", "",
             f"Produced by: `{args.command}`  ",
             f"Date: {started}; machine: {platform.machine()}, {torch.get_num_threads()} CPU threads"
             f"{', fine-tuning on ' + args.device if args.device != 'cpu' else ''}; torch {torch.__version__}"
             + (f"; wall time {seconds / 60:.1f} min.  " if seconds else ".  "),
             "Prunable channels: the inner width of every residual block (removing them touches no residual "
             "addition). Scores from "
             f"{args.samples} training images of the setting's classes; accuracy on all test images of those classes; "
             "mean compensation on; recovery = 1 epoch of SGD on the setting's training images (lr "
             f"{args.lr}, one-cycle, distillation from the dense model, BatchNorm statistics updated). Latency: median of 50 CPU forward passes, "
             "the dense and the slim architecture timed in alternation once per fraction (the slim architecture "
             "does not depend on the criterion or the classes); `speed-up b64` divides by the dense time of the "
             "same pairing, the dense row shows the first pairing's.", ""]
    for m in sorted({r["model"] for r in rows}):
        for s in sorted({r["setting"] for r in rows if r["model"] == m}):
            sub = [r for r in rows if r["model"] == m and r["setting"] == s]
            sub.sort(key=lambda r: (r["epochs"], r["fraction"], -r["accuracy"]))
            lines += [f"## {m}, {s}", "", markdown_table(sub, cols), ""]
    (out / "channels.md").write_text("\n".join(lines))
    plot(rows, out / "channels.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="resnet20")
    ap.add_argument("--subsets", default=None, help="';'-separated: 'all' or comma lists, e.g. 'all;0,1,8;3,4,5'")
    ap.add_argument("--fractions", default=None)
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--finetune-fractions", default=None)
    ap.add_argument("--finetune-criteria", default="l1,taylor,lrp_zplus")
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="device for recovery fine-tuning (latency is always CPU)")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--speed-only", action="store_true", help="re-measure only the speed columns of channels.json")
    args = ap.parse_args()
    args.command = " ".join(["python", "benchmarks/bench_channels.py", *sys.argv[1:]])
    args.models = args.models.split(",")
    args.subsets = (args.subsets or ("0,1,8" if args.quick else "all;0,1,8;3,4,5")).split(";")
    args.fractions = [float(f) for f in (args.fractions or ("0.3" if args.quick else "0.2,0.3,0.5")).split(",")]
    args.criteria = args.criteria.split(",") if not args.quick else ["l1", "lrp_zplus"]
    args.finetune_fractions = [float(f) for f in (args.finetune_fractions or ("" if args.quick else "0.5")).split(",") if f]
    args.finetune_criteria = args.finetune_criteria.split(",")
    unknown = set(args.criteria) - set(CRITERIA)
    if unknown:
        sys.exit(f"unknown criteria {sorted(unknown)}; choose from {', '.join(CRITERIA)}")
    if not (Path(args.shared) / "models").is_dir():
        sys.exit(f"the benchmark needs {args.shared}/models and {args.shared}/data (see README)")
    torch.manual_seed(args.seed)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        write(rows, args, Path(args.out), started, time.perf_counter() - t0)

    if args.speed_only:  # re-measure the speed columns of the committed rows (e.g. after a run on a busy machine)
        old = json.loads((Path(args.out) / "channels.json").read_text())
        args.fractions = sorted({r["fraction"] for r in old if r["criterion"] != "dense"})
        train = load_data(Path(args.shared) / "data" / "cifar10-jpeg", "train")
        example = train.tensor(np.arange(1))
        for arch in sorted({r["model"] for r in old}):
            speed = measure_speed(arch, args, train, example)
            for r in old:
                if r["model"] == arch:
                    r.update(speed[args.fractions[0]]["dense"] if r["criterion"] == "dense"
                             else {k: v for k, v in speed[r["fraction"]].items() if k != "dense"})
        args.command = ("python benchmarks/bench_channels.py` (accuracy columns), then "
                        "`python benchmarks/bench_channels.py --speed-only` (speed columns, on a quiet machine)")
        rows.extend(old)
        write(rows, args, Path(args.out), started, 0.0)
        print(f"re-measured speed in {args.out}/channels.md")
        return
    run(args, emit, lambda s: print(s, flush=True))
    print(f"wrote {args.out}/channels.md, channels.json, channels.png")


if __name__ == "__main__":
    main()
