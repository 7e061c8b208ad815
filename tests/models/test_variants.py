"""The variant table is the one place that defines a variant."""
import json
import subprocess
import sys

import pytest
import timm

import epsanet
from epsanet.models.variants import VARIANTS, get_variant, infer_variant
from epsanet.reference import authors_checkpoint, create_reference

_NEW_VARIANT = r'''
import contextlib, importlib, io, json
import timm, torch
from timm.models import register_model
import epsanet
from epsanet.models import variants

# the one line of the table ...
variants.VARIANTS['epsanet26'] = variants.Variant((2, 2, 2, 2), 64, variants.SMALL_PSA)
import epsanet.models.epsanet as model_file
importlib.reload(model_file)  # (the model file reads the table at import, as it would with the line in place)

# ... plus its @register_model function, as it would stand in epsanet/models/epsanet.py
def epsanet26(pretrained=False, **kwargs):
    return model_file._create_epsanet('epsanet26', pretrained, **kwargs)
epsanet26.__module__ = model_file.__name__
register_model(epsanet26)

from epsanet.cli import main
from epsanet.reference import authors_checkpoint, create_reference
from epsanet.weights.convert import infer_architecture
model = timm.create_model('epsanet26', num_classes=3).eval()
ref = create_reference('epsanet26', num_classes=3).eval()
model.load_state_dict(model_file.checkpoint_filter_fn(authors_checkpoint(ref), model))
x = torch.randn(1, 3, 32, 32)
with torch.no_grad():
    diff = float((model(x) - ref(x)).abs().max())
out = io.StringIO()
with contextlib.redirect_stdout(out):
    main(['models'])
print(json.dumps(dict(
    names=list(epsanet.MODEL_NAMES), blocks=[len(getattr(model, f'layer{i}')) for i in range(1, 5)], diff=diff,
    inferred=infer_architecture(model.state_dict()), listed='epsanet26' in out.getvalue(),
    cfg=model.pretrained_cfg.get('tag'))))
'''


@pytest.mark.slow
def test_a_new_variant_is_one_table_line_plus_its_register_function():
    out = subprocess.run([sys.executable, '-c', _NEW_VARIANT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result['names'][-1] == 'epsanet26' and result['blocks'] == [2, 2, 2, 2]
    assert result['diff'] < 1e-4  # the reference network follows the table too
    assert result['inferred'] == 'epsanet26'  # epsanet convert recognises it
    assert result['listed']  # epsanet models lists it
    assert result['cfg'] == 'untrained'


@pytest.mark.parametrize('name', list(VARIANTS))
def test_everything_derives_from_the_table(name):
    v = VARIANTS[name]
    assert name in epsanet.MODEL_NAMES and timm.is_model(name)
    model = timm.create_model(name, device='meta')
    assert [len(getattr(model, f'layer{i}')) for i in range(1, 5)] == list(v.layers)
    assert model.layer1[0].conv1.out_channels == 64 * v.width_factor
    assert tuple(model.layer1[0].conv2.groups) == tuple(v.psa['groups'])
    ref = create_reference(name)
    assert infer_variant(authors_checkpoint(ref)['state_dict']) == name


def test_unknown_names_list_the_variants():
    assert get_variant('epsanet50.in1k') is VARIANTS['epsanet50']
    with pytest.raises(ValueError, match='choose one of epsanet50, epsanet50_large'):
        get_variant('epsanet77')
    assert infer_variant({'fc.weight': None}) is None
