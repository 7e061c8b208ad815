"""Feature extraction at scale: streamed writers, the reader, layouts, resuming, several processes, memory."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from epsanet.app.errors import ConfigError
from epsanet.app.outputs import OutputError
from epsanet.data import DataError, load_image
from epsanet.features import ExtractConfig, extract, load, parse_size
from epsanet.features.writers import SafetensorsStream, TensorSpec, compact_npy, preallocate_npy
from epsanet.train.checkpoint import save_weights

ROW_BYTES = 2048 * 4  # a pooled epsanet50 feature row


def _write_pngs(folder: Path, count: int, size: int = 32, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        sub = folder / f'd{i % 3}'
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(sub / f'{i:04d}.png')


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """14 random images in three subfolders, plus one broken file in the middle of the order."""
    root = tmp_path_factory.mktemp('feat') / 'imgs'
    _write_pngs(root, 14)
    (root / 'd1' / '0005x.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    return root


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp('w') / 'w.safetensors'
    save_weights(path, timm.create_model('epsanet50', num_classes=3).state_dict(),
                 dict(model='epsanet50', num_classes=3, img_size=32, crop_pct=1.0))
    return path


def _cfg(images, weights, output, **kw):
    kw = dict(dict(workers=0, progress=False, batch_size=3), **kw)
    return ExtractConfig(data_dir=str(images), checkpoint=str(weights), output=str(output), **kw)


def _readable(images):
    names = sorted(p.relative_to(images).as_posix() for p in images.rglob('*.png'))
    return [n for n in names if not n.endswith('0005x.png')]


# --- writers ---------------------------------------------------------------------------------------------------------

def test_streamed_safetensors_file_is_valid_and_checksummed(tmp_path):
    spec = TensorSpec('stage2', (4, 2, 2))
    rows = np.random.default_rng(0).standard_normal((7, 4, 2, 2)).astype(np.float32)
    stream = SafetensorsStream(tmp_path / 's.safetensors', spec, max_rows=100000)
    stream.write(rows[:3])
    stream.write(rows[3:])
    assert not (tmp_path / 's.safetensors').exists()  # named only when complete
    entry = stream.close()
    loaded = load_file(tmp_path / 's.safetensors')['stage2']
    np.testing.assert_array_equal(loaded.numpy(), rows)
    assert entry['bytes'] == (tmp_path / 's.safetensors').stat().st_size
    import hashlib
    assert entry['sha256'] == hashlib.sha256(rows.tobytes()).hexdigest()
    assert not list(tmp_path.glob('.*.tmp'))


def test_compact_npy_drops_rows_in_place(tmp_path):
    spec = TensorSpec('f', (3,))
    path = tmp_path / 'a.npy'
    preallocate_npy(path, spec, 1000)  # 4-digit row count in the header, 3 digits after
    full = np.lib.format.open_memmap(path, mode='r+')
    full[:] = np.arange(3000, dtype=np.float32).reshape(1000, 3)
    del full
    keep = [[0, 5], [7, 8], [10, 1000]]
    assert compact_npy(path, keep) == 996
    out = np.load(path)
    expected = np.concatenate([np.arange(3000, dtype=np.float32).reshape(1000, 3)[a:b] for a, b in keep])
    np.testing.assert_array_equal(out, expected)
    assert path.stat().st_size == out.nbytes + 128


def test_parse_size():
    assert parse_size('1GB') == 1 << 30
    assert parse_size('64kb') == 65536
    assert parse_size('1000') == 1000
    with pytest.raises(ConfigError, match='--shard-size'):
        parse_size('big')


# --- extraction and reading back ------------------------------------------------------------------------------------

def _plain_features(weights, images, names):
    """Pooled pre-logits of a plain (not optimized) model with timm's eval transform, image by image."""
    model = timm.create_model('epsanet50', num_classes=3)
    model.load_state_dict(load_file(weights))
    model.eval()
    cfg = timm.data.resolve_data_config(dict(img_size=32, crop_pct=1.0), model=model)
    transform = timm.data.create_transform(**cfg)
    x = torch.stack([transform(load_image(images / n)) for n in names])
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def test_folder_output_round_trip(images, weights, tmp_path, caplog):
    out = tmp_path / 'feats'
    with caplog.at_level('INFO'):
        result = extract(_cfg(images, weights, out, shard_size=str(4 * ROW_BYTES + 256), progress=True))
    assert any('extract: 15/15 (100%)' in r.message and 'img/s' in r.message for r in caplog.records)
    names = _readable(images)
    assert result['count'] == len(names) == 14 and result['skipped'] == 1
    index = json.loads((out / 'index.json').read_text())
    assert index['skipped'] == ['d1/0005x.png']
    assert index['tensors'] == {'features': {'shape': [2048], 'dtype': 'float32'}}
    # shards of at most 4 rows, contiguous row ranges, row counts that add up
    assert all(s['count'] <= 4 and s['rows'][1] - s['rows'][0] == s['count'] for s in index['shards'])
    assert [s['rows'][0] for s in index['shards'][1:]] == [s['rows'][1] for s in index['shards'][:-1]]
    size = index['plan']['chunk_images']  # 4 rows fit a shard; chunks end where batches (of 3) do
    assert size == 3 and len(index['shards']) == 5 and sum(s['count'] for s in index['shards']) == 14
    assert not (out / '.progress').exists()

    feats = load(out)
    assert len(feats) == 14 and feats.paths == names and feats.keys() == ['features']
    assert repr(feats).startswith('Features(14 rows of features (14, 2048)')
    assert feats.shape('features') == (14, 2048)
    expected = _plain_features(weights, images, names)
    every = feats.rows(0, 14)['features']
    torch.testing.assert_close(every, expected, atol=1e-4, rtol=1e-4)  # optimized form, same numbers
    torch.testing.assert_close(feats['d2/0011.png']['features'], expected[names.index('d2/0011.png')])
    batches = list(feats.batches(5))
    assert [len(p) for p, _ in batches] == [5, 5, 4]
    assert sum((p for p, _ in batches), []) == names
    torch.testing.assert_close(torch.cat([b['features'] for _, b in batches]), every, atol=0, rtol=0)
    with pytest.raises(KeyError, match='could not be read'):
        feats['d1/0005x.png']
    # each shard file is plain safetensors; the checksums hold until a byte changes
    assert feats.verify() == []
    shard = out / index['shards'][2]['files']['features']['file']
    with safe_open(str(shard), 'pt') as f:
        assert f.get_tensor('features').shape == (index['shards'][2]['count'], 2048)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert load(out).verify() == [shard.name]


def test_npy_and_safetensors_file_outputs_match_the_folder(images, weights, tmp_path):
    kw = dict(stages=(1, 4), pool_stages=False, shard_size='40KB')
    extract(_cfg(images, weights, tmp_path / 'dir', **kw))
    extract(_cfg(images, weights, tmp_path / 'f.npy', **kw))
    extract(_cfg(images, weights, tmp_path / 'one.safetensors', **kw))
    ref = load(tmp_path / 'dir').rows(0, 14)
    assert ref['stage1'].shape == (14, 256, 8, 8) and ref['stage4'].shape == (14, 2048, 1, 1)
    for key in ('stage1', 'stage4'):
        array = np.load(tmp_path / f'f.{key}.npy')  # rows after the broken image moved up, header rewritten
        np.testing.assert_array_equal(array, ref[key].numpy())
        np.testing.assert_array_equal(load_file(tmp_path / 'one.safetensors')[key].numpy(), ref[key].numpy())
    for path in (tmp_path / 'f.npy', tmp_path / 'f.stage1.npy', tmp_path / 'one.safetensors'):
        feats = load(path)
        assert feats.paths == _readable(images)
        torch.testing.assert_close(feats['d0/0003.png']['stage1'], ref['stage1'][feats.row_of('d0/0003.png')])
        torch.testing.assert_close(torch.cat([b['stage4'] for _, b in feats.batches(4)]), ref['stage4'])
    assert (tmp_path / 'f.paths.txt').read_text().splitlines() == _readable(images)
    assert not (tmp_path / 'f.parts').exists() and not (tmp_path / 'one.parts').exists()


def test_rerun_skips_a_complete_output_and_other_settings_need_overwrite(images, weights, tmp_path):
    out = tmp_path / 'feats'
    extract(_cfg(images, weights, out, shard_size='40KB'))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = extract(_cfg(images, weights, out, shard_size='40KB'))
    assert again['resumed'] == again['chunks'] and again['count'] == 14
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    with pytest.raises(ConfigError, match='other settings .*preprocessing.*--overwrite'):
        extract(_cfg(images, weights, out, img_size=64))
    result = extract(_cfg(images, weights, out, img_size=64, overwrite=True))
    assert result['img_size'] == 64 and load(out).index['img_size'] == 64
    assert len(list(out.glob('*.safetensors'))) == len(load(out).shards)


def test_fastest_inference_form_on_cpu_unless_no_optimize(images, weights, monkeypatch):
    import epsanet
    from epsanet.features.extract import _prepare_model
    optimized = []
    real = epsanet.optimize_for_inference
    monkeypatch.setattr(epsanet, 'optimize_for_inference', lambda m: optimized.append(m) or real(m))
    model, *_ = _prepare_model(_cfg(images, weights, 'x'), torch.device('cpu'), ())
    assert optimized == [model] and model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    plain, *_ = _prepare_model(_cfg(images, weights, 'x', optimize=False), torch.device('cpu'), ())
    assert optimized == [model] and plain.conv1.weight.is_contiguous()


def test_unusable_output_name_is_a_clear_error(images, weights, tmp_path):
    with pytest.raises(ConfigError, match='a folder .*\\.npy or a \\.safetensors'):
        extract(_cfg(images, weights, tmp_path / 'x.pt'))


# --- interrupted and resumed, several processes, memory (subprocesses) ----------------------------------------------

def _cli(*args):
    return [sys.executable, '-m', 'epsanet', *map(str, args)]


def _run(cmd, timeout=300):
    """``subprocess.run`` in its own session, so that a timeout also ends the processes it started (torchrun)."""
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_chunks(weights, tmp_path):
    data = tmp_path / 'many'
    _write_pngs(data, 48)
    out = tmp_path / 'feats'
    cmd = _cli('extract', '--data-dir', data, '--checkpoint', weights, '--output', out, '--shard-size',
               4 * ROW_BYTES + 256, '-b', 2, '-j', 0, '--no-progress')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / '.progress').glob('chunk-*.json'))) < 2:
            assert proc.poll() is None, 'extraction ended before it was interrupted: ' + proc.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)  # a real SIGKILL mid-run: nothing gets to clean up
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / 'index.json').exists()
    finished = sorted(p.name for p in (out / '.progress').glob('chunk-*.json'))
    assert 2 <= len(finished) < 12
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob('features-*.safetensors')}
    assert len(kept) >= len(finished)

    rerun = _run(cmd)
    assert rerun.returncode == 0, rerun.stderr
    assert f'resuming: {len(finished)} of 12 chunks are already complete' in rerun.stderr
    assert f'({len(finished)} of 12 chunks from an earlier run)' in rerun.stdout
    for c in range(len(finished)):  # finished shards were not written again
        name = f'features-{c:05d}.safetensors'
        assert (out / name).stat().st_ino == kept[name][0] and (out / name).stat().st_mtime_ns == kept[name][1]
    feats = load(out)
    assert len(feats) == 48 and feats.verify() == [] and not list(out.glob('.*.tmp'))
    fresh = extract(ExtractConfig(data_dir=str(data), checkpoint=str(weights), output=str(tmp_path / 'fresh'),
                                  workers=0, progress=False, batch_size=16))
    assert fresh['count'] == 48
    torch.testing.assert_close(feats.rows(0, 48)['features'], load(tmp_path / 'fresh').rows(0, 48)['features'],
                               atol=1e-5, rtol=1e-5)


def _interrupted(monkeypatch, cfg, at_batch: int = 4) -> None:
    """Run ``extract(cfg)`` and stop it as Ctrl-C would, in its ``at_batch``-th batch."""
    module = sys.modules['epsanet.features.extract']  # the attribute of that name is the function

    class CtrlC:
        def __init__(self, *a, **k):
            self.n = 0

        def update(self, n):
            self.n += 1
            if self.n == at_batch:
                raise KeyboardInterrupt

        def close(self):
            pass
    monkeypatch.setattr(module, 'progress', CtrlC)
    try:
        with pytest.raises(KeyboardInterrupt):
            extract(cfg)
    finally:
        monkeypatch.undo()


@pytest.mark.slow
@pytest.mark.parametrize('name', ['two', 'two.npy'])
def test_two_processes_match_one(images, weights, tmp_path, name, monkeypatch):
    args = ['--data-dir', images, '--checkpoint', weights, '--shard-size', 2 * ROW_BYTES + 256, '-b', 2, '-j', 0,
            '--no-progress', '--device', 'cpu']
    if name.endswith('.npy'):  # first one process, stopped by Ctrl-C in its 4th batch; the two processes finish it
        _interrupted(monkeypatch, _cfg(images, weights, tmp_path / name, shard_size=str(2 * ROW_BYTES + 256),
                                       batch_size=2))
        assert len(list((tmp_path / 'two.parts').glob('chunk-*.json'))) == 3
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m',
           'epsanet', 'extract', *map(str, args), '--output', str(tmp_path / name)]
    run = _run(cmd)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'rank 1:' in run.stderr and 'rank 0:' in run.stderr  # both processes did work
    if name.endswith('.npy'):
        assert 'resuming: 3 of 8 chunks are already complete; 5 to go' in run.stderr
    extract(_cfg(images, weights, tmp_path / 'one'))
    two, one = load(tmp_path / name), load(tmp_path / 'one')
    assert two.paths == one.paths == _readable(images)  # every image once, in the original order
    assert two.skipped == ['d1/0005x.png']
    torch.testing.assert_close(two.rows(0, 14)['features'], one.rows(0, 14)['features'], atol=1e-5, rtol=1e-5)
    assert two.verify() == [] and not (tmp_path / 'two.parts').exists()


_MEASURE = ('import resource, sys\nfrom epsanet.cli import main\nrc = main(sys.argv[1:])\n'
            'print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)\n')


def _peak_rss_mib(data, out, fmt_args):
    cmd = [sys.executable, '-c', _MEASURE, 'extract', '--data-dir', str(data), '--output', str(out), '--stages', '0',
           '--img-size', '64', '-b', '16', '-j', '0', '--no-progress', *fmt_args]
    run = _run(cmd)
    assert run.returncode == 0, run.stderr[-3000:]
    return int(run.stdout.split('MAXRSS_KB')[1].split()[0]) / 1024


@pytest.mark.slow
@pytest.mark.parametrize('layout', ['folder', 'npy'])
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path, layout):
    """Stem maps at 64 px are 256 KiB a row: 500 images write 100 MiB more than 100, memory must stay flat."""
    small, large = tmp_path / 'small', tmp_path / 'large'
    _write_pngs(small, 100, size=64)
    _write_pngs(large, 500, size=64, seed=1)
    name = 'out' if layout == 'folder' else 'out.npy'
    fmt = ['--shard-size', '4MB']
    rss_small = _peak_rss_mib(small, tmp_path / 's' / name, fmt)
    rss_large = _peak_rss_mib(large, tmp_path / 'l' / name, fmt)
    extra_output = (500 - 100) * 64 * 32 * 32 * 4 / 2 ** 20
    assert len(load(tmp_path / 'l' / name)) == 500
    assert rss_large - rss_small < 0.1 * extra_output, (rss_small, rss_large)


def test_no_readable_image_is_a_clear_error(weights, tmp_path):
    folder = tmp_path / 'bad'
    folder.mkdir()
    (folder / 'x.png').write_bytes(b'not a png')
    with pytest.raises(DataError, match='none of the 1 images'):
        extract(_cfg(folder, weights, tmp_path / 'out'))
    with pytest.raises(ConfigError, match='--batch-size must be >= 1; got 0'):
        extract(_cfg(folder, weights, tmp_path / 'out', batch_size=0))


def test_a_foreign_index_json_is_not_replaced_without_overwrite(images, weights, tmp_path):
    out = tmp_path / 'mine'
    out.mkdir()
    (out / 'index.json').write_text('{"something": "else"}')
    with pytest.raises(OutputError, match='index.json already exists and this command did not make it'):
        extract(_cfg(images, weights, out))
    assert (out / 'index.json').read_text() == '{"something": "else"}'


@pytest.mark.parametrize('source', ['tar', 'hfds', 'hfds_unlabelled'])
def test_dataset_sources_give_the_rows_of_the_folder(tmp_path, source):
    """--dataset (timm's create_dataset: a .tar, a Hugging Face save_to_disk folder, also one without labels)
    embeds the same images, one row per image, keyed by the data set's file names."""
    from epsanet.data.synthetic import write_hf_dataset, write_image_folder, write_tar

    folder = write_image_folder(tmp_path / 'imgs', classes=('a', 'b'), splits={'val': 3}, size=32) / 'val'
    if source == 'tar':  # a .tar is timm's default source: the archive as the root of --dataset image_folder
        cfg = dict(data_dir=str(write_tar(folder, tmp_path / 'val.tar')), dataset='image_folder')
    else:
        root = write_hf_dataset(folder, tmp_path / 'hf', split='val')
        if source == 'hfds_unlabelled':
            import datasets

            unlabelled = datasets.load_from_disk(str(root)).remove_columns('label')
            root = tmp_path / 'hf-unlabelled'
            unlabelled.save_to_disk(str(root))
        cfg = dict(data_dir=str(root), dataset=f'hfds/{root}', split='val')
    common = dict(img_size=32, workers=0, batch_size=4, progress=False)
    out = extract(ExtractConfig(output=str(tmp_path / 'from-source'), **cfg, **common))
    ref = extract(ExtractConfig(data_dir=str(folder), output=str(tmp_path / 'from-folder'), **common))
    assert out['count'] == ref['count'] == 6
    a, b = load(tmp_path / 'from-source'), load(tmp_path / 'from-folder')
    assert len(set(a.paths)) == 6  # every row has its own key
    # both sources list class a's images, then class b's, each in name order
    torch.testing.assert_close(a.rows(0, 6)['features'], b.rows(0, 6)['features'], atol=1e-4, rtol=1e-4)


def _wds_to_folder_name(name: str) -> str:
    """``val-000S.tar/<class>_<stem>.png`` (write_wds's key) -> ``<class>/<stem>.png``."""
    cls, stem = name.split('/', 1)[1].split('_', 1)
    return f'{cls}/{stem}'


def test_webdataset_shards_give_the_rows_of_the_folder(images, weights, tmp_path):
    """--dataset wds/NAME: the shards are indexed once and read by sample; one row per readable sample keyed
    ``<shard>/<key>.<ext>``, equal to the same image's row from the folder; the corrupt sample has no row."""
    from epsanet.data.synthetic import write_wds

    shards = write_wds(images, tmp_path / 'wds', 'val', shards=3)
    out = extract(_cfg(shards, weights, tmp_path / 'from-wds', dataset='wds/x', split='val'))
    ref = extract(_cfg(images, weights, tmp_path / 'from-folder'))
    assert out['count'] == ref['count'] == 14 and out['skipped'] == 1
    a, b = load(tmp_path / 'from-wds'), load(tmp_path / 'from-folder')
    assert a.paths[0] == 'val-0000.tar/d0_0000.png' and len(set(a.paths)) == 14
    assert [_wds_to_folder_name(n) for n in a.skipped] == ['d1/0005x.png']
    rows = [b.paths.index(_wds_to_folder_name(n)) for n in a.paths]
    torch.testing.assert_close(a.rows(0, 14)['features'], b.rows(0, 14)['features'][rows], atol=1e-5, rtol=1e-5)


def test_webdataset_shards_resumed_by_two_processes(images, weights, tmp_path, monkeypatch):
    """One process stopped by Ctrl-C after 3 chunks; torchrun with 2 CPU processes (gloo) finishes the rest."""
    from epsanet.data.synthetic import write_wds

    shards = write_wds(images, tmp_path / 'wds', 'val', shards=2)
    args = dict(dataset='wds/x', split='val', shard_size=str(2 * ROW_BYTES + 256), batch_size=2)
    _interrupted(monkeypatch, _cfg(shards, weights, tmp_path / 'two', **args))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'epsanet',
           'extract', '--dataset', 'wds/x', '--split', 'val', '--data-dir', str(shards), '--checkpoint', str(weights),
           '--shard-size', str(2 * ROW_BYTES + 256), '-b', '2', '-j', '0', '--no-progress', '--device', 'cpu',
           '--output', str(tmp_path / 'two')]
    run = _run(cmd)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'resuming: 3 of 8 chunks are already complete; 5 to go' in run.stderr
    assert 'rank 1:' in run.stderr and 'rank 0:' in run.stderr
    extract(_cfg(shards, weights, tmp_path / 'one', **args))
    two, one = load(tmp_path / 'two'), load(tmp_path / 'one')
    assert two.paths == one.paths and len(two.paths) == 14 and two.skipped == one.skipped
    assert [_wds_to_folder_name(n) for n in two.skipped] == ['d1/0005x.png']
    torch.testing.assert_close(two.rows(0, 14)['features'], one.rows(0, 14)['features'], atol=1e-5, rtol=1e-5)
    assert two.verify() == []


def test_inference_form_per_device():
    """The form extraction runs in: optimize_for_inference on CPU; channels_last, AMP and pinned memory on
    CUDA (decided here without a GPU; scripts/gpu_check.py runs it on one)."""
    from epsanet.features.extract import inference_form

    cfg = ExtractConfig(data_dir='x', output='y')
    assert inference_form(cfg, torch.device('cpu')) == dict(
        optimize_for_inference=True, amp=False, channels_last=False, pin_memory=False)
    assert inference_form(cfg, torch.device('cuda', 1)) == dict(
        optimize_for_inference=False, amp=True, channels_last=True, pin_memory=True)
    plain = ExtractConfig(data_dir='x', output='y', optimize=False)
    assert inference_form(plain, torch.device('cuda')) == dict(
        optimize_for_inference=False, amp=False, channels_last=False, pin_memory=True)
