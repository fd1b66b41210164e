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
