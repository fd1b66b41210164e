"""Held-out searches: the size search (fitted sparsity, knob grid, choice before or after fine-tuning) and the joint
channel-fraction search (the size counts from the unpruned model, the held-out best wins)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lrpcompress.compress import (FINETUNE_RESERVE, CompressConfig, QuantConfig, allocation_target, compress,
                                  method_config)
from lrpcompress.data import split_train_val
from lrpcompress.errors import LrpcError
from lrpcompress.evaluation import accuracy
from lrpcompress.models import build_model, dense_bytes
from lrpcompress.recovery import FinetuneConfig
from lrpcompress.relevance import RelevanceConfig
from lrpcompress.search import (ChannelSearch, compress_channel_search, compress_tuned, fit_sparsity, knob_grid,
                                resolve_knobs, with_knobs)
from lrpcompress.structured import ChannelPruneConfig, prune_channels
from test_compress import _small
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


def test_fitted_sparsity_is_the_smallest_that_fits_the_floor(digits):
    model, train, _ = digits
    cfg = replace(_small(method_config("lrp")), target_ratio=12.0)
    s = fit_sparsity(model, train, cfg, 3, "digits_cnn")
    assert 0.0 < s < 0.95 and abs(s / 0.005 - round(s / 0.005)) < 1e-6
    uniform3 = replace(cfg, target_ratio=None, quant=replace(cfg.quant, allocation="uniform", bits=3, importance="none"),
                       bias_correction=False)
    limit = compress(model, train, cfg, "digits_cnn", show_progress=False).dense_bytes / 12.0
    fits = compress(model, train, with_knobs(uniform3, s, 1), "digits_cnn", show_progress=False).file_bytes
    over = compress(model, train, with_knobs(uniform3, s - 0.005, 1), "digits_cnn", show_progress=False).file_bytes
    assert fits <= limit < over
    # and the allocator, floored at 3 bits at that sparsity, meets the target on the real file
    res = compress(model, train, with_knobs(cfg, s, 3), "digits_cnn", show_progress=False)
    assert res.file_bytes <= limit and all(set(np.unique(b)) <= set(range(3, 9)) for b in res.bits.values())
    # a method without a size target of its own (uniform bits) is fitted to an explicit byte count alike
    plain = replace(method_config("magnitude"), relevance=cfg.relevance)
    plain = replace(plain, quant=replace(plain.quant, rounding=cfg.quant.rounding))  # rounding moves the coded size
    assert fit_sparsity(model, train, plain, 3, "digits_cnn", target_bytes=int(limit)) == s
    with pytest.raises(LrpcError, match="size target"):
        fit_sparsity(model, train, replace(cfg, target_ratio=None), 3, "digits_cnn")


def test_a_fitted_sparsity_leaves_fine_tuning_its_room(digits):
    """With fine-tuning the allocator fills the target less FINETUNE_RESERVE (entropy-coded codes grow in training);
    a sparsity fitted for it must fit that, or the size search's fitted floor could not be built at all."""
    model, train, _ = digits
    cfg = replace(_small(method_config("lrp")), target_ratio=12.0, finetune=FinetuneConfig(epochs=1, lr=0.005))
    target = int(dense_bytes(model) / 12.0)
    assert allocation_target(cfg, dense_bytes(model)) == int(target * (1 - FINETUNE_RESERVE))
    plain = replace(cfg, finetune=FinetuneConfig(epochs=0))
    assert allocation_target(plain, dense_bytes(model)) == target
    s_ft, s = fit_sparsity(model, train, cfg, 3, "digits_cnn"), fit_sparsity(model, train, plain, 3, "digits_cnn")
    assert s_ft > s
    res = compress(model, train, with_knobs(cfg, s_ft, 3), "digits_cnn", show_progress=False)
    assert res.file_bytes <= target and all(set(np.unique(b)) <= set(range(3, 9)) for b in res.bits.values())
    with pytest.raises(LrpcError, match="unreachable"):  # what the target without room did
        compress(model, train, with_knobs(cfg, s, 3), "digits_cnn", show_progress=False)


def test_size_target_search_picks_the_most_accurate_setting_on_held_out_data(digits):
    model, train, _ = digits
    fit, val = split_train_val(train, 200, 0)
    cfg = replace(_small(method_config("lrp")), target_ratio=12.0)
    res, knobs = compress_tuned(model, fit, val, cfg, "digits_cnn", show_progress=False)
    assert (None, 3) in knob_grid(12.0) and knob_grid(4.0) == [(0.0, 1)]
    assert res.file_bytes <= res.dense_bytes / 12.0
    grid = resolve_knobs(model, fit, cfg, knob_grid(12.0), "digits_cnn")
    assert all(s is not None for s, _ in grid) and len(grid) == 4
    accs = {}
    for s, b in grid:
        try:
            r = compress(model, fit, with_knobs(cfg, s, b), "digits_cnn", show_progress=False)
        except LrpcError:  # a floor of 3 bits cannot fit 12x without pruning: the search skips it
            continue
        accs[(s, b)] = accuracy(r.compressed.to_module(), val, show_progress=False)
    assert knobs["val_accuracy"] == pytest.approx(max(accs.values()), abs=1e-6)
    assert accs[(knobs["sparsity"], knobs["min_bits"])] == pytest.approx(knobs["val_accuracy"], abs=1e-6)
    if knobs["min_bits"] > 1:  # the floor is respected
        assert all(set(np.unique(b)) <= {3, 4, 5, 6, 7, 8} for b in res.bits.values())


def test_size_search_after_finetuning_keeps_the_best_trained_setting(digits):
    model, train, _ = digits
    fit, val = split_train_val(train, 200, 0)
    cfg = replace(_small(method_config("lrp")), target_ratio=12.0, finetune=FinetuneConfig(epochs=1, lr=0.005))
    res, knobs = compress_tuned(model, fit, val, cfg, "digits_cnn", show_progress=False, select_trained=True)
    assert knobs["selected_after_finetuning"] and res.file_bytes <= res.dense_bytes / 12.0
    accs, sizes = {}, {}
    for s, b in resolve_knobs(model, fit, cfg, knob_grid(12.0), "digits_cnn"):
        try:  # each setting compressed and fine-tuned on its own, as `compress` does
            r = compress(model, fit, with_knobs(cfg, s, b), "digits_cnn", show_progress=False)
        except LrpcError:
            continue
        accs[(s, b)] = accuracy(r.compressed.to_module(), val, show_progress=False)
        sizes[(s, b)] = r.compressed.to_bytes()
    assert len(accs) >= 2
    assert knobs["val_accuracy"] == pytest.approx(max(accs.values()), abs=1e-6)
    assert res.compressed.to_bytes() == sizes[(knobs["sparsity"], knobs["min_bits"])]
    with pytest.raises(LrpcError, match="fine-tuning epochs"):
        compress_tuned(model, fit, val, replace(cfg, finetune=FinetuneConfig(epochs=0)), "digits_cnn",
                       select_trained=True)
    with pytest.raises(LrpcError, match="size target"):
        compress_tuned(model, fit, val, replace(cfg, target_ratio=None), "digits_cnn", select_trained=True)
