"""A literal, deliberately naive EPSANet written from the spec, in the authors' style.

This is the ground truth that the fast implementation is tested against, and the baseline the
benchmark compares with. It follows the authors' published code structure step by step: four
separate branch convs, the shared SE applied to each branch separately, a softmax over the
stacked sigmoid vectors, and a concatenation grown one branch at a time in reversed order. Its
``state_dict`` has the authors' key names (``conv2.conv_1``, ``conv2.se.fc1``, ...), so an
authors' checkpoint loads into it with plain ``load_state_dict`` after removing ``module.``.

Do not optimise this file: its value is that it is obviously the spec.
"""
import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn


class ReferenceSEWeight(nn.Module):
    """avg pool -> 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> sigmoid."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, padding=0)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, padding=0)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.avg_pool(x)
        out = self.fc1(out)
        out = self.relu(out)
        out = self.fc2(out)
        return self.sigmoid(out)


class ReferencePSA(nn.Module):
    """PSA with 4 branches, named as in the authors' code (``conv_1`` .. ``conv_4``, ``se``)."""

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int = 1,
            dilation: int = 1,
            conv_kernels: Sequence[int] = (3, 5, 7, 9),
            conv_groups: Sequence[int] = (1, 4, 8, 16),
            split_input: bool = False,
    ):
        super().__init__()
        branch_in = inplanes // 4 if split_input else inplanes
        self.split_input = split_input
        self.split_channel = planes // 4
        for i in range(4):
            k, g = conv_kernels[i], conv_groups[i]
            conv = nn.Conv2d(
                branch_in, planes // 4, kernel_size=k, padding=dilation * (k // 2), stride=stride,
                dilation=dilation, groups=g, bias=False)
            setattr(self, f'conv_{i + 1}', conv)
        self.se = ReferenceSEWeight(planes // 4)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size = x.shape[0]
        if self.split_input:
            xs: List[torch.Tensor] = list(torch.chunk(x, 4, dim=1))
        else:
            xs = [x, x, x, x]
        x1 = self.conv_1(xs[0])
        x2 = self.conv_2(xs[1])
        x3 = self.conv_3(xs[2])
        x4 = self.conv_4(xs[3])

        feats = torch.cat((x1, x2, x3, x4), dim=1)
        feats = feats.view(batch_size, 4, self.split_channel, feats.shape[2], feats.shape[3])

        x1_se = self.se(x1)
        x2_se = self.se(x2)
        x3_se = self.se(x3)
        x4_se = self.se(x4)

        x_se = torch.cat((x1_se, x2_se, x3_se, x4_se), dim=1)
        attention_vectors = x_se.view(batch_size, 4, self.split_channel, 1, 1)
        attention_vectors = self.softmax(attention_vectors)
        feats_weight = feats * attention_vectors
        out = feats_weight[:, 0, :, :]
        for i in range(1, 4):
            # each new branch goes in front: the final order is branch 4, 3, 2, 1
            out = torch.cat((feats_weight[:, i, :, :], out), dim=1)
        return out


class ReferenceBlock(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None,
                 width_factor: int = 1, psa: Optional[Dict[str, Any]] = None):
        super().__init__()
        psa = psa or {}
        width = planes * width_factor
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = ReferencePSA(width, width, stride=stride, conv_kernels=psa.get('kernel_sizes', (3, 5, 7, 9)),
                                  conv_groups=psa.get('groups', (1, 4, 8, 16)),
                                  split_input=psa.get('split_input', False))
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ReferenceEPSANet(nn.Module):
    """The authors' network layout: ``conv1, bn1, layer1..4, fc`` with their init."""

    def __init__(self, layers: Sequence[int], num_classes: int = 1000, width_factor: int = 1,
                 psa: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.inplanes = 64
        self.width_factor = width_factor
        self.psa = psa
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], stride=1)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * ReferenceBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2. / n))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * ReferenceBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * ReferenceBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * ReferenceBlock.expansion),
            )
        block_args = dict(width_factor=self.width_factor, psa=self.psa)
        layers = [ReferenceBlock(self.inplanes, planes, stride, downsample, **block_args)]
        self.inplanes = planes * ReferenceBlock.expansion
        for _ in range(1, blocks):
            layers.append(ReferenceBlock(self.inplanes, planes, **block_args))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def create_reference(name: str, num_classes: int = 1000) -> ReferenceEPSANet:
    """The reference network for a variant of :data:`epsanet.models.variants.VARIANTS` (its blocks, width
    and PSA configuration)."""
    from .models.variants import get_variant

    v = get_variant(name)
    return ReferenceEPSANet(v.layers, num_classes=num_classes, width_factor=v.width_factor, psa=dict(v.psa))


def authors_checkpoint(model: ReferenceEPSANet, arch: str = 'epsanet50', epoch: int = 120) -> dict:
    """A dict laid out as the authors' training script saves it (DataParallel ``module.`` keys)."""
    return {
        'epoch': epoch,
        'arch': arch,
        'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()},
        'best_prec1': torch.tensor(0.0),
        'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1, 'momentum': 0.9, 'params': []}]},
    }
