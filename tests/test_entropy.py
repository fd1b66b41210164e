"""rANS streams: checked against a scalar reference written from docs/FORMAT.md, round trips, sizes near the
entropy, and corrupt streams refused."""

from __future__ import annotations

import contextlib
import struct
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrpcompress import entropy
from lrpcompress.entropy import (PROB_SCALE, STATE_LOW, decode_stream, encode_stream, estimate_bits,
                                 normalize_freqs, put_varints, read_varints)
from lrpcompress.errors import FormatError, LrpcError


# ---------------------------------------------------------------- reference, one symbol at a time, from the spec

def _ref_read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return v, pos


def ref_decode(buf: bytes, contexts: list[int], alphabets: list[int]) -> list[int]:
    n = len(contexts)
    k, pos = _ref_read_varint(buf, 0)
    tables = []
    for a in alphabets:
        f = []
        for _ in range(a):
            v, pos = _ref_read_varint(buf, pos)
            f.append(v)
        tables.append(f)
    x = list(struct.unpack_from(f"<{k}I", buf, pos))
    pos += 4 * k
    words = list(struct.unpack_from(f"<{(len(buf) - pos) // 2}H", buf, pos))
    w = 0
    out = []
    for i in range(n):
        lane = i % k
        f = tables[contexts[i]]
        slot = x[lane] % 4096
        s, cum = 0, 0
        while not cum <= slot < cum + f[s]:
            cum += f[s]
            s += 1
        x[lane] = f[s] * (x[lane] // 4096) + slot - cum
        if x[lane] < 2 ** 16:
            x[lane] = x[lane] * 2 ** 16 + words[w]
            w += 1
        out.append(s)
    assert w == len(words) and all(v == 2 ** 16 for v in x)
    return out


def ref_encode(symbols: list[int], contexts: list[int], tables: list[list[int]], k: int) -> bytes:
    x = [2 ** 16] * k
    emitted: list[int] = []  # in encoding order; the decoder reads them reversed
    for i in range(len(symbols) - 1, -1, -1):
        lane = i % k
        f = tables[contexts[i]]
        s = symbols[i]
        cum = sum(f[:s])
        if x[lane] >= f[s] * 2 ** 20:
            emitted.append(x[lane] % 2 ** 16)
            x[lane] //= 2 ** 16
        x[lane] = (x[lane] // f[s]) * 4096 + x[lane] % f[s] + cum
    head = put_varints([k]) + b"".join(put_varints(f) for f in tables)
    return head + struct.pack(f"<{k}I", *x) + struct.pack(f"<{len(emitted)}H", *reversed(emitted))


def _sample(n: int, alphabets: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ctx = rng.integers(0, len(alphabets), n)
    sym = np.minimum(np.abs(rng.normal(0, 1.2, n)).astype(np.int64), np.asarray(alphabets)[ctx] - 1)
    return sym, ctx


@contextlib.contextmanager
def coder_path(path: str):
    """Force the per-symbol loop or the vectorised steps (the writer picks by lane count)."""
    with mock.patch.object(entropy, "SCALAR_LANES", entropy.MAX_LANES if path == "scalar" else 0):
        yield


@pytest.mark.parametrize("path", ["scalar", "vector"])
@pytest.mark.parametrize("n,lanes", [(1, 1), (7, 3), (500, 1), (500, 4), (4999, None), (40_000, 19)])
def test_stream_matches_the_scalar_reference_both_ways(n, lanes, path):
    alphabets = [8, 2, 32]
    sym, ctx = _sample(n, alphabets, n)
    with coder_path(path):
        buf = encode_stream(sym, ctx, alphabets, lanes)
        assert np.array_equal(decode_stream(buf, ctx, alphabets, n), sym)
    assert ref_decode(buf, ctx.tolist(), alphabets) == sym.tolist()
    k, pos = read_varints(buf, 0, 1, "t")
    tables = []
    for a in alphabets:
        f, pos = read_varints(buf, pos, a, "t")
        tables.append(f)
    assert ref_encode(sym.tolist(), ctx.tolist(), tables, k[0]) == buf


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=3000), st.integers(1, 40))
def test_round_trip_any_symbols_and_lanes(values, lanes):
    sym = np.asarray(values)
    ctx = (sym % 2).astype(np.int64)  # two contexts of 16 symbols
    lanes = min(lanes, sym.size)
    for path in ("scalar", "vector"):
        with coder_path(path):
            buf = encode_stream(sym, ctx, [16, 16], lanes)
            assert np.array_equal(decode_stream(buf, ctx, [16, 16], sym.size), sym)


def test_size_is_the_entropy_plus_tables_and_states():
    sym, ctx = _sample(200_000, [8, 16], 1)
    buf = encode_stream(sym, ctx, [8, 16])
    payload = sum(estimate_bits(np.bincount(sym[ctx == c], minlength=a)) for c, a in enumerate([8, 16])) / 8
    lanes = 200_000 // 2048
    overhead = 1 + 2 * (8 + 16) + 4 * lanes
    assert payload < len(buf) <= payload + overhead + 2 * lanes
    # a skewed binary mask codes far below one bit per element
    mask = (np.random.default_rng(2).random(100_000) < 0.05).astype(np.int64)
    assert len(encode_stream(mask, None, [2])) < 0.3 * 100_000 / 8


def test_normalized_frequencies():
    f = normalize_freqs(np.array([0, 1, 1_000_000, 3, 0, 77]))
    assert f.sum() == PROB_SCALE and f[0] == 0 and f[4] == 0 and f[1] >= 1 and f[3] >= 1
    assert f[2] > 4000
    many = normalize_freqs(np.ones(256, np.int64))
    assert np.all(many == 16)
    with pytest.raises(LrpcError, match="at least one symbol"):
        normalize_freqs(np.zeros(4, np.int64))


@pytest.mark.parametrize("path", ["scalar", "vector"])
def test_corrupt_streams_are_refused(path):
    sym, ctx = _sample(5000, [8], 3)
    buf = encode_stream(sym, ctx, [8], 2)
    with coder_path(path):
        with pytest.raises(FormatError, match="end state|ends early"):
            decode_stream(buf[:-2], ctx, [8], 5000)
        with pytest.raises(FormatError, match="end state|ends early"):
            decode_stream(buf + b"\0\0", ctx, [8], 5000)
        flipped = bytearray(buf)
        flipped[len(buf) // 2] ^= 0x55
        with pytest.raises(FormatError):
            decode_stream(bytes(flipped), ctx, [8], 5000)
    with pytest.raises(FormatError, match="sums to"):
        decode_stream(put_varints([1]) + put_varints([1] * 8) + struct.pack("<I", STATE_LOW), ctx[:1], [8], 1)
    with pytest.raises(FormatError, match="lanes"):
        decode_stream(put_varints([9]) + buf[1:], ctx[:5], [8], 5)
    with pytest.raises(FormatError, match="below"):
        decode_stream(put_varints([1]) + put_varints([PROB_SCALE] + [0] * 7) + struct.pack("<I", 5), ctx[:1], [8], 1)
    with pytest.raises(FormatError, match="truncated varint"):
        decode_stream(b"\x81", ctx[:1], [8], 1)
    with pytest.raises(LrpcError, match="alphabet"):
        encode_stream(np.array([8]), None, [8])
