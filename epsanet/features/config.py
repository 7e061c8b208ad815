"""The options of ``epsanet extract`` (:class:`ExtractConfig`), shared by the CLI, YAML and the Python API."""
import dataclasses
import re
from typing import Tuple

from ..app.data import CLASS_MAP_HELP, DATASET_HELP, DOWNLOAD_HELP
from ..app.errors import ConfigError
from ..app.flags import arg, default_workers
from ..app.model import InferenceModelOptions
from ..app.outputs import overwrite_option

__all__ = ['ExtractConfig', 'parse_size']

X = 'extraction'


@dataclasses.dataclass
class ExtractConfig(InferenceModelOptions):
    """Options of :func:`~epsanet.features.extract`."""
    data_dir: str = arg('', 'folder of images (searched recursively; any layout), or the root of --dataset', X)
    dataset: str = arg('', DATASET_HELP + '; wds/ shards are indexed once, rows keyed <shard>/<key>.<ext>', X)
    split: str = arg('', 'with --dataset: the split to embed (e.g. "val"; "" for --data-dir itself)', X)
    class_map: str = arg('', CLASS_MAP_HELP, X)
    dataset_download: bool = arg(False, DOWNLOAD_HELP, X)
    output: str = arg('features', 'output: a folder (sharded safetensors + index.json), a .npy file (one '
                                  'preallocated .npy per output) or a .safetensors file (one file)', X)
    shard_size: str = arg('1GB', 'largest shard file of a folder output (bytes, or with KB/MB/GB)', X)
    overwrite: bool = overwrite_option(X)
    stages: Tuple[int, ...] = arg((), 'extract these stage outputs (0 = stem, 1-4 = stages) instead of the pooled '
                                      'pre-logits', X, metavar='STAGE')
    pool_stages: bool = arg(False, 'global-average-pool stage outputs to vectors', X)
    batch_size: int = arg(64, 'batch size (per process)', X, aliases=('-b',))
    workers: int = arg(default_workers(4), 'data loading worker processes per process (default: 4, at most the CPUs)',
                       X, aliases=('-j',))
    device: str = arg('', 'device (default: cuda if available, else cpu; under torchrun cuda:LOCAL_RANK)', X)
    optimize: bool = arg(True, 'run the fastest inference form: on CPU optimize_for_inference (BatchNorm folded, PSA '
                               'convs in their fastest measured form, channels_last); on CUDA channels_last + '
                               'mixed precision', X)
    amp: bool = arg(False, 'mixed precision on CPU too (bfloat16; on CUDA it is on unless --no-optimize); '
                           'features are stored as float32', X)
    amp_dtype: str = arg('', 'mixed precision dtype (default: float16 on CUDA, bfloat16 on CPU)', X,
                         choices=('float16', 'bfloat16'))
    channels_last: bool = arg(False, 'channels-last memory layout (implied by the optimized form)', X)
    strict: bool = arg(False, 'fail on unreadable images instead of skipping them', X)
    progress: bool = arg(True, 'show progress (img/s)', X)


_UNITS = {'': 1, 'B': 1, 'KB': 1 << 10, 'K': 1 << 10, 'MB': 1 << 20, 'M': 1 << 20, 'GB': 1 << 30, 'G': 1 << 30}


def parse_size(text: str) -> int:
    """``'1GB'`` -> 1073741824 (binary units: KB = 1024 bytes); a plain number is bytes."""
    match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*', str(text), flags=re.I)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f'--shard-size {text}: give a positive size such as 1GB, 256MB or 1048576 (bytes).')
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
