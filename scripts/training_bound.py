#!/usr/bin/env python3
"""How fast an EPSANet training step could be on this machine, from resnet50's own measured parts.

EPSANet-50 is resnet50 with each bottleneck's 3x3 conv replaced by a PSA layer: the stem, the 1x1
convs, every BatchNorm and ReLU, the shortcuts and the classifier are the same layers at the same
shapes. Run with PyTorch's kernels, as resnet50 runs them, they cost resnet50's step *without its 3x3
convs* (measured here by replacing them with identity, or a strided pick for the downsampling blocks);
our step is that plus the PSA layers.

The bound assumes the PSA layers cost nothing but their branch convs, and that those run at the same
speed per multiply-add as resnet50's dense 3x3 convs. Both are optimistic: the attention, concatenation
and gradient accumulation cost time, and grouped convs with 5x5 to 9x9 kernels and few channels per
group run fewer multiply-adds per second than a dense 3x3 conv at most shapes.

    shared = step(resnet50 without its 3x3 convs)
    bound  = shared + (PSA branch MACs / resnet50's 3x3 MACs) * (step(resnet50) - shared)

It times, interleaved in one process as ``epsanet benchmark`` does (its timer and training step):
resnet50 and resnet50 without its 3x3 convs, the authors'-style reference network, all channels_last
(their faster format), and ours with ``optimize_for_training`` fed NCHW input. It prints the step
times, the bound and what the bound means for the targets of ``epsanet benchmark`` (training >= 1.5x
the reference, >= 0.9x resnet50).

    OMP_WAIT_POLICY=PASSIVE python scripts/training_bound.py            # about a minute on 2 cores
    python scripts/training_bound.py --model epsanet101 --baseline resnet101 --reps 5
"""
import argparse
from typing import Callable, Dict, Optional, Sequence

import timm
import torch
from timm.models.resnet import Bottleneck
from torch import nn

from epsanet.benchmark import _make_step, build_candidates, optimized_for
from epsanet.layers import PyramidSqueezeAttention
from epsanet.models.flops import count_conv_macs
from epsanet.timing import REFERENCE, Setting, time_steps

WITHOUT_3X3 = 'without 3x3 convs'


def drop_3x3_convs(model: nn.Module) -> nn.Module:
    """``model`` (a timm bottleneck ResNet) with every bottleneck's 3x3 conv replaced by identity, or by a
    strided pick (``AvgPool2d(1, stride)``) where it downsamples (planes -> planes either way). In place."""
    blocks = [b for b in model.modules() if isinstance(b, Bottleneck)]
    if not blocks:
        raise ValueError(f'{type(model).__name__} has no timm Bottleneck blocks; the bound needs a bottleneck '
                         'ResNet such as resnet50 or resnet101.')
    for block in blocks:
        stride = block.conv2.stride
        block.conv2 = nn.Identity() if stride == (1, 1) else nn.AvgPool2d(1, stride)
    return model


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='epsanet50', help='our model (default: epsanet50)')
    parser.add_argument('--baseline', default='resnet50', help='the ResNet it is built on (default: resnet50)')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--reps', type=int, default=7, help='timed steps per candidate (median counts)')
    args = parser.parse_args(argv)

    with torch.device('meta'):
        ours_meta, base_meta = timm.create_model(args.model), timm.create_model(args.baseline)
    psa_convs = {c for m in ours_meta.modules() if isinstance(m, PyramidSqueezeAttention) for c in m.convs}
    dense_convs = {b.conv2 for b in base_meta.modules() if isinstance(b, Bottleneck)}
    psa_macs = count_conv_macs(ours_meta, lambda m: m in psa_convs, args.img_size)
    dense_macs = count_conv_macs(base_meta, lambda m: m in dense_convs, args.img_size)
    flop_ratio = psa_macs / dense_macs

    candidates = build_candidates(args.model, baselines=(args.baseline,))
    candidates[f'{args.baseline} {WITHOUT_3X3}'] = drop_3x3_convs(timm.create_model(args.baseline).eval())
    channels_last = Setting('train', args.batch_size, args.img_size, 'channels_last')
    nchw = Setting('train', args.batch_size, args.img_size, 'nchw')
    steps: Dict[str, Callable] = {}
    for name, model in candidates.items():
        if name == args.model:
            steps[name] = _make_step(optimized_for(model, 'train'), nchw, False, 0)[0]
        else:
            steps[name] = _make_step(model, channels_last, False, 0)[0]
    print(f'Timing {len(steps)} training steps, {args.reps} times each, interleaved '
          f'(batch {args.batch_size}, {args.img_size} px, {torch.get_num_threads()} threads)...', flush=True)
    rows = {r.candidate: r for r in time_steps(steps, channels_last, args.reps, warmup=2)}

    full = rows[args.baseline].median_ms
    shared = rows[f'{args.baseline} {WITHOUT_3X3}'].median_ms
    bound = shared + flop_ratio * (full - shared)
    print('\n| training step | ms | img/s |\n|---|---:|---:|')
    labels = {args.model: f'{args.model}, optimize_for_training, NCHW input',
              REFERENCE: 'reference, channels_last', args.baseline: f'{args.baseline}, channels_last',
              f'{args.baseline} {WITHOUT_3X3}': f'{args.baseline} {WITHOUT_3X3}, channels_last'}
    for name, label in labels.items():
        r = rows[name]
        print(f'| {label} | {r.median_ms:.0f} | {r.img_per_s:.2f} |')
    bound_speed = args.batch_size * 1000. / bound
    print(f'| bound for {args.model}: the shared part + {flop_ratio:.2f} x the 3x3 convs\' time | {bound:.0f} '
          f'| {bound_speed:.2f} |')
    ref, base = rows[REFERENCE].img_per_s, rows[args.baseline].img_per_s
    ours = rows[args.model].img_per_s
    print(f'\nPSA branch convs: {psa_macs / 1e9:.2f} GMACs per image, {args.baseline}\'s 3x3 convs '
          f'{dense_macs / 1e9:.2f} (ratio {flop_ratio:.2f}).')
    print(f'The shared part is {shared / full:.0%} of {args.baseline}\'s step.')
    print(f'Bound: {bound_speed / ref:.2f}x the reference (target 1.5x), {bound_speed / base:.2f}x {args.baseline} '
          f'(target 0.9x).')
    print(f'Measured: {ours / ref:.2f}x the reference, {ours / base:.2f}x {args.baseline}; '
          f'{ours / bound_speed:.0%} of the bound.')


if __name__ == '__main__':
    main()
