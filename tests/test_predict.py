"""``epsanet predict`` and its API (epsanet/predict.py) on a model trained for a few steps."""
import csv
import json
import logging

import pytest
import timm

from epsanet.app.data import expand_inputs
from epsanet.cli import main
from epsanet.data import DataError, UnreadableImageError, write_image_folder
from epsanet.predict import PredictConfig, predict
from epsanet.train import TrainConfig, train
from epsanet.train.checkpoint import save_weights
from epsanet.train.validate import ValidateConfig, validate


def _corrupt(path):
    path.write_bytes(b'\x89PNG\r\n\x1a\n garbage')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """3 colour classes trained for 2 epochs at 32 px; val: 36 readable images + 1 corrupt file."""
    root = tmp_path_factory.mktemp('predict')
    data = write_image_folder(root / 'data', classes=('cat', 'dog', 'fox'), splits={'train': 4, 'val': 12})
    bad = data / 'val' / 'dog' / 'corrupt.png'
    _corrupt(bad)
    cfg = TrainConfig(data_dir=str(data), output=str(root / 'run'), img_size=32, batch_size=4, epochs=2, workers=0,
                      lr=0.01, warmup_epochs=0, seed=3, progress=False, crop_pct=1.0, val_split='')
    train(cfg)
    return data, root / 'run' / 'last.safetensors', bad


def _cfg(**kw):
    return PredictConfig(workers=0, progress=False, **kw)


def test_top1_equals_validate_and_corrupt_file_has_no_row(trained, caplog):
    data, weights, bad = trained
    with caplog.at_level(logging.WARNING):
        result = predict(_cfg(inputs=(str(data / 'val'),), checkpoint=str(weights), topk=2))
    assert result.label_source == 'checkpoint' and result.classes == ['cat', 'dog', 'fox']
    assert result.count == 36 and result.skipped == [str(bad)]
    assert str(bad) not in [r['filename'] for r in result.rows] and str(bad) in caplog.text
    correct = sum(r['label'][0] == r['filename'].split('/')[-2] for r in result.rows)
    v = validate(ValidateConfig(data_dir=str(data), checkpoint=str(weights), workers=0, progress=False))
    assert v['count'] == 36 and v['skipped_unreadable'] == 1 and v['skipped_files'] == [str(bad)]
    assert v['correct'] == correct and v['top1'] == pytest.approx(100 * correct / 36)
    for r in result.rows:
        assert len(r['label']) == 2 and r['prob'][0] >= r['prob'][1] and 0 < sum(r['prob']) <= 1 + 1e-6


def test_json_and_csv_results(trained, tmp_path):
    data, weights, _ = trained
    files = [str(p) for p in sorted((data / 'val' / 'cat').glob('*.png'))][:3]
    out = tmp_path / 'p.json'
    result = predict(_cfg(inputs=tuple(files), checkpoint=str(weights), topk=3, results_file=str(out)))
    records = json.loads(out.read_text())
    assert [r['filename'] for r in records] == files
    assert all(set(r) == {'filename', 'label', 'prob'} and len(r['label']) == 3 for r in records)
    assert records[0]['label'] == result.rows[0]['label'] and sorted(records[0]['label']) == ['cat', 'dog', 'fox']
    out_csv = tmp_path / 'p.csv'
    predict(_cfg(inputs=(str(data / 'val' / 'cat' / '*.png'),), checkpoint=str(weights), results_file=str(out_csv)))
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 12 and set(rows[0]) == {'filename', 'label', 'prob'}
    assert all(r['label'] in ('cat', 'dog', 'fox') and 0 < float(r['prob']) <= 1 for r in rows)


def test_cli_prints_names_summary_and_strict_fails(trained, capsys):
    data, weights, bad = trained
    code = main(['predict', str(data / 'val' / 'dog'), '--checkpoint', str(weights), '-j', '0', '--no-progress'])
    out = capsys.readouterr().out
    assert code == 0 and '12 images predicted, 1 unreadable skipped (no row): ' + str(bad) in out
    assert any(name in out for name in ('cat ', 'dog ', 'fox '))
    code = main(['predict', str(data / 'val' / 'dog'), '--checkpoint', str(weights), '-j', '0', '--strict'])
    assert code == 2 and 'corrupt.png' in capsys.readouterr().err
    with pytest.raises(UnreadableImageError, match='corrupt.png'):
        predict(_cfg(inputs=(str(bad),), checkpoint=str(weights), strict=True))


def test_without_class_names_labels_are_indices(tmp_path, capsys):
    data = write_image_folder(tmp_path / 'd', classes=('a', 'b'), splits={'val': 1})
    model = timm.create_model('epsanet50', num_classes=4)
    save_weights(tmp_path / 'plain.safetensors', model.state_dict())  # no metadata
    code = main(['predict', str(data), '--checkpoint', str(tmp_path / 'plain.safetensors'), '--img-size', '32',
                 '-j', '0', '--no-progress', '--topk', '4'])
    out = capsys.readouterr().out
    assert code == 0 and 'labels are class indices' in out
    result = predict(_cfg(inputs=(str(data),), checkpoint=str(tmp_path / 'plain.safetensors'), img_size=32))
    assert result.label_source == 'indices' and result.img_size == 32
    assert all(r['label'][0] in ('0', '1', '2', '3') for r in result.rows)


def test_inputs_errors(tmp_path):
    with pytest.raises(DataError, match='does not exist'):
        expand_inputs([str(tmp_path / 'nope.png')])
    with pytest.raises(DataError, match='matches no image files'):
        expand_inputs([str(tmp_path / '*.jpg')])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match='no images under'):
        expand_inputs([str(tmp_path / 'empty')])
    data = write_image_folder(tmp_path / 'd', classes=('a',), splits={'val': 2})
    files = expand_inputs([str(data), str(data / 'val' / 'a' / '0.png')])
    assert [f.split('/')[-1] for f in files] == ['0.png', '1.png']  # no repeats


def test_webdataset_shards_rows_keyed_by_sample(trained, tmp_path, capsys):
    """``--dataset wds/NAME``: one row per readable sample, keyed ``<shard>/<key>.<ext>``, the same predictions as
    for the image files, and top-1 equal to validate's on the same shards."""
    from epsanet.data.synthetic import write_wds

    data, weights, bad = trained
    shards = write_wds(data / 'val', tmp_path / 'wds', 'val', shards=3)
    out = tmp_path / 'p.json'
    code = main(['predict', '--dataset', 'wds/x', '--data-dir', str(shards), '--split', 'val', '--checkpoint',
                 str(weights), '-j', '0', '--no-progress', '--results-file', str(out), '--topk', '2'])
    assert code == 0, capsys.readouterr().err
    records = json.loads(out.read_text())
    names = [r['filename'] for r in records]
    assert len(records) == 36 and len(set(names)) == 36 and {n.split('/')[0] for n in names} == {
        'val-0000.tar', 'val-0001.tar', 'val-0002.tar'}
    corrupt = [f'val-000{s}.tar/dog_corrupt.png' for s in range(3)]
    assert not set(corrupt) & set(names) and any(c in capsys.readouterr().out for c in corrupt)
    result = predict(_cfg(dataset='wds/x', data_dir=str(shards), split='val', checkpoint=str(weights)))
    assert result.count == 36 and len(result.skipped) == 1 and result.skipped[0] in corrupt
    by_file = {r['filename']: r for r in predict(_cfg(inputs=(str(data / 'val'),), checkpoint=str(weights))).rows}
    for r in result.rows:  # val-000S.tar/<class>_<stem>.png is the file val/<class>/<stem>.png
        cls, stem = r['filename'].split('/')[1][:-len('.png')].split('_', 1)
        same = by_file[str(data / 'val' / cls / f'{stem}.png')]
        assert r['label'] == same['label'] and r['prob'] == pytest.approx(same['prob'], abs=1e-5)
    correct = sum(r['label'][0] == r['filename'].split('/')[1].split('_')[0] for r in result.rows)
    v = validate(ValidateConfig(dataset='wds/x', data_dir=str(shards), split='val', checkpoint=str(weights),
                                workers=0, progress=False))
    assert v['count'] == 36 and v['skipped_files'] == result.skipped and v['correct'] == correct


def test_unlabelled_webdataset_shards_are_predicted(trained, tmp_path):
    """Shards without labels (new images to classify): predict reads them; validate says what is missing."""
    import tarfile

    from epsanet.data.synthetic import write_wds

    data, weights, _ = trained
    shards = write_wds(data / 'val', tmp_path / 'wds', 'val', shards=2)
    for shard in sorted(shards.glob('*.tar')):  # drop every .cls member
        kept = tmp_path / 'kept.tar'
        with tarfile.open(shard) as src, tarfile.open(kept, 'w') as dst:
            for m in src:
                if not m.name.endswith('.cls'):
                    dst.addfile(m, src.extractfile(m))
        kept.replace(shard)
    result = predict(_cfg(dataset='wds/x', data_dir=str(shards), split='val', checkpoint=str(weights)))
    assert result.count == 36 and len(result.skipped) == 1
    with pytest.raises(DataError, match='has no label'):
        validate(ValidateConfig(dataset='wds/x', data_dir=str(shards), split='val', checkpoint=str(weights),
                                workers=0, progress=False))
