"""GPU readiness check: ``python scripts/gpu_check.py`` (or ``make gpu-check``) on a CUDA machine.

Checks, on one CUDA device, in a few minutes:

1. all four models in fp32 give the CPU's logits (the same weights and input);
2. one AMP training step in float16 with a ``GradScaler`` and one in bfloat16: finite loss, finite
   gradients, the weights move;
3. channels_last and ``torch.compile``: forward and backward agree with the eager NCHW model;
4. ``epsanet train`` for one epoch on a generated image folder;
5. ``epsanet extract`` on the device (its fastest form there: channels_last and AMP on CUDA, pinned
   memory, DataLoader workers) gives the CPU's features;
6. throughput (img/s, inference and training step) of EPSANet-50 against timm's resnet50 and the
   authors'-style reference network.

It prints one markdown table of what was checked and measured, with the GPU's name, and exits 1 if a
check failed. Without a CUDA device it prints "no CUDA device" and exits 0. ``--device cpu`` runs the
same code on the CPU at a tiny size, which is how CI keeps this script working without a GPU.
"""
import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Tuple

import timm
import torch
import torch.nn.functional as F

import epsanet
from epsanet.data.synthetic import write_image_folder
from epsanet.reference import authors_checkpoint, create_reference

Row = Tuple[str, str, str]  # check, result, detail


def _models(name: str, num_classes: int = 10) -> Tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ref = create_reference(name, num_classes=num_classes)
    ours = timm.create_model(name, num_classes=num_classes)
    ours.load_state_dict(epsanet.checkpoint_filter_fn(authors_checkpoint(ref), ours))
    return ours.eval(), ref.eval()


def check_fp32(device: torch.device, size: int) -> List[Row]:
    rows = []
    x = torch.randn(2, 3, size, size)
    for name in epsanet.MODEL_NAMES:
        model, _ = _models(name)
        with torch.no_grad():
            expected = model(x)
            got = model.to(device)(x.to(device)).cpu()
        diff = float((got - expected).abs().max())
        rows.append((f'{name} fp32 vs CPU', 'ok' if diff < 1e-3 else 'FAIL', f'max |Δlogits| {diff:.2e}'))
    return rows


def _train_step(model, x, y, dtype, scaler=None) -> Tuple[float, bool]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast(x.device.type, dtype=dtype):
        loss = F.cross_entropy(model(x), y)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    moved = any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    return float(loss.detach()), finite and moved


def check_amp(device: torch.device, size: int) -> List[Row]:
    rows = []
    x, y = torch.randn(4, 3, size, size, device=device), torch.randint(0, 10, (4,), device=device)
    dtypes = [('float16', torch.float16), ('bfloat16', torch.bfloat16)] if device.type == 'cuda' else \
        [('bfloat16', torch.bfloat16)]
    for label, dtype in dtypes:
        model = _models('epsanet50')[0].to(device).train()
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        loss, ok = _train_step(model, x, y, dtype, scaler)
        ok = ok and loss == loss
        rows.append((f'AMP {label} training step' + (' + GradScaler' if scaler else ''), 'ok' if ok else 'FAIL',
                     f'loss {loss:.3f}'))
    return rows


def _forward_backward(model, x) -> Tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.square().mean().backward()
    return out.detach().float(), x.grad.float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check_channels_last_and_compile(device: torch.device, size: int, backend: str = 'inductor') -> List[Row]:
    rows = []
    # eval mode: with batch statistics of a tiny batch, float32 rounding grows through the network's
    # BatchNorms into ~1e-2 relative differences of the input gradient, whatever the memory format
    model = _models('epsanet50')[0].to(device).eval()
    x = torch.randn(4, 3, size, size, device=device)
    expected = _forward_backward(copy.deepcopy(model), x)
    variants: List[Tuple[str, Callable[[], torch.nn.Module], torch.Tensor]] = [
        ('channels_last', lambda: copy.deepcopy(model).to(memory_format=torch.channels_last),
         x.to(memory_format=torch.channels_last)),
        ('torch.compile', lambda: torch.compile(copy.deepcopy(model), backend=backend), x),
    ]
    for label, make, inp in variants:
        try:
            out, grad = _forward_backward(make(), inp)
            diff = max(_relative(out, expected[0]), _relative(grad, expected[1]))
            rows.append((f'{label} forward + backward', 'ok' if diff < 1e-2 else 'FAIL',  # TF32 convs on CUDA
                         f'max |Δ| / max |value| (output, input grad) {diff:.2e}'))
        except Exception as e:  # report, keep checking
            rows.append((f'{label} forward + backward', 'FAIL', f'{type(e).__name__}: {e}'.splitlines()[0][:120]))
    return rows


def check_train_cli(device: torch.device, size: int) -> List[Row]:
    from epsanet.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        data = write_image_folder(Path(tmp) / 'data', splits={'train': 8, 'val': 4}, size=size)
        args = ['train', '--data-dir', str(data), '--output', str(Path(tmp) / 'run'), '--model', 'epsanet50',
                '--img-size', str(size), '--epochs', '1', '--batch-size', '8', '--workers', '0',
                '--device', device.type, '--no-progress']
        t0 = time.perf_counter()
        code = main(args)
        seconds = time.perf_counter() - t0
        written = (Path(tmp) / 'run' / 'last.safetensors').is_file()
    ok = code == 0 and written
    return [('`epsanet train` 1 epoch', 'ok' if ok else 'FAIL', f'exit {code}, {seconds:.1f} s')]


def check_extract(device: torch.device, size: int) -> List[Row]:
    from epsanet.features import ExtractConfig, extract, load

    with tempfile.TemporaryDirectory() as tmp:
        data = write_image_folder(Path(tmp) / 'data', splits={'val': 8}, size=size) / 'val'
        common = dict(data_dir=str(data), img_size=size, batch_size=4, workers=2, progress=False)
        t0 = time.perf_counter()
        extract(ExtractConfig(output=str(Path(tmp) / 'dev'), device=device.type, **common))
        seconds = time.perf_counter() - t0
        extract(ExtractConfig(output=str(Path(tmp) / 'cpu'), device='cpu', **common))
        a, b = (f.rows(0, len(f))['features'].float() for f in (load(Path(tmp) / n) for n in ('dev', 'cpu')))
    cos = F.cosine_similarity(a, b, dim=1).min().item() if a.shape == b.shape else float('nan')
    ok = a.shape == b.shape and cos > 0.999  # AMP on CUDA: close, not equal
    return [('`epsanet extract` on the device vs CPU', 'ok' if ok else 'FAIL',
             f'{a.shape[0]} rows, min cosine similarity {cos:.5f}, {seconds:.1f} s')]


def _throughput(model, x, train: bool, steps: int) -> float:
    sync = torch.cuda.synchronize if x.device.type == 'cuda' else (lambda: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01) if train else None
    y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def step():
        if train:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                model(x)
    model.train(train)
    for _ in range(2):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * x.shape[0] / (time.perf_counter() - t0)


def throughput_rows(device: torch.device, size: int, batch: int, steps: int) -> List[Row]:
    ours, ref = _models('epsanet50', num_classes=1000)
    candidates = {'epsanet50': ours, 'reference': ref, 'resnet50': timm.create_model('resnet50')}
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    rows = []
    for name, model in candidates.items():
        model = model.to(device).to(memory_format=torch.channels_last)
        for amp in (False, True) if device.type == 'cuda' else (False,):
            label = 'AMP fp16' if amp else 'fp32'
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                infer = _throughput(model, x, False, steps)
                train = _throughput(model, x, True, steps)
            rows.append((f'{name} {label} channels_last, batch {batch}, {size} px', 'measured',
                         f'inference {infer:.0f} img/s, training {train:.0f} img/s'))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda', help='cuda (default) or cpu (a tiny CI run of the same code)')
    parser.add_argument('--img-size', type=int, default=None, help='default: 224 on CUDA, 32 on CPU')
    parser.add_argument('--batch-size', type=int, default=None, help='throughput batch (default 64 on CUDA, 2 on CPU)')
    parser.add_argument('--steps', type=int, default=None, help='timed steps per throughput row (default 20 / 1)')
    parser.add_argument('--compile-backend', default='inductor',
                        help="torch.compile backend of check 3 (CI's CPU run: aot_eager, which skips inductor's "
                             'C++ code generation: a minute on 2 cores)')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        print('no CUDA device: nothing to check (run this on a machine with a GPU).')
        return 0
    cuda = device.type == 'cuda'
    size = args.img_size or (224 if cuda else 32)
    small = 64  # correctness checks need no full-size images (and CPU bf16 has a known bug on 1x1 maps)
    gpu = torch.cuda.get_device_name(device) if cuda else 'CPU (CI dry run)'
    rows: List[Row] = []
    compile_check = lambda d, s: check_channels_last_and_compile(d, s, args.compile_backend)  # noqa: E731
    for name, check in (('fp32', check_fp32), ('amp', check_amp), ('channels_last and compile', compile_check),
                        ('train', check_train_cli), ('extract', check_extract)):
        t0 = time.perf_counter()
        rows += check(device, small)
        print(f'{name}: {time.perf_counter() - t0:.1f} s', file=sys.stderr)
    rows += throughput_rows(device, size, args.batch_size or (64 if cuda else 2), args.steps or (20 if cuda else 1))
    print(f'\n### GPU check: {gpu}, torch {torch.__version__}, timm {timm.__version__}\n')
    print('| check | result | detail |\n|---|---|---|')
    for check, result, detail in rows:
        print(f'| {check} | {result} | {detail} |')
    failed = [r for r in rows if r[1] == 'FAIL']
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
