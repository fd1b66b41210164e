"""The command line: the main paths work, and every kind of bad input is one line on stderr, exit != 0."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lrpcompress.cli import main
from lrpcompress.models import build_model

from conftest import make_npz_folder


def run(capsys, *argv):
    try:
        code = main(list(map(str, argv)))
    except SystemExit as exc:  # argparse rejects the arguments (one line, exit 2)
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, pattern):
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert pattern.lower() in lines[0].lower(), lines[0]


@pytest.fixture()
def compressed(tmp_path, tiny_data, resnet20_weights, capsys):
    out = tmp_path / "m.lrpc"
    code, stdout, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data",
                            tiny_data, "--samples", 16, "--out", out, "--report", tmp_path / "r.json")
    assert code == 0, err
    return out


def test_compress_report_evaluate_inspect(tmp_path, tiny_data, compressed, capsys):
    rep = json.loads((tmp_path / "r.json").read_text())
    for key in ("baseline_accuracy", "accuracy", "dense_bytes", "file_bytes", "compression_ratio", "sparsity",
                "mean_bits", "layers", "settings", "seconds", "method"):
        assert key in rep
    assert rep["file_bytes"] == compressed.stat().st_size
    assert rep["compression_ratio"] == pytest.approx(rep["dense_bytes"] / rep["file_bytes"], rel=1e-3)
    code, out, _ = run(capsys, "evaluate", compressed, "--data", tiny_data)
    assert code == 0 and f"{rep['accuracy']:.2f}%" in out
    code, out, _ = run(capsys, "inspect", compressed)
    assert code == 0 and "layer1.0.conv1.weight" in out and "mean bits" in out
    code, out, _ = run(capsys, "inspect", compressed, "--json")
    assert json.loads(out)["file_bytes"] == compressed.stat().st_size


def test_score_writes_safetensors(tmp_path, tiny_data, resnet20_weights, capsys):
    from safetensors import safe_open

    out = tmp_path / "rel.safetensors"
    code, _, err = run(capsys, "score", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--samples", 8, "--out", out)
    assert code == 0, err
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert meta["samples"] == "8" and meta["composite"] == "epsilon_plus" and meta["seed"] == "0"
        assert tuple(f.get_tensor("conv1.weight").shape) == (16, 3, 3, 3)


def test_determinism_two_runs_same_bytes(tmp_path, tiny_data, resnet20_weights, capsys):
    outs = []
    for i in range(2):
        out = tmp_path / f"d{i}.lrpc"
        code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data",
                           tiny_data, "--samples", 8, "--seed", 5, "--out", out)
        assert code == 0, err
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


# ---------------------------------------------------------------- bad inputs


def _compress_args(tmp_path, data, weights, *extra):
    return ("compress", "--arch", "resnet20", "--weights", weights, "--data", data, "--samples", 8,
            "--out", tmp_path / "x.lrpc", *extra)


def test_missing_weights_file(tmp_path, tiny_data, capsys):
    code, _, err = run(capsys, *_compress_args(tmp_path, tiny_data, tmp_path / "nope.pt"))
    assert_one_line_error(code, err, "not found")
    assert not (tmp_path / "x.lrpc").exists()


def test_missing_data(tmp_path, resnet20_weights, capsys):
    code, _, err = run(capsys, *_compress_args(tmp_path, tmp_path / "nodata", resnet20_weights))
    assert_one_line_error(code, err, "not found")


def test_unreadable_lrpc(tmp_path, tiny_data, capsys):
    code, _, err = run(capsys, "evaluate", tmp_path / "missing.lrpc", "--data", tiny_data)
    assert_one_line_error(code, err, "not found")
    d = tmp_path / "dir.lrpc"
    d.mkdir()
    code, _, err = run(capsys, "inspect", d)
    assert_one_line_error(code, err, "not found")


@pytest.mark.parametrize("corrupt, message", [
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:8] + (9).to_bytes(4, "little") + b[12:], "version 9"),
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:], "checksum"),
])
def test_corrupt_files(compressed, tiny_data, capsys, corrupt, message):
    data = compressed.read_bytes()
    compressed.write_bytes(corrupt(data))
    code, _, err = run(capsys, "evaluate", compressed, "--data", tiny_data)
    assert_one_line_error(code, err, message)


def test_offsets_beyond_file(compressed, capsys):
    import hashlib
    import struct

    data = compressed.read_bytes()
    hlen = struct.unpack_from("<Q", data, 12)[0]
    header = json.loads(data[20:20 + hlen])
    header["tensors"][0]["scales"] = [10 ** 9, 32]
    h = json.dumps(header).encode()
    body = data[:12] + struct.pack("<Q", len(h)) + h + data[20 + hlen:-32]
    compressed.write_bytes(body + hashlib.sha256(body).digest())
    code, _, err = run(capsys, "inspect", compressed)
    assert_one_line_error(code, err, "beyond the data section")


def test_weights_do_not_match_arch(tmp_path, tiny_data, resnet20_weights, capsys):
    code, _, err = run(capsys, "compress", "--arch", "resnet32", "--weights", resnet20_weights, "--data", tiny_data,
                       "--out", tmp_path / "x.lrpc")
    assert_one_line_error(code, err, "do not match the architecture")


def test_nan_weights(tmp_path, tiny_data, capsys):
    sd = build_model("resnet20").state_dict()
    sd["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    code, _, err = run(capsys, *_compress_args(tmp_path, tiny_data, tmp_path / "nan.pt"))
    assert_one_line_error(code, err, "NaN or Inf")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/lrpc_pwned",))


def test_pickled_checkpoint_is_refused(tmp_path, tiny_data, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": build_model("resnet20").state_dict(), "x": Evil()}, path)
    code, _, err = run(capsys, *_compress_args(tmp_path, tiny_data, path))
    assert_one_line_error(code, err, "not a weights-only checkpoint")
    assert not Path("/tmp/lrpc_pwned").exists()
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(Evil(), f)
    code, _, err = run(capsys, *_compress_args(tmp_path, tiny_data, tmp_path / "raw.pkl"))
    assert_one_line_error(code, err, "weights")
    assert not Path("/tmp/lrpc_pwned").exists()


def test_samples_zero(tmp_path, tiny_data, resnet20_weights, capsys):
    with pytest.raises(SystemExit) as exc:
        main(list(map(str, ("compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                            "--samples", 0, "--out", tmp_path / "x.lrpc"))))
    assert exc.value.code != 0
    assert "--samples: must be at least 1" in capsys.readouterr().err


def test_empty_data(tmp_path, resnet20_weights, capsys):
    d = tmp_path / "empty"
    d.mkdir()
    for split in ("train", "test"):
        np.savez(d / f"{split}.npz", x=np.zeros((0, 32, 32, 3), np.uint8), y=np.zeros(0, np.int64))
    code, _, err = run(capsys, *_compress_args(tmp_path, d, resnet20_weights))
    assert_one_line_error(code, err, "empty")


def test_labels_out_of_range(tmp_path, resnet20_weights, capsys):
    d = make_npz_folder(tmp_path / "bad")
    z = dict(np.load(d / "train.npz"))
    z["y"][3] = 42
    np.savez(d / "train.npz", **z)
    code, _, err = run(capsys, *_compress_args(tmp_path, d, resnet20_weights))
    assert_one_line_error(code, err, "labels")


def test_wrong_image_shape(tmp_path, resnet20_weights, capsys):
    d = make_npz_folder(tmp_path / "small", size=28)
    code, _, err = run(capsys, *_compress_args(tmp_path, d, resnet20_weights))
    assert_one_line_error(code, err, "28×28")


@pytest.mark.parametrize("bits", [0, 9, 16])
def test_bits_outside_range(tmp_path, tiny_data, resnet20_weights, capsys, bits):
    with pytest.raises(SystemExit):
        main(list(map(str, _compress_args(tmp_path, tiny_data, resnet20_weights, "--bits", bits))))
    assert "bit-widths must be 1..8" in capsys.readouterr().err


def test_unreachable_target_ratio(tmp_path, tiny_data, resnet20_weights, capsys):
    code, _, err = run(capsys, *_compress_args(tmp_path, tiny_data, resnet20_weights, "--target-ratio", 1000))
    assert_one_line_error(code, err, "unreachable")
    assert not (tmp_path / "x.lrpc").exists()


def test_output_folder_missing(tmp_path, tiny_data, resnet20_weights, capsys):
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--out", tmp_path / "nowhere" / "x.lrpc")
    assert_one_line_error(code, err, "output folder does not exist")


def test_existing_output_needs_force_and_is_never_truncated(tmp_path, tiny_data, resnet20_weights, capsys):
    out = tmp_path / "x.lrpc"
    out.write_bytes(b"precious")
    code, _, err = run(capsys, *_compress_args(tmp_path, tiny_data, resnet20_weights))
    assert_one_line_error(code, err, "--force")
    assert out.read_bytes() == b"precious"
    # a failing run with --force leaves the old file intact
    code, _, err = run(capsys, *_compress_args(tmp_path, tiny_data, resnet20_weights, "--force",
                                               "--target-ratio", 1000))
    assert code != 0 and out.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".x.lrpc")] == []


def test_unknown_arch_and_rule(tmp_path, tiny_data, resnet20_weights, capsys):
    code, _, err = run(capsys, "compress", "--arch", "resnet21", "--weights", resnet20_weights, "--data", tiny_data,
                       "--out", tmp_path / "x.lrpc")
    assert_one_line_error(code, err, "unknown architecture")
    code, _, err = run(capsys, *_compress_args(tmp_path, tiny_data, resnet20_weights, "--composite", "magic"))
    assert_one_line_error(code, err, "unknown LRP composite")


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    from lrpcompress import io as lio

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lio.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        lio.atomic_write_bytes(tmp_path / "f.bin", b"data")
    assert list(tmp_path.iterdir()) == []


def test_user_factory_file_needs_explicit_arch(tmp_path, tiny_data, capsys, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from lrpcompress.models import DigitsCNN\n"
                                     "import torch.nn as nn\n"
                                     "def net(num_classes=10):\n"
                                     "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),"
                                     " nn.Flatten(), nn.Linear(4, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("mypkg")
    torch.save(mod.net().state_dict(), tmp_path / "w.pt")
    out = tmp_path / "u.lrpc"
    code, _, err = run(capsys, "compress", "--arch", "mypkg:net", "--weights", tmp_path / "w.pt", "--data", tiny_data,
                       "--samples", 8, "--out", out)
    assert code == 0, err
    code, _, err = run(capsys, "evaluate", out, "--data", tiny_data)
    assert_one_line_error(code, err, "pass --arch")
    code, out_text, err = run(capsys, "evaluate", out, "--data", tiny_data, "--arch", "mypkg:net")
    assert code == 0 and "accuracy" in out_text
    # channels removed from a network lrpcompress knows nothing about: the file stores the slim shapes
    slim = tmp_path / "s.lrpc"
    code, _, err = run(capsys, "compress", "--arch", "mypkg:net", "--weights", tmp_path / "w.pt", "--data", tiny_data,
                       "--samples", 8, "--prune-channels", 0.5, "--no-speed", "--out", slim)
    assert code == 0, err
    code, out_text, err = run(capsys, "evaluate", slim, "--data", tiny_data, "--arch", "mypkg:net")
    assert code == 0 and "accuracy" in out_text, err
    from lrpcompress.packing import load_payload

    assert load_payload(slim).model["shapes"]["0"] == [2, 3]  # out, in channels of the conv
    # the same cut without the least-squares refit: same shapes, other weights
    plain = tmp_path / "p.lrpc"
    code, _, err = run(capsys, "compress", "--arch", "mypkg:net", "--weights", tmp_path / "w.pt", "--data", tiny_data,
                       "--samples", 8, "--prune-channels", 0.5, "--no-channel-reconstruct", "--no-speed", "--out", plain)
    assert code == 0, err
    assert load_payload(plain).model["shapes"] == load_payload(slim).model["shapes"]
    from lrpcompress.compress import load_compressed
    from lrpcompress.structured import apply_shapes

    shapes = load_payload(slim).model["shapes"]
    w = {f: load_compressed(f, apply_shapes(mod.net(), shapes))[0].state_dict()["4.weight"] for f in (slim, plain)}
    assert not torch.equal(w[slim], w[plain])  # the classifier reading the cut channels was refitted
    code, _, err = run(capsys, "compress", "--arch", "mypkg:net", "--weights", tmp_path / "w.pt", "--data", tiny_data,
                       "--samples", 8, "--prune-channels", 0.5, "--channel-refit", "sideways", "--no-speed",
                       "--out", tmp_path / "x.lrpc")
    assert code == 2 and "--channel-refit" in err and not (tmp_path / "x.lrpc").exists()


def test_rules_lists_composites(capsys):
    code, out, _ = run(capsys, "rules")
    assert code == 0 and "epsilon_plus" in out and "paper" in out


def test_finetune_defaults_are_the_librarys():
    import lrpcompress.cli as cli
    from lrpcompress.recovery import FinetuneConfig

    assert (cli.FINETUNE_LR, cli.FINETUNE_BATCH) == (FinetuneConfig.lr, FinetuneConfig.batch_size)
    assert (FinetuneConfig().lr, FinetuneConfig().batch_size) == (0.005, 64)  # the held-out pick (gptq/recipes.md)
    from lrpcompress.recovery import RECOVERY_RECIPE

    assert (cli.RECOVER_LR, cli.RECOVER_BATCH) == (RECOVERY_RECIPE.lr, RECOVERY_RECIPE.batch_size)


def test_console_script_installed():
    assert shutil.which("lrpcompress") is not None


def test_classes_subset_cuts_head_and_evaluates_on_those_classes(tmp_path, tiny_data, resnet20_weights, capsys):
    out, rep = tmp_path / "c.lrpc", tmp_path / "c.json"
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--samples", 8, "--classes", "airplane,1,ship", "--out", out, "--report", rep)
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["classes"] == [0, 1, 8]
    from lrpcompress.compress import load_compressed

    net, payload = load_compressed(out)
    assert payload.model["classes"] == [0, 1, 8] and net.linear.out_features == 3
    code, text, _ = run(capsys, "evaluate", out, "--data", tiny_data)
    assert code == 0 and "on 6 test images" in text  # 2 of each of the 3 classes in the tiny test split


def test_max_drop_picks_a_ratio_on_held_out_training_data(tmp_path, tiny_data, resnet20_weights, capsys):
    rep = tmp_path / "m.json"
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--samples", 8, "--max-drop", 100, "--val-size", 8, "--out", tmp_path / "m.lrpc",
                       "--report", rep)
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["chosen_ratio"] == 24.0
    assert report["compression_ratio"] == pytest.approx(24.0, rel=0.02)


def test_prune_channels_for_a_class_subset_reports_speed(tmp_path, tiny_data, resnet20_weights, capsys):
    out, rep = tmp_path / "s.lrpc", tmp_path / "s.json"
    code, text, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                          "--samples", 8, "--classes", "0,1,8", "--prune-channels", 0.5, "--finetune-epochs", 1,
                          "--finetune-batch", 6, "--out", out, "--report", rep)
    assert code == 0, err
    assert "speed-up" in text
    report = json.loads(rep.read_text())
    assert report["classes"] == [0, 1, 8]
    assert report["params"]["compressed"] < 0.6 * report["params"]["dense"]
    assert report["flops"]["compressed"] < 0.6 * report["flops"]["dense"]
    assert set(report["latency_ms"]) == {"dense", "compressed"}
    assert set(report["latency_ms"]["dense"]) == {"1", "64"}
    assert report["speedup"] == pytest.approx(report["latency_ms"]["dense"]["64"] / report["latency_ms"]["compressed"]["64"],
                                              rel=1e-2)
    from lrpcompress.evaluation import cpu_description

    assert report["cpu"] == cpu_description() and report["cpu"]["threads"] >= 1  # the timing names its CPU
    assert report["cpu"]["allocator"] != "glibc"  # and timed with freed memory kept (steady_allocator), not glibc's
    dep = report["deployed"]  # both models timed again with BatchNorm folded into their layers
    assert dep["batchnorm"] == "folded" and set(dep["latency_ms"]) == {"dense", "compressed"}
    assert dep["speedup"] == pytest.approx(dep["latency_ms"]["dense"]["64"] / dep["latency_ms"]["compressed"]["64"],
                                           rel=1e-2)
    assert "with BatchNorm folded" in text
    assert report["channel_pruning"]["kept_fraction"] == pytest.approx(0.5)
    assert report["channel_pruning"]["settings"]["reconstruct"] is True  # the least-squares refit, by default
    assert report["channel_pruning"]["settings"]["refit_scope"] == "downstream"
    # 12 training images of the 3 classes, one epoch in batches of 6: two steps, which the user is told in one line
    assert report["finetune_steps"] == 2
    assert report["finetune_recipe"] == {"lr": 0.005, "batch_size": 6}
    warned = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and warned[0].startswith("lrpcompress: warning: fine-tuning runs only 2 optimizer steps")
    from lrpcompress.compress import load_compressed

    net, payload = load_compressed(out)
    assert net.widths == [8] * 3 + [16] * 3 + [32] * 3 and net.linear.out_features == 3
    code, text, _ = run(capsys, "evaluate", out, "--data", tiny_data)
    assert code == 0 and "on 6 test images" in text


def test_prune_blocks_with_recovery_reports_blocks_and_speed(tmp_path, tiny_data, resnet20_weights, capsys):
    out, rep = tmp_path / "b.lrpc", tmp_path / "b.json"
    code, text, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                          "--samples", 8, "--prune-blocks", 3, "--block-criterion", "lrp", "--recover-epochs", 1,
                          "--recover-batch", 8, "--bits", 8, "--out", out, "--report", rep)
    assert code == 0, err
    report = json.loads(rep.read_text())
    info = report["block_pruning"]
    assert len(info["removed"]) == 3 and set(info["removed"]) <= set(info["candidates"])
    assert info["removed"] == sorted(info["scores"], key=lambda b: (info["scores"][b], b))[:3]
    assert info["settings"]["criterion"] == "lrp" and info["settings"]["composite"] == "epsilon_plus"
    assert info["recover_epochs"] == 1 and info["recover_recipe"]["batch_size"] == 8
    assert report["channel_pruning"] is None
    assert "blocks removed: " + ", ".join(info["removed"]) in text
    assert report["macs"]["compressed"] < report["macs"]["dense"] and report["speedup"] > 0
    from lrpcompress.compress import load_compressed

    net, payload = load_compressed(out)
    assert payload.model["removed"] == sorted(info["removed"], key=info["candidates"].index)
    assert all(isinstance(net.get_submodule(b), torch.nn.Identity) for b in info["removed"])
    code, text, _ = run(capsys, "evaluate", out, "--data", tiny_data)
    assert code == 0 and "accuracy" in text
    code, text, _ = run(capsys, "inspect", out)
    assert code == 0 and "blocks removed: " + ", ".join(payload.model["removed"]) in text
    # named blocks, with a channel cut on what remains
    named, rep2 = tmp_path / "n.lrpc", tmp_path / "n.json"
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--samples", 8, "--prune-blocks", "layer1.0,layer2.2", "--prune-channels", 0.3,
                       "--channel-criterion", "l1", "--bits", 8, "--no-speed", "--out", named, "--report", rep2)
    assert code == 0, err
    r2 = json.loads(rep2.read_text())
    assert r2["block_pruning"]["removed"] == ["layer1.0", "layer2.2"] and r2["block_pruning"]["scores"] is None
    assert r2["channel_pruning"]["kept_fraction"] < 1.0
    assert r2["block_pruning"]["float_bytes"] == r2["channel_pruning"]["float_bytes"]
    assert load_compressed(named)[1].model["removed"] == ["layer1.0", "layer2.2"]


def test_prune_blocks_on_a_users_own_network_stores_the_removed_blocks(tmp_path, tiny_data, capsys, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "blocknet.py").write_text(
        "import torch.nn as nn\n"
        "class Res(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(4, 4, 3, padding=1)\n"
        "    def forward(self, x):\n"
        "        return x + self.conv(x).relu()\n"
        "def net(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Res(), Res(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(4, num_classes))\n")
    monkeypatch.syspath_prepend(str(pkg))
    import importlib

    mod = importlib.import_module("blocknet")
    torch.save(mod.net().state_dict(), tmp_path / "w.pt")
    out = tmp_path / "u.lrpc"
    code, _, err = run(capsys, "compress", "--arch", "blocknet:net", "--weights", tmp_path / "w.pt", "--data",
                       tiny_data, "--samples", 8, "--prune-blocks", 1, "--block-criterion", "taylor", "--no-speed",
                       "--out", out)
    assert code == 0, err
    from lrpcompress.packing import load_payload

    assert load_payload(out).model["removed"] in (["1"], ["2"])
    code, text, err = run(capsys, "evaluate", out, "--data", tiny_data, "--arch", "blocknet:net")
    assert code == 0 and "accuracy" in text, err


@pytest.mark.parametrize("args,message", [
    (("--prune-blocks", "8"), "cannot remove 8 blocks: the model has 7"),
    (("--prune-blocks", "layer2.0"), "layer2.0 is not a removable block"),
    (("--prune-blocks", "-1"), "at least 0"),
    (("--prune-blocks", ","), "expected a number of blocks"),
    (("--prune-blocks", "2", "--block-criterion", "magic"), "invalid choice"),
    (("--block-criterion", "lrp"), "add --prune-blocks"),
    (("--block-spread",), "add --prune-blocks"),
    (("--block-reference", "mean"), "add --prune-blocks"),
    (("--block-steps", "2"), "add --prune-blocks"),
    (("--prune-blocks", "2", "--block-steps", "3"), "use steps <= count"),
    (("--prune-blocks", "layer1.0", "--block-steps", "2"), "use steps <= count"),
    (("--prune-blocks", "2", "--block-steps", "0"), "at least 1"),
    (("--prune-blocks", "2", "--block-criterion", "l1", "--block-reference", "mean"), "applies to the norm, lrp"),
    (("--prune-blocks", "2", "--prune-channels", "auto", "--target-ratio", "8"), "not combined"),
    (("--recover-epochs", "1"), "add --prune-blocks, --prune-channels"),
    (("--block-speedup", "1"), "must be above 1"),
    (("--block-speedup", "nan"), "must be above 1"),
    (("--block-cost", "macs"), "add --block-speedup"),
    (("--block-costs", "costs.json"), "add --block-speedup"),
    (("--block-speedup", "1.5", "--block-costs", "missing.json"), "cannot read block costs missing.json"),
    (("--block-cost", "watts", "--block-speedup", "1.5"), "invalid choice"),
    (("--prune-blocks", "2", "--block-speedup", "1.5"), "not both"),
    (("--block-speedup", "1.5", "--block-spread"), "not by stage: drop spread"),
    (("--block-speedup", "9", "--block-cost", "macs"), "out of reach: removing all 7 removable blocks"),
])
def test_bad_block_options(tmp_path, tiny_data, resnet20_weights, capsys, args, message):
    out = tmp_path / "x.lrpc"
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--samples", 8, "--no-speed", *args, "--out", out)
    assert_one_line_error(code, err, message)
    assert not out.exists()


def test_block_speedup_target_reports_costs_and_loads_back(tmp_path, tiny_data, resnet20_weights, capsys):
    out, rep = tmp_path / "s.lrpc", tmp_path / "s.json"
    code, text, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                          "--samples", 8, "--block-speedup", 1.4, "--block-cost", "macs", "--block-criterion", "lrp",
                          "--bits", 8, "--out", out, "--report", rep)
    assert code == 0, err
    info = json.loads(rep.read_text())["block_pruning"]
    assert info["settings"]["speedup"] == 1.4 and info["settings"]["cost"] == "macs"
    assert info["costs"]["unit"] == "MACs" and info["predicted_speedup"] >= 1.4
    # equal MACs per block: the fewest blocks that reach 1.4x, the lowest lrp scores
    assert info["removed"] == sorted(info["scores"], key=lambda b: (info["scores"][b], b))[:len(info["removed"])]
    assert f"for a 1.4x macs target, {info['predicted_speedup']:.2f}x predicted" in text
    from lrpcompress.compress import load_compressed

    net, payload = load_compressed(out)
    assert all(isinstance(net.get_submodule(b), torch.nn.Identity) for b in info["removed"])
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("args,message", [
    (("--speedup", "1"), "must be above 1"),
    (("--routes", "0,0.5"), "--routes are what --speedup tries: add --speedup S"),
    (("--speedup", "1.5", "--prune-blocks", "2"), "drop --prune-blocks"),
    (("--speedup", "1.5", "--block-speedup", "1.2"), "drop --block-speedup"),
    (("--speedup", "1.5", "--prune-channels", "0.3"), "drop --prune-channels"),
    (("--speedup", "1.5", "--prune-streams", "0.25"), "drop --prune-streams"),
    (("--speedup", "1.5", "--block-steps", "2"), "drop --block-steps"),
    (("--speedup", "1.5", "--channel-scope", "auto"), "not auto"),
    (("--speedup", "1.5", "--routes", "0,0"), "given twice"),
    (("--speedup", "1.5", "--routes", "0,1"), "must be"),
    (("--speedup", "9", "--block-cost", "macs", "--routes", "0"), "no route reached 9x"),
])
def test_bad_speedup_options(tmp_path, tiny_data, resnet20_weights, capsys, args, message):
    out = tmp_path / "x.lrpc"
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--samples", 8, "--no-speed", *args, "--out", out)
    assert_one_line_error(code, err, message)
    assert not out.exists()


def test_speedup_target_chooses_a_route_on_held_out_images_and_the_file_loads_back(tmp_path, tiny_data,
                                                                                    resnet20_weights, capsys):
    from lrpcompress.compress import load_compressed
    from lrpcompress.data import load_data
    from lrpcompress.evaluation import count_macs
    from lrpcompress.models import load_model

    out, rep = tmp_path / "r.lrpc", tmp_path / "r.json"
    code, text, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                          "--samples", 8, "--speedup", 1.3, "--block-cost", "macs", "--routes", "0,0.5",
                          "--channel-criterion", "l1", "--bits", 8, "--no-speed", "--out", out, "--report", rep)
    assert code == 0, err
    report = json.loads(rep.read_text())
    info = report["route_search"]
    assert info["speedup_target"] == 1.3 and info["val_images"] == 8 and info["costs"]["unit"] == "MACs"
    trials = info["trials"]
    assert [t["channels"] for t in trials] == [0.0, 0.5]
    assert all(t["speedup"] >= 1.3 and t["val_accuracy"] is not None for t in trials)
    chosen = next(t for t in trials if t["channels"] == info["chosen"])
    assert chosen["val_accuracy"] == max(t["val_accuracy"] for t in trials)
    assert f"route: channels {info['chosen']:g} after blocks" in text and text.count("route channels") == 2
    blocks, channels = report["block_pruning"], report["channel_pruning"]
    assert (blocks["removed"] if blocks else []) == chosen["removed"]
    assert (channels is None) == (chosen["channels"] == 0)
    if channels:
        assert channels["settings"]["fraction"] == chosen["channels"]
    net, _ = load_compressed(out)
    x = load_data(tiny_data, "test").tensor(np.arange(1))
    dense = load_model("resnet20", resnet20_weights, num_classes=None)
    assert count_macs(dense, x) / count_macs(net, x) == pytest.approx(chosen["speedup"], rel=1e-3)
    assert all(isinstance(net.get_submodule(b), torch.nn.Identity) for b in chosen["removed"])
    # counted in MACs, the same seed chooses the same route and writes the same bytes
    again = tmp_path / "r2.lrpc"
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--samples", 8, "--speedup", 1.3, "--block-cost", "macs", "--routes", "0,0.5",
                       "--channel-criterion", "l1", "--bits", 8, "--no-speed", "--out", again)
    assert code == 0, err
    assert again.read_bytes() == out.read_bytes()


def test_block_costs_from_an_earlier_report_choose_the_same_blocks_without_measuring(tmp_path, tiny_data,
                                                                                     resnet20_weights, capsys):
    """A cpu target counts the costs a report holds (here written by hand: stage-1 blocks dear), so the choice is the
    lowest-scored cover of those costs, the same on every run; the second run reuses the first run's report."""
    from lrpcompress.blocks import select_by_cost

    blocks = ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]
    costs = {"unit": "ms", "total": 100.0, "blocks": {b: 12.0 if b.startswith("layer1") else 3.0 for b in blocks}}
    given = tmp_path / "costs.json"
    given.write_text(json.dumps(costs))
    reports = []
    for i, source in enumerate((given, tmp_path / "r0.json")):
        out, rep = tmp_path / f"c{i}.lrpc", tmp_path / f"r{i}.json"
        code, text, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data",
                              tiny_data, "--samples", 8, "--block-speedup", 1.25, "--block-costs", source,
                              "--bits", 8, "--no-speed", "--out", out, "--report", rep)
        assert code == 0, err
        info = json.loads(rep.read_text())["block_pruning"]
        assert info["costs"] == costs and info["costs_from"] == str(source)
        assert info["removed"] == select_by_cost(info["scores"], costs["blocks"], 20.0)
        assert f"predicted from the costs in {source})" in text
        reports.append(info)
    assert reports[0]["removed"] == reports[1]["removed"]
    assert (tmp_path / "c0.lrpc").read_bytes() == (tmp_path / "c1.lrpc").read_bytes()
    # costs of another model are refused before any scoring, and no file is written
    costs["blocks"]["layer1.3"] = 12.0
    given.write_text(json.dumps(costs))
    out = tmp_path / "bad.lrpc"
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--samples", 8, "--block-speedup", 1.25, "--block-costs", given, "--no-speed", "--out", out)
    assert_one_line_error(code, err, "another model's: a cost for layer1.3")
    assert not out.exists()


def test_prune_streams_stores_shortcut_maps_that_load_back(tmp_path, tiny_data, resnet20_weights, capsys):
    out, rep = tmp_path / "st.lrpc", tmp_path / "st.json"
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--samples", 8, "--prune-channels", 0.5, "--prune-streams", 0.25, "--channel-criterion", "l1",
                       "--bits", 8, "--no-speed", "--out", out, "--report", rep)
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["channel_pruning"]["settings"]["stream_fraction"] == 0.25
    from lrpcompress.compress import load_compressed
    from lrpcompress.evaluation import count_macs
    from lrpcompress.models import build_model

    net, payload = load_compressed(out)
    x = torch.zeros(1, 3, 32, 32)
    assert count_macs(net, x) < 0.45 * count_macs(build_model("resnet20", 10), x)
    assert net.conv1.out_channels == 12 and net.layer3[0].shortcut.out_planes == 48
    assert "layer2.0.shortcut" in payload.model["shapes"]
    code, text, _ = run(capsys, "evaluate", out, "--data", tiny_data)
    assert code == 0 and "test images" in text


def test_channel_round_to_gives_widths_in_multiples(tmp_path, tiny_data, resnet20_weights, capsys):
    out, rep = tmp_path / "r8.lrpc", tmp_path / "r8.json"
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--samples", 8, "--prune-channels", 0.3, "--channel-round-to", 8, "--channel-criterion", "l1",
                       "--bits", 8, "--no-speed", "--out", out, "--report", rep)
    assert code == 0, err
    assert json.loads(rep.read_text())["channel_pruning"]["settings"]["round_to"] == 8
    from lrpcompress.compress import load_compressed

    net, _ = load_compressed(out)
    assert net.widths == [8] * 3 + [24] * 3 + [48] * 3


def test_channel_scope_macs_removes_the_fraction_of_prunable_macs(tmp_path, tiny_data, resnet20_weights, capsys):
    out, rep = tmp_path / "m.lrpc", tmp_path / "m.json"
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--samples", 8, "--prune-channels", 0.3, "--channel-scope", "macs", "--channel-criterion", "l1",
                       "--bits", 8, "--no-speed", "--out", out, "--report", rep)
    assert code == 0, err
    assert json.loads(rep.read_text())["channel_pruning"]["settings"]["scope"] == "macs"
    from lrpcompress.compress import load_compressed
    from lrpcompress.evaluation import count_macs
    from lrpcompress.models import build_model

    net, _ = load_compressed(out)
    x = torch.zeros(1, 3, 32, 32)
    dense = build_model("resnet20", 10)
    # MACs one channel carries per stage (its conv1 output and conv2 input); layer scope cuts 5, 10, 19 per block
    layer_cut = 3 * 5 * 294912 + 10 * (110592 + 2 * 147456) + 19 * (55296 + 2 * 73728)
    assert abs((count_macs(dense, x) - count_macs(net, x)) - layer_cut) <= 294912 / 2
    assert len(set(net.widths)) > 3  # not the per-layer split (16/32/64 each cut by 30%)


def test_channel_scope_auto_reports_the_held_out_trials(tmp_path, tiny_data, resnet20_weights, capsys):
    out, rep = tmp_path / "a.lrpc", tmp_path / "a.json"
    code, printed, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data",
                             tiny_data, "--samples", 8, "--val-size", 20, "--prune-channels", 0.3, "--channel-scope",
                             "auto", "--channel-criterion", "l1", "--bits", 8, "--no-speed", "--out", out,
                             "--report", rep)
    assert code == 0, err
    info = json.loads(rep.read_text())["channel_pruning"]
    assert set(info["scope_trials"]) == {"layer", "global", "macs"}
    assert info["settings"]["scope"] in info["scope_trials"] and info["scope_trials"][info["settings"]["scope"]]["eligible"]
    assert "channel scope: " + info["settings"]["scope"] in printed


def test_recover_epochs_train_the_slim_model_before_quantization(tmp_path, tiny_data, resnet20_weights, capsys):
    out, rep = tmp_path / "r.lrpc", tmp_path / "r.json"
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--samples", 8, "--prune-channels", 0.5, "--recover-epochs", 1, "--bits", 8, "--no-speed",
                       "--out", out, "--report", rep)
    assert code == 0, err
    info = json.loads(rep.read_text())["channel_pruning"]
    assert info["recover_epochs"] == 1
    from lrpcompress.recovery import RECOVERY_RECIPE

    assert info["recover_feature_distill"] == RECOVERY_RECIPE.feature_distill  # the recipe's weight by default
    assert info["recover_recipe"] == {"lr": RECOVERY_RECIPE.lr, "batch_size": RECOVERY_RECIPE.batch_size}
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--samples", 8, "--prune-channels", 0.5, "--recover-epochs", 1, "--feature-distill", 2.5,
                       "--recover-lr", 0.02, "--recover-batch", 32,
                       "--bits", 8, "--no-speed", "--out", tmp_path / "f.lrpc", "--report", tmp_path / "f.json")
    assert code == 0, err
    info = json.loads((tmp_path / "f.json").read_text())["channel_pruning"]
    assert info["recover_feature_distill"] == 2.5
    assert info["recover_recipe"] == {"lr": 0.02, "batch_size": 32}
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--recover-epochs", 1, "--out", tmp_path / "x.lrpc")
    assert_one_line_error(code, err, "--prune-channels")
    assert not (tmp_path / "x.lrpc").exists()


@pytest.mark.parametrize("args,message", [
    (("--prune-channels", "1.5"), "[0, 1)"),
    (("--prune-streams", "-0.1"), "[0, 1)"),
    (("--channel-criterion", "magic"), "invalid choice"),
    (("--prune-channels", "0.3", "--channel-round-to", "0"), "--channel-round-to"),
    (("--prune-channels", "0.3", "--channel-composite", "zplus"), "unknown LRP composite 'zplus'"),
    (("--prune-channels", "0.3", "--channel-reference", "median"), "invalid choice"),
    (("--device", "tpu"), "device"),
    (("--feature-distill", "-1"), "--feature-distill"),
    (("--prune-channels", "0.3", "--recover-epochs", "1", "--recover-lr", "0"), "--recover-lr"),
    (("--prune-channels", "0.3", "--recover-epochs", "1", "--recover-batch", "0"), "--recover-batch"),
    (("--prune-channels", "0.3", "--recover-lr", "0.02"), "add --recover-epochs"),
    (("--prune-channels", "0.3", "--recover-batch", "32"), "add --recover-epochs"),
])
def test_bad_channel_and_device_options(tmp_path, tiny_data, resnet20_weights, capsys, args, message):
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--out", tmp_path / "x.lrpc", *args)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "x.lrpc").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, tiny_data, resnet20_weights, capsys):
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--out", tmp_path / "x.lrpc", "--device", "cuda")
    assert_one_line_error(code, err, "no CUDA device")


def test_size_target_counts_from_the_unpruned_model(tmp_path, tiny_data, resnet20_weights, capsys):
    """With --prune-channels, --target-ratio R means R× smaller than the model given, not than the slim one."""
    from lrpcompress.models import build_model, dense_bytes

    out, rep = tmp_path / "s.lrpc", tmp_path / "s.json"
    code, printed, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data",
                             tiny_data, "--samples", 8, "--val-size", 8, "--prune-channels", 0.5,
                             "--channel-criterion", "l1", "--target-ratio", 12, "--no-speed", "--out", out,
                             "--report", rep)
    assert code == 0, err
    r = json.loads(rep.read_text())
    dense = dense_bytes(build_model("resnet20", 10))
    assert r["dense_bytes"] == dense
    assert r["channel_pruning"]["float_bytes"] < 0.6 * dense
    assert out.stat().st_size == r["file_bytes"]
    assert 0.98 * dense / 12 <= r["file_bytes"] <= dense / 12  # slim-relative would be about half that
    assert abs(r["compression_ratio"] - 12) < 0.25
    assert f"({dense} B)" in printed


def test_prune_channels_auto_searches_fractions_under_the_size_target(tmp_path, tiny_data, resnet20_weights, capsys):
    from lrpcompress.models import build_model, dense_bytes

    out, rep = tmp_path / "f.lrpc", tmp_path / "f.json"
    code, printed, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data",
                             tiny_data, "--samples", 8, "--val-size", 8, "--prune-channels", "auto",
                             "--channel-fractions", "0,0.5", "--channel-criterion", "l1", "--target-ratio", 10,
                             "--no-speed", "--out", out, "--report", rep)
    assert code == 0, err
    r = json.loads(rep.read_text())
    info = r["channel_pruning"]
    assert set(info["fraction_trials"]) == {"0", "0.5"}
    chosen = info["settings"]["fraction"]
    accs = {float(f): t["val_accuracy"] for f, t in info["fraction_trials"].items()}
    assert accs[chosen] == max(accs.values())
    assert f"channel fraction: {chosen:g}" in printed
    dense = dense_bytes(build_model("resnet20", 10))
    assert r["dense_bytes"] == dense and r["file_bytes"] <= dense / 10


@pytest.mark.parametrize("args,message", [
    (("--prune-channels", "auto"), "size target"),
    (("--prune-channels", "auto", "--target-ratio", "8", "--channel-scope", "auto"), "one scope"),
    (("--prune-channels", "auto", "--target-ratio", "8", "--sparsity", "0.5"), "size search"),
    (("--channel-fractions", "0,0.3"), "--prune-channels auto"),
    (("--prune-channels", "auto", "--target-ratio", "8", "--channel-fractions", "0,1.2"), "[0, 1)"),
    (("--prune-channels", "sometimes"), "expected a number"),
    (("--target-ratio", "8", "--tune-finetuned"), "--finetune-epochs"),
    (("--tune-finetuned", "--finetune-epochs", "1"), "size search"),
    (("--target-ratio", "8", "--tune-finetuned", "--finetune-epochs", "1", "--prune-channels", "auto"), "fraction"),
    (("--target-ratio", "8", "--finetune-scales", "sometimes"), "invalid choice"),
    (("--target-ratio", "8", "--grid", "nf4"), "invalid choice"),
    (("--target-ratio", "8", "--rounding", "adaround"), "invalid choice"),
    (("--target-ratio", "8", "--finetune-epochs", "1", "--finetune-batch", "0"), "--finetune-batch"),
])
def test_bad_channel_search_options(tmp_path, tiny_data, resnet20_weights, capsys, args, message):
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--out", tmp_path / "x.lrpc", *args)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "x.lrpc").exists()


def test_midrise_grid_writes_a_version_2_file_that_evaluates(tmp_path, tiny_data, resnet20_weights, capsys):
    out = tmp_path / "m.lrpc"
    code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                       "--samples", 16, "--grid", "midrise", "--target-ratio", "10", "--out", out,
                       "--report", tmp_path / "r.json", "--no-entropy-coding")
    assert code == 0, err
    assert out.read_bytes()[8] == 2
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["file_bytes"] == out.stat().st_size and rep["compression_ratio"] >= 10 * 0.98
    code, stdout, _ = run(capsys, "evaluate", out, "--data", tiny_data)
    assert code == 0 and f"{rep['accuracy']:.2f}%" in stdout
    code, stdout, _ = run(capsys, "inspect", out, "--json")
    assert code == 0 and {r["grid"] for r in json.loads(stdout)["layers"]} == {"midrise"}


def test_tune_finetuned_trains_every_setting_and_reports_the_pick(tmp_path, tiny_data, resnet20_weights, capsys):
    out, rep = tmp_path / "t.lrpc", tmp_path / "t.json"
    code, printed, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data",
                             tiny_data, "--samples", 8, "--val-size", 8, "--target-ratio", 12, "--finetune-epochs", 1,
                             "--tune-finetuned", "--no-speed", "--out", out, "--report", rep)
    assert code == 0, err
    r = json.loads(rep.read_text())
    assert r["tuned"]["selected_after_finetuning"] is True and "val_accuracy" in r["tuned"]
    assert out.stat().st_size == r["file_bytes"] <= r["dense_bytes"] / 12
    trials = r["tuned"]["trials"]  # one training per setting of the size search
    assert len(trials) >= 2 and max(t["val_accuracy"] for t in trials) == r["tuned"]["val_accuracy"]


def test_rounding_is_reported_and_nearest_is_the_plain_file(tmp_path, tiny_data, resnet20_weights, capsys):
    reports = {}
    for rounding in ("gptq", "nearest"):
        out = tmp_path / f"{rounding}.lrpc"
        args = ("--rounding", rounding) if rounding == "nearest" else ()  # gptq is the default
        code, _, err = run(capsys, "compress", "--arch", "resnet20", "--weights", resnet20_weights, "--data", tiny_data,
                           "--samples", 8, "--allocation", "uniform", "--bits", "3", "--no-speed", "--out", out,
                           "--report", tmp_path / f"{rounding}.json", *args)
        assert code == 0, err
        reports[rounding] = json.loads((tmp_path / f"{rounding}.json").read_text())
        assert reports[rounding]["settings"]["quant"]["rounding"] == rounding
    assert (tmp_path / "gptq.lrpc").read_bytes() != (tmp_path / "nearest.lrpc").read_bytes()
    assert reports["gptq"]["mean_bits"] == reports["nearest"]["mean_bits"] == 3.0


def test_demo_compresses_the_embedded_model_to_8x_without_losing_accuracy(capsys):
    """README's first command: trains on scikit-learn's digits (no download), writes and reloads each file."""
    code, out, err = run(capsys, "demo", "--epochs", 2)
    assert code == 0, err
    cells = [re.split(r"\s{2,}", ln.strip()) for ln in out.splitlines() if "%" in ln and "x " in ln]
    rows = {c[0]: c[1:] for c in cells}
    assert set(rows) == {"float32 (trained)", "lrp (default)", "magnitude 30% + uniform 4-bit", "uniform 4-bit"}
    dense, lrp = int(rows["float32 (trained)"][0]), rows["lrp (default)"]
    assert int(lrp[0]) <= dense / 8 * 1.02 and float(lrp[1].rstrip("x")) >= 8 * 0.98
    float_acc = float(rows["float32 (trained)"][2].rstrip("%"))
    assert float(lrp[2].rstrip("%")) >= float_acc - 1.0
