"""The autotuner: it times the candidates once per shape and CPU, keeps the fastest, can be forced."""
import json

import pytest
import torch

from epsanet.optimize import autotune, conv_forms
from epsanet.optimize.conv_forms import ConvShape

SHAPE = ConvShape(2, 16, 8, 9, 9, 7, 1, 3, 1, 4, 'float32', False)


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(autotune.ENV_FORMS, raising=False)
    monkeypatch.setenv(autotune.ENV_CACHE, str(tmp_path / 'cache'))
    autotune.clear_cache()
    yield
    autotune.clear_cache()


def _tensors():
    x = torch.randn(2, 16, 9, 9)
    w = torch.randn(8, 4, 7, 7)
    return x, w, torch.randn(2, 8, 9, 9)


def test_keeps_the_fastest_form_and_times_each_shape_once(monkeypatch):
    fake = {'grouped_nchw': 3.0, 'grouped_cl': 2.0, 'depthwise_nchw': 1.0, 'depthwise_cl': 4.0}
    calls = []

    def fake_run(form, *args):
        calls.append(form)
        return fake[form]
    monkeypatch.setattr(conv_forms, 'run_forward', fake_run)
    monkeypatch.setattr(autotune, '_time', lambda fn, repeats=3: fn())
    x, w, _ = _tensors()
    assert autotune.plan_forward(SHAPE, x, w) == 'depthwise_nchw'
    assert sorted(calls) == sorted(fake)
    assert autotune.plan_forward(SHAPE, x, w) == 'depthwise_nchw'
    assert len(calls) == len(fake)  # cached: not timed again
    assert autotune.cache_info() == [{'shape': SHAPE, 'forward': 'depthwise_nchw'}]


def test_backward_keeps_the_fastest_gradient_forms(monkeypatch):
    monkeypatch.setattr(conv_forms, 'input_grad', lambda form, *a: {'nchw': 2.0, 'cl': 1.0}[form])
    monkeypatch.setattr(conv_forms, 'weight_grad', lambda form, *a: {'nchw': 2.0, 'cl': 3.0}[form])
    monkeypatch.setattr(autotune, '_time', lambda fn, repeats=3: fn())
    x, w, g = _tensors()
    assert autotune.plan_backward(SHAPE, g, x, w) == ('cl', 'nchw')


def test_a_plan_is_per_cpu(monkeypatch):
    x, w, _ = _tensors()
    timings = iter([1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0])
    monkeypatch.setattr(autotune, '_time', lambda fn, repeats=3: next(timings))
    assert autotune.plan_forward(SHAPE, x, w) == 'grouped_nchw'
    monkeypatch.setattr(autotune, 'cpu_signature', lambda: ('another CPU', 'AVX2', 2, torch.__version__))
    assert autotune.plan_forward(SHAPE, x, w) == 'depthwise_cl'  # measured again on the other CPU


def test_cpu_signature_names_the_cpu_and_isa():
    name, isa, threads, version = autotune.cpu_signature()
    assert name and isa == torch.backends.cpu.get_cpu_capability()
    assert threads == torch.get_num_threads() and version == torch.__version__


def test_forced_forms_skip_the_timing(monkeypatch):
    monkeypatch.setenv(autotune.ENV_FORMS, 'depthwise_cl,cl,nchw')
    monkeypatch.setattr(autotune, '_time', lambda *a, **k: pytest.fail('timed although forced'))
    x, w, g = _tensors()
    assert autotune.plan_forward(SHAPE, x, w) == 'depthwise_cl'
    assert autotune.plan_backward(SHAPE, g, x, w) == ('cl', 'nchw')


def test_a_bad_forced_value_says_what_is_allowed(monkeypatch):
    monkeypatch.setenv(autotune.ENV_FORMS, 'fast')
    x, w, _ = _tensors()
    with pytest.raises(ValueError, match='FORWARD,INPUT_GRAD,WEIGHT_GRAD'):
        autotune.plan_forward(SHAPE, x, w)


def test_real_timing_returns_an_applicable_form():
    x, w, g = _tensors()
    assert autotune.plan_forward(SHAPE, x, w) in conv_forms.forward_candidates(SHAPE)
    gx, gw = autotune.plan_backward(SHAPE, g, x, w)
    assert gx in conv_forms.INPUT_GRAD_FORMS and gw in conv_forms.WEIGHT_GRAD_FORMS


def test_plans_are_kept_on_disk_for_the_next_process(monkeypatch, tmp_path):
    x, w, g = _tensors()
    first = autotune.plan_forward(SHAPE, x, w), autotune.plan_backward(SHAPE, g, x, w)
    assert autotune.cache_file() == tmp_path / 'cache' / 'autotune.json' and autotune.cache_file().is_file()
    autotune.clear_cache()  # a new process: nothing in memory, the file stays
    monkeypatch.setattr(autotune, '_time', lambda *a, **k: pytest.fail('timed again'))
    assert (autotune.plan_forward(SHAPE, x, w), autotune.plan_backward(SHAPE, g, x, w)) == first


def test_a_damaged_cache_file_is_measured_again(monkeypatch, caplog):
    path = autotune.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text('{not json')
    x, w, _ = _tensors()
    assert autotune.plan_forward(SHAPE, x, w) in conv_forms.forward_candidates(SHAPE)
    assert 'Ignoring the autotune cache' in caplog.text
    assert json.loads(path.read_text())  # rewritten whole


def test_the_disk_cache_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(autotune.ENV_CACHE, 'none')
    assert autotune.cache_file() is None
    x, w, _ = _tensors()
    assert autotune.plan_forward(SHAPE, x, w) in conv_forms.forward_candidates(SHAPE)
