"""Channel criteria × channel budgets × class subsets: structured pruning on the CIFAR ResNets of ../shared.

For every setting (all 10 classes, or a class subset with the head cut to it and scores from those classes'
training images) and every budget (a fraction of the inner width of every residual block, optionally plus a
fraction of the residual-stream channels: ``0.5+0.25``), each criterion removes channels physically
(Torch-Pruning dependency graph, mean compensation on), and the slim float model is evaluated on the test
images of those classes, without and with recovery fine-tuning (1 epoch, `--epochs`). Speed is measured once per budget
(the slim architecture does not depend on the criterion): parameters, MACs, CPU latency at batch 1 and 64 and
peak memory, dense model in the same run.

    python benchmarks/bench_channels.py            # full run, writes benchmarks/results/channels.*
    python benchmarks/bench_channels.py --quick    # ResNet-20, one subset, two criteria, no fine-tuning
    python benchmarks/bench_channels.py --budgets 0.5+0.25 --append   # add rows, keep the other committed ones
    python benchmarks/bench_channels.py --budgets 0.3g,0.3m --append  # global / MAC-aware scope (per-row speed)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from run_benchmark import add_weights_option, checkpoint, require_matplotlib  # noqa: E402

from lrpcompress.data import load_data, split_train_val  # noqa: E402
from lrpcompress.evaluation import accuracy, cpu_line, speed_profiles  # noqa: E402
from lrpcompress.models import load_model, restrict_classes  # noqa: E402
from lrpcompress.recovery import RECOVERY_RECIPE, finetune_model  # noqa: E402
from lrpcompress.report import markdown_table  # noqa: E402
from lrpcompress.structured import (ChannelPruneConfig, apply_shapes, prune_channels, prune_channels_auto,  # noqa: E402
                                   prune_gradually)

SHARED = ROOT.parent / "shared"
CRITERIA = {  # name -> ChannelPruneConfig overrides
    "l1": {"criterion": "l1", "reconstruct": False},
    "bn_scale": {"criterion": "bn_scale", "reconstruct": False},
    "taylor": {"criterion": "taylor", "reconstruct": False},
    "lrp_eps": {"criterion": "lrp", "composite": "epsilon", "reference": "zero", "reconstruct": False},
    "lrp_zplus": {"criterion": "lrp", "composite": "epsilon_plus", "reference": "zero", "reconstruct": False},
    # relevance measured from the channel's mean (what the compensated removal leaves); the rows without
    # _refit / _down: mean compensation only (lrp_mean was the library's default until 2026-12-01)
    "lrp_zplus_mean": {"criterion": "lrp", "composite": "epsilon_plus", "reference": "mean",
                       "reconstruct": False},
    "lrp_mean": {"criterion": "lrp", "composite": "epsilon", "reference": "mean", "reconstruct": False},
    # the same cut, then every reader of a removed channel refitted by least squares (reconstruct=True)
    "l1_refit": {"criterion": "l1", "reconstruct": True, "refit_scope": "readers"},
    "taylor_refit": {"criterion": "taylor", "reconstruct": True, "refit_scope": "readers"},
    "lrp_mean_refit": {"criterion": "lrp", "composite": "epsilon", "reference": "mean", "reconstruct": True,
                       "refit_scope": "readers"},
    # every layer from the first reader on refitted (refit_scope='downstream'); lrp_mean_down is the library's
    # default since 2026-12-01 (later that day than lrp_mean_refit)
    "l1_down": {"criterion": "l1", "reconstruct": True, "refit_scope": "downstream"},
    "taylor_down": {"criterion": "taylor", "reconstruct": True, "refit_scope": "downstream"},
    "lrp_mean_down": {"criterion": "lrp", "composite": "epsilon", "reference": "mean", "reconstruct": True,
                      "refit_scope": "downstream"},
}


Budget = tuple[float, float, int, str]  # inner fraction, stream fraction, rounding multiple, scope
SUFFIX_SCOPE = {"g": "global", "m": "macs", "a": "auto"}


def parse_budget(text: str) -> Budget:
    """``0.5`` -> (0.5, 0.0, 1, 'layer'): inner fraction only; ``0.5+0.25`` -> inner 0.5 and residual streams
    0.25; ``0.3@8`` -> inner 0.3 with every layer's kept channels rounded to a multiple of 8; ``0.3g`` -> 30% of
    the channels under one threshold over all layers (``scope='global'``); ``0.3m`` -> the MACs that 0.3 removes
    in layer scope, spread by score per MAC (``scope='macs'``); ``0.3a`` -> the most accurate of the three on
    ``--val-size`` held-out training images, at no more MACs than layer (``prune_channels_auto``)."""
    text, _, multiple = text.partition("@")
    scope = SUFFIX_SCOPE.get(text[-1:], "layer")
    inner, _, stream = text.rstrip("".join(SUFFIX_SCOPE)).partition("+")
    return float(inner), float(stream or 0.0), int(multiple or 1), scope


def budget_of(row: dict) -> Budget:
    return row["fraction"], row["streams"], row.get("round_to", 1), row.get("scope", "layer")


def budget_name(budget: Budget) -> str:
    suffix = {v: k for k, v in SUFFIX_SCOPE.items()}.get(budget[3], "")
    return (f"{budget[0]:g}" + (f"+{budget[1]:g}" if budget[1] else "") + suffix
            + (f"@{budget[2]}" if budget[2] > 1 else ""))


def slim_architecture(dense: torch.nn.Module, train, budget: Budget, seed: int = 0) -> torch.nn.Module:
    """The slim model of a layer-scope ``budget``, channels picked at random: its speed does not depend on which."""
    cfg = ChannelPruneConfig(budget[0], criterion="random", compensate=False, reconstruct=False, samples=8,
                             seed=seed, stream_fraction=budget[1], round_to=budget[2])
    return prune_channels(dense, train, cfg, show_progress=False).model


def measure_speed(arch: str, args: argparse.Namespace, train, example,
                  shapes: dict[str, dict] | None = None) -> dict[Budget | str, dict]:
    """CPU speed of the dense model and of its slim architecture at every layer-scope budget (and of every
    architecture in ``shapes``, keyed like it: MAC-aware budgets give each criterion and class subset its own).

    A layer-scope slim architecture depends only on the budget, so it is measured once per model, before
    any other work. All architectures are timed in one alternation (so machine load hits them alike), in
    ``args.speed_passes`` passes; each latency is the median over passes of the per-pass medians."""
    dense = load_model(arch, checkpoint(arch, args))
    keys: list[Budget | str] = [b for b in args.budgets if b[3] == "layer"]
    slims = [slim_architecture(dense, train, budget, args.seed) for budget in keys]
    for k, shape in (shapes or {}).items():
        keys.append(k)
        slims.append(apply_shapes(copy.deepcopy(dense), shape))
    passes = [speed_profiles([dense, *slims], example, repeats=50) for _ in range(args.speed_passes)]

    def ms(i: int, b: str) -> float:
        return round(float(np.median([p[i]["latency_ms"][b] for p in passes])), 3)

    d = passes[0][0]
    cpu = cpu_line()
    dense_row = {"params": d["params"], "macs": d["macs"], "latency_b1_ms": ms(0, "1"), "latency_b64_ms": ms(0, "64"),
                 "peak_mem_b64_mb": round(d["peak_memory_bytes"]["64"] / 2**20, 2), "cpu": cpu}
    out: dict[Budget | str, dict] = {"dense": dense_row}
    for i, budget in enumerate(keys, start=1):
        s = passes[0][i]
        out[budget] = {"params": s["params"], "macs": s["macs"], "latency_b1_ms": ms(i, "1"),
                       "latency_b64_ms": ms(i, "64"), "speedup_b64": round(ms(0, "64") / ms(i, "64"), 3),
                       "peak_mem_b64_mb": round(s["peak_memory_bytes"]["64"] / 2**20, 2), "cpu": cpu, "dense": dense_row}
    return out


def paired_speed(arch: str, args: argparse.Namespace, train, example, budget: Budget, shapes: dict) -> dict:
    """Speed of one non-layer cut, timed in one alternation with the dense model and the layer-scope cut of the
    same budget (``speedup_b64_layer``), so the two architectures are compared under the same machine load."""
    layer = (budget[0], budget[1], budget[2], "layer")
    sp = measure_speed(arch, argparse.Namespace(**{**vars(args), "budgets": [layer]}), train, example,
                       {"slim": shapes})
    return dict({k: v for k, v in sp["slim"].items() if k != "dense"}, speedup_b64_layer=sp[layer]["speedup_b64"])


def run(args: argparse.Namespace, emit, log) -> None:
    train_all = load_data(Path(args.shared) / "data" / "cifar10-jpeg", "train")
    test_all = load_data(Path(args.shared) / "data" / "cifar10-jpeg", "test")
    example = test_all.tensor(np.arange(1))
    for arch in args.models:
        speed = measure_speed(arch, args, train_all, example)
        dense_all = load_model(arch, checkpoint(arch, args))
        for subset in args.subsets:
            classes = None if subset == "all" else [int(c) for c in subset.split(",")]
            dense = restrict_classes(dense_all, classes) if classes else dense_all
            train = train_all.restrict_classes(classes) if classes else train_all
            test = test_all.restrict_classes(classes) if classes else test_all
            base = accuracy(dense, test, show_progress=False)
            tag = "10 classes" if classes is None else "classes " + ",".join(map(str, classes))
            fit, val = (split_train_val(train, args.val_size, args.seed) if any(b[3] == "auto" for b in args.budgets)
                        else (train, None))
            emit(dict(speed["dense"], model=arch, setting=tag, criterion="dense", fraction=0.0,
                      streams=0.0, epochs=0, accuracy=round(base, 2), drop=0.0, speedup_b64=1.0))
            for budget in args.budgets:
                fraction, streams, round_to, scope = budget
                for name, kw in CRITERIA.items():
                    if name not in args.criteria:
                        continue
                    cfg = replace(ChannelPruneConfig(fraction, samples=args.samples, seed=args.seed, scope=scope,
                                                     stream_fraction=streams, round_to=round_to, steps=args.steps),
                                  **kw)
                    t0 = time.perf_counter()
                    extra: dict = {"scope": scope}
                    if scope == "auto":  # scored on the rest, chosen on held-out training images
                        res, chosen, trials = prune_channels_auto(dense, fit, val, cfg, show_progress=False)
                        extra.update(chosen_scope=chosen, trials=trials)
                    else:
                        res = prune_channels(dense, train, cfg, show_progress=False)
                    secs = time.perf_counter() - t0
                    if scope == "layer":
                        sp = {k: v for k, v in speed[budget].items() if k != "dense"}
                    else:  # this criterion's own architecture: timed now, paired with the layer cut
                        extra["shapes"] = res.shapes
                        sp = paired_speed(arch, args, train, example, budget, res.shapes)
                    common = dict(sp, model=arch, setting=tag, criterion=name, fraction=fraction, streams=streams,
                                  round_to=round_to, kept=round(res.kept_fraction, 4), prune_s=round(secs, 1),
                                  samples=args.samples, seed=args.seed, steps=args.steps, **extra)
                    acc = accuracy(res.model, test, show_progress=False)
                    emit(dict(common, epochs=0, accuracy=round(acc, 2), drop=round(base - acc, 2)))
                    log(f"{arch} {tag} {name:9s} {budget_name(budget)}: {acc:.2f}% (dense {base:.2f}%), "
                        f"speed-up {sp['speedup_b64']:.2f}x, MACs {sp['macs'] / speed['dense']['macs']:.0%}")
                    if budget in args.finetune_budgets and name in args.finetune_criteria:
                        fcfg = replace(RECOVERY_RECIPE, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                       seed=args.seed, feature_distill=args.feature_distill)
                        if args.rounds > 1:  # gradual: cut and recover in rounds within the same epochs
                            ft = prune_gradually(dense, train, cfg, fcfg, args.rounds, teacher=dense,
                                                 show_progress=False, device=args.device).model
                        else:
                            ft = finetune_model(res.model, train, fcfg, show_progress=False, device=args.device,
                                                teacher=dense)
                        acc = accuracy(ft, test, show_progress=False)
                        emit(dict(common, epochs=args.epochs, rounds=args.rounds, accuracy=round(acc, 2),
                                  **({"feature_distill": args.feature_distill} if args.feature_distill else {}),
                                  drop=round(base - acc, 2), recipe=f"lr {args.lr:g}, batch {args.batch_size}"
                                  + (f", {args.rounds} rounds" if args.rounds > 1 else "")
                                  + (f", feature loss {args.feature_distill:g}" if args.feature_distill else "")
                                  + (f", on {args.device}" if args.device != "cpu" else "")))
                        log(f"    + {args.epochs} epoch(s): {acc:.2f}%")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["setting"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (m, s) in zip(axes[0], panels):
        sub = [r for r in rows if r["model"] == m and r["setting"] == s  # the main runs; other seeds: table only
               and r.get("samples", 512) == 512 and r.get("seed", 0) == 0 and r.get("round_to", 1) == 1
               and r.get("steps", 1) == 1]
        base = next(r["accuracy"] for r in sub if r["criterion"] == "dense")
        dense_macs = next(r["macs"] for r in sub if r["criterion"] == "dense")
        for crit in [c for c in CRITERIA if any(r["criterion"] == c for r in sub)]:
            for ep, rounds, scope, style in ((0, 1, "layer", "-o"), (1, 1, "layer", "--s"), (1, 3, "layer", "-.d"),
                                             (2, 1, "layer", ":^"), (0, 1, "global", "x"), (0, 1, "macs", "+"),
                                             (0, 1, "auto", "*")):
                pts = sorted((100 * r["macs"] / dense_macs, r["accuracy"]) for r in sub
                             if r["criterion"] == crit and r["epochs"] == ep and r.get("rounds", 1) == rounds
                             and r.get("scope", "layer") == scope)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{list(CRITERIA).index(crit)}",
                            ms=9 if scope != "layer" else 6,
                            label=crit + (f" +{ep} ep" if ep else "") + (f", {rounds} rounds" if rounds > 1 else "")
                            + (f", {scope} scope" if scope != "layer" else ""))
        ax.axhline(base, color="k", lw=0.8, ls=":", label="dense")
        ax.invert_xaxis()
        ax.set_title(f"{m}, {s}")
        ax.set_xlabel("MACs left (% of dense; inner widths, then residual streams cut)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def normalise(row: dict) -> dict:
    """Rows written before residual streams and the recipe column existed."""
    row.setdefault("streams", 0.0)
    row.setdefault("samples", 512)
    row.setdefault("seed", 0)
    row.setdefault("round_to", 1)
    row.setdefault("scope", "layer")
    row.setdefault("steps", 1)
    row.setdefault("command", "python benchmarks/bench_channels.py` (accuracy), then "
                              "`python benchmarks/bench_channels.py --speed-only")
    if row["epochs"] and "recipe" not in row:
        row["recipe"] = "lr 0.03, batch 128"
    return row


def page_dates(rows: list[dict], started: str) -> str:
    """The page's date line: the span of its rows' run dates; rows from before rows carried one are named apart."""
    dated = [r["date"] for r in rows if "date" in r]
    if not dated:
        return started
    first, last = min(dated), max(dated)
    line = first if first == last else f"{first} to {last} (each row's run date in channels.json)"
    undated = len(rows) - len(dated)
    return line + (f"; {undated} row(s) from earlier runs carry no date" if undated else "")


def write(rows: list[dict], args: argparse.Namespace, out: Path, started: str, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "channels.json").write_text(json.dumps(rows, indent=1) + "\n")
    cols = (("criterion", "criterion"), ("fraction", "inner removed"), ("streams", "streams removed"),
            ("scope", "scope"), ("steps", "scoring rounds"), ("chosen_scope", "chosen"), ("round_to", "kept rounded to"), ("kept", "channels kept"),
            ("epochs", "recovery epochs"), ("recipe", "recovery"), ("samples", "scored images"), ("seed", "seed"),
            ("accuracy", "accuracy %"), ("drop", "drop"), ("params", "params"), ("macs", "MACs"),
            ("latency_b1_ms", "CPU ms b1"), ("latency_b64_ms", "CPU ms b64"), ("speedup_b64", "speed-up b64"),
            ("speedup_b64_layer", "layer cut's speed-up, same run"),
            ("peak_mem_b64_mb", "peak MiB b64"), ("cpu", "timed on"))
    lines = ["# Structured (channel) pruning benchmark", "",
             "Produced by (each row's `command` in channels.json): "
             + "; ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", args.command) for r in rows)) + "  ",
             f"Date: {page_dates(rows, started)}; machine: {platform.machine()}, {torch.get_num_threads()} CPU threads; "
             f"torch {torch.__version__} (recovery on the CPU unless the `recovery` column names a GPU)"
             + (f"; wall time {seconds / 60:.1f} min.  " if seconds else ".  "),
             "Budgets: a fraction of the inner width of every residual block (removing them touches no residual "
             "addition), and optionally of every residual stream (`streams removed`: the stem, each block's second "
             "convolution and BatchNorm, the next blocks' inputs and the option-A shortcuts' channel maps are cut "
             "alike). Scores from "
             "the `scored images` column's number of training images of the setting's classes; accuracy on all test images of those classes; "
             "mean compensation on; recovery = 1 or 2 epochs (column) of SGD (Nesterov, one-cycle) on the setting's training images "
             "with distillation from the dense model and BatchNorm statistics updated, at the learning rate and "
             "batch size in the `recovery` column (lr 0.01, batch 64 was chosen on 1,500 held-out training images, "
             "see docs/FINDINGS.md; the lr 0.03, batch 128 rows are the earlier recipe). Latency: median of 50 CPU "
             "forward passes, "
             "the dense and every slim architecture of a model timed in one alternation, median of 3 such "
             "passes (the slim architecture does not depend on the criterion or the classes; `--speed-only` "
             "re-measures every row's speed this way on a quiet machine); `speed-up b64` = dense ms / slim ms "
             "at batch 64. `rounds` > 1: the cut and the recovery epoch were split into that many rounds "
             "(`prune_gradually`). `kept rounded to` 8: every layer's kept channel count rounded to the nearest "
             "multiple of 8 (budget `0.3@8`, `--channel-round-to 8`); `channels kept`: share of the prunable "
             "channels kept (rows before that column: the budget's fraction exactly). `scope` global (budget "
             "`0.3g`, `--channel-scope global`): the fraction of all prunable channels under one threshold on "
             "scores divided by their layer's mean; macs (budget `0.3m`, `--channel-scope macs`): the MACs that the "
             "fraction removes in layer scope, taken from the channels with the lowest such score per MAC; auto (budget "
             f"`0.3a`, `--channel-scope auto`): scored on the training images less {args.val_size:,} held out, the three cut "
             "and the most accurate on the held-out images kept among those leaving no more MACs than layer "
             "(`chosen`; per-scope held-out accuracy in channels.json). In all three, each criterion and class "
             "subset gets its own architecture, timed in one alternation with the dense model and with the layer cut "
             "of the same budget (`layer cut's speed-up, same run`).", ""]
    for m in sorted({r["model"] for r in rows}):
        for s in sorted({r["setting"] for r in rows if r["model"] == m}):
            sub = [r for r in rows if r["model"] == m and r["setting"] == s]
            sub.sort(key=lambda r: (r["epochs"], r.get("rounds", 1), r["fraction"], r.get("streams", 0.0),
                                    r.get("round_to", 1), r.get("scope", "layer"), r.get("samples", 512),
                                    r.get("seed", 0), -r["accuracy"]))
            lines += [f"## {m}, {s}", "", markdown_table(sub, cols), ""]
    (out / "channels.md").write_text("\n".join(lines))
    plot(rows, out / "channels.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="resnet20")
    ap.add_argument("--subsets", default=None, help="';'-separated: 'all' or comma lists, e.g. 'all;0,1,8;3,4,5'")
    ap.add_argument("--budgets", default=None,
                    help="comma list of inner fractions, each optionally +stream fraction and @multiple to round kept "
                         "channels to, e.g. 0.3,0.5+0.25,0.3@8")
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--finetune-budgets", default=None, help="budgets that also get recovery rows (none: no such rows)")
    ap.add_argument("--finetune-criteria", default="l1,taylor,lrp_zplus,lrp_mean")
    ap.add_argument("--lr", type=float, default=RECOVERY_RECIPE.lr)
    ap.add_argument("--batch-size", type=int, default=RECOVERY_RECIPE.batch_size)
    ap.add_argument("--feature-distill", type=float, default=RECOVERY_RECIPE.feature_distill,
                    help="weight of the block-wise feature loss in recovery (FinetuneConfig.feature_distill)")
    ap.add_argument("--epochs", type=int, default=1, help="recovery epochs of the fine-tuned rows")
    ap.add_argument("--rounds", type=int, default=1,
                    help="fine-tuned rows: cut and recover in this many rounds within the same epochs (gradual)")
    ap.add_argument("--append", action="store_true",
                    help="keep the committed rows of channels.json, replacing only the ones this run re-measures")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1, help="cut in this many rounds, rescoring in between (no training)")
    ap.add_argument("--val-size", type=int, default=1500, help="held-out training images for auto-scope budgets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="device for recovery fine-tuning (latency is always CPU)")
    ap.add_argument("--shared", default=str(SHARED))
    add_weights_option(ap)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--report-only", action="store_true", help="only rewrite channels.md/png from channels.json")
    ap.add_argument("--speed-passes", type=int, default=3, help="timing passes (median taken)")
    ap.add_argument("--speed-only", action="store_true", help="re-measure only the speed columns of channels.json")
    ap.add_argument("--pair-speed", action="store_true",
                    help="with --speed-only: re-measure only the global/macs/auto rows, each timed with the layer cut "
                         "of its budget in one alternation (the other rows keep their speed)")
    args = ap.parse_args()
    require_matplotlib("bench_channels.py")
    args.command = shlex.join(["python", "benchmarks/bench_channels.py", *sys.argv[1:]])
    args.models = args.models.split(",")
    args.subsets = (args.subsets or ("0,1,8" if args.quick else "all;0,1,8;3,4,5")).split(";")
    args.budgets = [parse_budget(b) for b in
                    (args.budgets or ("0.3" if args.quick else "0.2,0.3,0.5,0.5+0.125,0.5+0.25")).split(",")]
    args.criteria = args.criteria.split(",") if not args.quick else ["l1", "lrp_mean"]
    args.finetune_budgets = [parse_budget(b) for b in
                             (args.finetune_budgets or ("" if args.quick else "0.5,0.5+0.125,0.5+0.25")).split(",")
                             if b and b != "none"]
    args.finetune_criteria = args.finetune_criteria.split(",")
    if args.steps < 1:
        sys.exit("--steps must be at least 1 (1 = one cut)")
    unknown = set(args.criteria) - set(CRITERIA)
    if unknown:
        sys.exit(f"unknown criteria {sorted(unknown)}; choose from {', '.join(CRITERIA)}")
    if not (Path(args.shared) / "models").is_dir():
        sys.exit(f"the benchmark needs {args.shared}/models and {args.shared}/data (see README)")
    torch.manual_seed(args.seed)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()
    rows: list[dict] = []
    kept: list[dict] = []
    committed = Path(args.out) / "channels.json"
    if args.speed_only or args.report_only or (args.append and committed.exists()):
        if not committed.exists():
            sys.exit(f"bench_channels.py: {committed} does not exist (nothing to re-measure or rewrite)")
        kept = [normalise(r) for r in json.loads(committed.read_text())]

    def key(r: dict) -> tuple:
        # the recovery recipe (learning rate, batch, device, ...) is part of a fine-tuned row's key: a rerun with
        # another recipe, or a CPU rerun of a GPU row, sits beside the committed row instead of replacing it
        return (r["model"], r["setting"], r["criterion"], r["fraction"], r["streams"], r.get("round_to", 1),
                r.get("scope", "layer"), r["epochs"], r.get("rounds", 1), r.get("samples", 512), r.get("seed", 0),
                r.get("steps", 1), r.get("feature_distill", 0.0), r.get("recipe"))

    def emit(row: dict) -> None:
        if row["criterion"] == "dense" and any(r["criterion"] == "dense" and (r["model"], r["setting"]) ==
                                               (row["model"], row["setting"]) for r in kept):
            return  # --append: the committed dense row stays (its latency pairs with the main rows' speed-ups)
        rows.append(dict(row, command=args.command, date=started))
        new = {key(r) for r in rows}
        everything = [r for r in kept if key(r) not in new] + rows
        write(everything, args, Path(args.out), started, 0.0 if args.append else time.perf_counter() - t0)

    if args.report_only:  # rewrite channels.md/png from the committed channels.json
        old_md = (Path(args.out) / "channels.md").read_text().splitlines()
        started = next((ln[len("Date: "):].split(";")[0] for ln in old_md if ln.startswith("Date: ")), started)
        write(kept, args, Path(args.out), started, 0.0)
        print(f"rewrote {args.out}/channels.md and channels.png")
        return
    if args.speed_only:  # re-measure the speed columns of the committed rows (e.g. after a run on a busy machine)
        old = kept
        args.budgets = sorted({budget_of(r)[:3] + ("layer",) for r in old if r["criterion"] != "dense"
                               and (not args.pair_speed or r.get("scope", "layer") != "layer")})
        train = load_data(Path(args.shared) / "data" / "cifar10-jpeg", "train")
        example = train.tensor(np.arange(1))
        for arch in sorted({r["model"] for r in old}):
            mine = [r for r in old if r["model"] == arch]
            shapes = {str(i): r["shapes"] for i, r in enumerate(mine) if r.get("scope", "layer") != "layer"}
            speed = measure_speed(arch, args, train, example, shapes)
            for i, r in enumerate(mine):
                if args.pair_speed and str(i) not in shapes:
                    continue  # only the non-layer rows, each paired with its layer cut
                sp = speed["dense"] if r["criterion"] == "dense" else speed[str(i) if str(i) in shapes else budget_of(r)]
                r.update({k: v for k, v in sp.items() if k != "dense"})
                if str(i) in shapes:  # the layer cut of the same budget, timed in the same alternation
                    r["speedup_b64_layer"] = speed[budget_of(r)[:3] + ("layer",)]["speedup_b64"]
        for r in old:
            if "--speed-only" not in r["command"] and (not args.pair_speed or r.get("scope", "layer") != "layer"):
                r["command"] += "`, speed re-measured by `" + args.command
        rows.extend(old)
        write(rows, args, Path(args.out), started, 0.0)
        print(f"re-measured speed in {args.out}/channels.md")
        return
    run(args, emit, lambda s: print(s, flush=True))
    print(f"wrote {args.out}/channels.md, channels.json, channels.png")


if __name__ == "__main__":
    main()
