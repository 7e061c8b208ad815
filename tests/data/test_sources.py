"""Every data source through one function (epsanet/data/sources.py), with corrupt images counted, named and
left out of metrics; validate / predict / train on them; torchrun training from webdataset shards."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from epsanet.cli import main
from epsanet.data import DataError, UnreadableImageError, create_image_dataset
from epsanet.data.synthetic import write_hf_dataset as write_hf_saved
from epsanet.data.synthetic import write_tar, write_wds
from epsanet.predict import PredictConfig, predict
from epsanet.train.checkpoint import save_weights

CLASSES = ('a', 'b', 'c')  # as the folder fixture (tests/data/conftest.py)
BAD = 4  # val/b/1.png: sorted order a/0-2, b/0, b/1


@pytest.fixture(scope='module')
def sources(folder, tmp_path_factory):
    """name, root, split of the same 9 val images (one corrupt) in every map-style format."""
    import datasets

    out = tmp_path_factory.mktemp('formats')
    write_tar(folder / 'val', out / 'val.tar')
    write_hf_saved(folder / 'val', out / 'hf_saved')
    (out / 'hf_parquet').mkdir()
    datasets.load_from_disk(str(out / 'hf_saved'))['val'].to_parquet(str(out / 'hf_parquet' / 'validation.parquet'))
    return {
        'folder': ('', folder, 'val'),
        'tar': ('', out / 'val.tar', ''),
        'hfds_saved': (f'hfds/{out / "hf_saved"}', '', 'val'),
        'hfds_parquet': (f'hfds/{out / "hf_parquet"}', '', 'validation'),
        'torch_folder': ('torch/image_folder', folder, 'val'),
    }


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', num_classes=3)
    path = tmp_path_factory.mktemp('w') / 'w.safetensors'
    save_weights(path, model.state_dict(), dict(model='epsanet50', num_classes=3, classes=list(CLASSES), img_size=16,
                                                crop_pct=1.0))
    return path


@pytest.mark.parametrize('kind', ['folder', 'tar', 'hfds_saved', 'hfds_parquet', 'torch_folder'])
def test_every_source_marks_counts_and_names_the_corrupt_image(sources, kind, caplog):
    name, root, split = sources[kind]
    ds = create_image_dataset(name, root, split, mark_unreadable=True)
    assert list(ds.classes) == list(CLASSES) and len(ds) == 9
    targets = [ds[i][1] for i in range(len(ds))]
    assert targets == [0, 0, 0, 1, -1 - BAD, 1, 2, 2, 2]
    assert ds.num_skipped == 1 and '1.png' in caplog.text
    assert ds[0][0].size == (16, 16) and ds[0][0].mode == 'RGB'
    # training: the unreadable sample is replaced by the next one, still counted
    train_ds = create_image_dataset(name, root, split, is_training=True)
    assert train_ds[BAD][1] == 1 and train_ds.num_skipped == 1
    # --strict: an error naming the file
    with pytest.raises(UnreadableImageError, match='1.png'):
        create_image_dataset(name, root, split, strict=True)[BAD]


@pytest.mark.parametrize('kind', ['tar', 'hfds_saved', 'torch_folder'])
def test_validate_and_predict_leave_the_corrupt_image_out(sources, kind, weights, tmp_path, capsys):
    name, root, split = sources[kind]
    results = tmp_path / 'r.json'
    args = ['validate', '--checkpoint', str(weights), '-j', '0', '--no-progress', '--results-file', str(results),
            '--split', split] + (['--dataset', name] if name else []) + (['--data-dir', str(root)] if root else [])
    assert main(args) == 0
    r = json.loads(results.read_text())
    assert r['count'] == 8 and r['skipped_unreadable'] == 1 and r['skipped_files'][0].endswith('1.png')
    assert '1 unreadable images skipped, not counted' in capsys.readouterr().out
    result = predict(PredictConfig(data_dir=str(root), dataset=name, split=split, checkpoint=str(weights), workers=0,
                                   progress=False))
    assert result.count == 8 and len(result.skipped) == 1 and result.skipped[0].endswith('1.png')
    assert result.label_source == 'checkpoint'


def test_webdataset_shards(folder, tmp_path):
    root = write_wds(folder / 'val', tmp_path / 'wds', 'val')
    ds = create_image_dataset('wds/tiny', root, 'val')
    samples = list(ds)
    assert ds.classes == list(CLASSES) and len(samples) == 8  # the corrupt sample is dropped by the pipeline
    assert sorted(t for _, t in samples) == [0, 0, 0, 1, 1, 2, 2, 2]


def test_class_map_fixes_the_indices(folder, tmp_path):
    cmap = tmp_path / 'map.txt'
    cmap.write_text('c\nb\na\n')
    ds = create_image_dataset('', folder, 'train', class_map=str(cmap))
    assert ds.classes == ['c', 'b', 'a'] and [t for _, t in ds.samples] == [2, 2, 1, 1, 0, 0]
    cmap.write_text('a\nb\n')
    with pytest.raises(DataError, match='not in the class map'):
        create_image_dataset('', folder, 'train', class_map=str(cmap))


def test_clear_errors(folder, tmp_path):
    with pytest.raises(DataError, match='unknown source "tfds/"'):
        create_image_dataset('tfds/x', folder)
    with pytest.raises(DataError, match='--dataset-download'):
        create_image_dataset('torch/cifar10', tmp_path, 'val')
    with pytest.raises(DataError, match='_info.json'):
        create_image_dataset('wds/none', tmp_path, 'val')
    with pytest.raises(DataError, match='no split "train"'):
        write_hf_saved(folder / 'val', tmp_path / 'hf')
        create_image_dataset(f'hfds/{tmp_path / "hf"}', '', 'train')
    (tmp_path / 'bad.tar').write_bytes(b'not a tar')
    with pytest.raises(DataError, match='tar'):
        create_image_dataset('', tmp_path / 'bad.tar')
    with pytest.raises(DataError, match='no "val" subfolder'):
        create_image_dataset('', tmp_path, 'val')


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_from_webdataset_shards(tmp_path):
    from epsanet.data import write_image_folder

    src = write_image_folder(tmp_path / 'img', classes=CLASSES, splits={'train': 4, 'val': 2}, size=16)
    shards = write_wds(src / 'train', tmp_path / 'wds', 'train')
    write_wds(src / 'val', shards, 'val')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    out = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'epsanet',
           'train', '--dataset', 'wds/tiny', '--data-dir', str(shards), '--img-size', '32', '-b', '2', '--epochs', '1',
           '--workers', '0', '--lr', '0.01', '--warmup-epochs', '0', '--crop-pct', '1.0', '--output', str(out),
           '--no-progress']
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / 'metrics.json').read_text())
    assert len(rows) == 1 and rows[0]['train_loss'] > 0 and 0 <= rows[0]['val_top1'] <= 100
    assert 'data: 6 train images' in proc.stderr  # per process: the 12 images' 2 shards split over 2 processes
    from epsanet.train import read_weights_metadata
    assert read_weights_metadata(out / 'last.safetensors')['classes'] == list(CLASSES)


def test_split_tars_and_indexed_samples(folder, tmp_path):
    from epsanet.data import IndexedSamples

    write_tar(folder / 'train', tmp_path / 'train.tar')
    ds = create_image_dataset('', tmp_path, 'train', is_training=True)  # DATA/<split>.tar
    assert ds.classes == list(CLASSES) and len(ds) == 6
    val = create_image_dataset('', folder, 'val', mark_unreadable=True)
    indexed = IndexedSamples(val)
    assert [indexed[i][1] for i in range(len(indexed))] == [0, 1, 2, 3, -1 - BAD, 5, 6, 7, 8]
    indexed.transform = lambda img: img.size
    assert val.transform is not None and indexed[0][0] == (16, 16)
