"""The benchmark scripts: bad settings give an argparse error naming the fix (no traceback, no page); the block
summary pairs runs and tests their differences."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, make_npz_folder

sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts' helpers are imported by some tests below


def bench(script: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def assert_argparse_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert ": error:" in last and pattern in last, last


@pytest.fixture()
def shared_dir(tmp_path: Path, resnet20_weights: Path) -> tuple[Path, Path]:
    make_npz_folder(tmp_path / "shared" / "data" / "cifar10-jpeg")
    return tmp_path / "shared", resnet20_weights


@pytest.mark.parametrize("args, message", [
    (("--steps", 0), "steps must be an int >= 1"),
    (("--blocks", 2, "--steps", 3), "use steps <= count"),
    (("--criteria", "norm,bogus"), "unknown criterion 'bogus'"),
    (("--blocks", 2, "--speedup", 2.0), "give --blocks or --speedup, not both"),
    (("--speedup", 1.0), "a number above 1"),
    (("--speedup", 2.0, "--spread"), "not by stage: drop spread"),
])
def test_bench_blocks_rejects_bad_settings_before_loading(tmp_path, args, message):
    out = tmp_path / "page.md"
    proc = bench("bench_blocks.py", "--shared", tmp_path / "missing", *args, "--out", out)
    assert_argparse_error(proc, message)
    assert not out.exists()


def test_bench_blocks_rejects_more_blocks_than_the_model_has(tmp_path, shared_dir):
    shared, weights = shared_dir
    out = tmp_path / "page.md"
    proc = bench("bench_blocks.py", "--shared", shared, "--weights", f"resnet20={weights}", "--blocks", 8,
                 "--epochs", 0, "--out", out)
    assert_argparse_error(proc, "cannot remove 8 blocks: the model has 7 removable blocks")
    assert not out.exists()


def test_bench_blocks_cuts_every_criterion_to_one_speed_target(tmp_path, shared_dir):
    shared, weights = shared_dir
    out = tmp_path / "page.md"
    proc = bench("bench_blocks.py", "--shared", shared, "--weights", f"resnet20={weights}", "--speedup", 1.3,
                 "--cost", "macs", "--criteria", "lrp,l1", "--samples", 8, "--val-size", 4, "--epochs", 0,
                 "--out", out)
    assert proc.returncode == 0, proc.stderr
    page = json.loads(out.with_suffix(".json").read_text())
    costs = page["costs"]
    assert costs["unit"] == "MACs" and set(costs["blocks"].values()) == {4718592}
    for row in page["rows"][1:]:  # equal MACs per block: the fewest blocks that reach 1.3x, each criterion's lowest
        assert row["predicted"] >= 1.3 and row["MACs"] <= 1 / 1.3
        assert row["MACs"] == pytest.approx(1 / row["predicted"], abs=5e-3)
        crit = row["criterion"].split(", ")[0]
        ranked = sorted(page["scores"][crit], key=lambda b: (page["scores"][crit][b], b))
        assert sorted(row["removed"].split(", ")) == sorted(ranked[:len(row["removed"].split(", "))])
    assert "a 1.3x target" in out.read_text() and "| cost (MACs) |" in out.read_text()


def test_bench_blocks_takes_costs_from_an_earlier_page(tmp_path, shared_dir):
    """--costs-from: the selection counts that page's costs (one expensive block here: every criterion takes it
    alone, in one round or two), and bad pages are refused before anything loads."""
    shared, weights = shared_dir
    blocks = ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]
    given = tmp_path / "given.json"
    given.write_text(json.dumps({"command": "python benchmarks/bench_blocks.py --speedup 1.5", "rows": [],
                                 "costs": {"unit": "ms", "total": 100.0,
                                           "blocks": {b: 40.0 if b == "layer3.1" else 1.0 for b in blocks}}}))
    out = tmp_path / "page.md"
    proc = bench("bench_blocks.py", "--shared", shared, "--weights", f"resnet20={weights}", "--speedup", 1.5,
                 "--costs-from", given, "--criteria", "lrp,l1", "--steps", 2, "--samples", 8, "--val-size", 4,
                 "--epochs", 0, "--out", out)
    assert proc.returncode == 0, proc.stderr
    page = json.loads(out.with_suffix(".json").read_text())
    assert page["costs"]["blocks"]["layer3.1"] == 40.0 and page["costs"]["total"] == 100.0
    assert [(r["criterion"], r["removed"], r["predicted"]) for r in page["rows"][1:]] == [("lrp, l1", "layer3.1", 1.67)]
    assert f"costs taken from `{given}`" in out.read_text()
    macs = tmp_path / "macs.json"
    macs.write_text(json.dumps({"command": "python benchmarks/bench_blocks.py --speedup 1.5 --cost macs",
                                "rows": [], "costs": {"unit": "MACs", "total": 1.0, "blocks": {}}}))
    torn = tmp_path / "torn.json"
    torn.write_text(given.read_text()[:200])
    negative = tmp_path / "negative.json"
    negative.write_text(json.dumps(dict(page, costs=dict(page["costs"], blocks={"layer3.1": -1.0}))))
    for args, message in [((given,), "add --speedup S"),
                          ((tmp_path / "none.json", "--speedup", 1.5), "cannot read it as a bench_blocks.py page"),
                          ((torn, "--speedup", 1.5), "cannot read it as a bench_blocks.py page (JSONDecodeError"),
                          ((negative, "--speedup", 1.5), "the cost of layer3.1 is -1.0, not a finite non-negative"),
                          ((macs, "--speedup", 1.5), "holds MACs costs of resnet20; this run needs ms costs")]:
        bad = tmp_path / "bad.md"
        proc = bench("bench_blocks.py", "--shared", tmp_path / "missing", "--costs-from", *args, "--out", bad)
        assert_argparse_error(proc, message)
        assert not bad.exists()


@pytest.mark.parametrize("which, message", [("data", "data folder not found"), ("weights", "weights file not found")])
def test_bench_blocks_reports_missing_inputs_in_one_line(tmp_path, shared_dir, which, message):
    shared, weights = shared_dir
    if which == "data":
        shared = tmp_path / "missing"
    else:
        weights = tmp_path / "missing.pt"
    proc = bench("bench_blocks.py", "--shared", shared, "--weights", f"resnet20={weights}", "--blocks", 2,
                 "--out", tmp_path / "page.md")
    assert_argparse_error(proc, message)


def test_outcomes_record_each_test_images_result(shared_dir, tmp_path):
    from paired import outcomes, unpack_correct

    from lrpcompress.data import load_data
    from lrpcompress.evaluation import accuracy, predictions
    from lrpcompress.models import load_model

    shared, weights = shared_dir
    test = load_data(shared / "data" / "cifar10-jpeg", "test")  # 20 images: packed into 3 bytes
    net = load_model("resnet20", weights)
    acc, packed = outcomes(net, test)
    right = unpack_correct(packed)
    assert len(right) == 24 and not right[20:].any()
    assert right[:20].tolist() == (predictions(net, test, show_progress=False) == test.y).tolist()
    assert acc == pytest.approx(accuracy(net, test, show_progress=False)) == 100 * right[:20].mean()


def _page(path: Path, args: str, rows: list[dict], allocator: str | None = None) -> None:
    """A bench_blocks.py page; ``allocator`` as pages since 2026-12-07 name it (older pages name none)."""
    dense = {"criterion": "dense", "removed": "–", "speed-up": 1.0, "test": 90.0}
    page = {"command": f"python benchmarks/bench_blocks.py {args}", "rows": [dense, *rows]}
    if allocator:
        page["cpu"] = {"allocator": allocator}
    path.write_text(json.dumps(page))


KEPT = "glibc, freed memory kept"  # what pages timed under steady_allocator name


def _row(crit: str, test: float, speed: float = 1.5, removed: str | None = None) -> dict:
    """A page row; by default each speed-up is a cut of its own (the summary gives one cut one speed-up)."""
    removed = removed or {1.5: "layer1.0"}.get(speed, f"layer2.{round(speed * 100)}")
    return {"criterion": crit, "removed": removed, "speed-up": speed, "test + 2 ep": test}


def test_summarize_blocks_pairs_runs_at_library_defaults(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    _page(res / "blocks_a.json", "--blocks 3 --criteria norm,lrp,taylor --reference library",
          [_row("norm", 87.0), _row("lrp, taylor", 86.5)])
    _page(res / "blocks_b.json", "--blocks 3 --criteria lrp --reference library --steps 3",
          [_row("lrp", 87.25, 1.6)])
    _page(res / "blocks_c.json", "--blocks 3 --criteria lrp,l1 --seed 1", [_row("lrp", 80.0), _row("l1", 86.0)])
    _page(res / "blocks_d.json", "--blocks 3 --criteria lrp --reference library --classes 0,1,8",
          [_row("lrp", 99.0)])
    out = tmp_path / "summary.md"
    proc = bench("summarize_blocks.py", "--results", res, "--out", out)
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    seed0 = next(line for line in lines if line.startswith("| resnet20 | 3 | 0 |"))
    cells = [c.strip() for c in seed0.strip("|").split("|")]
    # lrp, lrp rounds, norm, l1, taylor, rounds - one pass, best lrp - best other
    assert cells[3:] == ["86.50 (1.50×)", "87.25 (1.60×)", "87.00 (1.50×)", "–", "86.50 (1.50×)", "+0.75", "+0.25"]
    seed1 = next(line for line in lines if line.startswith("| resnet20 | 3 | 1 |"))
    # lrp from zero (the page's own default) is not lrp's library default and is left out; l1 counts as it is
    assert [c.strip() for c in seed1.strip("|").split("|")][3:8] == ["–", "–", "–", "86.00 (1.50×)", "–"]
    assert "99.00" not in out.read_text()  # a class subset is another task
    task = tmp_path / "task.md"
    proc = bench("summarize_blocks.py", "--results", res, "--classes", "0,1,8", "--out", task)
    assert proc.returncode == 0, proc.stderr
    assert "| resnet20 | 3 | 0 | 99.00 (1.50×) |" in task.read_text() and "86.50" not in task.read_text()
    assert "spread" not in out.read_text()  # no capped runs on 10 classes: no columns for them
    # dense 90%: binomial standard error sqrt(0.9 * 0.1 / n) on 10,000 and on 3,000 test images
    assert "on these 10,000 images has a binomial standard error of about ±0.30 points" in out.read_text()
    assert "on these 3,000 images has a binomial standard error of about ±0.55 points" in task.read_text()
    # paired table: rounds 87.25 against one pass 86.50 on the one seed that has both, and 0.10x faster
    assert "| lrp rounds − lrp | 1 | +0.75 | – | 1 / 0 / 0 | +0.75 to +0.75 | 1.000 | +0.10× |" in lines
    assert "| lrp − norm | 1 | -0.50 | – | 0 / 0 / 1 | -0.50 to -0.50 | 1.000 | +0.00× |" in lines
    assert not any(line.startswith("| lrp − l1 |") for line in lines)  # no seed has both (seed 1's lrp is off)
    # the rounds' cut is faster and more accurate than every other: the only one on the speed/accuracy front
    assert "| resnet20 | lrp rounds | 3 | 1.60× | 87.25 (n=1) | yes |" in lines
    assert "| resnet20 | norm | 3 | 1.50× | 87.00 (n=1) | – |" in lines
    assert sum(line.endswith("| yes |") for line in lines) == 1


def test_summarize_blocks_gives_spread_runs_columns_and_a_paired_tally(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    task = "--blocks 3 --reference library --classes 0,1,8 --epochs 1"
    rows = [{**_row(c, t), "test + 1 ep": t} for c, t in (("lrp", 95.0), ("norm", 96.0))]
    _page(res / "blocks_a.json", f"{task} --criteria lrp,norm", rows)
    capped = [{**_row(c, t), "test + 1 ep": t} for c, t in (("lrp", 96.5), ("norm", 95.75))]
    _page(res / "blocks_b.json", f"{task} --criteria lrp,norm --spread", capped)
    out = tmp_path / "task.md"
    proc = bench("summarize_blocks.py", "--results", res, "--classes", "0,1,8", "--epochs", 1, "--out", out)
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert "| model | blocks | seed | lrp | lrp spread | lrp rounds | norm | norm spread | l1 | taylor |" in "\n".join(lines)
    row = next(line for line in lines if line.startswith("| resnet20 | 3 | 0 |"))
    # the best LRP cut (capped) against the best other (the norm without the cap)
    assert [c.strip() for c in row.strip("|").split("|")][3:] == [
        "95.00 (1.50×)", "96.50 (1.50×)", "–", "96.00 (1.50×)", "95.75 (1.50×)", "–", "–", "–", "+0.50"]
    assert "| lrp spread − lrp | 1 | +1.50 | – | 1 / 0 / 0 | +1.50 to +1.50 | 1.000 | +0.00× |" in lines
    assert "| norm spread − norm | 1 | -0.25 | – | 0 / 0 / 1 | -0.25 to -0.25 | 1.000 | +0.00× |" in lines


def test_summarize_blocks_keeps_two_checkpoints_of_one_arch_apart(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    run = "--arch resnet32 --blocks 5 --criteria lrp --reference library"
    _page(res / "blocks_a.json", f"{run} --weights resnet32=/m/first.pt", [_row("lrp", 86.0)])
    _page(res / "blocks_b.json", f"{run} --weights resnet32=/m/second.pt", [_row("lrp", 85.0)])
    _page(res / "blocks_c.json", "--blocks 3 --criteria lrp --reference library", [_row("lrp", 87.0)])
    out = tmp_path / "summary.md"
    proc = bench("summarize_blocks.py", "--results", res, "--out", out)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    # the same seed of two trained models is two rows, not one cell filled by whichever page came first
    assert "| resnet32 (first.pt) | 5 | 0 | 86.00 (1.50×) |" in text
    assert "| resnet32 (second.pt) | 5 | 0 | 85.00 (1.50×) |" in text
    assert "| resnet20 | 3 | 0 | 87.00 (1.50×) |" in text  # one checkpoint: the arch alone


def test_summarize_blocks_pools_seeds_into_a_sign_test_and_a_standard_error(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    # lrp ahead of l1 on seeds 0-3 by 0.2, 0.4, 0.6, 0.0 (a tie: dropped from the sign test)
    for seed, (lrp, l1) in enumerate([(86.2, 86.0), (86.4, 86.0), (86.6, 86.0), (86.0, 86.0)]):
        _page(res / f"blocks_{seed}.json", f"--blocks 3 --criteria lrp,l1 --reference library --seed {seed}",
              [_row("lrp", lrp, 1.7), _row("l1", l1, 1.5)])
    out = tmp_path / "summary.md"
    proc = bench("summarize_blocks.py", "--results", res, "--out", out)
    assert proc.returncode == 0, proc.stderr
    # mean 0.30, sample s.d. 0.2582, s.e. 0.1291; three wins and no loss: p = 2 / 2**3
    assert "| lrp − l1 | 4 | +0.30 | 0.13 | 3 / 1 / 0 | +0.00 to +0.60 | 0.250 | +0.20× |" in out.read_text()


def test_summarize_blocks_pairs_each_model_and_budget_apart(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    # resnet20 3 blocks: lrp ahead of l1 by 0.5 and 0.3 on seeds 0 and 1; resnet44 7 blocks: behind by 1.0 (seed 0)
    for seed, (lrp, l1) in enumerate([(87.0, 86.5), (87.3, 87.0)]):
        _page(res / f"blocks_rn20_{seed}.json", f"--blocks 3 --criteria lrp,l1 --reference library --seed {seed}",
              [_row("lrp", lrp, 1.6), _row("l1", l1)])
    _page(res / "blocks_rn44.json", "--arch resnet44 --blocks 7 --criteria lrp,l1 --reference library",
          [_row("lrp", 88.0), _row("l1", 89.0)])
    out = tmp_path / "summary.md"
    proc = bench("summarize_blocks.py", "--results", res, "--out", out)
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    # pooled: +0.5, +0.3, -1.0 (mean -0.067); per budget each on its own (s.d. 0.141 / sqrt 2), no s.e. from one run
    assert any(line.startswith("| lrp − l1 | 3 | -0.07 |") for line in lines)
    assert "| resnet20 | 3 | lrp − l1 | 2 | +0.40 | 0.10 | 2 / 0 / 0 | +0.30 to +0.50 | 0.500 | +0.10× |" in lines
    assert "| resnet44 | 7 | lrp − l1 | 1 | -1.00 | – | 0 / 0 / 1 | -1.00 to -1.00 | 1.000 | +0.00× |" in lines
    assert not any("lrp − taylor" in line for line in lines)  # no taylor runs: no such line


def test_summarize_blocks_keeps_speed_targets_apart_from_block_counts(tmp_path):
    res = tmp_path / "results"
    (res / "speed").mkdir(parents=True)
    _page(res / "blocks_count.json", "--criteria lrp,l1 --reference library", [_row("lrp", 87.0), _row("l1", 86.0)],
          allocator=KEPT)
    for seed, (lrp, l1) in enumerate([(86.0, 85.7), (86.2, 86.0)]):
        _page(res / "speed" / f"blocks_s{seed}.json",
              f"--speedup 2.0 --criteria lrp,l1 --reference library --seed {seed}",
              [_row("lrp", lrp, 2.2), _row("l1", l1, 2.3)], allocator=KEPT)
    _page(res / "speed" / "blocks_macs.json", "--speedup 2.0 --cost macs --criteria lrp --reference library",
          [_row("lrp", 80.0)], allocator=KEPT)
    counts, speed = tmp_path / "counts.md", tmp_path / "speed.md"
    assert bench("summarize_blocks.py", "--results", res, "--out", counts).returncode == 0
    proc = bench("summarize_blocks.py", "--results", res, "--speed-targets", "--out", speed)
    assert proc.returncode == 0, proc.stderr
    text = speed.read_text()
    # a page without --blocks removed 3 (bench_blocks' default); speed pages are not among the counts
    assert "| resnet20 | 3 | 0 | 87.00 (1.50×) |" in counts.read_text() and "86.20" not in counts.read_text()
    assert "| model | target | seed |" in text and "| resnet20 | 2x | 1 | 86.20 (2.20×) |" in text
    assert "| resnet20 | 2x macs | 0 | 80.00 (1.50×) |" in text  # another cost is another budget
    assert "| resnet20 | 2x | lrp − l1 | 2 | +0.25 | 0.05 | 2 / 0 / 0 | +0.20 to +0.30 | 0.500 | -0.10× |" in text
    assert "87.00" not in text


def test_summarize_blocks_gives_one_cut_one_speed_up_over_all_its_runs(tmp_path):
    res = tmp_path / "results"
    (res / "speed").mkdir(parents=True)
    stage1 = "layer1.0, layer1.1, layer1.2"
    # one cut timed 2.2x, 2.6x and 2.4x in three speed-target runs (the third lists its blocks in another order) and
    # 2.9x in a 1-epoch block-count run: the median of those four is its speed-up everywhere; a class-subset run of
    # it is another model (another head) and does not count; another cut keeps its own
    _page(res / "speed" / "blocks_s0.json", "--speedup 2.0 --criteria lrp,l1 --reference library",
          [_row("lrp", 86.0, 2.2, stage1), _row("l1", 85.0, 2.1, "layer3.2")], allocator=KEPT)
    _page(res / "speed" / "blocks_s1.json", "--speedup 2.0 --criteria lrp,l1 --reference library --seed 1",
          [_row("lrp", 86.5, 2.6, stage1), _row("l1", 86.1, 2.4, "layer1.2, layer1.0, layer1.1")], allocator=KEPT)
    _page(res / "blocks_count.json", "--blocks 3 --criteria norm --epochs 1",
          [{**_row("norm", 80.0, 2.9, stage1), "test + 1 ep": 80.0}], allocator=KEPT)
    _page(res / "blocks_task.json", "--blocks 3 --criteria norm --classes 0,1,8",
          [_row("norm", 99.0, 9.9, stage1)], allocator=KEPT)
    out = tmp_path / "speed.md"
    proc = bench("summarize_blocks.py", "--results", res, "--speed-targets", "--out", out)
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert "| resnet20 | 2x | 0 | 86.00 (2.50×) | – | – | 85.00 (2.10×) | – |" in "\n".join(lines)
    assert "| resnet20 | 2x | 1 | 86.50 (2.50×) | – | – | 86.10 (2.50×) | – |" in "\n".join(lines)
    # seed 1 is one cut, so no speed difference; seed 0's lrp cut is 0.40x faster than l1's: mean +0.20x
    assert "| lrp − l1 | 2 | +0.70 | 0.30 | 2 / 0 / 0 | +0.40 to +1.00 | 0.500 | +0.20× |" in lines
    assert "| resnet20 | lrp | 2x | 2.50× | 86.25 (n=2) | yes |" in lines


def test_summarize_blocks_keeps_speed_targets_under_glibc_defaults_apart(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    stage1 = "layer1.0, layer1.1, layer1.2"
    # one cut, timed 2.4x under glibc's default malloc (an old page names no allocator) and 1.8x with freed memory
    # kept: one 2x target each, kept apart, and each row's speed-up is the median of its own kind of timing only
    _page(res / "blocks_old.json", "--speedup 2.0 --criteria lrp --reference library", [_row("lrp", 86.0, 2.4, stage1)])
    _page(res / "blocks_new.json", "--speedup 2.0 --criteria lrp --reference library",
          [_row("lrp", 85.0, 1.8, f"{stage1}, layer2.1")], allocator=KEPT)
    _page(res / "blocks_new2.json", "--speedup 2.0 --criteria l1 --reference library",
          [_row("l1", 84.0, 1.7, stage1)], allocator="tcmalloc")
    out = tmp_path / "speed.md"
    proc = bench("summarize_blocks.py", "--results", res, "--speed-targets", "--out", out)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "| resnet20 | 2x | 0 | 85.00 (1.80×) | – | – | 84.00 (1.70×) | – |" in text
    assert "| resnet20 | 2x (glibc default) | 0 | 86.00 (2.40×) | – | – | – | – |" in text


def test_retime_blocks_times_every_cut_of_one_model_together(tmp_path, resnet20_weights):
    res = tmp_path / "results"
    res.mkdir()
    w = f"--weights resnet20={resnet20_weights}"
    _page(res / "blocks_a.json", f"--criteria lrp,l1 --reference library {w}",
          [dict(_row("lrp", 87.0), removed="layer1.0, layer1.1, layer1.2"), dict(_row("l1", 86.0), removed="layer3.2")])
    _page(res / "blocks_b.json", f"--speedup 2.0 --criteria lrp --reference library --seed 1 {w}",
          [dict(_row("lrp", 86.0, 2.2), removed="layer1.2, layer1.1, layer1.0")])
    _page(res / "blocks_other.json", "--criteria lrp", [dict(_row("lrp", 50.0), removed="layer2.1")])  # shared model
    out = tmp_path / "retimed.md"
    proc = bench("retime_blocks.py", "--results", res, "--weights", f"resnet20={resnet20_weights}", "--passes", 1,
                 "--out", out)
    assert proc.returncode == 0, proc.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()
            if line.startswith("| layer")]
    assert [r[0] for r in rows] == ["layer1.0, layer1.1, layer1.2", "layer3.2"]  # the three blocks are faster
    stage1, last = rows
    assert stage1[1] == "3" and stage1[4] == "1.50, 2.20" and stage1[5] == "86.5"  # one cut, two runs, mean test
    assert stage1[6] == "lrp @ 3 s0; lrp @ 2x (glibc default) s1" and last[6] == "l1 @ 3 s0"  # an old page
    assert float(stage1[3]) > float(last[3]) and "50.0" not in out.read_text()
    assert stage1[7] == "yes" and last[7] == "–"  # faster and more accurate
    proc = bench("retime_blocks.py", "--results", res, "--arch", "resnet44", "--out", out)
    assert_argparse_error(proc, "no bench_blocks.py pages of resnet44")


def test_summarize_blocks_counts_per_image_mcnemar_tests_where_pages_keep_them(tmp_path):
    import numpy as np
    from paired import pack_correct

    def packed(n_right: int) -> str:
        return pack_correct(np.arange(100) < n_right)

    res = tmp_path / "results"
    res.mkdir()
    # seed 0: lrp right on 90 of 100 images, l1 on 70 of the same: 20 discordant images, all lrp's (p = 2 / 2**20);
    # seed 1: 80 against 78, two discordant (p = 0.5); seed 2: a page from before per-image records
    for seed, (a, b) in enumerate([(90, 70), (80, 78)]):
        _page(res / f"blocks_{seed}.json", f"--blocks 3 --criteria lrp,l1 --reference library --seed {seed}",
              [_row("lrp", float(a)), _row("l1", float(b))])
        page = json.loads((res / f"blocks_{seed}.json").read_text())
        page["test_correct"] = {"dense": packed(100), "lrp": packed(a), "l1": packed(b)}
        (res / f"blocks_{seed}.json").write_text(json.dumps(page))
    _page(res / "blocks_2.json", "--blocks 3 --criteria lrp,l1 --reference library --seed 2",
          [_row("lrp", 80.0), _row("l1", 79.0)])
    out = tmp_path / "summary.md"
    proc = bench("summarize_blocks.py", "--results", res, "--out", out)
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in out.read_text().splitlines() if line.startswith("| lrp − l1 |"))
    assert row.endswith("| 1 / 0 of 2 |"), row


def test_run_benchmark_pairs_lrp_with_each_method_image_by_image():
    import numpy as np
    from paired import pack_correct
    from run_benchmark import per_image_rows

    def row(method: str, budget: float, right: np.ndarray | None) -> dict:
        if right is None:
            return {"model": "resnet20", "method": method, "budget": budget, "accuracy": 50.0}
        return {"model": "resnet20", "method": method, "budget": budget, "accuracy": 100.0 * right.mean(),
                "test_correct": pack_correct(right)}

    lrp = np.arange(40) < 30  # right on images 0-29
    taylor = (np.arange(40) >= 2) & (np.arange(40) < 30)  # 2-29: lrp alone right on 2 images, taylor alone on none
    rows = [row("float32", 1.0, np.ones(40, bool)), row("lrp", 8.0, lrp), row("taylor", 8.0, taylor),
            row("magnitude", 8.0, None),  # a row from before the records: not paired
            row("lrp+ft1", 8.0, taylor),  # fine-tuned: not a post-training method
            row("lrp", 12.0, lrp)]  # nothing else at 12x
    assert per_image_rows(rows) == [{
        "model": "resnet20", "budget": "8×", "comparison": "lrp − taylor", "accuracy difference": "+5.00",
        "only lrp right": 2, "only the other right": 0, "McNemar p": "0.500"}]


def test_mcnemar_counts_the_images_only_one_model_gets_right():
    import numpy as np

    from paired import mcnemar

    a = np.array([1, 1, 1, 0, 0, 1], bool)
    b = np.array([1, 0, 0, 1, 0, 1], bool)
    assert mcnemar(a, b) == (2, 1, 1.0)
    assert mcnemar(np.ones(10, bool), np.zeros(10, bool))[2] == pytest.approx(2 / 2 ** 10)
    with pytest.raises(ValueError, match="different test sets"):
        mcnemar(a, b[:5])


def test_sign_test_is_the_exact_binomial_tail():
    from paired import sign_test

    assert sign_test(0, 0) == 1.0
    assert sign_test(9, 0) == pytest.approx(2 / 2 ** 9)
    # 11 of 16: 2 * (C(16,0) + ... + C(16,5)) / 2^16 = 2 * 6885 / 65536
    assert sign_test(11, 5) == pytest.approx(2 * 6885 / 65536) == sign_test(5, 11)
    assert sign_test(3, 3) == 1.0  # an even split is capped at 1, not 2 * P(X <= 3)


def test_run_diffs_counts_ties_within_half_a_hundredth_and_tests_the_split():
    import math

    from paired import run_diffs

    d = run_diffs([0.5, 0.004, -0.2, 1.0])
    assert (d.runs, d.ahead, d.level, d.behind) == (4, 2, 1, 1)
    assert d.mean == pytest.approx(0.326) and (d.low, d.high) == (-0.2, 1.0)
    assert d.se == pytest.approx(0.26847, abs=1e-4) and d.p == 1.0
    one = run_diffs([0.3])
    assert math.isnan(one.se) and (one.ahead, one.p) == (1, 1.0)


def test_summarize_blocks_without_pages_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = bench("summarize_blocks.py", "--results", tmp_path / "empty", "--out", tmp_path / "s.md")
    assert proc.returncode == 2 and "no bench_blocks.py pages" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "s.md").exists()


@pytest.mark.parametrize("script", ["summarize_blocks.py", "retime_blocks.py"])
def test_block_page_readers_refuse_a_command_they_cannot_read_in_one_line(tmp_path, script):
    res = tmp_path / "results"
    res.mkdir()
    _page(res / "blocks_a.json", "--blocks 3 --criteria lrp", [_row("lrp", 87.0)])
    _page(res / "blocks_b.json", "--blocks 3 --criteria lrp --prune-faster", [_row("lrp", 87.0)])
    out = tmp_path / "s.md"
    proc = bench(script, "--results", res, "--out", out)
    assert_argparse_error(proc, "blocks_b.json: its command has options this bench_blocks.py does not know: "
                                "--prune-faster")
    assert not out.exists()


@pytest.mark.parametrize("script", ["summarize_blocks.py", "retime_blocks.py"])
@pytest.mark.parametrize("text, message", [('{"command": "python benchmarks/bench_blocks.py --blocks 3", "rows": [',
                                            "cannot read it as a bench_blocks.py page (JSONDecodeError"),
                                           ('{"command": "python benchmarks/bench_blocks.py --blocks 3"}',
                                            "not a bench_blocks.py page (it needs a 'command' and a list of 'rows')")])
def test_block_page_readers_refuse_a_torn_page_in_one_line(tmp_path, script, text, message):
    res = tmp_path / "results"
    res.mkdir()
    _page(res / "blocks_a.json", "--blocks 3 --criteria lrp", [_row("lrp", 87.0)])
    (res / "blocks_b.json").write_text(text)
    out = tmp_path / "s.md"
    proc = bench(script, "--results", res, "--out", out)
    assert_argparse_error(proc, f"blocks_b.json: {message}")
    assert not out.exists()


def test_bench_channels_dates_a_page_by_its_rows_runs():
    from bench_channels import page_dates

    now = "2026-12-08 10:00 UTC"
    assert page_dates([{}, {}], now) == now  # rows from before rows carried a date: the run's start
    assert page_dates([{"date": "2026-12-07 17:55 UTC"}, {"date": "2026-12-07 17:55 UTC"}], now) == \
        "2026-12-07 17:55 UTC"
    line = page_dates([{"date": "2026-12-08 09:00 UTC"}, {"date": "2026-12-07 17:55 UTC"}, {}], now)
    assert line.startswith("2026-12-07 17:55 UTC to 2026-12-08 09:00 UTC")
    assert line.endswith("1 row(s) from earlier runs carry no date")


def test_probe_block_stages_signal_is_the_start_where_nothing_absorbs_relevance():
    import numpy as np
    import torch
    import torch.nn as nn
    from probe_block_stages import stream_signal

    from lrpcompress.blocks import BlockPruneConfig
    from lrpcompress.data import ImageData

    class Block(nn.Module):  # relu(x + f(x)) with bias-free convolutions: z+ and the additions conserve relevance
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU(),
                                   nn.Conv2d(4, 4, 3, padding=1, bias=False))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.f(x))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Sequential(Block(), Block()),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=False))
    with torch.no_grad():  # every weight positive: no z+ denominator is 0 after the first layer
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not net[0]:
                m.weight.abs_()
    rng = np.random.default_rng(0)
    data = ImageData(rng.integers(0, 256, (12, 6, 6, 3), dtype=np.uint8), np.arange(12) % 3, (0.5,) * 3,
                     (0.25,) * 3, ("a", "b", "c"))
    blocks = ["2.0", "2.1"]
    signal, start = stream_signal(net, data, blocks, BlockPruneConfig(criterion="lrp", samples=12, batch_size=4),
                                  lrp=True)
    assert start > 0
    for b in blocks:
        assert signal[b] == pytest.approx(start, rel=1e-4)
    # the plain gradient carries gradient x activation, which a ReLU network without biases also conserves
    grad_signal, grad_start = stream_signal(net, data, blocks, BlockPruneConfig(criterion="taylor", samples=12,
                                                                                batch_size=4), lrp=False)
    assert grad_start == pytest.approx(start)
    assert grad_signal["2.1"] == pytest.approx(grad_start, rel=1e-6)


def test_benchmarks_without_matplotlib_stop_before_any_work_with_one_line(monkeypatch):
    import importlib.util

    import run_benchmark

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        run_benchmark.require_matplotlib("bench_channels.py")
    assert str(e.value) == ("bench_channels.py: matplotlib draws this benchmark's plots and is not installed: "
                            "pip install -e '.[bench]'")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "matplotlib" else real(name, *a))
    run_benchmark.require_matplotlib("bench_channels.py")  # installed: nothing happens


def test_summarize_channels_pairs_runs_on_one_page_and_counts_a_rerun_once(tmp_path):
    from summarize_channels import collect, tables

    def row(criterion, acc, setting="classes 0,1,8", epochs=0, seed=0, fraction=0.5):
        return {"model": "resnet20", "setting": setting, "criterion": criterion, "fraction": fraction, "streams": 0.25,
                "epochs": epochs, "seed": seed, "accuracy": acc}

    old = [row("dense", 96.0), row("lrp_mean_down", 93.0), row("l1_down", 90.0),  # rerun below: replaced
           row("lrp_mean_down", 95.0, epochs=1), row("l1_down", 95.002, epochs=1),  # level
           row("lrp_mean_down", 80.0, setting="10 classes"), row("l1", 20.0, setting="10 classes"),
           row("l1_down", 85.0, seed=3)]  # no default beside it: no run
    (tmp_path / "channels.json").write_text(json.dumps(old))
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "channels.json").write_text(json.dumps([row("lrp_mean_down", 93.5), row("l1_down", 91.0),
                                                                 row("taylor_down", 94.0, seed=1),
                                                                 row("lrp_mean_down", 93.0, seed=1)]))
    runs, where = collect(tmp_path)
    assert len(runs) == 4
    first = next(k for k in runs if k[6] == 0 and k[9] == 0 and k[1] == "classes 0,1,8")
    assert runs[first] == {"lrp_mean_down": 93.5, "l1_down": 91.0} and where[first] == "task/channels.json"
    pooled, per_model = tables(runs)
    got = {(r["against"], r["task"], r["recovery"]): r for r in pooled}
    assert got[("l1_down", "class subset", "no recovery")]["mean ± s.e."] == "+2.50"
    assert got[("l1_down", "class subset", "after recovery")]["ahead / level / behind"] == "0 / 1 / 0"
    assert got[("taylor_down", "class subset", "no recovery")]["ahead / level / behind"] == "0 / 0 / 1"
    assert got[("l1", "10 classes", "no recovery")]["mean ± s.e."] == "+60.00"
    assert len(pooled) == 4 and {r["model"] for r in per_model} == {"resnet20"}
    (tmp_path / "task" / "channels.json").write_text(json.dumps([{"criterion": "l1_down"}]))
    with pytest.raises(ValueError, match=r"task/channels.json: not a bench_channels.py page \(KeyError"):
        collect(tmp_path)


def test_summarize_routes_puts_each_routed_run_beside_the_fixed_runs_of_its_seed(tmp_path):
    from summarize_routes import collect, rows

    def report(seed, acc, blocks=None, channels=None, routes=None, classes=(3, 5, 7), bits=8):
        quant = {"bits": bits, "allocation": "uniform"}
        b = None if blocks is None else {"settings": {"speedup": blocks, "criterion": "norm", "steps": 1},
                                         "recover_epochs": 1}
        c = None if channels is None else {"settings": {"fraction": channels, "criterion": "lrp", "reference": "mean",
                                                        "stream_fraction": 0.0, "scope": "layer"},
                                           "recover_epochs": 1}
        return {"arch": "resnet20", "classes": list(classes), "seed": seed, "method": "uniform",
                "settings": {"quant": quant}, "block_pruning": b, "channel_pruning": c, "route_search": routes,
                "accuracy": acc, "baseline_accuracy": 88.5, "speedup": 1.6, "cpu": {"model": "Test CPU"}}

    trials = [{"channels": 0.0, "val_accuracy": 90.25, "speedup": 1.56}, {"channels": 0.5, "val_accuracy": None,
                                                                          "speedup": 1.2}]
    search = {"speedup_target": 1.5, "chosen": 0.0, "trials": trials}
    pages = {"cli_routed_s0.json": report(0, 87.5, blocks=1.5, routes=search),
             "cli_routed_s1.json": report(1, 88.0, blocks=1.5, routes=search),
             "cli_depth_s0.json": report(0, 86.5, blocks=1.5),
             "cli_comp_s0.json": report(0, 86.0, blocks=1.15, channels=0.5),
             "cli_comp_s1.json": report(1, 87.0, blocks=1.15, channels=0.5),
             "cli_comp_4bit_s1.json": report(1, 80.0, blocks=1.15, channels=0.5, bits=4),  # other file: not paired
             "cli_depth_other_classes.json": report(0, 95.0, blocks=1.5, classes=(0, 1, 8)),
             "cli_l1_s0.json": report(0, 10.0, blocks=1.15, channels=0.3)}  # another cut: ignored
    for name, rep in pages.items():
        (tmp_path / name).write_text(json.dumps(rep))
    routed, fixed = collect(tmp_path)
    per_run, summary = rows(routed, fixed)
    assert [(r["seed"], r["vs dense"], r["blocks alone to 1.5×: vs dense"], r["1.15× blocks + 50% channels: vs dense"])
            for r in per_run] == [(0, "-1.00", "-2.00", "-2.50"), (1, "-0.50", None, "-1.50")]
    assert per_run[0]["routes (channels: held-out %, speed-up)"] == "0: 90.25 (1.56×) / 0.5: –"
    assert summary == [{"model": "resnet20", "classes": "3,5,7", "target": "1.5×",
                        "chooser: mean vs dense (runs)": "-0.75 (2)", "chooser: slowest speed-up": 1.6,
                        "blocks alone, same seeds": "-2.00 (1)", "composition, same seeds": "-2.00 (2)"}]
    (tmp_path / "cli_broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"cli_broken.json: not a compress report \(JSONDecodeError"):
        collect(tmp_path)


def test_bench_routes_audits_the_held_out_choice_on_the_test_split(tmp_path):
    from bench_routes import summarize, write

    def row(seed, channels, val, test, chosen, speedup=1.55):
        return {"model": "resnet20", "classes": "3,5,7", "target": 1.5, "routes": "0,0.5", "epochs": 1, "seed": seed,
                "channels": channels, "val_accuracy": val, "test_accuracy": test, "speedup": speedup,
                "chosen": chosen, "dense_accuracy": 88.5, "cpu": "test cpu"}

    rows = [row(0, 0.0, 90.0, 87.5, True), row(0, 0.5, 89.0, 86.0, False),  # chose the best: regret 0
            row(1, 0.0, 90.0, 86.5, True), row(1, 0.5, 89.5, 87.0, False),  # chose the worse one: regret 0.5
            row(2, 0.0, 90.0, 87.0, True), row(2, 0.5, None, None, False, speedup=1.4)]  # a route fell short
    per_run, summary = summarize(rows)
    assert [(r["seed"], r["chosen vs dense"], r["best on test"], r["regret"]) for r in per_run] == [
        (0, "-1.00", "0", "0.00"), (1, "-2.00", "0.5", "0.50"), (2, "-1.50", "0", "0.00")]
    assert per_run[2]["routes (channels: held-out / test %, speed-up)"] == "0: 90.00 / 87.00 (1.55×) · 0.5: short"
    assert summary == [{"model": "resnet20", "classes": "3,5,7", "target": "1.5×", "epochs": 1, "runs": 3,
                        "chosen: mean vs dense": "-1.50", "best on test picked": "2 of 3", "mean regret": "0.17",
                        "choice on unseen images: gain": "–", "channels 0 always": "-1.50",
                        "channels 0.5 always": "–"}]
    write(rows, tmp_path, "python benchmarks/bench_routes.py")
    assert json.loads((tmp_path / "routes.json").read_text()) == rows
    assert "| resnet20 | 3,5,7 | 1.5× | 1 | 3 | -1.50 | 2 of 3 | 0.17 |" in (tmp_path / "routes.md").read_text()


def test_bench_routes_rejects_bad_settings_before_loading(tmp_path):
    proc = bench("bench_routes.py", "--routes", "0,0", "--shared", tmp_path)
    assert proc.returncode == 1 and "bench_routes.py: a channel fraction is given twice" in proc.stderr
    proc = bench("bench_routes.py", "--shared", tmp_path)
    assert proc.returncode == 1 and f"needs {tmp_path}/models" in proc.stderr


def test_bench_routes_tests_the_choice_image_by_image_and_chooses_again_on_unseen_halves():
    import numpy as np
    from bench_routes import crossed_choice, summarize
    from paired import pack_correct

    def row(channels, right, chosen):
        right = np.array(right, dtype=bool)
        return {"model": "resnet20", "classes": "0,1,8", "target": 1.5, "routes": "0,0.5", "epochs": 1, "seed": 0,
                "channels": channels, "val_accuracy": 97.0, "test_accuracy": 100.0 * right.mean(), "speedup": 1.6,
                "chosen": chosen, "dense_accuracy": 80.0, "cpu": "test cpu", "test_correct": pack_correct(right)}

    rows = [row(0.0, [1, 1, 1, 1, 0, 0, 0, 0], True), row(0.5, [1, 1, 1, 1, 1, 1, 0, 0], False)]
    # either half of the images picks the 0.5 route, which gets 75% of the other half against the chosen one's 50%
    assert crossed_choice(rows, rows[0]) == 25.0 and crossed_choice(rows, rows[1]) == 0.0
    per_run, summary = summarize(rows)
    assert per_run[0]["regret"] == "25.00" and per_run[0]["best / chosen only, McNemar p"] == "2 / 0, 0.5"
    assert summary[0]["choice on unseen images: gain"] == "+25.00" and len(summary) == 1
    # runs of another subset with the same target, routes and epochs are pooled in an "all" row
    rows += [dict(r, classes="3,5,7", test_correct=None) for r in rows]
    _, summary = summarize(rows)
    assert [(s["classes"], s["runs"], s["mean regret"], s["choice on unseen images: gain"]) for s in summary] == [
        ("0,1,8", 1, "25.00", "+25.00"), ("3,5,7", 1, "25.00", "–"), ("all", 2, "25.00", "–")]
