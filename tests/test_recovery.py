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
