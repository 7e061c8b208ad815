"""Fixtures for the weights tests: real checkpoints and HTTP servers on 127.0.0.1.

``FileServer`` serves bytes at paths like a plain web server; ``HubServer`` answers the Hugging Face
Hub download protocol (``/{repo}/resolve/{revision}/{filename}`` with ``X-Repo-Commit`` and ``ETag``),
so the real ``huggingface_hub.hf_hub_download`` runs against it.
"""
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from epsanet.reference import authors_checkpoint, create_reference

COMMIT = 'a' * 40


class _Handler(BaseHTTPRequestHandler):
    server_version = 'loopback'

    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        self._respond(body=False)

    def do_GET(self):
        self._respond(body=True)

    def _respond(self, body: bool):
        self.server.requests.append((self.command, self.path))
        status, headers, data = self.server.route(self.path)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body and data:
            self.wfile.write(data)
            self.wfile.flush()


class _Server:
    def __init__(self):
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
        self.httpd.route = self.route
        self.httpd.requests = []
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.httpd.server_address[1]}'

    @property
    def requests(self):
        return self.httpd.requests

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class FileServer(_Server):
    """Serves ``files[path] = bytes``; ``truncate[path] = n`` sends only n bytes but the full Content-Length."""

    def __init__(self):
        super().__init__()
        self.files, self.truncate = {}, {}

    def route(self, path):
        if path not in self.files:
            return 404, {'Content-Length': '0'}, b''
        data = self.files[path]
        sent = data[:self.truncate[path]] if path in self.truncate else data
        return 200, {'Content-Length': str(len(data)), 'Connection': 'close'}, sent


class HubServer(_Server):
    """A minimal Hub: ``repos[repo_id][filename] = bytes``."""

    def __init__(self):
        super().__init__()
        self.repos = {}

    def route(self, path):
        parts = path.lstrip('/').split('/')
        if len(parts) < 5 or parts[2] != 'resolve':
            return 404, {'Content-Length': '0'}, b''
        repo_id, filename = '/'.join(parts[:2]), '/'.join(parts[4:])
        if repo_id not in self.repos:
            return 404, {'X-Error-Code': 'RepoNotFound', 'Content-Length': '0'}, b''
        files = self.repos[repo_id]
        if filename not in files:
            return 404, {'X-Error-Code': 'EntryNotFound', 'X-Repo-Commit': COMMIT, 'Content-Length': '0'}, b''
        data = files[filename]
        return 200, {'X-Repo-Commit': COMMIT, 'ETag': f'"{hashlib.sha256(data).hexdigest()}"',
                     'Content-Length': str(len(data))}, data


@pytest.fixture
def file_server():
    server = FileServer()
    yield server
    server.close()


@pytest.fixture
def hub_server(monkeypatch, tmp_path):
    """Points huggingface_hub (and so timm) at a loopback Hub with a fresh cache in tmp_path."""
    from huggingface_hub import constants

    server = HubServer()
    monkeypatch.setattr(constants, 'ENDPOINT', server.url)
    template = server.url + '/{repo_id}/resolve/{revision}/{filename}'
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', template)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub-cache'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    yield server
    server.close()


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, as huggingface_hub reads it (constant) and as set in the environment."""
    from huggingface_hub import constants

    def enable():
        monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
        monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    return enable


@pytest.fixture(scope='session')
def small_reference():
    """The authors'-style EPSANet-50 (Small) reference network, seeded, in eval mode."""
    torch.manual_seed(0)
    return create_reference('epsanet50').eval()


@pytest.fixture(scope='session')
def authors_file(tmp_path_factory, small_reference):
    """``checkpoint.pth.tar`` laid out exactly as the authors' training script saves it."""
    path = tmp_path_factory.mktemp('authors') / 'checkpoint.pth.tar'
    torch.save(authors_checkpoint(small_reference), path)
    return path


@pytest.fixture(scope='session')
def image():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='session')
def reference_logits(small_reference, image):
    with torch.no_grad():
        return small_reference(image)


@pytest.fixture(scope='session')
def converted_dir(tmp_path_factory, authors_file):
    """``epsanet convert`` of the authors' checkpoint (shared: converting takes several seconds)."""
    from epsanet.weights.convert import convert

    out = tmp_path_factory.mktemp('converted') / 'epsanet50-test'
    result = convert(authors_file, out, tag='test', license='mit', provenance={'trained_by': 'test fixture'},
                     progress=False)
    return out, result
