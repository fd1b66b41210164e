"""Architectures, checkpoint loading, class restriction."""

from __future__ import annotations

import pytest
import torch

from lrpcompress.errors import LrpcError
from lrpcompress.models import (build_model, count_params, dense_bytes, load_model, read_state_dict,
                                restrict_classes)

from conftest import shared_or_skip


@pytest.mark.parametrize("arch, params", [("resnet20", 269_722), ("resnet32", 464_154), ("resnet44", 658_586),
                                          ("resnet56", 853_018)])
def test_cifar_resnet_sizes(arch, params):
    model = build_model(arch)
    assert count_params(model) == params
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_and_unknown_arch():
    assert build_model("resnet18", 7)(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(LrpcError, match="unknown architecture"):
        build_model("resnet21")
    with pytest.raises(LrpcError, match="pass it explicitly"):
        build_model("os:system", allow_import=False)
    with pytest.raises(LrpcError, match="cannot import"):
        build_model("no_such_pkg.mod:fn")


def test_restrict_classes_keeps_rows_in_order():
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    small = restrict_classes(model, [8, 0, 1])
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(small(x), model(x)[:, [8, 0, 1]], atol=1e-6)
    assert model.linear.out_features == 10


def test_shared_checkpoints_load():
    th = shared_or_skip("models", "resnet20-12fca82f.th")
    pt = shared_or_skip("models", "resnet20-cifar10jpeg.pt")
    a = load_model("resnet20", th)
    b = load_model("resnet20", pt)
    assert not torch.equal(a.conv1.weight, b.conv1.weight)
    assert dense_bytes(b) == 4 * (269_722 + sum(m.running_mean.numel() * 2 for m in b.modules()
                                                  if isinstance(m, torch.nn.BatchNorm2d)))
    strip = lambda keys: {k for k in keys if not k.endswith("num_batches_tracked")}  # noqa: E731
    assert strip(read_state_dict(th)) == strip(read_state_dict(pt))
