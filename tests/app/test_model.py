import pytest
import timm
import torch

import epsanet  # noqa: F401
from epsanet.app.errors import CheckpointError, ConfigError
from epsanet.app.model import build_model
from epsanet.reference import authors_checkpoint, create_reference
from epsanet.train.checkpoint import save_weights


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', num_classes=5).eval()
    path = tmp_path_factory.mktemp('w') / 'best.safetensors'
    save_weights(path, model.state_dict(), dict(model='epsanet50', num_classes=5))
    return model, path


def test_build_model_checks(saved):
    model, path = saved
    assert build_model('epsanet50', checkpoint=path).num_classes == 5
    assert build_model('epsanet50', num_classes=3, checkpoint=path).num_classes == 3  # new head to fine-tune
    with pytest.raises(CheckpointError, match='5-class classifier but 3 classes'):
        build_model('epsanet50', num_classes=3, checkpoint=path, adapt_classifier=False)
    with pytest.raises(CheckpointError, match='holds weights of epsanet50, not epsanet101'):
        build_model('epsanet101', checkpoint=path)
    with pytest.raises(CheckpointError, match='does not exist'):
        build_model('epsanet50', checkpoint=path.with_name('missing.safetensors'))
    with pytest.raises(CheckpointError, match='no pretrained weights are registered'):
        build_model('epsanet50', pretrained=True)
    with pytest.raises(ConfigError, match='unknown model "epsanet5"'):
        build_model('epsanet5')


def test_authors_checkpoint_starts_a_fine_tune(tmp_path):
    torch.manual_seed(0)
    reference = create_reference('epsanet50', num_classes=7).eval()
    path = tmp_path / 'model_best.pth.tar'
    torch.save(authors_checkpoint(reference), path)
    same = build_model('epsanet50', checkpoint=path).eval()  # 7 classes, read from the file
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(same(x), reference(x), rtol=1e-4, atol=1e-4)
    tuned = build_model('epsanet50', num_classes=2, checkpoint=path)
    assert tuned.fc.out_features == 2
    torch.testing.assert_close(tuned.conv1.weight, reference.conv1.weight)


def test_pretrained_without_registered_weights_says_how_to_start():
    expected = 'no pretrained weights are registered for epsanet50.*--initial-checkpoint'
    with pytest.raises(CheckpointError, match=expected):
        build_model('epsanet50', pretrained=True)


def test_unsafe_weights_file_is_reported_as_such(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ('pwned',))

    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'fc.weight': Payload()}}, path)
    with pytest.raises(CheckpointError) as info:
        build_model('epsanet50', checkpoint=path)
    assert 'do not fit' not in str(info.value)


def test_tagged_names_are_known_models():
    with pytest.raises(CheckpointError, match='no pretrained weights'):
        build_model('epsanet50.untrained', pretrained=True)
