"""Joint channel-fraction and size search: the size counts from the unpruned model, the held-out best wins."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lrpcompress.compress import CompressConfig, QuantConfig, compress_tuned
from lrpcompress.errors import LrpcError
from lrpcompress.evaluation import accuracy
from lrpcompress.models import build_model, dense_bytes
from lrpcompress.recovery import FinetuneConfig
from lrpcompress.relevance import RelevanceConfig
from lrpcompress.search import ChannelSearch, compress_channel_search
from lrpcompress.structured import ChannelPruneConfig, prune_channels
from test_structured import random_data, trained_like


def _config(ratio: float) -> CompressConfig:
    return CompressConfig(quant=QuantConfig(importance="lrp"), relevance=RelevanceConfig(samples=8, batch_size=8),
                          target_ratio=ratio)


@pytest.fixture(scope="module")
def searched():
    model = trained_like(build_model("resnet20", 10))
    fit, val = random_data(24, seed=1), random_data(20, seed=2)
    search = ChannelSearch(ChannelPruneConfig(0.0, "l1", samples=8), fractions=(0.5, 0.0, 0.25))
    return model, fit, val, search, compress_channel_search(model, fit, val, _config(10), "resnet20", search,
                                                            show_progress=False)


def test_the_size_counts_from_the_unpruned_model(searched):
    model, _, _, _, found = searched
    target = int(dense_bytes(model) / 10)
    assert found.result.file_bytes <= target and found.result.file_bytes >= 0.98 * target
    assert set(found.trials) == {0.0, 0.25, 0.5}
    assert found.trials[0.5]["float_bytes"] < found.trials[0.25]["float_bytes"] < dense_bytes(model)
    assert all(t["file_bytes"] <= target for t in found.trials.values())


def test_the_held_out_best_fraction_is_kept_and_rebuilds_independently(searched):
    model, fit, val, search, found = searched
    accs = {f: t["val_accuracy"] for f, t in found.trials.items()}
    assert found.fraction == min(f for f in accs if accs[f] == max(accs.values()))  # ties: fewer changes
    # the chosen candidate, rebuilt step by step without the search, gives the same bytes and accuracy
    slim = model if found.fraction == 0 else prune_channels(model, fit, replace(search.channels,
                                                                                 fraction=found.fraction)).model
    cfg = replace(_config(10), target_ratio=None, target_bytes=int(dense_bytes(model) / 10))
    res, _ = compress_tuned(slim, fit, val, cfg, "resnet20", show_progress=False)
    assert res.compressed.to_bytes() == found.result.compressed.to_bytes()
    assert accuracy(res.compressed.to_module(), val, show_progress=False) == pytest.approx(accs[found.fraction],
                                                                                          abs=1e-3)
    if found.fraction > 0:
        assert found.structured is not None and found.structured.kept_fraction < 1


def test_fine_tuning_runs_for_the_chosen_fraction_only():
    model = trained_like(build_model("resnet20", 10))
    fit, val = random_data(16, seed=1), random_data(10, seed=2)
    search = ChannelSearch(ChannelPruneConfig(0.0, "l1", samples=8), fractions=(0.5,))
    cfg = replace(_config(10), finetune=FinetuneConfig(epochs=1, batch_size=8))
    plain = compress_channel_search(model, fit, val, _config(10), "resnet20", search, show_progress=False)
    tuned = compress_channel_search(model, fit, val, cfg, "resnet20", search, show_progress=False)
    assert plain.trials == tuned.trials  # candidates are compared without training
    assert tuned.result.compressed.to_bytes() != plain.result.compressed.to_bytes()
    assert tuned.result.file_bytes <= int(dense_bytes(model) / 10)


@pytest.mark.parametrize("kw,message", [
    ({"fractions": ()}, "at least one"),
    ({"fractions": (0.3, 1.0)}, "[0, 1)"),
    ({"fractions": (0.3, 0.3)}, "differ"),
    ({"channels": ChannelPruneConfig(0.0, scope="auto")}, "one scope"),
    ({"channels": ChannelPruneConfig(0.0, steps=2)}, "steps=1"),
])
def test_bad_searches_are_refused(kw, message):
    with pytest.raises(LrpcError, match=message.replace("[", r"\[").replace(")", r"\)")):
        ChannelSearch(**{"channels": ChannelPruneConfig(0.0), **kw})


def test_a_size_target_is_required():
    model = build_model("resnet20", 10)
    with pytest.raises(LrpcError, match="size target"):
        compress_channel_search(model, random_data(8), random_data(8), CompressConfig(), "resnet20",
                                ChannelSearch(ChannelPruneConfig(0.0)), show_progress=False)
