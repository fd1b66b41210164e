"""Structured pruning: which channels may go, exact mean compensation, physical removal, files that load back."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from lrpcompress.compress import CompressConfig, QuantConfig, compress, load_compressed
from lrpcompress.data import ImageData
from lrpcompress.errors import LrpcError
from lrpcompress.evaluation import count_macs, speed_profiles
from lrpcompress.models import build_model
from lrpcompress.recovery import FinetuneConfig, finetune_model
from lrpcompress.structured import (ChannelPruneConfig, apply_shapes, channel_costs, module_shapes, prunable_groups,
                                   prune_channels, prune_channels_auto, round_kept, select_by_cost,
                                   select_channels)


def random_data(n: int = 32, size: int = 32, classes: int = 10, seed: int = 0) -> ImageData:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return ImageData(x, np.arange(n) % classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), tuple(str(i) for i in range(classes)))


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random but non-trivial BatchNorm statistics, so that folding and compensation are exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def test_cifar_resnet_prunes_only_inner_widths():
    model = build_model("resnet20", 10).eval()
    groups = prunable_groups(model, torch.zeros(1, 3, 32, 32))
    assert [g.root for g in groups] == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert all(g.consumers == [g.root.replace("conv1", "conv2")] for g in groups)


def test_layer_scope_removes_lowest_scores_and_global_keeps_one_per_layer():
    scores = {"a": torch.tensor([3.0, 1.0, 2.0, 0.5]), "b": torch.tensor([10.0, 20.0])}
    sizes = {"a": 4, "b": 2}
    assert select_channels(scores, sizes, {"a": 2, "b": 1}, "layer") == {"a": [1, 3], "b": [0]}
    # global: normalised by the layer mean; 'b' may lose at most one channel
    got = select_channels(scores, sizes, {"a": 1, "b": 0}, "global")
    assert sum(len(v) for v in got.values()) == 5 - 1 - 0 or all(len(v) < sizes[k] for k, v in got.items())
    assert all(len(v) <= sizes[k] - 1 for k, v in got.items())


class OneByOne(nn.Module):
    """1×1 convolutions only: removing a constant channel with mean compensation must be exact."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 1, 1, bias=False)  # one channel: not prunable, so only conv1's are scored
        self.bn2 = nn.BatchNorm2d(1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(1, 10)

    def forward(self, x):
        return self.fc(self.flat(self.pool(torch.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))))))


def test_mean_compensation_is_exact_for_constant_channels():
    torch.manual_seed(0)
    model = trained_like(OneByOne())
    with torch.no_grad():  # channels 2 and 5 become constants: zero filter, positive BatchNorm shift
        model.conv1.weight[[2, 5]] = 0
        model.bn1.bias[[2, 5]] = torch.tensor([0.7, 1.3])
    data = random_data(16)
    x = data.tensor(np.arange(16))
    ref = model(x)
    cfg = ChannelPruneConfig(0.25, criterion="l1", samples=16, reconstruct=False)
    res = prune_channels(model, data, cfg, show_progress=False)
    assert res.removed == {"conv1": [2, 5]}
    assert res.shapes == {"conv1": [6, 3], "bn1": [6], "conv2": [1, 6]}
    torch.testing.assert_close(res.model(x), ref, rtol=1e-5, atol=1e-5)
    plain = prune_channels(model, data, ChannelPruneConfig(0.25, criterion="l1", samples=16, compensate=False,
                                                             reconstruct=False),
                           show_progress=False)
    assert (plain.model(x) - ref).abs().max() > 1e-2  # without compensation the constant is lost
    assert model.conv1.out_channels == 8  # the input model is untouched


def test_mean_referenced_lrp_removes_constant_channels_that_plain_lrp_ranks_high():
    """A constant channel carries much relevance measured from zero, none measured from its mean: the default
    (relevance from the mean a compensated removal leaves) drops it, and the cut is exact."""
    torch.manual_seed(0)
    model = trained_like(OneByOne())
    with torch.no_grad():
        model.conv1.weight[[2, 5]] = 0
        model.bn1.bias[[2, 5]] = torch.tensor([3.0, 5.0])
        model.conv2.weight.abs_()  # positive evidence everywhere, so z+ relevance is large for big inputs
        model.bn2.bias.fill_(5.0)  # the last ReLU passes everything
        model.fc.weight.abs_()  # and every class logit grows with it
    data = random_data(16)
    x = data.tensor(np.arange(16))
    res = prune_channels(model, data, ChannelPruneConfig(0.25, samples=16, reconstruct=False), show_progress=False)
    assert res.removed == {"conv1": [2, 5]}
    assert float(res.scores["conv1"][[2, 5]].abs().max()) < 1e-9 < float(res.scores["conv1"].max())
    torch.testing.assert_close(res.model(x), model(x), rtol=1e-5, atol=1e-5)
    plain = prune_channels(model, data, ChannelPruneConfig(0.25, composite="epsilon_plus", reference="zero", samples=16),
                           show_progress=False)
    order = torch.argsort(plain.scores["conv1"], descending=True)[:2]
    assert sorted(order.tolist()) == [2, 5]  # measured from zero, the constants are the most relevant channels


@pytest.mark.parametrize("steps", [1, 2])
def test_a_reader_behind_a_flatten_is_scored_and_compensated_per_channel(steps):
    """A linear layer reading the flattened feature map sees each channel as a block of features: constant
    channels must still score zero and their removal stay exact (in one cut and in rounds)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 10)).eval()
    with torch.no_grad():
        net[0].weight[[1, 2]] = 0
        net[1].bias[[1, 2]] = torch.tensor([2.0, 3.0])
    data = random_data(16)
    x = data.tensor(np.arange(16))
    res = prune_channels(net, data, ChannelPruneConfig(0.5, samples=16, steps=steps, reconstruct=False), show_progress=False)
    assert res.removed == {"0": [1, 2]} and res.shapes["4"] == [10, 128]
    torch.testing.assert_close(res.model(x), net(x), rtol=1e-5, atol=1e-5)


def test_channel_config_names_the_fix():
    with pytest.raises(LrpcError, match="set compensate=True or reference='zero'"):
        ChannelPruneConfig(0.3, compensate=False)
    ChannelPruneConfig(0.3, compensate=False, reference="zero")
    ChannelPruneConfig(0.3, criterion="l1", compensate=False)  # the reference only concerns lrp
    with pytest.raises(LrpcError, match="unknown LRP composite 'zplus'; choose one of epsilon"):
        ChannelPruneConfig(0.3, composite="zplus")
    with pytest.raises(LrpcError, match="channel reference must be one of mean, zero"):
        ChannelPruneConfig(0.3, reference="median")


@pytest.mark.parametrize("criterion", ["lrp", "l1", "bn_scale", "taylor", "random"])
def test_every_criterion_slims_a_cifar_resnet_that_still_runs(criterion):
    model = trained_like(build_model("resnet20", 10))
    data = random_data(24)
    res = prune_channels(model, data, ChannelPruneConfig(0.5, criterion=criterion, samples=24), show_progress=False)
    assert res.model.widths == [8] * 3 + [16] * 3 + [32] * 3
    assert abs(res.kept_fraction - 0.5) < 1e-9
    x = data.tensor(np.arange(4))
    assert res.model(x).shape == (4, 10)
    assert count_macs(res.model, x[:1]) < 0.6 * count_macs(model, x[:1])


def test_iterative_and_global_pruning():
    model = trained_like(build_model("resnet20", 10))
    data = random_data(24)
    res = prune_channels(model, data, ChannelPruneConfig(0.4, criterion="l1", steps=3, scope="global", samples=24),
                         show_progress=False)
    removed = sum(len(v) for v in res.removed.values())
    assert removed == round(0.4 * sum([16] * 3 + [32] * 3 + [64] * 3))
    assert all(w >= 1 for w in res.model.widths)
    # removed indices refer to the original channels and never repeat
    assert all(len(set(v)) == len(v) and max(v, default=0) < 64 for v in res.removed.values())


def test_global_ranking_can_compare_raw_scores():
    scores = {"a": torch.tensor([3.0, 1.0, 2.0, 0.5]), "b": torch.tensor([2.0, 20.0])}
    sizes = {"a": 4, "b": 2}
    # normalised by the layer means (1.625, 11): a 1.85, 0.62, 1.23, 0.31; b 0.18, 1.82
    assert select_channels(scores, sizes, {"a": 3, "b": 1}, "global") == {"a": [3], "b": [0]}
    # raw: the two smallest values are both in a
    assert select_channels(scores, sizes, {"a": 3, "b": 1}, "global", normalise=False) == {"a": [1, 3], "b": []}


def test_cost_selection_removes_cheapest_score_per_cost_within_the_budget():
    scores = {"a": torch.tensor([4.0, 1.0, 3.0]), "b": torch.tensor([2.0, 2.5, 9.0])}
    sizes, costs = {"a": 3, "b": 3}, {"a": 4.0, "b": 1.0}
    # score per cost, raw: a 1.0, 0.25, 0.75; b 2.0, 2.5, 9.0 -> a1, a2, a0 ... but a keeps one channel
    assert select_by_cost(scores, sizes, costs, 8.0, normalise=False) == {"a": [1, 2], "b": []}
    got = select_by_cost(scores, sizes, costs, 9.0, normalise=False)  # a0 would overshoot by 3 > 1 left: b0 fits
    assert got == {"a": [1, 2], "b": [0]}
    assert select_by_cost(scores, sizes, costs, 0.0) == {"a": [], "b": []}
    with pytest.raises(LrpcError, match="cost"):
        select_by_cost(scores, sizes, {"a": 0.0, "b": 1.0}, 1.0)


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_channel_costs_are_the_macs_one_channel_carries(name):
    """Independent reference: count_macs before and after physically removing one channel of each group."""
    if name == "resnet20":
        model, x = trained_like(build_model("resnet20", 10)), torch.zeros(1, 3, 32, 32)
    else:
        model, x = trained_like(torchvision.models.resnet18(num_classes=10)), torch.zeros(1, 3, 64, 64)
    groups = prunable_groups(model, x)
    costs = channel_costs(model, groups, x)
    base = count_macs(model, x)
    for g in groups[:4] + groups[-2:]:
        slim = apply_shapes(copy_model(model), {**{p: [model.get_submodule(p).out_channels - 1,
                                                        model.get_submodule(p).in_channels] for p in g.producers},
                                               **{c: [model.get_submodule(c).out_channels,
                                                      model.get_submodule(c).in_channels - 1] for c in g.consumers},
                                               **{n: [m.num_features - 1] for n, m in model.named_modules()
                                                  if isinstance(m, nn.BatchNorm2d) and n == g.root.replace("conv", "bn")}})
        assert base - count_macs(slim, x) == costs[g.root], g.root


def test_mac_scope_removes_the_macs_of_the_layer_scope_and_spreads_them_by_score_per_mac():
    model = trained_like(build_model("resnet20", 10))
    data = random_data(24)
    x = data.tensor(np.arange(1))
    groups = prunable_groups(model, x)
    costs = channel_costs(model, groups, x)
    prunable = sum(g.size * costs[g.root] for g in groups)
    base = count_macs(model, x)
    res = prune_channels(model, data, ChannelPruneConfig(0.3, criterion="l1", samples=24, scope="macs"),
                         show_progress=False)
    removed = base - count_macs(res.model, x)
    layer_cut = sum(round(0.3 * g.size) * costs[g.root] for g in groups)  # what layer scope removes
    assert abs(removed - layer_cut) <= max(costs.values()) / 2 and abs(layer_cut - 0.3 * prunable) < 0.03 * prunable
    assert res.model(data.tensor(np.arange(4))).shape == (4, 10)
    # the cut is a threshold on normalised L1 per MAC: every removed channel ranks at or below every kept one
    mods = dict(model.named_modules())
    ratio = {}
    for g in groups:
        l1 = mods[g.root].weight.detach().abs().flatten(1).sum(1).double()
        ratio[g.root] = l1 / l1.mean() / costs[g.root]
    gone = [(float(ratio[r][i]), costs[r]) for r, idx in res.removed.items() for i in idx]
    kept = [(float(v), costs[r]) for r in ratio for i, v in enumerate(ratio[r]) if i not in set(res.removed[r])]
    top = max(v for v, _ in gone)
    # a kept channel ranked below a removed one was skipped at the end for overshooting the budget
    assert all(c > min(c for _, c in gone) for v, c in kept if v < top)
    assert len({len(v) for v in res.removed.values()}) > 1  # not the same count everywhere
    with pytest.raises(LrpcError, match="scope"):
        ChannelPruneConfig(0.3, scope="flops")
    with pytest.raises(LrpcError, match="normalise"):
        ChannelPruneConfig(0.3, normalise=False)


def test_auto_scope_keeps_the_held_out_best_cut_that_is_not_slower():
    model = trained_like(build_model("resnet20", 10))
    fit, val = random_data(24, seed=0), random_data(40, seed=1)
    cfg = ChannelPruneConfig(0.3, criterion="lrp", samples=24, scope="auto")
    res, chosen, trials = prune_channels_auto(model, fit, val, cfg, show_progress=False)
    assert set(trials) == {"layer", "global", "macs"} and trials["layer"]["eligible"]
    eligible = {k: v for k, v in trials.items() if v["eligible"]}
    assert chosen in eligible and trials[chosen]["val_accuracy"] == max(v["val_accuracy"] for v in eligible.values())
    assert all(v["macs"] <= trials["layer"]["macs"] + 0.005 * count_macs(model, fit.tensor(np.arange(1)))
               for v in eligible.values())
    # the chosen cut is the one that scope gives on its own (scores reused, not recomputed differently)
    alone = prune_channels(model, fit, ChannelPruneConfig(0.3, criterion="lrp", samples=24, scope=chosen),
                           show_progress=False)
    assert alone.removed == res.removed
    with pytest.raises(LrpcError, match="prune_channels_auto"):
        prune_channels(model, fit, cfg, show_progress=False)


def test_precomputed_scores_must_match_the_model():
    model = trained_like(build_model("resnet20", 10))
    data = random_data(24)
    first = prune_channels(model, data, ChannelPruneConfig(0.3, criterion="l1", samples=24), show_progress=False)
    again = prune_channels(model, data, ChannelPruneConfig(0.3, criterion="random", samples=24), show_progress=False,
                           scores=first.scores)  # the given scores win over the criterion
    assert again.removed == first.removed
    bad = dict(first.scores)
    bad["layer1.0.conv1"] = bad["layer1.0.conv1"][:-1]
    with pytest.raises(LrpcError, match="do not match"):
        prune_channels(model, data, ChannelPruneConfig(0.3, criterion="l1", samples=24), show_progress=False,
                       scores=bad)
    with pytest.raises(LrpcError, match="one-step"):
        prune_channels(model, data, ChannelPruneConfig(0.3, criterion="l1", samples=24, steps=2), show_progress=False,
                       scores=first.scores)


def test_round_kept_goes_to_the_nearest_multiple_within_the_layer():
    assert [round_kept(k, 16, 8) for k in (1, 3, 4, 11, 12, 16)] == [8, 8, 8, 8, 16, 16]
    assert round_kept(45, 64, 8) == 48 and round_kept(22, 32, 8) == 24
    assert round_kept(3, 4, 8) == 3  # a layer smaller than the multiple is left alone
    assert round_kept(5, 16, 1) == 5
    with pytest.raises(LrpcError, match="round_to"):
        ChannelPruneConfig(0.3, round_to=0)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_rounded_widths_are_multiples_and_keep_the_best_channels(scope):
    model = trained_like(build_model("resnet20", 10))
    data = random_data(24)
    res = prune_channels(model, data, ChannelPruneConfig(0.3, criterion="l1", samples=24, round_to=8, scope=scope),
                         show_progress=False)
    assert all(w % 8 == 0 for w in res.model.widths)
    if scope == "layer":
        assert res.model.widths == [8] * 3 + [24] * 3 + [48] * 3
    mods = dict(model.named_modules())
    for root, idx in res.removed.items():  # the lowest-L1 filters of each layer went
        l1 = mods[root].weight.detach().abs().flatten(1).sum(1)
        kept = sorted(set(range(len(l1))) - set(idx))
        if idx:
            assert float(l1[idx].max()) <= float(l1[kept].min())
    x = data.tensor(np.arange(4))
    assert res.model(x).shape == (4, 10)


def test_rounds_of_a_static_criterion_equal_one_cut():
    """Inner widths only, no refit: the L1 norms of the kept filters do not change when others are cut, so
    pruning in rounds must remove the same channels and (compensating with the input model's means in every
    round) give the same model. (With streams cut too, the writers' norms change as their inputs shrink; with
    the refit after every round, the refitted filters' norms do.)"""
    streams = 0.0
    model = trained_like(build_model("resnet20", 10))
    data = random_data(24)
    x = data.tensor(np.arange(8))
    one = prune_channels(model, data, ChannelPruneConfig(0.5, criterion="l1", samples=24, stream_fraction=streams,
                                                         reconstruct=False), show_progress=False)
    three = prune_channels(model, data, ChannelPruneConfig(0.5, criterion="l1", samples=24, steps=3,
                                                           stream_fraction=streams, reconstruct=False),
                           show_progress=False)
    assert one.removed == three.removed
    torch.testing.assert_close(three.model(x), one.model(x), rtol=1e-4, atol=1e-4)


def test_rounds_refit_before_each_rescore(monkeypatch):
    """With the refit on, every round refits the layers cut so far before the next round scores the model, and
    the final model is the refit of the final channel set: a one-step cut that removes the same channels (given
    as scores) gives the same function, since the closed-form refit overwrites every layer from the first
    reader on."""
    import lrpcompress.structured as structured

    model = trained_like(build_model("resnet20", 10))
    data = random_data(24)
    x = data.tensor(np.arange(8))
    calls: list[list[str]] = []
    real = structured._reconstruct

    def spy(net, dense, readers, *args, **kwargs):
        calls.append(sorted(readers))
        return real(net, dense, readers, *args, **kwargs)

    monkeypatch.setattr(structured, "_reconstruct", spy)
    three = prune_channels(model, data, ChannelPruneConfig(0.5, criterion="l1", samples=24, steps=3),
                           show_progress=False)
    assert len(calls) == 3 and calls[0] and calls[-1] == calls[1]  # every layer loses some channels in round 1
    monkeypatch.setattr(structured, "_reconstruct", real)
    mods = dict(model.named_modules())
    scores = {}
    for root, idx in three.removed.items():
        s = torch.ones(mods[root].out_channels)
        s[idx] = 0.0
        scores[root] = s
    one = prune_channels(model, data, ChannelPruneConfig(0.5, criterion="l1", samples=24), show_progress=False,
                         scores=scores)
    assert one.removed == three.removed
    torch.testing.assert_close(three.model(x), one.model(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name,streams", [("resnet18", 0.0), ("mobilenet_v2", 0.0), ("resnet18", 0.25),
                                          ("mobilenet_v2", 0.25)])
def test_torchvision_models_slim_and_rebuild_from_shapes(name, streams):
    torch.manual_seed(0)
    model = trained_like(getattr(torchvision.models, name)(num_classes=10))
    data = random_data(8, size=32)
    res = prune_channels(model, data, ChannelPruneConfig(0.3, criterion="l1", samples=8, stream_fraction=streams),
                         show_progress=False)
    if streams:  # residual streams (option-B downsample convolutions, inverted-residual additions) shrink too
        x1 = data.tensor(np.arange(1))
        assert count_macs(res.model, x1) < count_macs(prune_channels(model, data, ChannelPruneConfig(
            0.3, criterion="l1", samples=8), show_progress=False).model, x1)
    assert res.shapes, "something was removed"
    x = data.tensor(np.arange(2))
    out = res.model(x)
    fresh = apply_shapes(getattr(torchvision.models, name)(num_classes=10), res.shapes)
    fresh.load_state_dict(res.model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), out)
    assert module_shapes(fresh) == module_shapes(res.model)


def test_apply_shapes_refuses_bad_entries():
    with pytest.raises(LrpcError, match="not a module"):
        apply_shapes(build_model("resnet20", 10), {"layer9.conv1": [4, 4]})
    with pytest.raises(LrpcError, match="outside"):
        apply_shapes(build_model("resnet20", 10), {"layer1.0.conv1": [32, 16]})
    with pytest.raises(LrpcError, match="does not fit"):
        apply_shapes(build_model("resnet20", 10), {"layer1.0.bn1": [4, 4]})
    with pytest.raises(LrpcError, match="list of ints"):
        apply_shapes(build_model("resnet20", 10), {"layer1.0.conv1": ["8", 16]})


def test_slim_model_compresses_into_a_file_that_loads_back(tmp_path):
    model = trained_like(build_model("resnet20", 10))
    data = random_data(24)
    slim = prune_channels(model, data, ChannelPruneConfig(0.3, criterion="l1", samples=24), show_progress=False).model
    cfg = CompressConfig(quant=QuantConfig(allocation="uniform", importance="none", bits=8), bias_correction=False)
    res = compress(slim, data, cfg, "resnet20", show_progress=False)
    path = tmp_path / "slim.lrpc"
    res.compressed.save(path)
    loaded, payload = load_compressed(path)
    assert payload.model["widths"] == slim.widths
    x = data.tensor(np.arange(4))
    torch.testing.assert_close(loaded(x), res.compressed.to_module()(x))
    assert (loaded(x) - slim(x)).abs().max() < 0.1 * slim(x).abs().max()  # 8-bit: close to the float slim model


def test_shapes_are_stored_for_slimmed_torchvision_models(tmp_path):
    torch.manual_seed(0)
    model = trained_like(torchvision.models.resnet18(num_classes=10))
    data = random_data(8)
    slim = prune_channels(model, data, ChannelPruneConfig(0.5, criterion="l1", samples=8), show_progress=False)
    cfg = CompressConfig(quant=QuantConfig(allocation="uniform", importance="none", bits=8), bias_correction=False)
    res = compress(slim.model, data, cfg, "resnet18", show_progress=False)
    assert res.compressed.model_spec["shapes"] == slim.shapes
    path = tmp_path / "r18.lrpc"
    res.compressed.save(path)
    loaded, _ = load_compressed(path)
    assert module_shapes(loaded) == module_shapes(slim.model)


def test_recovery_finetuning_runs_on_a_slim_model():
    model = trained_like(build_model("resnet20", 10))
    data = random_data(32)
    slim = prune_channels(model, data, ChannelPruneConfig(0.5, criterion="l1", samples=32), show_progress=False).model
    before = {k: v.clone() for k, v in slim.state_dict().items()}
    ft = finetune_model(slim, data, FinetuneConfig(epochs=1, batch_size=16, train_bn=True), show_progress=False,
                        teacher=model)
    assert module_shapes(ft) == module_shapes(slim)
    assert any(not torch.equal(before[k], v) for k, v in ft.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in slim.state_dict().items())  # the input is untouched


def test_speed_profiles_report_fewer_macs_and_params_for_a_slim_model():
    model = build_model("resnet20", 10)
    slim = build_model("resnet20", 10, [8] * 3 + [16] * 3 + [32] * 3)
    dense_p, slim_p = speed_profiles([model, slim], torch.zeros(1, 3, 32, 32), batch_sizes=(1, 4), repeats=3)
    assert dense_p["macs"] == 40551040  # the known count for ResNet-20 on 32×32 (conv + linear)
    assert slim_p["macs"] < 0.55 * dense_p["macs"] and slim_p["params"] < 0.55 * dense_p["params"]
    assert set(dense_p["latency_ms"]) == {"1", "4"} and all(v > 0 for v in dense_p["latency_ms"].values())
    assert dense_p["peak_memory_bytes"]["4"] > 4 * dense_p["params"]


# ------------------------------------------------------------------ residual streams

def test_stream_groups_cover_every_stage_and_are_off_by_default():
    model = build_model("resnet20", 10).eval()
    x = torch.zeros(1, 3, 32, 32)
    assert not any(g.stream for g in prunable_groups(model, x))
    streams = {g.root: g for g in prunable_groups(model, x, streams=True) if g.stream}
    assert list(streams) == ["conv1", "layer2.0.conv2", "layer3.0.conv2"]
    assert streams["conv1"].producers == ["conv1"] + [f"layer1.{b}.conv2" for b in range(3)]
    assert "layer2.0.shortcut" in streams["conv1"].consumers  # the next stage's shortcut reads the stream
    assert "layer2.0.shortcut" not in streams["layer2.0.conv2"].consumers  # ...but writes the next one uncoupled
    assert "linear" in streams["layer3.0.conv2"].consumers


def _zero_stream_channels(model: nn.Module, producers: list[str], channels: list[int]) -> None:
    """Make stream channels exactly zero: zero filters and zero BatchNorm scale/shift after every producer."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for p in producers:
            mods[p].weight[channels] = 0
            bn = mods[p.replace("conv", "bn")]
            bn.weight[channels] = 0
            bn.bias[channels] = 0


def test_cutting_streams_equals_zeroing_their_channels():
    """Independent reference: a stream channel whose every writer is zeroed carries 0; cutting it must not
    change the output. In stages 2 and 3 only channels the option-A shortcut pads with zeros are chosen."""
    import torch_pruning as tp

    from lrpcompress.structured import _graph

    model = trained_like(build_model("resnet20", 10), seed=1)
    x = random_data(8).tensor(np.arange(8))
    cut = {"conv1": [1, 5, 6], "layer2.0.conv2": [0, 3, 30], "layer3.0.conv2": [2, 50, 63]}
    ref_model = copy_model(model)
    groups = {g.root: g for g in prunable_groups(model, x[:1], streams=True)}
    for root, idx in cut.items():
        _zero_stream_channels(ref_model, groups[root].producers, idx)
    ref = ref_model(x)
    graph = _graph(ref_model, x[:1])
    mods = dict(ref_model.named_modules())
    for root, idx in cut.items():
        graph.get_pruning_group(mods[root], tp.prune_conv_out_channels, idxs=idx).prune()
    assert ref_model.conv1.out_channels == 13 and ref_model.layer2[0].shortcut.out_planes == 29
    assert ref_model.linear.in_features == 61
    # 8 + 8 pads, 3 more from the cut stage-1 channels, minus the 3 cut outputs (all pads)
    assert ref_model.layer2[0].shortcut.channel_map.count(-1) == 8 + 8 + 3 - 3
    torch.testing.assert_close(ref_model(x), ref, rtol=1e-5, atol=1e-5)
    # a second cut on the already cut model (shortcuts now gather by their maps): original stage-1 channel 9
    # is index 6 now; original stage-2 channel 29 (a pad) is index 27
    twice = copy_model(model)
    for root, idx in {"conv1": [1, 5, 6, 9], "layer2.0.conv2": [0, 3, 29, 30], "layer3.0.conv2": [2, 50, 63]}.items():
        _zero_stream_channels(twice, groups[root].producers, idx)
    graph = _graph(ref_model, x[:1])
    mods = dict(ref_model.named_modules())
    graph.get_pruning_group(mods["conv1"], tp.prune_conv_out_channels, idxs=[6]).prune()
    graph = _graph(ref_model, x[:1])
    graph.get_pruning_group(mods["layer2.0.conv2"], tp.prune_conv_out_channels, idxs=[27]).prune()
    assert ref_model.conv1.out_channels == 12 and ref_model.layer2[0].shortcut.out_planes == 28
    torch.testing.assert_close(ref_model(x), twice.eval()(x), rtol=1e-5, atol=1e-5)


def copy_model(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


@pytest.mark.parametrize("criterion", ["lrp", "l1", "taylor"])
def test_stream_pruning_slims_and_round_trips_through_a_file(tmp_path, criterion):
    model = trained_like(build_model("resnet20", 10))
    data = random_data(24)
    res = prune_channels(model, data, ChannelPruneConfig(0.5, stream_fraction=0.25, criterion=criterion, samples=24),
                         show_progress=False)
    slim = res.model
    assert slim.conv1.out_channels == 12 and slim.layer2[0].bn2.num_features == 24 and slim.linear.in_features == 48
    x = data.tensor(np.arange(4))
    assert count_macs(slim, x[:1]) < 0.4 * count_macs(model, x[:1])
    fresh = apply_shapes(build_model("resnet20", 10), res.shapes)
    fresh.load_state_dict(slim.state_dict())
    torch.testing.assert_close(fresh.eval()(x), slim(x))
    cfg = CompressConfig(quant=QuantConfig(allocation="uniform", importance="none", bits=8), bias_correction=False)
    out = compress(slim, data, cfg, "resnet20", show_progress=False)
    path = tmp_path / "streams.lrpc"
    out.compressed.save(path)
    loaded, _ = load_compressed(path)
    assert module_shapes(loaded) == module_shapes(slim)
    torch.testing.assert_close(loaded(x), out.compressed.to_module()(x))


def test_stream_compensation_keeps_outputs_closer():
    model = trained_like(build_model("resnet20", 10), seed=2)
    data = random_data(32)
    x = data.tensor(np.arange(32))
    ref = model(x)
    err = {}
    for comp in (True, False):
        res = prune_channels(model, data, ChannelPruneConfig(0.0, stream_fraction=0.25, criterion="l1", samples=32,
                                                             compensate=comp, reconstruct=False), show_progress=False)
        with torch.no_grad():
            err[comp] = float((res.model(x) - ref).pow(2).mean())
    assert err[True] < err[False]


def test_bad_shortcut_maps_are_refused():
    with pytest.raises(LrpcError, match="channel map"):
        apply_shapes(build_model("resnet20", 10), {"layer2.0.shortcut": [2, 16, 0, 16]})
    with pytest.raises(LrpcError, match="channel map"):
        apply_shapes(build_model("resnet20", 10), {"layer2.0.shortcut": [3, 16, 0, 1]})
    with pytest.raises(LrpcError, match="stream fraction|residual-stream"):
        ChannelPruneConfig(0.1, stream_fraction=1.0)


def test_gradual_pruning_reaches_the_one_shot_shapes_within_the_same_training_budget():
    from lrpcompress.structured import prune_gradually

    model = trained_like(build_model("resnet20", 10))
    data = random_data(32)
    cfg = ChannelPruneConfig(0.5, criterion="l1", samples=16, stream_fraction=0.25)
    one_shot = prune_channels(model, data, cfg, show_progress=False)
    ft = FinetuneConfig(epochs=1, batch_size=8, train_bn=True)
    res = prune_gradually(model, data, cfg, ft, rounds=3, show_progress=False)

    def counts(shapes):  # a shortcut's channel map depends on which channels were chosen; its sizes do not
        return {k: v[:2] for k, v in shapes.items()}

    assert counts(module_shapes(res.model)) == counts(module_shapes(one_shot.model))
    assert counts(res.shapes) == counts(one_shot.shapes)
    assert res.kept_fraction == pytest.approx(one_shot.kept_fraction)
    assert all(len(set(v)) == len(v) for v in res.removed.values())
    assert {k: len(v) for k, v in res.removed.items()} == {k: len(v) for k, v in one_shot.removed.items()}
    assert model.conv1.out_channels == 16  # the input model is untouched
    with pytest.raises(LrpcError, match="rounds"):
        prune_gradually(model, data, cfg, ft, rounds=0, show_progress=False)


def test_refit_recovers_a_removed_channel_that_copies_a_kept_one():
    """Independent reference: channel 2 is an exact copy of channel 0 after BatchNorm and ReLU, channel 5 of
    channel 1. Removing 2 and 5 and refitting the reader by least squares must give the dense output back
    (the reader's weights of 0 and 1 absorb those of 2 and 5); mean compensation alone cannot."""
    torch.manual_seed(0)
    model = trained_like(OneByOne())
    with torch.no_grad():
        for copy_, src in ((2, 0), (5, 1)):
            model.conv1.weight[copy_] = model.conv1.weight[src]
            for t in (model.bn1.running_mean, model.bn1.running_var, model.bn1.weight, model.bn1.bias):
                t[copy_] = t[src]
    data = random_data(16)
    x = data.tensor(np.arange(16))
    ref = model(x)
    scores = {"conv1": torch.tensor([1.0, 1, 0, 1, 1, 0, 1, 1])}
    cfg = ChannelPruneConfig(0.25, criterion="l1", samples=16, reconstruct=True, damp=1e-10)
    res = prune_channels(model, data, cfg, show_progress=False, scores=scores)
    assert res.removed == {"conv1": [2, 5]}
    torch.testing.assert_close(res.model(x), ref, rtol=1e-4, atol=1e-4)
    w = model.conv2.weight.detach().flatten()
    expect = torch.cat([w[:2] + w[[2, 5]], w[[3, 4, 6, 7]]])
    torch.testing.assert_close(res.model.conv2.weight.detach().flatten(), expect, rtol=1e-4, atol=1e-4)
    mean_only = prune_channels(model, data, ChannelPruneConfig(0.25, criterion="l1", samples=16, reconstruct=False),
                               show_progress=False,
                               scores=scores)
    assert (mean_only.model(x) - ref).abs().max() > 1e-2


def _bn_output(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    box = {}
    h = model.get_submodule(name).register_forward_hook(lambda _m, _i, out: box.setdefault("y", out.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return box["y"]


def test_refit_never_does_worse_than_mean_compensation_on_the_first_reader():
    """The mean-compensated reader is one of the weights the least-squares refit chooses among: on the
    reference samples its output error can only be smaller (the first refitted layer sees the dense inputs)."""
    model = trained_like(build_model("resnet20", 10), seed=3)
    data = random_data(32)
    x = data.tensor(np.arange(32))
    errs = {}
    for rec in (False, True):
        res = prune_channels(model, data, ChannelPruneConfig(0.5, criterion="l1", samples=32, reconstruct=rec,
                                                             damp=1e-8), show_progress=False)
        errs[rec] = {name: float((_bn_output(res.model, name, x) - _bn_output(model, name, x)).pow(2).mean())
                     for name in ("layer1.0.bn2", "linear")}
    assert errs[True]["layer1.0.bn2"] <= errs[False]["layer1.0.bn2"] + 1e-9
    assert errs[True]["linear"] < errs[False]["linear"]


@pytest.mark.parametrize("arch", ["resnet20", "resnet18"])
def test_refit_with_streams_keeps_shapes_and_round_trips(tmp_path, arch):
    model = (trained_like(build_model("resnet20", 10)) if arch == "resnet20"
             else trained_like(torchvision.models.resnet18(num_classes=10)))
    data = random_data(16, size=32)
    x = data.tensor(np.arange(4))
    cfg = ChannelPruneConfig(0.5, stream_fraction=0.25, criterion="l1", samples=16, reconstruct=False)
    plain = prune_channels(model, data, cfg, show_progress=False)
    refit = prune_channels(model, data, replace(cfg, reconstruct=True), show_progress=False)
    assert refit.removed == plain.removed and refit.shapes == plain.shapes
    assert not torch.equal(refit.model.state_dict()[next(k for k in refit.shapes if "conv2" in k) + ".weight"],
                           plain.model.state_dict()[next(k for k in plain.shapes if "conv2" in k) + ".weight"])
    fresh = apply_shapes(build_model("resnet20", 10) if arch == "resnet20"
                         else torchvision.models.resnet18(num_classes=10), refit.shapes)
    fresh.load_state_dict(refit.model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), refit.model(x))
    with pytest.raises(LrpcError, match="damp"):
        ChannelPruneConfig(0.5, reconstruct=True, damp=0.0)


def test_downstream_refit_corrects_layers_no_cut_touched():
    """``refit_scope='downstream'`` refits every layer from the first reader on: layers before it keep their
    weights, the first layer that reads only uncut (but drifted) inputs gets an error no larger than the
    weights it had (it sees the same inputs in both scopes), and the logits end closer to the dense ones."""
    model = trained_like(build_model("resnet20", 10), seed=4)
    data = random_data(32)
    x = data.tensor(np.arange(32))
    cfg = ChannelPruneConfig(0.5, criterion="l1", samples=32, damp=1e-8)
    assert cfg.refit_scope == "downstream"  # the default
    readers = prune_channels(model, data, replace(cfg, refit_scope="readers"), show_progress=False)
    down = prune_channels(model, data, cfg, show_progress=False)
    assert down.removed == readers.removed and down.shapes == readers.shapes
    rs, ds = readers.model.state_dict(), down.model.state_dict()
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight"):  # before / the first reader
        torch.testing.assert_close(ds[name], rs[name])
    assert not torch.equal(ds["layer1.1.conv1.weight"], rs["layer1.1.conv1.weight"])  # no cut reaches its input
    assert not torch.equal(ds["linear.weight"], rs["linear.weight"])
    keep = {"layer1.1.bn1": [c for c in range(16) if c not in down.removed["layer1.1.conv1"]],
            "linear": list(range(10))}
    err = {name: [float((_bn_output(r.model, name, x) - _bn_output(model, name, x)[:, keep[name]]).pow(2).mean())
                  for r in (readers, down)] for name in keep}
    assert err["layer1.1.bn1"][1] <= err["layer1.1.bn1"][0] + 1e-9
    assert err["linear"][1] < err["linear"][0]


def test_refit_scope_is_validated():
    with pytest.raises(LrpcError, match="refit_scope must be one of"):
        ChannelPruneConfig(0.5, refit_scope="everything")


def test_refit_reaches_readers_of_a_layer_cut_to_one_channel():
    """A MAC-aware cut can leave a layer one channel (it then stops being a prunable group): its reader is
    still refitted, and the producer's kept row is matched to the right dense channel (downstream)."""
    torch.manual_seed(0)
    model = trained_like(build_model("resnet20", 10))
    data = random_data(16)
    cfg = ChannelPruneConfig(0.3, "l1", scope="macs", samples=8, reconstruct=False)
    plain = prune_channels(model, data, cfg, show_progress=False)
    ones = [n for n, s in plain.shapes.items() if n.endswith("conv1") and s[0] == 1]
    assert ones  # the setting this test is about
    for scope in ("readers", "downstream"):
        res = prune_channels(model, data, replace(cfg, reconstruct=True, refit_scope=scope), show_progress=False)
        assert res.shapes == plain.shapes
        for n in ones:
            reader = n.removesuffix("conv1") + "conv2.weight"
            assert not torch.equal(res.model.state_dict()[reader], plain.model.state_dict()[reader])
