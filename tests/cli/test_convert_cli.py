"""``epsanet convert``: epsanet/cli/convert.py."""
import json

import pytest
import timm
import torch

from epsanet.cli import main
from epsanet.reference import authors_checkpoint, create_reference


@pytest.mark.slow
def test_convert_an_authors_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    reference = create_reference('epsanet50', num_classes=10).eval()
    src = tmp_path / 'model_best.pth.tar'
    torch.save(authors_checkpoint(reference), src)
    metrics = tmp_path / 'results.json'
    metrics.write_text(json.dumps({'top1': 91.5, 'top5': 99.0, 'loss': 0.3, 'img_size': 64}))
    out = tmp_path / 'hub'
    assert main(['convert', str(src), str(out), '--tag', 'ft_test', '--license', 'mit', '--trained-by', 'pytest',
                 '--recipe', 'none', '--data', 'random', '--metrics', str(metrics)]) == 0
    printed = capsys.readouterr().out
    assert 'epsanet50, 10 classes' in printed and 'logits match the source' in printed
    entry = json.loads((out / 'registry_entry.json').read_text())
    assert entry['metrics']['top1'] == 91.5 and entry['metrics']['crop_pct'] == 0.875
    assert entry['provenance']['trained_by'] == 'pytest' and entry['tag'] == 'ft_test'
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)


def test_convert_errors_are_one_line(tmp_path, capsys):
    assert main(['convert', str(tmp_path / 'missing.pth'), str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('epsanet convert: error:') and 'missing.pth' in err
    bad = tmp_path / 'results.json'
    bad.write_text('[1, 2]')
    assert main(['convert', str(tmp_path / 'missing.pth'), str(tmp_path / 'out'), '--metrics', str(bad)]) == 2
    assert 'JSON object' in capsys.readouterr().err
