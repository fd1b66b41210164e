"""The benchmark scripts' handling of bad settings: an argparse error naming the fix, no traceback, no page."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, make_npz_folder


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


def _page(path: Path, args: str, rows: list[dict]) -> None:
    import json

    dense = {"criterion": "dense", "removed": "–", "speed-up": 1.0, "test": 90.0}
    path.write_text(json.dumps({"command": f"python benchmarks/bench_blocks.py {args}", "rows": [dense, *rows]}))


def _row(crit: str, test: float, speed: float = 1.5) -> dict:
    return {"criterion": crit, "removed": "layer1.0", "speed-up": speed, "test + 2 ep": test}


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
    assert "1 runs, mean +0.75, ahead in 1" in out.read_text()
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
    assert "`lrp spread` against `lrp`, paired by seed: 1 runs, mean +1.50" in out.read_text()
    assert "`norm spread` against `norm`, paired by seed: 1 runs, mean -0.25" in out.read_text()


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


def test_summarize_blocks_without_pages_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = bench("summarize_blocks.py", "--results", tmp_path / "empty", "--out", tmp_path / "s.md")
    assert proc.returncode == 2 and "no bench_blocks.py pages" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "s.md").exists()
