"""Pyramid Squeeze Attention (PSA), the layer that gives EPSANet its name.

PSA replaces the 3x3 conv of a ResNet bottleneck. It runs ``S`` parallel convs with growing
kernels (the "pyramid"), weighs the channels of every branch with one SE module that all
branches share, turns the ``S`` weight vectors into a softmax over the branch axis and
concatenates the weighted branches in *reversed* branch order (largest kernel first), which is
the order the authors' weights were trained against.

Two input forms:

* whole-input (EPSANet Small, the authors' code): every branch sees the whole input.
* split-input (EPSANet Large, the paper's text): the input is split into ``S`` equal channel
  groups and branch ``i`` sees only group ``i``.

Paper: "EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network",
Zhang et al., ACCV 2022, https://arxiv.org/abs/2105.14447
"""
from typing import Dict, List, Optional, Sequence, Type

import torch
from torch import nn

from .branch_conv import branch_conv, in_format_of, is_channels_last, plan_branch, to_memory_format

# leaves for torch.fx here as well: fx patches the globals of the module that calls them
torch.fx.wrap('branch_conv')
torch.fx.wrap('to_memory_format')

__all__ = ['PyramidSqueezeAttention', 'PSA', 'PSAGate']


class PSAGate(nn.Module):
    """The SE weight module shared by all PSA branches: 1x1 conv, act, 1x1 conv, sigmoid.

    Unlike timm's ``SEModule`` it returns the sigmoid weights instead of the re-weighted
    input, because PSA still needs a softmax across branches. Both 1x1 convs have a bias and
    are stored as 4-D conv weights, as in the authors' checkpoints (``se.fc1``, ``se.fc2``).
    """

    def __init__(
            self,
            channels: int,
            rd_channels: int,
            act_layer: Type[nn.Module] = nn.ReLU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True, **dd)
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True, **dd)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """``pooled``: ``[N, C, 1, 1]`` pooled features; returns sigmoid weights of the same shape."""
        return self.fc2(self.act(self.fc1(pooled))).sigmoid()


class PyramidSqueezeAttention(nn.Module):
    """PSA layer: a drop-in replacement for a ``k x k`` conv (``in_chs -> out_chs``, ``stride``).

    Args:
        in_chs: input channels.
        out_chs: output channels; each of the ``S = len(kernel_sizes)`` branches makes
            ``out_chs // S`` of them.
        stride: stride of every branch conv.
        dilation: dilation of every branch conv (``output_stride`` 8/16 networks).
        kernel_sizes: one odd kernel size per branch.
        groups: conv groups per branch.
        split_input: ``False``: every branch sees the whole input (EPSANet Small);
            ``True``: branch ``i`` sees channel group ``i`` of ``S`` (EPSANet Large).
        rd_ratio: SE reduction; the SE works on ``out_chs // S`` channels.
        rd_channels: explicit SE hidden width, overrides ``rd_ratio``.
        act_layer: activation inside the SE module.
        save_output_for_backward: training memory saver: autograd keeps the layer's output
            instead of the branch features (the attention gradient is recovered from the
            output, since the attention weights are >= 1 / (1 + (S - 1) e) > 0). Only for a
            layer whose output is not changed in place afterwards, e.g. one followed by a
            BatchNorm, which keeps that same tensor: then it saves one feature map per layer.
            :class:`~epsanet.models.epsanet.PSABottleneck` turns it on.

    Raises:
        ValueError: for a configuration the layer cannot build (the message names the rule).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            dilation: int = 1,
            kernel_sizes: Sequence[int] = (3, 5, 7, 9),
            groups: Sequence[int] = (1, 4, 8, 16),
            split_input: bool = False,
            rd_ratio: float = 1. / 16,
            rd_channels: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.ReLU,
            save_output_for_backward: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        kernel_sizes, groups = list(kernel_sizes), list(groups)
        _check_config(in_chs, out_chs, stride, dilation, kernel_sizes, groups, split_input)
        num_branches = len(kernel_sizes)
        branch_in = in_chs // num_branches if split_input else in_chs
        branch_out = out_chs // num_branches
        rd_channels = rd_channels or max(1, int(branch_out * rd_ratio))

        self.in_chs = in_chs
        self.out_chs = out_chs
        self.num_branches = num_branches
        self.branch_chs = branch_out
        self.split_input = split_input
        self.kernel_sizes = kernel_sizes
        self.groups = groups
        self.convs = nn.ModuleList([
            nn.Conv2d(
                branch_in, branch_out, kernel_size=k, stride=stride, padding=dilation * (k // 2),
                dilation=dilation, groups=g, bias=False, **dd)
            for k, g in zip(kernel_sizes, groups)
        ])
        self.se = PSAGate(branch_out, rd_channels, act_layer=act_layer, **dd)
        self.stride = stride
        self.dilation = dilation
        self.save_output_for_backward = save_output_for_backward
        self._branch_in = branch_in
        # forward formulation and memory format of each branch (see branch_conv.plan_branch)
        plans = [plan_branch(branch_in // g, branch_out // g, k) for k, g in zip(kernel_sizes, groups)]
        self._depthwise = [p[0] for p in plans]
        self._depthwise_autograd = [p[1] for p in plans]
        self._formats = [p[2] for p in plans]
        # per-channel affine map applied with the attention (set by fold_batchnorm: an eval-mode BN after PSA)
        self.out_scale: Optional[torch.Tensor]
        self.out_shift: Optional[torch.Tensor]
        self.register_buffer('out_scale', None)
        self.register_buffer('out_shift', None)

    def extra_repr(self) -> str:
        return (
            f'{self.in_chs}, {self.out_chs}, kernel_sizes={self.kernel_sizes}, groups={self.groups}, '
            f'split_input={self.split_input}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each branch runs in the form that is fastest for its shape on oneDNN (x86 CPU), whatever
        # format the caller uses (see epsanet.layers.branch_conv); the result comes back in the
        # caller's format.
        inputs: Dict[int, torch.Tensor] = {}  # x in each memory format the branches use
        outs: List[torch.Tensor] = []
        for i, conv in enumerate(self.convs):
            fmt = self._formats[i]
            if fmt not in inputs:
                inputs[fmt] = to_memory_format(x, fmt)
            x_i, x_fwd = x, inputs[fmt]
            if self.split_input:
                x_i = torch.chunk(x, self.num_branches, dim=1)[i]
                x_fwd = torch.chunk(x_fwd, self.num_branches, dim=1)[i]
            g = self.groups[i]
            out = branch_conv(
                x_i, x_fwd, conv.weight, g, self._branch_in // g, self.branch_chs, self.kernel_sizes[i], self.stride,
                self.dilation, self._depthwise[i], self._depthwise_autograd[i])
            outs.insert(0, out)  # reversed branch order: the largest kernel first
        feats = _concat_in_format_of(outs, x)
        s, c = self.num_branches, self.branch_chs
        # one batched SE over all branches: [N * S, C, 1, 1]
        pooled = feats.mean(dim=(2, 3)).reshape(-1, c, 1, 1)
        attn = self.se(pooled).reshape(-1, s, c, 1, 1).softmax(dim=1).reshape(-1, s * c, 1, 1)
        if self.out_scale is not None and self.out_shift is not None:  # one pass: feats * (attn * scale) + shift
            return torch.addcmul(self.out_shift.view(1, -1, 1, 1), feats, attn * self.out_scale.view(1, -1, 1, 1))
        return _scale_by_attention(feats, attn, self.save_output_for_backward)  # feats' format: the caller's

    def fold_output_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """From now on return ``out * scale + shift`` (per channel) instead of ``out``, computed in the
        same pass as the attention product; e.g. the eval-mode BatchNorm that follows the layer."""
        if self.out_scale is not None or self.out_shift is not None:
            raise ValueError('This PSA layer already has an output affine map folded in.')
        if scale.shape != (self.out_chs,) or shift.shape != (self.out_chs,):
            raise ValueError(f'scale and shift need shape ({self.out_chs},): got {tuple(scale.shape)} '
                             f'and {tuple(shift.shape)}.')
        self.out_scale = scale.detach().clone()
        self.out_shift = shift.detach().clone()


PSA = PyramidSqueezeAttention


def _check_config(
        in_chs: int,
        out_chs: int,
        stride: int,
        dilation: int,
        kernel_sizes: List[int],
        groups: List[int],
        split_input: bool,
) -> None:
    """Raise ``ValueError`` naming the first rule a PSA configuration breaks."""
    if not kernel_sizes:
        raise ValueError('PSA needs at least one branch: kernel_sizes is empty.')
    if len(kernel_sizes) != len(groups):
        raise ValueError(
            f'PSA needs one group count per kernel: got {len(kernel_sizes)} kernel_sizes {kernel_sizes} '
            f'and {len(groups)} groups {groups}.')
    for k in kernel_sizes:
        if k < 1 or k % 2 == 0:
            raise ValueError(f'PSA kernel sizes must be odd and positive (to keep the spatial size): got {k}.')
    if stride < 1 or dilation < 1:
        raise ValueError(f'PSA stride and dilation must be >= 1: got stride={stride}, dilation={dilation}.')
    s = len(kernel_sizes)
    if out_chs % s:
        raise ValueError(f'PSA out_chs ({out_chs}) must be divisible by the number of branches ({s}).')
    if split_input and in_chs % s:
        raise ValueError(
            f'split-input PSA in_chs ({in_chs}) must be divisible by the number of branches ({s}).')
    branch_in = in_chs // s if split_input else in_chs
    branch_out = out_chs // s
    for k, g in zip(kernel_sizes, groups):
        if g < 1 or branch_in % g or branch_out % g:
            raise ValueError(
                f'PSA branch with kernel {k} has groups={g}, which must divide both its input channels '
                f'({branch_in}) and its output channels ({branch_out}).')


@torch.fx.wrap
def _scale_by_attention(feats: torch.Tensor, attn: torch.Tensor, save_output: bool) -> torch.Tensor:
    """``feats * attn``; with ``save_output`` and autograd on, keeping the product, not ``feats``."""
    if not torch.jit.is_scripting():  # TorchScript compiles no code under this line
        if save_output and torch.is_grad_enabled() and not torch.jit.is_tracing():
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


@torch.fx.wrap
def _concat_in_format_of(tensors: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``torch.cat(tensors, 1)`` in ``like``'s memory format, so that the PSA output needs no
    conversion afterwards (with autograd, the output the memory saver keeps is then the very
    tensor the next layer gets). Without autograd it is written straight into that format."""
    if torch.is_grad_enabled():
        return torch.cat([in_format_of(t, like) for t in tensors], 1)
    shape = tensors[0].shape
    channels = 0
    for t in tensors:
        channels += t.shape[1]
    fmt = torch.channels_last if is_channels_last(like) else torch.contiguous_format
    out = torch.empty((shape[0], channels, shape[2], shape[3]), dtype=tensors[0].dtype, device=tensors[0].device,
                      memory_format=fmt)
    return torch.cat(tensors, 1, out=out)
