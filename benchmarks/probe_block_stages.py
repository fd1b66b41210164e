"""Why LRP's block scores take more of stage 1 than Taylor's: the relevance that reaches each block.

Under a CPU speed target one-pass LRP empties stage 1 more often than Taylor, and where the two differ after
recovery Taylor's cut (fewer stage-1 blocks, more of stage 2) is sometimes the better one (docs/FINDINGS.md §27-§28).
Both scores are the first-order change of the true-class start when a block becomes the identity,
``|Σ (out − in − m) · g|`` (``lrpcompress.relevance.removal_relevance``); they differ only in ``g``: LRP's relevance
per unit of the block's output, or the plain gradient. This probe measures, per residual block on the reference
images a ``bench_blocks.py`` run of the same seed scores on, both library scores and the signal each ``g`` carries
to that block: ``Σ out · g`` (LRP: the relevance reaching the block's output; Taylor: gradient × activation),
against the start ``Σ logit · g`` at the top. If LRP's relevance thins out on its way down (absorbed by biases
and BatchNorm shifts at every layer) and the gradient's signal does not, LRP's scores shrink with depth from the
output for a reason that has nothing to do with what a block contributes. With ``--costs-from`` (a
``bench_blocks.py --speedup`` page of the same model) it also lists the cut each score would choose at
``--speedups``, raw and divided by its stream signal, with the library's ``select_by_cost``; nothing is trained.

    python benchmarks/probe_block_stages.py --arch resnet44 --costs-from benchmarks/results/speed/blocks_rn44_speed2.0_steady_seed1.json --seed 1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import shlex
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_blocks import page_costs  # noqa: E402
from lrpcompress.blocks import BlockPruneConfig, block_scores, removable_blocks, select_by_cost  # noqa: E402
from lrpcompress.data import ImageData, load_data, sample_indices, split_train_val  # noqa: E402
from lrpcompress.errors import LrpcError  # noqa: E402
from lrpcompress.models import load_model  # noqa: E402
from lrpcompress.relevance import module_passes  # noqa: E402
from lrpcompress.report import markdown_table, write_page  # noqa: E402
from run_benchmark import add_weights_option, checkpoint  # noqa: E402

SHARED = ROOT.parent / "shared"


def stream_signal(model: nn.Module, data: ImageData, blocks: list[str], config: BlockPruneConfig,
                  lrp: bool) -> tuple[dict[str, float], float]:
    """``Σ out · g`` at each block's output over the config's reference images, and ``Σ logit · g`` at the start;
    ``g`` the LRP relevance per unit (``lrp``) or the plain gradient of the start (the pass of
    ``removal_relevance``, which sums ``(out − in − m) · g`` instead)."""
    totals = dict.fromkeys(blocks, 0.0)
    start = 0.0
    passes = module_passes(model, data, blocks, config.relevance_config(), lrp, show_progress=False)
    with contextlib.closing(passes):
        for step in passes:
            start += float((step.logits.double() * step.start_grad).sum())
            for b in blocks:
                totals[b] += float((step.outputs[b].double() * step.grads[b].double()).sum())
    return totals, start


def stage(block: str) -> str:
    return block.rsplit(".", 1)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet44")
    add_weights_option(ap)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--costs-from", metavar="PAGE.json", help="a bench_blocks.py --speedup page of this model")
    ap.add_argument("--speedups", default="1.5,1.75,2.0")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=None, help="results page (default: benchmarks/results/block_stages/ARCH_seedK.md)")
    args = ap.parse_args()
    out = args.out or str(ROOT / "benchmarks" / "results" / "block_stages" / f"{args.arch}_seed{args.seed}.md")
    try:
        speedups = [float(s) for s in args.speedups.split(",")]
        costs = page_costs(args.costs_from, args.arch, "cpu") if args.costs_from else None
        data_dir = Path(args.shared) / "data" / "cifar10-jpeg"
        dense = load_model(args.arch, checkpoint(args.arch, args))
        train_all = load_data(data_dir, "train")
    except (LrpcError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(args.seed)
    fit, _val = split_train_val(train_all, args.val_size, args.seed)
    blocks = removable_blocks(dense, fit.tensor(sample_indices(len(fit), 1, 0, fit.y)))
    scores, signal, start = {}, {}, {}
    for crit in ("lrp", "taylor"):
        cfg = BlockPruneConfig(criterion=crit, samples=args.samples, seed=args.seed)
        scores[crit] = block_scores(dense, fit, blocks, cfg, show_progress=False)
        signal[crit], start[crit] = stream_signal(dense, fit, blocks, cfg, lrp=crit == "lrp")
        print(f"{crit}: start {start[crit]:.4g}", flush=True)
    # only LRP's signal is a conserved quantity (gradient × activation can be ~0 or negative at a block), so only
    # LRP's score is divided by it
    norm = {b: scores["lrp"][b] / signal["lrp"][b] if signal["lrp"][b] > 0 else float("inf") for b in blocks}
    rows = [{"block": b, **({"cost (ms)": costs.blocks.get(b)} if costs else {}),
             "lrp": scores["lrp"][b], "lrp signal Σ out·g": signal["lrp"][b],
             "lrp signal / start": signal["lrp"][b] / start["lrp"], "lrp / signal": norm[b],
             "taylor": scores["taylor"][b], "taylor signal Σ out·g": signal["taylor"][b],
             "taylor signal / start": signal["taylor"][b] / start["taylor"]}
            for b in blocks]
    stages = list(dict.fromkeys(stage(b) for b in blocks))
    med = {s: {k: statistics.median(r[k] for r in rows if stage(r["block"]) == s)
               for k in ("lrp", "lrp signal / start", "lrp / signal", "taylor", "taylor signal / start")}
           for s in stages}
    first = stages[0]
    stage_rows = [{"stage": s, **{f"{k}, median": v for k, v in med[s].items()},
                   **({f"{k}: {first} / this stage": med[first][k] / med[s][k] for k in ("lrp", "lrp / signal",
                                                                                           "taylor")}
                      if s != first else {})}
                  for s in stages]
    cut_rows = []
    if costs:
        for sp in speedups:
            for name, sc in (("lrp", scores["lrp"]), ("lrp / signal", norm), ("taylor", scores["taylor"])):
                cut = select_by_cost(sc, costs.blocks, costs.saving(sp))
                cut_rows.append({"target": f"{sp:g}x", "score": name, "blocks": ", ".join(sorted(cut)),
                                 **{f"from {s}": sum(stage(b) == s for b in cut) for s in stages},
                                 "predicted": round(costs.speedup(cut), 2)})
    cmd = shlex.join(["python", "benchmarks/probe_block_stages.py", *sys.argv[1:]])
    lines = [f"# Block scores by stage: {args.arch}", "",
             f"Command: `{cmd}`; {datetime.date.today()}; torch {torch.__version__}. {args.samples} reference images "
             f"of the training data minus {args.val_size} held out, seed {args.seed} (the images a `bench_blocks.py "
             f"--seed {args.seed}` run scores on); `lrp`, `taylor`: the library's block scores (from the mean "
             "change); `signal Σ out·g`: what each score's `g` carries to the block's output, summed over the "
             "images (LRP: the relevance reaching it; Taylor: gradient × activation), and its share of the start "
             f"`Σ logit·g` (lrp {start['lrp']:.4g}, taylor {start['taylor']:.4g}); `/ signal`: the score divided by "
             "it (LRP only: gradient × activation is not conserved and can be about 0 or negative at a block). "
             "Nothing is trained.", "",
             f"## Per stage (medians over the stage's removable blocks; ratios: {first} against each later stage)",
             "",
             markdown_table(stage_rows, [(k, k) for k in dict.fromkeys(k for r in stage_rows for k in r)]), "",
             "## Per block", "", markdown_table(rows, [(k, k) for k in rows[0]]), ""]
    if cut_rows:
        lines += [f"## The cut each score chooses (costs from `{args.costs_from}`)", "",
                  markdown_table(cut_rows, [(k, k) for k in cut_rows[0]]), ""]
    write_page(out, lines)


if __name__ == "__main__":
    main()
