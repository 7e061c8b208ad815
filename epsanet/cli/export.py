"""``epsanet export``: write a model as ONNX, TorchScript or a torch.export ExportedProgram, checked."""
import argparse
import os

try:
    from torch.onnx._constants import ONNX_MIN_OPSET
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as ONNX_MAX_OPSET
except ImportError:  # not where this torch keeps them: the range every supported torch writes
    ONNX_MIN_OPSET, ONNX_MAX_OPSET = 7, 17

from ..app.flags import Bound
from ..app.outputs import add_overwrite_argument, check_output_file
from ..weights.metadata import stored_num_classes
from . import CLIError

COMMAND = 'export'
# the opsets torch.onnx's TorchScript exporter writes; the smallest input is EPSANet's output stride
BOUNDS = dict(opset=Bound(ge=ONNX_MIN_OPSET, le=ONNX_MAX_OPSET), img_size=Bound(ge=32))


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..export import FORMATS

    parser = subparsers.add_parser(
        COMMAND, help='export a model to ONNX / TorchScript / ExportedProgram, checked against PyTorch',
        description='Export a timm model (EPSANet by default) and check the file against the PyTorch outputs.')
    parser.add_argument('model', nargs='?', default='epsanet50', help='timm model name (default: epsanet50)')
    parser.add_argument('--format', choices=list(FORMATS), default='onnx', help='output format (default: onnx)')
    parser.add_argument('-o', '--output', help='output file (default: MODEL.onnx / .pt / .pt2)')
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument('--weights', help='weights: a file, an http(s) URL or an hf-hub:org/name id')
    weights.add_argument('--pretrained', action='store_true', help="the model's registered pretrained weights")
    parser.add_argument(
        '--num-classes', type=int, help="classifier classes (default 1000; give the checkpoint's class count)")
    parser.add_argument('--in-chans', type=int, default=3, help='input channels (default: 3)')
    parser.add_argument('--img-size', type=int, default=224, help='input height and width (default: 224)')
    parser.add_argument('--batch-size', type=int, default=2, help='example batch size (default: 2)')
    parser.add_argument('--static-batch', action='store_true', help='fix the batch axis (default: dynamic)')
    parser.add_argument('--opset', type=int, default=17,
                        help=f'ONNX opset, {ONNX_MIN_OPSET} to {ONNX_MAX_OPSET} (default: 17)')
    parser.add_argument(
        '--method', choices=('trace', 'script'), default='trace', help='TorchScript method (default: trace)')
    parser.add_argument('--atol', type=float, default=1e-4,
                        help='the check allows a max |difference| of atol + rtol * max|output| (default 1e-4)')
    parser.add_argument('--rtol', type=float, default=1e-5, help='see --atol (default 1e-5)')
    parser.add_argument('--no-check', action='store_true', help='skip reloading and comparing the file')
    add_overwrite_argument(parser)
    parser.add_argument(
        '--onnx-forms', choices=('auto', 'plain'), default='auto',
        help='ONNX: auto (default) writes each PSA branch conv in the form onnxruntime runs fastest on this CPU '
             '(grouped or depthwise convs plus sums, timed at export); plain writes the grouped convs')
    return parser


def run(args: argparse.Namespace) -> int:
    from ..downstream.backbone import create_backbone
    from ..export import FORMATS, ExportError, export_model

    if args.format == 'exported-program' and args.output and not args.output.endswith('.pt2'):
        raise CLIError(f'--format exported-program writes a .pt2 file; got --output {args.output}.')
    output = args.output or args.model.replace('/', '_').replace(':', '_') + FORMATS[args.format]
    check_output_file(output, [args.weights], args.overwrite, '--output')
    kwargs = dict(in_chans=args.in_chans)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
        stored = stored_num_classes(args.weights) if args.weights and os.path.isfile(args.weights) else None
        if stored is not None and stored != args.num_classes:  # else the export would get a random classifier
            raise CLIError(f'--num-classes {args.num_classes} does not fit --weights {args.weights}, whose '
                           f'classifier has {stored} classes; leave --num-classes out to use {stored}.')
    weights = args.weights or args.pretrained or None
    try:
        model = create_backbone(args.model, weights, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from e
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise CLIError(f'{e}. See `epsanet models` or timm.list_models().') from e
        if 'size mismatch' in str(e):
            raise CLIError(f'the weights do not fit {args.model}: {e}\nIs --num-classes the checkpoint\'s?') from e
        raise
    if args.format == 'onnx' and args.onnx_forms == 'auto':
        from ..export import optimize_for_onnxruntime
        model = optimize_for_onnxruntime(model, input_size=(args.in_chans, args.img_size, args.img_size),
                                         batch_size=args.batch_size)
    try:
        result = export_model(
            model, output, args.format, input_size=(args.in_chans, args.img_size, args.img_size),
            batch_size=args.batch_size, dynamic_batch=not args.static_batch, opset=args.opset,
            method=args.method, check=not args.no_check, atol=args.atol, rtol=args.rtol)
    except (ExportError, ValueError) as e:
        raise CLIError(str(e)) from e
    size_mb = os.path.getsize(result.path) / 2 ** 20
    batch = 'dynamic batch' if result.dynamic_batch else 'static batch'
    print(f'wrote {result.path} ({args.format}, {size_mb:.1f} MiB, input {result.input_shape}, {batch})')
    if result.max_abs_diff is not None:
        print(f'check: batch {result.check_batch_size}, max |diff| vs PyTorch = {result.max_abs_diff:.3g} '
              f'(atol {args.atol:g}, rtol {args.rtol:g}) OK')
    return 0
