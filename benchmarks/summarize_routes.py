"""The route chosen for a speed target on held-out images, against the fixed routes, per run.

Reads every ``compress`` report (``cli_*.json``) under ``benchmarks/results`` (no model is loaded, nothing is trained)
and puts each run of ``--speedup S`` (a ``route_search`` in its report: every route's speed-up and held-out accuracy,
the route kept) beside the fixed routes measured through the same CLI for the same model, classes, seed, recovery
epochs and file settings: blocks alone to S (``--block-speedup S``, the default block criterion, no channels) and the
composition of issue 7's 3-class runs (``--block-speedup 1.15 --prune-channels 0.5``, the default channel criterion).
Accuracy and speed-up are the test split's and the final file's; the fixed runs recovered on all training images of
the classes, the chooser's routes on all but its held-out ones. Per model and classes: the means over the seeds
present in each column.

    python benchmarks/summarize_routes.py      # writes benchmarks/results/routes_summary.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lrpcompress.report import table_sections, write_page  # noqa: E402

COMPOSITION = (1.15, 0.5)  # block target, channel fraction of the fixed composition


def _file_key(rep: dict) -> tuple:
    """What must match between a routed run and a fixed one apart from the cut."""
    q = rep["settings"]["quant"]
    recover = next((p.get("recover_epochs") for p in (rep.get("block_pruning"), rep.get("channel_pruning")) if p),
                   None)
    return (rep["arch"], tuple(rep["classes"] or ()), rep["seed"], recover, rep["method"], q["bits"],
            q["allocation"])


def kind(rep: dict) -> str | None:
    """``routed``, ``depth@S`` (blocks alone to target S, default criterion), ``composition`` or None (other cuts)."""
    if rep.get("route_search"):
        return "routed"
    b, c = rep.get("block_pruning"), rep.get("channel_pruning")
    if not b or b["settings"].get("speedup") is None or b["settings"]["criterion"] != "norm" or b["settings"]["steps"] != 1:
        return None
    if c is None:
        return f"depth@{b['settings']['speedup']:g}"
    s = c["settings"]
    if ((b["settings"]["speedup"], s["fraction"]) == COMPOSITION and s["criterion"] == "lrp"
            and s["reference"] == "mean" and s["stream_fraction"] == 0 and s["scope"] == "layer"):
        return "composition"
    return None


def collect(results: Path) -> tuple[list[dict], dict[tuple, dict]]:
    """Routed reports, and fixed ones by (file key, kind); ValueError naming a report that cannot be read."""
    routed, fixed = [], {}
    for path in sorted(results.rglob("cli_*.json")):
        try:
            rep = json.loads(path.read_text())
            k = kind(rep)
            key = _file_key(rep) if k else None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a compress report ({type(e).__name__}: {e})") from None
        if k == "routed":
            routed.append({"path": str(path.relative_to(results)), **rep})
        elif k:
            fixed[(key, k)] = rep
    return routed, fixed


def change(rep: dict | None) -> float | None:
    """File accuracy minus the dense model's on the same test images, in points (negative: a loss)."""
    return None if rep is None else round(rep["accuracy"] - rep["baseline_accuracy"], 2)


def rows(routed: list[dict], fixed: dict[tuple, dict]) -> tuple[list[dict], list[dict]]:
    per_run, groups = [], {}
    for rep in sorted(routed, key=lambda r: (r["arch"], r["classes"] or [], r["route_search"]["speedup_target"],
                                             r["seed"])):
        info, key = rep["route_search"], _file_key(rep)
        target = info["speedup_target"]
        depth, comp = fixed.get((key, f"depth@{target:g}")), fixed.get((key, "composition"))
        tried = " / ".join(f"{t['channels']:g}: " + (f"{t['val_accuracy']:.2f} ({t['speedup']:.2f}×)"
                                                      if t["val_accuracy"] is not None else "–")
                           for t in info["trials"])
        row = {"model": rep["arch"], "classes": ",".join(map(str, rep["classes"] or [])) or "all",
               "target": f"{target:g}×", "seed": rep["seed"], "routes (channels: held-out %, speed-up)": tried,
               "chosen": f"{info['chosen']:g}", "test %": f"{rep['accuracy']:.2f}", "vs dense": change(rep),
               "speed-up": rep.get("speedup"), f"blocks alone to {target:g}×: vs dense": change(depth),
               "1.15× blocks + 50% channels: vs dense": change(comp)}
        per_run.append(row)
        groups.setdefault((row["model"], row["classes"], row["target"]), []).append((row, depth, comp))
    summary = []
    for (model, classes, target), members in groups.items():
        def avg(vals: list) -> str:
            vals = [v for v in vals if v is not None]
            return "–" if not vals else f"{mean(vals):+.2f} ({len(vals)})"

        summary.append({"model": model, "classes": classes, "target": target,
                        "chooser: mean vs dense (runs)": avg([r["vs dense"] for r, _, _ in members]),
                        "chooser: slowest speed-up": min(r["speed-up"] for r, _, _ in members
                                                         if r["speed-up"] is not None) if any(
                            r["speed-up"] is not None for r, _, _ in members) else None,
                        "blocks alone, same seeds": avg([change(d) for _, d, _ in members]),
                        "composition, same seeds": avg([change(c) for _, _, c in members])})
    for row in per_run:  # shown as changes with their sign, as the summary's means are
        for k in [k for k in row if k == "vs dense" or k.endswith(": vs dense")]:
            row[k] = None if row[k] is None else f"{row[k]:+.2f}"
    return per_run, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "routes_summary.md"))
    args = ap.parse_args()
    results = Path(args.results)
    if not results.is_dir():
        sys.exit(f"summarize_routes.py: {results} is not a folder")
    try:
        routed, fixed = collect(results)
    except ValueError as e:
        sys.exit(f"summarize_routes.py: {e}")
    if not routed:
        sys.exit(f"summarize_routes.py: no report under {results} holds a route_search (compress --speedup)")
    per_run, summary = rows(routed, fixed)
    command = shlex.join(["python", "benchmarks/summarize_routes.py", *sys.argv[1:]])
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    cpus = sorted({r["cpu"]["model"] for r in routed if r.get("cpu")})
    read = ", ".join(f"`{r['path']}`" for r in routed)
    lines = [
        "# Speed targets: the route chosen on held-out images against the fixed routes",
        "",
        f"Command: `{command}`; {today}. Reports read: {read}, and the fixed "
        "runs beside them. Each routed run (`compress --speedup S`) cut every route (a channel fraction after a block "
        "cut supplying the rest of S), timed it on the CPU, recovered it and scored it on held-out training images of "
        "its classes; the most accurate route that reached S was written. `vs dense`: file minus dense accuracy on "
        "the test split of the run's classes, in points; `speed-up`: the final file against the dense model at batch 64 "
        "(CPU: " + (", ".join(cpus) or "not recorded") + "). The fixed columns are runs of the same model, classes, "
        "seed, recovery epochs and bits with a fixed cut: blocks alone (`--block-speedup S`) and 1.15× of blocks + "
        "50% of the inner channels; – where that run was not made.",
        *table_sections({"Per model and classes": summary, "Per run": per_run}),
    ]
    write_page(Path(args.out), lines)
    print(f"wrote {args.out} ({len(routed)} routed runs)", file=sys.stderr)


if __name__ == "__main__":
    main()
