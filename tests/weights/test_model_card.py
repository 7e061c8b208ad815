"""Model card: epsanet/weights/model_card.py."""

import epsanet  # noqa: F401
from epsanet.weights.model_card import render_model_card


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
