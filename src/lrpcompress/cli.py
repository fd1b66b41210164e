"""Command-line interface: a thin layer over the library.

Every expected failure prints one line ``lrpcompress: error: …`` on stderr and exits with status 2;
nothing is written unless the whole run succeeds (outputs are written atomically at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import LrpcError, LrpcWarning

# FinetuneConfig's and RECOVERY_RECIPE's defaults, repeated so that --help does not import torch (a test keeps
# them equal)
FINETUNE_LR = 0.005
FINETUNE_BATCH = 64
RECOVER_LR = 0.01
RECOVER_BATCH = 64


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], need: str) -> Callable[[str], Any]:
    """An argparse type: convert, then check; messages say what is needed."""
    def parse(s: str) -> Any:
        try:
            v = convert(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if convert is int else 'a number'}, "
                                             f"got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{need}, got {s}")
        return v
    return parse


_finite = lambda v: v == v and abs(v) != float("inf")  # noqa: E731
_positive_int = _checked(int, lambda v: v >= 1, "must be at least 1")
_ratio = _checked(float, lambda v: _finite(v) and v > 1.0, "must be a finite number > 1")
_fraction = _checked(float, lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
_bits = _checked(int, lambda v: 1 <= v <= 8, "bit-widths must be 1..8")
_nonneg_float = _checked(float, lambda v: _finite(v) and v >= 0, "must be a finite number >= 0")
_positive_float = _checked(float, lambda v: _finite(v) and v > 0, "must be > 0")


def _fraction_or_auto(s: str) -> float | str:
    return "auto" if s == "auto" else _fraction(s)


def _block_count_or_names(s: str) -> int | tuple[str, ...]:
    """A number of residual blocks, or their module names separated by commas."""
    if s.strip().lstrip("-").isdigit():
        return _checked(int, lambda v: v >= 0, "must be at least 0")(s.strip())
    names = tuple(p.strip() for p in s.split(",") if p.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected a number of blocks or names such as layer1.0,layer2.2, got {s!r}")
    return names


def _fraction_list(s: str) -> tuple[float, ...]:
    parts = [p for p in s.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0,0.3,0.5, got {s!r}")
    return tuple(_fraction(p.strip()) for p in parts)


def _device(s: str):
    """An argparse type: a torch device that exists on this machine."""
    import torch

    try:
        dev = torch.device(s)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device such as cpu or cuda, got {s!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{s} was asked for but no CUDA device is available; use cpu")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"only cpu and cuda devices are supported, got {s!r}")
    return dev


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True, help="resnet20|32|44|56, digits_cnn, a torchvision name, or pkg.mod:fn")
    p.add_argument("--weights", required=True, help="state_dict checkpoint (.pt/.th), loaded with weights_only=True")
    p.add_argument("--data", required=True, help="folder with train.npz/test.npz, an ImageFolder root with "
                                                "train/ and test/, or torchvision-cifar10:ROOT")
    p.add_argument("--samples", type=_positive_int, default=512, help="reference training images for scores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--composite", default="epsilon_plus", help="LRP composite (see `lrpcompress rules`)")
    p.add_argument("--start", default="true", help="where relevance starts: true | predicted | all | contrast (log-probability gradient)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--classes", default=None, help="restrict to a subset of classes: indices or names, e.g. 0,1,8")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--device", type=_device, default="cpu", help="where forward/backward passes run: cpu or cuda")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage stays available through --help)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .blocks import BLOCK_COSTS, BLOCK_CRITERIA
    from .compress import METHODS, ROUNDINGS
    from .quantization import GRIDS
    from .structured import CHANNEL_CRITERIA

    ap = _Parser(prog="lrpcompress", description="Compress trained PyTorch models with LRP.")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="per-weight LRP relevance, written as safetensors")
    _add_model_args(s)
    s.add_argument("--out", required=True, help="output .safetensors file")

    c = sub.add_parser("compress", help="prune + mixed-precision quantize, write .lrpc and a JSON report")
    _add_model_args(c)
    c.add_argument("--out", required=True, help="output .lrpc file")
    c.add_argument("--report", default=None, help="output report.json")
    c.add_argument("--method", default="lrp", choices=METHODS)
    size = c.add_mutually_exclusive_group()
    size.add_argument("--target-ratio", type=_ratio, default=None, help="file this many times smaller than float32")
    size.add_argument("--target-bytes", type=_positive_int, default=None, help="file size in bytes")
    size.add_argument("--max-drop", type=_nonneg_float, default=None,
                      help="largest compression whose validation accuracy drop stays within this many points")
    c.add_argument("--bits", type=_bits, default=None, help="uniform/tier bits, or the mean for optimal allocation")
    c.add_argument("--allocation", default=None, choices=("uniform", "tiers", "optimal"))
    c.add_argument("--group-size", type=_positive_int, default=None, help="weights per scale (default: per channel)")
    c.add_argument("--grid", default=None, choices=GRIDS,
                   help="levels of 2..8-bit groups: symmetric (zero is a level) or midrise (all 2^b codes used)")
    c.add_argument("--rounding", default=None, choices=ROUNDINGS,
                   help="gptq: error-compensating rounding against each layer's input Hessian (the default of the "
                        "allocator methods); nearest: every weight to its nearest level (the plain baselines')")
    c.add_argument("--no-entropy-coding", action="store_true",
                   help="store plain bit-packed codes and survivor masks (format version 1/2) instead of rANS "
                        "where that is shorter (version 3); the allocator then prices b bits per code")
    c.add_argument("--prune", default=None, choices=("none", "nonpositive", "fraction"))
    c.add_argument("--sparsity", type=_fraction, default=None, help="fraction of weights pruned (--prune fraction)")
    c.add_argument("--prune-score", default=None, choices=("relevance", "abs_relevance", "magnitude", "taylor", "random"))
    c.add_argument("--finetune-epochs", type=_checked(int, lambda v: 0 <= v <= 100, "must be 0..100"), default=0, help="recovery fine-tuning epochs through the quantizers")
    c.add_argument("--finetune-lr", type=_positive_float, default=FINETUNE_LR,
                   help=f"recovery's SGD learning rate (default {FINETUNE_LR})")
    c.add_argument("--finetune-batch", type=_positive_int, default=FINETUNE_BATCH,
                   help=f"fine-tuning batch size (default {FINETUNE_BATCH})")
    c.add_argument("--finetune-scales", default="learned", choices=("learned", "fixed"),
                   help="fine-tuning trains each group's scale too (LSQ), or keeps the allocator's scales")
    c.add_argument("--distill", type=_nonneg_float, default=1.0,
                   help="weight of distillation from the uncompressed model during fine-tuning (0 = labels only)")
    c.add_argument("--feature-distill", type=_nonneg_float, default=None,
                   help="weight of the block-wise feature loss against the uncompressed model (blocks whose outputs "
                        "keep their shape); default: the recovery recipe's for --recover-epochs, 0 for "
                        "--finetune-epochs")
    c.add_argument("--val-size", type=_positive_int, default=2000, help="training images held out to choose settings (--max-drop, size targets, --speedup routes)")
    c.add_argument("--prune-channels", type=_fraction_or_auto, default=0.0,
                   help="fraction of prunable channels (inner widths) removed physically before quantization, or "
                        "auto: with a size target, try --channel-fractions and keep the most accurate on "
                        "--val-size held-out training images")
    c.add_argument("--channel-fractions", type=_fraction_list, default=None,
                   help="channel fractions --prune-channels auto tries (default 0,0.3,0.5)")
    c.add_argument("--prune-streams", type=_fraction, default=0.0,
                   help="fraction of residual-stream channels removed too (every layer on a stream is cut alike)")
    c.add_argument("--prune-blocks", type=_block_count_or_names, default=0,
                   help="residual blocks replaced by their shortcut before any channel cut: how many (the lowest "
                        "--block-criterion scores on the reference images) or their names, e.g. layer1.0,layer2.2")
    c.add_argument("--block-speedup", type=_checked(float, lambda v: _finite(v) and v > 1, "must be above 1"),
                   default=None,
                   help="instead of --prune-blocks N: a speed target, e.g. 1.75; removes the blocks of smallest "
                        "summed --block-criterion score whose --block-cost reaches it (removing a stage-1 block of a "
                        "CIFAR ResNet saves about 1.8x the CPU time of a stage-3 block at equal MACs)")
    c.add_argument("--block-cost", default="cpu", choices=BLOCK_COSTS,
                   help="what --block-speedup and --speedup count: cpu (each block's time at batch 64, measured on "
                        "this machine before the cut; the choice can vary with the machine's load: pin it with "
                        "--block-costs) or macs (exact, reproducible)")
    c.add_argument("--block-costs", default=None, metavar="FILE",
                   help="count these block costs instead of measuring them: the report of an earlier --block-speedup "
                        "run (its block_pruning.costs) or such a costs mapping; the same costs choose the same "
                        "blocks on every run, which a cpu measurement on a busy machine does not promise")
    c.add_argument("--block-criterion", default="norm", choices=BLOCK_CRITERIA,
                   help="how --prune-blocks ranks blocks: norm (how much a block changes its input; default: on "
                        "classes 0,1,8 ahead of lrp in 10 of 15 paired runs, by 0.22 +- 0.09), lrp (relevance of that "
                        "change under --composite: on all 10 classes the fastest cut at equal count and on every "
                        "model's speed/accuracy front, ahead of taylor by 0.28 +- 0.08 over 17 paired runs and of "
                        "l1 on ResNet-44 in all 8, level with l1 on ResNet-20 and with norm in accuracy; "
                        "docs/FINDINGS.md §19-22), taylor (its gradient x change), l1 "
                        "(mean |weight|), sensitivity (loss without the block), random")
    c.add_argument("--block-reference", default=None, choices=("zero", "mean"),
                   help="norm, lrp and taylor measure a block's whole change to its input (zero) or the change minus "
                        "its mean per channel (mean: the part a shift cannot replace); default mean for lrp and "
                        "taylor, zero for norm")
    c.add_argument("--block-spread", action="store_true",
                   help="--prune-blocks N takes at most ceil(N / stages) blocks from one stage (on class subsets "
                        "of ResNet-44 +0.2 to +0.5 on the mean for lrp and norm; mixed on ResNet-32/56, a loss on "
                        "ResNet-20; §20)")
    c.add_argument("--block-steps", type=_positive_int, default=1,
                   help="remove the --prune-blocks N blocks (1..N rounds) or reach the --block-speedup target (each "
                        "round a 1/steps share of the saving) in this many rounds, rescoring the rest on the cut "
                        "model in between (default 1: one scoring pass; for counts level on the mean after recovery, "
                        "§19; under a speed target lrp in 4 rounds +0.12 over one pass in 10 runs on ResNet-20/44, "
                        "level with taylor, while taylor in rounds loses 0.7; docs/FINDINGS.md §24-§25)")
    c.add_argument("--speedup", type=_checked(float, lambda v: _finite(v) and v > 1, "must be above 1"), default=None,
                   help="a CPU speed-up target (batch 64, measured on this machine) reached by the most accurate of "
                        "several routes on --val-size held-out training images: each route removes a fraction of the "
                        "inner channels (--routes) after a block cut that supplies the rest of the speed-up, is timed, "
                        "recovered for --recover-epochs and scored (which route wins depends on the model and the "
                        "task; docs/FINDINGS.md §30)")
    c.add_argument("--routes", type=_fraction_list, default=None,
                   help="channel fractions the --speedup routes remove after their blocks (default 0,0.3,0.5; 0: "
                        "blocks alone)")
    c.add_argument("--recover-epochs", type=_checked(int, lambda v: 0 <= v <= 100, "must be 0..100"), default=0,
                   help="float fine-tuning epochs right after block or channel pruning, before quantization "
                        "(distillation from the unpruned model, BatchNorm statistics updated)")
    c.add_argument("--recover-lr", type=_positive_float, default=None,
                   help=f"peak SGD learning rate of --recover-epochs (default {RECOVER_LR})")
    c.add_argument("--recover-batch", type=_positive_int, default=None,
                   help=f"batch size of --recover-epochs (default {RECOVER_BATCH})")
    c.add_argument("--channel-criterion", default="lrp", choices=CHANNEL_CRITERIA,
                   help="how channels are ranked for --prune-channels")
    c.add_argument("--channel-composite", default="epsilon", help="LRP composite of the lrp channel criterion")
    c.add_argument("--channel-reference", default="mean", choices=("mean", "zero"),
                   help="lrp channel relevance measured from the channel's mean input (what a removal with mean "
                        "compensation leaves; default) or from zero (plain LRP)")
    c.add_argument("--channel-scope", default="layer", choices=("layer", "global", "macs", "auto"),
                   help="layer: every layer loses the fraction; global: one threshold over all layers; macs: remove "
                        "that fraction of the prunable MACs, lowest score per MAC first; auto: the most accurate of "
                        "the three on --val-size held-out training images, at no more MACs than layer")
    c.add_argument("--channel-steps", type=_positive_int, default=1, help="prune-and-rescore rounds")
    c.add_argument("--channel-reconstruct", action=argparse.BooleanOptionalAction, default=True,
                   help="after the channel cut, refit every layer that lost inputs by least squares to the unpruned "
                        "model's outputs on the reference images (no labels, no training; default on, "
                        "--no-channel-reconstruct for mean compensation only)")
    c.add_argument("--channel-refit", default="downstream", choices=("downstream", "readers"),
                   help="layers the refit solves for: every layer from the first one that lost inputs on "
                        "(downstream, default: later layers also correct the drift) or only those that lost inputs")
    c.add_argument("--channel-round-to", type=_positive_int, default=1,
                   help="round each pruned layer's kept channels to a multiple of this (e.g. 8; 1 = exact fraction)")
    c.add_argument("--tune-finetuned", action="store_true",
                   help="size targets: fine-tune every setting of the size search and keep the best after training "
                        "(costs one fine-tuning per setting; the usual pick compares settings before training)")
    c.add_argument("--no-tune", action="store_true",
                   help="with a size target: skip the search over sparsity and bit-width floor on held-out data")
    c.add_argument("--no-speed", action="store_true", help="skip the CPU latency/memory measurement in the report")

    e = sub.add_parser("evaluate", help="accuracy of a .lrpc model on the test split")
    e.add_argument("model", help=".lrpc file")
    e.add_argument("--data", required=True)
    e.add_argument("--arch", default=None, help="only for files made from a user's own pkg.mod:fn model")
    e.add_argument("--split", default="test")
    e.add_argument("--device", type=_device, default="cpu", help="cpu or cuda")

    i = sub.add_parser("inspect", help="print the per-layer table of a .lrpc file")
    i.add_argument("model", help=".lrpc file")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")

    sub.add_parser("rules", help="list LRP composites and methods")

    d = sub.add_parser("demo", help="train a small CNN on scikit-learn digits and compress it (no downloads)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--epochs", type=_positive_int, default=12)

    b = sub.add_parser("benchmark", help="run benchmarks/run_benchmark.py (the method × budget table)")
    b.add_argument("args", nargs=argparse.REMAINDER)
    return ap


def _relevance_config(a: argparse.Namespace, classes):
    from .relevance import RelevanceConfig

    return RelevanceConfig(composite=a.composite, start=a.start, samples=a.samples, batch_size=a.batch_size,
                           seed=a.seed, classes=tuple(classes) if classes else None)


def _recovery(a: argparse.Namespace):
    """The float recovery after a channel cut: the library's recipe with the command line's epochs and weights."""
    from .recovery import RECOVERY_RECIPE

    fd = RECOVERY_RECIPE.feature_distill if a.feature_distill is None else a.feature_distill
    lr = RECOVERY_RECIPE.lr if a.recover_lr is None else a.recover_lr
    batch = RECOVERY_RECIPE.batch_size if a.recover_batch is None else a.recover_batch
    return replace(RECOVERY_RECIPE, epochs=a.recover_epochs, lr=lr, batch_size=batch, distill=a.distill, seed=a.seed,
                   feature_distill=fd)


def _load_inputs(a: argparse.Namespace, need_test: bool = True):
    from .data import load_data, parse_classes
    from .models import load_model

    train = load_data(a.data, "train")
    test = load_data(a.data, "test") if need_test else None
    classes = parse_classes(a.classes, train.classes)
    model = load_model(a.arch, a.weights, num_classes=None).to(a.device)
    n_out = [m for m in model.modules() if hasattr(m, "out_features")][-1].out_features
    if n_out != train.num_classes and classes is None:
        raise LrpcError(f"labels out of range for the model: the data has labels 0..{train.num_classes - 1}, "
                        f"the model has {n_out} outputs")
    if classes is not None:
        from .models import restrict_classes

        model = restrict_classes(model, classes)
        train = train.restrict_classes(classes)
        test = test.restrict_classes(classes) if test is not None else None
    return model, train, test, classes


def cmd_score(a: argparse.Namespace) -> int:
    from .io import check_output_path
    from .relevance import compute_relevance

    out = check_output_path(a.out, a.force)
    model, train, _, classes = _load_inputs(a, need_test=False)
    rel = compute_relevance(model, train, _relevance_config(a, classes))
    rel.save(out)
    print(f"wrote {out}: relevance of {len(rel.weights)} weight tensors from {rel.samples} training images "
          f"({a.composite}, start={a.start}, seed={a.seed})")
    return 0


def cmd_compress(a: argparse.Namespace) -> int:
    from .compress import compress, method_config
    from .data import split_train_val
    from .evaluation import accuracy
    from .io import check_output_path
    from .models import dense_bytes, fold_batchnorm, is_builtin_arch
    from .pruning import PruneConfig
    from .recovery import FinetuneConfig
    from .report import build_report, write_report
    from .search import compress_max_drop, compress_tuned

    t0 = time.perf_counter()
    out = check_output_path(a.out, a.force)
    report_path = check_output_path(a.report, a.force) if a.report else None
    if report_path is not None and report_path.resolve() == out.resolve():
        raise LrpcError("--out and --report must be different files")
    model, train, test, classes = _load_inputs(a)
    cfg = method_config(a.method, seed=a.seed)
    cfg = replace(cfg, relevance=_relevance_config(a, classes))
    q = cfg.quant
    if a.allocation:
        q = replace(q, allocation=a.allocation)
    if a.bits:
        q = replace(q, bits=a.bits)
    if a.group_size:
        q = replace(q, group_size=a.group_size)
    if a.grid:
        q = replace(q, grid=a.grid)
    if a.no_entropy_coding:
        q = replace(q, entropy_coding=False)
    if a.rounding:
        q = replace(q, rounding=a.rounding)
    p = cfg.prune
    if a.prune:
        p = replace(p, criterion=a.prune)
    if a.sparsity is not None:
        p = replace(p, criterion="fraction" if p.criterion == "none" else p.criterion, sparsity=a.sparsity)
    cfg = replace(cfg, quant=q, prune=p if isinstance(p, PruneConfig) else cfg.prune,
                  prune_score=a.prune_score or cfg.prune_score,
                  target_ratio=a.target_ratio, target_bytes=a.target_bytes,
                  finetune=FinetuneConfig(epochs=a.finetune_epochs, lr=a.finetune_lr, batch_size=a.finetune_batch,
                                           distill=a.distill, seed=a.seed,
                                           feature_distill=a.feature_distill or 0.0,
                                           learn_scales=a.finetune_scales == "learned"))
    extra_spec: dict = {"classes": list(classes)} if classes else {}
    sized = a.target_ratio is not None or a.target_bytes is not None
    tune = (sized and not a.no_tune and a.prune is None and a.sparsity is None
            and cfg.quant.allocation == "optimal" and a.max_drop is None)
    search = a.prune_channels == "auto"
    if a.tune_finetuned:
        if a.finetune_epochs == 0:
            raise LrpcError("--tune-finetuned compares settings after fine-tuning: add --finetune-epochs N")
        if not tune:
            raise LrpcError("--tune-finetuned works on the size search: use --target-ratio or --target-bytes "
                            "without --max-drop, --no-tune, --prune or --sparsity")
        if search:
            raise LrpcError("--tune-finetuned is not combined with --prune-channels auto; give a fraction instead")
    if search:
        if not sized:
            raise LrpcError("--prune-channels auto chooses under a size target: add --target-ratio or --target-bytes")
        if a.channel_scope == "auto" or a.channel_steps != 1:
            raise LrpcError("--prune-channels auto cuts in one scope and one step: drop --channel-scope auto "
                            "and --channel-steps")
        if a.prune is not None or a.sparsity is not None or a.no_tune:
            raise LrpcError("--prune-channels auto runs the size search: drop --prune, --sparsity and --no-tune")
    elif a.channel_fractions is not None:
        raise LrpcError("--channel-fractions is what --prune-channels auto tries: add --prune-channels auto")
    if a.block_speedup is not None and a.prune_blocks:
        raise LrpcError("give --prune-blocks or --block-speedup, not both")
    routed = a.speedup is not None
    if routed:
        given = [o for o, on in (("--prune-blocks", a.prune_blocks), ("--block-speedup", a.block_speedup is not None),
                                 ("--prune-channels", a.prune_channels != 0.0), ("--prune-streams", a.prune_streams),
                                 ("--block-spread", a.block_spread), ("--block-steps", a.block_steps != 1),
                                 ("--channel-steps", a.channel_steps != 1)) if on]
        if given:
            raise LrpcError(f"--speedup chooses the blocks and channels itself, in one pass each: drop {given[0]} "
                            "(or drop --speedup and cut by hand)")
    elif a.routes is not None:
        raise LrpcError("--routes are what --speedup tries: add --speedup S")
    if a.block_speedup is None and not routed and (a.block_cost != "cpu" or a.block_costs is not None):
        raise LrpcError("--block-cost and --block-costs are what --block-speedup counts: add --block-speedup S")
    cut_blocks = bool(a.prune_blocks) or a.block_speedup is not None
    if not cut_blocks and not routed and (a.block_criterion != "norm" or a.block_spread
                                          or a.block_reference is not None or a.block_steps != 1):
        raise LrpcError("--block-criterion, --block-reference, --block-spread and --block-steps rank blocks for "
                        "--prune-blocks: add --prune-blocks N or --block-speedup S")
    if cut_blocks and search:
        raise LrpcError("--prune-blocks is not combined with --prune-channels auto; give a channel fraction instead")
    if a.recover_epochs == 0 and (a.recover_lr is not None or a.recover_batch is not None):
        raise LrpcError("--recover-lr and --recover-batch set the training of --recover-epochs: add --recover-epochs N")
    held_out = (a.max_drop is not None or tune or search or routed
                or (a.channel_scope == "auto" and a.prune_channels + a.prune_streams > 0))
    fit, val = split_train_val(train, min(a.val_size, len(train) // 5), a.seed) if held_out else (train, None)
    slim, channel_info, block_info, knobs, route_info = model, None, None, None, None
    if cut_blocks:
        from .blocks import BlockPruneConfig, load_block_costs, prune_blocks

        count, names = (a.prune_blocks, ()) if isinstance(a.prune_blocks, int) else (0, a.prune_blocks)
        bcfg = BlockPruneConfig(count, a.block_criterion, names=names, spread=a.block_spread, reference=a.block_reference,
                                composite=a.composite, start=a.start, samples=a.samples, batch_size=a.batch_size,
                                seed=a.seed, steps=a.block_steps, speedup=a.block_speedup, cost=a.block_cost)
        given = load_block_costs(a.block_costs, a.block_cost) if a.block_costs is not None else None
        bres = prune_blocks(model, fit, bcfg, costs=given)
        slim = bres.model
        if not is_builtin_arch(a.arch):
            extra_spec["removed"] = bres.removed
        predicted = bres.costs.speedup(bres.removed) if bres.costs else None
        block_info = _block_info(bcfg, bres, a.block_costs)
        how = (f" (smallest {a.block_criterion} for a {a.block_speedup:g}x {a.block_cost} target, "
               f"{predicted:.2f}x predicted" + (f" from the costs in {a.block_costs})" if given else ")") if bres.costs
               else f" (lowest {a.block_criterion} of {len(bres.candidates)})" if bres.scores else "")
        print(f"blocks removed: {', '.join(bres.removed) or 'none'}{how}")
    if routed:
        slim, block_info, channel_info, route_info = _choose_route(a, model, fit, val, extra_spec)
    if search:
        from .search import DEFAULT_FRACTIONS, ChannelSearch, compress_channel_search
        from .structured import ChannelPruneConfig

        ccfg = ChannelPruneConfig(0.0, a.channel_criterion, composite=a.channel_composite,
                                  reference=a.channel_reference, start=a.start,
                                  scope=a.channel_scope, samples=a.samples, batch_size=a.batch_size, seed=a.seed,
                                  stream_fraction=a.prune_streams, round_to=a.channel_round_to,
                                  reconstruct=a.channel_reconstruct, refit_scope=a.channel_refit)
        csearch = ChannelSearch(ccfg, a.channel_fractions or DEFAULT_FRACTIONS)
        rcfg = _recovery(a)
        found = compress_channel_search(model, fit, val, cfg, a.arch, csearch, model_spec_extra=extra_spec or None,
                                        recover=rcfg if a.recover_epochs > 0 else None)
        result, knobs = found.result, found.trials[found.fraction]["knobs"]
        print(f"channel fraction: {found.fraction:g} (" + ", ".join(
            f"{f:g} " + (f"{t['val_accuracy']:.2f}%" if "val_accuracy" in t else "does not fit")
            for f, t in found.trials.items()) + " on held-out training images)")
        cut = found.structured
        channel_info = {"settings": replace(ccfg, fraction=found.fraction),
                        "kept_fraction": cut.kept_fraction if cut else 1.0,
                        "float_bytes": found.trials[found.fraction]["float_bytes"],
                        "removed": {k: len(v) for k, v in cut.removed.items()} if cut else {},
                        "recover_epochs": a.recover_epochs if cut else 0, "scope_trials": None,
                        "recover_feature_distill": rcfg.feature_distill if cut else None,
                        "fraction_trials": {f"{f:g}": t for f, t in found.trials.items()}}
    elif a.prune_channels > 0 or a.prune_streams > 0:
        from .structured import ChannelPruneConfig, prune_channels, prune_channels_auto

        ccfg = ChannelPruneConfig(a.prune_channels, a.channel_criterion, composite=a.channel_composite,
                                  reference=a.channel_reference, start=a.start,
                                  scope=a.channel_scope, steps=a.channel_steps, samples=a.samples,
                                  batch_size=a.batch_size, seed=a.seed, stream_fraction=a.prune_streams,
                                  round_to=a.channel_round_to, reconstruct=a.channel_reconstruct,
                                  refit_scope=a.channel_refit)
        trials = None
        if ccfg.scope == "auto":
            sres, chosen_scope, trials = prune_channels_auto(slim, fit, val, ccfg)
            ccfg = replace(ccfg, scope=chosen_scope)
            print(f"channel scope: {chosen_scope} ("
                  + ", ".join(f"{k} {v['val_accuracy']:.2f}%" + ("" if v["eligible"] else " over the MACs")
                              for k, v in trials.items()) + " on held-out training images)")
        else:
            sres = prune_channels(slim, fit, ccfg)
        slim = sres.model
        if not is_builtin_arch(a.arch):
            extra_spec["shapes"] = sres.shapes
        channel_info = {"settings": ccfg, "kept_fraction": sres.kept_fraction,
                        "removed": {k: len(v) for k, v in sres.removed.items()}, "scope_trials": trials}
    elif a.recover_epochs > 0 and not cut_blocks and not routed:
        raise LrpcError("--recover-epochs recovers from a structured cut: add --prune-blocks, --prune-channels or "
                        "--prune-streams")
    if slim is not model:  # blocks or channels were cut: recover in float, then count sizes from the given model
        rcfg = _recovery(a)
        if a.recover_epochs > 0 and not routed:  # a route was recovered before it was scored
            from .recovery import finetune_model

            slim = finetune_model(slim, fit, rcfg, device=a.device, teacher=model)
        recovered = {"recover_epochs": a.recover_epochs,
                     "recover_feature_distill": rcfg.feature_distill if a.recover_epochs else None,
                     "recover_recipe": {"lr": rcfg.lr, "batch_size": rcfg.batch_size} if a.recover_epochs else None}
        for info in (block_info, channel_info):
            if info is not None:
                info.update(float_bytes=dense_bytes(slim), **recovered)
        if a.target_ratio is not None:  # the ratio counts from the model the user gave, not the slimmed one
            cfg = replace(cfg, target_ratio=None, target_bytes=int(dense_bytes(model) / a.target_ratio))
    chosen = None
    if search:
        pass  # compressed by the search above
    elif a.max_drop is not None:
        result, chosen = compress_max_drop(slim, fit, val, cfg, a.arch, a.max_drop, model_spec_extra=extra_spec or None,
                                           reference=model)
    elif tune:
        result, knobs = compress_tuned(slim, fit, val, cfg, a.arch, model_spec_extra=extra_spec or None, teacher=model,
                                       select_trained=a.tune_finetuned)
    else:
        result = compress(slim, train, cfg, a.arch, model_spec_extra=extra_spec or None, teacher=model)
    size = result.compressed.save(out)
    loaded, _ = _load_lrpc(str(out), None if is_builtin_arch(a.arch) else a.arch)
    loaded = loaded.to(a.device)
    base_acc = accuracy(model, test)
    acc = accuracy(loaded, test)
    extra = {"classes": list(classes) if classes else None, "arch": a.arch, "weights": str(a.weights),
             "samples": a.samples, "seed": a.seed, "max_drop": a.max_drop, "chosen_ratio": chosen,
             "channel_pruning": channel_info, "block_pruning": block_info, "route_search": route_info,
             "tuned": knobs,
             "finetune_steps": cfg.finetune.steps(len(fit)),  # per training; --tune-finetuned trains each setting
             "finetune_recipe": ({"lr": cfg.finetune.lr, "batch_size": cfg.finetune.batch_size}
                                 if cfg.finetune.epochs else None)}
    if not a.no_speed:
        import numpy as np

        from .evaluation import cpu_description, speed_profiles
        from .report import speed_fields

        x1 = test.tensor(np.arange(1))
        # as loaded and as deployed (BatchNorm folded into the layers, in both models), timed in one alternation
        prof = speed_profiles([model, loaded, fold_batchnorm(model, x1), fold_batchnorm(loaded, x1)], x1)
        deployed = speed_fields(prof[2], prof[3])
        extra.update(speed_fields(prof[0], prof[1]), cpu=cpu_description(),
                     deployed={"batchnorm": "folded", "speedup": deployed["speedup"],
                               "latency_ms": deployed["latency_ms"]})
    rep = build_report(method=a.method, settings=cfg, baseline_accuracy=base_acc, accuracy=acc,
                       dense_bytes=dense_bytes(model), file_bytes=size, stats=result.compressed.stats(),
                       layers=result.compressed.layer_table(), seconds=time.perf_counter() - t0,
                       score_seconds=result.score_seconds, extra=extra)
    if report_path is not None:
        write_report(rep, report_path)
    print(f"wrote {out}: {size} bytes, {rep['compression_ratio']:.2f}x smaller than float32 ({rep['dense_bytes']} B); "
          f"accuracy {acc:.2f}% (baseline {base_acc:.2f}%, drop {base_acc - acc:+.2f}); "
          f"sparsity {rep['sparsity']:.1%}, mean bits {rep['mean_bits']:.2f}"
          + (f"; CPU speed-up {rep['speedup']:.2f}x at batch {rep['speedup_batch']}, "
             f"MACs {rep['macs']['compressed'] / rep['macs']['dense']:.0%} of dense; with BatchNorm folded (both models) "
             f"{rep['deployed']['speedup']:.2f}x, {rep['deployed']['latency_ms']['compressed'][str(rep['speedup_batch'])]:.1f} ms"
             if "speedup" in rep else ""))
    return 0


def _block_info(settings, bres, costs_from: str | None) -> dict:
    """The report's ``block_pruning`` for a block cut (its recovery fields are added after recovery)."""
    return {"settings": settings, "removed": bres.removed, "candidates": bres.candidates, "scores": bres.scores or None,
            "costs": bres.costs.as_dict() if bres.costs else None, "costs_from": costs_from,
            "predicted_speedup": round(bres.costs.speedup(bres.removed), 3) if bres.costs else None}


def _choose_route(a: argparse.Namespace, model, fit, val, extra_spec: dict):
    """``--speedup``: the most accurate route on the held-out images; the recovered model and its report parts."""
    from .blocks import BlockPruneConfig, load_block_costs
    from .models import is_builtin_arch
    from .routes import DEFAULT_ROUTES, RouteSearch, choose_route
    from .structured import ChannelPruneConfig

    bcfg = BlockPruneConfig(0, a.block_criterion, reference=a.block_reference, composite=a.composite, start=a.start,
                            samples=a.samples, batch_size=a.batch_size, seed=a.seed)
    ccfg = ChannelPruneConfig(0.0, a.channel_criterion, composite=a.channel_composite, reference=a.channel_reference,
                              start=a.start, scope=a.channel_scope, samples=a.samples, batch_size=a.batch_size,
                              seed=a.seed, round_to=a.channel_round_to, reconstruct=a.channel_reconstruct,
                              refit_scope=a.channel_refit)
    rcfg = _recovery(a)
    rsearch = RouteSearch(a.speedup, a.routes or DEFAULT_ROUTES, bcfg, ccfg, rcfg, cost=a.block_cost)
    given = load_block_costs(a.block_costs, a.block_cost) if a.block_costs is not None else None

    def shown(t, _) -> None:
        print(f"route channels {t.channels:g}: blocks {', '.join(t.removed) or 'none'}, "
              + (f"{t.speedup:.2f}x {a.block_cost}, {t.val_accuracy:.2f}% on held-out training images"
                 if t.eligible else t.note), flush=True)

    found = choose_route(model, fit, val, rsearch, costs=given, device=a.device, on_trial=shown)
    ch = found.chosen
    print(f"route: channels {ch.channels:g} after blocks {', '.join(ch.removed) or 'none'} "
          f"({ch.speedup:.2f}x {a.block_cost}, the most accurate of {sum(t.eligible for t in found.trials)} routes that "
          f"reached {a.speedup:g}x)")
    block_info = channel_info = None  # their recovery fields are added with the hand-made cuts'
    if found.blocks is not None:
        b = found.blocks
        if not is_builtin_arch(a.arch):
            extra_spec["removed"] = b.removed
        block_info = _block_info(replace(bcfg, speedup=ch.block_target, cost=a.block_cost), b, a.block_costs)
    if found.channels is not None:
        c = found.channels
        if not is_builtin_arch(a.arch):
            extra_spec["shapes"] = c.shapes
        channel_info = {"settings": replace(ccfg, fraction=ch.channels), "kept_fraction": c.kept_fraction,
                        "removed": {k: len(v) for k, v in c.removed.items()}, "scope_trials": None}
    route_info = {"speedup_target": a.speedup, "chosen": ch.channels, "trials": [t.as_dict() for t in found.trials],
                  "val_images": len(val), "costs": found.costs.as_dict() if found.costs else None,
                  "costs_from": a.block_costs}
    return found.model, block_info, channel_info, route_info


def _load_lrpc(path: str, arch: str | None):
    from .compress import load_compressed
    from .models import build_model
    from .packing import load_payload

    if arch is None:
        return load_compressed(path)
    payload = load_payload(path)
    from .compress import module_from_payload

    model = build_model(arch, int(payload.model.get("num_classes", 10)))
    return module_from_payload(payload, model), payload


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .data import load_data
    from .evaluation import accuracy

    model, payload = _load_lrpc(a.model, a.arch)
    data = load_data(a.data, a.split)
    classes = payload.model.get("classes")
    if classes:
        if not isinstance(classes, list) or not all(isinstance(c, int) and 0 <= c < data.num_classes for c in classes):
            raise LrpcError("the file's class list does not fit the data")
        data = data.restrict_classes(classes)
    print(f"accuracy {accuracy(model.to(a.device), data):.2f}% on {len(data)} {a.split} images")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .compress import CompressedModel
    from .packing import load_payload
    from .report import LAYER_COLUMNS, format_table, layer_rows

    payload = load_payload(a.model)
    cm = CompressedModel(payload.model, payload.tensors, payload.float_dtype, payload.metadata)
    rows = cm.layer_table()
    size = Path(a.model).stat().st_size
    if a.json:
        print(json.dumps({"model": payload.model, "file_bytes": size, "layers": rows, **cm.stats()}, indent=2))
        return 0
    st = cm.stats()
    removed = payload.model.get("removed")
    print(f"{a.model}: {size} bytes, arch {payload.model.get('arch')}, sparsity {st['sparsity']:.1%}, "
          f"mean bits {st['mean_bits']:.2f}" + (f", blocks removed: {', '.join(map(str, removed))}"
                                                 if isinstance(removed, list) and removed else ""))
    print(format_table(layer_rows(rows), LAYER_COLUMNS))
    return 0


def cmd_rules(_: argparse.Namespace) -> int:
    from .compress import METHODS
    from .rules import COMPOSITES

    print("LRP composites: " + ", ".join(COMPOSITES))
    print("methods: " + ", ".join(METHODS))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    print(run_demo(seed=a.seed, epochs=a.epochs))
    return 0


def cmd_benchmark(a: argparse.Namespace) -> int:
    import runpy

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "run_benchmark.py"
    if not script.is_file():
        raise LrpcError("benchmarks/run_benchmark.py not found: run the benchmark from a source checkout")
    sys.argv = [str(script), *a.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


COMMANDS = {"score": cmd_score, "compress": cmd_compress, "evaluate": cmd_evaluate, "inspect": cmd_inspect,
            "rules": cmd_rules, "demo": cmd_demo, "benchmark": cmd_benchmark}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings as one line on stderr; others (from torch etc.) as Python prints them."""
    if issubclass(category, LrpcWarning):
        print(f"lrpcompress: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            warnings.filterwarnings("once", category=LrpcWarning)  # advice is shown, each message once
            return COMMANDS[args.command](args)
    except LrpcError as exc:
        print(f"lrpcompress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lrpcompress: interrupted; no output was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("lrpcompress: error: out of memory; try fewer --samples or a smaller --batch-size", file=sys.stderr)
        return 1
    except Exception as exc:  # never a traceback for users; LRPC_DEBUG=1 shows it
        if os.environ.get("LRPC_DEBUG"):
            raise
        msg = " ".join(str(exc).split())[:300]
        print(f"lrpcompress: error: unexpected {type(exc).__name__}: {msg} (LRPC_DEBUG=1 shows details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
