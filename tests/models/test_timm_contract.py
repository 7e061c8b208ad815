"""The timm model contract, as timm's own test suite checks it for its ResNet family.

Most checks use a 1-block-per-stage EPSANet (``layers=(1, 1, 1, 1)``): the same block and
stage code as the full models at a fraction of the cost. Full models are covered elsewhere.
"""
import pytest
import timm
import timm.optim
import torch
from torchvision.models.feature_extraction import create_feature_extractor

import epsanet

SMALL = dict(layers=(1, 1, 1, 1))


def _model(name='epsanet50', **kwargs):
    return timm.create_model(name, **{**SMALL, **kwargs}).eval()


@pytest.fixture(params=['epsanet50', 'epsanet50_large'])
def name(request):
    return request.param


def test_registered_and_listed():
    assert set(epsanet.MODEL_NAMES) <= set(timm.list_models('epsanet*'))
    for n in epsanet.MODEL_NAMES:
        assert timm.is_model(n)


@pytest.mark.parametrize('model_name', epsanet.MODEL_NAMES)
def test_pretrained_cfg(model_name):
    cfg = timm.create_model(model_name, device='meta').pretrained_cfg
    assert cfg['mean'] == (0.485, 0.456, 0.406) and cfg['std'] == (0.229, 0.224, 0.225)
    assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == 0.875
    assert cfg['interpolation'] == 'bilinear'
    assert cfg['first_conv'] == 'conv1' and cfg['classifier'] == 'fc' and cfg['num_classes'] == 1000
    data_cfg = timm.data.resolve_data_config({}, model=timm.create_model(model_name, device='meta'))
    assert data_cfg['crop_pct'] == 0.875 and data_cfg['interpolation'] == 'bilinear'


def test_features_only(name):
    model = timm.create_model(name, features_only=True, **SMALL).eval()
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert model.feature_info.channels() == [64, 256, 512, 1024, 2048]
    feats = model(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 32), (256, 16, 16), (512, 8, 8), (1024, 4, 4),
                                                    (2048, 2, 2)]
    fpn = timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4), **SMALL).eval()
    assert fpn.feature_info.reduction() == [4, 8, 16, 32]
    assert len(fpn(torch.randn(1, 3, 64, 64))) == 4


def test_forward_features_and_head(name):
    model = _model(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 2048, 2, 2)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, 2048)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        torch.testing.assert_close(model.fc(pre), model(x))


def test_forward_intermediates(name):
    model = _model(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[-1] for t in inter] == [32, 16, 8, 4, 2]
        for t, info in zip(inter, model.feature_info):
            assert t.shape[1] == info['num_chs'] and 64 // t.shape[-1] == info['reduction']
        only = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        assert [t.shape[1] for t in only] == [256, 1024]
    kept = model.prune_intermediate_layers(indices=[1, 2])
    assert kept == [1, 2] and model.num_classes == 0


def test_classifier_reset_and_num_classes_zero(name):
    model = _model(name)
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == 'fc'
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2048)
    assert _model(name, num_classes=0)(torch.randn(1, 3, 64, 64)).shape == (1, 2048)
    assert _model(name, num_classes=3)(torch.randn(1, 3, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize('pool, width', [('avg', 2048), ('max', 2048), ('avgmax', 2048), ('catavgmax', 4096)])
def test_global_pool_variants(pool, width):
    model = _model(global_pool=pool, num_classes=0)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, width)
    model = _model(global_pool=pool, num_classes=5)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize('in_chans', [1, 4])
def test_in_chans(in_chans):
    model = _model(in_chans=in_chans)
    assert model.conv1.in_channels == in_chans
    assert model(torch.randn(1, in_chans, 64, 64)).shape == (1, 1000)


def test_drop_rate_and_drop_path_rate():
    model = timm.create_model('epsanet50', drop_rate=0.5, drop_path_rate=0.2, layers=(2, 2, 2, 2))
    assert model.drop_rate == 0.5
    assert model.layer4[1].drop_path is not None and model.layer4[1].drop_path.drop_prob == pytest.approx(0.2)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    assert not torch.equal(model(x), model(x))  # stochastic in train mode
    model.eval()
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize('output_stride, dilations', [(16, [1, 1, 1, 2]), (8, [1, 1, 2, 4])])
def test_output_stride_dilates_psa(name, output_stride, dilations):
    model = _model(name, output_stride=output_stride, layers=(1, 2, 2, 2))
    # the first block of a dilated stage keeps the previous dilation on its PSA (as timm does)
    last = [model.get_submodule(f'layer{i}')[-1].conv2.convs[0].dilation[0] for i in range(1, 5)]
    assert last == dilations
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape[-1] == 64 // output_stride
    f = timm.create_model(name, features_only=True, output_stride=output_stride, **SMALL)
    assert f.feature_info.reduction()[-1] == output_stride


def test_dilated_full_model_keeps_weights_compatible():
    a = timm.create_model('epsanet50', output_stride=8)
    b = timm.create_model('epsanet50')
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_grad_checkpointing_same_outputs_and_grads():
    model = _model(layers=(2, 1, 1, 1)).train()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    ref_out = model(x)
    ref_out.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref_out)
    for g, r in zip((p.grad for p in model.parameters()), ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_group_matcher_and_layer_decay():
    model = _model()
    matcher = model.group_matcher()
    assert 'stem' in matcher and 'blocks' in matcher
    opt = timm.optim.create_optimizer_v2(model, 'sgd', lr=0.1, layer_decay=0.5)
    scales = sorted({g['lr_scale'] for g in opt.param_groups})
    assert len(scales) >= 5 and scales[-1] == 1.0


def test_channels_last_matches_nchw(name):
    model = _model(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bf16_autocast(name):
    model = _model(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0) > 0.99


def test_torchscript(name):
    model = _model(name)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), atol=1e-5, rtol=1e-5)


def test_fx_feature_extraction(name):
    model = _model(name)
    extractor = create_feature_extractor(model, return_nodes={'layer2': 'c3', 'layer4': 'c5'})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = extractor(x)
        _, inter = model.forward_intermediates(x)
    torch.testing.assert_close(out['c3'], inter[2])
    torch.testing.assert_close(out['c5'], inter[4])
    fx_features = timm.models.FeatureGraphNet(model, out_indices=(1, 4)).eval()  # same weights
    with torch.no_grad():
        torch.testing.assert_close(fx_features(x)[-1], inter[-1])
    # and the features_only factory path with feature_cls='fx'
    built = timm.create_model(name, features_only=True, feature_cls='fx', **SMALL).eval()
    assert [f.shape[1] for f in built(x)] == [64, 256, 512, 1024, 2048]


@pytest.mark.slow
def test_torch_compile():
    model = _model()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_torch_export():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    batch = torch.export.Dim('batch', min=1, max=16)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    x3 = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x3), model(x3), atol=1e-5, rtol=1e-5)
