"""A user's own network for the generalisation benchmark: a plain VGG-style CNN (no residuals).

Nothing in lrpcompress knows this architecture: it is loaded as ``usernet:vgg_small`` (``package.module:function``,
the way users pass their own factory to ``--arch``), and trained by ``benchmarks/train_usernet.py``. Six 3x3
convolutions with BatchNorm and ReLU in three stages (32, 64, 128 channels, max-pooling between), global average
pooling and one linear layer: 0.29 M parameters and 39 M MACs at 32x32, about ResNet-20's size.
"""

from __future__ import annotations

import torch.nn as nn


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGGSmall(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(*_block(3, a), *_block(a, a), nn.MaxPool2d(2),
                                      *_block(a, b), *_block(b, b), nn.MaxPool2d(2),
                                      *_block(b, c), *_block(c, c), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg_small(num_classes: int = 10) -> nn.Module:
    return VGGSmall(num_classes)
