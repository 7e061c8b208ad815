"""The import-time floor check and the shims for old torch releases (epsanet/_compat.py)."""
import subprocess
import sys
from importlib import metadata

import pytest
import torch

from epsanet import _compat

REQUIRES = ['torch>=2.1.2', 'torchvision>=0.16.2', 'timm>=1.0.22', 'numpy>=1.23', 'onnx>=1.15; extra == "export"']


def _versions(**installed):
    real = metadata.version
    return lambda name: installed.get(name, None) or real(name)


def test_floors_come_from_the_metadata_and_skip_the_extras(monkeypatch):
    monkeypatch.setattr(_compat.metadata, 'requires', lambda name: REQUIRES)
    assert _compat.declared_floors() == {'torch': '2.1.2', 'torchvision': '0.16.2', 'timm': '1.0.22', 'numpy': '1.23'}


@pytest.mark.parametrize('installed, message', [
    (dict(torch='2.0.1+cu118'), 'torch 2.0.1+cu118 is installed, epsanet needs torch>=2.1.2'),
    (dict(timm='1.0.20'), 'timm 1.0.20 is installed, epsanet needs timm>=1.0.22'),
    (dict(torch='2.1.0', torchvision='0.16.0'),
     'torch 2.1.0 is installed, epsanet needs torch>=2.1.2; torchvision 0.16.0 is installed, epsanet needs '
     'torchvision>=0.16.2 (pip install -U "torch>=2.1.2" "torchvision>=0.16.2")'),
], ids=['torch', 'timm', 'torch-and-torchvision'])
def test_too_old_fails_in_one_line_naming_both_versions(monkeypatch, installed, message):
    monkeypatch.setattr(_compat.metadata, 'requires', lambda name: REQUIRES)
    monkeypatch.setattr(_compat.metadata, 'version', _versions(**installed))
    with pytest.raises(ImportError) as err:
        _compat.check_versions()
    assert message in str(err.value) and '\n' not in str(err.value)


@pytest.mark.parametrize('installed', [dict(torch='2.1.2'), dict(torch='2.1.2+cpu', timm='1.0.22'),
                                       dict(torch='2.15.0.dev20260101', timm='1.1.0')], ids=['equal', 'local', 'newer'])
def test_at_or_above_the_floor_passes(monkeypatch, installed):
    monkeypatch.setattr(_compat.metadata, 'requires', lambda name: REQUIRES)
    monkeypatch.setattr(_compat.metadata, 'version', _versions(**installed))
    _compat.check_versions()


def test_not_installed_from_a_source_tree_checks_nothing(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(_compat.metadata, 'requires', missing)
    assert _compat.declared_floors() == {}
    _compat.check_versions()


def test_import_epsanet_under_an_old_timm_stops_at_once(tmp_path):
    """A real interpreter: ``import epsanet`` with a too-old timm is one ImportError line, before any model code."""
    code = ("from importlib import metadata\n"
            "real = metadata.version\n"
            "metadata.version = lambda name: '0.9.16' if name == 'timm' else real(name)\n"
            "metadata.requires = lambda name: ['timm>=1.0.22']\n"
            "import epsanet\n")
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        'ImportError: timm 0.9.16 is installed, epsanet needs timm>=1.0.22 (pip install -U "timm>=1.0.22")')
    assert 'epsanet/models' not in proc.stderr  # stopped before any model code ran


def test_autocast_enabled_on_this_torch():
    assert not _compat.autocast_enabled('cpu')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert _compat.autocast_enabled('cpu')
        assert not _compat.autocast_enabled('cuda')
    assert not _compat.is_compiling()


def test_exported_program_without_export_dim_is_a_clear_error(monkeypatch, tmp_path):
    import timm

    from epsanet import export
    monkeypatch.setattr(export, 'HAS_EXPORT_DIM', False)
    model = timm.create_model('epsanet50', layers=(1, 1, 1, 1)).eval()
    with pytest.raises(export.ExportError, match=r'has no torch\.export\.Dim; a \.pt2 needs a newer torch'):
        export.export_model(model, str(tmp_path / 'm.pt2'), 'exported-program', input_size=(3, 32, 32))
    assert list(tmp_path.iterdir()) == []
