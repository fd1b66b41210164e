"""Does a channel cut's CPU speed follow its MACs? Slim architectures at nearby MAC counts, timed together.

Issue 7 asks for >= 1.5x at batch 64. Inner-width cuts of 40-50% and mixes of inner and residual-stream cuts
leave 50-61% of a CIFAR ResNet's MACs; this times each slim architecture (random channels: speed does not
depend on which ones) in one alternation with the dense model, so machine load hits them alike, and prints
the widths each stage keeps. Every model is timed twice in that alternation: as built (BatchNorm modules run,
as in a loaded `.lrpc`) and as deployed (``fold_batchnorm``: BatchNorm folded into the convolutions). Run it
on a quiet machine.

    python benchmarks/probe_widths.py                                  # ResNet-20 and ResNet-44, ~10 min
    python benchmarks/probe_widths.py --models resnet20 --budgets 0.5,0.45,0.4+0.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_channels import parse_budget, slim_architecture  # noqa: E402
from run_benchmark import SHARED, add_weights_option, checkpoint  # noqa: E402

from lrpcompress.data import load_data  # noqa: E402
from lrpcompress.evaluation import cpu_line, speed_profiles, steady_allocator  # noqa: E402
from lrpcompress.models import fold_batchnorm, load_model  # noqa: E402
from lrpcompress.report import markdown_table, write_page  # noqa: E402


def stage_widths(model: torch.nn.Module) -> str:
    """Inner widths per stage of a CIFAR ResNet (min-max of its blocks' first convolutions), e.g. ``8/16/32``."""
    stages: dict[str, list[int]] = {}
    for name, mod in model.named_modules():
        if name.endswith(".conv1") and name.count(".") == 2:
            stages.setdefault(name.split(".")[0], []).append(mod.out_channels)
    return "/".join(f"{min(v)}" if min(v) == max(v) else f"{min(v)}-{max(v)}" for v in stages.values())


def stream_widths(model: torch.nn.Module) -> str:
    """Residual-stream width per stage (each stage's last block's second convolution)."""
    last: dict[str, int] = {}
    for name, mod in model.named_modules():
        if name.endswith(".conv2") and name.count(".") == 2:
            last[name.split(".")[0]] = mod.out_channels
    return "/".join(str(v) for v in last.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,resnet44")
    ap.add_argument("--budgets", default="0.5,0.45,0.4,0.4@8,0.4+0.1,0.35+0.15,0.3+0.125",
                    help="bench_channels.py budgets (inner[+streams][@multiple]; layer scope only)")
    ap.add_argument("--passes", type=int, default=3, help="timing passes (median taken)")
    ap.add_argument("--repeats", type=int, default=20, help="forward passes per architecture and pass")
    ap.add_argument("--shared", default=str(SHARED))
    add_weights_option(ap)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "widths_probe.md"))
    args = ap.parse_args()
    budgets = [parse_budget(b) for b in args.budgets.split(",")]
    if any(b[3] != "layer" for b in budgets):
        sys.exit("probe_widths.py: layer-scope budgets only (the other scopes' widths depend on the scores)")
    train = load_data(Path(args.shared) / "data" / "cifar10-jpeg", "train")
    example = train.tensor(np.arange(1))
    steady_allocator()  # before the machine line names the allocator (speed_profiles would set it only later)
    lines = ["# Speed against MACs: slim architectures timed together", "",
             f"Produced by: `python benchmarks/probe_widths.py --models {args.models} --budgets {args.budgets} "
             f"--passes {args.passes} --repeats {args.repeats}`  ",
             f"Machine: {cpu_line()}, "
             + f"torch {torch.__version__}. "
             f"Median of {args.passes} passes of {args.repeats} forward passes each, every architecture of a model in one "
             "alternation; `speed-up` = dense ms / slim ms at batch 64; `BN folded`: both timed again with BatchNorm folded "
             "into the convolutions (`fold_batchnorm`, as deployed), same alternation. Widths: inner channels per stage "
             "(first convolution of each block) and residual-stream channels per stage.", ""]
    for arch in args.models.split(","):
        dense = load_model(arch, checkpoint(arch, args))
        slims = [slim_architecture(dense, train, b) for b in budgets]
        nets = [dense, *slims]
        nets += [fold_batchnorm(n, example) for n in nets]
        passes = [speed_profiles(nets, example, batch_sizes=(64,), repeats=args.repeats) for _ in range(args.passes)]
        ms = [float(np.median([p[i]["latency_ms"]["64"] for p in passes])) for i in range(len(nets))]
        k = len(slims) + 1  # ms[k + i]: model i with BatchNorm folded
        rows = [{"budget": "dense", "macs": 1.0, "ms": round(ms[0], 2), "speedup": 1.0, "ms_f": round(ms[k], 2),
                 "speedup_f": 1.0, "inner": stage_widths(dense), "streams": stream_widths(dense)}]
        for i, (text, m) in enumerate(zip(args.budgets.split(","), slims), start=1):
            rows.append({"budget": text, "macs": round(passes[0][i]["macs"] / passes[0][0]["macs"], 3),
                         "ms": round(ms[i], 2), "speedup": round(ms[0] / ms[i], 2), "ms_f": round(ms[k + i], 2),
                         "speedup_f": round(ms[k] / ms[k + i], 2), "inner": stage_widths(m),
                         "streams": stream_widths(m)})
        cols = (("budget", "budget"), ("macs", "MACs (of dense)"), ("ms", "CPU ms b64"), ("speedup", "speed-up b64"),
                ("ms_f", "ms b64, BN folded"), ("speedup_f", "speed-up, BN folded"), ("inner", "inner widths"),
                ("streams", "stream widths"))
        lines += [f"## {arch}", "", markdown_table(rows, cols), ""]
    write_page(args.out, lines)


if __name__ == "__main__":
    main()
