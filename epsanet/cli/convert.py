"""``epsanet convert SRC OUT_DIR``: a weights file -> a verified, Hub-ready timm folder."""
import argparse
import json
from pathlib import Path

from ..app.outputs import add_overwrite_argument, check_not_input

COMMAND = 'convert'


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        COMMAND, help='turn an authors\' checkpoint or any weights file into a Hub-ready timm folder',
        description='Writes model.safetensors, config.json (timm format), README.md (model card), '
                    'model.safetensors.sha256 and registry_entry.json into OUT_DIR, then reloads the folder '
                    'and checks that it reproduces the source logits.')
    parser.add_argument('src', metavar='SRC', help='.safetensors, .pth, .pth.tar or .bin weights file')
    parser.add_argument('out_dir', metavar='OUT_DIR', help='folder to write (absent or empty)')
    parser.add_argument('--model', default=None, help='architecture (default: inferred from the weights)')
    parser.add_argument('--tag', default=None, help='registry tag for these weights, e.g. in1k')
    parser.add_argument('--license', default=None, help='licence of the weights, e.g. mit or apache-2.0')
    parser.add_argument('--trained-by', default=None, help='who trained the weights (provenance)')
    parser.add_argument('--recipe', default=None, help='training recipe or config file used (provenance)')
    parser.add_argument('--data', default=None, help='training data, e.g. "ImageNet-1k train" (provenance)')
    parser.add_argument('--metrics', default=None, metavar='JSON',
                        help='results file of `epsanet validate --results-file` (top1, top5, img_size, ...)')
    parser.add_argument('--label-names', default=None, metavar='FILE',
                        help='class names, one per line in classifier order (default: the classes an '
                             '"epsanet train" checkpoint records)')
    add_overwrite_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..weights.convert import convert, read_label_names
    from ..weights.loading import WeightsError
    from . import CLIError

    check_not_input([args.out_dir], [args.src, args.metrics, args.label_names], 'OUT_DIR')
    metrics = None
    if args.metrics:
        try:
            metrics = json.loads(Path(args.metrics).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CLIError(f'cannot read the metrics file {args.metrics}: {e}') from e
        if not isinstance(metrics, dict):
            raise CLIError(f'{args.metrics} must hold a JSON object such as {{"top1": 77.5, "top5": 93.6}}')
    provenance = {k: v for k, v in (('trained_by', args.trained_by), ('recipe', args.recipe),
                                    ('data', args.data)) if v}
    try:
        names = read_label_names(args.label_names) if args.label_names else None
        result = convert(args.src, args.out_dir, args.model, tag=args.tag, license=args.license,
                         provenance=provenance, metrics=metrics, overwrite=args.overwrite, label_names=names)
    except (WeightsError, ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    print(f'{result.out_dir}: {result.model}, {result.num_classes} classes, {result.params:,} params, '
          f'{result.gflops:.2f} GFLOPs')
    print('class names: ' + (', '.join(result.label_names[:10]) + (', ...' if len(result.label_names) > 10 else '')
                             if result.label_names else 'none (labels will be indices; see --label-names)'))
    print(f'model.safetensors sha256 {result.sha256} ({result.file_size:,} bytes)')
    print(f'reloaded with timm: logits match the source (max |diff| {result.max_abs_diff:.2e})')
    print(f'publish with: epsanet push {result.out_dir} <org>/<repo>')
    return 0
