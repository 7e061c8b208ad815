import timm

from epsanet.models.flops import count_gflops


def test_count_gflops_epsanet50_meta():
    assert round(count_gflops(timm.create_model('epsanet50', device='meta')), 2) == 3.62


def test_count_gflops_real_tensors_small_image():
    model = timm.create_model('epsanet50', layers=(1, 1, 1, 1), num_classes=10)
    at_64 = count_gflops(model, img_size=64)
    at_128 = count_gflops(model, img_size=128)
    assert 3.5 < at_128 / at_64 < 4.1  # cost grows with the pixel count (the head is tiny)
