"""``epsanet extract``: embeddings for every image under a folder."""
import argparse

COMMAND = 'extract'


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..features import ExtractConfig
    from ..train.flags import add_config_arguments

    parser = subparsers.add_parser(
        COMMAND, help='write embeddings (pooled pre-logits or stage outputs) of every image under a folder',
        description='Writes OUTPUT (.safetensors or .npy) and OUTPUT.paths.txt (image paths, one per row).')
    add_config_arguments(parser, ExtractConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..data import DataError
    from ..features import ExtractConfig, extract
    from ..train import TrainError
    from ..train.flags import config_from_args
    from . import CLIError

    try:
        result = extract(config_from_args(ExtractConfig, args))
    except (DataError, TrainError) as e:
        raise CLIError(str(e)) from e
    shapes = ', '.join(f'{k} {tuple(v)}' for k, v in result['shapes'].items())
    print(f'{result["count"]} images -> {shapes}; files: {", ".join(result["files"].values())}')
    return 0
