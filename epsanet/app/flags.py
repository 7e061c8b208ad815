"""Dataclass configs that double as argparse flags and YAML files.

A config field ``batch_size`` is the flag ``--batch-size`` and the YAML key ``batch_size`` (or
``batch-size``). ``--config FILE.yaml`` sets any flag; flags given on the command line win (the
flags default to "not given", so the dataclass holds the only defaults).
Field metadata: ``help``, ``choices``, ``type`` (element type for tuples), ``group`` (help section),
``bounds`` (a :class:`Bound`).

Every value is checked before any work (:func:`check_options`, run when an :class:`Options` dataclass is
made, from flags, YAML or Python): against the field's ``choices`` and ``bounds``, else the bounds of
:data:`BOUNDS` for its name (a flag means the same in every command), and ``--device`` must name a device
this machine has. A bad value is a :class:`ConfigError` of one line naming the flag and the allowed values.
"""
import argparse
import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Type, TypeVar

import yaml

from .device import device_problem
from .errors import ConfigError

__all__ = ['BOUNDS', 'Bound', 'Options', 'arg', 'default_workers', 'add_config_arguments', 'check_namespace',
           'check_options', 'config_from_args', 'load_yaml', 'parse_config']

T = TypeVar('T')


@dataclasses.dataclass(frozen=True)
class Bound:
    """The allowed range of a number (each element of a tuple): ``ge`` <= x <= ``le``, ``gt`` < x < ``lt``."""
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def allows(self, x: float) -> bool:
        return not ((self.ge is not None and x < self.ge) or (self.gt is not None and x <= self.gt)
                    or (self.le is not None and x > self.le) or (self.lt is not None and x >= self.lt))

    def __str__(self) -> str:
        low = f'>= {self.ge:g}' if self.ge is not None else f'> {self.gt:g}' if self.gt is not None else ''
        high = f'<= {self.le:g}' if self.le is not None else f'< {self.lt:g}' if self.lt is not None else ''
        return f'{low} and {high}' if low and high else low or high


AT_LEAST_1, AT_LEAST_0, POSITIVE = Bound(ge=1), Bound(ge=0), Bound(gt=0)
PROBABILITY, FRACTION = Bound(ge=0, le=1), Bound(gt=0, le=1)
RATE = Bound(ge=0, lt=1)

# The allowed values of the flags that every command names alike (timm's flag names); a field's own
# ``bounds`` metadata wins.
BOUNDS: Dict[str, Bound] = dict(
    batch_size=AT_LEAST_1, validation_batch_size=AT_LEAST_1, speed_batch_size=AT_LEAST_1, workers=AT_LEAST_0,
    img_size=AT_LEAST_1, num_classes=AT_LEAST_1, topk=AT_LEAST_1, crop_pct=FRACTION, std=POSITIVE,
    drop=RATE, drop_path=RATE, smoothing=RATE, hflip=PROBABILITY, vflip=PROBABILITY, reprob=PROBABILITY,
    mixup=AT_LEAST_0, cutmix=AT_LEAST_0, mixup_prob=PROBABILITY, mixup_switch_prob=PROBABILITY,
    color_jitter=AT_LEAST_0, scale=FRACTION, ratio=POSITIVE, model_ema_decay=PROBABILITY,
    lr=POSITIVE, lr_base=POSITIVE, lr_base_size=AT_LEAST_1, momentum=AT_LEAST_0, weight_decay=AT_LEAST_0,
    opt_eps=POSITIVE, clip_grad=POSITIVE, layer_decay=FRACTION, epochs=AT_LEAST_1, decay_epochs=POSITIVE,
    decay_milestones=AT_LEAST_0, decay_rate=POSITIVE, warmup_epochs=AT_LEAST_0, warmup_lr=AT_LEAST_0,
    min_lr=AT_LEAST_0, cooldown_epochs=AT_LEAST_0, patience_epochs=AT_LEAST_0, checkpoint_interval=AT_LEAST_0,
    grace_period=POSITIVE, log_interval=AT_LEAST_0, calibration_images=AT_LEAST_1, speed_reps=AT_LEAST_0,
    atol=AT_LEAST_0, rtol=AT_LEAST_0, in_chans=AT_LEAST_1,
)

# Checks beyond a range: the value's problem, or None.
CHECKS: Dict[str, Callable[[Any], Optional[str]]] = dict(device=device_problem)


def _problem(name: str, value: Any, bound: Optional[Bound], choices=None) -> Optional[str]:
    """One line naming the flag and its allowed values, or None when ``value`` is allowed."""
    if value is None or value == '' or isinstance(value, bool):
        return None
    items = value if isinstance(value, (tuple, list)) else (value,)
    if choices is not None and any(v not in choices for v in items):
        return f'{_flag(name)} must be one of {", ".join(map(str, choices))}; got {_show(value)}.'
    if bound is not None and any(isinstance(v, (int, float)) and not bound.allows(v) for v in items):
        return f'{_flag(name)} must be {bound}; got {_show(value)}.'
    check = CHECKS.get(name)
    problem = check(value) if check else None
    return f'{_flag(name)} {value}: {problem}' if problem else None


def check_options(cfg: Any) -> None:
    """Raise :class:`ConfigError` for the first value of the dataclass ``cfg`` outside its allowed values."""
    for field in dataclasses.fields(cfg):
        problem = _problem(field.name, getattr(cfg, field.name), field.metadata.get('bounds', BOUNDS.get(field.name)),
                           field.metadata.get('choices'))
        if problem:
            raise ConfigError(problem)


def check_namespace(args: argparse.Namespace, bounds: Mapping[str, Bound] = ()) -> None:
    """:func:`check_options` for a command without a config dataclass: its parsed ``args`` against ``bounds``
    and :data:`BOUNDS`."""
    bounds = dict(bounds)
    for name, value in vars(args).items():
        problem = _problem(name, value, bounds.get(name, BOUNDS.get(name)))
        if problem:
            raise ConfigError(problem)


class Options:
    """Base of the option dataclasses: each value is checked (:func:`check_options`) when one is made."""

    def __post_init__(self) -> None:
        check_options(self)


def default_workers(most: int) -> int:
    """``most`` data loading workers, or fewer on a machine that gives this process fewer CPUs: PyTorch's
    DataLoader warns when the workers outnumber them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, min(most, cpus))


def arg(default: Any, help: str, group: str = 'options', **metadata: Any) -> Any:
    """A dataclass field with its flag help; tuples defaults are fine (stored through a factory)."""
    metadata = dict(help=help, group=group, **metadata)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _flag(name: str) -> str:
    return '--' + name.replace('_', '-')


def _base_type(field: dataclasses.Field, hints: Dict[str, Any]):
    """(python type, is_sequence) of a field from its annotation."""
    tp = hints[field.name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        tp = args[0]
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        inner = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return field.metadata.get('type', inner[0] if inner else str), True
    return field.metadata.get('type', tp), False


def add_config_arguments(parser: argparse.ArgumentParser, cls: Type[Any]) -> None:
    """Add one flag per field of the dataclass ``cls`` (plus ``--config``)."""
    parser.add_argument('--config', metavar='FILE.yaml', default=None,
                        help='YAML file setting any of the flags below; flags on the command line win')
    hints = typing.get_type_hints(cls)
    groups: Dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(cls):
        meta = field.metadata
        group = groups.setdefault(meta.get('group', 'options'), parser.add_argument_group(meta.get('group', 'options')))
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        tp, is_seq = _base_type(field, hints)
        kw: Dict[str, Any] = dict(dest=field.name, help=meta.get('help', ''), default=argparse.SUPPRESS)
        if tp is bool and not is_seq:
            # --no-FLAG too when the default is True or None (None: picked at run time, see epsanet.train.recipe)
            kw['action'] = argparse.BooleanOptionalAction if default or default is None else 'store_true'
        else:
            kw['type'] = tp
            if is_seq:
                kw['nargs'] = meta.get('nargs', '+')
            if 'choices' in meta:
                kw['choices'] = meta['choices']
            kw['metavar'] = meta.get('metavar')
        if default not in (None, '', (), [], False):
            kw['help'] += f' (default: {_show(default)})'
        group.add_argument(_flag(field.name), *meta.get('aliases', ()), **kw)


def load_yaml(path: str, cls: Type[Any]) -> Dict[str, Any]:
    """Read ``path`` and return the values for fields of ``cls`` (``-`` or ``_`` in keys)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f'config file {path} does not exist.')
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'config file {path} is not valid YAML: {e}') from e
    if not isinstance(data, dict):
        raise ConfigError(f'config file {path} must be a mapping of flag names to values, got {type(data).__name__}.')
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        name = str(key).replace('-', '_')
        if name not in fields:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f' Did you mean {", ".join(_flag(c)[2:] for c in close)}?' if close else ''
            raise ConfigError(f'config file {path}: unknown key "{key}".{hint}')
        tp, is_seq = _base_type(fields[name], hints)
        out[name] = _coerce(value, tp, is_seq, f'config file {path}, key "{key}"')
    return out


def _coerce(value: Any, tp: Any, is_seq: bool, where: str) -> Any:
    if value is None:
        return None
    try:
        if is_seq:
            items = value if isinstance(value, (list, tuple)) else [value]
            return tuple(tp(v) for v in items)
        if tp is bool:
            if not isinstance(value, bool):
                raise ValueError(f'expected true or false, got {value!r}')
            return value
        if tp is float and isinstance(value, str):
            return float(value)  # YAML reads 1e-4 as a string
        return tp(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f'{where}: {e}') from e


def _show(value: Any) -> str:
    return ' '.join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)


def config_from_args(cls: Type[T], args: argparse.Namespace) -> T:
    """Build ``cls``: dataclass defaults, then ``args.config`` (YAML), then the flags that were given."""
    values = load_yaml(args.config, cls) if getattr(args, 'config', None) else {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            v = getattr(args, f.name)
            values[f.name] = tuple(v) if isinstance(v, list) else v
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e


def parse_config(cls: Type[T], argv: Optional[list] = None, prog: Optional[str] = None) -> T:
    """Parse ``argv`` (with ``--config``) straight into ``cls``: the same rules as the CLI."""
    parser = argparse.ArgumentParser(prog=prog)
    add_config_arguments(parser, cls)
    return config_from_args(cls, parser.parse_args(argv))
