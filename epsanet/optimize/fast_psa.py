"""``FastPSA``: the PSA layer as the CPU transforms run it; same parameters, same numbers.

Two changes from :class:`~epsanet.layers.PyramidSqueezeAttention`, each switched on by a transform:

* ``save_output_for_backward`` (training): autograd keeps the layer's output instead of the branch
  features. The attention gradient is recovered from the output, since the attention weights are
  ``>= 1 / (1 + (S - 1) e) > 0``. Only for a layer whose output is not changed in place afterwards,
  such as one followed by a BatchNorm, which keeps that same tensor: then it saves one feature map
  per layer. An in-place change of the output makes autograd raise its usual error.
* ``out_scale`` / ``out_shift`` (inference): a per-channel affine map, e.g. the eval-mode BatchNorm
  that follows the layer, computed in the same pass as the attention product
  (``feats * (attn * scale) + shift``: one pass over the features instead of two).

The branch convs are whatever modules the layer holds (:class:`~epsanet.optimize.tuned_conv.TunedConv2d`
after the transforms), called as modules; so is the SE module.
"""
from typing import Optional

import torch

from ..layers.psa import PyramidSqueezeAttention

__all__ = ['FastPSA']


class FastPSA(PyramidSqueezeAttention):
    """See the module docstring. Build it with :meth:`from_psa`."""

    out_scale: Optional[torch.Tensor]
    out_shift: Optional[torch.Tensor]

    @classmethod
    def from_psa(cls, psa: PyramidSqueezeAttention, save_output_for_backward: bool = False) -> 'FastPSA':
        """A ``FastPSA`` holding ``psa``'s own submodules (branch convs and SE module; no copies)."""
        new = cls.from_layer(psa)
        new.save_output_for_backward = save_output_for_backward
        new.register_buffer('out_scale', None)
        new.register_buffer('out_shift', None)
        return new

    def fold_output_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """From now on return ``out * scale + shift`` (per channel) instead of ``out``."""
        if self.out_scale is not None or self.out_shift is not None:
            raise ValueError('This PSA layer already has an output affine map folded in.')
        if scale.shape != (self.out_chs,) or shift.shape != (self.out_chs,):
            raise ValueError(f'scale and shift need shape ({self.out_chs},): got {tuple(scale.shape)} '
                             f'and {tuple(shift.shape)}.')
        self.out_scale = scale.detach().clone()
        self.out_shift = shift.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.branch_features(x)
        attn = self.attention(feats)
        if self.out_scale is not None and self.out_shift is not None:
            return torch.addcmul(self.out_shift.view(1, -1, 1, 1), feats, attn * self.out_scale.view(1, -1, 1, 1))
        if self.save_output_for_backward and torch.is_grad_enabled():
            return _ScaleSavingOutput.apply(feats, attn)
        return feats * attn


class _ScaleSavingOutput(torch.autograd.Function):
    """``out = feats * attn`` (``attn``: ``[N, C, 1, 1]``, all > 0) that saves ``out``, not ``feats``.

    Backward: ``d feats = g * attn`` and ``d attn = sum_hw(g * feats) = sum_hw(g * out) / attn``.
    """

    @staticmethod
    def forward(ctx, feats: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        out = feats * attn
        ctx.save_for_backward(out, attn)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, attn = ctx.saved_tensors
        grad_attn = (grad * out).sum(dim=(2, 3), keepdim=True) / attn
        return grad * attn, grad_attn
