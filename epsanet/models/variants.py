"""The EPSANet variants: one table, from which everything that lists or builds a variant derives.

The model list (``epsanet.MODEL_NAMES``), the timm entrypoints' arguments, ``epsanet models``, the
architecture inference of ``epsanet convert`` and the reference network all read :data:`VARIANTS`.
A new variant is one line here plus its ``@register_model`` function in ``epsanet.py``.

* Small (``epsanet50``, ``epsanet101``): bottleneck width = planes, PSA branches see the whole
  input, groups (1, 4, 8, 16): the authors' published code.
* Large (``epsanet50_large``, ``epsanet101_large``): bottleneck width = 2 x planes, split-input
  PSA with groups (4, 8, 16, 16): the only buildable form with kernels (3, 5, 7, 9) that
  reproduces the paper's parameter and FLOP counts (the authors released no Large code).
"""
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ['Variant', 'VARIANTS', 'SMALL_PSA', 'LARGE_PSA', 'model_names', 'get_variant', 'infer_variant']

SMALL_PSA: Mapping[str, Any] = dict(kernel_sizes=(3, 5, 7, 9), groups=(1, 4, 8, 16), split_input=False)
LARGE_PSA: Mapping[str, Any] = dict(kernel_sizes=(3, 5, 7, 9), groups=(4, 8, 16, 16), split_input=True)


@dataclass(frozen=True)
class Variant:
    """One EPSANet architecture.

    Attributes:
        layers: blocks per stage.
        base_width: bottleneck width per 64 planes (64: Small, width = planes; 128: Large, 2 x planes).
        psa: :class:`~epsanet.layers.PyramidSqueezeAttention` arguments (kernels, groups, split input).
        paper: the paper's ``(params M, GFLOPs, top-1, top-5)`` on ImageNet, if it reports the variant.
    """
    layers: Tuple[int, int, int, int]
    base_width: int
    psa: Mapping[str, Any]
    paper: Optional[Tuple[float, float, float, float]] = None

    @property
    def width_factor(self) -> int:
        """Bottleneck width / planes: 1 (Small) or 2 (Large)."""
        return self.base_width // 64

    def model_args(self) -> Dict[str, Any]:
        """The arguments of timm's ``ResNet`` for this variant (block class added by the caller)."""
        # zero_init_last=False: the authors initialise every BN weight to 1
        return dict(layers=self.layers, base_width=self.base_width, block_args=dict(psa_kwargs=dict(self.psa)),
                    zero_init_last=False)


VARIANTS: Dict[str, Variant] = {
    'epsanet50': Variant((3, 4, 6, 3), 64, SMALL_PSA, paper=(22.56, 3.62, 77.49, 93.54)),
    'epsanet50_large': Variant((3, 4, 6, 3), 128, LARGE_PSA, paper=(27.90, 4.72, 78.64, 94.18)),
    'epsanet101': Variant((3, 4, 23, 3), 64, SMALL_PSA, paper=(38.90, 6.82, 78.43, 94.11)),
    'epsanet101_large': Variant((3, 4, 23, 3), 128, LARGE_PSA, paper=(49.59, 8.97, 79.38, 94.58)),
}


def model_names() -> Tuple[str, ...]:
    """The names of every variant, in table order."""
    return tuple(VARIANTS)


def get_variant(name: str) -> Variant:
    """The variant called ``name`` (a timm tag such as ``.in1k`` is ignored).

    Raises:
        ValueError: for a name that is no variant (the message lists the variants).
    """
    base = name.split('.', 1)[0]
    if base not in VARIANTS:
        raise ValueError(f'Unknown EPSANet model {name!r}: choose one of {", ".join(VARIANTS)}.')
    return VARIANTS[base]


def infer_variant(state_dict: Mapping[str, Any]) -> Optional[str]:
    """The variant a state dict (timm or the authors' key names) was saved from, by its shapes; None if
    no variant fits. Reads the number of blocks per stage and the width of the first block's conv."""
    keys = [k[len('module.'):] if k.startswith('module.') else k for k in state_dict]
    blocks = []
    for stage in range(1, 5):
        prefix = f'layer{stage}.'
        blocks.append(len({k.split('.')[1] for k in keys if k.startswith(prefix) and k.split('.')[1].isdigit()}))
    first = state_dict.get('layer1.0.conv1.weight', state_dict.get('module.layer1.0.conv1.weight'))
    if first is None:
        return None
    for name, v in VARIANTS.items():
        if tuple(blocks) == tuple(v.layers) and int(first.shape[0]) == v.base_width:
            return name
    return None
