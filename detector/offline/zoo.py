"""Small torch versions of standard image classifiers, to test and benchmark advdetect on real architectures.

torchvision is not a dependency, so the architectures are written here, following the papers:

- :class:`ResNet` (He et al. 2016), CIFAR-style: a 3x3 stem without max-pool, four stages of basic blocks
  (``ResNet.resnet18``) or bottleneck blocks (``ResNet.resnet50``, ImageNet stem: 7x7 stride 2 + max-pool);
- :class:`MobileNetV2` (Sandler et al. 2018): inverted residuals with depthwise 3x3 convolutions and ReLU6,
  plus an optional squeeze-and-excitation gate and HardSwish (as in MobileNetV3 / EfficientNet) so that
  every op of those families is exercised;
- :class:`ViT` (Dosovitskiy et al. 2021): patch embedding by a strided convolution, a class token, learned
  position embeddings, pre-norm transformer blocks (multi-head attention written with MatMul/Softmax, GELU
  MLP) and a LayerNorm + linear head.

``width`` scales every channel count, so tests can use narrow versions that run in milliseconds.
:func:`mnist32` turns the vendored MNIST into the 3 x 32 x 32 inputs these models take.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from detector.data import Dataset

__all__ = ["ResNet", "MobileNetV2", "ViT", "mnist32", "ZOO"]


def mnist32(data: Dataset) -> Dataset:
    """MNIST (n, 1, 28, 28) in [0, 1] padded by 2 pixels of zeros to 32x32 and repeated to 3 channels."""
    x = np.pad(data.x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return Dataset(np.ascontiguousarray(np.repeat(x, 3, axis=1), np.float32), data.y, f"{data.name}-32x3")


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, c: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, c: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != 4 * c:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, 4 * c, 1, stride, bias=False), nn.BatchNorm2d(4 * c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with ``blocks`` per stage at widths ``width * (1, 2, 4, 8)``.

    Parameters
    ----------
    blocks : tuple of int
        Blocks per stage ((2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for ResNet-50).
    bottleneck : bool
        Bottleneck blocks (ResNet-50) instead of basic blocks.
    width : int
        Channels of the first stage (64 in the papers).
    imagenet_stem : bool
        7x7 stride-2 convolution and 3x3 stride-2 max-pool (224x224 inputs) instead of the CIFAR 3x3 stem.
    """

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), bottleneck: bool = False, width: int = 64,
                 n_classes: int = 10, imagenet_stem: bool = False):
        super().__init__()
        block = _Bottleneck if bottleneck else _BasicBlock
        if imagenet_stem:
            stem = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        else:
            stem = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        layers: list[nn.Module] = stem
        c_in = width
        for stage, n in enumerate(blocks):
            for i in range(n):
                layers.append(block(c_in, width * 2 ** stage, 2 if (i == 0 and stage > 0) else 1))
                c_in = width * 2 ** stage * block.expansion
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))

    @classmethod
    def resnet18(cls, width: int = 64, n_classes: int = 10) -> "ResNet":
        """CIFAR-style ResNet-18 (11.2M parameters at width 64)."""
        return cls((2, 2, 2, 2), False, width, n_classes)

    @classmethod
    def resnet50(cls, width: int = 64, n_classes: int = 1000) -> "ResNet":
        """ImageNet ResNet-50 (25.6M parameters at width 64, 1000 classes)."""
        return cls((3, 4, 6, 3), True, width, n_classes, imagenet_stem=True)


class _SqueezeExcite(nn.Module):
    """x * HardSigmoid(W2 ReLU(W1 mean_hw(x))): a per-input, per-channel gate."""

    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(c // 4, 1), 1), nn.Conv2d(max(c // 4, 1), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))
        return x * torch.sigmoid(self.fc2(s))


class _InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int, se: bool, act: type[nn.Module]):
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), act()]
        if se:
            layers.append(_SqueezeExcite(hidden))
        layers += [nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs (CIFAR variant: stride 1 stem and first stages), channels scaled by ``width``.

    ``se=True`` adds squeeze-and-excitation gates and ``act=nn.Hardswish`` swaps ReLU6 for HardSwish (the
    MobileNetV3 / EfficientNet ingredients); ``act=nn.SiLU`` gives EfficientNet's Swish.
    """

    #: (expansion t, channels c, repeats n, stride s) of the paper's table 2
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width: float = 1.0, n_classes: int = 10, se: bool = False, act: type[nn.Module] = nn.ReLU6,
                 settings: tuple[tuple[int, int, int, int], ...] = SETTINGS):
        super().__init__()

        def ch(c: int) -> int:
            return max(4, int(round(c * width)))

        layers: list[nn.Module] = [nn.Conv2d(3, ch(32), 3, 1, 1, bias=False), nn.BatchNorm2d(ch(32)), act()]
        c_in = ch(32)
        for t, c, n, s in settings:
            for i in range(n):
                layers.append(_InvertedResidual(c_in, ch(c), s if i == 0 else 1, t, se, act))
                c_in = ch(c)
        last = ch(1280) if width >= 1 else max(ch(1280), 64)
        layers += [nn.Conv2d(c_in, last, 1, bias=False), nn.BatchNorm2d(last), act()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, d = x.shape[1:]
        q, k, v = self.qkv(x).reshape(-1, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(-1, t, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2, self.fc1, self.act, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Vision transformer: patches of ``patch`` pixels, ``depth`` pre-norm blocks of width ``dim``, class-token head.

    ViT-tiny for 32x32 inputs is ``ViT(patch=4, dim=192, depth=4, heads=3)`` (1.8M parameters).
    """

    def __init__(self, image: int = 32, patch: int = 4, dim: int = 192, depth: int = 4, heads: int = 3,
                 mlp_ratio: int = 4, n_classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio * dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        cls = self.cls + torch.zeros_like(tokens[:, :1])  # broadcast to the batch without a traced shape
        tokens = torch.cat([cls, tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


#: Factories of the benchmark architectures at full width, by name.
ZOO = {
    "resnet18": lambda: ResNet.resnet18(),
    "mobilenetv2": lambda: MobileNetV2(),
    "vit_tiny": lambda: ViT(),
    "resnet50": lambda: ResNet.resnet50(),
}
