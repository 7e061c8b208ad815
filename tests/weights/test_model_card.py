"""GFLOPs counter and model card: epsanet/weights/model_card.py."""
import timm
from torch import nn

import epsanet  # noqa: F401
from epsanet.weights.model_card import count_gflops, render_model_card


def test_count_gflops_counts_macs_and_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 16, 10))
    expected = 8 * 16 * (3 * 3 * 3) + 2 * 8 * 16 + 8 * 16 * 10  # conv MACs + 2 per BN output + linear MACs
    assert count_gflops(model, img_size=4) * 1e9 == expected


def test_epsanet50_has_the_papers_gflops():
    model = timm.create_model('epsanet50', device='meta')  # shapes only: fast
    assert round(count_gflops(model), 2) == 3.62  # spec section 3 / the paper's table
    assert model.training  # mode restored


def test_card_without_metrics_says_so():
    card = render_model_card(dict(model='epsanet50', num_classes=10, params=1, gflops=1.0, sha256='ab', file_size=3,
                                  metrics=None, provenance={}))
    assert 'have not been evaluated' in card and 'Not stated' in card and 'licence | not stated' in card


def test_card_with_metrics_shows_them_and_the_command():
    card = render_model_card(dict(model='epsanet50', tag='in1k', num_classes=1000, params=1, gflops=1.0,
                                  sha256='ab', file_size=3, license='mit', provenance={'trained_by': 'someone'},
                                  metrics={'top1': 12.5, 'top5': 40.0, 'command': 'epsanet validate --x'}))
    assert '| top1 | 12.5 |' in card and 'Measured with `epsanet validate --x`' in card
    assert card.startswith('---\nlibrary_name: timm') and 'license: mit' in card
