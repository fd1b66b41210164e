"""The .lrpc container: golden bytes, round trips, and rejection of every malformed file."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrpcompress.errors import FormatError
from lrpcompress.packing import (MAGIC, PREFIX, decode, decode_index, encode, encode_index, pack_codes,
                                 unpack_codes)

from golden import GOLDEN, GOLDEN_MIDRISE, GOLDEN_RANS, golden_payload, golden_rans_payload


def test_golden_bytes():
    assert encode(golden_payload()) == GOLDEN.read_bytes()


def test_golden_decodes_to_spec_values():
    p = decode(GOLDEN.read_bytes())
    w = p.tensors["w"].dequantize()
    s = [0.5, 0.25, 0.01, 1.0, 0.0, 0.0]
    f16 = lambda v: float(np.float16(v))  # noqa: E731
    expected = torch.tensor([
        [(0 - 1) * s[0], (2 - 1) * s[0], 0.0, (6 - 3) * s[1]],
        [(4 - 127) * f16(s[2]), (254 - 127) * f16(s[2]), (2 * 1 - 1) * s[3], 0.0],
        [0.0, 0.0, 1.5, -2.0],
    ], dtype=torch.float32)
    assert torch.equal(w, expected)
    assert torch.equal(p.tensors["b"], torch.tensor([0.5, -1.25, 3.0]))
    assert p.float_dtype == {"b": "float16", "c": "float32"}
    assert p.metadata == {"note": "golden"}


def test_layout_of_golden_file():
    data = GOLDEN.read_bytes()
    magic, version, hlen = PREFIX.unpack_from(data)
    assert magic == b"LRPC\r\n\x1a\n" and version == 1
    header = json.loads(data[20:20 + hlen])
    assert [t["name"] for t in header["tensors"]] == ["w", "b", "c"]
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]
    w = header["tensors"][0]
    assert w["index"][0] == "bitmap" and w["index"][1] == 8
    assert w["codes"][1] == -(-(2 * 2 + 3 + 2 * 8 + 1 + 2 * 16) // 8)


@given(st.lists(st.tuples(st.integers(1, 16), st.integers(0, 2 ** 16 - 1)), max_size=200))
def test_pack_unpack_roundtrip(items):
    widths = np.array([w for w, _ in items], dtype=np.int64)
    codes = np.array([c % (1 << w) for w, c in items], dtype=np.int64)
    buf = pack_codes(codes, widths)
    assert len(buf) == -(-int(widths.sum()) // 8)
    assert np.array_equal(unpack_codes(buf, widths), codes)


@given(st.lists(st.booleans(), min_size=1, max_size=400))
def test_index_codings_roundtrip_and_choose_shortest(bits):
    mask = np.array(bits, dtype=bool)
    coding, buf = encode_index(mask)
    assert np.array_equal(decode_index(coding, buf, mask.size, int(mask.sum())), mask)
    if coding != "dense":
        bitmap = -(-mask.size // 8)
        assert len(buf) <= bitmap


def test_index_prefers_delta_for_very_sparse_and_rle_for_runs():
    sparse = np.zeros(10000, dtype=bool)
    sparse[[5, 900, 5000]] = True
    assert encode_index(sparse)[0] == "delta"
    runs = np.zeros(10000, dtype=bool)
    runs[2000:7000] = True
    assert encode_index(runs)[0] == "rle"
    assert encode_index(np.ones(9, dtype=bool)) == ("dense", b"")


def _reseal(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def _with_header(data: bytes, mutate) -> bytes:
    _, version, hlen = PREFIX.unpack_from(data)
    header = json.loads(data[20:20 + hlen])
    mutate(header)
    h = json.dumps(header).encode()
    return _reseal(PREFIX.pack(MAGIC, version, len(h)) + h + data[20 + hlen:-32])


@pytest.mark.parametrize("mutate, message", [
    (lambda h: h["tensors"][1].__setitem__("data", [0, 10 ** 12]), "beyond the data section"),
    (lambda h: h["tensors"][1].__setitem__("data", [2 ** 64, 6]), "beyond the data section"),
    (lambda h: h["tensors"][1].__setitem__("data", [0, 6]), "overlaps"),
    (lambda h: h["tensors"][0].__setitem__("bits", 9), "not allowed"),
    (lambda h: h["tensors"][0].__setitem__("group_size", 0), "group_size"),
    (lambda h: h["tensors"][0]["index"].__setitem__(1, 9), "keeps 8 elements"),
    (lambda h: h["tensors"][0].__setitem__("shape", [3, 4, 2 ** 30]), "too large"),
    (lambda h: h["tensors"][2].__setitem__("dtype", "int8"), "dtype"),
    (lambda h: h["tensors"][2].__setitem__("kind", "pickle"), "unknown tensor kind"),
    (lambda h: h["tensors"].append(dict(h["tensors"][2])), "appears twice"),
    (lambda h: h.__setitem__("tensors", {}), "'tensors'"),
])
def test_bad_headers_are_rejected(mutate, message):
    with pytest.raises(FormatError, match=message):
        decode(_with_header(GOLDEN.read_bytes(), mutate))


def test_midrise_golden_bytes_and_spec_values():
    data = encode(golden_payload("midrise"))
    assert data == GOLDEN_MIDRISE.read_bytes()
    assert PREFIX.unpack_from(data)[1] == 2  # the grid key needs version 2; symmetric files stay version 1
    w = decode(data).tensors["w"]
    assert w.grid == "midrise"
    s = [0.5, 0.25, 0.01, 1.0]
    f16 = lambda v: float(np.float16(v))  # noqa: E731
    expected = torch.tensor([  # v = (u - (2^(b-1) - 1/2)) * s for 2..8 bits; 1 and 16 bits as in version 1
        [(0 - 1.5) * s[0], (3 - 1.5) * s[0], 0.0, (7 - 3.5) * s[1]],
        [(4 - 127.5) * f16(s[2]), (255 - 127.5) * f16(s[2]), (2 * 1 - 1) * s[3], 0.0],
        [0.0, 0.0, 1.5, -2.0],
    ], dtype=torch.float32)
    assert torch.equal(w.dequantize(), expected)


def test_grid_is_validated_on_both_sides():
    from lrpcompress.errors import LrpcError

    midrise = GOLDEN_MIDRISE.read_bytes()
    with pytest.raises(FormatError, match="unknown quantization grid"):
        decode(_with_header(midrise, lambda h: h["tensors"][0].__setitem__("grid", "nf4")))
    v1 = _with_header(midrise, lambda h: None)
    v1 = _reseal(v1[:8] + struct.pack("<I", 1) + v1[12:-32])
    with pytest.raises(FormatError, match="needs format version 2"):
        decode(v1)
    # the top code of a 2..8-bit group is valid only on the midrise grid
    top_in_symmetric = _with_header(midrise, lambda h: h["tensors"][0].pop("grid"))
    with pytest.raises(FormatError, match="code out of range"):
        decode(top_in_symmetric)
    p = golden_payload("midrise")
    p.tensors["w"].grid = "symmetric"
    with pytest.raises(LrpcError, match="code out of range"):
        encode(p)


def test_rans_golden_bytes_and_values():
    data = encode(golden_rans_payload())
    assert data == GOLDEN_RANS.read_bytes()
    magic, version, hlen = PREFIX.unpack_from(data)
    assert version == 3
    entry = json.loads(data[20:20 + hlen])["tensors"][0]
    assert entry["index"][0] == "rans" and entry["codes_coding"] == "rans"
    src = golden_rans_payload().tensors["w"]
    w = decode(data).tensors["w"]
    assert w.entropy and np.array_equal(w.mask, src.mask) and np.array_equal(w.codes, src.codes)
    assert torch.equal(w.dequantize(), src.dequantize())
    assert encode(decode(data)) == data  # a loaded file writes back byte-identical
    # the same tensor bit-packed: a version-1 file, longer
    plain = golden_rans_payload()
    plain.tensors["w"].entropy = False
    packed = encode(plain)
    assert PREFIX.unpack_from(packed)[1] == 1 and len(packed) > len(data)
    assert torch.equal(decode(packed).tensors["w"].dequantize(), src.dequantize())


def test_rans_fields_are_validated():
    data = GOLDEN_RANS.read_bytes()
    v2 = _reseal(data[:8] + struct.pack("<I", 2) + data[12:-32])
    with pytest.raises(FormatError, match="needs format version 3"):
        decode(v2)
    with pytest.raises(FormatError, match="unknown codes coding"):
        decode(_with_header(data, lambda h: h["tensors"][0].__setitem__("codes_coding", "huffman")))
    with pytest.raises(FormatError):  # packed codes of the wrong length
        decode(_with_header(data, lambda h: h["tensors"][0].pop("codes_coding")))
    for i in range(0, 60):  # a flipped byte anywhere in the streams is refused, never mis-decoded silently
        pos = len(data) - 32 - 1 - i
        flipped = bytearray(data[:-32])
        flipped[pos] ^= 0x24
        try:
            p = decode(_reseal(bytes(flipped)))
        except FormatError:
            continue
        # what decodes must be a valid tensor (a flipped float or scale byte may decode)
        assert p.tensors["w"].mask.size == 512


def test_wrong_magic_version_truncation_checksum():
    data = GOLDEN.read_bytes()
    with pytest.raises(FormatError, match="magic"):
        decode(b"NOTLRPC!" + data[8:])
    with pytest.raises(FormatError, match="version 7"):
        decode(_reseal(data[:8] + struct.pack("<I", 7) + data[12:-32]))
    with pytest.raises(FormatError, match="checksum"):
        decode(data[:-40] + data[-32:])
    with pytest.raises(FormatError, match="too short"):
        decode(data[:30])
    flipped = bytearray(data)
    flipped[300] ^= 1
    with pytest.raises(FormatError, match="checksum"):
        decode(bytes(flipped))
    with pytest.raises(FormatError, match="header length"):
        decode(_reseal(data[:12] + struct.pack("<Q", 2 ** 40) + data[20:-32]))


def test_trailing_bytes_in_data_section_are_rejected():
    data = GOLDEN.read_bytes()
    with pytest.raises(FormatError, match="unused trailing"):
        decode(_reseal(data[:-32] + b"\0\0"))


def _fuzz_inputs():
    base = GOLDEN.read_bytes()
    rng = np.random.default_rng(0)
    cases = []
    for i in range(10_000):
        buf = bytearray(base)
        kind = i % 4
        if kind == 0:  # truncated
            buf = buf[: rng.integers(0, len(buf))]
        else:
            for _ in range(rng.integers(1, 6)):
                pos = int(rng.integers(0, len(buf)))
                buf[pos] = int(rng.integers(0, 256))
            if kind >= 2:  # re-sealed, so the parser behind the checksum is exercised
                buf = bytearray(_reseal(bytes(buf[:-32])))
        cases.append(bytes(buf))
    return cases


def test_fuzz_mutated_and_truncated_files_only_raise_format_error():
    """10,000 mutated/truncated files: each decodes or raises FormatError with a one-line message."""
    outcomes = {"ok": 0, "rejected": 0}
    for data in _fuzz_inputs():
        try:
            decode(data)
            outcomes["ok"] += 1
        except FormatError as exc:
            assert "\n" not in str(exc) and str(exc)
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 9000


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=64), st.integers(0, 509))
def test_fuzz_spliced_header_bytes(junk, pos):
    data = GOLDEN.read_bytes()
    body = data[:pos] + junk + data[pos + len(junk):-32]
    try:
        decode(_reseal(body[: max(len(body), 0)]))
    except FormatError as exc:
        assert "\n" not in str(exc)


def test_non_finite_floats_are_refused_both_ways():
    from lrpcompress.errors import LrpcError

    p = golden_payload()
    p.tensors["b"] = torch.tensor([0.5, float("inf"), 1.0])
    with pytest.raises(LrpcError, match="NaN or Inf"):
        encode(p)
    p.tensors["b"] = torch.tensor([0.5, 1e6, 1.0])  # beyond float16
    with pytest.raises(LrpcError, match="NaN or Inf"):
        encode(p)
    data = GOLDEN.read_bytes()
    _, _, hlen = PREFIX.unpack_from(data)
    header = json.loads(data[20:20 + hlen])
    off = 20 + hlen + header["tensors"][1]["data"][0]
    bad = data[:off] + np.array([np.inf], dtype="<f2").tobytes() + data[off + 2:-32]
    with pytest.raises(FormatError, match="NaN or Inf"):
        decode(_reseal(bad))
