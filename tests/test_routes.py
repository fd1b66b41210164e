"""Speed-target routes: config checks, every route reaching the target in exact MACs, the held-out choice."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from lrpcompress.blocks import BlockPruneConfig, measure_block_costs, removable_blocks
from lrpcompress.errors import LrpcError
from lrpcompress.evaluation import accuracy, count_macs
from lrpcompress.models import build_model
from lrpcompress.recovery import RECOVERY_RECIPE
from lrpcompress.routes import RouteSearch, choose_route, measured_speedup, shape_alike
from lrpcompress.structured import ChannelPruneConfig
from test_structured import random_data, trained_like

BLOCKS = BlockPruneConfig(samples=16, batch_size=16)
CHANNELS = ChannelPruneConfig(0.0, "l1", samples=16, batch_size=16)
NO_TRAINING = RECOVERY_RECIPE.__class__(epochs=0)


@pytest.fixture()
def resnet20():
    torch.manual_seed(0)
    return trained_like(build_model("resnet20", 10))


@pytest.mark.parametrize("kwargs,message", [
    ({"speedup": 1.0}, "above 1"),
    ({"speedup": float("inf")}, "above 1"),
    ({"speedup": True}, "above 1"),
    ({"channel_fractions": ()}, "non-empty tuple"),
    ({"channel_fractions": [0.0, 0.5]}, "non-empty tuple"),
    ({"channel_fractions": (0.0, 1.0)}, "in [0, 1), got 1.0"),
    ({"channel_fractions": (0.3, 0.3)}, "given twice: 0.3, 0.3"),
    ({"blocks": BlockPruneConfig(speedup=1.2)}, "sets its own block target"),
    ({"blocks": BlockPruneConfig(count=2)}, "sets its own block target"),
    ({"blocks": BlockPruneConfig(count=2, steps=2)}, "sets its own block target"),
    ({"channels": ChannelPruneConfig(0.3)}, "own channel fraction"),
    ({"channels": ChannelPruneConfig(0.0, scope="auto")}, "not auto"),
    ({"tries": 0}, "tries must be at least 1"),
    ({"cost": "watts"}, "unknown cost 'watts'; choose one of cpu, macs"),
    ({"repeats": 2}, "at least 5"),
])
def test_route_search_names_the_fix(kwargs, message):
    args = {"speedup": 1.5, **kwargs}
    with pytest.raises(LrpcError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        RouteSearch(**args)


def test_macs_speedup_is_the_exact_ratio(resnet20):
    data = random_data(16)
    x = data.tensor(torch.arange(1).numpy())
    cut = copy.deepcopy(resnet20)
    cut.layer1[0] = nn.Identity()
    assert measured_speedup(resnet20, cut, x, "macs") == count_macs(resnet20, x) / count_macs(cut, x)
    with pytest.raises(LrpcError, match="choose cpu or macs"):
        measured_speedup(resnet20, cut, x, "watts")
    # the widths alone decide a channel cut's MACs: the shape-alike estimate is the real cut's ratio
    from lrpcompress.structured import prune_channels

    real = prune_channels(resnet20, data, ChannelPruneConfig(0.5, "l1", samples=16, batch_size=16),
                          show_progress=False).model
    assert measured_speedup(resnet20, shape_alike(resnet20, data, CHANNELS, 0.5), x, "macs") == pytest.approx(
        count_macs(resnet20, x) / count_macs(real, x))


def test_every_route_reaches_the_target_and_the_most_accurate_on_held_out_images_is_kept(resnet20):
    fit, val = random_data(32, seed=1), random_data(40, seed=2)
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    seen, models = [], []
    search = RouteSearch(1.3, (0.0, 0.3, 0.5), BLOCKS, CHANNELS, NO_TRAINING, cost="macs", tries=3)
    found = choose_route(resnet20, fit, val, search, show_progress=False, on_trial=lambda t, m: (seen.append(t), models.append(m)))
    assert all(torch.equal(before[k], v) for k, v in resnet20.state_dict().items())  # the input model is left as is
    assert [t.channels for t in found.trials] == [0.0, 0.3, 0.5] and seen == found.trials
    x = fit.tensor(torch.arange(1).numpy())
    for t in found.trials:
        assert t.eligible and t.speedup >= 1.3 and 1 <= t.cuts <= 3
        assert set(t.removed) <= set(removable_blocks(resnet20, x))
    # blocks alone: additive MAC costs, so the first cut reaches the target as the costs predict
    depth = found.trials[0]
    costs = measure_block_costs(resnet20, x, removable_blocks(resnet20, x), "macs")
    assert depth.cuts == 1 and depth.block_target == 1.3 and depth.speedup == pytest.approx(costs.speedup(depth.removed))
    assert found.costs == costs
    # the chosen route is the most accurate on the held-out images, ties to the earlier route
    best = max(t.val_accuracy for t in found.trials)
    assert found.chosen is next(t for t in found.trials if t.val_accuracy == best)
    net = found.model
    assert models[found.trials.index(found.chosen)] is net and all(m is not None for m in models)
    assert count_macs(resnet20, x) / count_macs(net, x) == pytest.approx(found.chosen.speedup)
    assert accuracy(net, val, show_progress=False) == pytest.approx(found.chosen.val_accuracy, abs=0.01)
    assert all(isinstance(net.get_submodule(b), nn.Identity) for b in found.chosen.removed)
    assert (found.channels is None) == (found.chosen.channels == 0)
    # the same inputs give the same choice and the same model
    again = choose_route(resnet20, fit, val, search, show_progress=False)
    assert [t.as_dict() for t in again.trials] == [t.as_dict() for t in found.trials]
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), net.state_dict().values()))


def test_a_route_short_of_the_target_is_cut_again_or_left_out(resnet20):
    fit, val = random_data(32, seed=1), random_data(20, seed=2)
    # half the channels alone make ResNet-20 ~1.9x cheaper in MACs: no blocks are needed at 1.6x
    wide = choose_route(resnet20, fit, val, RouteSearch(1.6, (0.5,), BLOCKS, CHANNELS, NO_TRAINING, cost="macs"),
                        show_progress=False)
    assert wide.chosen.block_target is None and wide.chosen.removed == [] and wide.blocks is None
    # beyond every block and every cut: each route says why, in one error
    with pytest.raises(LrpcError, match=r"no route reached 20x in macs \(channels 0: a 20.00x block target is out "
                                        r"of reach \(all removable blocks: 5.\d\dx\); channels 0.5: a 1\d.\d\dx "
                                        r"block target is out of reach .*\); ask for less"):
        choose_route(resnet20, fit, val, RouteSearch(20.0, (0.0, 0.5), BLOCKS, CHANNELS, NO_TRAINING, cost="macs"),
                     show_progress=False)


def test_each_route_is_recovered_before_it_is_scored(resnet20):
    fit, val = random_data(32, seed=1), random_data(20, seed=2)
    one = RECOVERY_RECIPE.__class__(epochs=1, batch_size=16, lr=0.01, train_bn=True)
    found = choose_route(resnet20, fit, val, RouteSearch(1.3, (0.0,), BLOCKS, CHANNELS, one, cost="macs"), show_progress=False)
    plain = choose_route(resnet20, fit, val, RouteSearch(1.3, (0.0,), BLOCKS, CHANNELS, NO_TRAINING, cost="macs"),
                         show_progress=False)
    assert found.chosen.removed == plain.chosen.removed
    trained = dict(found.model.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in plain.model.named_parameters())


def test_a_route_timed_short_is_cut_again_with_a_larger_block_target(resnet20):
    """A device whose time per pass has a fixed part (here 20 M MACs' worth) runs a cut slower than its MACs say: the
    MAC-priced blocks fall short, and the route is cut again with the block target raised by the shortfall."""
    fit, val = random_data(32, seed=1), random_data(20, seed=2)
    x = fit.tensor(torch.arange(1).numpy())
    overhead = 20e6

    def speed(dense, cut):
        return (count_macs(dense, x) + overhead) / (count_macs(cut, x) + overhead)

    search = RouteSearch(1.3, (0.0,), BLOCKS, CHANNELS, NO_TRAINING, cost="macs")
    found = choose_route(resnet20, fit, val, search, show_progress=False, speed=speed)
    t = found.chosen
    assert t.cuts >= 2 and t.speedup >= 1.3 and t.block_target > 1.3
    assert t.speedup == pytest.approx(speed(resnet20, found.model))
    plain = choose_route(resnet20, fit, val, search, show_progress=False)
    assert plain.chosen.cuts == 1 and speed(resnet20, plain.model) < 1.3  # the first cut, timed on this device
    with pytest.raises(LrpcError, match=r"channels 0: 1.\d\dx after 1 cut, below 1.3x"):
        choose_route(resnet20, fit, val, replace(search, tries=1), show_progress=False, speed=speed)
