"""``epsanet train``: fine-tune or train a model on an ImageFolder (also under torchrun)."""
import argparse

COMMAND = 'train'


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..app.flags import add_config_arguments
    from ..train.config import TrainConfig

    parser = subparsers.add_parser(
        COMMAND, help='fine-tune or train a model on an ImageFolder',
        description='Train on DATA_DIR/train/<class>/<image>, validate on DATA_DIR/val/... each epoch. Flags follow '
                    "timm's train.py. Multi-GPU: torchrun --nproc_per_node N -m epsanet train ... "
                    'SIGINT (Ctrl-C), SIGTERM and SIGUSR1 save the exact position to <output>/last.state.pth and exit '
                    'with 128 + the signal number (130, 143, 138); --resume auto continues from it.')
    add_config_arguments(parser, TrainConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..app.errors import TrainError
    from ..app.flags import config_from_args
    from ..data import DataError
    from ..train import TrainConfig, train
    from ..train.interrupt import Interrupted
    from . import CLIError

    try:
        result = train(config_from_args(TrainConfig, args))
    except (DataError, TrainError) as e:
        raise CLIError(str(e)) from e
    except Interrupted as e:  # the trainer logged what it saved and the resume command
        return e.exit_code
    if result.rank != 0:
        return 0
    if result.best_top1 is not None:
        print(f'Best top-1 {result.best_top1:.2f}% at epoch {result.best_epoch}: {result.weights}')
    else:
        n = result.epochs_completed
        print(f'Done ({n} epoch{"" if n == 1 else "s"}, no validation split): {result.weights}')
    return 0
