"""Image data: uint8 arrays in memory, normalised batch by batch.

Sources: a folder with ``train.npz``/``test.npz`` (``x`` uint8 NHWC, ``y`` int64), torchvision's
CIFAR-10 (downloaded by torchvision on the user's machine), an ImageFolder tree, and
scikit-learn's digits (ships with scikit-learn; used by the demo).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import LrpcError

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class ImageData:
    """Images ``x`` (uint8, N×H×W×C) with labels ``y`` (int64), and the normalisation the model expects."""

    x: np.ndarray
    y: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    scale: float = 255.0

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise LrpcError(f"images must be N×H×W×C, got shape {self.x.shape}")
        if self.y.ndim != 1 or len(self.y) != len(self.x):
            raise LrpcError(f"labels must be one per image: {len(self.x)} images, labels of shape {self.y.shape}")
        if len(self.x) == 0:
            raise LrpcError("the data set is empty")
        if self.x.shape[-1] != len(self.mean) or len(self.mean) != len(self.std):
            raise LrpcError(f"images have {self.x.shape[-1]} channels but normalisation has {len(self.mean)}")
        if self.y.min() < 0 or self.y.max() >= len(self.classes):
            raise LrpcError(f"labels out of range: found {int(self.y.min())}..{int(self.y.max())}, "
                            f"expected 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def tensor(self, idx: np.ndarray | slice, device: torch.device | str | None = None) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.x[idx])).to(device).permute(0, 3, 1, 2).float()
        x = x.div_(self.scale)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def batches(self, batch_size: int, indices: np.ndarray | None = None,
                device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised (x, y) batches in ``indices`` order, on ``device`` (default CPU)."""
        if indices is None:
            indices = np.arange(len(self))
        for i in range(0, len(indices), batch_size):
            idx = indices[i: i + batch_size]
            yield self.tensor(idx, device), torch.from_numpy(self.y[idx]).long().to(device)

    def subset(self, indices: np.ndarray) -> "ImageData":
        return ImageData(self.x[indices], self.y[indices], self.mean, self.std, self.classes, self.scale)

    def restrict_classes(self, classes: Sequence[int]) -> "ImageData":
        """Keep only the images of ``classes`` and relabel them 0..len(classes)-1 in the given order."""
        classes = list(classes)
        keep = np.isin(self.y, classes)
        remap = np.full(len(self.classes), -1, dtype=np.int64)
        remap[classes] = np.arange(len(classes))
        return ImageData(self.x[keep], remap[self.y[keep]], self.mean, self.std,
                         tuple(self.classes[c] for c in classes), self.scale)


def sample_indices(n: int, k: int, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """``k`` distinct indices of ``range(n)``, class-balanced when ``labels`` are given, sorted; seeded."""
    if k <= 0:
        raise LrpcError(f"the number of samples must be positive, got {k}")
    rng = np.random.default_rng(seed)
    if k >= n:
        return np.arange(n)
    if labels is None:
        return np.sort(rng.choice(n, size=k, replace=False))
    classes = np.unique(labels)
    per = [np.flatnonzero(labels == c) for c in classes]
    picks = []
    for j, idx in enumerate(per):
        share = k // len(classes) + (1 if j < k % len(classes) else 0)
        picks.append(rng.choice(idx, size=min(share, len(idx)), replace=False))
    return np.sort(np.concatenate(picks))


def split_train_val(data: ImageData, val_size: int, seed: int) -> tuple[ImageData, ImageData]:
    """Carve a validation split out of training data (seeded, class-balanced)."""
    val_idx = sample_indices(len(data), val_size, seed + 7919, data.y)
    mask = np.ones(len(data), dtype=bool)
    mask[val_idx] = False
    return data.subset(np.flatnonzero(mask)), data.subset(val_idx)


def _check_images(x: np.ndarray, where: str, size: tuple[int, int] | None) -> np.ndarray:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise LrpcError(f"{where}: images must be uint8 N×H×W×C with 1 or 3 channels, got {x.dtype} {x.shape}")
    if size is not None and tuple(x.shape[1:3]) != tuple(size):
        raise LrpcError(f"{where}: images are {x.shape[1]}×{x.shape[2]}, the model needs {size[0]}×{size[1]}")
    return x


def load_npz_split(folder: str | Path, split: str, size: tuple[int, int] | None = (32, 32)) -> ImageData:
    """Load ``folder/{split}.npz`` (CIFAR-style arrays; see shared/data/README.md)."""
    path = Path(folder) / f"{split}.npz"
    if not path.is_file():
        raise LrpcError(f"data file not found: {path} (expected a folder with train.npz and test.npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
    except (KeyError, ValueError, OSError) as exc:
        raise LrpcError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                        "it needs arrays 'x' (uint8 N×H×W×C) and 'y' (int labels)") from None
    x = _check_images(x, str(path), size)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise LrpcError(f"{path}: labels 'y' must be a 1-D integer array, got {y.dtype} {y.shape}")
    n_classes = max(10, int(y.max()) + 1) if len(y) else 10
    classes = CIFAR_CLASSES if n_classes == 10 else tuple(str(i) for i in range(n_classes))
    if len(y) and (y.min() < 0 or y.max() >= len(classes)):
        raise LrpcError(f"{path}: labels out of range 0..{len(classes) - 1}")
    return ImageData(x, y.astype(np.int64), CIFAR_MEAN, CIFAR_STD, classes)


def load_torchvision_cifar10(root: str | Path, split: str, download: bool = False) -> ImageData:
    """CIFAR-10 through torchvision (the original PNG-derived pixels); ``download`` fetches it once."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=(split == "train"), download=download)
    except RuntimeError as exc:
        raise LrpcError(f"CIFAR-10 not found under {root}: {exc}; pass download=True on a networked machine") from None
    return ImageData(np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64),
                     CIFAR_MEAN, CIFAR_STD, tuple(ds.classes))


def load_image_folder(root: str | Path, size: tuple[int, int] = (32, 32),
                      mean: tuple[float, ...] = CIFAR_MEAN, std: tuple[float, ...] = CIFAR_STD) -> ImageData:
    """An ImageFolder tree (one sub-folder per class), resized to ``size``."""
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as exc:
        raise LrpcError(f"cannot read image folder {root}: {exc}") from None
    xs = [np.asarray(ds.loader(p).convert("RGB").resize(size[::-1])) for p, _ in ds.samples]
    return ImageData(np.stack(xs).astype(np.uint8), np.asarray(ds.targets, dtype=np.int64), mean, std, tuple(ds.classes))


def load_digits_data(seed: int = 0, test_fraction: float = 0.25) -> tuple[ImageData, ImageData]:
    """scikit-learn's 8×8 handwritten digits (1,797 images), split into train and test (seeded)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(d.images * 16, 0, 255).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_test = int(len(y) * test_fraction)
    classes = tuple(str(i) for i in range(10))
    mk = lambda idx: ImageData(x[np.sort(idx)], y[np.sort(idx)], (0.3,), (0.4,), classes)  # noqa: E731
    return mk(perm[n_test:]), mk(perm[:n_test])


def load_data(source: str | Path, split: str, size: tuple[int, int] | None = (32, 32)) -> ImageData:
    """Load a split from ``source``: an npz folder, ``torchvision-cifar10:ROOT``, or an ImageFolder tree."""
    source = str(source)
    if source.startswith("torchvision-cifar10:"):
        return load_torchvision_cifar10(source.split(":", 1)[1], split)
    path = Path(source)
    if not path.exists():
        raise LrpcError(f"data folder not found: {path}")
    if (path / f"{split}.npz").exists() or (path / "train.npz").exists() or (path / "test.npz").exists():
        return load_npz_split(path, split, size)
    if (path / split).is_dir():
        return load_image_folder(path / split, size or (32, 32))
    raise LrpcError(f"{path} holds neither {split}.npz nor an ImageFolder '{split}/' sub-folder")


def parse_classes(spec: str | None, names: Sequence[str]) -> list[int] | None:
    """Parse ``--classes 0,1,8`` or ``airplane,automobile,ship`` into sorted-as-given unique indices."""
    if spec is None or spec == "":
        return None
    out: list[int] = []
    for tok in (t.strip() for t in spec.split(",")):
        if tok.isdigit() and int(tok) < len(names):
            idx = int(tok)
        elif tok in names:
            idx = list(names).index(tok)
        else:
            raise LrpcError(f"unknown class {tok!r}; use indices 0..{len(names) - 1} or names {', '.join(names)}")
        if idx in out:
            raise LrpcError(f"class {tok!r} is listed twice")
        out.append(idx)
    if len(out) < 2:
        raise LrpcError("--classes needs at least two classes")
    return out
