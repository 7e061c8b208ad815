"""``epsanet benchmark``: speed and memory of an EPSANet against the reference and timm ResNets."""
import argparse
import os

from ..app.flags import Bound
from ..app.outputs import add_overwrite_argument, check_output_file

COMMAND = 'benchmark'
# checked before any work, with the shared bounds of --batch-size and --img-size (epsanet.app.flags.BOUNDS)
BOUNDS = dict(img_size=Bound(ge=32), img_sweep=Bound(ge=32), batch_sweep=Bound(ge=1), reps=Bound(ge=1),
              train_reps=Bound(ge=1), memory_batch_size=Bound(ge=1), threads=Bound(ge=1))


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        COMMAND, help='throughput, latency and peak memory vs the reference network and timm ResNets',
        description='Times ours, the authors-style reference network (same weights, logits compared) and timm '
                    'baselines interleaved in one process; reports medians as a markdown table and JSON.')
    p.add_argument('--model', default='epsanet50', help='EPSANet model name (default: epsanet50)')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--modes', nargs='+', default=['infer', 'train'], choices=['infer', 'train'])
    p.add_argument('--formats', nargs='+', default=['nchw', 'channels_last'], choices=['nchw', 'channels_last'])
    p.add_argument('--dtypes', nargs='+', default=['fp32'], choices=['fp32', 'bf16'],
                   help='bf16 runs under torch.autocast (CPU)')
    p.add_argument('--baselines', nargs='*', default=['resnet50', 'seresnet50'], help='timm model names')
    p.add_argument('--batch-sweep', nargs='*', type=int, default=[1, 16], help='extra inference batch sizes')
    p.add_argument('--img-sweep', nargs='*', type=int, default=[160, 288], help='extra inference image sizes')
    p.add_argument('--compile', action='store_true', help='also measure torch.compile (minutes of warm-up)')
    p.add_argument('--reps', type=int, default=None,
                   help='timed inference runs per candidate (median; default 9; with --ablate: per arm and repeat, 3)')
    p.add_argument('--train-reps', type=int, default=None,
                   help='timed training steps per candidate (default 9; with --ablate: per arm and repeat, 1)')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory probes')
    p.add_argument('--memory-batch-size', type=int, default=16)
    p.add_argument('--memory-modes', nargs='*', default=['train'], choices=['infer', 'train'])
    p.add_argument('--optimize', action=argparse.BooleanOptionalAction, default=True,
                   help='give ours its documented one-line CPU setting: epsanet.optimize_for_inference(model) '
                        'for inference, epsanet.optimize_for_training(model) for training (default; '
                        '--no-optimize measures the plain model)')
    p.add_argument('--runtime', nargs='+', default=['torch', 'onnxruntime'],
                   choices=['torch', 'onnxruntime', 'onnxruntime-int8'],
                   help='torch: eager PyTorch rows; onnxruntime: inference of the models exported to ONNX; '
                        'onnxruntime-int8: the same files quantized to int8 as epsanet quantize does (calibrated '
                        'on random batches: speed only)')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    p.add_argument('--targets', default=None, metavar='FILE',
                   help='JSON file of thresholds for the ratios (e.g. scripts/benchmark_targets.json): marks each met')
    p.add_argument('--ablate', action='store_true',
                   help='instead: turn each speed mechanism of epsanet.optimize off in turn and print what it is worth '
                        'in the figure it exists for (about 10 minutes at the defaults on 2 cores)')
    p.add_argument('--repeats', type=int, default=3, help='with --ablate: interleaved repeats (default 3)')
    p.add_argument('--figures', nargs='+', default=['infer', 'train', 'memory', 'onnxruntime'],
                   choices=['infer', 'train', 'memory', 'onnxruntime'],
                   help='with --ablate: the figures to measure (memory: peak training memory at --batch-size)')
    p.add_argument('--json', default=None,
                   help='JSON output path (default: benchmark.json; with --ablate: ablation.json)')
    p.add_argument('--markdown', default=None, help='also write the markdown table to this path')
    p.add_argument('--no-progress', action='store_true')
    add_overwrite_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from . import CLIError

    for flag, path in (('--json', args.json), ('--markdown', args.markdown)):  # before minutes of timing
        check_output_file(path, [], args.overwrite, flag)
    if args.json and args.markdown and os.path.abspath(args.json) == os.path.abspath(args.markdown):
        raise CLIError(f'--json and --markdown name the same file {args.json}; give two file names.')
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f'--threads must be >= 1, got {args.threads}.')
        torch.set_num_threads(args.threads)
    try:
        if args.ablate:
            from ..ablation import run_ablation

            report = run_ablation(
                args.model, batch_size=args.batch_size, img_size=args.img_size, repeats=args.repeats,
                figures=args.figures, infer_steps=_or(args.reps, 3), train_steps=_or(args.train_reps, 1),
                progress=not args.no_progress)
        else:
            from ..benchmark import load_thresholds, run_benchmark

            report = run_benchmark(
                args.model, batch_size=args.batch_size, img_size=args.img_size, modes=args.modes,
                memory_formats=args.formats, dtypes=args.dtypes, baselines=args.baselines,
                batch_sweep=args.batch_sweep, img_sweep=args.img_sweep, compile=args.compile, reps=_or(args.reps, 9),
                train_reps=_or(args.train_reps, 9), measure_memory=not args.no_memory,
                memory_batch_size=args.memory_batch_size, memory_modes=args.memory_modes, optimize=args.optimize,
                runtimes=args.runtime, progress=not args.no_progress,
                thresholds=load_thresholds(args.targets) if args.targets else None)
    except ValueError as e:
        raise CLIError(str(e)) from e
    print(report.to_markdown())
    json_path = args.json or ('ablation.json' if args.ablate else 'benchmark.json')
    report.save(json_path=json_path, markdown_path=args.markdown)
    print(f'wrote {json_path}' + (f' and {args.markdown}' if args.markdown else ''))
    return 0


def _or(value, default):
    return default if value is None else value
