"""Calibration statistics against direct computation on the layers themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lrpcompress.calibration import activation_stats, hessian_supported, input_hessians
from lrpcompress.data import ImageData


def _images(n: int = 12, size: int = 9, seed: int = 0) -> ImageData:
    x = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ImageData(x, np.arange(n) % 2, (0.5,) * 3, (0.25,) * 3, ("a", "b"))


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 5, 3, padding=1, stride=2, bias=True),
    nn.Conv2d(3, 5, (3, 2), padding=(2, 0), dilation=2, bias=False),
    nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"),
])
def test_hessian_gives_the_output_power_of_any_weight_change(conv):
    """E_positions Σ_c (Δ_c · x)² computed by the convolution itself equals Σ_c Δ_c H Δ_cᵀ: the Hessian's
    columns are ordered as the weight's flattened view, padding and strides included."""
    torch.manual_seed(0)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    data = _images()
    x = data.tensor(np.arange(len(data)))
    model(x)  # materialise the lazy layer
    H = input_hessians(model, data, np.arange(len(data)), batch_size=5)
    delta = torch.randn_like(conv.weight)
    probe = nn.Conv2d(3, 5, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False,
                      padding_mode=conv.padding_mode)
    probe.weight.data = delta
    with torch.no_grad():
        out = probe(x)
    direct = float((out.double() ** 2).sum(1).mean())
    D = delta.reshape(5, -1).double()
    assert float((D @ H["0.weight"] * D).sum()) == pytest.approx(direct, rel=1e-5)
    with torch.no_grad():
        feats = model[:3](x).double()
    assert torch.allclose(H["3.weight"], feats.T @ feats / len(feats), atol=1e-6)


def test_grouped_convolutions_get_no_hessian_and_hooks_are_removed():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.Conv2d(6, 4, 1))
    assert not hessian_supported(model[0]) and hessian_supported(model[1])
    model.train()
    H = input_hessians(model, _images(), np.arange(4))
    assert set(H) == {"1.weight"} and H["1.weight"].shape == (6, 6) and H["1.weight"].dtype == torch.float64
    assert model.training and not model[0]._forward_pre_hooks and not model[1]._forward_pre_hooks


def test_hessian_sums_over_batches_like_one_batch():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    data = _images()
    model(data.tensor(np.arange(1)))
    a = input_hessians(model, data, np.arange(12), batch_size=12)
    b = input_hessians(model, data, np.arange(12), batch_size=5)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    x = F.unfold(data.tensor(np.arange(12)), 3).transpose(1, 2).reshape(-1, 27).double()
    assert torch.allclose(a["0.weight"], x.T @ x / len(x), atol=1e-6)


class _Fails(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("broken forward")


def test_a_failing_forward_leaves_no_hooks_and_restores_the_training_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), _Fails())
    model.train()
    for measure in (lambda: input_hessians(model, _images(), np.arange(4)),
                    lambda: activation_stats(model, _images(), indices=np.arange(4))):
        with pytest.raises(RuntimeError, match="broken forward"):
            measure()
        assert model.training
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_stop_at_gives_the_earlier_layers_the_statistics_of_a_full_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    full = activation_stats(model, _images(), indices=np.arange(8))
    early = activation_stats(model, _images(), indices=np.arange(8), stop_at="0")
    assert set(early.output_abs) == {"0.weight"}
    assert torch.allclose(full.input_power["0.weight"], early.input_power["0.weight"])
    assert torch.allclose(full.output_mean["0.weight"], early.output_mean["0.weight"])
