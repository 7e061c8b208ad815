"""EPSANet models against the literal reference network, and loading the authors' checkpoints."""
import re

import pytest
import timm
import torch
import torch.nn.functional as F

import epsanet
from epsanet.reference import authors_checkpoint, create_reference

TOL = dict(atol=1e-5, rtol=1e-5)
# the 101-layer models take several seconds each: marked slow (they still run in CI)
ALL_MODELS = [pytest.param(n, marks=pytest.mark.slow) if '101' in n else n for n in epsanet.MODEL_NAMES]


def _ours_name(reference_name: str) -> str:
    return re.sub(r'conv2\.conv_(\d+)', lambda m: f'conv2.convs.{int(m.group(1)) - 1}', reference_name)


def _pair(name, num_classes=10, dtype=torch.float32):
    """A reference network with random weights and our model holding the same weights."""
    ref = create_reference(name, num_classes=num_classes)
    with torch.no_grad():  # non-trivial BN statistics and affine params
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    ours = timm.create_model(name, num_classes=num_classes)
    ours.load_state_dict(epsanet.checkpoint_filter_fn(authors_checkpoint(ref), ours))
    return ref.to(dtype), ours.to(dtype)


@pytest.mark.parametrize('name', ALL_MODELS)
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('optimized', [False, True], ids=['plain', 'optimize_for_training'])
def test_matches_reference_with_gradients(name, train, optimized):
    """Whole networks against the reference: logits, input and every weight gradient, and (train)
    the running statistics; the plain model and the model after ``epsanet.optimize_for_training``
    (memory saver, recomputed stem, channels_last weights). In eval mode the model after
    ``epsanet.optimize_for_inference`` is checked too.

    Eval runs in float32 at 32 px (1e-5). Train mode runs in float64 at 64 px: with batch 2,
    BatchNorm's batch statistics at stage 4 come from 8 values per channel and amplify float32
    rounding through 50-101 layers to ~1e-4 whatever the formulation; float64 shows any real
    difference. The PSA-layer tests check float32 numerics in both modes.
    """
    dtype, size = (torch.float64, 64) if train else (torch.float32, 32)
    ref, ours = _pair(name, dtype=dtype)
    if optimized:
        epsanet.optimize_for_training(ours)
        assert epsanet.optimize.is_optimized(ours)
    ref.train(train)
    ours.train(train)
    x = torch.randn(2, 3, size, size, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, expected = ours(x), ref(x_ref)
    torch.testing.assert_close(out, expected, **TOL)
    target = torch.tensor([1, 7])
    F.cross_entropy(out, target).backward()
    F.cross_entropy(expected, target).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    params, buffers = dict(ours.named_parameters()), dict(ours.named_buffers())
    for k, p in ref.named_parameters():
        torch.testing.assert_close(params[_ours_name(k)].grad, p.grad, **TOL, msg=lambda m, k=k: f'{k}: {m}')
    for k, b in ref.named_buffers():
        if 'running' in k:
            torch.testing.assert_close(buffers[_ours_name(k)], b, **TOL, msg=lambda m, k=k: f'{k}: {m}')
    if not train and optimized:  # the one-line inference setting keeps the numbers
        folded = epsanet.optimize_for_inference(ours)
        assert all(n.endswith('.bn2') for n, m in folded.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
        with torch.no_grad():
            x = x.detach()
            torch.testing.assert_close(folded(x), expected.detach(), **TOL)
            torch.testing.assert_close(folded(x.to(memory_format=torch.channels_last)), expected.detach(), **TOL)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_authors_checkpoint_loads_through_timm(name, tmp_path):
    ref = create_reference(name).eval()
    path = tmp_path / 'model_best.pth.tar'
    torch.save(authors_checkpoint(ref, arch=name), path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize('name', epsanet.MODEL_NAMES)
def test_features_only_every_model(name):
    """Full depth, each variant (the timm contract tests use 1-block stages): five feature maps, strides 2-32."""
    model = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(c, 64 // r, 64 // r) for c, r in zip(
        model.feature_info.channels(), model.feature_info.reduction())]
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]


def test_checkpoint_for_another_architecture_lists_mismatches(tmp_path):
    path = tmp_path / 'small.pth.tar'
    torch.save(authors_checkpoint(create_reference('epsanet50'), arch='epsanet50'), path)
    with pytest.raises(ValueError) as info:
        timm.create_model('epsanet50_large', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    msg = str(info.value)
    assert 'shape mismatches' in msg
    assert 'layer1.0.conv1.weight: checkpoint (64, 64, 1, 1) vs model (128, 64, 1, 1)' in msg
    assert 'epsanet50_large' in msg


def test_checkpoint_with_missing_and_extra_keys_lists_them(tmp_path):
    state = authors_checkpoint(create_reference('epsanet50'))['state_dict']
    del state['module.layer2.0.bn2.running_var']
    state['module.layer9.0.conv1.weight'] = torch.zeros(1)
    path = tmp_path / 'broken.pth'
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    msg = str(info.value)
    assert 'missing keys (1)' in msg and 'layer2.0.bn2.running_var' in msg
    assert 'unexpected keys (1)' in msg and 'layer9.0.conv1.weight' in msg


def test_authors_init_matches_spec():
    model = timm.create_model('epsanet50')
    conv = model.layer1[0].conv2.convs[3]  # 9x9, 16 output channels
    expected_std = (2.0 / (9 * 9 * 16)) ** 0.5
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.1
    assert torch.all(model.layer1[0].bn3.weight == 1) and torch.all(model.layer1[0].bn3.bias == 0)


def test_large_block_widths():
    model = timm.create_model('epsanet50_large')
    assert [model.get_submodule(f'layer{i}.0.conv2').out_chs for i in range(1, 5)] == [128, 256, 512, 1024]
    assert [model.get_submodule(f'layer{i}.0.conv3').out_channels for i in range(1, 5)] == [256, 512, 1024, 2048]
    assert model.layer1[0].conv2.split_input and model.layer1[0].conv2.groups == [4, 8, 16, 16]
