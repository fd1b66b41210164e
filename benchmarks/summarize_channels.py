"""The default channel ranking against L1 and Taylor over every committed channel-cut row, pooled and tested.

Reads every ``channels.json`` that ``bench_channels.py`` wrote under ``benchmarks/results`` (no model is loaded,
nothing is trained) and pairs the library's default criterion, ``lrp_mean_down`` (LRP measured from each channel's
mean, then the downstream least-squares refit), with ``l1_down`` and ``taylor_down`` (the same refit, so the two rows
of a pair differ only in which channels were ranked lowest), and with plain ``l1`` (filter norm, no refit: what a
magnitude pruner does), wherever one page holds both rows of one run: the same model, classes, budget (inner and
stream fractions, rounding, scope), recovery epochs and recipe, cut rounds, scoring images and seed. A run measured on
two pages (a rerun in another folder) counts once, from the page read last (pages are read in path order, so
``task_steady/`` wins over the older top-level page). Per group (all 10 classes or a class subset; no recovery or
after it) and per model: the mean difference ± standard error, how many runs the default is ahead of, level with
(within 0.005) or behind, and the exact two-sided sign test over the runs. Rows keep no per-image outcomes, so there is
no per-run test here; runs of one model at several budgets are not independent, which the per-model lines show.

    python benchmarks/summarize_channels.py      # writes benchmarks/results/channels_summary.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lrpcompress.report import table_sections, write_page  # noqa: E402

from paired import TIE, run_diffs  # noqa: E402

DEFAULT = "lrp_mean_down"
BASELINES = ("l1_down", "taylor_down", "l1")


def run_key(row: dict) -> tuple:
    """What makes two rows one run apart from the criterion (``bench_channels.py``'s row key without it)."""
    return (row["model"], row["setting"], row["fraction"], row["streams"], row.get("round_to", 1),
            row.get("scope", "layer"), row["epochs"], row.get("rounds", 1), row.get("samples", 512),
            row.get("seed", 0), row.get("steps", 1), row.get("feature_distill", 0.0),
            json.dumps(row.get("recipe"), sort_keys=True))


def collect(results: Path) -> tuple[dict[tuple, dict[str, float]], dict[tuple, str]]:
    """Accuracy per run and criterion over every channels.json under ``results`` (a later page's run replaces an
    earlier page's), and the page each run was read from; ValueError naming a page that cannot be read."""
    runs: dict[tuple, dict[str, float]] = {}
    where: dict[tuple, str] = {}
    for page in sorted(results.rglob("channels.json")):
        here: dict[tuple, dict[str, float]] = {}
        try:
            for r in json.loads(page.read_text()):
                if r["criterion"] in (DEFAULT, *BASELINES):
                    here.setdefault(run_key(r), {})[r["criterion"]] = float(r["accuracy"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{page}: not a bench_channels.py page ({type(e).__name__}: {e})") from None
        for k, accs in here.items():
            if DEFAULT in accs and len(accs) > 1:
                runs[k] = accs
                where[k] = str(page.relative_to(results))
    return runs, where


def group_of(key: tuple) -> tuple[str, str]:
    task = "10 classes" if key[1] == "10 classes" else "class subset"
    return task, "no recovery" if key[6] == 0 else "after recovery"


def paired(diffs: list[float]) -> dict:
    """Mean ± s.e. of the default's lead, ahead / level / behind, and the sign test over the runs."""
    d = run_diffs(diffs)
    return {"runs": d.runs, "mean ± s.e.": f"{d.mean:+.2f}" + ("" if d.runs == 1 else f" ± {d.se:.2f}"),
            "ahead / level / behind": f"{d.ahead} / {d.level} / {d.behind}",
            "sign test p": f"{d.p:.2g}", "range": f"{d.low:+.2f} to {d.high:+.2f}"}


def tables(runs: dict[tuple, dict[str, float]]) -> tuple[list[dict], list[dict]]:
    pooled, per_model = [], []
    for base in BASELINES:
        both = {k: a[DEFAULT] - a[base] for k, a in runs.items() if base in a}
        for group in sorted({group_of(k) for k in both}, key=lambda g: (g[0] != "class subset", g[1] != "no recovery")):
            diffs = [d for k, d in both.items() if group_of(k) == group]
            pooled.append({"against": base, "task": group[0], "recovery": group[1], **paired(diffs)})
            for model in sorted({k[0] for k in both if group_of(k) == group}):
                md = [d for k, d in both.items() if group_of(k) == group and k[0] == model]
                per_model.append({"against": base, "task": group[0], "recovery": group[1], "model": model,
                                  **paired(md)})
    return pooled, per_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "channels_summary.md"))
    args = ap.parse_args()
    results = Path(args.results)
    if not results.is_dir():
        sys.exit(f"summarize_channels.py: {results} is not a folder")
    try:
        runs, where = collect(results)
    except ValueError as e:
        sys.exit(f"summarize_channels.py: {e}")
    if not runs:
        sys.exit(f"summarize_channels.py: no page under {results} holds {DEFAULT} beside a baseline")
    pooled, per_model = tables(runs)
    pages = sorted(set(where.values()))
    command = shlex.join(["python", "benchmarks/summarize_channels.py", *sys.argv[1:]])
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    lines = [
        "# Channel criteria, every committed run: the default against L1 and Taylor",
        "",
        f"Command: `{command}`; {today}. Pages read: {', '.join(f'`{p}`' for p in pages)}. Each run pairs "
        f"`{DEFAULT}` (the library default: LRP from the channel's mean + downstream refit) with a baseline measured "
        "on the same page for the same model, classes, budget, recovery epochs and recipe, scoring images and seed; "
        "`l1_down` and `taylor_down` get the same refit (only the ranking differs), plain `l1` none. Accuracy on the "
        "test split of the run's classes; differences in points, the default minus the baseline; level = within "
        f"{TIE}; sign test: exact, two-sided, over runs (budgets of one model are not independent runs).",
        *table_sections({"Pooled": pooled, "Per model": per_model}),
    ]
    write_page(Path(args.out), lines)
    print(f"wrote {args.out} ({len(runs)} runs)", file=sys.stderr)


if __name__ == "__main__":
    main()
