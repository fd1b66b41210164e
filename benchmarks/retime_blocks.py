"""Every committed block cut of one model timed again, all in one alternation, beside its accuracy.

``bench_blocks.py`` times the cuts of one run together, but speed-ups from different runs come from different
moments of a shared machine (±0.1×, more when something else runs). This script reads the ``blocks*.json`` pages
under ``--results`` for one ``--arch`` (and ``--weights`` file, all 10 classes, the recovery epochs given), rebuilds
every distinct cut from the dense model (no training: a removed block's speed does not depend on the weights) and times
the dense model and all cuts in one alternation (median of ``--passes`` passes of 20 batch-64 forward passes, under
``steady_allocator`` like every timing of the library), so the speed-ups are comparable across runs; a page from
before 2026-12-07 was timed under glibc's default malloc, and its budget reads ``(glibc default)``. Each cut's
accuracy is the mean over the pages' rows that made it (criterion, page and seed listed). Prints and writes a table
sorted by speed-up, with the speed/accuracy front.

    python benchmarks/retime_blocks.py --arch resnet44 --out benchmarks/results/speed/retimed_rn44.md
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lrpcompress.blocks import remove_blocks  # noqa: E402
from lrpcompress.errors import LrpcError  # noqa: E402
from lrpcompress.evaluation import cpu_line, speed_profiles  # noqa: E402
from lrpcompress.models import load_model  # noqa: E402
from lrpcompress.report import markdown_table, write_page  # noqa: E402

from bench_blocks import build_parser, page_options, read_page  # noqa: E402
from run_benchmark import add_weights_option, checkpoint  # noqa: E402
from summarize_blocks import cut_of, on_front, page_budget, steady_timing  # noqa: E402

SHARED = ROOT.parent / "shared"


def collect_cuts(results: Path, arch: str, weights: str | None, epochs: int) -> dict[tuple[str, ...], list[dict]]:
    """{blocks removed (sorted): [{criterion, budget, seed, test, speed, page}, ...]} over the pages of one model."""
    parser = build_parser()
    cuts: dict[tuple[str, ...], list[dict]] = {}
    for path in sorted(results.rglob("blocks*.json")):
        page = read_page(path)
        s = page_options(page["command"], str(path), parser)
        if (s.arch != arch or dict(s.weights or []).get(s.arch) != weights or s.classes is not None
                or s.epochs != epochs):
            continue
        for row in page["rows"]:
            if row["criterion"] == "dense" or f"test + {epochs} ep" not in row:
                continue
            cuts.setdefault(cut_of(row), []).append(
                {"criterion": row["criterion"] + (f" in {s.steps} rounds" if s.steps > 1 else ""),
                 "budget": page_budget(s, steady_timing(page)), "seed": s.seed,
                 "test": row[f"test + {epochs} ep"], "speed": row["speed-up"], "page": str(path.relative_to(results))})
    return cuts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--epochs", type=int, default=2, help="recovery epochs of the runs read")
    ap.add_argument("--passes", type=int, default=5, help="timing passes (median), each 20 forward passes per model")
    ap.add_argument("--shared", default=str(SHARED))
    add_weights_option(ap)
    ap.add_argument("--out", default=None, help="page to write (default: print only)")
    args = ap.parse_args()
    if args.passes < 1:
        ap.error("--passes must be at least 1")
    given = dict(args.weights or []).get(args.arch)
    try:
        cuts = collect_cuts(Path(args.results), args.arch, given, args.epochs)
    except LrpcError as e:
        ap.error(str(e))
    if not cuts:
        ap.error(f"no bench_blocks.py pages of {args.arch} with {args.epochs} recovery epochs under {args.results}")
    try:
        dense = load_model(args.arch, checkpoint(args.arch, args))
    except LrpcError as e:
        ap.error(str(e))
    torch.manual_seed(0)
    order = list(cuts)
    nets = [dense, *(remove_blocks(dense, list(c)) for c in order)]
    example = torch.zeros(1, 3, 32, 32)
    passes = [speed_profiles(nets, example, batch_sizes=(64,), repeats=20) for _ in range(args.passes)]
    ms = [float(np.median([p[i]["latency_ms"]["64"] for p in passes])) for i in range(len(nets))]
    rows = []
    for i, cut in enumerate(order, start=1):
        runs = cuts[cut]
        rows.append({"removed": ", ".join(cut), "blocks": len(cut), "ms b64": round(ms[i], 2),
                     "speed-up": round(ms[0] / ms[i], 2),
                     "speed-up in its runs": ", ".join(f"{r['speed']:.2f}" for r in runs),
                     "test (mean)": round(statistics.fmean(r["test"] for r in runs), 2),
                     "runs": "; ".join(f"{r['criterion']} @ {r['budget']} s{r['seed']}" for r in runs)})
    rows.sort(key=lambda r: -r["speed-up"])
    points = [(r["test (mean)"], r["speed-up"]) for r in rows]
    for r in rows:
        r["on the front"] = "yes" if on_front(r["test (mean)"], r["speed-up"], points) else "–"
    cmd = shlex.join(["python", "benchmarks/retime_blocks.py", *sys.argv[1:]])
    lines = [f"# Block cuts of {args.arch} timed again in one alternation", "",
             f"Command: `{cmd}`; {datetime.date.today()}; torch {torch.__version__}, {cpu_line()}. Dense model "
             f"{ms[0]:.2f} ms at batch 64; every cut of the committed pages (all 10 classes, {args.epochs} epoch(s) of "
             f"recovery) rebuilt from it and timed with it, median of {args.passes} passes of 20 forward passes. "
             "Test: accuracy after recovery, mean over the runs that made the cut (criterion @ budget, seed). A cut "
             "is on the front when no other is both at least as fast and at least as accurate.", "",
             markdown_table(rows, [(k, k) for k in rows[0]]), ""]
    write_page(args.out, lines)


if __name__ == "__main__":
    main()
