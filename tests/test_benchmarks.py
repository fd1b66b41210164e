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
    assert last.startswith("bench_blocks.py: error:") and pattern in last, last


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
    assert_argparse_error(proc, "more than resnet20's 7 removable blocks; use --blocks <= 7")
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
