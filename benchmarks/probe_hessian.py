"""Does relevance belong in GPTQ's Hessian? Plain input Hessians against Hessians weighted by LRP quantities.

    python benchmarks/probe_hessian.py                 # writes benchmarks/results/gptq/hessian_probe.md (~25 min)
    python benchmarks/probe_hessian.py --subsets all --knobs 0:1 --out /tmp/h.md

GPTQ rounds a layer against ``H = E[x xᵀ]`` over its input patches: every position and every image counts the
same. What the class logit feels of a layer's output error at one position is, to first order, that error times
``g``, the relevance per unit of activation there (the gradient of the logit for the ε rule, the rule's modified
gradient otherwise). Weighting each position's ``x xᵀ`` by ``s = Σ_c g_c²`` (a diagonal Fisher at the layer's
output, shared by its channels) or by ``s = Σ_c |z_c · g_c|`` (where relevance flows, the explanation's heatmap)
puts the rounding where the prediction looks. Each variant replaces the Hessians of the default pipeline (the
allocator's error tables and the rounding); everything else, including the size search's setting (``--knobs``)
and the relevance tilt, stays. Accuracy is on training images held out from calibration (choose by this) and on
the test split of the classes.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lrpcompress.calibration import _hooked_eval, _patches, hessian_supported  # noqa: E402
from lrpcompress.compress import compress, method_config, score_key  # noqa: E402
from lrpcompress.data import load_data, sample_indices, split_train_val  # noqa: E402
from lrpcompress.evaluation import accuracy  # noqa: E402
from lrpcompress.models import load_model, restrict_classes  # noqa: E402
from lrpcompress.relevance import _start_grad, lrp_pass  # noqa: E402
from lrpcompress.report import markdown_table, write_page  # noqa: E402
from lrpcompress.rules import get_composite  # noqa: E402
from lrpcompress.search import with_knobs  # noqa: E402
from run_benchmark import add_weights_option, checkpoint  # noqa: E402

SHARED = ROOT.parent / "shared"
VARIANTS = {  # label -> (position weight, composite whose pass gives g), None: the library's plain Hessians
    "plain E[x xᵀ] (default)": None,
    "Σ_c g² (ε: gradient of the logit)": ("grad2", "epsilon"),
    "Σ_c g² (z⁺ on convolutions)": ("grad2", "epsilon_plus"),
    "Σ_c |z·g| (z⁺ relevance heatmap)": ("absrel", "epsilon_plus"),
}


def weighted_hessians(model, data, indices, weight: str, composite: str, batch_size: int = 64):
    """``Σ s·x xᵀ / Σ s`` per layer, ``s`` per image and position from an LRP pass started at the true class."""
    sums: dict[str, torch.Tensor] = {}
    totals: dict[str, float] = {}
    caught: dict = {}

    def pre(name: str):
        return lambda mod, inp: caught.__setitem__((name, "x"), inp[0].detach())

    def post(name: str):
        def hook(mod, inp, out):  # registered after the pass's hook: `out` is the surrogate
            caught[(name, "z")] = out.detach()
            out.register_hook(lambda g: caught.__setitem__((name, "g"), g.detach()))
        return hook

    with lrp_pass(model, get_composite(composite, 1e-6), data.tensor(indices[:1])) as states:
        covered = [(name, st) for name, st in states.items() if hessian_supported(st.module)]
        with _hooked_eval(model, [(st.module, pre(n)) for n, st in covered],
                          [(st.fold or st.module, post(n)) for n, st in covered]):
            for x, y in data.batches(batch_size, indices):
                for st in states.values():
                    st.reset()
                caught.clear()
                x.requires_grad_(True)
                logits = model(x)
                torch.autograd.grad(logits, [x], grad_outputs=_start_grad(logits, y, "true"))
                for name, st in states.items():
                    if (name, "g") not in caught:
                        continue
                    X = _patches(st.module, caught[(name, "x")]).double()
                    g, z = caught[(name, "g")].double(), caught[(name, "z")].double()
                    s = ((g * g) if weight == "grad2" else (g * z).abs()).sum(1).reshape(-1)
                    sums[name] = sums.get(name, 0) + (X * s[:, None]).T @ X
                    totals[name] = totals.get(name, 0.0) + float(s.sum())
    return {f"{n}.weight": v / totals[n] for n, v in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--subsets", default="all;3,4,5", help="';'-separated class subsets, 'all' for 10 classes")
    ap.add_argument("--budget", type=float, default=16.0)
    ap.add_argument("--knobs", default="0:1,0:2", help="SPARSITY:FLOOR settings of the size search, ','-separated")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gptq" / "hessian_probe.md"))
    add_weights_option(ap)
    args = ap.parse_args()
    knobs = [(float(k.split(":")[0]), int(k.split(":")[1])) for k in args.knobs.split(",")]
    train_all = load_data(Path(args.shared) / "data" / "cifar10-jpeg", "train")
    test_all = load_data(Path(args.shared) / "data" / "cifar10-jpeg", "test")
    rows = {label: {"variant": label} for label in VARIANTS}
    heads = []
    for sub in args.subsets.split(";"):
        classes = None if sub == "all" else [int(c) for c in sub.split(",")]
        model = load_model(args.arch, checkpoint(args.arch, args))
        train, test = train_all, test_all
        if classes is not None:
            model = restrict_classes(model, classes)
            train, test = train.restrict_classes(classes), test.restrict_classes(classes)
        fit, val = split_train_val(train, 2000 if classes is None else 1500, 0)
        heads.append(f"{sub}: {accuracy(model, val, show_progress=False):.2f} / {accuracy(model, test, show_progress=False):.2f}")
        idx = sample_indices(len(fit), 512, 0, fit.y)
        base = replace(method_config("lrp"), target_ratio=args.budget)
        for label, how in VARIANTS.items():
            scores = {} if how is None else {score_key("hessians", base): weighted_hessians(model, fit, idx, *how)}
            for sparsity, floor in knobs:
                res = compress(model, fit, with_knobs(base, sparsity, floor), args.arch, scores=scores,
                               show_progress=False)
                net = res.compressed.to_module()
                col = f"{sub} {sparsity:g}:{floor}"
                rows[label][col] = (f"{accuracy(net, val, show_progress=False):.2f} / "
                                    f"{accuracy(net, test, show_progress=False):.2f}")
                print(col, label, rows[label][col], res.file_bytes, flush=True)
    cols = [("variant", "Hessian")] + [(k, k) for k in rows["plain E[x xᵀ] (default)"] if k != "variant"]
    text = ["# GPTQ's Hessian: plain or weighted by relevance", "",
            f"Command: `{shlex.join(['python', 'benchmarks/probe_hessian.py', *sys.argv[1:]])}`; "
            f"{datetime.date.today()}. {args.arch}, head cut to the classes, the default pipeline (`lrp`, GPTQ "
            f"rounding) at {args.budget:g}× with the size search's setting fixed (columns: classes sparsity:floor), "
            "no fine-tuning. Cells: held-out training images / test split of those classes, % (float model: "
            f"{'; '.join(heads)}). Position weights from 512 calibration images, relevance started at the true "
            "class.", "", markdown_table(list(rows.values()), cols), ""]
    write_page(args.out, text)


if __name__ == "__main__":
    main()
