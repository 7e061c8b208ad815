"""``FastPSA``: the PSA layer as the CPU transforms run it; same parameters, same numbers.

One change from :class:`~epsanet.layers.PyramidSqueezeAttention`, switched on by the training transform
(``save_output_for_backward``): autograd keeps the layer's output instead of the branch features. The
attention gradient is recovered from the output, since the attention weights are
``>= 1 / (1 + (S - 1) e) > 0``. Only for a layer whose output is not changed in place afterwards, such
as one followed by a BatchNorm, which keeps that same tensor: then it saves one feature map per layer.
An in-place change of the output makes autograd raise its usual error. The branch outputs are not
concatenated first: each is scaled straight into its slice of the output, and the backward pass hands
every branch conv its own gradient, laid out as the conv's output was (no copy of a strided slice).

The branch convs and the SE module are the layer's own, called as modules.
"""
from typing import Sequence, Type

import torch

from ..layers.psa import PyramidSqueezeAttention

__all__ = ['FastPSA', 'psa_sharing_modules']


def psa_sharing_modules(cls: Type[PyramidSqueezeAttention], psa: PyramidSqueezeAttention) -> PyramidSqueezeAttention:
    """A ``cls`` (a PSA subclass with another forward) with ``psa``'s settings and train/eval mode, holding ``psa``'s
    own branch convs and SE module (no copies: the same parameters and state-dict keys)."""
    new = cls(psa.in_chs, psa.out_chs, psa.stride, psa.dilation, psa.kernel_sizes, psa.groups, psa.split_input,
              rd_channels=psa.se.fc1.out_channels, act_layer=type(psa.se.act), device='meta')
    new.convs, new.se = psa.convs, psa.se
    return new.train(psa.training)


class FastPSA(PyramidSqueezeAttention):
    """See the module docstring. Build it with :meth:`from_psa`."""

    @classmethod
    def from_psa(cls, psa: PyramidSqueezeAttention, save_output_for_backward: bool = False) -> 'FastPSA':
        """A ``FastPSA`` holding ``psa``'s own submodules (branch convs and SE module; no copies)."""
        new = psa_sharing_modules(cls, psa)
        new.save_output_for_backward = save_output_for_backward
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.save_output_for_backward and torch.is_grad_enabled()):
            return super().forward(x)
        outs = self.branch_outputs(x)
        attn = self.attention_from_pooled(torch.cat([o.mean(dim=(2, 3)) for o in outs], dim=1))
        return _ScaleConcatSavingOutput.apply(attn, *outs)


def _layout(t: torch.Tensor) -> torch.memory_format:
    channels_last = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _empty_concat(feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """An uninitialised ``cat(feats, dim=1)``-shaped tensor in the layout of ``feats[0]``."""
    n, _, h, w = feats[0].shape
    return torch.empty((n, sum(f.shape[1] for f in feats), h, w), dtype=feats[0].dtype, device=feats[0].device,
                       memory_format=_layout(feats[0]))


class _ScaleConcatSavingOutput(torch.autograd.Function):
    """``out = cat(feats, dim=1) * attn`` (``attn``: ``[N, C, 1, 1]``, all > 0), each branch written straight into
    its channel slice of ``out``; saves ``out``, not the branch features.

    Backward: ``d feats_i = g_i * attn_i`` (a new dense tensor per branch, in the layout of ``out``) and
    ``d attn = sum_hw(g * feats) = sum_hw(g * out) / attn``.
    """

    @staticmethod
    def forward(ctx, attn: torch.Tensor, *feats: torch.Tensor) -> torch.Tensor:
        channels = [f.shape[1] for f in feats]
        out = _empty_concat(feats)
        start = 0
        for f, c in zip(feats, channels):
            torch.mul(f, attn[:, start:start + c], out=out[:, start:start + c])
            start += c
        ctx.save_for_backward(out, attn)
        ctx.channels = channels
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, attn = ctx.saved_tensors
        grad_attn = (grad * out).sum(dim=(2, 3), keepdim=True) / attn
        grads, start = [], 0
        n, _, h, w = out.shape
        fmt = _layout(out)
        for c in ctx.channels:  # in the layout of the output (so of the branch convs' outputs), whatever grad's is
            g = torch.empty((n, c, h, w), dtype=grad.dtype, device=grad.device, memory_format=fmt)
            grads.append(torch.mul(grad[:, start:start + c], attn[:, start:start + c], out=g))
            start += c
        return (grad_attn, *grads)
