"""Relevance engine: each rule against a direct implementation of its formula, conservation, no side effects."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lrpcompress.errors import LrpcError
from lrpcompress.models import Add, CifarResNet
from lrpcompress.relevance import RelevanceConfig, relevance_batches
from lrpcompress.rules import COMPOSITES, get_composite

COMPOSITE_NAMES = list(COMPOSITES)


class SmallCNN(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=bias)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, bias=bias)
        self.relu2 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(5 * 2 * 2, 3, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.relu2(self.conv2(self.relu1(self.conv1(x))))))


def _contributions(layer: nn.Module, a: torch.Tensor, in_mod, w_mod) -> torch.Tensor:
    """Explicit per-(sample, output unit, input unit) contributions ``in_mod(a)_i * w_mod(w)_ij``.

    Returns shape (N, L, C_out, K): L output positions, K = C_in*kh*kw inputs per position.
    """
    w = w_mod(layer.weight.detach())
    if isinstance(layer, nn.Linear):
        return in_mod(a)[:, None, None, :] * w[None, None]
    cols = F.unfold(in_mod(a), layer.kernel_size, padding=layer.padding, stride=layer.stride)  # N, K, L
    return cols.transpose(1, 2)[:, :, None, :] * w.reshape(w.shape[0], -1)[None, None]


def reference_relevance(model: SmallCNN, x: torch.Tensor, y: torch.Tensor, composite: str, eps: float):
    """Direct LRP: layer by layer, explicit contribution tensors, no autograd."""
    comp = get_composite(composite, eps)
    layers = [model.conv1, model.conv2, model.fc]
    acts = [x]
    with torch.no_grad():
        h = x
        for i, layer in enumerate(layers):
            z = layer(h.flatten(1) if isinstance(layer, nn.Linear) else h)
            h = torch.relu(z) if i < 2 else z
            acts.append(h)
    logits = acts[-1]
    R = torch.zeros_like(logits)
    R[torch.arange(len(y)), y] = logits[torch.arange(len(y)), y]
    out: dict[str, torch.Tensor] = {}
    for i in reversed(range(3)):
        layer, a = layers[i], acts[i]
        a = a.flatten(1) if isinstance(layer, nn.Linear) else a
        rule = comp.rule_for(layer, i == 0)
        Rz = R.reshape(R.shape[0], R.shape[1], -1).transpose(1, 2) if R.dim() > 2 else R[:, None, :]  # N, L, C_out
        Rw = torch.zeros(layer.weight.shape[0], layer.weight[0].numel(), dtype=x.dtype)
        Rcols = None
        for term in rule.terms:
            contrib = sum(_contributions(layer, a, p.inp, p.weight) for p in term.parts)
            b = layer.bias.detach() if layer.bias is not None else torch.zeros(layer.weight.shape[0], dtype=x.dtype)
            zk = contrib.sum(-1) + term.bias(b)
            share = term.coefficient * contrib * (Rz / rule.stabilize(zk))[..., None]
            Rw += share.sum((0, 1))
            cols = share.sum(2)  # N, L, K
            Rcols = cols if Rcols is None else Rcols + cols
        out[f"{['conv1', 'conv2', 'fc'][i]}.weight"] = Rw.reshape(layer.weight.shape)
        if isinstance(layer, nn.Linear):
            R = Rcols[:, 0, :].reshape(acts[i].shape)
        else:
            R = F.fold(Rcols.transpose(1, 2), a.shape[-2:], layer.kernel_size, padding=layer.padding,
                       stride=layer.stride)
    return out


@pytest.fixture()
def cnn_and_data():
    torch.manual_seed(0)
    model = SmallCNN().double().eval()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    return model, x, y


@pytest.mark.parametrize("composite", COMPOSITE_NAMES)
def test_rule_matches_direct_formula(cnn_and_data, composite):
    model, x, y = cnn_and_data
    cfg = RelevanceConfig(composite=composite, epsilon=1e-3, samples=len(x))
    rel = relevance_batches(model, iter([(x, y)]), cfg, show_progress=False)
    ref = reference_relevance(model, x, y, composite, 1e-3)
    for name, expected in ref.items():
        got = rel.weights[name]
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=1e-8, atol=1e-12 * float(expected.abs().max())), name


def test_relevance_sums_over_batches(cnn_and_data):
    model, x, y = cnn_and_data
    cfg = RelevanceConfig(composite="epsilon_plus", samples=len(x))
    whole = relevance_batches(model, iter([(x, y)]), cfg, show_progress=False)
    split = relevance_batches(model, iter([(x[:2], y[:2]), (x[2:], y[2:])]), cfg, show_progress=False)
    for k in whole.weights:
        assert torch.allclose(whole.weights[k], split.weights[k], rtol=1e-10, atol=1e-14)
    assert whole.samples == split.samples == len(x)


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus", "epsilon_alpha2_beta1"])
def test_conservation_chain(composite):
    """Zero biases, ε→0: every layer's weight relevance sums to the starting logits."""
    torch.manual_seed(1)
    model = SmallCNN(bias=False).double().eval()
    x = torch.rand(4, 2, 6, 6, dtype=torch.float64)  # non-negative inputs: z+ conserves at the first layer
    y = torch.tensor([0, 1, 2, 1])
    rel = relevance_batches(model, iter([(x, y)]), RelevanceConfig(composite=composite, epsilon=1e-12, samples=4),
                            show_progress=False)
    start = rel.start_total
    for name, r in rel.weights.items():
        assert float(r.sum()) == pytest.approx(start, rel=1e-6), name
        assert float(rel.channels[name].sum()) == pytest.approx(float(r.sum()), rel=1e-6), name


def test_conservation_resnet_with_batchnorm_folded():
    """Residual additions split relevance; each layer's weights sum to that layer's output relevance."""
    torch.manual_seed(2)
    model = CifarResNet(1, num_classes=4).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.zero_()  # zero shift: folded bias is -mean*scale, so keep mean zero too
            m.running_mean.zero_()
    model.linear.bias.data.zero_()
    model.eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 3])
    rel = relevance_batches(model, iter([(x, y)]), RelevanceConfig(composite="epsilon", epsilon=1e-12, samples=3),
                            show_progress=False)
    for name, r in rel.weights.items():
        assert float(r.sum()) == pytest.approx(float(rel.channels[name].sum()), rel=1e-6, abs=1e-9), name
    assert float(rel.weights["linear.weight"].sum()) == pytest.approx(rel.start_total, rel=1e-9)
    # the first conv sees all the relevance that reaches the input side of the network
    assert float(rel.weights["conv1.weight"].sum()) == pytest.approx(rel.start_total, rel=1e-6)


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
             for n, m in model.named_modules()},
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            [(n, getattr(m, "inplace", None)) for n, m in model.named_modules()])


def test_model_untouched_and_deterministic():
    torch.manual_seed(3)
    model = CifarResNet(1, num_classes=10)
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2)
            m.running_mean.uniform_(-1, 1)
    x = torch.randn(6, 3, 16, 16)
    y = torch.arange(6)
    before = _snapshot(model)
    out_before = model(x).detach().clone()
    cfg = RelevanceConfig(samples=6)
    r1 = relevance_batches(model, iter([(x, y)]), cfg, show_progress=False)
    r2 = relevance_batches(model, iter([(x, y)]), cfg, show_progress=False)
    after = _snapshot(model)
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]), k
    assert before[1:] == after[1:]
    assert torch.equal(model(x), out_before)
    assert not model.training
    for k in r1.weights:
        assert torch.equal(r1.weights[k], r2.weights[k])


def test_zplus_gives_negative_weights_zero_relevance(cnn_and_data):
    model, x, y = cnn_and_data
    rel = relevance_batches(model, iter([(x.abs(), y)]), RelevanceConfig(composite="epsilon_plus", samples=5),
                            show_progress=False)
    w = model.conv2.weight.detach()
    assert torch.all(rel.weights["conv2.weight"][w < 0] == 0)


def test_start_points_differ(cnn_and_data):
    model, x, y = cnn_and_data
    res = {s: relevance_batches(model, iter([(x, y)]), RelevanceConfig(start=s, samples=5), show_progress=False)
           for s in ("true", "predicted", "all")}
    assert not torch.allclose(res["true"].weights["fc.weight"], res["all"].weights["fc.weight"])
    pred = model(x).argmax(1)
    logits = model(x).detach()
    assert res["predicted"].start_total == pytest.approx(float(logits[torch.arange(5), pred].sum()))


def test_contrast_start_is_the_log_probability_gradient(cnn_and_data):
    """``contrast`` starts from d log p_y / d logits: relevance at the output is z_y - sum_k p_k z_k."""
    model, x, y = cnn_and_data
    res = relevance_batches(model, iter([(x, y)]), RelevanceConfig(start="contrast", samples=5), show_progress=False)
    logits = model(x).detach().double()
    want = (logits[torch.arange(5), y] - (logits.softmax(1) * logits).sum(1)).sum()
    assert res.start_total == pytest.approx(float(want), rel=1e-5)
    ref = relevance_batches(model, iter([(x, y)]), RelevanceConfig(start="true", samples=5), show_progress=False)
    assert not torch.allclose(res.channels["fc.weight"], ref.channels["fc.weight"])


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.raises(LrpcError, match=r"'1' of type GELU"):
        relevance_batches(model, iter([(torch.randn(2, 3), torch.tensor([0, 1]))]), RelevanceConfig(samples=2),
                          show_progress=False)


def test_torchvision_resnet_scores_without_side_effects():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=5).eval()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out = model(x).detach()
    rel = relevance_batches(model, iter([(x, torch.tensor([0, 1]))]), RelevanceConfig(samples=2), show_progress=False)
    assert set(rel.weights) == {n for n, p in model.named_parameters() if p.dim() > 1}
    assert all(torch.isfinite(v).all() for v in rel.weights.values())
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    assert torch.equal(model(x), out)
    for k, v in state.items():
        assert torch.equal(v, model.state_dict()[k])


def test_add_module_is_plain_sum():
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(Add()(a, b), a + b)


def test_config_validation_names_the_fix():
    with pytest.raises(LrpcError, match="unknown LRP composite"):
        RelevanceConfig(composite="nope")
    with pytest.raises(LrpcError, match="start point"):
        RelevanceConfig(start="loss?")
    with pytest.raises(LrpcError, match="samples"):
        RelevanceConfig(samples=0)


def _uint8_images(n: int, seed: int = 0):
    import numpy as np

    from lrpcompress.data import ImageData

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return ImageData(x, np.arange(n) % 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), tuple(str(i) for i in range(10)))


def test_referenced_channel_relevance_is_the_first_order_change_of_the_logit():
    """LRP-ε with ε → 0 propagates the gradient, so the score must equal Σ_n |Σ_pos (a − ā)·∂z_y/∂a| computed
    with plain autograd; a tensor read by two layers of one key counts once."""
    import numpy as np

    from lrpcompress.models import build_model
    from lrpcompress.relevance import referenced_channel_relevance

    torch.manual_seed(0)
    model = build_model("resnet20", 10).double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    data = _uint8_images(12)
    readers = {"inner": ["layer1.0.conv2"], "stream": ["layer2.0.conv1", "layer2.0.shortcut"]}
    ref = {"layer1.0.conv2": torch.rand(16, dtype=torch.float64), "layer2.0.conv1": torch.rand(16, dtype=torch.float64),
           "layer2.0.shortcut": torch.rand(16, dtype=torch.float64)}
    ref["layer2.0.shortcut"] = ref["layer2.0.conv1"]
    got = referenced_channel_relevance(model, data, readers, ref,
                                       RelevanceConfig(composite="epsilon", epsilon=1e-12, samples=12),
                                       show_progress=False)
    mods = dict(model.named_modules())
    seen = {}
    hs = [mods[n].register_forward_pre_hook(lambda _m, inp, n=n: seen.__setitem__(n, inp[0]))
          for n in ("layer1.0.conv2", "layer2.0.conv1")]
    x = data.tensor(np.arange(12)).double()
    y = torch.as_tensor(data.y)
    logits = model(x)
    for h in hs:
        h.remove()
    z = logits.gather(1, y[:, None]).sum()
    g1, g2 = torch.autograd.grad(z, [seen["layer1.0.conv2"], seen["layer2.0.conv1"]])
    for key, name, g in (("inner", "layer1.0.conv2", g1), ("stream", "layer2.0.conv1", g2)):
        d = (seen[name].detach() - ref[name].view(1, -1, 1, 1)) * g
        torch.testing.assert_close(got[key], d.sum((2, 3)).abs().sum(0), rtol=1e-6, atol=1e-9)


def test_referenced_channel_relevance_refuses_unknown_layers():
    from lrpcompress.models import build_model
    from lrpcompress.relevance import referenced_channel_relevance

    model = build_model("resnet20", 10).eval()
    with pytest.raises(LrpcError, match="no such layer or no reference input for: layer9.conv"):
        referenced_channel_relevance(model, _uint8_images(4), {"k": ["layer9.conv"]}, {}, show_progress=False)


def test_module_passes_yield_the_blocks_tensors_and_the_start_gradient_and_clean_up():
    """Plain mode: g is autograd's gradient of the true-class logit at the block's output, taken independently
    here; the hooks go when the generator is exhausted, closed early, or raises."""
    from lrpcompress.data import sample_indices
    from lrpcompress.relevance import module_passes

    torch.manual_seed(4)
    model = CifarResNet(2, num_classes=10).eval()
    data = _uint8_images(10)
    cfg = RelevanceConfig(samples=10, batch_size=4)
    before = _snapshot(model)
    steps = list(module_passes(model, data, ["layer2.1", "layer3.1"], cfg, lrp=False, show_progress=False))
    assert [len(s.logits) for s in steps] == [4, 4, 2]
    idx = sample_indices(len(data), cfg.samples, cfg.seed, data.y)
    x, y = data.tensor(idx[:4]), torch.as_tensor(data.y[idx[:4]])
    seen = {}
    h = model.layer3[1].register_forward_hook(lambda _m, inp, out: seen.update(i=inp[0], o=out))
    try:
        logits = model(x)
        g = torch.autograd.grad(logits, seen["o"], grad_outputs=F.one_hot(y, 10).to(logits.dtype))[0]
    finally:
        h.remove()
    first = steps[0]
    assert torch.allclose(first.inputs["layer3.1"], seen["i"].detach())
    assert torch.allclose(first.outputs["layer3.1"], seen["o"].detach())
    assert torch.allclose(first.grads["layer3.1"], g, atol=1e-6)
    assert torch.equal(first.start_grad, F.one_hot(y, 10).to(logits.dtype))
    assert _snapshot(model)[1:] == before[1:]
    # LRP mode closed after one batch: the scope and the hooks are gone
    gen = module_passes(model, data, ["layer2.1"], cfg, lrp=True, show_progress=False)
    next(gen)
    gen.close()
    assert _snapshot(model)[1:] == before[1:]
    with pytest.raises(LrpcError, match="changes the shape"):
        list(module_passes(model, data, ["layer2.0"], cfg, lrp=True, show_progress=False))
    assert _snapshot(model)[1:] == before[1:]
