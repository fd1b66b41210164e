"""On the real pretrained ResNet-20 of ../shared: relevance, and the default compress end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lrpcompress.cli import main
from lrpcompress.data import load_data
from lrpcompress.models import load_model
from lrpcompress.relevance import RelevanceConfig, compute_relevance

from conftest import shared_or_skip

pytestmark = pytest.mark.slow


def test_relevance_on_real_resnet20_leaves_model_untouched():
    w = shared_or_skip("models", "resnet20-cifar10jpeg.pt")
    data = shared_or_skip("data", "cifar10-jpeg")
    model = load_model("resnet20", w)
    train = load_data(data, "train")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = train.tensor(np.arange(8))
    out = model(x).detach()
    r1 = compute_relevance(model, train, RelevanceConfig(samples=64), show_progress=False)
    r2 = compute_relevance(model, train, RelevanceConfig(samples=64), show_progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(model(x), out)
    assert len(r1.weights) == 20
    for k in r1.weights:
        assert torch.equal(r1.weights[k], r2.weights[k])
        assert torch.isfinite(r1.weights[k]).all()
    # z+ on convolutions: relevance of negative (BatchNorm-folded) weights is exactly zero
    bn = model.layer2[0].bn1
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, 1, 1, 1)
    neg = (model.layer2[0].conv1.weight * scale) < 0
    assert torch.all(r1.weights["layer2.0.conv1.weight"][neg] == 0)


def test_default_compress_resnet20_is_4x_smaller_and_reports_truthfully(tmp_path, capsys):
    w = shared_or_skip("models", "resnet20-cifar10jpeg.pt")
    data = shared_or_skip("data", "cifar10-jpeg")
    out, rep = tmp_path / "r20.lrpc", tmp_path / "r20.json"
    code = main(["compress", "--arch", "resnet20", "--weights", str(w), "--data", str(data), "--samples", "128",
                 "--out", str(out), "--report", str(rep)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(rep.read_text())
    assert report["file_bytes"] == out.stat().st_size
    assert report["dense_bytes"] / report["file_bytes"] >= 4.0
    assert report["baseline_accuracy"] == pytest.approx(87.96, abs=0.01)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(data)]) == 0
    assert f"{report['accuracy']:.2f}%" in capsys.readouterr().out
    assert report["accuracy"] > 80.0
