"""Block criteria side by side: which residual blocks to replace by their shortcut, with the library's cut.

For one architecture, one block count and an optional class subset, every criterion of
:data:`lrpcompress.blocks.BLOCK_CRITERIA` (or ``--criteria``) ranks the removable blocks on ``--samples``
reference images of the training data minus ``--val-size`` held out (the subset's images when ``--classes`` is
given: relevance, norms and losses from the user's own task) and removes the ``--blocks`` lowest
(``lrpcompress.blocks.prune_blocks``, what ``compress --prune-blocks K --block-criterion C`` does). Each cut model
is measured without training and after ``--epochs`` of the library's float recovery (``RECOVERY_RECIPE``:
distillation from the dense model, BatchNorm statistics updated) on held-out training images and, reported only,
on the test split (of the subset's classes). Criteria that pick the same blocks share one training. CPU latency at
batch 64 of the dense model and every distinct cut, timed in one alternation (median of 3 passes).

    python benchmarks/bench_blocks.py                                 # ResNet-20, 3 blocks, 2 epochs, ~35 min
    python benchmarks/bench_blocks.py --classes 0,1,8 --blocks 4 --epochs 1 --out benchmarks/results/blocks_task.md
    python benchmarks/bench_blocks.py --arch resnet44 --blocks 7 --criteria norm,lrp,taylor
    python benchmarks/bench_blocks.py --criteria norm,lrp --reference mean --out benchmarks/results/blocks_rn20_mean.md
    python benchmarks/bench_blocks.py --arch resnet32 --weights resnet32=/tmp/resnet32-scratch.pt --blocks 5
    python benchmarks/bench_blocks.py --arch resnet44 --speedup 1.75 --criteria lrp,l1,taylor --reference library

``--speedup S`` replaces the block count by a CPU speed target (``BlockPruneConfig.speedup``): what removing each
block saves at batch 64 is measured once on the dense model (``measure_block_costs``) and every criterion removes the
blocks of smallest summed score whose savings reach the target; the page lists the costs beside the scores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lrpcompress.blocks import (BLOCK_COSTS, BLOCK_CRITERIA, COST_UNITS, BlockCosts, BlockPruneConfig,  # noqa: E402
                                measure_block_costs, prune_blocks, removable_blocks, remove_blocks)
from lrpcompress.data import load_data, parse_classes, split_train_val  # noqa: E402
from lrpcompress.errors import LrpcError  # noqa: E402
from lrpcompress.evaluation import accuracy, cpu_description, cpu_line, speed_profiles  # noqa: E402
from lrpcompress.models import load_model, restrict_classes  # noqa: E402
from lrpcompress.recovery import RECOVERY_RECIPE, finetune_model  # noqa: E402
from lrpcompress.report import markdown_table, write_page  # noqa: E402
from paired import outcomes  # noqa: E402
from run_benchmark import add_weights_option, checkpoint  # noqa: E402

SHARED = ROOT.parent / "shared"


def build_parser() -> argparse.ArgumentParser:
    """The script's options (summarize_blocks.py reads committed pages' commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--blocks", type=int, default=None, help="blocks removed by every criterion (default 3)")
    ap.add_argument("--speedup", type=float, default=None,
                    help="instead of --blocks: a speed target; each criterion removes the blocks of smallest summed "
                         "score whose measured cost reaches it")
    ap.add_argument("--cost", default="cpu", choices=BLOCK_COSTS,
                    help="what --speedup counts: CPU time at batch 64 (measured once) or MACs")
    ap.add_argument("--costs-from", default=None, metavar="PAGE.json",
                    help="with --speedup: the block costs an earlier page of this model measured, instead of a new "
                         "measurement (more criteria or settings under exactly the costs of that page)")
    ap.add_argument("--criteria", default=",".join(BLOCK_CRITERIA))
    ap.add_argument("--classes", default=None, help="a class subset (indices or names), e.g. 0,1,8")
    ap.add_argument("--epochs", type=int, default=2, help="recovery epochs (0: the cuts only)")
    ap.add_argument("--samples", type=int, default=512, help="reference images that rank the blocks (the CLI default)")
    ap.add_argument("--composite", default="epsilon_plus", help="LRP composite of the lrp criterion")
    ap.add_argument("--spread", action="store_true", help="at most ceil(k / stages) blocks from one stage")
    ap.add_argument("--steps", type=int, default=1,
                    help="remove the blocks in this many rounds, rescoring the rest on the cut model in between")
    ap.add_argument("--reference", default="zero", choices=("zero", "mean", "library"),
                    help="norm / lrp / taylor on the block's whole change (zero) or on its change minus the mean "
                         "change per channel (mean); library: each criterion's default (mean for lrp and taylor, zero "
                         "for norm); other criteria are run as they are")
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", default=str(SHARED))
    add_weights_option(ap)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "blocks.md"))
    return ap


def block_configs(args: argparse.Namespace, criteria: list[str]) -> dict[str, BlockPruneConfig]:
    """Each criterion's BlockPruneConfig under the options (``--reference`` applies to norm, lrp and taylor)."""
    count = 0 if args.speedup is not None else 3 if args.blocks is None else args.blocks
    return {crit: BlockPruneConfig(
        count, crit, speedup=args.speedup, cost=args.cost, spread=args.spread, composite=args.composite,
        samples=args.samples, seed=args.seed, steps=args.steps,
        reference=None if args.reference == "library" else args.reference if crit in ("norm", "lrp", "taylor")
        else "zero") for crit in criteria}


def page_options(command: str, where: str, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The options a page's ``command`` ran ``bench_blocks.py`` with (``parser``: :func:`build_parser`'s, built once by
    a caller reading many pages); LrpcError naming ``where`` if this script cannot read them."""
    parser = parser or build_parser()
    try:
        args, unknown = parser.parse_known_args(shlex.split(command)[2:])
    except ValueError as e:  # shlex: an unclosed quote
        raise LrpcError(f"{where}: cannot read its command ({e})")
    if unknown:
        raise LrpcError(f"{where}: its command has options this bench_blocks.py does not know: {' '.join(unknown)}")
    return args


def read_page(path: Path | str, where: str | None = None) -> dict:
    """A committed page's json: a mapping with its ``command`` and ``rows``; LrpcError naming ``where`` (default: the
    path) if the file cannot be read or is not such a page."""
    where = where or str(path)
    try:
        page = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LrpcError(f"{where}: cannot read it as a bench_blocks.py page ({type(e).__name__}: {e})")
    if not (isinstance(page, dict) and isinstance(page.get("command"), str) and isinstance(page.get("rows"), list)
            and all(isinstance(r, dict) for r in page["rows"])):
        raise LrpcError(f"{where}: not a bench_blocks.py page (it needs a 'command' and a list of 'rows')")
    return page


def page_costs(path: str, arch: str, cost: str) -> BlockCosts:
    """The block costs a committed ``--speedup`` page of ``arch`` measured in ``cost``'s unit; LrpcError otherwise."""
    where = f"--costs-from {path}"
    page = read_page(path, where)
    if "costs" not in page:
        raise LrpcError(f"{where}: the page holds no block costs (only pages run with --speedup do)")
    try:
        costs = BlockCosts.from_dict(page["costs"])
    except ValueError as e:
        raise LrpcError(f"{where}: {e}")
    page_arch = page_options(page["command"], where).arch
    if page_arch != arch or costs.unit != COST_UNITS[cost]:
        raise LrpcError(f"{where} holds {costs.unit} costs of {page_arch}; this run needs {COST_UNITS[cost]} "
                        f"costs of {arch}")
    return costs


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    criteria = [c for c in args.criteria.split(",") if c]
    bad = [c for c in criteria if c not in BLOCK_CRITERIA]
    if bad:
        ap.error(f"unknown criterion {bad[0]!r}; choose from {', '.join(BLOCK_CRITERIA)}")
    if args.speedup is not None and args.blocks is not None:
        ap.error("give --blocks or --speedup, not both")
    if args.costs_from and args.speedup is None:
        ap.error("--costs-from gives the costs a --speedup target counts: add --speedup S")
    try:  # every setting checked before the data and model load
        configs = block_configs(args, criteria)
        given = page_costs(args.costs_from, args.arch, args.cost) if args.costs_from else None
    except LrpcError as e:
        ap.error(str(e))
    torch.manual_seed(args.seed)
    data_dir = Path(args.shared) / "data" / "cifar10-jpeg"
    try:
        train_all, test = load_data(data_dir, "train"), load_data(data_dir, "test")
        dense = load_model(args.arch, checkpoint(args.arch, args))
        classes = parse_classes(args.classes, train_all.classes) if args.classes else None
    except LrpcError as e:
        ap.error(str(e))
    if classes:
        dense = restrict_classes(dense, classes)
        train_all, test = train_all.restrict_classes(classes), test.restrict_classes(classes)
    val_size = min(args.val_size, len(train_all) // 5)
    fit, val = split_train_val(train_all, val_size, args.seed)

    costs = None  # with --speedup: one measurement of the dense model's blocks for every criterion
    if args.speedup is not None:
        example = fit.tensor(np.arange(1))
        candidates = removable_blocks(dense, example)
        if given is not None and set(given.blocks) != set(candidates):
            ap.error(f"--costs-from {args.costs_from} costs blocks {', '.join(given.blocks)}; this model's are "
                     f"{', '.join(candidates)}")
        costs = given if given is not None else measure_block_costs(dense, example, candidates, args.cost)
        print(f"block costs ({costs.unit}, model {costs.total:.4g}): "
              + ", ".join(f"{b} {c:.4g}" for b, c in costs.blocks.items()), flush=True)
    cuts: dict[tuple[str, ...], list[str]] = {}  # blocks removed (model order) -> criteria that chose them
    scores: dict[str, dict[str, float]] = {}
    for crit, cfg in configs.items():
        try:  # a count above the model's removable blocks fails here, before any scoring
            res = prune_blocks(dense, fit, cfg, show_progress=False, costs=costs)
        except LrpcError as e:
            ap.error(str(e))
        scores[crit] = res.scores
        cuts.setdefault(tuple(sorted(res.removed, key=res.candidates.index)), []).append(crit)
        print(f"{crit}: {', '.join(res.removed)}", flush=True)

    models = {cut: remove_blocks(dense, list(cut)) for cut in cuts}
    example = fit.tensor(np.arange(1))
    passes = [speed_profiles([dense, *models.values()], example, batch_sizes=(64,), repeats=20) for _ in range(3)]
    ms = [float(np.median([p[i]["latency_ms"]["64"] for p in passes])) for i in range(len(models) + 1)]

    base_val = accuracy(dense, val, show_progress=False)
    base_test, dense_right = outcomes(dense, test)
    correct = {"dense": dense_right}  # per row (the criteria that chose the cut): the last test pass's images right
    rows = [{"criterion": "dense", "removed": "–", "MACs": 1.0, "ms b64": round(ms[0], 2), "speed-up": 1.0,
             "held-out": round(base_val, 2), "test": round(base_test, 2)}]
    for i, (cut, crits) in enumerate(cuts.items(), start=1):
        net = models[cut]
        row = {"criterion": ", ".join(crits), "removed": ", ".join(cut),
               **({"predicted": round(costs.speedup(cut), 2)} if costs else {}),
               "MACs": round(passes[0][i]["macs"] / passes[0][0]["macs"], 3), "ms b64": round(ms[i], 2),
               "speed-up": round(ms[0] / ms[i], 2), "held-out": round(accuracy(net, val, show_progress=False), 2)}
        acc, correct[row["criterion"]] = outcomes(net, test)
        row["test"] = round(acc, 2)
        if args.epochs > 0:
            rcfg = replace(RECOVERY_RECIPE, epochs=args.epochs, seed=args.seed)
            trained = finetune_model(net, fit, rcfg, teacher=dense)
            after = accuracy(trained, val, show_progress=False)
            t_after, correct[row["criterion"]] = outcomes(trained, test)
            row.update({f"held-out + {args.epochs} ep": round(after, 2), f"test + {args.epochs} ep": round(t_after, 2),
                        "test drop": round(base_test - t_after, 2)})
        rows.append(row)
        print(row, flush=True)

    cmd = shlex.join(["python", "benchmarks/bench_blocks.py", *sys.argv[1:]])
    machine = cpu_line()
    task = f"classes {', '.join(train_all.classes)}" if classes else "all 10 classes"
    score_rows = [{"block": b, **({f"cost ({costs.unit})": round(costs.blocks[b], 3 if costs.unit == "ms" else None)}
                                  if costs else {}), **{c: round(scores[c][b], 4) for c in criteria}}
                  for b in scores[criteria[0]]]
    budget = (f"blocks cut to a {args.speedup:g}x {args.cost} target" if args.speedup is not None
              else f"{configs[criteria[0]].count} blocks replaced by their shortcut")
    target = ("" if costs is None else
              f"Budget: every criterion removes the blocks of smallest summed score whose costs add up to "
              f"{costs.saving(args.speedup):.4g} {costs.unit} of the dense model's {costs.total:.4g}, a "
              f"{args.speedup:g}x target; costs "
              + (f"taken from `{args.costs_from}` (that page says how they were measured)" if args.costs_from else
                 "measured once for all criteria by `measure_block_costs`"
                 + (" (each group of blocks with the same layers and input shape removed at once and timed at batch "
                    "64 in alternation with the dense model, 50 rounds; its blocks share the median saving per round)"
                    if costs.unit == "ms" else ""))
              + "; `predicted`: the speed-up those costs predict for the cut, "
              "`speed-up`: the one measured below. ")
    selection = ("the speed target above" if costs else "at most ceil(k / stages) per stage" if args.spread
                 else "the k lowest wherever they are")
    mean_note = {"zero": "", "mean": ": norm, lrp and taylor on the block's change minus its mean change per channel",
                 "library": ": each criterion's library default, the mean change for lrp and taylor, zero for norm"}[
        args.reference]
    write_page(args.out, [
        f"# Block criteria: {args.arch}, {task}, {budget}", "",
        f"Command: `{cmd}`; {datetime.date.today()}; torch {torch.__version__}, {machine}. " + target +
        f"Blocks ranked on {args.samples} reference images of the training data minus {val_size} held out "
        f"({selection}"
        f"{f', in {args.steps} rounds rescored on the cut model' if args.steps > 1 else ''}; lrp: "
        f"{args.composite}; reference {args.reference}{mean_note}); the library's `prune_blocks`. "
        f"Recovery: {args.epochs} epoch(s) of RECOVERY_RECIPE "
        f"(distillation, BatchNorm statistics updated, lr {RECOVERY_RECIPE.lr:g}, batch {RECOVERY_RECIPE.batch_size}), "
        f"seed {args.seed}; criteria that chose the same blocks share a row. Accuracy (%) on the held-out training "
        "images (which the dense model was trained on) and, reported only, on the test split"
        + (" of those classes" if classes else "") + ". Speed: median of 3 passes of 20 batch-64 forward passes, "
        "all models in one alternation.", "",
        markdown_table(rows, [(k, k) for k in dict.fromkeys(k for r in rows for k in r)]), "",
        "## Block scores (low = removed first)", "",
        markdown_table(score_rows, [(k, k) for k in score_rows[0]]), ""])
    Path(args.out).with_suffix(".json").write_text(json.dumps({"command": cmd, "rows": rows, "scores": scores,
                                                               "costs": costs.as_dict() if costs else None,
                                                               "cpu": cpu_description(),
                                                               "test_correct": correct},
                                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
