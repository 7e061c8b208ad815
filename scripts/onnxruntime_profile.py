#!/usr/bin/env python3
"""Where onnxruntime spends an EPSANet inference, node by node, next to resnet50's.

Both models are exported as ``epsanet export --format onnx`` writes them (ours with its PSA branch convs in
the forms :func:`epsanet.export.optimize_for_onnxruntime` times as fastest here) and run by onnxruntime's
CPU session with ``SessionOptions.enable_profiling``. The profiler records every node of the optimized graph
(after onnxruntime's fusions and its NCHWc layout transform) with its kernel time and its input and output
shapes. Over ``--runs`` timed runs (after one warm-up run) the script prints, per model:

* the time per op type (ms per run, and its share);
* the convs by kind: dense 1x1, dense kxk, grouped, depthwise, with their multiply-adds (from the shapes
  the profiler records) and the rate they run at (GMAC/s), which says how far each kind is from the dense
  convs' rate;
* a bound, as ``scripts/training_bound.py`` gives for training: resnet50's node time without its dense kxk
  convs, plus all our kxk convs (stem and PSA branches) at resnet50's dense kxk rate, the PSA attention free.

    OMP_WAIT_POLICY=PASSIVE python scripts/onnxruntime_profile.py          # about a minute on 2 cores
    python scripts/onnxruntime_profile.py --runs 20 --batch-size 1
"""
import argparse
import json
import os
import tempfile
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch

import epsanet  # noqa: F401  (registers the models)
from epsanet.export import export_model, optimize_for_onnxruntime

CONV_OPS = ('Conv', 'FusedConv', 'NchwcConv')


def conv_kind(weight_shape: Sequence[int], in_chs: int) -> str:
    """``dense 1x1``, ``dense kxk``, ``depthwise`` or ``grouped`` for a conv with weight ``[O, I/g, kh, kw]``."""
    _, in_per_group, kh, kw = weight_shape
    groups = max(1, in_chs // in_per_group)
    if groups == 1:
        return 'dense 1x1' if kh * kw == 1 else 'dense kxk'
    return 'depthwise' if in_per_group == 1 else 'grouped'


def conv_macs(weight_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """Multiply-adds of a conv: every output element sums ``I/g * kh * kw`` products (NCHW or NCHWc output:
    the element count is the same product of dimensions)."""
    _, in_per_group, kh, kw = weight_shape
    n = 1
    for d in out_shape:
        n *= d
    return n * in_per_group * kh * kw


def _shapes(arg: List[Dict[str, List[int]]]) -> List[List[int]]:
    return [list(d.values())[0] for d in arg]


def profile(path: str, x, runs: int, threads: int) -> List[dict]:
    """The profiler's node events of ``runs`` runs (after one untimed warm-up run)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(os.path.dirname(path), 'profile')
    session = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
    session.run(None, feed)  # warm-up of the profiled session
    for _ in range(runs):
        session.run(None, feed)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    nodes = [e for e in events if e.get('cat') == 'Node' and e['name'].endswith('_kernel_time')]
    per_run = len(nodes) // (runs + 1)
    return nodes[per_run:]  # without the warm-up run


def summarize(events: List[dict], runs: int) -> Tuple[Dict[str, float], Dict[str, Tuple[float, float]]]:
    """``({op type: ms per run}, {conv kind: (ms per run, GMAC per run)})``."""
    by_op: Dict[str, float] = defaultdict(float)
    by_kind: Dict[str, List[float]] = defaultdict(lambda: [0., 0.])
    for e in events:
        args = e['args']
        ms = e['dur'] / 1000 / runs
        by_op[args['op_name']] += ms
        if args['op_name'] in CONV_OPS:
            inputs, outputs = _shapes(args['input_type_shape']), _shapes(args['output_type_shape'])
            kind = conv_kind(inputs[1], inputs[0][1])
            by_kind[kind][0] += ms
            by_kind[kind][1] += conv_macs(inputs[1], outputs[0]) / 1e9 / runs
    return dict(by_op), {k: (v[0], v[1]) for k, v in by_kind.items()}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='epsanet50')
    parser.add_argument('--baseline', default='resnet50')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--runs', type=int, default=10)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)

    size = (3, args.img_size, args.img_size)
    ours = optimize_for_onnxruntime(timm.create_model(args.model).eval(), size, args.batch_size, args.threads)
    models = {args.model: ours, args.baseline: timm.create_model(args.baseline).eval()}
    x = torch.randn(args.batch_size, *size, generator=torch.Generator().manual_seed(0)).numpy()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = os.path.join(tmp, f'{name}.onnx')
            export_model(model, path, format='onnx', batch_size=args.batch_size, input_size=size, check=False)
            results[name] = summarize(profile(path, x, args.runs, args.threads), args.runs)

    (ops_a, kinds_a), (ops_b, kinds_b) = results[args.model], results[args.baseline]
    total_a, total_b = sum(ops_a.values()), sum(ops_b.values())
    print(f'### onnxruntime per op type: batch {args.batch_size}, {args.img_size} px, {args.threads} threads, '
          f'{args.runs} runs ({_cpu()})\n')
    print(f'| op type | {args.model} ms | share | {args.baseline} ms | share |')
    print('|---|---:|---:|---:|---:|')
    for op in sorted(set(ops_a) | set(ops_b), key=lambda o: -(ops_a.get(o, 0) + ops_b.get(o, 0))):
        a, b = ops_a.get(op), ops_b.get(op)
        print(f'| {op} | {_ms(a)} | {_pct(a, total_a)} | {_ms(b)} | {_pct(b, total_b)} |')
    print(f'| total (node kernel time) | {total_a:.1f} | | {total_b:.1f} | |')
    only_ours = sum(v for k, v in ops_a.items() if k not in ops_b)
    print(f'\nOp types {args.baseline} does not have: {only_ours:.1f} ms per run, {100 * only_ours / total_a:.1f}% '
          f'of {args.model}\'s node time.\n')
    print('### Convs by kind\n')
    print(f'| kind | {args.model} ms | GMAC | GMAC/s | {args.baseline} ms | GMAC | GMAC/s |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    for kind in ('dense 1x1', 'dense kxk', 'grouped', 'depthwise'):
        a, b = kinds_a.get(kind), kinds_b.get(kind)
        print(f'| {kind} | {_kind(a)} | {_kind(b)} |')
    # bound: our other layers cost what the baseline's non-kxk layers cost; our kxk convs (stem and PSA branches,
    # dense, grouped or depthwise) run at the baseline's dense kxk rate; the PSA attention costs nothing
    dense_b = kinds_b.get('dense kxk', (0., 0.))
    kxk_macs = sum(kinds_a.get(k, (0., 0.))[1] for k in ('dense kxk', 'grouped', 'depthwise'))
    rate = dense_b[1] / dense_b[0] * 1000
    bound = total_b - dense_b[0] + kxk_macs / rate * 1000
    print(f'\nBound: {args.baseline}\'s node time without its dense kxk convs ({total_b - dense_b[0]:.1f} ms) plus '
          f'our kxk convs, dense, grouped and depthwise ({kxk_macs:.2f} GMAC), at its dense kxk rate ({rate:.0f} '
          f'GMAC/s): {bound:.1f} ms, ratio {total_b / bound:.2f} of {args.baseline}.')
    print(f'Measured: {total_a:.1f} ms vs {total_b:.1f} ms, ratio {total_b / total_a:.2f}.')


def _ms(v: Optional[float]) -> str:
    return '-' if v is None else f'{v:.1f}'


def _pct(v: Optional[float], total: float) -> str:
    return '-' if v is None else f'{100 * v / total:.1f}%'


def _kind(v: Optional[Tuple[float, float]]) -> str:
    if v is None:
        return '- | - | -'
    ms, gmac = v
    return f'{ms:.1f} | {gmac:.2f} | {gmac / ms * 1000:.0f}'


def _cpu() -> str:
    from epsanet.timing import environment

    env = environment()
    return f'{env["cpu"]}; onnxruntime keeps its own kernel dispatch'


if __name__ == '__main__':
    main()
