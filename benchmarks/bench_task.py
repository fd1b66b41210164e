"""A general model deployed for a narrower task, at equal file bytes: whole pipelines side by side.

For each class subset and size budget (R× smaller than the float32 file of the model with its head cut to
the subset), every pipeline writes a `.lrpc` file within the same cap; knobs are chosen on training images
of the subset held out from scoring (never the test split); accuracy is measured on the subset's test images
with the model loaded back from the file. Pipelines:

- ``magnitude``: magnitude pruning + uniform bits (fitted sparsity per bit-width, first/last layer at 8 bits
  or not), the best on held-out images;
- ``uniform``: uniform bits (with and without 8-bit first/last layers);
- ``gptq``: the candidates of both, rounded with GPTQ instead of to nearest (the strongest non-XAI baseline);
- ``lrp``: the default allocator and its size search, no channels removed;
- ``taylor`` / ``mse`` / ``random`` (opt-in with ``--methods``): the same allocator and search with the error
  weights tilted by gradient×weight, not tilted, or tilted by random scores (is it relevance or the
  activation-aware allocator on the subset's images that wins?); ``--power P`` scales their tilt
  (relevance per unit of activation to the power P, default 0.25; rows ``lrp power P``);
- ``l1 F`` / ``lrp F``: a fraction F of the inner channels removed (filter L1 or the default LRP channel relevance from
  the subset's images), then the same allocator and size search on the slimmer model;
- ``lrp auto`` / ``l1 auto``: what ``compress --prune-channels auto`` does — the fraction (0 or one of the F)
  most accurate on held-out images (ties to the smaller fraction).

    python benchmarks/bench_task.py                      # ResNet-20, subsets 0,1,8 and 3,4,5, 12x and 16x
    python benchmarks/bench_task.py --subsets all --budgets 16 --append
    python benchmarks/bench_task.py --budgets 16 --criteria lrp --finetune 1 --append   # + recovery rows

With ``--finetune N`` the held-out picks of every pipeline of ``--methods`` but ``uniform``, and of each
criterion's ``auto`` fraction, are also trained for N epochs through the quantizers (rows ``… +ftN``; settings
as chosen without training, except magnitude's sparsity, refitted with room for the coded size to grow;
``--finetune-scales fixed`` keeps the allocator's scales: rows ``… +ftN fixed scales``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_benchmark import (SHARED, Runner, _machine, add_finetune_recipe_options, finetune_recipe,  # noqa: E402
                           provenance, recipe_name)

from lrpcompress.compress import FINETUNE_RESERVE, compress  # noqa: E402
from lrpcompress.errors import LrpcError  # noqa: E402
from lrpcompress.evaluation import count_macs  # noqa: E402
from lrpcompress.pruning import PruneConfig  # noqa: E402
from lrpcompress.recovery import FinetuneConfig  # noqa: E402
from lrpcompress.report import markdown_table  # noqa: E402
from lrpcompress.search import ChannelSearch, compress_channel_search, fit_sparsity, with_knobs  # noqa: E402
from lrpcompress.structured import CHANNEL_CRITERIA, ChannelPruneConfig  # noqa: E402

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
REFITS = {"_refit": "readers", "_down": "downstream"}  # --criteria suffix -> refit_scope


# pipelines without channel removal: two fixed grids, then the allocator with each tilt of its error weights
METHODS = ("magnitude", "uniform", "gptq", "lrp", "taylor", "mse", "random")


def _setting(knobs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items() if k != "target_ratio")


def _measured(r: Runner, res, base: dict, budget: float, pipeline: str, example, dense_macs: int, **fields) -> dict:
    """A row for ``res``: its written file's bytes and test accuracy (``Runner.finish``) and its MACs; the
    ratio counts from the unpruned model (``finish``'s counts from the model ``res`` was made from)."""
    done = r.finish(pipeline, budget, res, {})
    assert done["file_bytes"] <= int(r.dense_bytes() / budget), (done["file_bytes"], budget)
    return dict(base, budget=budget, pipeline=pipeline, file_bytes=done["file_bytes"],
                ratio=round(r.dense_bytes() / done["file_bytes"], 3),
                macs=round(count_macs(res.compressed.to_module().to(r.device), example) / dense_macs, 3),
                accuracy=done["accuracy"], **fields)


def bench_subset(arch: str, subset: list[int] | None, args: argparse.Namespace, log, emit) -> None:
    r = Runner(arch, args, subset)
    name = "all" if subset is None else ",".join(map(str, subset))
    example = r.fit.tensor(torch.arange(1).numpy())
    dense_macs = count_macs(r.model, example)
    log(f"{arch} classes {name}: float test {r.base_test:.2f}%, held-out {r.base_val:.2f}% "
        f"({len(r.fit)} fit / {len(r.val)} held-out / {len(r.test)} test images)")
    base = {"model": arch, "classes": name, "machine": args.machine,
            **({"fit_images": len(r.fit)} if args.fit_images else {})}
    emit(dict(base, budget=1.0, pipeline="float32", file_bytes=r.dense_bytes(), ratio=1.0, macs=1.0,
              val_accuracy=round(r.base_val, 2), accuracy=round(r.base_test, 2), setting=""))
    for budget in args.budgets:
        t0 = time.perf_counter()
        measured: dict[str, dict] = {}
        chosen: dict[str, tuple] = {}  # pipeline -> (knobs, config) of its held-out pick
        picks: dict[str, float] = {}
        for method in args.methods:
            pipeline = method
            if method == "magnitude":
                cands = r.magnitude_candidates(budget)
            elif method == "uniform":
                cands = r.uniform_candidates()
            elif method == "gptq":
                cands = r.uniform_candidates("gptq") + r.magnitude_candidates(budget, method="gptq")
            else:
                cands = r.optimal_candidates(method, budget)
                if args.power is not None and method in ("lrp", "taylor", "random"):  # mse has no tilt to scale
                    pipeline = f"{method} power {args.power:g}"
                    cands = [(k, replace(c, quant=replace(c.quant, power=args.power))) for k, c in cands]
            picked = r.pick(pipeline, budget, cands)
            if picked is None:
                log(f"  {pipeline} @ {budget:g}x: no setting fits")
                continue
            row, cfg = picked
            setting = _setting(row["knobs"])
            chosen[pipeline] = (row["knobs"], cfg)
            measured[pipeline] = dict(base, budget=budget, pipeline=pipeline, file_bytes=row["file_bytes"],
                                      ratio=round(r.dense_bytes() / row["file_bytes"], 3), macs=1.0,
                                      val_accuracy=row["val_accuracy"], accuracy=row["accuracy"], setting=setting)
            emit(measured[pipeline])
            log(f"  {pipeline:9s} @ {budget:g}x: {row['accuracy']:6.2f}% (held-out {row['val_accuracy']:.2f}) "
                f"{row['file_bytes']} B {setting}")
        for criterion in args.criteria:
            found = {}
            for f in args.fractions:
                # one fraction per call, so every candidate's file is measured; the auto row is their best
                search = ChannelSearch(channel_config(criterion, args), fractions=(f,))
                try:
                    res = compress_channel_search(r.model, r.fit, r.val, replace(r.cfg("lrp"), target_ratio=budget),
                                                  arch, search, show_progress=False)
                except LrpcError as exc:
                    log(f"  {criterion} {f:g} @ {budget:g}x: {exc}")
                    continue
                trial = res.trials[f]
                row = _measured(r, res.result, base, budget, f"{criterion} {f:g}", example, dense_macs,
                                val_accuracy=round(trial["val_accuracy"], 2), setting=_setting(trial["knobs"]))
                found[f] = row
                emit(row)
                log(f"  {row['pipeline']:9s} @ {budget:g}x: {row['accuracy']:6.2f}% (held-out "
                    f"{row['val_accuracy']:.2f}) {row['file_bytes']} B, MACs {row['macs']:.0%}")
            pool = dict(found)
            if 0.0 not in pool and "lrp" in measured:  # fraction 0 is the plain lrp pipeline measured above
                pool[0.0] = measured["lrp"]
            if pool:
                pick = min(pool, key=lambda f: (-pool[f]["val_accuracy"], f))
                emit(dict(pool[pick], pipeline=f"{criterion} auto", setting=f"fraction={pick:g}; "
                          + pool[pick]["setting"]))
                picks[criterion] = pick
        if args.finetune > 0:
            finetuned(r, budget, args, base, chosen, picks, example, dense_macs, log, emit)
        log(f"  budget {budget:g}x took {time.perf_counter() - t0:.0f} s")


def finetuned(r: Runner, budget: float, args: argparse.Namespace, base: dict, chosen: dict, picks: dict,
              example, dense_macs: int, log, emit) -> None:
    """``args.finetune`` epochs of recovery through the quantizers (distillation from the float model) for the
    held-out pick of every pipeline measured without channel removal but ``uniform`` (magnitude, lrp and each
    tilt of ``--methods``: does a lead survive the same training?) and each criterion's auto fraction; the
    settings stay as chosen without it, but magnitude's sparsity (:func:`_magnitude_finetuned`)."""
    ft = FinetuneConfig(epochs=args.finetune, seed=args.seed, learn_scales=args.finetune_scales == "learned",
                        **finetune_recipe(args))
    tag = f"+ft{args.finetune}" + (" fixed scales" if args.finetune_scales == "fixed" else "")
    cap = int(r.dense_bytes() / budget)
    jobs = [(name, None, replace(cfg, finetune=ft)) for name, (_, cfg) in chosen.items() if name != "uniform"]
    for criterion, f in sorted(((c, f) for c, f in picks.items() if f > 0), key=lambda cf: cf[0] != "lrp"):
        jobs.append((f"{criterion} {f:g}", (criterion, f), replace(r.cfg("lrp"), target_ratio=budget, finetune=ft)))
    for name, channel, cfg in jobs:
        setting = "as without fine-tuning"
        if name in ("magnitude", "gptq"):
            res, cfg = _magnitude_finetuned(r, cfg, chosen[name][0], cap, log, name)
            setting = f"sparsity={cfg.prune.sparsity} (refitted with room for training)"
        elif channel is None:
            try:
                res = compress(r.model, r.fit, cfg, r.arch, scores=r.cache, show_progress=False)
            except LrpcError:  # a sparsity fitted without training's room: refit it with the room, as the CLI does
                knobs = chosen[name][0]
                s = fit_sparsity(r.model, r.fit, cfg, knobs["min_bits"], r.arch)
                cfg = with_knobs(cfg, s, knobs["min_bits"])
                res = compress(r.model, r.fit, cfg, r.arch, scores=r.cache, show_progress=False)
                setting = f"sparsity={s} (refitted with room for training)"
        else:
            search = ChannelSearch(channel_config(channel[0], args), fractions=(channel[1],))
            res = compress_channel_search(r.model, r.fit, r.val, cfg, r.arch, search, show_progress=False).result
        if res.file_bytes > cap:
            log(f"  {name} {tag} @ {budget:g}x: {res.file_bytes} B after training, over the {cap} B cap: no row")
            continue
        row = _measured(r, res, base, budget, f"{name} {tag}", example, dense_macs, val_accuracy=None,
                        setting=setting)
        row["finetune_recipe"] = recipe_name(args)
        emit(row)
        log(f"  {row['pipeline']:9s} @ {budget:g}x: {row['accuracy']:6.2f}% {row['file_bytes']} B")


def _magnitude_finetuned(r: Runner, cfg, knobs: dict, cap: int, log, method: str = "magnitude"):
    """Magnitude pruning + uniform bits (``method``'s rounding), trained, under ``cap``. Training moves the entropy-coded size and a
    fixed grid has no allocator to take bytes back, so the pick's sparsity is refitted with the room the
    allocator gets (FINETUNE_RESERVE); if the trained file still overflows, once more with the room that
    overflow measured (ResNet-20, 10 classes, 16x: +3.4%). Returns the result and its config."""
    probe = r.with_quant(method, knobs["bits"], keep_edges="edges" in knobs)

    def trained(room: float):
        fit_to = int(cap * (1 - room))
        s = fit_sparsity(r.model, r.fit, probe, knobs["bits"], r.arch, target_bytes=fit_to)
        c = replace(cfg, prune=PruneConfig("fraction", s))
        return compress(r.model, r.fit, c, r.arch, scores=r.cache, show_progress=False), c, fit_to

    res, c, fit_to = trained(FINETUNE_RESERVE)
    if res.file_bytes > cap:
        grown = res.file_bytes / fit_to - 1
        log(f"  {method} trained at {c.prune.sparsity:.1%} sparsity grew {grown:.1%} to {res.file_bytes} B "
            f"(cap {cap}): refitting with {grown + 0.005:.1%} room")
        res, c, _ = trained(grown + 0.005)
    return res, c


def write(rows: list[dict], out: Path, commands: list[str], started: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "task.json").write_text(json.dumps(rows, indent=1) + "\n")
    title = "A general model deployed for a narrower task: pipelines at equal file bytes"
    lines = provenance(title, commands, started, rows) + [
             "Head cut to the classes; budget R× caps every file at (float32 bytes of that model)/R; knobs and the "
             "`auto` fraction chosen on held-out training images of those classes; accuracy on their test images, "
             "measured on the model loaded back from the written `.lrpc` file; no fine-tuning except in `+ftN` rows. "
             "`macs`: multiply-accumulates of the file's model over the dense model's. Pipelines: see "
             "`benchmarks/bench_task.py`.", ""]
    cols = (("pipeline", "pipeline"), ("file_bytes", "file bytes"), ("ratio", "ratio"), ("macs", "MACs"),
            ("val_accuracy", "held-out %"), ("accuracy", "test %"), ("setting", "chosen setting"),
            ("finetune_recipe", "recovery"))
    for key in dict.fromkeys((r["model"], r["classes"]) for r in rows):
        group = [r for r in rows if (r["model"], r["classes"]) == key]
        fl = next((r for r in group if r["pipeline"] == "float32"), None)
        names = "all 10 classes" if key[1] == "all" else \
            ", ".join(CLASS_NAMES[int(c)] for c in key[1].split(","))
        few = f", {group[0]['fit_images']} training images" if "fit_images" in group[0] else ""
        lines += [f"## {key[0]}, {names}{few}" + (f" (float32 {fl['accuracy']:.2f}%)" if fl else ""), ""]
        for budget in sorted({r["budget"] for r in group if r["pipeline"] != "float32"}):
            lines += [f"### {budget:g}×", "", markdown_table([r for r in group if r["budget"] == budget], cols), ""]
    (out / "task.md").write_text("\n".join(lines))


def channel_config(criterion: str, args: argparse.Namespace) -> ChannelPruneConfig:
    """A channel criterion of ``--criteria``: ``lrp``, ``l1``, ... cut with mean compensation only (as the committed
    rows before 2026-12-01 were measured); ``lrp_refit``, ``l1_refit``, ...: then the least-squares refit of the
    layers that lost inputs; ``lrp_down``, ...: of every layer from the first of those on (the library's default)."""
    base, how = split_criterion(criterion)
    return ChannelPruneConfig(0.0, base, samples=args.samples, seed=args.seed, reconstruct=how is not None,
                              refit_scope=how or "downstream")


def split_criterion(name: str) -> tuple[str, str | None]:
    """``lrp_refit`` -> (``lrp``, ``readers``), ``lrp_down`` -> (``lrp``, ``downstream``), ``lrp`` -> (``lrp``, None)."""
    for suffix, scope in REFITS.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), scope
    return name, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20")
    ap.add_argument("--subsets", default="0,1,8;3,4,5", help="';'-separated: 'all' or comma lists")
    ap.add_argument("--budgets", default="12,16")
    ap.add_argument("--methods", default="magnitude,uniform,lrp",
                    help="pipelines without channel removal: magnitude, uniform, or an allocator method "
                         "(lrp, taylor, mse, random)")
    ap.add_argument("--power", type=float, default=None,
                    help="exponent of the relevance tilt of the allocator pipelines (default: the method's, 0.25); "
                         "rows are named e.g. 'lrp power 0.5'")
    ap.add_argument("--criteria", default="l1,lrp",
                    help="channel criteria of the channel pipelines ('' for none; lrp_refit, l1_refit, ...: with the "
                         "least-squares refit of the layers that lost inputs; lrp_down, ...: of every later layer too)")
    ap.add_argument("--fractions", default="0.3,0.5", help="inner-channel fractions of the channel pipelines")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--val-size", type=int, default=1500, help="held-out training images (of the subset)")
    ap.add_argument("--fit-images", type=int, default=None,
                    help="use only this many of the other training images (class-balanced) for scoring, "
                         "calibration and fine-tuning: a user with little data of their own")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetune", type=int, default=0,
                    help="also fine-tune the picks of --methods (but uniform) and of each criterion's auto fraction "
                         "for this many epochs")
    ap.add_argument("--finetune-scales", default="learned", choices=("learned", "fixed"),
                    help="fine-tuning learns the quantizer scales (LSQ, the default) or keeps them")
    add_finetune_recipe_options(ap)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--append", action="store_true", help="keep the rows of task.json this run does not measure")
    args = ap.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown --methods {','.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.fit_images is not None and args.fit_images < 1:
        ap.error(f"--fit-images must be >= 1, got {args.fit_images}")
    if args.power is not None and not args.power >= 0:
        ap.error(f"--power must be >= 0, got {args.power}")
    args.criteria = [c for c in args.criteria.split(",") if c]
    bad = [c for c in args.criteria if split_criterion(c)[0] not in CHANNEL_CRITERIA]
    if bad:
        ap.error(f"unknown --criteria {','.join(bad)}; choose from {', '.join(CHANNEL_CRITERIA)} "
                 "(each optionally with _refit or _down)")
    args.fractions = [float(f) for f in args.fractions.split(",") if f]
    args.machine = _machine(args.device)
    subsets = [None if s == "all" else [int(c) for c in s.split(",")] for s in args.subsets.split(";")]
    out = Path(args.out)
    rows: list[dict] = json.loads((out / "task.json").read_text()) if args.append and (out / "task.json").exists() else []
    command = shlex.join(["python", "benchmarks/bench_task.py", *sys.argv[1:]])
    commands = sorted({r.get("command", "") for r in rows} - {""})
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    log = lambda s: print(s, flush=True)  # noqa: E731

    def emit(row: dict) -> None:
        def key(x: dict) -> tuple:  # a fine-tuned row trained with another recipe sits beside this one
            return x["model"], x["classes"], x["budget"], x["pipeline"], x.get("finetune_recipe")

        rows[:] = [x for x in rows if key(x) != key(row)]
        rows.append(dict(row, command=command))
        write(rows, out, sorted(set(commands) | {command}), started)

    torch.manual_seed(args.seed)
    for arch in args.models.split(","):
        for subset in subsets:
            bench_subset(arch, subset, args, log, emit)
    log(f"wrote {out}/task.md and task.json")


if __name__ == "__main__":
    main()
