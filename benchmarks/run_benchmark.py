"""Method × budget benchmark on the CIFAR ResNets of ../shared (CIFAR-10 JPEG q75).

Every method is a configuration of the same pipeline; every number is measured on a real `.lrpc` file
(written, loaded back, evaluated on the full 10,000-image test split). Knobs of each method are chosen
per budget on a validation split carved from the training data (never the test split); scores and
calibration use training images only.

    python benchmarks/run_benchmark.py              # full run, writes benchmarks/results/
    python benchmarks/run_benchmark.py --quick      # a few minutes: ResNet-20, two budgets
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lrpcompress.compress import CompressConfig, compress, edge_overrides, load_compressed, method_config  # noqa: E402
from lrpcompress.data import load_data, sample_indices, split_train_val  # noqa: E402
from lrpcompress.errors import LrpcError  # noqa: E402
from lrpcompress.evaluation import accuracy  # noqa: E402
from lrpcompress.models import is_builtin_arch, load_model, restrict_classes  # noqa: E402
from lrpcompress.pruning import PruneConfig  # noqa: E402
from lrpcompress.quantization import GRIDS  # noqa: E402
from lrpcompress.recovery import FinetuneConfig  # noqa: E402
from lrpcompress.report import markdown_table  # noqa: E402
from lrpcompress.search import fit_sparsity, knob_grid, resolve_knobs, with_knobs  # noqa: E402
from paired import mcnemar, outcomes, unpack_correct  # noqa: E402

SHARED = ROOT.parent / "shared"
OPTIMAL = ("lrp", "taylor", "mse", "random")


BITS_GRID = (8, 6, 5, 4, 3, 2)


def require_matplotlib(script: str) -> None:
    """Exit with one line before any work when the plots cannot be drawn (a run must not die at its first write)."""
    if importlib.util.find_spec("matplotlib") is None:
        sys.exit(f"{script}: matplotlib draws this benchmark's plots and is not installed: pip install -e '.[bench]'")


def add_weights_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--weights", action="append", default=[], metavar="ARCH=PATH", type=_arch_path,
                    help="checkpoint of a model not in ../shared/models, e.g. your own network: "
                         "--models usernet:vgg_small --weights usernet:vgg_small=/tmp/vgg_small.pt")


def add_finetune_recipe_options(ap: argparse.ArgumentParser) -> None:
    """``--finetune-lr`` / ``--finetune-batch`` for quantized recovery rows (the library's defaults). Committed
    rows trained before the default changed (2026-12-01) name lr 0.01, batch 128 in their ``finetune_recipe``."""
    ap.add_argument("--finetune-lr", type=float, default=FinetuneConfig.lr, help="recovery's SGD learning rate")
    ap.add_argument("--finetune-batch", type=int, default=FinetuneConfig.batch_size, help="recovery's batch size")


def finetune_recipe(args: argparse.Namespace) -> dict:
    """The FinetuneConfig fields that ``add_finetune_recipe_options`` set."""
    return {"lr": args.finetune_lr, "batch_size": args.finetune_batch}


def recipe_name(args: argparse.Namespace) -> str:
    """What a row's ``finetune_recipe`` records."""
    return f"lr {args.finetune_lr:g}, batch {args.finetune_batch}"


def _arch_path(text: str) -> tuple[str, str]:
    arch, sep, path = text.partition("=")
    if not sep or not arch or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not ARCH=PATH")
    return arch, path


def checkpoint(arch: str, args: argparse.Namespace) -> Path:
    """``arch``'s weights: ``--weights ARCH=PATH`` (a user's own network), else ``--shared``/models."""
    given = dict(getattr(args, "weights", None) or [])
    return Path(given.get(arch) or Path(args.shared) / "models" / f"{arch}-cifar10jpeg.pt")


class Runner:
    """One model (optionally cut to ``classes``: head, training and test images) with its held-out split and a
    cache of compression runs."""

    def __init__(self, arch: str, args: argparse.Namespace, classes: list[int] | None = None) -> None:
        self.arch = arch
        self.args = args
        self.grid = getattr(args, "grid", "symmetric")  # of every method's 2..8-bit groups
        self.device = torch.device(args.device)
        shared = Path(args.shared)
        self.model = load_model(arch, checkpoint(arch, args)).to(self.device)
        train = load_data(shared / "data" / "cifar10-jpeg", "train")
        self.test = load_data(shared / "data" / "cifar10-jpeg", "test")
        if classes is not None:
            self.model = restrict_classes(self.model, classes)
            train, self.test = train.restrict_classes(classes), self.test.restrict_classes(classes)
        self.fit, self.val = split_train_val(train, args.val_size, args.seed)
        few = getattr(args, "fit_images", None)
        if few:  # a user with only this many labelled images: scoring, calibration and fine-tuning all use them
            self.fit = self.fit.subset(sample_indices(len(self.fit), few, args.seed + 104729, self.fit.y))
        self.cache: dict = {}
        self.fitted: dict = {}
        self.runs: dict = {}
        self.val_cache: dict = {}
        self.tmp = Path(tempfile.mkdtemp())
        self.base_test, self.base_correct = outcomes(self.model, self.test)
        self.base_val = accuracy(self.model, self.val, show_progress=False)
        self.dense = None

    def cfg(self, method: str, grid: str | None = None, **kw) -> CompressConfig:
        """``method``'s config with this run's samples and seed, on ``grid`` (default: the runner's)."""
        c = method_config(method, seed=self.args.seed, **kw)
        c = replace(c, quant=replace(c.quant, grid=grid or self.grid,
                                     entropy_coding=not getattr(self.args, "no_entropy_coding", False)))
        return replace(c, relevance=replace(c.relevance, samples=self.args.samples, seed=self.args.seed))

    def with_quant(self, method: str, bits: int, prune: PruneConfig | None = None,
                   keep_edges: bool = False, grid: str | None = None) -> CompressConfig:
        c = self.cfg(method, grid)
        q = replace(c.quant, bits=bits, overrides=edge_overrides(self.model, 8) if keep_edges else c.quant.overrides)
        return replace(c, quant=q, prune=prune or c.prune)

    def uniform_candidates(self, method: str = "uniform") -> list:
        """Uniform bits, with and without the first and last layer at 8 bits (``method``: ``uniform`` rounds to
        nearest, ``gptq`` with GPTQ)."""
        return ([({"bits": b}, self.with_quant(method, b)) for b in BITS_GRID]
                + [({"bits": b, "edges": 8}, self.with_quant(method, b, keep_edges=True)) for b in BITS_GRID if b < 8])

    def magnitude_candidates(self, budget: float, grid: str | None = None, method: str = "magnitude") -> list:
        """Magnitude pruning × uniform bits: for every bit-width the smallest magnitude sparsity at which the
        file fits the cap (0 where the dense file fits), with and without the first and last layer kept at
        8 bits (the usual practice; `edges` in the knobs). Sparser settings at the same bits are not tried:
        pruning past the smallest sparsity that fits only loses accuracy (FINDINGS.md §3). Sparsities are fitted
        on ``grid``'s own files (default: the runner's grid; a midrise header is longer). ``method``: ``magnitude``
        rounds to nearest, ``gptq`` with GPTQ (SparseGPT's setting with magnitude masks)."""
        grid = grid or self.grid
        out = []
        for keep in (False, True):
            for b in BITS_GRID:
                if keep and b == 8:
                    continue
                key = (method, budget, b, keep, grid)
                if key not in self.fitted:
                    try:
                        self.fitted[key] = fit_sparsity(self.model, self.fit,
                                                        self.with_quant(method, b, keep_edges=keep, grid=grid),
                                                        b, self.arch, target_bytes=int(self.dense_bytes() / budget),
                                                        scores=self.cache)
                    except LrpcError:
                        self.fitted[key] = None
                s = self.fitted[key]
                if s is not None:
                    out.append(({"sparsity": s, "bits": b, **({"edges": 8} if keep else {})},
                                self.with_quant(method, b, PruneConfig("fraction", s), keep_edges=keep,
                                                grid=grid)))
        return out

    def optimal_candidates(self, method: str, budget: float) -> list:
        """The knob search `compress --target-ratio` runs (fitted sparsities depend on the size target only)."""
        base = replace(self.cfg(method), target_ratio=budget)
        key = ("knobs", budget)
        if key not in self.fitted:
            self.fitted[key] = resolve_knobs(self.model, self.fit, base, knob_grid(budget), self.arch,
                                             scores=self.cache)
        return [({"target_ratio": budget, "sparsity": s, "min_bits": mb}, with_knobs(base, s, mb))
                for s, mb in self.fitted[key]]

    def run(self, cfg: CompressConfig):
        key = repr(cfg)
        if key not in self.runs:
            try:
                self.runs[key] = compress(self.model, self.fit, cfg, self.arch, scores=self.cache, show_progress=False)
            except LrpcError:
                self.runs[key] = None
        res = self.runs[key]
        if res is not None:
            self.dense = res.dense_bytes
        return res

    def val_acc(self, key, res) -> float:
        if key not in self.val_cache:
            self.val_cache[key] = accuracy(res.compressed.to_module().to(self.device), self.val, show_progress=False)
        return self.val_cache[key]

    def finish(self, method: str, budget: float, res, knobs: dict) -> dict:
        path = self.tmp / "m.lrpc"
        size = res.compressed.save(path)
        # files never import code: a user's factory (package.module:function) is loaded into a copy of the model
        loaded, _ = load_compressed(path, None if is_builtin_arch(self.arch) else copy.deepcopy(self.model).cpu())
        st = res.compressed.stats()
        acc, correct = outcomes(loaded.to(self.device), self.test)
        return {"model": self.arch, "method": method, "budget": budget, "file_bytes": size,
                "ratio": round(res.dense_bytes / size, 3), "accuracy": round(acc, 2), "test_correct": correct,
                "drop": None, "sparsity": round(st["sparsity"], 4), "mean_bits": round(st["mean_bits"], 3),
                "bits_per_weight": round(st["bits_per_weight"], 3), "seconds": round(res.seconds, 1),
                "knobs": dict(knobs, **({} if self.grid == "symmetric" else {"grid": self.grid}),
                              **({"rounding": res.quant.rounding} if res.quant and res.quant.rounding != "nearest" else {}),
                              **({"coding": "packed"} if getattr(self.args, "no_entropy_coding", False) else {})),
                "machine": self.args.machine}

    def best_of(self, method: str, budget: float, candidates) -> dict | None:
        """Among (knobs, config) candidates, the best validation accuracy that fits the budget (its row)."""
        picked = self.pick(method, budget, candidates)
        return None if picked is None else picked[0]

    def pick(self, method: str, budget: float, candidates) -> tuple[dict, CompressConfig] | None:
        """:meth:`best_of`'s row and the candidate config it measured.

        Every method gets the same cap, ``dense / budget`` bytes (what ``--target-ratio`` aims at). The file
        size does not depend on the bias correction (shifts are stored floats), so a cheap run without it
        decides whether a candidate fits before the full run."""
        limit = int(self.dense_bytes() / budget)
        best = None
        for knobs, cfg in candidates:
            needs_dry = cfg.bias_correction and cfg.target_ratio is None  # size targets are met by construction
            dry = self.run(replace(cfg, bias_correction=False)) if needs_dry else None
            if needs_dry and (dry is None or dry.file_bytes > limit):
                continue
            res = self.run(cfg)
            if res is None or res.file_bytes > limit:
                continue
            acc = self.val_acc(repr(cfg), res)
            if best is None or acc > best[0]:
                best = (acc, knobs, res, cfg)
        if best is None:
            return None
        row = self.finish(method, budget, best[2], best[1])
        row["val_accuracy"] = round(best[0], 2)
        return row, best[3]

    def dense_bytes(self) -> int:
        if self.dense is None:
            self.run(self.cfg("uniform"))
        return self.dense


def bench_model(arch: str, args: argparse.Namespace, log, emit) -> None:
    """Run every method × budget on ``arch``; ``emit(row)`` receives each row as soon as it is measured."""
    r = Runner(arch, args)
    log(f"{arch}: float test accuracy {r.base_test:.2f}%, validation {r.base_val:.2f}%")
    emit({"model": arch, "method": "float32", "budget": 1.0, "file_bytes": r.dense_bytes(), "ratio": 1.0,
          "accuracy": round(r.base_test, 2), "test_correct": r.base_correct, "sparsity": 0.0, "mean_bits": 32.0,
          "knobs": {}, "machine": args.machine})
    for budget in args.model_budgets.get(arch, args.budgets):
        t0 = time.perf_counter()
        cand = {
            "uniform": r.uniform_candidates(),
            "magnitude": r.magnitude_candidates(budget) if "magnitude" in args.methods else [],
            "gptq": (r.uniform_candidates("gptq") + r.magnitude_candidates(budget, method="gptq")
                     if "gptq" in args.methods else []),
            "paper": [({"bits": b}, r.with_quant("paper", b)) for b in (7, 6, 5, 4, 3, 2)],
            "deeplift": [({"bits": b, "filter_prune": p},
                          r.with_quant("deeplift", b, PruneConfig("fraction", p, scope="layer")))
                         for b in (6, 5, 4, 3, 2) for p in (0.0, 0.1)],
        }
        for method in args.methods:
            if method in cand:
                row = r.best_of(method, budget, cand[method])
            else:
                row = r.best_of(method, budget, r.optimal_candidates(method, budget))
            if row is None:
                log(f"  {method} @ {budget}x: no setting fits")
                continue
            row["drop"] = round(r.base_test - row["accuracy"], 2)
            emit(row)
            log(f"  {method:9s} @ {budget:>4}x: {row['accuracy']:6.2f}%  {row['file_bytes']:8d} B  "
                f"({row['ratio']:.2f}x, sparsity {row['sparsity']:.1%}, mean bits {row['mean_bits']:.2f}) {row['knobs']}")
        log(f"  budget {budget}x took {time.perf_counter() - t0:.0f} s")
    for budget, epochs in args.finetune.get(arch, []):
        # the knob (sparsity) is chosen on validation data without fine-tuning, then that setting is fine-tuned
        picked = r.pick("lrp", budget, r.optimal_candidates("lrp", budget))
        if picked is None:
            log(f"  lrp+ft{epochs} @ {budget}x: no setting fits")
            continue
        # the config the row measured (its knobs also name what finish() adds, such as the rounding)
        pick, ft = picked
        knobs = dict(pick["knobs"])
        ft = replace(ft, finetune=FinetuneConfig(epochs=epochs, seed=args.seed, **finetune_recipe(args)))
        row = r.finish(f"lrp+ft{epochs}", budget, r.run(ft), dict(knobs, finetune_epochs=epochs))
        row["finetune_recipe"] = recipe_name(args)
        row["drop"] = round(r.base_test - row["accuracy"], 2)
        emit(row)
        log(f"  lrp+ft{epochs} @ {budget}x: {row['accuracy']:.2f}% {row['file_bytes']} B")


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against file size per model: a zoomed panel above, the full range below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 8.5), squeeze=False)
    for col, m in enumerate(models):
        base = next(r for r in rows if r["model"] == m and r["method"] == "float32")
        for row, (lo, hi) in enumerate(((max(0, base["accuracy"] - 8), base["accuracy"] + 1), (0, 100))):
            ax = axes[row][col]
            for method in sorted({r["method"] for r in rows if r["model"] == m and r["method"] != "float32"}):
                pts = sorted((r["file_bytes"] / 1024, r["accuracy"]) for r in rows
                             if r["model"] == m and r["method"] == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            ax.axhline(base["accuracy"], color="k", ls="--", lw=0.8, label="float32")
            ax.axhline(base["accuracy"] - 1, color="gray", ls=":", lw=0.8, label="float32 − 1 pt")
            ax.set_xscale("log")
            ax.set_ylim(lo, hi)
            ax.set_xlabel(".lrpc file size (KiB, log)")
            ax.set_ylabel("top-1 test accuracy (%)")
            ax.set_title(f"{m}, CIFAR-10 (JPEG q75)" + (" — zoom" if row == 0 else " — full range"))
            if row == 1:
                ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_table(rows: list[dict]) -> str:
    """Method × budget grid of test accuracy (drop from float32) per model, for the README."""
    out = []
    for m in sorted({r["model"] for r in rows}):
        mrows = [r for r in rows if r["model"] == m]
        budgets = sorted({r["budget"] for r in mrows if r["method"] != "float32"})
        base = next(r for r in mrows if r["method"] == "float32")
        head = f"| {m} (float32 {base['accuracy']:.2f}%) | " + " | ".join(f"{b:g}×" for b in budgets) + " |"
        out += [head, "|---" * (len(budgets) + 1) + "|"]
        order = ["lrp", "mse", "taylor", "random", "gptq", "magnitude", "uniform", "deeplift", "paper"]
        methods = [x for x in order if any(r["method"] == x for r in mrows)]
        methods += sorted({r["method"] for r in mrows} - set(order) - {"float32"})
        for method in methods:
            cells = []
            for b in budgets:
                r = next((r for r in mrows if r["method"] == method and r["budget"] == b), None)
                cells.append("–" if r is None else f"{r['accuracy']:.2f} ({-r['drop']:+.2f})")
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def per_image_rows(rows: list[dict], first: str = "lrp") -> list[dict]:
    """``first`` against every other post-training method at each (model, budget) where both rows kept their test
    images' outcomes: the images only one of the two files gets right and McNemar's exact p on them (the test images'
    noise alone, for this pair of files). Fine-tuned rows (``lrp+ft2``) are left out: they answer another question."""
    kept = {(r["model"], r["budget"], r["method"]): unpack_correct(r["test_correct"]) for r in rows
            if r.get("test_correct") and r["method"] != "float32" and "+ft" not in r["method"]}
    acc = {(r["model"], r["budget"], r["method"]): r["accuracy"] for r in rows}
    out = []
    for model, budget, _ in sorted(k for k in kept if k[2] == first):
        others = sorted(m for (mo, b, m) in kept if (mo, b) == (model, budget) and m != first)
        for other in others:
            only_first, only_other, p = mcnemar(kept[(model, budget, first)], kept[(model, budget, other)])
            out.append({"model": model, "budget": f"{budget:g}×", "comparison": f"{first} − {other}",
                        "accuracy difference": f"{acc[(model, budget, first)] - acc[(model, budget, other)]:+.2f}",
                        f"only {first} right": only_first, "only the other right": only_other,
                        "McNemar p": f"{p:.3f}"})
    return out


def write_results(rows: list[dict], args: argparse.Namespace, out: Path, started: str, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    commands = sorted({r.get("command", "") for r in rows} - {""})
    lines = [f"# Benchmark results ({'quick' if args.quick else 'full'} mode)", "",
             "Produced by: " + "; ".join(f"`{c}`" for c in commands) + "  ",
             f"Date of this write: {started}; torch {torch.__version__}"
             + (f"; wall time {seconds / 60:.1f} min.  " if seconds else ".  "),
             "Machines (per row, column `machine`): " + "; ".join(sorted({r.get("machine") or "?" for r in rows}))
             + ".  ",
             "Data: CIFAR-10 (JPEG q75), scores/calibration from training images, knobs chosen on "
             f"{args.val_size} held-out training images, accuracy on the full 10,000-image test split, "
             "measured on the model loaded back from the written `.lrpc` file. A budget of R× caps every "
             "method's file at dense/R bytes (rows measured before 2026-11-26 let the fixed-grid baselines "
             "run up to 2% over it; the `ratio` column shows each file's real ratio). `edges=8` in a "
             "baseline's setting: the first and last layer kept at 8 bits (a candidate of `magnitude` and "
             "`uniform` in rows measured from 2026-11-26 on: every budget of both models).", ""]
    cols = (("method", "method"), ("budget", "budget"), ("file_bytes", "file bytes"), ("ratio", "ratio"),
            ("accuracy", "accuracy %"), ("drop", "drop"), ("sparsity", "sparsity"), ("mean_bits", "mean bits"),
            ("seconds", "compress s"), ("knobs", "chosen setting"), ("finetune_recipe", "recovery"), ("machine", "machine"))
    for m in sorted({r["model"] for r in rows}):
        lines += [f"## {m}", ""]
        mrows = [dict(r, knobs=", ".join(f"{k}={v}" for k, v in r["knobs"].items())) for r in rows if r["model"] == m]
        mrows.sort(key=lambda r: (r["budget"], -r["accuracy"]))
        lines += [markdown_table(mrows, cols), ""]
    by_image = per_image_rows(rows)
    if by_image:
        lines += ["## lrp against each method, image by image", "",
                  "Rows that kept each test image's outcome (measured from 2026-12-07 on): the images only one of the "
                  "two files gets right, and McNemar's exact two-sided p on them: how likely a split that lopsided is "
                  "if both files were equally accurate. It covers the test images' noise only; another seed (scoring "
                  "images, held-out split) moves both files too.", "",
                  markdown_table(by_image, [(k, k) for k in by_image[0]]), ""]
    (out / "results.md").write_text("\n".join(lines))
    (out / "summary.md").write_text(summary_table(rows))
    plot(rows, out / "accuracy_vs_size.png")


def provenance(title: str, commands: list[str], started: str, rows: list[dict]) -> list[str]:
    """Opening lines of a results page: title, the commands that made its rows, date, torch, machines."""
    return [f"# {title}", "", "Produced by: " + "; ".join(f"`{c}`" for c in commands) + "  ",
            f"Date of this write: {started}; torch {torch.__version__}; machines: "
            + "; ".join(sorted({r.get('machine') or '?' for r in rows})) + ".  "]


def _machine(device: str) -> str:
    import os

    cpu = platform.processor() or platform.machine()
    desc = f"{platform.machine()} {os.cpu_count()} cores ({torch.get_num_threads()} threads) {cpu}".strip()
    if device.startswith("cuda"):
        desc += f", {torch.cuda.get_device_name(torch.device(device))}"
    return desc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default=None)
    ap.add_argument("--methods", default="lrp,mse,taylor,random,gptq,magnitude,uniform,paper,deeplift")
    ap.add_argument("--budgets", default=None)
    ap.add_argument("--budgets-for", action="append", default=[], metavar="ARCH:B1,B2",
                    help="budgets for one model, e.g. resnet44:4,8,12 (overrides --budgets for it)")
    ap.add_argument("--finetune", action="append", default=None, metavar="ARCH:BUDGET:EPOCHS",
                    help="extra lrp rows with recovery fine-tuning, e.g. resnet20:16:2 (none: no such rows)")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--val-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default="symmetric", choices=GRIDS,
                    help="levels of every method's 2..8-bit groups (rows name it in their setting when not symmetric)")
    ap.add_argument("--no-entropy-coding", action="store_true",
                    help="every method's file bit-packed (format v1/v2; rows before 2026-11-26 evening were)")
    ap.add_argument("--shared", default=str(SHARED), help="folder with models/ and data/ (default ../shared)")
    add_weights_option(ap)
    add_finetune_recipe_options(ap)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (forward/backward passes; the bytes are CPU work)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--report-only", action="store_true", help="only rewrite the tables from --merge files")
    ap.add_argument("--merge", action="append", default=[], metavar="RESULTS_JSON",
                    help="also include the rows of another run (other models) in the written tables")
    args = ap.parse_args()
    require_matplotlib("run_benchmark.py")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but no CUDA device is available")
    args.machine = _machine(args.device)
    args.models = [] if args.report_only else (args.models or ("resnet20" if args.quick else "resnet20,resnet44")).split(",")
    args.methods = [m for m in args.methods.split(",") if m and m != "none"]
    args.budgets = [float(b) for b in (args.budgets or ("4,8" if args.quick else "2,4,6,8,12,16")).split(",")]
    args.model_budgets = {a.split(":")[0]: [float(b) for b in a.split(":")[1].split(",")] for a in args.budgets_for}
    ft = args.finetune if args.finetune is not None else ([] if args.quick else ["resnet20:12:1", "resnet20:16:2"])
    args.finetune = {}
    for item in ft:
        if item == "none":
            continue
        arch, budget, epochs = item.split(":")
        args.finetune.setdefault(arch, []).append((float(budget), int(epochs)))
    args.samples = args.samples or (128 if args.quick else 512)
    args.val_size = args.val_size or (1000 if args.quick else 2000)
    if not (Path(args.shared) / "models").is_dir():
        sys.exit(f"benchmark needs {args.shared}/models and {args.shared}/data (see README)")
    torch.manual_seed(args.seed)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    rows: list[dict] = []
    fresh_methods = set(args.methods) | {f"lrp+ft{e}" for v in args.finetune.values() for _, e in v}
    for extra in args.merge:  # rows this run measures again are replaced; the others are kept
        for r in json.loads(Path(extra).read_text()):
            budgets = args.model_budgets.get(r["model"], args.budgets) + [1.0] + \
                [b for b, _ in args.finetune.get(r["model"], [])]
            if not (r["model"] in args.models and r["method"] in fresh_methods and r["budget"] in budgets):
                rows.append(r)
    command = shlex.join(["python", "benchmarks/run_benchmark.py", *sys.argv[1:]])
    def emit(row: dict) -> None:  # results are rewritten after every row, so a stopped run keeps what it measured
        key = (row["model"], row["method"], row["budget"])
        rows[:] = [r for r in rows if (r["model"], r["method"], r["budget"]) != key] + [dict(row, command=command)]
        write_results(rows, args, Path(args.out), started, time.perf_counter() - t0)

    for arch in args.models:
        bench_model(arch, args, log, emit)
    if args.report_only:
        write_results(rows, args, Path(args.out), started, 0.0)
    log(f"wrote {args.out}/results.md, results.json, accuracy_vs_size.png")


if __name__ == "__main__":
    main()
