"""``epsanet.benchmark`` and ``epsanet benchmark`` at tiny sizes: they run and write valid reports.

No speed assertions: timings on a shared CI machine mean nothing; the benchmark itself is the
performance guard.
"""
import json

import pytest
import timm
import torch

from epsanet.benchmark import (
    REFERENCE,
    BenchmarkReport,
    Setting,
    _in_setting_format,
    measure_peak_memory,
    optimized_for,
    run_benchmark,
)
from epsanet.cli import main

TINY = dict(batch_size=2, img_size=32, baselines=('resnet18',), batch_sweep=(1,), img_sweep=(), reps=2,
            train_reps=1, progress=False)


@pytest.mark.slow
def test_run_benchmark_tiny(tmp_path):
    report = run_benchmark('epsanet50', memory_formats=('nchw',), measure_memory=False, optimize=True, **TINY)
    assert isinstance(report, BenchmarkReport)
    cands = {(r.candidate, r.setting.mode, r.setting.batch_size) for r in report.rows}
    for name in ('epsanet50', REFERENCE, 'resnet18'):
        assert {(name, 'infer', 2), (name, 'train', 2)} <= cands
    assert ('epsanet50', 'infer', 1) in cands and (REFERENCE, 'infer', 1) in cands  # batch sweep
    for name in ('epsanet50', REFERENCE, 'resnet18'):  # onnxruntime rows: the exported plain models
        assert (name, 'onnxruntime', 2) in cands
    for r in report.rows:
        assert len(r.times_ms) == (1 if r.setting.mode == 'train' else 2)
        assert r.img_per_s > 0 and r.median_ms > 0
        assert r.vs_reference is not None
    ours = [r for r in report.rows if r.candidate == 'epsanet50' and r.setting.mode == 'infer']
    assert all(r.max_abs_diff is not None and r.max_abs_diff < 1e-4 for r in ours)
    assert report.logits_ok is True
    descriptions = [t['description'] for t in report.targets]
    assert 'inference, ours vs reference (best format)' in descriptions
    assert 'training step, ours vs reference (best format)' in descriptions
    assert 'torch kernels' in report.environment['isa']

    report.save(json_path=str(tmp_path / 'b.json'), markdown_path=str(tmp_path / 'b.md'))
    data = json.loads((tmp_path / 'b.json').read_text())
    assert data['model'] == 'epsanet50' and len(data['rows']) == len(report.rows)
    assert data['config']['optimize'] is True
    md = (tmp_path / 'b.md').read_text()
    assert md.startswith('### epsanet50') and '| epsanet50 | infer | nchw | fp32 | 2 | 32 |' in md
    assert '### Ratios' in md


@pytest.mark.slow
def test_cli_writes_json_and_markdown(tmp_path, capsys):
    """Also: with stderr not a terminal (here captured), progress is plain lines, no carriage returns."""
    out_json, out_md = tmp_path / 'sub' / 'r.json', tmp_path / 'r.md'
    rc = main(['benchmark', '--model', 'epsanet50_large', '--batch-size', '1', '--img-size', '32',
               '--modes', 'infer', '--formats', 'channels_last', '--dtypes', 'bf16', '--baselines',
               '--batch-sweep', '--img-sweep', '--reps', '1', '--no-memory', '--runtime', 'torch',
               '--json', str(out_json), '--markdown', str(out_md)])
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert {r['candidate'] for r in data['rows']} == {'epsanet50_large', REFERENCE}
    assert all(r['setting']['dtype'] == 'bf16' and r['setting']['memory_format'] == 'channels_last'
               for r in data['rows'])
    assert '| epsanet50_large | infer | channels_last | bf16 | 1 | 32 |' in out_md.read_text()
    captured = capsys.readouterr()
    assert 'wrote' in captured.out and '\r' not in captured.err


@pytest.mark.slow
def test_peak_memory_probe_runs_in_a_fresh_process():
    # the steps' peak holds a gradient and an SGD momentum buffer per parameter (2 x 86 MiB in float32), plus the
    # activations of 2 images at 32 px (a few MiB; measured 174.9 MiB in all)
    weights_mib = sum(p.numel() for p in timm.create_model('epsanet50').parameters()) * 4 / 2 ** 20
    for checkpointing in (False, True):
        peak = measure_peak_memory('epsanet50', 'epsanet50', Setting('train', 2, 32), grad_checkpointing=checkpointing)
        assert 2 * weights_mib <= peak < 2 * weights_mib + 32, (checkpointing, peak, weights_mib)


def test_input_format_settings_and_one_line_settings():
    """NCHW rows use models as created; channels_last rows convert a copy; ours' settings."""
    model = timm.create_model('resnet18')
    assert _in_setting_format(model, Setting(memory_format='nchw')) is model
    cl = _in_setting_format(model, Setting(memory_format='channels_last'))
    assert cl is not model and cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.conv1.weight.is_contiguous()  # the shared model is left as it was
    ours = optimized_for(timm.create_model('epsanet50', num_classes=4), 'train')
    assert ours.training and ours.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    ours = optimized_for(ours, 'infer')
    assert not ours.training and isinstance(ours.layer1[0].bn1, torch.nn.Identity)  # BatchNorm folded


@pytest.mark.parametrize('kwargs,needle', [
    (dict(model_name='resnet50'), 'Unknown EPSANet model'),
    (dict(baselines=('not_a_model',)), 'not a timm model'),
    (dict(modes=('fly',)), 'mode'),
    (dict(img_size=16), 'at least 32'),
    (dict(reps=0), '>= 1'),
    (dict(runtimes=('tvm',)), 'Unknown runtime'),
])
def test_bad_arguments_raise_clear_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        run_benchmark(**{'progress': False, **kwargs})


def test_cli_reports_user_errors(capsys):
    assert main(['benchmark', '--model', 'nope', '--no-progress']) == 2
    assert 'Unknown EPSANet model' in capsys.readouterr().err


@pytest.mark.slow
def test_onnxruntime_int8_rows(tmp_path):
    """``--runtime onnxruntime-int8``: every candidate quantized as ``epsanet quantize`` does, timed in onnxruntime;
    its rows stay out of the float32 targets."""
    report = run_benchmark('epsanet50', modes=('infer',), memory_formats=('nchw',), measure_memory=False,
                           runtimes=('onnxruntime-int8',), **{**TINY, 'batch_sweep': ()})
    rows = {r.candidate: r for r in report.rows}
    assert set(rows) == {'epsanet50', REFERENCE, 'resnet18'}
    assert all(r.setting.mode == 'onnxruntime-int8' and r.setting.dtype == 'int8' and r.img_per_s > 0
               for r in rows.values())
    assert not [t for t in report.targets if 'onnxruntime' in t['description']]
    with pytest.raises(ValueError, match='Unknown runtime'):
        run_benchmark('epsanet50', runtimes=('tensorrt',), **TINY)


def test_thresholds_come_from_a_file_and_mark_each_ratio(tmp_path):
    """The package holds no thresholds: ``scripts/benchmark_targets.json`` (or any such file) supplies them."""
    from pathlib import Path

    from epsanet.benchmark import RATIOS, _evaluate_targets, load_thresholds
    from epsanet.timing import Row

    shipped = load_thresholds(str(Path(__file__).resolve().parents[1] / 'scripts' / 'benchmark_targets.json'))
    assert set(shipped) == {r[0] for r in RATIOS}
    main_setting = Setting('infer', 2, 32)
    rows = [Row(name, main_setting, False, [1.], 1., 1., speed) for name, speed in
            (('epsanet50', 10.), (REFERENCE, 5.), ('resnet50', 20.))]
    marked = {t['description']: t for t in _evaluate_targets('epsanet50', rows, [], main_setting, shipped)}
    assert marked['inference, ours vs reference (best format)']['met'] is True  # 2.0x >= 1.3x
    assert marked['inference, ours vs resnet50 (best format)']['met'] is False  # 0.5x < 0.9x
    unmarked = _evaluate_targets('epsanet50', rows, [], main_setting, {})
    assert all(t['threshold'] is None and t['met'] is None for t in unmarked)
    bad = tmp_path / 't.json'
    bad.write_text('{"no such ratio": 1}')
    with pytest.raises(ValueError, match='ratio descriptions'):
        load_thresholds(str(bad))
    assert main(['benchmark', '--targets', str(tmp_path / 'missing.json'), '--no-progress']) == 2


def test_ablation_changes_are_per_repeat_ratios_to_the_full_model():
    from epsanet.ablation import FULL, _rows

    rows = _rows('train', {FULL: [(100., 50.), (200., 60.), (100., 50.)],
                           'fast_psa': [(110., 55.), (180., 66.), (130., 50.)]})
    (row,) = rows
    assert row.mechanism == 'fast_psa' and row.full == 100. and row.without == 130.
    assert row.changes == pytest.approx([0.1, -0.1, 0.3]) and row.worth == pytest.approx(0.1)
    assert row.cpu_changes == pytest.approx([0.1, 0.1, 0.])
    assert _rows('memory', {FULL: [(10., None)], 'recompute_stem': [(12., None)]})[0].cpu_changes is None


@pytest.mark.slow
def test_ablation_tiny(tmp_path, capsys):
    """``epsanet benchmark --ablate``: one row per mechanism and figure it exists for, markdown and JSON."""
    from epsanet.ablation import WORTH
    from epsanet.optimize.transforms import MECHANISMS

    out = tmp_path / 'a.json'
    assert main(['benchmark', '--ablate', '--figures', 'infer', 'train', '--batch-size', '2', '--img-size', '32',
                 '--repeats', '1', '--no-progress', '--json', str(out)]) == 0
    data = json.loads(out.read_text())
    expected = {(m, f) for m in MECHANISMS for f in WORTH[m][1] if f in ('infer', 'train')}
    assert {(r['mechanism'], r['figure']) for r in data['rows']} == expected
    assert all(len(r['changes']) == 1 and r['full'] > 0 and r['without'] > 0 for r in data['rows'])
    assert '| mechanism | figure | with it | without it | worth (median) |' in capsys.readouterr().out
    assert main(['benchmark', '--ablate', '--repeats', '0', '--no-progress']) == 2
