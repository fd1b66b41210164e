"""Model architectures and the architecture registry.

``build_model(arch, num_classes)`` accepts the CIFAR ResNets (resnet20/32/44/56), the small
``digits_cnn`` of the demo, torchvision model names, and ``package.module:function`` for a
user's own factory. Checkpoints load with ``weights_only=True`` only.
"""

from __future__ import annotations

import copy
import importlib
import pickle
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import LrpcError

CIFAR_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}


class Add(nn.Module):
    """Residual addition as a module, so relevance rules can see it."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class OptionAShortcut(nn.Module):
    """The parameter-free shortcut of the CIFAR ResNet paper: stride-2 subsample, zero-pad channels.

    ``channel_map`` says, for every output channel, which input channel it carries (-1: a zero channel).
    The paper's shortcut is the map ``[-1]*lo + [0..in-1] + [-1]*hi``; structured pruning of the residual
    streams edits the map (see :mod:`lrpcompress.structured`), so the two stages around it are decoupled.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, channel_map: Sequence[int] | None = None) -> None:
        super().__init__()
        self.in_planes, self.out_planes, self.stride = in_planes, out_planes, stride
        self.set_channel_map(self.default_map(in_planes, out_planes) if channel_map is None else channel_map,
                             in_planes)

    @staticmethod
    def default_map(in_planes: int, out_planes: int) -> list[int]:
        extra = out_planes - in_planes
        lo = extra // 2
        return [-1] * lo + list(range(in_planes)) + [-1] * (extra - lo)

    def set_channel_map(self, channel_map: Sequence[int], in_planes: int) -> None:
        cmap = [int(c) for c in channel_map]
        if not cmap or in_planes < 1 or any(c < -1 or c >= in_planes for c in cmap):
            raise LrpcError(f"a shortcut channel map needs entries in -1..{in_planes - 1}, got {cmap}")
        self.in_planes, self.out_planes, self.channel_map = in_planes, len(cmap), cmap
        self._is_pad = cmap == self.default_map(in_planes, len(cmap))
        # gather, then zero the padded outputs; no channel padding or concatenation, which dependency
        # tracers (Torch-Pruning) would read as channel-mixing ops inside the shortcut
        idx = torch.tensor([max(c, 0) for c in cmap], dtype=torch.long)
        mask = torch.tensor([float(c >= 0) for c in cmap]).reshape(1, -1, 1, 1)
        old = getattr(self, "index", None)
        dev = old.device if old is not None else None
        self.register_buffer("index", idx.to(dev), persistent=False)
        self.register_buffer("mask", mask.to(dev), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        if self._is_pad:
            extra = self.out_planes - self.in_planes
            lo = extra // 2
            return F.pad(x, (0, 0, 0, 0, lo, extra - lo))
        return x.index_select(1, self.index) * self.mask.to(x.dtype)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, mid_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid_planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = OptionAShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()
        self.add = Add()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.add(out, self.shortcut(x)))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016), key-compatible with akamaster/pytorch_resnet_cifar10.

    ``widths`` optionally gives the inner width (conv1 output channels) of every block, for
    models slimmed by structured pruning; the stage widths stay 16/32/64.
    """

    def __init__(self, depth_n: int, num_classes: int = 10, widths: Sequence[int] | None = None) -> None:
        super().__init__()
        n_blocks = 3 * depth_n
        if widths is None:
            widths = [16] * depth_n + [32] * depth_n + [64] * depth_n
        if len(widths) != n_blocks or any(int(w) < 1 for w in widths):
            raise LrpcError(f"widths must list {n_blocks} positive channel counts, got {list(widths)}")
        self.widths = [int(w) for w in widths]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        in_planes, k = 16, 0
        for stage, planes in enumerate((16, 32, 64)):
            blocks = []
            for i in range(depth_n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(in_planes, self.widths[k], planes, stride))
                in_planes, k = planes, k + 1
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.pool(x)))


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits, used by the embedded demo."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


def _torchvision_factory(name: str) -> Callable[..., nn.Module] | None:
    try:
        import torchvision.models as tvm
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    if name in tvm.list_models(module=tvm):
        return lambda num_classes=1000: tvm.get_model(name, weights=None, num_classes=num_classes)
    return None


def is_builtin_arch(arch: str) -> bool:
    return arch in CIFAR_DEPTHS or arch == "digits_cnn" or (":" not in arch and _torchvision_factory(arch) is not None)


def build_model(
    arch: str, num_classes: int = 10, widths: Sequence[int] | None = None, allow_import: bool = True
) -> nn.Module:
    """Build an untrained model by architecture name.

    ``allow_import=False`` refuses ``package.module:function`` (used by the file loader, which
    must never import code named by a file).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise LrpcError(f"num_classes must be a positive int, got {num_classes!r}")
    if arch in CIFAR_DEPTHS:
        return CifarResNet(CIFAR_DEPTHS[arch], num_classes, widths)
    if widths is not None:
        raise LrpcError(f"architecture {arch!r} does not support slimmed widths")
    if arch == "digits_cnn":
        return DigitsCNN(num_classes)
    if ":" in arch:
        if not allow_import:
            raise LrpcError(
                f"architecture {arch!r} is a user factory; pass it explicitly (--arch) to load this file"
            )
        mod_name, _, fn_name = arch.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise LrpcError(f"cannot import model factory {arch!r}: {exc}") from None
        model = fn(num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise LrpcError(f"model factory {arch!r} returned {type(model).__name__}, not an nn.Module")
        return model
    factory = _torchvision_factory(arch)
    if factory is None:
        known = ", ".join(sorted(CIFAR_DEPTHS) + ["digits_cnn"])
        raise LrpcError(
            f"unknown architecture {arch!r}; use one of {known}, a torchvision model name, or package.module:function"
        )
    return factory(num_classes=num_classes)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint without unpickling code: plain state_dict, {'state_dict': ...}, DataParallel prefixes."""
    path = Path(path)
    if not path.is_file():
        raise LrpcError(f"weights file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LrpcError(
            f"cannot read weights {path}: it is not a weights-only checkpoint (it holds Python objects that "
            "only pickle could load, which can run code); re-save it with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise LrpcError(f"cannot read weights {path}: not a PyTorch checkpoint ({first})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LrpcError(f"weights file {path} does not hold a state_dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "weights") -> nn.Module:
    """Load ``state`` into ``model`` strictly, with errors that name the mismatch; reject NaN/Inf."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}")
        if unexpected:
            detail.append(f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}")
        raise LrpcError(f"{source} do not match the architecture: {'; '.join(detail)}; check --arch")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise LrpcError(
                f"{source} do not match the architecture: {k} has shape {tuple(v.shape)}, "
                f"expected {tuple(own[k].shape)}; check --arch"
            )
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise LrpcError(f"{source} contain NaN or Inf in {k}")
    model.load_state_dict(state, strict=False)
    return model


def load_model(arch: str, weights: str | Path, num_classes: int | None = None) -> nn.Module:
    """Build ``arch`` and load a checkpoint into it (eval mode). ``num_classes`` defaults to the checkpoint's head."""
    state = read_state_dict(weights)
    if num_classes is None:
        num_classes = _infer_num_classes(state)
    model = build_model(arch, num_classes)
    return load_weights(model, state, source=f"weights {weights}").eval()


def _infer_num_classes(state: dict[str, torch.Tensor]) -> int:
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return int(weights[-1].shape[0]) if weights else 10


def restrict_classes(model: nn.Module, classes: Sequence[int]) -> nn.Module:
    """Cut the classifier head (the last nn.Linear) down to ``classes``, in the given order. Returns a copy."""
    import copy

    model = copy.deepcopy(model)
    heads = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise LrpcError("cannot restrict classes: the model has no nn.Linear classifier head")
    name, head = heads[-1]
    if max(classes) >= head.out_features:
        raise LrpcError(f"class index {max(classes)} is beyond the model's {head.out_features} outputs")
    new = nn.Linear(head.in_features, len(classes), bias=head.bias is not None).to(head.weight.device)
    with torch.no_grad():
        new.weight.copy_(head.weight[list(classes)])
        if head.bias is not None:
            new.bias.copy_(head.bias[list(classes)])
    model.set_submodule(name, new)
    return model.eval()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dense_bytes(model: nn.Module) -> int:
    """float32 bytes of the model's float checkpoint: every floating tensor of its state_dict (parameters and
    persistent buffers such as BatchNorm statistics; not derived ones like a shortcut's channel mask)."""
    tensors = {t.data_ptr(): t.numel() for t in model.state_dict().values() if t.is_floating_point()}  # tied once
    return 4 * sum(tensors.values())


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A deployment copy of ``model`` (eval mode): every BatchNorm that reads a convolution's or linear layer's
    output is folded into that layer (weight scaled, shift added to its bias) and replaced by the identity.

    The same function up to float rounding, without the BatchNorm passes that a loaded model still runs (on a
    CIFAR ResNet at batch 64, 7-15% of its CPU time; docs/FINDINGS.md §14). BatchNorms fed by anything else stay.
    ``example`` (a batch the model accepts) traces which layer feeds which BatchNorm; the copy's outputs on it are
    checked against the model's, so a layer whose output also feeds something besides its BatchNorm is an error
    rather than a silently different model."""
    from .relevance import _find_folds, _folded_params  # relevance imports this module

    net = copy.deepcopy(model).eval()
    example = example.to(model_device(net))
    folds = _find_folds(net, example)
    if not folds:
        return net
    reference = net(example)
    names = {m: n for n, m in net.named_modules()}
    for bn, layer in folds.items():
        w, b = _folded_params(layer, bn)
        layer.weight.copy_(w)
        layer.bias = nn.Parameter(b.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
        net.set_submodule(names[bn], nn.Identity())
    out = net(example)
    tol = 1e-4 * float(reference.abs().max().clamp_min(1.0))
    if out.shape != reference.shape or float((out - reference).abs().max()) > tol:
        raise LrpcError("folding BatchNorm changed the model's output: a layer that feeds a BatchNorm also feeds "
                        "something else (or is used twice); deploy the model unfolded")
    return net


__all__ = [
    "Add", "BasicBlock", "CifarResNet", "DigitsCNN", "OptionAShortcut", "CIFAR_DEPTHS",
    "build_model", "is_builtin_arch", "model_device", "restrict_classes", "read_state_dict", "load_weights", "load_model",
    "count_params", "dense_bytes", "fold_batchnorm",
]
