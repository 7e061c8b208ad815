"""Faults of the OS and the network reach the user as one line with a non-zero exit, never a traceback
(unless EPSANET_DEBUG=1): the CLI's one top-level handler (epsanet/cli/__init__.py)."""
import errno
import os
import socket

import pytest

from epsanet import cli
from epsanet.cli import main


def _one_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(('INFO ', 'WARNING '))]
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith(f'epsanet {command}: error: ')
    return lines[0]


@pytest.mark.parametrize('code, cause', [
    (errno.ENOSPC, 'no space left'), (errno.EACCES, 'permission denied'), (errno.EROFS, 'read-only'),
    (errno.ENOTDIR, 'not a folder'), (errno.EEXIST, 'already exists'),
])
def test_an_os_error_anywhere_in_a_command_is_one_line(code, cause, monkeypatch, capsys):
    def run(args):
        raise OSError(code, os.strerror(code), '/out/features.npy')

    parser = cli.build_parser()
    monkeypatch.setattr(cli, 'build_parser', lambda: parser)
    parser._subparsers._group_actions[0].choices['models'].set_defaults(_run=run)
    assert main(['models']) == 1
    line = _one_line(capsys.readouterr().err, 'models')
    assert '/out/features.npy' in line and cause in line


def test_epsanet_debug_shows_the_traceback(monkeypatch):
    def run(args):
        raise OSError(errno.ENOSPC, 'No space left on device', '/out/x')

    parser = cli.build_parser()
    monkeypatch.setattr(cli, 'build_parser', lambda: parser)
    parser._subparsers._group_actions[0].choices['models'].set_defaults(_run=run)
    monkeypatch.setenv('EPSANET_DEBUG', '1')
    with pytest.raises(OSError):
        main(['models'])


def test_output_under_a_file_is_one_line(trained, tmp_path, capsys):
    data, run = trained
    (tmp_path / 'file').write_text('mine')
    code = main(['validate', '--data-dir', str(data), '--checkpoint', str(run / 'best.safetensors'), '--workers', '0',
                 '--no-progress', '--results-file', str(tmp_path / 'file' / 'r.json')])
    line = _one_line(capsys.readouterr().err, 'validate')
    # refused before any work by the output policy: a bad --results-file is bad input (exit 2)
    assert code == 2 and f'{tmp_path / "file"} is a file, not a folder' in line and '--results-file' in line
    assert (tmp_path / 'file').read_text() == 'mine'


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_refused_connection_names_the_host(tmp_path, capsys):
    url = f'http://127.0.0.1:{_closed_port()}/w.safetensors'
    (tmp_path / 'x.png').write_bytes(b'')
    assert main(['predict', '--checkpoint', url, str(tmp_path / 'x.png'), '--no-progress']) == 2
    line = _one_line(capsys.readouterr().err, 'predict')
    assert '127.0.0.1' in line and 'Connection refused' in line


def test_push_refused_connection_and_invalid_repo_id(tmp_path, monkeypatch, capsys):
    from tests.cli.test_push_cli import _converted_folder

    folder = _converted_folder(tmp_path / 'out')
    assert main(['push', str(folder), 'not a repo id!']) == 2
    assert 'is not a Hub repo id' in _one_line(capsys.readouterr().err, 'push')
    port = _closed_port()
    monkeypatch.setattr('huggingface_hub.constants.ENDPOINT', f'http://127.0.0.1:{port}')
    monkeypatch.setenv('HF_TOKEN', 'hf_test')
    assert main(['push', str(folder), 'org/name']) == 2
    line = _one_line(capsys.readouterr().err, 'push')
    assert f'127.0.0.1:{port}' in line and 'Connection refused' in line


def test_random_bytes_weights_do_not_suggest_unsafe_loading(tmp_path, capsys):
    (tmp_path / 'w.pth').write_bytes(os.urandom(4096))
    (tmp_path / 'x.png').write_bytes(b'')
    assert main(['predict', '--checkpoint', str(tmp_path / 'w.pth'), str(tmp_path / 'x.png')]) == 2
    line = _one_line(capsys.readouterr().err, 'predict')
    assert 'w.pth' in line and 'weights_only' not in line


def test_a_missing_split_names_the_command_s_flag(trained, capsys):
    data, run = trained
    assert main(['validate', '--data-dir', str(data), '--split', 'nosuch', '--checkpoint',
                 str(run / 'best.safetensors')]) == 2
    line = _one_line(capsys.readouterr().err, 'validate')
    assert 'no "nosuch" subfolder' in line and line.endswith('Choose the split with --split.')


def test_an_unreadable_class_folder_says_so(trained, monkeypatch, capsys):
    data, run = trained
    blocked = str(data / 'val' / 'b')
    scandir = os.scandir

    def guarded(path='.'):
        if os.fspath(path) == blocked:
            raise PermissionError(errno.EACCES, 'Permission denied', blocked)
        return scandir(path)

    monkeypatch.setattr(os, 'scandir', guarded)  # root reads any folder: chmod cannot show it here
    assert main(['validate', '--data-dir', str(data), '--checkpoint', str(run / 'best.safetensors')]) == 2
    line = _one_line(capsys.readouterr().err, 'validate')
    assert f'cannot read the folder {blocked}: Permission denied' in line
