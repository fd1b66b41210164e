"""Speed-target routes audited on the test split: which route the held-out images chose, and which was best.

For every model, class subset and seed, ``lrpcompress.routes.choose_route`` runs with the settings of
``lrpcompress compress --classes C --speedup S --recover-epochs E --seed K`` (the library defaults: blocks by the
norm, channels by LRP from the mean with the downstream refit, the recovery recipe, the CLI's held-out split of
``--val-size`` training images). Each route's recovered float model is then also evaluated on the test images of the
classes, which the choice never saw, so the page shows per run whether the chosen route was the best one on the test
split and what the choice cost against the best (the regret) and against each fixed route. Rows are appended to
``routes.json`` (a rerun of the same model, classes, target, routes, epochs and seed replaces its rows) and
``routes.md`` is rewritten from all of them.

    python benchmarks/bench_routes.py --models resnet20 --subsets "0,1,8;3,5,7" --seeds 0,1,2
    python benchmarks/bench_routes.py --report-only      # rewrite routes.md from the committed routes.json
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
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from paired import mcnemar, outcomes, unpack_correct  # noqa: E402

from lrpcompress.blocks import BlockPruneConfig  # noqa: E402
from lrpcompress.data import load_data, split_train_val  # noqa: E402
from lrpcompress.errors import LrpcError  # noqa: E402
from lrpcompress.evaluation import accuracy, cpu_line  # noqa: E402
from lrpcompress.models import load_model, restrict_classes  # noqa: E402
from lrpcompress.recovery import RECOVERY_RECIPE  # noqa: E402
from lrpcompress.report import atomic_write_bytes, table_sections, write_page  # noqa: E402
from lrpcompress.routes import DEFAULT_ROUTES, RouteSearch, choose_route  # noqa: E402
from lrpcompress.structured import ChannelPruneConfig  # noqa: E402

SHARED = ROOT.parent / "shared"


def run_key(r: dict) -> tuple:
    return (r["model"], r["classes"], r["target"], r["routes"], r["epochs"], r["seed"])


def crossed_choice(scored: list[dict], chosen: dict) -> float | None:
    """What choosing on images the pretrained model never saw would have given: the route most accurate on one half
    of the test split (even / odd images; ties to the earlier route) scored on the other half, minus the held-out
    choice on that half, averaged over both ways, in points. None without every scored route's per-image record."""
    if any(r.get("test_correct") is None for r in scored):
        return None
    right = {r["channels"]: unpack_correct(r["test_correct"]) for r in scored}
    n = min(len(v) for v in right.values())
    gain = []
    for pick_on, score_on in ((0, 1), (1, 0)):
        pick = max(right, key=lambda f: (right[f][pick_on:n:2].mean(), -f))
        gain.append(100.0 * (right[pick][score_on:n:2].mean() - right[chosen["channels"]][score_on:n:2].mean()))
    return mean(gain)


def summarize(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per run: the chosen route's test accuracy, the best route's, the regret (with McNemar's test between the two
    where rows keep per-image records); per model and classes: means, and the crossed choice on unseen images."""
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        runs.setdefault(run_key(r), []).append(r)
    per_run, groups = [], {}
    for key in sorted(runs):
        members = sorted(runs[key], key=lambda r: r["channels"])
        scored = [r for r in members if r["test_accuracy"] is not None]
        chosen = next(r for r in members if r["chosen"])
        best = max(scored, key=lambda r: r["test_accuracy"])
        dense = chosen["dense_accuracy"]
        row = {"model": key[0], "classes": key[1], "target": f"{key[2]:g}×", "seed": key[5],
               "routes (channels: held-out / test %, speed-up)": " · ".join(
                   f"{r['channels']:g}: " + (f"{r['val_accuracy']:.2f} / {r['test_accuracy']:.2f} ({r['speedup']:.2f}×)"
                                             if r["test_accuracy"] is not None else "short") for r in members),
               "chosen": f"{chosen['channels']:g}", "chosen vs dense": round(chosen["test_accuracy"] - dense, 2),
               "best on test": f"{best['channels']:g}",
               "regret": round(best["test_accuracy"] - chosen["test_accuracy"], 2)}
        if best is not chosen and best.get("test_correct") and chosen.get("test_correct"):
            a, b, p = mcnemar(unpack_correct(best["test_correct"]), unpack_correct(chosen["test_correct"]))
            row["best / chosen only, McNemar p"] = f"{a} / {b}, {p:.2g}"
        else:
            row["best / chosen only, McNemar p"] = None
        row["crossed"] = crossed_choice(scored, chosen)
        per_run.append(row)
        groups.setdefault(key[:5], []).append((row, members, dense))
    crossed = {id(r): r.pop("crossed") for r in per_run}

    def group_row(model: str, classes: str, target: float, routes: str, epochs: int, items: list) -> dict:
        fixed = {}
        for f in (float(x) for x in routes.split(",")):
            vals = [next((m["test_accuracy"] - d for m in ms if m["channels"] == f and m["test_accuracy"] is not None),
                         None) for _, ms, d in items]
            fixed[f"channels {f:g} always"] = (f"{mean(vals):+.2f}" if None not in vals else "–")
        gains = [crossed[id(r)] for r, _, _ in items]
        return {"model": model, "classes": classes, "target": f"{target:g}×", "epochs": epochs, "runs": len(items),
                "chosen: mean vs dense": f"{mean(r['chosen vs dense'] for r, _, _ in items):+.2f}",
                "best on test picked": f"{sum(r['regret'] == 0 for r, _, _ in items)} of {len(items)}",
                "mean regret": f"{mean(r['regret'] for r, _, _ in items):.2f}",
                "choice on unseen images: gain": (f"{mean(gains):+.2f}" if None not in gains else "–"), **fixed}

    summary = [group_row(*key, items) for key, items in sorted(groups.items())]
    pools: dict[tuple, list] = {}
    for (_, _, target, routes, epochs), items in sorted(groups.items()):
        pools.setdefault((target, routes, epochs), []).append(items)
    for (target, routes, epochs), parts in pools.items():
        if len(parts) > 1:  # every model and subset run with the same target, routes and epochs
            summary.append(group_row("all", "all", target, routes, epochs, [i for p in parts for i in p]))
    for row in per_run:
        row["chosen vs dense"], row["regret"] = f"{row['chosen vs dense']:+.2f}", f"{row['regret']:.2f}"
    return per_run, summary


def write(rows: list[dict], out: Path, command: str) -> None:
    atomic_write_bytes(out / "routes.json", (json.dumps(rows, indent=1) + "\n").encode())
    per_run, summary = summarize(rows)
    cpus = sorted({r["cpu"] for r in rows})
    lines = [
        "# Speed-target routes: the held-out choice audited on the test split",
        "",
        f"Last command: `{command}`. CPU: {'; '.join(cpus)}. Each run cuts every route (a fraction of the inner "
        "channels after a block cut that supplies the rest of the target; 0 = blocks alone), times it against the "
        "dense model at batch 64, recovers it and scores it on held-out training images of its classes "
        "(`lrpcompress.routes.choose_route`, the settings of `compress --speedup`); the chosen route is the most "
        "accurate there. The test accuracies (float models after recovery, the run's classes) were not seen by "
        "the choice; `regret`: the best route's test accuracy minus the chosen one's. `channels f always`: the mean "
        "over seeds of that fixed route's test accuracy minus the dense model's. `choice on unseen images: gain`: the "
        "route chosen on one half of the test split instead (images the pretrained model never saw, as a user's own "
        "data would be; the held-out training images were part of its training set), scored on the other half, minus "
        "the held-out choice there, both ways averaged, mean over seeds (– where rows keep no per-image records).",
        *table_sections({"Per model and classes": summary, "Per run": per_run}),
    ]
    write_page(out / "routes.md", lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20")
    ap.add_argument("--subsets", default="0,1,8;3,5,7", help="class subsets, ';'-separated")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--speedup", type=float, default=1.5)
    ap.add_argument("--routes", default=",".join(f"{f:g}" for f in DEFAULT_ROUTES))
    ap.add_argument("--recover-epochs", type=int, default=1)
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "routes"))
    ap.add_argument("--report-only", action="store_true", help="only rewrite routes.md from routes.json")
    args = ap.parse_args()
    command = shlex.join(["python", "benchmarks/bench_routes.py", *sys.argv[1:]])
    try:
        routes = tuple(float(f) for f in args.routes.split(","))
        args.routes = ",".join(f"{f:g}" for f in routes)
        seeds = [int(s) for s in args.seeds.split(",")]
        subsets = [[int(c) for c in s.split(",")] for s in args.subsets.split(";")]
        RouteSearch(args.speedup, routes)  # the settings are checked before any model is loaded
    except (ValueError, LrpcError) as e:
        sys.exit(f"bench_routes.py: {e}")
    shared, out = Path(args.shared), Path(args.out)
    committed = out / "routes.json"
    if args.report_only:
        if not committed.exists():
            sys.exit(f"bench_routes.py: {committed} does not exist (nothing to rewrite)")
        rows = json.loads(committed.read_text())
        write(rows, out, rows[-1]["command"] if rows else command)
        return
    if not (shared / "models").is_dir():
        sys.exit(f"bench_routes.py: the benchmark needs {shared}/models and {shared}/data (see README)")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = json.loads(committed.read_text()) if committed.exists() else []
    train_all = load_data(shared / "data" / "cifar10-jpeg", "train")
    test_all = load_data(shared / "data" / "cifar10-jpeg", "test")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    for arch in args.models.split(","):
        full = load_model(arch, shared / "models" / f"{arch}-cifar10jpeg.pt", num_classes=None)
        for classes in subsets:
            model = restrict_classes(full, classes)
            train, test = train_all.restrict_classes(classes), test_all.restrict_classes(classes)
            dense = accuracy(model, test, show_progress=False)
            for seed in seeds:
                t0 = time.perf_counter()
                fit, val = split_train_val(train, min(args.val_size, len(train) // 5), seed)
                search = RouteSearch(args.speedup, routes, BlockPruneConfig(seed=seed),
                                     ChannelPruneConfig(0.0, seed=seed),
                                     replace(RECOVERY_RECIPE, epochs=args.recover_epochs, seed=seed))
                tests: dict[float, tuple[float | None, str | None]] = {}
                found = choose_route(model, fit, val, search, on_trial=lambda t, net: tests.__setitem__(
                    t.channels, (None, None) if net is None else outcomes(net, test)))
                name = ",".join(map(str, classes))
                new = [{"model": arch, "classes": name, "target": args.speedup, "routes": args.routes,
                        "epochs": args.recover_epochs, "seed": seed, **t.as_dict(),
                        "test_accuracy": None if tests[t.channels][0] is None else round(tests[t.channels][0], 2),
                        "test_correct": tests[t.channels][1],
                        "chosen": t is found.chosen, "dense_accuracy": round(dense, 2), "val_images": len(val),
                        "cpu": cpu_line(), "date": date, "command": command} for t in found.trials]
                keys = {run_key(r) for r in new}
                rows = [r for r in rows if run_key(r) not in keys] + new
                write(rows, out, command)
                print(f"{arch} {name} seed {seed}: chose {found.chosen.channels:g} in {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr)


if __name__ == "__main__":
    main()
