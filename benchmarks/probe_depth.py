"""Whole residual blocks removed instead of channels: faster per MAC, but does it recover as well?

A channel cut leaves narrow convolutions that a CPU runs below their MAC share (docs/FINDINGS.md §12: ResNet-20's
`0.4@8` keeps 54% of the MACs and runs 1.3-1.4x on an AVX-512 Xeon). Removing whole blocks (a residual block
whose input and output shapes agree becomes the identity, its shortcut) keeps every remaining layer at full width,
so speed follows MACs. This probe measures both sides on ResNet-20, all 10 classes:

- which blocks: each candidate block (a child of a stage whose output shape equals its input shape) is removed
  alone and the accuracy on ``--score-size`` *training* images (scoring images, not the held-out ones) ranks
  them; a cut of k blocks takes the k best-surviving, at most ceil(k / stages) from one stage (a spread cut);
  explicit lists (``layer1.1,layer2.2``) are taken as given; ``--rank lrp`` / ``lrp_zplus`` rank by the relevance
  entering each block's residual branch instead, ``--rank branch_norm`` by the branch's output norm relative to
  its shortcut (``block_scores``);
- accuracy on ``--val-size`` held-out training images (never the test split) after the cut and after
  ``--epochs`` of the library's float recovery (``RECOVERY_RECIPE``: distillation from the dense model,
  BatchNorm statistics updated), the same recovery the channel-cut rows get;
- CPU latency at batch 64 of the dense model, every block cut and the width cut of ``--width-budget`` (LRP from
  the mean, downstream refit: the library's default channel cut), timed in one alternation.

The library now makes this cut (``lrpcompress.blocks``, ``compress --prune-blocks K``), with its candidates and
surgery used here; its criteria score the change a block makes to its input (``out − in``) instead of the branch
at the addition. This probe keeps its own ``block_scores`` so that its committed pages reproduce;
``benchmarks/bench_blocks.py`` compares the library's criteria.

    python benchmarks/probe_depth.py          # ResNet-20, 3 and 4 blocks + 0.4@8, ~25 min on 2 cores
    python benchmarks/probe_depth.py --cuts "3;layer1.2,layer2.2,layer3.2" --epochs 0
    python benchmarks/probe_depth.py --arch resnet44 --cuts "7;8" --width-budget none --test   # ~35 min
    python benchmarks/probe_depth.py --arch resnet44 --rank lrp --cuts 7 --width-budget none --test
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_channels import budget_name, parse_budget  # noqa: E402

from lrpcompress.blocks import removable_blocks, remove_blocks  # noqa: E402
from lrpcompress.data import load_data, sample_indices, split_train_val  # noqa: E402
from lrpcompress.evaluation import accuracy, cpu_line, speed_profiles  # noqa: E402
from lrpcompress.models import Add, load_model  # noqa: E402
from lrpcompress.recovery import RECOVERY_RECIPE, finetune_model  # noqa: E402
from lrpcompress.relevance import _start_grad, lrp_pass  # noqa: E402
from lrpcompress.report import markdown_table, write_page  # noqa: E402
from lrpcompress.rules import get_composite  # noqa: E402
from lrpcompress.structured import ChannelPruneConfig, prune_channels  # noqa: E402
from run_benchmark import add_weights_option, checkpoint  # noqa: E402

SHARED = ROOT.parent / "shared"
RANKS = {"sensitivity": "the accuracy without each block alone",
         "lrp": "the relevance entering each block's branch (LRP-ε, |Σ b·g| per image; lowest removed first)",
         "lrp_zplus": "the relevance entering each block's branch (LRP z⁺ on convolutions; lowest removed first)",
         "branch_norm": "the branch's output norm relative to its shortcut's (lowest removed first)"}


def _residual_add(block: nn.Module) -> nn.Module:
    """The block's residual addition (``models.Add``: its first input is the branch, the second the shortcut)."""
    adds = [m for m in block.modules() if isinstance(m, Add)]
    if len(adds) != 1:
        raise SystemExit(f"probe_depth.py: relevance ranks blocks with exactly one residual Add, found {len(adds)}")
    return adds[0]


def block_scores(model: nn.Module, data, blocks: list[str], rank: str, idx: np.ndarray) -> dict[str, float]:
    """How much each block's residual branch matters, summed over the scoring images ``idx`` of ``data`` (low =
    remove first).

    ``lrp`` / ``lrp_zplus``: the relevance entering the branch at its addition, |Σ b·g| per image (b the branch
    output, g the relevance per unit of it under the ε / z⁺ composite, from the true class), what LRP gives the
    branch when the addition splits relevance by contribution, as the library's engine does; removing the block
    sets b to 0. ``branch_norm``: ‖b‖ / ‖shortcut‖ per image, the label-free magnitude baseline."""
    adds = {b: _residual_add(model.get_submodule(b)) for b in blocks}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(lambda _m, inp, b=b: seen.__setitem__(b, inp)) for b, m in adds.items()]
    score = dict.fromkeys(blocks, 0.0)
    try:
        if rank == "branch_norm":
            with torch.no_grad():
                for x, _y in data.batches(64, idx):
                    model.eval()(x)
                    for b, (branch, short) in seen.items():
                        score[b] += float((branch.flatten(1).norm(dim=1) / short.flatten(1).norm(dim=1).clamp_min(1e-12)).sum())
            return score
        composite = get_composite("epsilon" if rank == "lrp" else "epsilon_plus", 1e-6)
        with lrp_pass(model, composite, data.tensor(idx[:1])) as states:
            for x, y in data.batches(64, idx):
                seen.clear()
                for st in states.values():
                    st.reset()
                logits = model(x)
                names = [b for b in blocks if b in seen]
                grads = torch.autograd.grad(logits, [seen[b][0] for b in names],
                                            grad_outputs=_start_grad(logits, y, "true"), allow_unused=True)
                for b, g in zip(names, grads):
                    if g is not None:
                        score[b] += float((seen[b][0].detach().double() * g.double()).flatten(1).sum(1).abs().sum())
    finally:
        for h in handles:
            h.remove()
    return score


def spread_pick(ranked: list[str], k: int) -> list[str]:
    """The first ``k`` of ``ranked`` taking at most ceil(k / stages) blocks from one stage."""
    stages = {b.rpartition(".")[0] for b in ranked}
    cap = math.ceil(k / max(len(stages), 1))
    taken: list[str] = []
    for b in ranked:
        if sum(t.rpartition(".")[0] == b.rpartition(".")[0] for t in taken) < cap:
            taken.append(b)
        if len(taken) == k:
            break
    return taken


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--cuts", default="3;4", help="';'-separated: a block count (ranked, spread over stages) or "
                                                  "a comma list of block names")
    ap.add_argument("--width-budget", default="0.4@8", help="the channel cut to compare with (bench_channels budget; "
                                                            "'none' to skip)")
    ap.add_argument("--epochs", type=int, default=2, help="recovery epochs (0: the cuts only)")
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--score-size", type=int, default=2000, help="training images that rank single-block removals")
    ap.add_argument("--rank", default="sensitivity", choices=tuple(RANKS),
                    help="what ranks the blocks a counted cut removes (block_scores; sensitivity: accuracy without "
                         "each block alone)")
    ap.add_argument("--no-spread", action="store_true", help="a counted cut takes the k lowest-ranked blocks wherever "
                                                             "they are (default: at most ceil(k / stages) per stage)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test", action="store_true", help="also report the test split's accuracy of every model "
                                                         "(after the cuts and choices are made on training images)")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "depth_probe.md"))
    add_weights_option(ap)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    train_all = load_data(Path(args.shared) / "data" / "cifar10-jpeg", "train")
    dense = load_model(args.arch, checkpoint(args.arch, args))
    fit, val = split_train_val(train_all, args.val_size, args.seed)
    example = fit.tensor(np.arange(1))
    candidates = removable_blocks(dense, example)
    score_idx = sample_indices(len(fit), args.score_size, args.seed, fit.y)
    single = {b: accuracy(remove_blocks(dense, [b]), fit, show_progress=False, indices=score_idx) for b in candidates}
    print("single-block removals (scoring images):", {b: round(a, 2) for b, a in single.items()}, flush=True)
    if args.rank == "sensitivity":
        ranked = sorted(candidates, key=lambda b: -single[b])
    else:
        scores = block_scores(dense, fit, candidates, args.rank, score_idx)
        ranked = sorted(candidates, key=lambda b: scores[b])
        print(f"{args.rank} block scores:", {b: round(v, 3) for b, v in scores.items()}, flush=True)

    arms: list[tuple[str, str, nn.Module]] = []  # (kind, what, model)
    for cut in args.cuts.split(";"):
        if cut.isdigit():
            blocks = ranked[:int(cut)] if args.no_spread else spread_pick(ranked, int(cut))
        else:
            blocks = cut.split(",")
        unknown = [b for b in blocks if b not in candidates]
        if unknown:
            ap.error(f"not a removable block: {unknown[0]} (candidates: {', '.join(candidates)})")
        arms.append((f"blocks ({args.rank})" if cut.isdigit() else "blocks", ",".join(blocks), remove_blocks(dense, blocks)))
    if args.width_budget != "none":
        inner, stream, round_to, scope = parse_budget(args.width_budget)
        cfg = ChannelPruneConfig(inner, "lrp", seed=args.seed, stream_fraction=stream, round_to=round_to, scope=scope)
        arms.append(("channels", f"{budget_name((inner, stream, round_to, scope))}, LRP from the mean, downstream refit",
                     prune_channels(dense, fit, cfg, show_progress=False).model))

    passes = [speed_profiles([dense, *(m for _, _, m in arms)], example, batch_sizes=(64,), repeats=20)
              for _ in range(3)]
    ms = [float(np.median([p[i]["latency_ms"]["64"] for p in passes])) for i in range(len(arms) + 1)]
    test = load_data(Path(args.shared) / "data" / "cifar10-jpeg", "test") if args.test else None
    base = accuracy(dense, val, show_progress=False)
    rows = [{"cut": "dense", "removed": "–", "MACs": 1.0, "ms b64": round(ms[0], 2), "speed-up": 1.0,
             "held-out": round(base, 2)}]
    if test is not None:
        rows[0]["test"] = round(accuracy(dense, test, show_progress=False), 2)
    for i, (kind, what, net) in enumerate(arms, start=1):
        row = {"cut": kind, "removed": what, "MACs": round(passes[0][i]["macs"] / passes[0][0]["macs"], 3),
               "ms b64": round(ms[i], 2), "speed-up": round(ms[0] / ms[i], 2),
               "held-out": round(accuracy(net, val, show_progress=False), 2)}
        if test is not None:
            row["test"] = round(accuracy(net, test, show_progress=False), 2)
        if args.epochs > 0:
            rcfg = replace(RECOVERY_RECIPE, epochs=args.epochs, seed=args.seed)
            trained = finetune_model(net, fit, rcfg, teacher=dense)
            after = accuracy(trained, val, show_progress=False)
            row.update({f"+ {args.epochs} ep": round(after, 2), "drop": round(base - after, 2)})
            if test is not None:
                row[f"test + {args.epochs} ep"] = round(accuracy(trained, test, show_progress=False), 2)
                row["test drop"] = round(rows[0]["test"] - row[f"test + {args.epochs} ep"], 2)
        rows.append(row)
        print(row, flush=True)
    single_rows = [{"block": b, "accuracy without it (scoring images)": round(single[b], 2)} for b in ranked]
    cmd = shlex.join(["python", "benchmarks/probe_depth.py", *sys.argv[1:]])
    machine = cpu_line()
    write_page(args.out, [
        "# Whole blocks or channels: speed and recovery (held-out training images)", "",
        f"Command: `{cmd}`; {datetime.date.today()}; torch {torch.__version__}, {machine}. {args.arch}, all classes. "
        f"Block cuts replace residual blocks by their shortcut (ranked by {RANKS[args.rank]} on "
        f"{args.score_size} training images, " + ("the k lowest wherever they are" if args.no_spread else "at most ceil(k / stages) per stage") + "); the channel cut is the library's "
        f"default. Recovery: {args.epochs} epoch(s) of RECOVERY_RECIPE (distillation, BatchNorm statistics updated, "
        f"lr {RECOVERY_RECIPE.lr:g}, batch {RECOVERY_RECIPE.batch_size}) on the training images minus {args.val_size} "
        "held out; accuracy (%) on those held-out images, which the dense model was trained on (hence its 95-97%)"
        + ("; `test`: the same trained models on the test split, reported only (nothing is chosen on it)"
           if args.test else ", never the test split") + ". Speed: median of 3 passes of 20 batch-64 forward passes, all models in one "
        "alternation.", "",
        markdown_table(rows, [(k, k) for k in dict.fromkeys(k for r in rows for k in r)]), "",
        "## Single-block removals, no training", "",
        markdown_table(single_rows, [(k, k) for k in single_rows[0]]), ""])


if __name__ == "__main__":
    main()
