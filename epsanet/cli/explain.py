"""``epsanet explain``: Grad-CAM and PSA's attention per kernel size, one PNG (+ arrays) per image."""
import argparse

COMMAND = 'explain'


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..app.flags import add_config_arguments
    from ..explain import ExplainConfig

    parser = subparsers.add_parser(
        COMMAND, help='Grad-CAM and PSA kernel-size attention pictures for images',
        description='Per image: <output-dir>/<name>.png (the image, Grad-CAM on the last stage for the predicted or '
                    '--target-class class, a bar chart of the mean PSA softmax weight per kernel size and stage) '
                    'and <name>.npz (the arrays: cam, per-layer branch weights, stage means).')
    parser.add_argument('paths', nargs='*', metavar='PATH', help='image files, folders or glob patterns')
    add_config_arguments(parser, ExplainConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..app.errors import TrainError
    from ..app.flags import config_from_args
    from ..data import DataError
    from ..explain import ExplainConfig, explain
    from ..weights.loading import WeightsError
    from . import CLIError

    try:
        cfg = config_from_args(ExplainConfig, args)
        written = explain(dataclasses.replace(cfg, inputs=tuple(args.paths) + tuple(cfg.inputs)))
    except (DataError, TrainError, WeightsError) as e:
        raise CLIError(str(e)) from e
    for w in written:
        print(f'{w["image"]}: {w["label"]} ({100 * w["prob"]:.1f}%) -> {w["png"]}, {w["npz"]}')
    return 0
