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
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

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
        # formulation and memory format of each branch and mode, fixed at construction (see _plan_branch)
        eval_plan = [
            _plan_branch(branch_in // g, branch_out // g, k, training=False) for k, g in zip(kernel_sizes, groups)]
        self._depthwise_eval = [d for d, _ in eval_plan]
        self._format_eval = [f for _, f in eval_plan]
        self._depthwise_train = [
            _plan_branch(branch_in // g, branch_out // g, k, training=True)[0] for k, g in zip(kernel_sizes, groups)]
        # training: the backward of grouped convs with few channels per group is 2-4x faster in
        # channels_last, so layers with such a branch run every branch in it
        train_cl = any(g > 1 and branch_in // g < 16 for g in groups)
        self._format_train = [CHANNELS_LAST if train_cl else KEEP] * num_branches

    def extra_repr(self) -> str:
        return (
            f'{self.in_chs}, {self.out_chs}, kernel_sizes={self.kernel_sizes}, groups={self.groups}, '
            f'split_input={self.split_input}')

    def _branch(self, i: int, weight: torch.Tensor, x: torch.Tensor, as_depthwise: bool) -> torch.Tensor:
        k, g = self.kernel_sizes[i], self.groups[i]
        # the weight in x's memory format: a channels_last weight would switch the conv to channels_last
        weight = _in_format_of(weight, x)
        if as_depthwise:
            return _grouped_conv_as_depthwise(
                x, weight, g, self._branch_in // g, self.branch_chs, k, self.stride, self.dilation)
        return F.conv2d(x, weight, None, self.stride, self.dilation * (k // 2), self.dilation, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each branch runs in the formulation and memory format that is fastest for its shape on
        # oneDNN (x86 CPU), whatever format the caller uses (see _plan_branch); the result comes
        # back in the caller's format. On other devices the branches keep the caller's format.
        if self.training:
            depthwise, formats = self._depthwise_train, self._format_train
        else:
            depthwise, formats = self._depthwise_eval, self._format_eval
        inputs: Dict[int, torch.Tensor] = {}  # x in each memory format the branches use
        outs: List[torch.Tensor] = []
        for i, conv in enumerate(self.convs):
            if formats[i] not in inputs:
                inputs[formats[i]] = _to_memory_format(x, formats[i])
            branch_in = inputs[formats[i]]
            if self.split_input:
                branch_in = torch.chunk(branch_in, self.num_branches, dim=1)[i]
            # reversed branch order: the largest kernel first
            outs.insert(0, self._branch(i, conv.weight, branch_in, depthwise[i]))
        feats = _concat_in_format_of(outs, x)
        s, c = self.num_branches, self.branch_chs
        # one batched SE over all branches: [N * S, C, 1, 1]
        pooled = feats.mean(dim=(2, 3)).reshape(-1, c, 1, 1)
        attn = self.se(pooled).reshape(-1, s, c, 1, 1).softmax(dim=1).reshape(-1, s * c, 1, 1)
        return _in_format_of(_scale_by_attention(feats, attn, self.save_output_for_backward), x)


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


# memory formats a branch can run in: the caller's, NCHW or channels_last
KEEP, NCHW, CHANNELS_LAST = 0, 1, 2  # (_to_memory_format spells them as literals)


def _plan_branch(in_per_group: int, out_per_group: int, kernel_size: int, training: bool) -> Tuple[bool, int]:
    """``(as_depthwise, memory_format)`` of one branch conv: its fastest form on oneDNN (x86 CPU).

    Measured per EPSANet-50 branch shape (torch 2.14, oneDNN 3.12, AVX-512, batch 8, 224 px);
    all forms give the same numbers:

    * grouped convs with a large kernel and 1-2 output channels per group are 3-10x slower in
      oneDNN than depthwise convs doing the same multiply-adds, so they run as depthwise convs
      plus a sum over each group's input channels (:func:`_grouped_conv_as_depthwise`). In
      training only the 1-output case wins (the backward of the 2-output case is slower).
    * inference: grouped convs with fewer than 64 input channels per group are faster in NCHW,
      dense and wider-group convs in channels_last; the 1-output depthwise form is fastest in
      NCHW, the 2-output one in channels_last.
    * training: the memory format is chosen for the whole layer (see ``__init__``).
    """
    as_depthwise = in_per_group > 1 and kernel_size >= 7 and out_per_group <= (1 if training else 2)
    if training:
        return as_depthwise, KEEP
    if as_depthwise:
        return True, NCHW if out_per_group == 1 else CHANNELS_LAST
    return False, CHANNELS_LAST if in_per_group >= 64 else NCHW


def _grouped_conv_as_depthwise(
        x: torch.Tensor,
        weight: torch.Tensor,
        groups: int,
        in_per_group: int,
        out_chs: int,
        kernel_size: int,
        stride: int,
        dilation: int,
) -> torch.Tensor:
    """``conv2d(x, weight, groups=groups)`` computed with depthwise convs and sums.

    Output channel ``j`` of group ``g`` is the sum over the group's ``I`` input channels ``i`` of
    ``x[g, i] * weight[g, j, i]``: one depthwise conv over all input channels per output channel
    ``j`` of a group, then a sum over ``i``. Same multiply-adds, but depthwise convs have
    specialised kernels. Channel counts come as ints (not from ``weight.shape``) so that
    torch.fx can trace the branch on them.
    """
    out_per_group = out_chs // groups
    per_out = weight.reshape(groups, out_per_group, in_per_group, kernel_size, kernel_size)
    outs: List[torch.Tensor] = []
    for j in range(out_per_group):
        y = F.conv2d(
            x, per_out[:, j].reshape(groups * in_per_group, 1, kernel_size, kernel_size), None, stride,
            dilation * (kernel_size // 2), dilation, groups * in_per_group)
        outs.append(y.unflatten(1, (groups, in_per_group)).sum(dim=2))
    if out_per_group == 1:
        return outs[0]
    return torch.stack(outs, dim=2).flatten(1, 2)  # channel g * out_per_group + j


@torch.fx.wrap
def _scale_by_attention(feats: torch.Tensor, attn: torch.Tensor, save_output: bool) -> torch.Tensor:
    """``feats * attn``; with ``save_output`` and autograd on, keeping the product, not ``feats``."""
    if save_output and torch.is_grad_enabled() and not torch.jit.is_scripting():
        return _scale_saving_output(feats, attn)
    return feats * attn


@torch.jit.unused
def _scale_saving_output(feats: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    return _ScaleSavingOutput.apply(feats, attn)


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


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


@torch.fx.wrap
def _in_format_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s memory format (NCHW or channels_last); a leaf for torch.fx."""
    if _is_channels_last(like):
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


@torch.fx.wrap
def _to_memory_format(x: torch.Tensor, memory_format: int) -> torch.Tensor:
    """``x`` in a branch's memory format (``KEEP``, ``NCHW``, ``CHANNELS_LAST``); CPU only."""
    # literals, not the module constants: TorchScript cannot read globals
    if memory_format == 0 or x.device.type != 'cpu':
        return x
    if memory_format == 2:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


@torch.fx.wrap
def _concat_in_format_of(tensors: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``torch.cat(tensors, 1)``, written straight into ``like``'s memory format when no
    gradient is needed (saves converting the PSA output afterwards)."""
    if torch.is_grad_enabled():
        return torch.cat(tensors, 1)
    shape = tensors[0].shape
    channels = 0
    for t in tensors:
        channels += t.shape[1]
    fmt = torch.channels_last if _is_channels_last(like) else torch.contiguous_format
    out = torch.empty((shape[0], channels, shape[2], shape[3]), dtype=tensors[0].dtype, device=tensors[0].device,
                      memory_format=fmt)
    return torch.cat(tensors, 1, out=out)
