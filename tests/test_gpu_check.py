"""scripts/gpu_check.py: without CUDA it says so and passes; its checks run end to end on the CPU."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / 'scripts' / 'gpu_check.py'


def _load():
    spec = importlib.util.spec_from_file_location('gpu_check', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert _load().main([]) == 0
    assert 'no CUDA device' in capsys.readouterr().out


@pytest.mark.slow
def test_every_check_runs_on_the_cpu(tmp_path):
    # torch.compile with aot_eager: dynamo and AOT autograd, not inductor's C++ build (tests/models compiles with it)
    out = subprocess.run([sys.executable, str(SCRIPT), '--device', 'cpu', '--compile-backend', 'aot_eager'],
                         capture_output=True, text=True,
                         timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    table = out.stdout
    for check in ('epsanet50 fp32 vs CPU', 'epsanet101_large fp32 vs CPU', 'AMP bfloat16 training step',
                  'channels_last forward + backward', 'torch.compile forward + backward', '`epsanet train` 1 epoch',
                  'resnet50 fp32 channels_last'):
        assert check in table
    assert '| FAIL |' not in table
