"""Architectures, checkpoint loading, class restriction."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lrpcompress.errors import LrpcError
from lrpcompress.models import (build_model, count_params, dense_bytes, fold_batchnorm, load_model, read_state_dict,
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


def _random_bn_stats(model: nn.Module) -> nn.Module:
    """BatchNorms with non-trivial statistics and affine parameters, so folding them is not a no-op."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


@pytest.mark.parametrize("arch, size", [("resnet20", 32), ("resnet18", 64)])
def test_fold_batchnorm_keeps_the_function_and_removes_every_batchnorm(arch, size):
    torch.manual_seed(0)
    model = _random_bn_stats(build_model(arch))
    x = torch.randn(4, 3, size, size)
    folded = fold_batchnorm(model, x[:1])
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max()))
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())  # a copy; the model keeps its
    assert count_params(folded) < count_params(model)  # BatchNorm affine pairs become one bias per layer


def test_fold_batchnorm_leaves_a_batchnorm_not_fed_by_a_layer_and_folds_linear():
    torch.manual_seed(0)
    net = _random_bn_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(),
                                         nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5)))
    x = torch.randn(3, 3, 8, 8)
    folded = fold_batchnorm(net, x[:1])
    assert isinstance(folded[2], nn.BatchNorm2d)  # after a ReLU: nothing to fold into
    assert isinstance(folded[5], nn.Identity) and folded[4].bias is not None
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-5)


class _Tap(nn.Module):
    """A convolution whose output feeds its BatchNorm and, unnormalised, the result too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_batchnorm_refuses_a_layer_that_also_feeds_something_else():
    net = _random_bn_stats(_Tap())
    with pytest.raises(LrpcError, match="deploy the model unfolded"):
        fold_batchnorm(net, torch.randn(1, 3, 4, 4))
