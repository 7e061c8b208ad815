"""``epsanet extract`` through the command line."""
import numpy as np
from safetensors.torch import load_file

from epsanet.cli import main
from epsanet.features import load


def test_extract_cli_prelogits_and_stages(trained, tmp_path):
    data, out = trained
    ckpt = str(out / 'best.safetensors')
    args = ['extract', '--data-dir', str(data / 'val'), '--checkpoint', ckpt, '--workers', '0', '--no-progress',
            '-b', '4']
    assert main(args + ['--output', str(tmp_path / 'f.safetensors')]) == 0
    feats = load_file(tmp_path / 'f.safetensors')['features']
    assert feats.shape == (6, 2048)
    paths = (tmp_path / 'f.paths.txt').read_text().splitlines()
    assert paths == ['a/0.png', 'a/1.png', 'b/0.png', 'b/1.png', 'c/0.png', 'c/1.png']
    assert main(args + ['--output', str(tmp_path / 's.npy'), '--stages', '2', '4']) == 0
    assert np.load(tmp_path / 's.stage2.npy').shape == (6, 512, 4, 4)
    assert np.load(tmp_path / 's.stage4.npy').shape == (6, 2048, 1, 1)


def test_extract_skips_unreadable_images_or_fails_with_strict(trained, tmp_path, capsys):
    data, out = trained
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for name in ('x.png', 'y.png'):
        (folder / name).write_bytes((data / 'val' / 'a' / '0.png').read_bytes())
    (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    args = ['extract', '--data-dir', str(folder), '--checkpoint', str(out / 'best.safetensors'), '--workers', '0',
            '--no-progress', '--output', str(tmp_path / 'f.npy')]
    assert main(args) == 0
    assert np.load(tmp_path / 'f.npy').shape == (2, 2048)
    assert (tmp_path / 'f.paths.txt').read_text().splitlines() == ['x.png', 'y.png']
    assert main(args + ['--strict']) == 2
    assert 'broken.png' in capsys.readouterr().err


def test_extract_cli_folder_output_and_clear_errors(trained, tmp_path, capsys):
    data, out = trained
    args = ['extract', '--data-dir', str(data / 'val'), '--checkpoint', str(out / 'best.safetensors'), '--workers',
            '0', '--no-progress', '-b', '2', '--output', str(tmp_path / 'feats'), '--shard-size', '16KB']
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert '6 images -> features (6, 2048)' in printed and 'index.json' in printed
    feats = load(tmp_path / 'feats')
    assert feats.paths == ['a/0.png', 'a/1.png', 'b/0.png', 'b/1.png', 'c/0.png', 'c/1.png']
    assert [s['count'] for s in feats.shards] == [1] * 6  # 16 KiB holds one 8 KiB row and a header
    assert main(args) == 0  # a complete output: nothing is redone
    assert '(6 of 6 chunks from an earlier run)' in capsys.readouterr().out
    assert main(args + ['--pool-stages', '--stages', '4']) == 2
    err = capsys.readouterr().err
    assert 'other settings' in err and '--overwrite' in err
    assert main(args[:-1] + ['lots']) == 2
    assert '--shard-size lots' in capsys.readouterr().err
