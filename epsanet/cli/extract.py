"""``epsanet extract``: embeddings for every image under a folder, streamed to disk (also under torchrun)."""
import argparse

COMMAND = 'extract'


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..app.flags import add_config_arguments
    from ..features import ExtractConfig

    parser = subparsers.add_parser(
        COMMAND, help='write embeddings (pooled pre-logits or stage outputs) of every image under a folder',
        description='Writes OUTPUT: a folder of safetensors shards with index.json and paths.txt (the image of each '
                    'row), or NAME.npy / NAME.safetensors with NAME.index.json and NAME.paths.txt. Unreadable images '
                    'get no row. Several processes: torchrun --nproc_per_node N -m epsanet extract ... . An '
                    'interrupted run is finished by running the same command again. Read the result with '
                    'epsanet.features.load(OUTPUT).')
    add_config_arguments(parser, ExtractConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..app.errors import TrainError
    from ..app.flags import config_from_args
    from ..data import DataError
    from ..features import ExtractConfig, extract
    from . import CLIError

    try:
        result = extract(config_from_args(ExtractConfig, args))
    except (DataError, TrainError) as e:
        raise CLIError(str(e)) from e
    if result.get('count') is None:  # not the first process of a torchrun group: that one reports
        return 0
    shapes = ', '.join(f'{k} {tuple(v)}' for k, v in result['shapes'].items())
    skipped = f', {result["skipped"]} unreadable skipped' if result['skipped'] else ''
    resumed = f' ({result["resumed"]} of {result["chunks"]} chunks from an earlier run)' if result['resumed'] else ''
    print(f'{result["count"]} images -> {shapes}{skipped}{resumed}; output: {result["output"]}, '
          f'index: {result["index"]}')
    return 0
