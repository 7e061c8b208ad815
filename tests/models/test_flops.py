import pytest
import timm
import torch
from timm.models.resnet import Bottleneck
from torch import nn

from epsanet.layers import PyramidSqueezeAttention
from epsanet.models.flops import count_conv_macs, count_gflops


def test_count_gflops_epsanet50_meta():
    assert round(count_gflops(timm.create_model('epsanet50', device='meta')), 2) == 3.62


def test_count_gflops_real_tensors_small_image():
    model = timm.create_model('epsanet50', layers=(1, 1, 1, 1), num_classes=10)
    at_64 = count_gflops(model, img_size=64)
    at_128 = count_gflops(model, img_size=128)
    assert 3.5 < at_128 / at_64 < 4.1  # cost grows with the pixel count (the head is tiny)


def test_count_gflops_counts_macs_and_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 16, 10))
    expected = 8 * 16 * (3 * 3 * 3) + 2 * 8 * 16 + 8 * 16 * 10  # conv MACs + 2 per BN output + linear MACs
    assert count_gflops(model, img_size=4) * 1e9 == expected


def test_epsanet50_has_the_papers_gflops():
    model = timm.create_model('epsanet50', device='meta')  # shapes only: fast
    assert round(count_gflops(model), 2) == 3.62  # spec section 3 / the paper's table
    assert model.training  # mode restored


def test_count_conv_macs_psa_branches_are_0_734_of_resnet50s_3x3_convs():
    # per pixel of a block with p planes: PSA (p/4) * p * (9 + 25/4 + 49/8 + 81/16) against 9 p^2 for a dense 3x3 conv
    with torch.device('meta'):
        ours, base = timm.create_model('epsanet50'), timm.create_model('resnet50')
    psa_convs = {c for m in ours.modules() if isinstance(m, PyramidSqueezeAttention) for c in m.convs}
    dense_convs = {b.conv2 for b in base.modules() if isinstance(b, Bottleneck)}
    psa = count_conv_macs(ours, lambda m: m in psa_convs)
    dense = count_conv_macs(base, lambda m: m in dense_convs)
    assert dense == 16 * 64 ** 2 * 9 * 56 ** 2
    assert psa / dense == pytest.approx((9 + 25 / 4 + 49 / 8 + 81 / 16) / 36)
