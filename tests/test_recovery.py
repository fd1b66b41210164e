import pytest
import torch

from lrpcompress.recovery import _augment


def _augment_reference(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The per-image loop _augment replaced: same random draws, same crops and flips."""
    n, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=gen)
    dy = torch.randint(0, 9, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = pad[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def test_augment_matches_per_image_crops_and_flips():
    x = torch.randn(37, 3, 32, 32)
    got = _augment(x, torch.Generator().manual_seed(3))
    want = _augment_reference(x, torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    assert not torch.equal(got, x)  # something was cropped or flipped


def test_augment_keeps_pixels_of_an_uncropped_view():
    x = torch.arange(2 * 1 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16)
    gen = torch.Generator().manual_seed(0)
    out = _augment(x, gen)
    assert out.shape == x.shape
    # every output pixel is either padding (0) or a pixel of the same image
    for i in range(2):
        vals = set(out[i].flatten().tolist()) - {0.0}
        assert vals <= set(x[i].flatten().tolist())


def test_fake_quantize_gives_scales_the_lsq_gradient():
    from lrpcompress.quantization import GroupLayout
    from lrpcompress.recovery import fake_quantize

    torch.manual_seed(0)
    w = torch.randn(3, 8) * 2
    layout = GroupLayout((3, 8), 8)
    bits = torch.tensor([2.0, 3.0, 4.0])
    s = torch.tensor([0.5, 0.3, 0.2], requires_grad=True)
    q = fake_quantize(w, layout, bits, s, torch.ones(3, 8))
    q.sum().backward()
    # reference (Esser et al. 2020, eq. 3): d q / d s = round(v) - v inside the range, ±qmax outside
    qmax = (2 ** (bits - 1) - 1)[:, None]
    v = w / s.detach()[:, None]
    ref = torch.where(v.abs() <= qmax, torch.round(v) - v, torch.sign(v) * qmax).sum(1)
    assert torch.allclose(s.grad, ref, atol=1e-5)
    expect = torch.round(v).clamp(-qmax, qmax) * s.detach()[:, None]
    assert torch.equal(q.detach(), expect)


def test_fake_quantize_and_requantize_follow_the_midrise_grid():
    import numpy as np

    from lrpcompress.quantization import GroupLayout, quantize_tensor
    from lrpcompress.recovery import fake_quantize, requantize

    torch.manual_seed(1)
    w = torch.randn(4, 8)
    qt = quantize_tensor(w, np.array([2, 3, 1, 8]), grid="midrise")
    layout = GroupLayout((4, 8), 8)
    bits = torch.tensor([2.0, 3.0, 1.0, 8.0])
    s = torch.from_numpy(qt.scales.astype(np.float32)).requires_grad_(True)
    q = fake_quantize(w, layout, bits, s, torch.ones(4, 8), "midrise")
    assert torch.equal(q.detach(), qt.dequantize())  # the decoder's values, exactly
    assert np.array_equal(requantize(w, qt).codes, qt.codes)
    q.sum().backward()
    # LSQ's gradient on the half-integer grid: level(v) - v inside ±h, ±h outside (1 bit: the sign)
    h = (2 ** (bits - 1) - 0.5)[:, None]
    v = w / s.detach()[:, None]
    inside = torch.where(v.abs() <= h, (torch.floor(v) + 0.5).clamp(-h, h) - v, torch.sign(v) * h)
    ref = torch.where(bits[:, None] == 1, torch.sign(w), inside).sum(1)
    assert torch.allclose(s.grad, ref, atol=1e-4)


@pytest.mark.parametrize("field, value, message", [
    ("epochs", -1, "epochs must be >= 0"), ("lr", 0.0, "learning rate must be > 0"),
    ("lr", float("nan"), "learning rate must be > 0"), ("batch_size", 0, "batch size must be >= 1"),
    ("momentum", 1.0, r"momentum must be in \[0, 1\)"), ("weight_decay", -0.1, "weight decay must be >= 0"),
    ("clip_grad", 0.0, "gradient clip must be > 0"), ("distill", -1.0, "distillation weight must be >= 0"),
    ("temperature", 0.0, "temperature must be > 0"),
    ("feature_distill", -0.5, "feature distillation weight must be >= 0"),
])
def test_finetune_config_rejects_bad_values_with_a_message_naming_the_field(field, value, message):
    from lrpcompress.errors import LrpcError
    from lrpcompress.recovery import FinetuneConfig

    with pytest.raises(LrpcError, match=message):
        FinetuneConfig(**{field: value})
    FinetuneConfig(clip_grad=None, distill=0.0, momentum=0.0)  # the edges that are allowed


def test_steps_counts_the_short_last_batch():
    from lrpcompress.recovery import FinetuneConfig

    assert FinetuneConfig(epochs=2, batch_size=128).steps(1024) == 16
    assert FinetuneConfig(epochs=2, batch_size=128).steps(1025) == 18
    assert FinetuneConfig(epochs=0).steps(50_000) == 0


def _tiny_net_and_data(n: int):
    import numpy as np

    from lrpcompress.data import ImageData

    rng = np.random.default_rng(0)
    data = ImageData(rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8), np.arange(n) % 2, (0.5,), (0.25,),
                     ("a", "b"))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    return net, data


def test_too_few_steps_warn_and_enough_do_not(monkeypatch):
    import warnings

    from lrpcompress import recovery
    from lrpcompress.errors import LrpcWarning

    net, data = _tiny_net_and_data(64)
    cfg = recovery.FinetuneConfig(epochs=2, batch_size=32, distill=0.0)  # 4 steps
    with pytest.warns(LrpcWarning, match=r"only 4 optimizer steps \(2 epoch\(s\) of 64 images at batch 32\)"):
        recovery.finetune_model(net, data, cfg, show_progress=False)
    monkeypatch.setattr(recovery, "MIN_USEFUL_STEPS", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LrpcWarning)
        recovery.finetune_model(net, data, cfg, show_progress=False)


class _Blocks(torch.nn.Module):
    """Two residual-free blocks of conv + ReLU and a head; ``width`` is the first block's inner width."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.block1 = torch.nn.Sequential(torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU(),
                                          torch.nn.Conv2d(width, 6, 3, padding=1), torch.nn.ReLU())
        self.block2 = torch.nn.Sequential(torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)))


def test_hint_points_are_the_blocks_whose_outputs_match_in_shape():
    from lrpcompress.recovery import hint_points

    torch.manual_seed(0)
    x = torch.randn(2, 1, 6, 6)
    # the head's output is the logits (the logit loss's business) and its inner layers are single layers
    assert hint_points(_Blocks(8), _Blocks(8), x) == ["block1", "block2", "head"]
    slim = _Blocks(3)  # a narrower inner width: the block outputs still match
    assert hint_points(slim, _Blocks(8), x) == ["block1", "block2", "head"]
    narrow_out = _Blocks(8)
    narrow_out.block1[2] = torch.nn.Conv2d(8, 5, 3, padding=1)  # block 1's output shrinks: not comparable
    narrow_out.block2[0] = torch.nn.Conv2d(5, 6, 3, padding=1)
    assert hint_points(narrow_out, _Blocks(8), x) == ["block2", "head"]
    assert not any(m._forward_hooks for m in slim.modules())  # the probe's hooks are gone


def test_hint_points_of_a_resnet_are_its_blocks_once_each():
    from lrpcompress.models import build_model
    from lrpcompress.recovery import hint_points

    net = build_model("resnet20")
    names = hint_points(net, net, torch.randn(2, 3, 32, 32))
    # a stage returns its last block's tensor: compared once, at the block
    assert names == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]


def test_feature_loss_is_relative_per_point_and_zero_at_the_teacher():
    from lrpcompress.recovery import feature_loss

    t = {"a": torch.full((2, 3), 2.0), "b": torch.full((2, 3), 100.0)}
    assert float(feature_loss(t, t)) == 0.0
    s = {"a": torch.full((2, 3), 3.0), "b": torch.full((2, 3), 150.0)}  # both 50% off: the same relative error
    assert float(feature_loss(s, t)) == pytest.approx(0.25)


def _block_error(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((student.block1(x) - teacher.block1(x)) ** 2).mean())


@pytest.mark.filterwarnings("ignore:fine-tuning runs only")
def test_feature_distillation_pulls_the_blocks_to_the_teacher():
    import numpy as np

    from lrpcompress.data import ImageData
    from lrpcompress.recovery import FinetuneConfig, finetune_model

    rng = np.random.default_rng(0)
    n = 512
    data = ImageData(rng.integers(0, 256, (n, 6, 6, 1), dtype=np.uint8), rng.integers(0, 2, n), (0.5,), (0.25,),
                     ("a", "b"))
    torch.manual_seed(0)
    teacher = _Blocks(8).eval()
    student = _Blocks(3).eval()  # a slimmer network: it cannot copy the teacher's weights
    x = data.tensor(np.arange(128), torch.device("cpu"))
    base = FinetuneConfig(epochs=3, lr=0.05, batch_size=32, distill=1.0, augment=False, seed=0)
    logits_only = finetune_model(student, data, base, show_progress=False, teacher=teacher)
    with_features = finetune_model(student, data, FinetuneConfig(**{**base.__dict__, "feature_distill": 1.0}),
                                   show_progress=False, teacher=teacher)
    assert _block_error(with_features, teacher, x) < 0.5 * _block_error(logits_only, teacher, x)
    assert not any(m._forward_hooks for net in (teacher, student, with_features) for m in net.modules())


def test_feature_distillation_without_shared_blocks_warns_and_trains_on_logits():
    from lrpcompress.errors import LrpcWarning
    from lrpcompress.recovery import FinetuneConfig, finetune_model

    net, data = _tiny_net_and_data(256)  # a flat Sequential: no block inside it to compare
    cfg = FinetuneConfig(epochs=1, batch_size=2, feature_distill=1.0)
    with pytest.warns(LrpcWarning, match="no block whose output shape"):
        out = finetune_model(net, data, cfg, show_progress=False, teacher=net)
    assert not torch.equal(out[1].weight, net[1].weight)  # it trained all the same
