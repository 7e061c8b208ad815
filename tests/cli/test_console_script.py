"""Every subcommand once as a user runs it: the installed ``epsanet`` console script (the one pip put next to
this Python), a real process with real files in and out.

One chain of files: ``train`` writes weights that ``validate``, ``predict``, ``extract``, ``explain``, ``export``,
``quantize`` and ``convert`` read; ``push`` uploads the converted folder to a Hub server on 127.0.0.1 that
speaks the part of the Hub's HTTP API ``huggingface_hub``'s real client uses for it (create the repo, ask the
upload mode, commit). Where one process's result can be checked against another's, it is: validate's top-1
against train's, predict's labels against validate's top-1, the export's logits against PyTorch's.
"""
import base64
import csv
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from epsanet.data import write_image_folder

pytestmark = pytest.mark.slow

SCRIPT = Path(sys.executable).parent / 'epsanet'
CLASSES = ['a', 'b', 'c']


def epsanet(*args, cwd=None, env=None, expect=0):
    """Run the console script; return the finished process (stdout and stderr as text)."""
    assert SCRIPT.is_file(), f'{SCRIPT} is missing: install the package (pip install -e .)'
    proc = subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, OMP_WAIT_POLICY='PASSIVE', **(env or {})), timeout=600)
    assert proc.returncode == expect, f'epsanet {" ".join(map(str, args))}: exit {proc.returncode}\n' \
                                      f'{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}'
    return proc


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('data') / 'images', classes=CLASSES,
                              splits={'train': 2, 'val': 2})


@pytest.fixture(scope='module')
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp('train') / 'run'
    proc = epsanet('train', '--data-dir', data, '--output', out, '--model', 'epsanet50', '--img-size', 32, '-b', 3,
                   '--epochs', 1, '--lr', 0.01, '--opt', 'sgd', '--warmup-epochs', 0, '--crop-pct', 1, '--workers', 0,
                   '--no-progress')
    return out, proc


def test_train(run):
    out, proc = run
    assert {'best.safetensors', 'last.safetensors', 'last.state.pth', 'metrics.json', 'args.yaml'} <= \
        {p.name for p in out.iterdir()}
    rows = json.loads((out / 'metrics.json').read_text())
    assert [r['epoch'] for r in rows] == [1] and round(rows[0]['val_top1'] * 6 / 100, 6) in range(7)
    assert 'epoch 1/1: train loss' in proc.stderr


def test_validate_scores_the_weights_as_train_did(run, data, tmp_path):
    out, _ = run
    results = tmp_path / 'val.json'
    epsanet('validate', '--checkpoint', out / 'best.safetensors', '--data-dir', data, '--split', 'val', '--workers', 0,
            '--no-progress', '--results-file', results)
    got = json.loads(results.read_text())
    top1 = got['top1'] if 'top1' in got else got['metrics']['top1']
    assert top1 == pytest.approx(json.loads((out / 'metrics.json').read_text())[0]['val_top1'])


def test_predict_labels_agree_with_validate(run, data, tmp_path):
    out, _ = run
    results = tmp_path / 'pred.csv'
    epsanet('predict', '--checkpoint', out / 'best.safetensors', data / 'val', '--results-file', results,
            '--workers', 0, '--no-progress')
    rows = list(csv.DictReader(results.open()))
    assert sorted(Path(r['filename']).name for r in rows) == sorted(p.name for p in (data / 'val').rglob('*.png'))
    assert {r['label'] for r in rows} <= set(CLASSES)
    correct = sum(r['label'] == Path(r['filename']).parent.name for r in rows)
    top1 = json.loads((out / 'metrics.json').read_text())[0]['val_top1']
    assert 100 * correct / len(rows) == pytest.approx(top1)


def test_extract(run, data, tmp_path):
    from epsanet.features import load

    out, _ = run
    epsanet('extract', '--checkpoint', out / 'best.safetensors', '--data-dir', data / 'val',
            '--output', tmp_path / 'features.npy', '--workers', 0, '--no-progress')
    features = load(tmp_path / 'features.npy')
    assert len(features) == 6 and features.shape(features.keys()[0]) == (6, 2048)  # epsanet50's pooled pre-logits


def test_explain(run, data, tmp_path):
    out, _ = run
    image = data / 'val' / 'b' / '0.png'
    epsanet('explain', '--checkpoint', out / 'best.safetensors', image, '--output-dir', tmp_path / 'why',
            '--no-progress')
    assert (tmp_path / 'why' / '0.png').read_bytes()[:4] == b'\x89PNG'
    arrays = np.load(tmp_path / 'why' / '0.npz')
    assert arrays['cam'].shape == (32, 32) and arrays['probs'].shape == (3,)
    assert arrays['probs'].sum() == pytest.approx(1, abs=1e-5) and str(arrays['target_label']) in CLASSES


def test_export_reproduces_the_pytorch_logits(run, tmp_path):
    import onnxruntime as ort
    import timm

    out, _ = run
    onnx_file = tmp_path / 'model.onnx'
    # one SGD epoch on 6 images leaves logits in the hundreds, where float32 rounding through 50 layers exceeds the
    # built-in check's default rtol (1e-5) now and then; the check runs at the tolerance this test asserts below
    epsanet('export', 'epsanet50', '--weights', out / 'best.safetensors', '--num-classes', 3, '--img-size', 32,
            '--format', 'onnx', '-o', onnx_file, '--onnx-forms', 'plain', '--rtol', 1e-3)
    model = timm.create_model('epsanet50', num_classes=3).eval()
    model.load_state_dict(load_file(out / 'best.safetensors'))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(onnx_file), providers=['CPUExecutionProvider'])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-3, atol=1e-4)


def test_quantize(run, data, tmp_path):
    import onnx

    out, _ = run
    int8, results = tmp_path / 'model-int8.onnx', tmp_path / 'q.json'
    epsanet('quantize', '--checkpoint', out / 'best.safetensors', '--data-dir', data, '-o', int8,
            '--calibration-images', 3, '--speed-reps', 1, '--speed-batch-size', 2, '--onnx-forms', 'plain',
            '--workers', 0, '--no-progress', '--results-file', results)
    assert {'QuantizeLinear', 'DequantizeLinear'} <= {n.op_type for n in onnx.load(str(int8)).graph.node}
    got = json.loads(results.read_text())
    assert got['calibration_images'] == 3 and got['eval_images'] == 6


@pytest.fixture(scope='module')
def converted(run, tmp_path_factory):
    out, _ = run
    folder = tmp_path_factory.mktemp('convert') / 'hub'
    epsanet('convert', out / 'best.safetensors', folder, '--model', 'epsanet50', '--tag', 'test_abc')
    return folder


def test_convert_writes_a_hub_folder(run, converted):
    out, _ = run
    assert {'model.safetensors', 'config.json', 'README.md', 'model.safetensors.sha256', 'registry_entry.json'} <= \
        {p.name for p in converted.iterdir()}
    digest = hashlib.sha256((converted / 'model.safetensors').read_bytes()).hexdigest()
    assert digest in (converted / 'model.safetensors.sha256').read_text()
    assert json.loads((converted / 'registry_entry.json').read_text())['sha256'] == digest
    source, written = load_file(out / 'best.safetensors'), load_file(converted / 'model.safetensors')
    assert source.keys() <= written.keys() and all(torch.equal(source[k], written[k]) for k in source)
    assert json.loads((converted / 'config.json').read_text())['num_classes'] == 3


# ---- a Hub on 127.0.0.1 -------------------------------------------------------------------------------------------

class _Hub(BaseHTTPRequestHandler):
    """The Hub endpoints ``huggingface_hub``'s ``create_repo`` + ``upload_folder`` call (create, validate the model
    card's metadata, preupload, commit); every file is stored as a
    regular (non-LFS) blob, whose bytes come in the commit itself. Anything else is answered 404 and recorded."""
    repos, commits, cards, unknown, tokens = {}, [], [], [], set()

    def log_message(self, *args):  # no request lines on stderr
        pass

    def _reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get('Content-Length', 0)))

    def do_POST(self):
        self.tokens.add(self.headers.get('Authorization'))
        endpoint = f'http://{self.headers["Host"]}'
        path = self.path.split('?')[0]
        body = self._body()
        if path == '/api/repos/create':
            spec = json.loads(body)
            repo_id = f'{spec["organization"]}/{spec["name"]}' if spec.get('organization') else spec['name']
            self.repos[repo_id] = spec
            return self._reply(200, {'url': f'{endpoint}/{repo_id}', 'name': repo_id})
        if path == '/api/validate-yaml':  # the model card's metadata block must be YAML
            content = json.loads(body)['content']
            try:
                self.cards.append(yaml.safe_load(content.split('---')[1]))
            except (IndexError, yaml.YAMLError) as e:
                return self._reply(400, {'error': f'invalid model card metadata: {e}'})
            return self._reply(200, {'errors': [], 'warnings': []})
        parts = path.strip('/').split('/')  # api models ORG NAME (preupload|commit) REVISION
        if len(parts) == 6 and parts[:2] == ['api', 'models'] and f'{parts[2]}/{parts[3]}' in self.repos:
            repo_id, action = f'{parts[2]}/{parts[3]}', parts[4]
            if action == 'preupload':
                files = json.loads(body)['files']
                return self._reply(200, {'files': [{'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False}
                                                   for f in files]})
            if action == 'commit':
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                files = {item['value']['path']: base64.b64decode(item['value']['content'])
                         for item in lines if item['key'] == 'file'}
                header = next(item['value'] for item in lines if item['key'] == 'header')
                oid = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()))
                                   .encode()).hexdigest()
                self.commits.append(dict(repo_id=repo_id, revision=parts[5], summary=header['summary'], files=files,
                                         oid=oid))
                return self._reply(200, {'commitUrl': f'{endpoint}/{repo_id}/commit/{oid}', 'commitOid': oid,
                                         'pullRequestUrl': None})
        self.unknown.append(('POST', self.path))
        self._reply(404, {'error': f'not served by this test Hub: POST {self.path}'})

    def do_GET(self):
        self.unknown.append(('GET', self.path))
        self._reply(404, {'error': f'not served by this test Hub: GET {self.path}'})

    do_HEAD = do_GET


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(('127.0.0.1', 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()


def test_push_uploads_the_folder_to_a_hub(converted, hub, tmp_path):
    server, endpoint = hub
    env = dict(HF_ENDPOINT=endpoint, HF_TOKEN='hf_testtoken', HF_HUB_OFFLINE='0', HF_HUB_DISABLE_TELEMETRY='1',
               HF_HOME=str(tmp_path / 'hf'), NO_PROXY='127.0.0.1', no_proxy='127.0.0.1')
    proc = epsanet('push', converted, 'my-org/epsanet50-test', '--private', env=env)
    handler = server.RequestHandlerClass
    assert handler.unknown == []
    spec = handler.repos['my-org/epsanet50-test']
    assert spec.get('private') is True or spec.get('visibility') == 'private'  # (newer clients send visibility)
    assert handler.tokens == {'Bearer hf_testtoken'}
    assert handler.cards[0]['library_name'] == 'timm'  # the model card's metadata was validated
    [commit] = handler.commits
    local = {p.name: p.read_bytes() for p in converted.iterdir() if p.is_file()}
    assert commit['repo_id'] == 'my-org/epsanet50-test' and commit['revision'] == 'main'
    assert {k: hashlib.sha256(v).hexdigest() for k, v in commit['files'].items()} == \
        {k: hashlib.sha256(v).hexdigest() for k, v in local.items()}  # every file, byte for byte
    printed = proc.stdout
    entry = json.loads(printed[printed.index('{'):printed.rindex('}') + 1])
    assert entry['source'] == {'hf_hub_id': 'my-org/epsanet50-test', 'filename': 'model.safetensors',
                               'revision': commit['oid']}  # pinned to the commit the Hub answered
    assert entry['sha256'] == hashlib.sha256(commit['files']['model.safetensors']).hexdigest()
    assert f'Uploaded to {endpoint}/my-org/epsanet50-test/commit/{commit["oid"]}' in printed


def test_models_lists_every_variant_with_its_parameter_count():
    import timm

    import epsanet as package

    proc = epsanet('models')
    rows = {line.split('|')[1].strip(): line.split('|')[2].strip() for line in proc.stdout.splitlines()
            if line.startswith('| epsanet')}
    assert list(rows) == list(package.MODEL_NAMES)
    model = timm.create_model('epsanet50', device='meta')
    assert rows['epsanet50'] == f'{sum(p.numel() for p in model.parameters()):,}'


def test_benchmark(tmp_path):
    report = tmp_path / 'bench.json'
    epsanet('benchmark', '--model', 'epsanet50', '--batch-size', 1, '--img-size', 32, '--modes', 'infer',
            '--formats', 'nchw', '--dtypes', 'fp32', '--reps', 1, '--no-memory', '--runtime', 'torch',
            '--baselines', '--batch-sweep', '--img-sweep', '--json', report, '--markdown', tmp_path / 'bench.md',
            '--no-progress')
    rows = json.loads(report.read_text())['rows']
    assert 'epsanet50' in {r['candidate'] for r in rows} and all(r['img_per_s'] > 0 for r in rows)
    assert '| epsanet50 | infer | nchw | fp32 | 1 | 32 |' in (tmp_path / 'bench.md').read_text()
