"""scripts/training_bound.py: resnet50 without its 3x3 convs, the MAC count behind the bound, one tiny run."""
import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / 'scripts' / 'training_bound.py'


@pytest.fixture(scope='module')
def bound():
    spec = importlib.util.spec_from_file_location('training_bound', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resnet50_without_3x3_convs_keeps_every_other_layer_and_the_shapes(bound):
    full = timm.create_model('resnet50').eval()
    cut = bound.drop_3x3_convs(timm.create_model('resnet50').eval())
    threes = [n for n, m in cut.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert threes == []
    assert sum(isinstance(m, nn.Conv2d) for m in full.modules()) - sum(
        isinstance(m, nn.Conv2d) for m in cut.modules()) == 16  # one per bottleneck
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert cut(x).shape == full(x).shape
        assert [t.shape for t in cut.forward_intermediates(x, intermediates_only=True)] == \
            [t.shape for t in full.forward_intermediates(x, intermediates_only=True)]


def test_a_resnet_without_bottlenecks_is_refused(bound):
    with pytest.raises(ValueError, match='Bottleneck'):
        bound.drop_3x3_convs(timm.create_model('resnet18'))


def test_a_tiny_run_prints_the_table_and_the_bound(bound, capsys):
    bound.main(['--batch-size', '2', '--img-size', '32', '--reps', '1'])
    out = capsys.readouterr().out
    for line in ('| epsanet50, optimize_for_training, NCHW input |', '| reference, channels_last |',
                 '| resnet50 without 3x3 convs, channels_last |', 'Bound: ', 'Measured: '):
        assert line in out
    assert '(ratio 0.73)' in out
