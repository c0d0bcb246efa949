"""WRN-16-4 with GroupNorm in PyTorch, matching ``models/wrn.py``, for the Opacus benchmark.

Same layout, widths, normalization order (TAN's default ``relu_gn``:
``conv(GN(ReLU(x)))``), GroupNorm(16) everywhere, 3x3 convs with bias, a
1x1 conv shortcut with its own GroupNorm where a block changes width, final
``GN(ReLU(x))``, 8x8 average pool and a Dense head: 2,751,562 parameters at
10 classes, as the Keras model. Init as ``models/wrn.py`` (truncated normal,
std ``1/sqrt(fan_in)``, zero biases).

Deviation (shape- and cost-neutral): torch's ``padding=1`` pads a stride-2
3x3 conv (1, 1) where Keras's "same" pads (0, 1). Inputs are NCHW.
Importing this module needs ``torch``.
"""

import math

import torch
from torch import nn

#: ``models.wrn.wrn_16_4(num_classes=10).count_params()``.
WRN_16_4_PARAMS = 2_751_562


def _conv(in_channels, out_channels, kernel_size, stride):
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=True)
    fan_in = in_channels * kernel_size * kernel_size
    nn.init.trunc_normal_(conv.weight, std=1.0 / math.sqrt(fan_in), a=-2.0 / math.sqrt(fan_in),
                          b=2.0 / math.sqrt(fan_in))
    nn.init.zeros_(conv.bias)
    return conv


class _NormAct(nn.Module):
    """``GN(ReLU(x))`` (``relu_gn``, TAN's default order)."""

    def __init__(self, channels, groups):
        super().__init__()
        self.act = nn.ReLU(inplace=False)  # in-place ReLU breaks Opacus's hooks (opacus#828)
        self.norm = nn.GroupNorm(groups, channels, eps=1e-5)

    def forward(self, x):
        return self.norm(self.act(x))


class BasicBlock(nn.Module):
    """``x + conv2(NA(conv1(NA(x))))``, shortcut ``conv1x1(NA(x))`` when the width changes."""

    def __init__(self, in_channels, out_channels, stride, groups):
        super().__init__()
        self.pre1 = _NormAct(in_channels, groups)
        self.conv1 = _conv(in_channels, out_channels, 3, stride)
        self.pre2 = _NormAct(out_channels, groups)
        self.conv2 = _conv(out_channels, out_channels, 3, 1)
        if in_channels == out_channels:
            if stride != 1:
                raise ValueError("a stride-2 block needs a width change for its conv shortcut")
            self.shortcut = None
        else:
            self.shortcut_pre = _NormAct(in_channels, groups)
            self.shortcut = _conv(in_channels, out_channels, 1, stride)

    def forward(self, x):
        out = self.conv2(self.pre2(self.conv1(self.pre1(x))))
        shortcut = x if self.shortcut is None else self.shortcut(self.shortcut_pre(x))
        return shortcut + out


class WideResNet(nn.Module):
    """GroupNorm ``WRN-depth-width`` (channels ``[16, 16k, 32k, 64k]``) on 32x32 NCHW inputs."""

    def __init__(self, depth=16, width=4, num_classes=10, groups=16, in_channels=3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"`depth` must be >= 10 with (depth - 4) % 6 == 0, got {depth!r}.")
        channels = [16, 16 * width, 32 * width, 64 * width]
        n = (depth - 4) // 6
        self.stem = _conv(in_channels, channels[0], 3, 1)
        blocks = []
        in_ch = channels[0]
        for filters, stride in zip(channels[1:], (1, 2, 2)):
            for b in range(n):
                blocks.append(BasicBlock(in_ch, filters, stride if b == 0 else 1, groups))
                in_ch = filters
        self.blocks = nn.Sequential(*blocks)
        self.final = _NormAct(in_ch, groups)
        self.pool = nn.AvgPool2d(8)
        self.head = nn.Linear(in_ch, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=1.0 / math.sqrt(in_ch), a=-2.0 / math.sqrt(in_ch),
                              b=2.0 / math.sqrt(in_ch))
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        x = self.pool(self.final(self.blocks(self.stem(x))))
        return self.head(torch.flatten(x, 1))


def wrn_16_4(num_classes=10):
    """WRN-16-4 (2,751,562 parameters at 10 classes, as ``models.wrn.wrn_16_4``)."""
    return WideResNet(depth=16, width=4, num_classes=num_classes)


def count_params(module):
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
