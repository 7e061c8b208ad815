"""``epsanet predict``: top-k class names and probabilities for image files, folders or globs."""
import argparse

COMMAND = 'predict'


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..app.flags import add_config_arguments
    from ..predict import PredictConfig

    parser = subparsers.add_parser(
        COMMAND, help='classify images with trained weights (class names from the weights)',
        description="Top-k predictions with the model's eval transform. Flags follow timm's inference.py.")
    parser.add_argument('paths', nargs='*', metavar='PATH', help='image files, folders or glob patterns')
    add_config_arguments(parser, PredictConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..app.errors import TrainError
    from ..app.flags import config_from_args
    from ..data import DataError
    from ..predict import PredictConfig, predict
    from ..weights.loading import WeightsError
    from . import CLIError

    try:
        cfg = config_from_args(PredictConfig, args)
        cfg = dataclasses.replace(cfg, inputs=tuple(args.paths) + tuple(cfg.inputs))
        result = predict(cfg)
    except (DataError, TrainError, WeightsError) as e:
        raise CLIError(str(e)) from e
    shown = result.rows if not result.results_file else result.rows[:10]
    for row in shown:
        top = ', '.join(f'{name} {100 * p:.1f}%' for name, p in zip(row['label'], row['prob']))
        print(f'{row["filename"]}: {top}')
    if len(shown) < len(result.rows):
        print(f'... and {len(result.rows) - len(shown)} more')
    if result.label_source == 'indices':
        print('labels are class indices: the weights carry no class names')
    summary = f'{result.count} images predicted'
    if result.skipped:
        summary += f', {len(result.skipped)} unreadable skipped (no row): ' + ', '.join(result.skipped)
    if result.results_file:
        summary += f'; wrote {result.results_file}'
    print(summary)
    return 0
