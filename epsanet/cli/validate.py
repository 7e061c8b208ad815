"""``epsanet validate``: top-1, top-5, loss and img/s of weights on an ImageFolder split."""
import argparse
import json

COMMAND = 'validate'


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..app.flags import add_config_arguments
    from ..train.validate import ValidateConfig

    parser = subparsers.add_parser(
        COMMAND, help='validate weights on an ImageFolder split',
        description="Evaluate with the model's eval transform (resize + centre crop). Flags follow timm's validate.py.")
    add_config_arguments(parser, ValidateConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..app.errors import TrainError
    from ..app.flags import config_from_args
    from ..data import DataError
    from ..train.validate import ValidateConfig, validate
    from . import CLIError

    try:
        results = validate(config_from_args(ValidateConfig, args))
    except (DataError, TrainError) as e:
        raise CLIError(str(e)) from e
    print(f'top-1 {results["top1"]:.2f}% ({results["correct"]}/{results["count"]})  top-5 {results["top5"]:.2f}%  '
          f'loss {results["loss"]:.4f}  {results["img_per_sec"]:.1f} img/s  ({results["count"]} images at '
          f'{results["img_size"]} px)')
    if results['skipped_unreadable']:
        print(f'{results["skipped_unreadable"]} unreadable images skipped, not counted: '
              + ', '.join(results['skipped_files']))
    if 'per_class' in results:
        print(json.dumps(results['per_class'], indent=1))
    return 0
