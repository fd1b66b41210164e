"""How much of a block cut's CPU speed-up is the allocator's: the same cuts timed under each malloc.

PyTorch's CPU tensors come from the process's malloc. Under glibc's defaults a tensor above the mmap threshold (128
KB, sliding up to the largest block freed) goes back to the OS when freed and is page-faulted in again on the next
forward pass, and the heap above 2x that threshold is trimmed: a cost that grows with the activation's size, so it
falls on the wide early blocks of a CIFAR ResNet, and that varies with the VM's state. A deployed runtime reuses an
arena instead (ONNX Runtime, TFLite, and PyTorch itself under jemalloc or tcmalloc, which CPU tuning guides
recommend). This times the dense model and each ``--cuts`` (blocks replaced by their shortcut, no training: speed
does not depend on the weights) in one alternation in a fresh process per allocator: glibc as it comes, glibc after
``lrpcompress.evaluation.steady_allocator`` (what the library's timings use since 2026-12-07), and jemalloc and
tcmalloc preloaded where installed (``apt install libjemalloc2 libtcmalloc-minimal4``). Each process runs its own
timing loop, not the library's, which would switch glibc to the steady heap.

    python benchmarks/probe_allocator.py --arch resnet20 --out benchmarks/results/speed/allocators_rn20.md
    python benchmarks/probe_allocator.py --arch resnet44 --out benchmarks/results/speed/allocators_rn44.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_benchmark import add_weights_option  # noqa: E402

SHARED = ROOT.parent / "shared"
LIBDIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
PRELOADS = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}
DEFAULT_CUTS = {  # the speed-target cuts of benchmarks/results/speed (FINDINGS §23-§25) and whole stages
    "resnet20": "layer1.0,layer1.2;layer1.0,layer1.1;layer1.0,layer1.1,layer1.2;layer1.0,layer1.1,layer1.2,layer2.2;"
                "layer2.1,layer2.2;layer3.1,layer3.2",
    "resnet44": "layer1.1,layer1.3,layer1.4,layer1.5,layer1.6;layer1.3,layer1.4,layer1.5,layer1.6,layer2.2,layer2.4;"
                "layer1.0,layer1.1,layer1.2,layer1.3,layer1.4,layer1.5,layer1.6;"
                "layer2.1,layer2.2,layer2.3,layer2.4,layer2.5,layer2.6;layer3.1,layer3.2,layer3.3,layer3.4,layer3.5,"
                "layer3.6"}


def child(args: argparse.Namespace) -> None:
    """One allocator's process: per pass, the median ms of ``--repeats`` batch-64 passes of every model, in turn."""
    import numpy as np
    import torch

    from lrpcompress.blocks import remove_blocks
    from lrpcompress.evaluation import allocator, steady_allocator
    from lrpcompress.models import load_model
    from run_benchmark import checkpoint

    if args.child == "steady":
        steady_allocator()
    torch.manual_seed(0)
    dense = load_model(args.arch, checkpoint(args.arch, args)).eval()
    cuts = [c.split(",") for c in args.cuts.split(";")]
    nets = [dense, *(remove_blocks(dense, c).eval() for c in cuts)]
    x = torch.zeros(64, 3, 32, 32)
    passes: list[list[float]] = []
    with torch.inference_mode():
        for n in nets:
            for _ in range(3):
                n(x)
        for _ in range(args.passes):
            times: list[list[float]] = [[] for _ in nets]
            for _ in range(args.repeats):
                for i, n in enumerate(nets):
                    t = time.perf_counter()
                    n(x)
                    times[i].append(time.perf_counter() - t)
            passes.append([1000.0 * float(np.median(t)) for t in times])
    print(json.dumps({"allocator": allocator(), "passes": passes}))


def find_preload(lib: str) -> str | None:
    return next((str(Path(d) / lib) for d in LIBDIRS if (Path(d) / lib).exists()), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--cuts", default=None,
                    help="cuts separated by ';', blocks by ',' (default: the arch's cuts above)")
    ap.add_argument("--passes", type=int, default=5, help="timing passes per allocator (median and range reported)")
    ap.add_argument("--repeats", type=int, default=20, help="batch-64 forward passes per model and pass")
    ap.add_argument("--shared", default=str(SHARED))
    add_weights_option(ap)
    ap.add_argument("--child", default=None, choices=("plain", "steady"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="page to write (default: print only)")
    args = ap.parse_args()
    if args.cuts is None:
        if args.arch not in DEFAULT_CUTS:
            ap.error(f"no default cuts for {args.arch}; give --cuts")
        args.cuts = DEFAULT_CUTS[args.arch]
    if args.passes < 1 or args.repeats < 1:
        ap.error("--passes and --repeats must be at least 1")
    if args.child:
        child(args)
        return
    from lrpcompress.evaluation import cpu_line
    from lrpcompress.report import markdown_table, write_page

    base_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}
    configs = [("glibc, its defaults", "plain", {}), ("glibc, steady_allocator()", "steady", {})]
    configs += [(f"{name} (preloaded)", "plain", {"LD_PRELOAD": path}) for name, lib in PRELOADS.items()
                if (path := find_preload(lib))]
    cuts = args.cuts.split(";")
    rows = []
    for label, mode, env in configs:
        cmd = [sys.executable, __file__, "--child", mode, "--arch", args.arch, "--cuts", args.cuts, "--passes",
               str(args.passes), "--repeats", str(args.repeats), "--shared", args.shared,
               *(f"--weights={a}={p}" for a, p in args.weights)]
        run = subprocess.run(cmd, capture_output=True, text=True, env={**base_env, **env})
        if run.returncode != 0:
            why = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"
            ap.error(f"the {label} process failed: {why}")
        out = json.loads(run.stdout.strip().splitlines()[-1])
        dense = [p[0] for p in out["passes"]]
        row = {"allocator": label, "reported as": out["allocator"],
               "dense ms b64": f"{statistics.median(dense):.1f} ({min(dense):.1f}-{max(dense):.1f})"}
        for j, cut in enumerate(cuts, start=1):
            ups = [p[0] / p[j] for p in out["passes"]]
            row[cut.replace(",", ", ")] = f"{statistics.median(ups):.2f} ({min(ups):.2f}-{max(ups):.2f})"
        rows.append(row)
        print(row, flush=True)
    command = shlex.join(["python", "benchmarks/probe_allocator.py", *sys.argv[1:]])
    lines = [f"# {args.arch}: block cuts' speed-up under each allocator", "",
             f"Command: `{command}`; {datetime.date.today()}; {cpu_line().rsplit(', malloc:', 1)[0]}. One fresh "
             "process per allocator, run one after another; in each, the dense model and every cut timed in one "
             f"alternation, {args.passes} passes of {args.repeats} batch-64 forward passes. Cells: the median over passes of "
             "dense ms / cut ms (range in brackets); column heads: the blocks each cut replaces by their shortcut.",
             "", markdown_table(rows, [(k, k) for k in rows[0]]), ""]
    write_page(args.out, lines)


if __name__ == "__main__":
    main()
