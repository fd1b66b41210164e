"""Progress bars (tqdm on stderr), off when not a terminal unless forced."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(it: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False) -> "tqdm[T]":
    """Wrap ``it`` in a progress bar; LRPC_PROGRESS=0 silences all bars, =1 forces them."""
    env = os.environ.get("LRPC_PROGRESS")
    if env == "0":
        disable = True
    elif env != "1" and not sys.stderr.isatty():
        disable = True
    return tqdm(it, total=total, desc=desc, unit=unit, disable=disable, leave=False, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)
