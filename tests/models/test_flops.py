import timm
from torch import nn

from epsanet.models.flops import count_gflops


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
