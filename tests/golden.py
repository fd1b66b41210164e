"""The payload behind tests/data/golden.lrpc (run this file to regenerate it after a deliberate format change)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lrpcompress.packing import Payload, save_payload
from lrpcompress.quantization import GroupLayout, QuantTensor

GOLDEN = Path(__file__).parent / "data" / "golden.lrpc"
GOLDEN_MIDRISE = Path(__file__).parent / "data" / "golden_midrise.lrpc"  # format version 2
GOLDEN_RANS = Path(__file__).parent / "data" / "golden_rans.lrpc"  # format version 3


def golden_payload(grid: str = "symmetric") -> Payload:
    """Symmetric: codes as in version 1. Midrise: the same, with every 2..8-bit group's top code (3, 7, 255)
    used as well, which only that grid allows."""
    layout = GroupLayout((3, 4), 2)  # 6 groups
    bits = np.array([2, 3, 8, 1, 0, 16], dtype=np.uint8)
    scales = np.array([0.5, 0.25, 0.01, 1.0, 0.0, 0.0], dtype=np.float16)
    mask = np.array([1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1], dtype=bool)
    half = np.array([1.5, -2.0], dtype=np.float16).view(np.uint16).astype(np.int64)
    top = grid == "midrise"
    codes = np.array([0, 3 if top else 2, 7 if top else 6, 4, 255 if top else 254, 1, *half], dtype=np.int64)
    q = QuantTensor(layout, bits, scales, mask, codes, grid)
    return Payload(model={"arch": "digits_cnn", "num_classes": 10, "widths": None, "classes": None, "folded": []},
                   tensors={"w": q, "b": torch.tensor([0.5, -1.25, 3.0]), "c": torch.tensor([1.0, 2.0])},
                   float_dtype={"b": "float16", "c": "float32"}, metadata={"note": "golden"})


def golden_rans_payload() -> Payload:
    """A 4x128 tensor whose survivor mask (90% kept) and 3-/5-bit codes (mostly the zero level) are shorter
    with rANS than bit-packed: the writer picks rANS for both (format version 3)."""
    rng = np.random.default_rng(7)
    layout = GroupLayout((4, 128), 64)  # 8 groups
    bits = np.array([3, 3, 3, 5, 3, 3, 5, 3], dtype=np.uint8)
    scales = np.linspace(0.01, 0.08, 8).astype(np.float16)
    mask = rng.random(512) < 0.9
    width = bits.astype(np.int64)[layout.group_of_element()][mask]
    zero = 2 ** (width - 1) - 1
    codes = np.clip(zero + np.round(rng.normal(0, 0.7, width.size)).astype(np.int64), 0, 2 * zero)
    q = QuantTensor(layout, bits, scales, mask, codes, "symmetric", entropy=True)
    return Payload(model={"arch": "digits_cnn", "num_classes": 10, "widths": None, "classes": None, "folded": []},
                   tensors={"w": q, "b": torch.tensor([0.5, -1.25])}, metadata={"note": "golden rans"})


if __name__ == "__main__":
    print(save_payload(golden_payload(), GOLDEN), "bytes written to", GOLDEN)
    print(save_payload(golden_payload("midrise"), GOLDEN_MIDRISE), "bytes written to", GOLDEN_MIDRISE)
    print(save_payload(golden_rans_payload(), GOLDEN_RANS), "bytes written to", GOLDEN_RANS)
