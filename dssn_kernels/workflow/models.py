"""Base classifiers. Every model here maps float32 [N, C, H, W] in [0, 1] to logits
[N, num_classes]: normalization is inside the model, after the DSSN noise.

* ``SmallCNN``: a small CNN for the digits demo and tests (normalizes internally).
* ``wrn40_2(num_classes)``: WideResNet-40-2 (Zagoruyko & Komodakis 2016), the CIFAR-10
  model of Yang et al. (2020) and Levine & Feizi (2021); module and parameter names are
  those of the widely used implementation their code builds on, so their state_dicts load.
* ``resnet50(num_classes)``: torchvision's ResNet-50 when torchvision is importable, else
  an in-package copy with torchvision's exact state_dict key names and shapes.
* ``Normalize(mean, std)`` and ``normalized(net, mean, std)``: per-channel normalization
  in front of a bare network, as ``nn.Sequential(norm=Normalize, model=net)`` (keys
  ``norm.mean``, ``norm.std``, ``model.*``).
* ``DnCNN`` (Zhang et al. 2017, Salman et al. 2020's denoiser) and ``denoised(denoiser,
  classifier)``: a denoiser in front of a classifier as one base model.
* ``convert_released_state_dict``: maps a state_dict saved by the paper's released code
  (``norm.module.mu``/``log_sig``, ``model.module.*``) onto ``normalized(...)``.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)   # the statistics of Cohen et al. / Yang et al.
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SmallCNN(nn.Module):
    """Two 3x3 conv + ReLU + 2x2 max-pool stages, then a two-layer linear head.

    Works for any image_size >= 4 (e.g. 1x8x8 digits, 3x32x32 CIFAR). No batch-norm or
    dropout, so the forward pass of one input never depends on the rest of its batch.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8,
                 width: int = 32, hidden: int = 128):
        super().__init__()
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4 (two 2x2 poolings), got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - 0.5) / 0.5))


class Normalize(nn.Module):
    """(x - mean) / std per channel (dim 1); mean and std are buffers (saved, not trained)."""

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.shape != std.shape:
            raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
        if bool((std <= 0).any()):
            raise ValueError("std must be positive")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


def normalized(net: nn.Module, mean, std) -> nn.Sequential:
    """``net`` behind per-channel normalization: takes [0, 1] input."""
    return nn.Sequential(OrderedDict(norm=Normalize(mean, std), model=net))


# ---------------------------------------------------------------------------------------
# WideResNet (pre-activation basic blocks), names as in the common PyTorch implementation
# used by Cohen et al.'s successors (conv1, block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,
# convShortcut}, bn1, fc).


class _WideBasic(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, 1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.equal_in_out else self.convShortcut(pre)
        return shortcut + out


class _NetworkBlock(nn.Module):
    def __init__(self, num_layers, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            _WideBasic(in_planes if i == 0 else out_planes, out_planes,
                       stride if i == 0 else 1, drop_rate) for i in range(num_layers)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016): depth = 6n + 4, widths 16, 16k, 32k, 64k,
    global average pooling (= the 8x8 average pool of the original on 32x32 inputs)."""

    def __init__(self, depth: int = 40, widen_factor: int = 2, num_classes: int = 10,
                 drop_rate: float = 0.0, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = _NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = _NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.nChannels = widths[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def wrn40_2(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WideResNet-40-2, the CIFAR-10 base classifier of Yang et al. (2020) and DSSN."""
    return WideResNet(depth=40, widen_factor=2, num_classes=num_classes, in_channels=in_channels)


# ---------------------------------------------------------------------------------------
# ResNet-50: torchvision's when available; otherwise this copy of its architecture with the
# same module names (conv1, bn1, layer{1..4}.{i}.{conv,bn}{1,2,3}, .downsample.{0,1}, fc).


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet with Bottleneck blocks, same names and initialization."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * _Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * _Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * _Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * _Bottleneck.expansion))
        layers = [_Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * _Bottleneck.expansion
        layers += [_Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000, *, use_torchvision: bool | None = None) -> nn.Module:
    """ResNet-50, the ImageNet base classifier of Cohen et al., Yang et al. and DSSN:
    ``torchvision.models.resnet50(num_classes=...)`` when torchvision is importable (or
    ``use_torchvision=True``), else the in-package copy (same state_dict keys)."""
    if use_torchvision is not False:
        try:
            from torchvision.models import resnet50 as tv_resnet50
        except ImportError:
            if use_torchvision:
                raise ImportError("torchvision is not installed: pip install 'dssn-kernels[vision]'")
        else:
            return tv_resnet50(num_classes=num_classes)
    return ResNet((3, 4, 6, 3), num_classes=num_classes)


def convert_released_state_dict(state_dict: dict) -> dict:
    """State_dict of the paper's released code (Yang et al.'s ``Forecaster`` models:
    ``norm.module.mu``, ``norm.module.log_sig``, ``model.module.<net keys>``, possibly
    saved from DataParallel) -> keys of ``normalized(net, mean, std)``."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace(".module.", ".")
        if key.startswith("module."):
            key = key[len("module."):]
        if key == "norm.mu":
            out["norm.mean"] = value.reshape(-1).float()
        elif key == "norm.log_sig":
            out["norm.std"] = torch.exp(value.reshape(-1).double()).float()
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------
# Denoisers for denoised smoothing (Salman et al. 2020; the DSSN paper's Appendix D).


class DnCNN(nn.Module):
    """DnCNN (Zhang et al. 2017) as used by Salman et al. (2020): ``depth`` 3x3 conv
    layers of ``width`` channels (conv + ReLU, then depth - 2 x (conv + batch-norm +
    ReLU), then conv back to ``in_channels``) estimating the noise, and the residual
    output ``x - noise_estimate``. The defaults (17 layers, 64 channels) are the paper's;
    digits uses a smaller one.

    Range: the output is clamped to [0, 1] (``clamp=True``, the default), so the
    classifier behind it always sees images of the range it was trained on; Salman et
    al.'s outputs are unclamped (``clamp=False``). Batch-norm runs on its running
    statistics in eval mode, so at certification one image's output never depends on
    the rest of its batch.
    """

    def __init__(self, in_channels: int = 1, depth: int = 17, width: int = 64,
                 clamp: bool = True):
        super().__init__()
        if depth < 2 or width < 1:
            raise ValueError(f"DnCNN needs depth >= 2 and width >= 1, got {depth}, {width}")
        layers = [nn.Conv2d(in_channels, width, 3, padding=1, bias=True), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width, eps=1e-4, momentum=0.95), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, in_channels, 3, padding=1, bias=False))
        self.dncnn = nn.Sequential(*layers)
        self.clamp = bool(clamp)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.orthogonal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x - self.dncnn(x)
        return out.clamp(0.0, 1.0) if self.clamp else out

    def extra_repr(self) -> str:
        return f"clamp={self.clamp}"


def denoised(denoiser: nn.Module, classifier: nn.Module) -> nn.Sequential:
    """``classifier`` behind ``denoiser``, one base model for DSSN: [0, 1] images (noised
    at certification) -> logits, as ``nn.Sequential(denoiser=..., classifier=...)``."""
    return nn.Sequential(OrderedDict(denoiser=denoiser, classifier=classifier))
