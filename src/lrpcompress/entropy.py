"""Entropy coding of quantization codes and survivor masks: static, interleaved rANS.

Pure functions on integer arrays, no model knowledge; the byte layout is specified in docs/FORMAT.md
("rANS streams"). A stream codes ``n`` symbols, each drawn from the alphabet of its *context* (for weight
codes the context is the element's bit-width, so 3-bit and 5-bit codes get separate tables). Every context
has one frequency table summing to ``2^PROB_BITS``; symbols are dealt round-robin to ``lanes`` independent
coders, which lets both directions run one vectorised step per ``lanes`` symbols.

The state is 32 bits, renormalised in 16-bit words (at most one word per symbol); the encoder starts and the
decoder must end every lane at ``STATE_LOW``, and must consume every word: a corrupt stream fails loudly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import FormatError, LrpcError

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
STATE_LOW = 1 << 16
LANE_SYMBOLS = 2048  # the writer's choice: one lane per this many symbols (4 bytes of final state each)
MAX_LANES = 4096
MAX_ALPHABET = 256
# Streams with at most this many lanes are coded symbol by symbol in plain Python: a vectorised step costs
# about as much as 20 scalar symbols, so below that the loop over symbols is the faster of the two.
SCALAR_LANES = 16


# ---------------------------------------------------------------- varints (LEB128, as the survivor index uses)

def put_varints(values: Sequence[int] | np.ndarray) -> bytes:
    out = bytearray()
    for v in np.asarray(values, dtype=np.int64).tolist():
        if v < 0:
            raise LrpcError("varints must be non-negative")
        while True:
            byte = v & 0x7F
            v >>= 7
            out.append(byte | 0x80 if v else byte)
            if not v:
                break
    return bytes(out)


def read_varints(buf: bytes | memoryview, pos: int, count: int, what: str) -> tuple[list[int], int]:
    """``count`` varints from ``buf[pos:]`` (each < 2^35); returns them and the position after."""
    vals: list[int] = []
    end = len(buf)
    for _ in range(count):
        cur = shift = 0
        while True:
            if pos >= end:
                raise FormatError(f"{what}: truncated varint")
            byte = buf[pos]
            pos += 1
            cur |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 28:
                raise FormatError(f"{what}: varint too long")
        vals.append(cur)
    return vals, pos


# ---------------------------------------------------------------- frequency tables

def normalize_freqs(counts: np.ndarray) -> np.ndarray:
    """Integer frequencies summing to ``PROB_SCALE``: ≥ 1 exactly where ``counts`` > 0, proportional to the
    counts with the rounding remainder given by largest fractional part (deterministic, ties: lower symbol)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    present = counts > 0
    if total <= 0:
        raise LrpcError("a frequency table needs at least one symbol")
    if int(present.sum()) > PROB_SCALE:
        raise LrpcError(f"an alphabet of more than {PROB_SCALE} symbols cannot be coded")
    exact = counts * PROB_SCALE
    f = np.where(present, np.maximum(exact // total, 1), 0)
    short = PROB_SCALE - int(f.sum())
    if short > 0:  # largest remainders first
        rem = np.where(present & (f == exact // total), exact % total, -1)
        order = np.argsort(-rem, kind="stable")
        f[order[:short]] += 1
    while short < 0:  # minimum-1 bumps overshot: take from the largest
        i = int(np.argmax(f))
        take = min(-short, int(f[i]) - 1)
        f[i] -= take
        short += take
    return f


def code_lengths(freqs: np.ndarray) -> np.ndarray:
    """Bits a symbol costs under a normalised table (``inf`` where its frequency is 0)."""
    f = np.asarray(freqs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return PROB_BITS - np.log2(f)


def estimate_bits(counts: np.ndarray) -> float:
    """Payload bits of coding symbols with these counts under their own normalised table (no table, no state)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() == 0:
        return 0.0
    f = normalize_freqs(counts)
    used = counts > 0
    return float((counts[used] * code_lengths(f)[used]).sum())


def default_lanes(n: int) -> int:
    return max(1, min(MAX_LANES, n // LANE_SYMBOLS))


# ---------------------------------------------------------------- streams

def _tables(alphabets: Sequence[int], freqs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum(alphabets)]).astype(np.int64)
    f_all = np.concatenate([np.asarray(f, np.uint64) for f in freqs])
    c_all = np.concatenate([np.concatenate([[0], np.cumsum(f)[:-1]]).astype(np.uint64) for f in freqs])
    return offsets, f_all, c_all


def encode_stream(symbols: np.ndarray, contexts: np.ndarray | None, alphabets: Sequence[int],
                  lanes: int | None = None) -> bytes:
    """Code ``symbols`` (``symbols[i] < alphabets[contexts[i]]``; ``contexts`` None = all 0) as one stream:
    varint lane count, each context's table as ``alphabets[c]`` varints, the lanes' final states (u32),
    the renormalisation words (u16), all little-endian."""
    sym = np.asarray(symbols, dtype=np.int64)
    n = sym.size
    ctx = np.zeros(n, np.int64) if contexts is None else np.asarray(contexts, dtype=np.int64)
    if n == 0:
        raise LrpcError("an rANS stream needs at least one symbol")
    if ctx.shape != sym.shape or ctx.min() < 0 or ctx.max() >= len(alphabets):
        raise LrpcError("every symbol needs a context among the alphabets")
    alph = np.asarray(alphabets, np.int64)
    if np.any(alph < 1) or np.any(alph > MAX_ALPHABET) or sym.min() < 0 or np.any(sym >= alph[ctx]):
        raise LrpcError("symbol outside its context's alphabet")
    k = lanes or default_lanes(n)
    if not 1 <= k <= min(n, MAX_LANES):
        raise LrpcError(f"lanes must be 1..{min(n, MAX_LANES)}, got {k}")
    offsets = np.concatenate([[0], np.cumsum(alph)])
    flat = offsets[ctx] + sym
    counts = np.bincount(flat, minlength=int(offsets[-1]))
    freqs = []
    for c in range(len(alph)):
        cnt = counts[offsets[c]: offsets[c + 1]]
        freqs.append(normalize_freqs(cnt) if cnt.sum() else np.zeros(int(alph[c]), np.int64))
        if not cnt.sum():
            freqs[-1][0] = PROB_SCALE  # an unused context still stores a valid table
    _, f_all, c_all = _tables(alph, freqs)
    head = put_varints([k]) + b"".join(put_varints(f) for f in freqs)
    if k <= SCALAR_LANES:
        states, word_arr = _encode_scalar(flat, f_all, c_all, k)
        return head + states.astype("<u4").tobytes() + word_arr.astype("<u2").tobytes()
    steps = -(-n // k)
    pad = np.zeros(steps * k, np.int64)
    pad[:n] = flat
    f_m = f_all[pad].reshape(steps, k)
    c_m = c_all[pad].reshape(steps, k)
    x = np.full(k, STATE_LOW, np.uint64)
    words: list[np.ndarray] = []
    shift = np.uint64(32 - PROB_BITS)
    for j in range(steps - 1, -1, -1):
        m = k if j < steps - 1 else n - j * k
        xm, f, c = x[:m], f_m[j, :m], c_m[j, :m]
        ren = xm >= (f << shift)
        words.append((xm[ren] & np.uint64(0xFFFF)).astype("<u2"))
        xm = np.where(ren, xm >> np.uint64(16), xm)
        x[:m] = ((xm // f) << np.uint64(PROB_BITS)) + xm % f + c
    return head + x.astype("<u4").tobytes() + b"".join(w.tobytes() for w in reversed(words))


def _encode_scalar(flat: np.ndarray, f_all: np.ndarray, c_all: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The vectorised loop of :func:`encode_stream`, one symbol at a time; same states, same words."""
    F, C = f_all.tolist(), c_all.tolist()
    x = [STATE_LOW] * k
    words: list[int] = []
    shift = 32 - PROB_BITS
    syms = flat.tolist()
    lane = (len(syms) - 1) % k
    # symbols last to first = steps last to first, lanes high to low; reversed at the end, the words come
    # out as the decoder reads them: steps first to last, lanes low to high
    for s in reversed(syms):
        f = F[s]
        xi = x[lane]
        if xi >= f << shift:
            words.append(xi & 0xFFFF)
            xi >>= 16
        x[lane] = ((xi // f) << PROB_BITS) + xi % f + C[s]
        lane = lane - 1 if lane else k - 1
    words.reverse()
    return np.asarray(x, np.uint64), np.asarray(words, np.uint64)


def _decode_vector(x: np.ndarray, words: np.ndarray, flat_base: np.ndarray, slot_to_flat: np.ndarray,
                   f_all: np.ndarray, c_all: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The decoder's loop, one numpy step per row of lanes: symbols (flat indices), end states, words read."""
    k, n = x.size, flat_base.size
    x = x.copy()
    steps = -(-n // k)
    base = np.zeros(steps * k, np.int64)
    base[:n] = flat_base
    base = base.reshape(steps, k)
    out = np.zeros(steps * k, np.int64)
    p = 0
    mask = np.uint64(PROB_SCALE - 1)
    for j in range(steps):
        m = k if j < steps - 1 else n - j * k
        xm = x[:m]
        slot = xm & mask
        flat = slot_to_flat[base[j, :m] + slot.astype(np.int64)]
        out[j * k: j * k + m] = flat
        xm = f_all[flat] * (xm >> np.uint64(PROB_BITS)) + slot - c_all[flat]
        need = xm < STATE_LOW
        cnt = int(need.sum())
        if cnt:
            if p + cnt > words.size:
                raise FormatError(f"{what}: the stream ends early")
            xm[need] = (xm[need] << np.uint64(16)) | words[p: p + cnt]
            p += cnt
        x[:m] = xm
    return out[:n], x, p


def _decode_scalar(x: np.ndarray, words: np.ndarray, flat_base: np.ndarray, slot_to_flat: np.ndarray,
                   f_all: np.ndarray, c_all: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`_decode_vector`'s loop one symbol at a time (faster for few lanes); same results."""
    F, C, S = f_all.tolist(), c_all.tolist(), slot_to_flat.tolist()
    W = words.tolist()
    nw = len(W)
    states = x.tolist()
    k = len(states)
    out = [0] * flat_base.size
    p = lane = 0
    mask = PROB_SCALE - 1
    for i, b in enumerate(flat_base.tolist()):
        xi = states[lane]
        slot = xi & mask
        s = S[b + slot]
        out[i] = s
        xi = F[s] * (xi >> PROB_BITS) + slot - C[s]
        if xi < STATE_LOW:
            if p >= nw:
                raise FormatError(f"{what}: the stream ends early")
            xi = (xi << 16) | W[p]
            p += 1
        states[lane] = xi
        lane = lane + 1 if lane < k - 1 else 0
    return np.asarray(out, np.int64), np.asarray(states, np.uint64), p


def decode_stream(buf: bytes | memoryview, contexts: np.ndarray | None, alphabets: Sequence[int], n: int,
                  what: str = "stream") -> np.ndarray:
    """Inverse of :func:`encode_stream` for ``n`` symbols whose contexts are known; validates everything."""
    buf = bytes(buf)
    ctx = np.zeros(n, np.int64) if contexts is None else np.asarray(contexts, dtype=np.int64)
    if n < 1 or ctx.shape != (n,):
        raise FormatError(f"{what}: an rANS stream needs a context for each of its n ≥ 1 symbols")
    (k,), pos = read_varints(buf, 0, 1, what)
    if not 1 <= k <= min(n, MAX_LANES):
        raise FormatError(f"{what}: {k} lanes for {n} symbols (1..{min(n, MAX_LANES)} allowed)")
    alph = np.asarray(alphabets, np.int64)
    freqs = []
    for a in alph.tolist():
        f, pos = read_varints(buf, pos, a, what)
        f = np.asarray(f, np.int64)
        if int(f.sum()) != PROB_SCALE:
            raise FormatError(f"{what}: a frequency table sums to {int(f.sum())}, expected {PROB_SCALE}")
        freqs.append(f)
    if len(buf) - pos < 4 * k or (len(buf) - pos - 4 * k) % 2:
        raise FormatError(f"{what}: {len(buf) - pos} bytes cannot hold {k} lane states and whole 16-bit words")
    x = np.frombuffer(buf, "<u4", k, pos).astype(np.uint64)
    if np.any(x < STATE_LOW):
        raise FormatError(f"{what}: a lane state is below 2^16")
    words = np.frombuffer(buf, "<u2", offset=pos + 4 * k).astype(np.uint64)
    offsets, f_all, c_all = _tables(alph, freqs)
    slot_to_flat = np.concatenate([np.repeat(np.arange(a, dtype=np.int64) + offsets[i], f)
                                   for i, (a, f) in enumerate(zip(alph.tolist(), freqs))])
    decode = _decode_scalar if k <= SCALAR_LANES else _decode_vector
    out, x, p = decode(x, words, ctx * PROB_SCALE, slot_to_flat, f_all, c_all, what)
    if p != words.size or np.any(x != STATE_LOW):
        raise FormatError(f"{what}: the stream does not decode to its end state (corrupt data)")
    return out - offsets[ctx]
