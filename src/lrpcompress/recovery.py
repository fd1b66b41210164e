"""Recovery fine-tuning through the quantizers (straight-through estimator).

The allocation (bit-width per group), the survivor masks and the float16 scales stay fixed; latent
float weights are trained with the forward pass using their quantized values, so the written file holds
exactly the weights that were evaluated. Pruned weights stay zero. BatchNorm layers keep their
(folded) statistics; shifts and biases train as floats. Parametrizations are removed in ``finally``.
"""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as P

from .calibration import _hooked_eval
from .data import ImageData
from .errors import LrpcError, LrpcWarning
from .models import model_device
from .progress import progress
from .quantization import GroupLayout, QuantTensor, half_range, nearest_level, requantize


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 1
    # lr 0.005 / batch 64: the recipe most accurate on held-out training images at ResNet-20 16x + 2 epochs in
    # each of three seeds (benchmarks/results/gptq/recipes.md; -0.96 on the test split's mean against -1.23 for
    # lr 0.01 / batch 128, the default until 2026-12-01; benchmark rows name theirs in ``finetune_recipe``).
    lr: float = 0.005
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment: bool = True
    seed: int = 0
    clip_grad: float | None = 5.0
    distill: float = 1.0  # weight of the distillation loss from the uncompressed model (0 = labels only)
    temperature: float = 4.0
    # weight of the feature (hint) loss: the normalised squared error between the student's and the teacher's
    # outputs of every block whose output shape both share (``hint_points``), e.g. each residual block after an
    # inner-channel cut (FitNets, Romero et al. 2015; block-wise as in FSKD, Li et al. 2020). 0 = logits only.
    feature_distill: float = 0.0
    train_bn: bool = False  # update BatchNorm statistics (only for float models; folded ones stay frozen)
    # Quantized fine-tuning also trains every group's scale (LSQ, Esser et al. 2020); the learned scales are
    # what the file stores. Off: scales stay as the allocator chose them and only the codes move. On by
    # default: +1.0 / +1.3 points at ResNet-20 16x with 2 epochs (benchmarks/results/recovery.md).
    learn_scales: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise LrpcError(f"finetune epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise LrpcError(f"finetune learning rate must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise LrpcError(f"finetune batch size must be >= 1, got {self.batch_size}")
        if not 0 <= self.momentum < 1:
            raise LrpcError(f"finetune momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise LrpcError(f"finetune weight decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise LrpcError(f"finetune gradient clip must be > 0 (None to switch it off), got {self.clip_grad}")
        if not self.distill >= 0:
            raise LrpcError(f"distillation weight must be >= 0 (0 = labels only), got {self.distill}")
        if not self.temperature > 0:
            raise LrpcError(f"distillation temperature must be > 0, got {self.temperature}")
        if not self.feature_distill >= 0:
            raise LrpcError(f"feature distillation weight must be >= 0 (0 = logits only), got {self.feature_distill}")

    def steps(self, images: int) -> int:
        """Optimizer steps that fine-tuning on ``images`` training images runs (the last batch may be short)."""
        return self.epochs * math.ceil(images / self.batch_size)


# Fewer optimizer steps than this draw a warning: at 16x on ResNet-20, 16 steps (2 epochs of 1,024 images at
# batch 128) left every pipeline where it started, ~200 steps recovered 5-50 points (docs/FINDINGS.md section 6).
MIN_USEFUL_STEPS = 100


# Float recovery after channel pruning: distillation from the unpruned model, BatchNorm statistics updated.
# lr 0.01 / batch 64 were chosen among 12 recipes on held-out training images (docs/FINDINGS.md §5).
RECOVERY_RECIPE = FinetuneConfig(epochs=1, lr=0.01, batch_size=64, distill=1.0, train_bn=True)


def fake_quantize(w: torch.Tensor, layout: GroupLayout, bits: torch.Tensor, scales: torch.Tensor,
                  keep: torch.Tensor, grid: str = "symmetric") -> torch.Tensor:
    """Quantized values of ``w`` at fixed per-group bits and scales (the decoder's arithmetic, float32).

    Rounding passes gradients straight through, so ``scales`` get the LSQ gradient (level(v) - v inside the
    range, ±h outside) when they require one; the values are the same either way."""
    g, _ = layout.to_groups(w)
    b = bits[:, None]
    s = scales[:, None]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    h = half_range(b, grid).clamp(min=0.5)
    v = (g / safe).clamp(-h, h)
    mid = (nearest_level(v, h, grid).detach() + (v - v.detach())) * s  # exact values: v - v is 0
    one = torch.where(g >= 0, s, -s)
    half = g.clamp(-65504, 65504).half().float()
    out = torch.where(b == 1, one, mid)
    out = torch.where(b == 16, half, out)
    out = torch.where(b == 0, torch.zeros_like(out), out)
    return layout.from_groups(out) * keep


class _STE(nn.Module):
    """Weight parametrization for quantized fine-tuning: the forward pass sees the decoder's values.

    Fixed scales: the gradient passes to the float weight unchanged (straight-through). ``learn_scales``:
    the groups' scales become a parameter (rounded to float16 in the forward pass, as the file stores them)
    trained with LSQ's gradient, scaled by 1/sqrt(weights per group · h) as in the paper (h: the largest
    level, LSQ's Q_P)."""

    def __init__(self, qt: QuantTensor, learn_scales: bool = False) -> None:
        super().__init__()
        self.layout = qt.layout
        self.grid = qt.grid
        self.learn_scales = learn_scales
        bits = torch.from_numpy(qt.bits.astype(np.float32))
        self.register_buffer("bits", bits)
        scales = torch.from_numpy(qt.scales.astype(np.float32))
        keep = torch.from_numpy(qt.mask.reshape(qt.shape)).float()
        self.register_buffer("keep", keep)
        if learn_scales:
            self.scale = nn.Parameter(scales)
            n = self.layout.to_groups(keep)[0].sum(1).clamp(min=1)
            h = half_range(bits, qt.grid).clamp(min=1)
            self.register_buffer("grad_factor", 1.0 / torch.sqrt(n * h))
            # scales of 0 (empty groups), float16 codes and pruned groups stay as they are
            self.register_buffer("learnable", (scales > 0) & (bits >= 1) & (bits <= 8))
        else:
            self.register_buffer("scales", scales)

    def current_scales(self) -> torch.Tensor:
        """The scales the forward pass uses: learned ones rounded to float16 and kept positive."""
        if not self.learn_scales:
            return self.scales
        s = self.scale * self.grad_factor + (self.scale - self.scale * self.grad_factor).detach()
        s = s.clamp(min=2.0 ** -24)
        s = s + (s.clamp(max=65504.0).half().float() - s).detach()
        return torch.where(self.learnable, s, self.scale.detach())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        kept = w * self.keep
        if self.learn_scales:  # scales get LSQ's gradient, the weight the straight-through one
            return fake_quantize(w.detach(), self.layout, self.bits, self.current_scales(), self.keep, self.grid) \
                + kept - kept.detach()
        q = fake_quantize(w, self.layout, self.bits, self.scales, self.keep, self.grid)
        return kept + (q - kept).detach()

    def stored_scales(self) -> np.ndarray:
        """The float16 scales the file stores after training."""
        return self.current_scales().detach().cpu().numpy().astype(np.float16)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crops and horizontal flips (the CIFAR recipe)."""
    n, _, h, w = x.shape
    pad = F.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=gen)
    dy = torch.randint(0, 9, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(-1), cols)
    return pad[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
               rows[:, None, :, None], cols[:, None, None, :]]


def hint_points(student: nn.Module, teacher: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the container modules (blocks, stages; not the whole model, not single layers) that both
    models have and whose outputs have the same shape on ``example``: where the feature loss compares them.
    A tensor that several containers return (a stage and its last block) is compared once, at the innermost."""
    def outputs(net: nn.Module) -> dict[str, torch.Tensor]:
        box: dict[str, torch.Tensor] = {}
        mods = [(n, m) for n, m in net.named_modules() if n and next(m.children(), None) is not None]
        with torch.no_grad(), _hooked_eval(net, [], [(m, lambda _m, _i, out, n=n: box.__setitem__(n, out))
                                                     for n, m in mods]):
            net(example)
        return box

    s_out, t_out = outputs(student), outputs(teacher)
    names, seen = [], set()
    for n, a in s_out.items():  # hooks fire as modules finish: a block before the stage that returns its output
        b = t_out.get(n)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and id(a) not in seen:
            seen.add(id(a))
            names.append(n)
    return names


@contextmanager
def _recording(net: nn.Module | None, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks storing the outputs of ``names`` of ``net`` in the yielded dict; removed on exit. Without
    a model (or names) the dict stays empty."""
    box: dict[str, torch.Tensor] = {}
    mods = dict(net.named_modules()) if net is not None else {}
    handles = [mods[n].register_forward_hook(lambda _m, _i, out, n=n: box.__setitem__(n, out)) for n in names]
    try:
        yield box
    finally:
        for h in handles:
            h.remove()


def feature_loss(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean over points of ‖s − t‖² / ‖t‖²: each block's error relative to its own scale, so deep and shallow
    points weigh alike."""
    terms = [((student[n] - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12) for n, t in teacher.items()]
    return torch.stack(terms).mean()


def train_loop(net: nn.Module, trainable: list[torch.Tensor], train: ImageData, config: FinetuneConfig,
               device: torch.device, show_progress: bool = True, teacher: nn.Module | None = None,
               train_bn: bool = False) -> None:
    """SGD (Nesterov, one-cycle LR) on ``trainable`` with cross-entropy, plus ``config.distill`` × the
    soft-label KL divergence to ``teacher`` (Hinton et al. 2015) and ``config.feature_distill`` × the feature
    loss at the ``hint_points`` when one is given. BatchNorm statistics stay frozen unless ``train_bn``. Stops
    with an error as soon as the loss is no longer finite."""
    opt = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                          nesterov=True)
    steps = config.steps(len(train))
    if 0 < steps < MIN_USEFUL_STEPS:
        warnings.warn(LrpcWarning(
            f"fine-tuning runs only {steps} optimizer steps ({config.epochs} epoch(s) of {len(train)} images at "
            f"batch {config.batch_size}); at 16x on ResNet-20, 16 steps changed nothing and ~200 recovered "
            f"5-50 points (docs/FINDINGS.md section 6): use more epochs"), stacklevel=2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.15)
    net.train(train_bn)  # otherwise BatchNorm statistics stay frozen (folded constants, or calibrated ones)
    use = teacher is not None and (config.distill > 0 or config.feature_distill > 0)
    teacher = copy.deepcopy(teacher).to(device).eval() if use else None
    points: list[str] = []
    if teacher is not None and config.feature_distill > 0:
        points = hint_points(net, teacher, train.tensor(np.arange(min(2, len(train))), device))
        if not points:
            warnings.warn(LrpcWarning("feature distillation found no block whose output shape the student and "
                                      "the teacher share; training with the logit loss only"), stacklevel=2)
    with _recording(net, points) as s_feat, _recording(teacher, points) as t_feat:  # points need a teacher
        _epochs(net, trainable, train, config, device, show_progress, teacher, opt, sched, s_feat, t_feat)


def _epochs(net: nn.Module, trainable: list[torch.Tensor], train: ImageData, config: FinetuneConfig,
            device: torch.device, show_progress: bool, teacher: nn.Module | None, opt, sched,
            s_feat: Mapping[str, torch.Tensor], t_feat: Mapping[str, torch.Tensor]) -> None:
    gen = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    for epoch in range(config.epochs):
        order = rng.permutation(len(train))
        bar = progress(train.batches(config.batch_size, order), total=math.ceil(len(train) / config.batch_size),
                       desc=f"finetune {epoch + 1}/{config.epochs}", unit="batch", disable=not show_progress)
        correct = seen = 0
        for x, y in bar:
            if config.augment and x.shape[-1] > 8:
                x = _augment(x, gen)
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)  # also fills t_feat
                if config.distill > 0:
                    soft = F.softmax(t_logits / config.temperature, 1)
                    kd = F.kl_div(F.log_softmax(logits / config.temperature, 1), soft, reduction="batchmean")
                    loss = loss + config.distill * config.temperature ** 2 * kd
                if t_feat:
                    loss = loss + config.feature_distill * feature_loss(s_feat, t_feat)
            if not bool(torch.isfinite(loss)):
                raise LrpcError("fine-tuning diverged (the loss is no longer finite); lower --finetune-lr")
            loss.backward()
            if config.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(trainable, config.clip_grad)
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100 * correct / seen:.1f}%")


def finetune_model(model: nn.Module, train: ImageData, config: FinetuneConfig, show_progress: bool = True,
                   device: torch.device | str | None = None, teacher: nn.Module | None = None) -> nn.Module:
    """Float recovery fine-tuning of every parameter of a copy of ``model`` (e.g. after structured pruning);
    ``teacher`` (the model before pruning) adds distillation when ``config.distill`` or
    ``config.feature_distill`` > 0."""
    if config.epochs == 0:
        return model
    dev = torch.device(device) if device is not None else model_device(model)
    net = copy.deepcopy(model).to(dev)
    trainable = [p for p in net.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    train_loop(net, trainable, train, config, dev, show_progress, teacher, train_bn=config.train_bn)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def finetune(compressed, train: ImageData, config: FinetuneConfig, model: nn.Module | None = None,
             show_progress: bool = True, device: torch.device | str | None = None, teacher: nn.Module | None = None):
    """Fine-tune ``compressed`` (a CompressedModel) in place of its weights; returns a new CompressedModel.

    Training runs on ``device`` (default CPU); the result is the same either way up to float rounding."""
    from .compress import CompressedModel

    if config.epochs == 0:
        return compressed
    dev = torch.device(device) if device is not None else torch.device("cpu")
    net = compressed.to_module(model).to(dev)
    quant = {k: t for k, t in compressed.tensors.items() if isinstance(t, QuantTensor)}
    params = dict(net.named_parameters())
    mods = dict(net.named_modules())
    trainable = [params[k] for k in quant] + [p for k, p in params.items()
                                              if k.endswith(".bias") and k in compressed.tensors]
    for p in net.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    stes = {k: _STE(qt, config.learn_scales).to(dev) for k, qt in quant.items()}
    trainable += [p for ste in stes.values() for p in ste.parameters()]
    try:
        for k, ste in stes.items():
            P.register_parametrization(mods[k.rpartition(".")[0]], "weight", ste)
        train_loop(net, trainable, train, config, dev, show_progress, teacher)
    finally:
        for k in quant:
            mod = mods[k.rpartition(".")[0]]
            if P.is_parametrized(mod, "weight"):
                P.remove_parametrizations(mod, "weight", leave_parametrized=False)
    params = dict(net.named_parameters())  # after the parametrizations are gone
    tensors = dict(compressed.tensors)
    for k, t in compressed.tensors.items():
        if isinstance(t, QuantTensor):
            if config.learn_scales:
                t = replace(t, scales=stes[k].stored_scales())
            tensors[k] = requantize(params[k].detach().cpu(), t)
        elif k in params:
            tensors[k] = params[k].detach().cpu().clone()
    out = CompressedModel(copy.deepcopy(compressed.model_spec), tensors, dict(compressed.float_dtype),
                          dict(compressed.metadata))
    bad = [k for k, v in out.state_dict().items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise LrpcError(f"fine-tuning diverged ({bad[0]} is no longer finite in float16); "
                        "lower --finetune-lr or use fewer epochs")
    return out

