"""Every data source through one function (epsanet/data/sources.py), with corrupt images counted, named and
left out of metrics; validate / predict / train on them; torchrun training from webdataset shards."""
import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

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
        'wds': ('wds/tiny', write_wds(folder / 'val', out / 'wds', 'val'), 'val'),
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


@pytest.mark.parametrize('kind', ['tar', 'hfds_saved', 'torch_folder', 'wds'])
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


# write_wds deals the 9 sorted val images to 2 shards in turn: shard 0 has a/0 a/2 b/1 c/0 c/2, shard 1 a/1 b/0 b/2 c/1
WDS_NAMES = ['val-0000.tar/a_0.png', 'val-0000.tar/a_2.png', 'val-0000.tar/b_1.png', 'val-0000.tar/c_0.png',
             'val-0000.tar/c_2.png', 'val-0001.tar/a_1.png', 'val-0001.tar/b_0.png', 'val-0001.tar/b_2.png',
             'val-0001.tar/c_1.png']
WDS_BAD = 2  # val/b/1.png


def test_webdataset_shards_are_indexed_for_evaluation_and_streamed_for_training(sources, caplog):
    from torch.utils.data import DataLoader, IterableDataset

    name, root, split = sources['wds']
    ds = create_image_dataset(name, root, split, mark_unreadable=True)
    assert list(ds.classes) == list(CLASSES) and len(ds) == 9
    assert [ds.filename(i) for i in range(len(ds))] == WDS_NAMES
    assert [ds[i][1] for i in range(len(ds))] == [0, 0, -1 - WDS_BAD, 2, 2, 0, 1, 1, 2]
    assert ds.num_skipped == 1 and 'val-0000.tar/b_1.png' in caplog.text
    assert ds[0][0].size == (16, 16) and ds[0][0].mode == 'RGB'
    with pytest.raises(UnreadableImageError, match='val-0000.tar/b_1.png'):
        create_image_dataset(name, root, split, strict=True)[WDS_BAD]
    assert [n for n, _ in create_image_dataset(name, root, split).verify(progress=False)] == [WDS_NAMES[WDS_BAD]]
    # a copy for another process (DataLoader worker, spawn) carries the index, not the open shard files
    copy = pickle.loads(pickle.dumps(ds.reader))
    assert ds.reader._files and not copy._files and copy[3][0].read() == ds.reader[3][0].read()
    ds.transform = lambda img: img.getpixel((0, 0))
    loaded = [(p, int(t)) for batch in DataLoader(ds, batch_size=2, num_workers=2) for p, t in zip(*batch)]
    assert [t for _, t in loaded] == [ds[i][1] for i in range(9)]
    # training streams the shards through timm (shuffled; the corrupt sample is dropped by its pipeline)
    train_ds = create_image_dataset(name, root, split, is_training=True)
    assert isinstance(train_ds, IterableDataset) and train_ds.classes == list(CLASSES)


def test_webdataset_class_map_and_json_targets(folder, tmp_path):
    root = write_wds(folder / 'train', tmp_path / 'wds', 'train', shards=1)
    cmap = tmp_path / 'map.txt'
    cmap.write_text('c\nb\na\n')  # names: remapped through the info file's classes, as timm's remap_target
    ds = create_image_dataset('wds/x', root, 'train', class_map=str(cmap))
    assert ds.classes == ['c', 'b', 'a'] and [ds.reader[i][1] for i in range(6)] == [2, 2, 1, 1, 0, 0]
    # training streams the shards through timm with the same map: every image gets the same target
    train_ds = create_image_dataset('wds/x', root, 'train', class_map=str(cmap), is_training=True)
    streamed = {img.tobytes(): t for img, t in train_ds}
    assert train_ds.classes == ds.classes and streamed == {ds[i][0].tobytes(): ds[i][1] for i in range(6)}
    cmap.write_text('a\nb\n')
    with pytest.raises(DataError, match='classes c of the info file .* are not in the class map'):
        create_image_dataset('wds/x', root, 'train', class_map=str(cmap))
    # labels in a json sidecar (target_key), members in a sub-folder of the tar, an unlabelled (-1) sample left out
    shard = tmp_path / 'j' / 'part-0.tar'
    shard.parent.mkdir()
    with tarfile.open(shard, 'w') as tar:
        for key, label in [('x/s0', 2), ('x/s1', -1), ('x/s2', 0)]:
            for ext, data in [('jpg', (folder / 'train' / 'a' / '0.png').read_bytes()),
                              ('json', json.dumps({'meta': {'label': label}}).encode())]:
                info = tarfile.TarInfo(f'{key}.{ext}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (shard.parent / '_info.json').write_text(json.dumps({'splits': {'val': dict(
        name='val', num_samples=3, filenames=['part-0.tar'], shard_lengths=[3])}}))
    ds = create_image_dataset('wds/j', shard.parent, 'val', target_key='meta/label')
    assert len(ds) == 2 and ds.classes == [] and ds.filename(1) == 'part-0.tar/x/s2.jpg'
    assert [ds[i][1] for i in range(2)] == [2, 0] and ds[0][0].size == (16, 16)


def test_webdataset_errors_are_clear(folder, tmp_path, caplog):
    def shards(name):
        return write_wds(folder / 'train', tmp_path / name, 'val')

    with pytest.raises(DataError, match='no usable split "test".*splits: val'):
        create_image_dataset('wds/x', shards('split'), 'test')
    root = shards('missing')
    (root / 'val-0001.tar').unlink()
    with pytest.raises(DataError, match='shard val-0001.tar listed for split "val" is missing'):
        create_image_dataset('wds/x', root, 'val')
    root = shards('gz')
    (root / 'val-0000.tar').write_bytes(gzip.compress((root / 'val-0000.tar').read_bytes()))
    with pytest.raises(DataError, match='gzip-compressed.*uncompressed .tar'):
        create_image_dataset('wds/x', root, 'val')
    root = shards('noimage')
    with pytest.raises(DataError, match='sample "a_0" of shard .* has no image member.*looked for jpg, webp'):
        create_image_dataset('wds/x', root, 'val', input_key='jpg;webp')
    with pytest.raises(DataError, match='has no label: every sample needs a json sidecar'):
        create_image_dataset('wds/x', root, 'val', target_key='label')
    with pytest.raises(DataError, match='take only input_key and target_key'):
        create_image_dataset('wds/x', root, 'val', filename_key='f')
    # a shard with another number of samples than the info file says: indexed as it is, with a warning
    root = shards('short')
    with tarfile.open(root / 'val-0000.tar') as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(root / 'val-0000.tar', 'w') as tar:
        for m, data in members[:-2]:  # the last sample (image + cls) dropped
            tar.addfile(m, io.BytesIO(data))
    ds = create_image_dataset('wds/x', root, 'val')
    assert len(ds) == 5 and 'shard val-0000.tar holds 2 samples, the info file' in caplog.text


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
    from epsanet.weights.metadata import read_weights_metadata
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
