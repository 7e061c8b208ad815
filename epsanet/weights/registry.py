"""The registry of EPSANet weights that exist: ``weights/registry.json``.

Each entry describes one weights file (where it is, its sha256 and size, its licence, who trained
it and how, and what ``epsanet validate`` measured). The file's timm pretrained tag is a plain cfg in
``default_cfgs`` of :mod:`epsanet.models.epsanet` (``hf_hub_id`` or ``url``), as in any timm model file;
the registry adds what timm's cfgs do not carry, above all the sha256 and size that every download is
verified against before it gets its cache name.

The registry is read lazily, the first time something needs it (never at ``import epsanet``), so a
broken file breaks only what uses it, with a :class:`RegistryError` naming the file and field.
``EPSANET_WEIGHTS_REGISTRY=/path/to.json`` replaces the project's file (for private weights, or to test
an entry before proposing it). The schema is described in ``weights/README.md``.
"""
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import EpsanetError
from ..models.variants import VARIANTS

__all__ = [
    'RegistryError', 'WeightEntry', 'validate_entry', 'registry_path', 'load_registry', 'registered_weights',
    'find_entry', 'cfg_problems',
]

_logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ENV_VAR = 'EPSANET_WEIGHTS_REGISTRY'
_TAG = re.compile(r'^[a-z0-9][a-z0-9_\-]*$')
_SHA256 = re.compile(r'^[0-9a-f]{64}$')
_REQUIRED_PROVENANCE = ('trained_by', 'recipe', 'data')
_REQUIRED_METRICS = ('top1', 'top5', 'img_size', 'crop_pct')


@dataclass(frozen=True)
class WeightEntry:
    """One weights file of the registry (see ``weights/README.md`` for each field)."""
    model: str
    tag: str
    source: Dict[str, str]
    sha256: str
    file_size: int
    license: str
    provenance: Dict[str, Any]
    metrics: Dict[str, Any]
    num_classes: int = 1000
    notes: str = ''
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The timm name with tag, e.g. ``epsanet50.in1k``."""
        return f'{self.model}.{self.tag}'

    @property
    def hf_hub_id(self) -> Optional[str]:
        """``repo_id`` or ``repo_id@revision`` (timm's form), or None for URL entries."""
        repo = self.source.get('hf_hub_id')
        if not repo:
            return None
        revision = self.source.get('revision')
        return f'{repo}@{revision}' if revision else repo

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        extra = d.pop('extra')
        if not d['notes']:
            d.pop('notes')
        return {**d, **extra}

    def pretrained_cfg(self) -> Dict[str, Any]:
        """The timm pretrained cfg fields this entry sets (on top of the model's defaults)."""
        size = int(self.metrics['img_size'])
        cfg: Dict[str, Any] = dict(
            num_classes=self.num_classes,
            input_size=(3, size, size),
            crop_pct=float(self.metrics['crop_pct']),
            license=self.license,
            description=f'trained by {self.provenance["trained_by"]} on {self.provenance["data"]} '
                        f'with {self.provenance["recipe"]}',
            notes=(f'sha256: {self.sha256}', f'top-1 {self.metrics["top1"]}, top-5 {self.metrics["top5"]}'),
        )
        if self.hf_hub_id:
            cfg.update(hf_hub_id=self.hf_hub_id, hf_hub_filename=self.source['filename'])
        else:
            cfg.update(url=self.source['url'])
        return cfg


class RegistryError(EpsanetError, ValueError):
    """The registry file is malformed; the message names the file, the entry and the field."""


def registry_path() -> Optional[Path]:
    """``$EPSANET_WEIGHTS_REGISTRY`` or the project's ``weights/registry.json`` (None if absent).

    The package reaches it as ``epsanet/weights/registry.json``: in a source checkout that is a
    link to the top-level ``weights/registry.json``, in a wheel a copy of it.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    path = Path(__file__).parent / 'registry.json'
    return path if path.is_file() else None


def validate_entry(raw: Any, where: str = 'entry') -> WeightEntry:
    """A :class:`WeightEntry` from a JSON object; :class:`RegistryError` names the field that is wrong."""
    def fail(msg: str):
        raise RegistryError(f'{where}: {msg}. See weights/README.md for the schema.')

    if not isinstance(raw, dict):
        fail('an entry must be a JSON object')
    known = {f for f in WeightEntry.__dataclass_fields__ if f != 'extra'}
    missing = [k for k in ('model', 'tag', 'source', 'sha256', 'file_size', 'license', 'provenance', 'metrics')
               if raw.get(k) in (None, '')]
    if missing:
        fail(f'missing field(s) {missing}')
    if raw['model'] not in VARIANTS:
        fail(f'model {raw["model"]!r} is not one of {list(VARIANTS)}')
    if not _TAG.match(str(raw['tag'])):
        fail(f'tag {raw["tag"]!r} must be lower case letters, digits, "_" or "-", e.g. "in1k"')
    src = raw['source']
    if not isinstance(src, dict) or bool(src.get('url')) == bool(src.get('hf_hub_id')):
        fail('source must be {"url": ...} or {"hf_hub_id": ..., "filename": ..., "revision": ...}')
    if src.get('hf_hub_id') and not src.get('filename'):
        fail('a Hub source needs "filename" (e.g. "model.safetensors")')
    if not _SHA256.match(str(raw['sha256'])):
        fail('sha256 must be 64 lower-case hex digits (sha256sum of the file)')
    if not isinstance(raw['file_size'], int) or raw['file_size'] <= 0:
        fail('file_size must be the file size in bytes')
    prov, metrics = raw['provenance'], raw['metrics']
    if not isinstance(prov, dict) or any(not prov.get(k) for k in _REQUIRED_PROVENANCE):
        fail(f'provenance needs {list(_REQUIRED_PROVENANCE)}')
    if not isinstance(metrics, dict) or any(metrics.get(k) is None for k in _REQUIRED_METRICS):
        fail(f'metrics needs {list(_REQUIRED_METRICS)} as measured with `epsanet validate`')
    return WeightEntry(
        **{k: raw[k] for k in known if k in raw},
        extra={k: v for k, v in raw.items() if k not in known},
    )


def load_registry(path: Optional[Union[str, Path]] = None) -> List[WeightEntry]:
    """Read and validate a registry file (default: :func:`registry_path`).

    Raises :class:`RegistryError` naming the entry and field when the file is malformed.
    """
    path = Path(path) if path is not None else registry_path()
    if path is None:
        _logger.debug('No weights registry found; no pretrained tags registered.')
        return []
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError as e:
        raise RegistryError(f'Weights registry {path} does not exist (check ${ENV_VAR}).') from e
    except json.JSONDecodeError as e:
        raise RegistryError(f'Weights registry {path} is not valid JSON: {e}') from e
    if not isinstance(data, dict) or not isinstance(data.get('weights'), list):
        raise RegistryError(f'Weights registry {path} must be an object with a "weights" list.')
    if data.get('schema_version', SCHEMA_VERSION) != SCHEMA_VERSION:
        raise RegistryError(f'Weights registry {path} has schema_version {data["schema_version"]}, '
                            f'this epsanet reads version {SCHEMA_VERSION}.')
    entries = [validate_entry(raw, f'{path} entry {i}') for i, raw in enumerate(data['weights'])]
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RegistryError(f'Weights registry {path} lists {dupes} more than once.')
    return entries


@lru_cache(maxsize=1)
def registered_weights() -> Tuple[WeightEntry, ...]:
    """The entries of the active registry, read once per process."""
    return tuple(load_registry())


def find_entry(
        url: Optional[str] = None,
        hf_hub_id: Optional[str] = None,
        filename: Optional[str] = None,
) -> Optional[WeightEntry]:
    """The registry entry whose source is this URL or Hub file, if any (to know its sha256)."""
    for e in registered_weights():
        if url and e.source.get('url') == url:
            return e
        if hf_hub_id and e.hf_hub_id == hf_hub_id and filename in (None, e.source['filename']):
            return e
    return None


def cfg_problems(entries: Optional[Sequence[WeightEntry]] = None) -> List[str]:
    """Where timm's EPSANet pretrained cfgs and the registry disagree (empty when they agree).

    Every registry entry needs a cfg of the same name in ``default_cfgs`` of
    :mod:`epsanet.models.epsanet` pointing at the same file, and every cfg with weights needs a registry
    entry, or its download could not be verified against a sha256.
    """
    from timm.models import get_pretrained_cfg, list_pretrained

    entries = registered_weights() if entries is None else entries
    problems = []
    by_name = {e.name: e for e in entries}
    for name, entry in by_name.items():
        cfg = get_pretrained_cfg(name, allow_unregistered=False) if name in list_pretrained(name) else None
        if cfg is None:
            problems.append(f'{name} is in the registry but has no cfg in default_cfgs of epsanet/models/epsanet.py: '
                            f'add "{name}": _cfg(**{entry.pretrained_cfg()!r}).')
            continue
        where = cfg.hf_hub_id or cfg.url
        expected = entry.hf_hub_id or entry.source.get('url')
        if where != expected:
            problems.append(f'{name}: default_cfgs points at {where!r}, the registry at {expected!r}.')
    for name in list_pretrained('epsanet*'):
        cfg = get_pretrained_cfg(name)
        if (cfg.hf_hub_id or cfg.url) and name not in by_name:
            problems.append(f'{name} has weights in default_cfgs but no registry entry (sha256, size, provenance).')
    return problems
