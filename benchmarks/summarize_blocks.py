"""One table of every committed block-cut run: each criterion at its library default, per model, budget and seed.

Reads the ``.json`` pages that ``bench_blocks.py`` wrote under ``benchmarks/results`` (no model is loaded, nothing is
trained), keeps the runs on all 10 classes (or on ``--classes``) with the default scoring settings and recovery
epochs, and lines up, for every (model, blocks, seed): LRP scored once, LRP rescored between rounds (``--steps``), the
norm, L1 and Taylor, each as test accuracy after recovery and speed-up at batch 64. One cut has one speed-up: the
median over every page of that model (and classes) whose rows removed the same blocks, whatever chose them, since one
cut timed in different runs varies by more than the cuts compared differ (2.19-2.72x for one ResNet-20 cut). A page
counts for a criterion only where the criterion ran at its library default (``--reference library``, or ``mean`` for
lrp and taylor, ``zero`` for the norm). Runs with ``--spread`` (at most ceil(k / stages) blocks from one stage) get
columns of their own, ``<criterion> spread``. A paired table tests the criteria against each other over the runs (mean
± standard error, exact sign test) and, where pages keep each test image's outcome (``bench_blocks.py`` since
2026-12-07), per run with McNemar's exact test; a second one repeats LRP's lines against L1, Taylor and the norm for
each (model, blocks) on its own.

    python benchmarks/summarize_blocks.py                      # writes benchmarks/results/blocks_summary.md
    python benchmarks/summarize_blocks.py --classes 0,1,8 --epochs 1 --out benchmarks/results/blocks_task_summary.md
    python benchmarks/summarize_blocks.py --speed-targets --out benchmarks/results/blocks_speed_summary.md

``--speed-targets``: the pages run with ``--speedup S`` (every criterion cut to one CPU speed target) instead of
those run with a block count; the ``target`` column takes the place of ``blocks``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

sys.path.insert(0, str(ROOT / "benchmarks"))

from lrpcompress.blocks import BlockPruneConfig  # noqa: E402
from lrpcompress.errors import LrpcError  # noqa: E402
from lrpcompress.report import markdown_table, write_page  # noqa: E402

from bench_blocks import block_configs, build_parser, page_options, read_page  # noqa: E402
from paired import mcnemar, run_diffs, unpack_correct  # noqa: E402

CRITERIA = ("lrp", "norm", "l1", "taylor")
COLUMNS = ("lrp", "lrp rounds", "norm", "l1", "taylor")  # always shown; "<column> spread" where such runs exist
# (column, against): the comparisons the paired table gives, where both columns have runs of one seed
COMPARISONS = (("lrp", "norm"), ("lrp", "l1"), ("lrp", "taylor"), ("lrp rounds", "lrp"), ("lrp rounds", "norm"),
               ("lrp rounds", "l1"), ("lrp rounds", "taylor"), ("lrp spread", "lrp"), ("norm spread", "norm"),
               ("lrp spread", "norm"))
BY_BUDGET = (("lrp", "l1"), ("lrp", "taylor"), ("lrp", "norm"))  # issue 7: LRP ahead of L1 and Taylor at every budget
PER_IMAGE = "per-image tests: ahead / behind at p < 0.05"  # a column only where pages keep per-image outcomes


def compared(s: argparse.Namespace, ap: argparse.ArgumentParser) -> bool:
    """Whether a page (its parsed options ``s``; ``ap``: bench_blocks.py's parser) ran at the scoring defaults this
    table compares."""
    return all(getattr(s, k) == ap.get_default(k) for k in ("samples", "composite", "val_size"))


def cut_of(row: dict) -> tuple[str, ...]:
    """The blocks a page's row removed, sorted: the same cut whichever criterion or run chose it."""
    return tuple(sorted(row["removed"].split(", ")))


def model_labels(pages: list[tuple[str, str | None]]) -> dict[tuple[str, str | None], str]:
    """A row label per (arch, weights file): the arch alone, and the file's name beside it where one arch was run
    from more than one checkpoint (two trained ResNet-32s are two models, not two seeds of one)."""
    files: dict[str, set] = {}
    for arch, weights in pages:
        files.setdefault(arch, set()).add(weights)
    return {(arch, w): arch if len(files[arch]) == 1 else f"{arch} ({Path(w).name if w else 'shared'})"
            for arch, w in pages}


def on_front(acc: float, speed: float, points: list[tuple[float, float]]) -> bool:
    """Whether (accuracy, speed-up) is on the front of ``points``: no other point is both at least as accurate and at
    least as fast (an identical point does not count against it)."""
    return not any(a >= acc and s >= speed and (a, s) != (acc, speed) for a, s in points)


def steady_timing(page: dict) -> bool:
    """Whether a page's CPU times were taken with freed memory kept for reuse (``steady_allocator``, jemalloc,
    tcmalloc; pages since 2026-12-07 name their allocator) rather than under glibc's defaults, which page-fault the
    wide early blocks' activations in on every pass and so overstate what removing those blocks saves
    (FINDINGS §26)."""
    return page.get("cpu", {}).get("allocator", "glibc") != "glibc"


def page_budget(s: argparse.Namespace, steady: bool = True) -> int | str:
    """A page's budget: its block count, or its speed target as text (``1.75x``) for pages run with ``--speedup``;
    a CPU target measured under glibc's default malloc (``steady`` false) reads ``1.75x (glibc default)``: the same
    number asked for fewer blocks there."""
    if s.speedup is not None:
        return f"{s.speedup:g}x" + ("" if s.cost == "cpu" else f" {s.cost}") + (
            " (glibc default)" if s.cost == "cpu" and not steady else "")
    return 3 if s.blocks is None else s.blocks


def collect(results: Path, epochs: int, classes: str | None = None,
            speed_targets: bool = False) -> tuple[dict, dict]:
    """{(model, budget, seed): {column: row}} and {model: dense test accuracy} from every block page with a block
    count (``speed_targets``: with a speed target instead). A row's speed is its cut's: the median speed-up over every
    page of that checkpoint and classes that removed the same blocks (any budget, epochs or criterion) and was timed
    under the same kind of allocator (:func:`steady_timing`)."""
    cells: dict[tuple[str, int, int], dict[str, dict]] = {}
    dense: dict[str, float] = {}
    pages = []
    timed: dict[tuple, list[float]] = {}  # (checkpoint, cut, steady): the speed-ups of the runs that cut it
    parser = build_parser()
    for path in sorted(results.rglob("blocks*.json")):
        page = read_page(path)
        s = page_options(page["command"], str(path), parser)
        if s.classes != classes:
            continue
        checkpoint = (s.arch, dict(s.weights or []).get(s.arch))
        steady = steady_timing(page)
        for row in page["rows"]:
            if row["criterion"] != "dense":
                timed.setdefault((checkpoint, cut_of(row), steady), []).append(row["speed-up"])
        if compared(s, parser) and s.epochs == epochs and (s.speedup is not None) == speed_targets:
            pages.append((path, s, page, checkpoint, steady))
    labels = model_labels([checkpoint for *_, checkpoint, _ in pages])
    for path, s, page, checkpoint, steady in pages:
        model = labels[checkpoint]
        key = (model, page_budget(s, steady), s.seed)
        configs = block_configs(s, list(CRITERIA))  # what the page ran each criterion with
        for row in page["rows"]:
            if row["criterion"] == "dense":
                dense[model] = row["test"]
                continue
            packed = page.get("test_correct", {}).get(row["criterion"])  # pages since 2026-12-07 keep it
            correct = None if packed is None else unpack_correct(packed)  # one record for every criterion of the row
            for crit in row["criterion"].split(", "):
                if crit not in configs or configs[crit].reference != BlockPruneConfig(1, crit).reference:
                    continue  # a criterion off its library default reference
                if crit != "lrp" and s.steps > 1:
                    continue  # other criteria in rounds are not a library default either
                column = ("lrp rounds" if s.steps > 1 else crit) + (" spread" if s.spread else "")
                times = timed[(checkpoint, cut_of(row), steady)]
                entry = {"test": row[f"test + {epochs} ep"], "speed": statistics.median(times), "timed": len(times),
                         "removed": row["removed"], "page": str(path.relative_to(results))}
                if correct is not None:
                    entry["correct"] = correct
                cells.setdefault(key, {}).setdefault(column, entry)
    return cells, dense


def pairs(cells: dict, col: str, base: str) -> list[tuple[dict, dict]]:
    """(``col``'s entry, ``base``'s entry) in every (model, blocks, seed) that has both."""
    return [(c[col], c[base]) for c in cells.values() if col in c and base in c]


def paired_row(cells: dict, col: str, base: str) -> dict | None:
    """One line of the paired table: ``col`` against ``base`` over every run of one seed that has both."""
    both = pairs(cells, col, base)
    if not both:
        return None
    d = run_diffs([a["test"] - b["test"] for a, b in both])
    speed = [a["speed"] - b["speed"] for a, b in both]
    return {"comparison": f"{col} − {base}", "runs": d.runs, "mean": f"{d.mean:+.2f}",
            "± s.e.": "–" if d.se != d.se else f"{d.se:.2f}",
            "ahead / level / behind": f"{d.ahead} / {d.level} / {d.behind}",
            "range": f"{d.low:+.2f} to {d.high:+.2f}", "sign test p": f"{d.p:.3f}",
            "speed-up difference": f"{statistics.fmean(speed):+.2f}×", **per_image(both)}


def budget_rows(cells: dict, budget: str = "blocks") -> list[dict]:
    """The paired lines of :data:`BY_BUDGET` for each (model, blocks) on its own: is the first column ahead at every
    budget, not only pooled."""
    rows = []
    for model, k in sorted({key[:2] for key in cells}):
        mine = {key: c for key, c in cells.items() if key[:2] == (model, k)}
        for col, base in BY_BUDGET:
            r = paired_row(mine, col, base)
            if r:
                rows.append({"model": model, budget: k, **r})
    return rows


def per_image(both: list[tuple[dict, dict]]) -> dict:
    """Where both runs of a pair kept their test images' outcomes: in how many runs McNemar's test puts the first ahead
    or behind at p < 0.05 (the test images' noise alone, for that pair of trained models)."""
    tests = [mcnemar(a["correct"], b["correct"]) for a, b in both if "correct" in a and "correct" in b]
    if not tests:
        return {}
    ahead = sum(p < 0.05 and a > b for a, b, p in tests)
    behind = sum(p < 0.05 and a < b for a, b, p in tests)
    return {PER_IMAGE: f"{ahead} / {behind} of {len(tests)}"}


def noise_line(dense: dict[str, float], classes: str | None) -> str:
    """How far one test accuracy moves by chance: the binomial standard error on CIFAR-10's test images."""
    n = 1000 * len(classes.split(",")) if classes else 10000  # CIFAR-10: 1,000 test images per class
    accs = [a / 100 for a in dense.values() if a == a]
    if not accs:
        return ""
    se = [100 * (p * (1 - p) / n) ** 0.5 for p in (min(accs), max(accs))]
    return (f"Noise: one test accuracy on these {n:,} images has a binomial standard error of about "
            f"±{max(se):.2f} points at the dense accuracies here, so a gap of a few tenths between two columns of one "
            "row is within chance for two independent accuracies; cuts of one seed share the test images, which makes "
            "their difference less noisy than that: the paired table below measures it over the runs.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--epochs", type=int, default=2, help="recovery epochs of the runs compared")
    ap.add_argument("--classes", default=None, help="the runs on this class subset, as the pages give it (e.g. 0,1,8)")
    ap.add_argument("--speed-targets", action="store_true",
                    help="the pages run with --speedup (one CPU speed target per run) instead of a block count")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "blocks_summary.md"))
    args = ap.parse_args()
    results = Path(args.results)
    if not results.is_dir():
        ap.error(f"no results folder at {results}")
    try:
        cells, dense = collect(results, args.epochs, args.classes, args.speed_targets)
    except LrpcError as e:
        ap.error(str(e))
    budget = "target" if args.speed_targets else "blocks"
    if not cells:
        ap.error(f"no bench_blocks.py pages with {args.epochs} recovery epochs"
                 f"{' and a --speedup target' if args.speed_targets else ''}"
                 f"{f' on classes {args.classes}' if args.classes else ''} under {results}")

    present = {col for c in cells.values() for col in c}
    columns = [col for base in COLUMNS for col in (base, f"{base} spread") if col in COLUMNS or col in present]

    def fmt(e: dict | None) -> str:
        return "–" if e is None else f"{e['test']:.2f} ({e['speed']:.2f}×)"

    rows = []
    for (arch, k, seed), c in sorted(cells.items()):
        row = {"model": arch, budget: k, "seed": seed, **{col: fmt(c.get(col)) for col in columns}}
        lrp, rounds = c.get("lrp"), c.get("lrp rounds")
        row["rounds − one pass"] = f"{rounds['test'] - lrp['test']:+.2f}" if lrp and rounds else "–"
        others = [e["test"] for col, e in c.items() if not col.startswith("lrp")]
        best = max([e["test"] for col, e in c.items() if col.startswith("lrp")], default=None)
        row["best lrp − best other"] = f"{best - max(others):+.2f}" if best is not None and others else "–"
        rows.append(row)

    means = []
    for arch, k in sorted({(a, b) for a, b, _ in cells}):
        seeds = sorted(s for a, b, s in cells if (a, b) == (arch, k))
        row = {"model": arch, budget: k, "dense": dense.get(arch, float("nan"))}
        for col in columns:
            got = [cells[(arch, k, s)][col]["test"] for s in seeds if col in cells[(arch, k, s)]]
            row[col] = f"{statistics.fmean(got):.2f} (n={len(got)})" if got else "–"
        means.append(row)

    front = []
    for arch in sorted({a for a, _, _ in cells}):
        points = []
        for k in sorted({b for a, b, _ in cells if a == arch}):
            seeds = [s for a, b, s in cells if (a, b) == (arch, k)]
            for col in columns:
                got = [cells[(arch, k, s)][col] for s in seeds if col in cells[(arch, k, s)]]
                if got:
                    points.append((col, k, statistics.fmean(e["test"] for e in got),
                                   statistics.fmean(e["speed"] for e in got), len(got)))
        pairs = [(a2, s2) for _, _, a2, s2, _ in points]
        for col, k, acc, speed, n in sorted(points, key=lambda p: -p[3]):
            front.append({"model": arch, "criterion": col, budget: k, "speed-up": f"{speed:.2f}×",
                          "test": f"{acc:.2f} (n={n})", "on the front": "yes" if on_front(acc, speed, pairs) else "–"})

    cmd = shlex.join(["python", "benchmarks/summarize_blocks.py", *sys.argv[1:]])
    lines = [
        "# Block cuts: every committed run side by side", "",
        f"Command: `{cmd}` (reads the `blocks*.json` pages under `benchmarks/results`; nothing is run). "
        f"{f'Classes {args.classes} (test images of those classes)' if args.classes else 'All 10 classes'}, "
        f"{args.epochs} epoch(s) of RECOVERY_RECIPE, 512 scoring images, 2,000 held out; each criterion at its library "
        "default (lrp and taylor from the mean change, the norm from zero); `lrp rounds` is lrp with "
        + ("`--steps` > 1 (each round a 1/steps share of the target's saving, the rest rescored on the cut model in "
           "between; the page names its steps)" if args.speed_targets else
           "`--steps` = blocks (rescored on the cut model after each block)")
        + ". Cells: test accuracy after recovery (%) and the cut's speed-up at batch 64: one per cut, the median over "
        "every run of this model that removed the same blocks (each run times its cuts against the dense model in one "
        "alternation; one cut timed in different runs varies by ±0.1× and more), over the runs timed under the same "
        "kind of allocator: pages from before 2026-12-07 ran under glibc's default malloc, which overstates cuts of "
        "the wide early blocks by up to 30% (docs/FINDINGS.md §26), and their speed targets read "
        "`(glibc default)`. "
        "The seed draws the "
        "scoring images, the held-out split and the training order; rows of one seed are paired."
        + (" `<criterion> spread`: the same criterion with `--spread` (at most ceil(k / stages) blocks from one "
           "stage)." if len(columns) > len(COLUMNS) else ""), "",
        markdown_table(rows, [(k, k) for k in rows[0]]), "",
        "## Means over the seeds run", "",
        markdown_table(means, [(k, k) for k in means[0]]), "",
        noise_line(dense, args.classes), "",
    ]
    lines += ["## Speed against accuracy", "",
              "Per model, every criterion and block count (means over the seeds run): a cut is on the front when no "
              "other cut of that model is both at least as fast and at least as accurate. Each cut's speed-up is the "
              "median of its runs (above); `retime_blocks.py` times every cut in one alternation instead.", "",
              markdown_table(front, [(k, k) for k in front[0]]), ""]
    comparisons = [r for r in (paired_row(cells, col, base) for col, base in COMPARISONS) if r]
    if comparisons:
        lines += ["## Criteria against each other, paired by seed", "",
                  "Each line pools every (model, blocks, seed) where both columns ran: the mean difference in test "
                  "accuracy (points) with its standard error over those runs (which holds the seed's noise and the "
                  "test images' together), how often the first column is ahead, and the exact two-sided sign test: "
                  "the chance of a split at least that lopsided if neither criterion were better (ties dropped). "
                  "Runs of different models and budgets are pooled, so a small p says the first column tends to win "
                  "a run, not by how much on any one model. Speed-up difference: mean over the same runs."
                  + (" Per-image tests (runs whose pages keep each test image's outcome): McNemar's exact test on the "
                     "images only one of the two cuts gets right, per run."
                     if any(PER_IMAGE in r for r in comparisons) else ""), "",
                  markdown_table(comparisons, [(k, k) for k in dict.fromkeys(k for r in comparisons for k in r)]),
                  ""]
    by_budget = budget_rows(cells, budget)
    if by_budget:
        lines += ["## The same, per model and budget", "",
                  "LRP against L1, Taylor and the norm within each (model, blocks): the same columns over that budget's "
                  "seeds only. With four runs or fewer the sign test cannot fall below 0.125, so the mean and its "
                  "standard error (and McNemar per run, where pages keep per-image outcomes) carry these lines.", "",
                  markdown_table(by_budget, [(k, k) for k in dict.fromkeys(k for r in by_budget for k in r)]), ""]
    write_page(args.out, lines)


if __name__ == "__main__":
    main()
