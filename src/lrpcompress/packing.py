"""The `.lrpc` container: bytes <-> tensors, exactly as docs/FORMAT.md specifies.

``encode`` turns a :class:`Payload` into bytes; ``decode`` validates every field, size and range
before it allocates or reads anything, and raises :class:`FormatError` with a one-line message.
No pickle is used anywhere.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch

from .errors import FormatError, LrpcError
from .io import atomic_write_bytes
from .entropy import decode_stream, encode_stream, put_varints
from .quantization import GRIDS, VALID_BITS, GroupLayout, QuantTensor, max_code

MAGIC = b"LRPC\r\n\x1a\n"
# read; written: the lowest version that has every field used: 2 adds "grid", 3 adds rANS codings
VERSIONS = (1, 2, 3)
PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
DIGEST = 32
MIN_SIZE = PREFIX.size + DIGEST
MAX_NUMEL = 2 ** 31
MAX_HEADER = 64 * 2 ** 20
FLOAT_DTYPES = {"float16": np.float16, "float32": np.float32}

Entry = Union[QuantTensor, torch.Tensor]


@dataclass
class Payload:
    """What a file holds: model description, tensors by name (in order), metadata."""

    model: dict[str, Any]
    tensors: dict[str, Entry]
    float_dtype: dict[str, str] = field(default_factory=dict)  # name -> "float16" | "float32" (default float16)
    metadata: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- survivor index codings

def _read_varints(buf: bytes, limit: int) -> list[int]:
    vals: list[int] = []
    cur = shift = 0
    for byte in buf:
        cur |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
            if shift > 35:
                raise FormatError("corrupt index: varint too long")
        else:
            vals.append(cur)
            if len(vals) > limit:
                raise FormatError("corrupt index: more varints than elements")
            cur = shift = 0
    if shift:
        raise FormatError("corrupt index: truncated varint")
    return vals


def encode_index(mask: np.ndarray, entropy: bool = False) -> tuple[str, bytes]:
    """The shortest coding of a survivor mask (ties: dense, bitmap, delta, rle, rans); ``rans`` (format
    version 3) is a candidate only with ``entropy``."""
    n = mask.size
    if mask.all():
        return "dense", b""
    cands = [("bitmap", np.packbits(mask.astype(np.uint8), bitorder="little").tobytes())]
    pos = np.flatnonzero(mask)
    gaps = np.diff(np.concatenate([[-1], pos])) - 1
    cands.append(("delta", put_varints(gaps)))
    change = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [n]])
    runs = np.diff(bounds)
    if mask[0]:
        runs = np.concatenate([[0], runs])
    cands.append(("rle", put_varints(runs)))
    if entropy:
        cands.append(("rans", encode_stream(mask.astype(np.int64), None, [2])))
    best = min(cands, key=lambda c: len(c[1]))  # min keeps the first of equal lengths
    return best


def decode_index(coding: str, buf: bytes, numel: int, count: int) -> np.ndarray:
    if coding == "dense":
        if buf or count != numel:
            raise FormatError("dense index must be empty and keep every element")
        return np.ones(numel, dtype=bool)
    if coding == "bitmap":
        if len(buf) != -(-numel // 8):
            raise FormatError(f"bitmap index has {len(buf)} bytes, expected {-(-numel // 8)}")
        mask = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")[:numel].astype(bool)
    elif coding == "delta":
        gaps = _read_varints(buf, count)
        if len(gaps) != count:
            raise FormatError(f"delta index holds {len(gaps)} entries, expected {count}")
        pos = np.cumsum(np.asarray(gaps, dtype=np.int64) + 1) - 1 if gaps else np.zeros(0, np.int64)
        if pos.size and pos[-1] >= numel:
            raise FormatError("delta index points past the end of the tensor")
        mask = np.zeros(numel, dtype=bool)
        mask[pos] = True
    elif coding == "rle":
        runs = np.asarray(_read_varints(buf, numel + 1), dtype=np.int64)
        if runs.sum() != numel:
            raise FormatError(f"rle index covers {int(runs.sum())} elements, expected {numel}")
        mask = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    elif coding == "rans":
        mask = decode_stream(buf, None, [2], numel, "rans index").astype(bool)
    else:
        raise FormatError(f"unknown index coding {coding!r}")
    if int(mask.sum()) != count:
        raise FormatError(f"index keeps {int(mask.sum())} elements, header says {count}")
    return mask


# ---------------------------------------------------------------- bit packing

def pack_codes(codes: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate ``codes[i]`` in ``widths[i]`` bits each, LSB first (docs/FORMAT.md)."""
    widths = widths.astype(np.int64)
    total = int(widths.sum())
    if total == 0:
        return b""
    owner = np.repeat(np.arange(codes.size), widths)
    starts = np.cumsum(widths) - widths
    bitpos = np.arange(total) - np.repeat(starts, widths)
    bits = (codes.astype(np.int64)[owner] >> bitpos) & 1
    return np.packbits(bits.astype(np.uint8), bitorder="little").tobytes()


def unpack_codes(buf: bytes, widths: np.ndarray) -> np.ndarray:
    widths = widths.astype(np.int64)
    total = int(widths.sum())
    if len(buf) != -(-total // 8):
        raise FormatError(f"codes take {len(buf)} bytes, expected {-(-total // 8)}")
    if total == 0:
        return np.zeros(widths.size, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")[:total].astype(np.int64)
    owner = np.repeat(np.arange(widths.size), widths)
    starts = np.cumsum(widths) - widths
    bitpos = np.arange(total) - np.repeat(starts, widths)
    return np.bincount(owner, weights=(bits << bitpos), minlength=widths.size).astype(np.int64)


# ---------------------------------------------------------------- encode

def _code_contexts(widths: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """rANS contexts of the surviving codes (docs/FORMAT.md): the distinct widths ascending, alphabet 2^b each."""
    present = np.unique(widths)
    return np.searchsorted(present, widths), [1 << int(b) for b in present]


def quant_entry(t: QuantTensor, put: Callable[[bytes], list[int]]) -> dict[str, Any]:
    """Header fields of a quantized tensor (after name, shape, kind, group size and grid); its data ranges go
    through ``put`` in file order: ``bits`` when not one value, ``scales``, ``index``, ``codes``. With
    ``t.entropy`` the survivor index and the codes may use rANS (format version 3), whichever is shorter;
    ``codes_coding`` is set only when it is ``rans``."""
    entry: dict[str, Any] = {}
    ub = np.unique(t.bits)
    entry["bits"] = int(ub[0]) if ub.size == 1 else put(t.bits.astype(np.uint8).tobytes())
    entry["scales"] = put(t.scales.astype("<f2").tobytes())
    coding, idx = encode_index(t.mask, t.entropy)
    entry["index"] = [coding, int(t.mask.sum())] + put(idx)
    widths = t.element_bits()[t.mask]
    codes = pack_codes(t.codes, widths)
    if t.entropy and widths.size and widths.max() <= 8:
        coded = encode_stream(t.codes, *_code_contexts(widths))
        if len(coded) + len(',"codes_coding":"rans"') < len(codes):  # the header key counts too
            entry["codes_coding"] = "rans"
            codes = coded
    entry["codes"] = put(codes)
    return entry


def quant_bytes(t: QuantTensor) -> int:
    """Bytes of a quantized tensor's data ranges as the writer lays them out (the header entry not counted)."""
    total = 0

    def count(data: bytes) -> list[int]:
        nonlocal total
        total += len(data)
        return [0, len(data)]

    quant_entry(t, count)
    return total


def encode(payload: Payload) -> bytes:
    """Serialise a payload to `.lrpc` bytes (deterministic: same payload, same bytes)."""
    chunks: list[bytes] = []
    pos = 0

    def put(data: bytes) -> list[int]:
        nonlocal pos
        chunks.append(data)
        rng = [pos, len(data)]
        pos += len(data)
        return rng

    table = []
    version = 1  # the lowest version with every field used, so older files stay byte-identical
    for name, t in payload.tensors.items():
        if isinstance(t, QuantTensor):
            _check_quant(name, t)
            entry: dict[str, Any] = {"name": name, "shape": list(t.shape), "kind": "quant",
                                     "group_size": t.layout.group_size}
            if t.grid != "symmetric":
                entry["grid"] = t.grid
                version = max(version, 2)
            entry.update(quant_entry(t, put))
            if entry["index"][0] == "rans" or "codes_coding" in entry:
                version = 3
        else:
            dtype = payload.float_dtype.get(name, "float16")
            with np.errstate(over="ignore"):  # values beyond the dtype become Inf and are refused just below
                arr = t.detach().cpu().numpy().astype("<f2" if dtype == "float16" else "<f4")
            if not np.all(np.isfinite(arr)):
                raise LrpcError(f"{name}: NaN or Inf (or beyond the {dtype} range); nothing was written")
            entry = {"name": name, "shape": list(t.shape), "kind": "float", "dtype": dtype,
                     "data": put(arr.tobytes())}
        table.append(entry)
    header = {"format": "lrpc", "model": payload.model, "tensors": table, "metadata": payload.metadata}
    hbytes = json.dumps(header, separators=(",", ":"), sort_keys=False, allow_nan=False).encode()
    body = PREFIX.pack(MAGIC, version, len(hbytes)) + hbytes + b"".join(chunks)
    return body + hashlib.sha256(body).digest()


def _check_quant(name: str, t: QuantTensor) -> None:
    """Refuse to write a tensor the reader would reject."""
    n = t.layout.n_groups
    if t.bits.shape != (n,) or t.scales.shape != (n,) or t.mask.size != int(np.prod(t.shape)):
        raise LrpcError(f"{name}: bits/scales/mask sizes do not match its layout")
    if set(np.unique(t.bits).tolist()) - set(VALID_BITS):
        raise LrpcError(f"{name}: invalid bit-widths {sorted(set(np.unique(t.bits).tolist()) - set(VALID_BITS))}")
    eb = t.element_bits()[t.mask]
    if t.codes.size != eb.size or np.any(eb == 0):
        raise LrpcError(f"{name}: codes do not match the survivors and their bit-widths")
    if t.grid not in GRIDS:
        raise LrpcError(f"{name}: unknown quantization grid {t.grid!r}")
    mid = (eb >= 2) & (eb <= 8)
    if np.any(t.codes < 0) or np.any(t.codes[mid] > max_code(eb[mid], t.grid)) or np.any(t.codes[eb == 1] > 1):
        raise LrpcError(f"{name}: code out of range for its bit-width")
    if not np.all(np.isfinite(t.scales)) or np.any(t.scales < 0):
        raise LrpcError(f"{name}: scales must be finite and non-negative")


def save_payload(payload: Payload, path: str | Path) -> int:
    """Write atomically; returns the file size in bytes."""
    data = encode(payload)
    atomic_write_bytes(path, data)
    return len(data)


# ---------------------------------------------------------------- decode

def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise FormatError(f"{what} must be a non-negative integer, got {v!r}")
    return v


class _Ranges:
    def __init__(self, size: int) -> None:
        self.size = size
        self.used: list[tuple[int, int, str]] = []

    def take(self, off: Any, length: Any, what: str, expected: int | None = None) -> tuple[int, int]:
        off, length = _int(off, f"{what} offset"), _int(length, f"{what} length")
        if off > self.size or length > self.size - off:  # overflow-safe bounds check
            raise FormatError(f"{what}: range [{off}, +{length}) lies beyond the data section ({self.size} bytes)")
        if expected is not None and length != expected:
            raise FormatError(f"{what}: length {length}, expected {expected}")
        self.used.append((off, length, what))
        return off, length

    def check_layout(self) -> None:
        ranges = sorted(r for r in self.used if r[1] > 0)
        pos = 0
        for off, length, what in ranges:
            if off < pos:
                raise FormatError(f"{what}: overlaps the previous range")
            if off > pos:
                raise FormatError(f"{what}: gap of {off - pos} bytes before it")
            pos = off + length
        if pos != self.size:
            raise FormatError(f"data section has {self.size - pos} unused trailing bytes")


def _shape(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > 8:
        raise FormatError(f"{what}: shape must be a list of at most 8 ints")
    shape = tuple(_int(d, f"{what} dimension") for d in v)
    numel = 1
    for d in shape:
        numel *= d
        if numel > MAX_NUMEL:
            raise FormatError(f"{what}: shape {list(shape)} is too large")
    return shape


def _range(v: Any, what: str) -> tuple[Any, Any]:
    if not isinstance(v, list) or len(v) != 2:
        raise FormatError(f"{what} must be [offset, length]")
    return v[0], v[1]


def decode(data: bytes) -> Payload:
    """Parse and validate `.lrpc` bytes."""
    if len(data) < MIN_SIZE:
        raise FormatError(f"file is too short to be an .lrpc file ({len(data)} bytes)")
    magic, version, hlen = PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise FormatError("not an .lrpc file (wrong magic bytes)")
    if version not in VERSIONS:
        raise FormatError(f"unsupported .lrpc format version {version}; this lrpcompress reads versions "
                          f"{', '.join(map(str, VERSIONS))}")
    if hlen > len(data) - MIN_SIZE or hlen > MAX_HEADER:
        raise FormatError(f"header length {hlen} does not fit the file ({len(data)} bytes); the file is truncated")
    if hashlib.sha256(data[:-DIGEST]).digest() != data[-DIGEST:]:
        raise FormatError("checksum mismatch: the file is corrupt or truncated")
    try:
        header = json.loads(data[PREFIX.size: PREFIX.size + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"header is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(header, dict) or header.get("format") != "lrpc":
        raise FormatError("header is not an lrpc header object")
    model, table, meta = header.get("model"), header.get("tensors"), header.get("metadata", {})
    if not isinstance(model, dict) or not isinstance(table, list) or not isinstance(meta, dict):
        raise FormatError("header needs 'model' (object), 'tensors' (list) and 'metadata' (object)")
    base = PREFIX.size + hlen
    section = memoryview(data)[base: len(data) - DIGEST]
    ranges = _Ranges(len(section))
    tensors: dict[str, Entry] = {}
    dtypes: dict[str, str] = {}
    for i, e in enumerate(table):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise FormatError(f"tensor entry {i} needs a string 'name'")
        name = e["name"]
        if name in tensors:
            raise FormatError(f"tensor {name!r} appears twice")
        shape = _shape(e.get("shape"), name)
        numel = int(np.prod(shape)) if shape else 1
        kind = e.get("kind")
        if kind == "float":
            dtype = e.get("dtype")
            if dtype not in FLOAT_DTYPES:
                raise FormatError(f"{name}: dtype must be float16 or float32, got {dtype!r}")
            size = np.dtype(FLOAT_DTYPES[dtype]).itemsize
            off, length = ranges.take(*_range(e.get("data"), f"{name} data"), f"{name} data", numel * size)
            arr = np.frombuffer(section[off: off + length], dtype="<f2" if dtype == "float16" else "<f4")
            if not np.all(np.isfinite(arr)):
                raise FormatError(f"{name}: NaN or Inf in a float tensor")
            tensors[name] = torch.from_numpy(arr.astype(np.float32).reshape(shape))
            dtypes[name] = dtype
        elif kind == "quant":
            tensors[name] = _decode_quant(e, name, shape, numel, section, ranges, version)
        else:
            raise FormatError(f"{name}: unknown tensor kind {kind!r}")
    ranges.check_layout()
    return Payload(model, tensors, dtypes, meta)


def _decode_quant(e: dict, name: str, shape: tuple[int, ...], numel: int, section: memoryview,
                  ranges: _Ranges, version: int) -> QuantTensor:
    if len(shape) < 1 or numel == 0:
        raise FormatError(f"{name}: a quantized tensor needs a non-empty shape")
    grid = e.get("grid", "symmetric")
    if "grid" in e and version < 2:
        raise FormatError(f"{name}: 'grid' needs format version 2, the file says {version}")
    if grid not in GRIDS:
        raise FormatError(f"{name}: unknown quantization grid {grid!r} (symmetric or midrise)")
    gs = _int(e.get("group_size"), f"{name} group_size")
    layout = GroupLayout(shape, max(gs, 1))
    if gs < 1 or gs > layout.cols:
        raise FormatError(f"{name}: group_size {gs} must be 1..{layout.cols}")
    ng = layout.n_groups
    bits_v = e.get("bits")
    if isinstance(bits_v, list):
        off, length = ranges.take(*_range(bits_v, f"{name} bits"), f"{name} bits", ng)
        bits = np.frombuffer(section[off: off + length], np.uint8).copy()
    else:
        b = _int(bits_v, f"{name} bits")
        if b not in VALID_BITS:
            raise FormatError(f"{name}: bit-width {b} is not allowed (0..8 or 16)")
        bits = np.full(ng, b, dtype=np.uint8)
    bad = sorted(set(np.unique(bits).tolist()) - set(VALID_BITS))
    if bad:
        raise FormatError(f"{name}: bit-widths {bad} are not allowed (0..8 or 16)")
    off, length = ranges.take(*_range(e.get("scales"), f"{name} scales"), f"{name} scales", 2 * ng)
    scales = np.frombuffer(section[off: off + length], "<f2").astype(np.float16)
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise FormatError(f"{name}: scales must be finite and non-negative")
    idx = e.get("index")
    if not isinstance(idx, list) or len(idx) != 4 or not isinstance(idx[0], str):
        raise FormatError(f"{name}: index must be [coding, count, offset, length]")
    count = _int(idx[1], f"{name} index count")
    if count > numel:
        raise FormatError(f"{name}: index count {count} exceeds {numel} elements")
    if idx[0] == "rans" and version < 3:
        raise FormatError(f"{name}: the rans index needs format version 3, the file says {version}")
    off, length = ranges.take(idx[2], idx[3], f"{name} index")
    if idx[0] == "bitmap" and length != -(-numel // 8):
        raise FormatError(f"{name}: bitmap index has {length} bytes, expected {-(-numel // 8)}")
    mask = decode_index(idx[0], bytes(section[off: off + length]), numel, count)
    group = layout.group_of_element()
    widths = bits.astype(np.int64)[group][mask]
    if np.any(widths == 0):
        raise FormatError(f"{name}: surviving elements in groups of bit-width 0")
    coding = e.get("codes_coding", "packed")
    if "codes_coding" in e and version < 3:
        raise FormatError(f"{name}: 'codes_coding' needs format version 3, the file says {version}")
    if coding == "packed":
        expected = -(-int(widths.sum()) // 8)
        off, length = ranges.take(*_range(e.get("codes"), f"{name} codes"), f"{name} codes", expected)
        codes = unpack_codes(bytes(section[off: off + length]), widths)
    elif coding == "rans":
        if widths.size == 0 or widths.max() > 8:
            raise FormatError(f"{name}: rans codes need at least one survivor and bit-widths of at most 8")
        off, length = ranges.take(*_range(e.get("codes"), f"{name} codes"), f"{name} codes")
        codes = decode_stream(section[off: off + length], *_code_contexts(widths), widths.size, f"{name} codes")
    else:
        raise FormatError(f"{name}: unknown codes coding {coding!r} (packed or rans)")
    mid = (widths >= 2) & (widths <= 8)
    if np.any(codes[mid] > max_code(widths[mid], grid)):
        raise FormatError(f"{name}: code out of range for its bit-width")
    if np.any(widths == 16):
        h = codes[widths == 16].astype(np.uint16).view(np.float16)
        if not np.all(np.isfinite(h)):
            raise FormatError(f"{name}: float16 value is NaN or Inf")
    return QuantTensor(layout, bits, scales, mask, codes, grid, entropy=idx[0] == "rans" or coding == "rans")


def load_payload(path: str | Path) -> Payload:
    path = Path(path)
    if not path.is_file():
        raise LrpcError(f"file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LrpcError(f"cannot read {path}: {exc.strerror or exc}") from None
    return decode(data)
