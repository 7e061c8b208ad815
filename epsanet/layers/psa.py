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
from typing import List, Optional, Sequence, Type

import torch
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

    def extra_repr(self) -> str:
        return (
            f'{self.in_chs}, {self.out_chs}, kernel_sizes={self.kernel_sizes}, groups={self.groups}, '
            f'split_input={self.split_input}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.branch_features(x)
        return feats * self.attention(feats)

    def branch_features(self, x: torch.Tensor) -> torch.Tensor:
        """The branch convs' outputs concatenated in reversed branch order (largest kernel first)."""
        return torch.cat(self.branch_outputs(x), dim=1)

    def branch_outputs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The branch convs' outputs, in reversed branch order (largest kernel first), not concatenated."""
        inputs = torch.chunk(x, self.num_branches, dim=1) if self.split_input else [x] * self.num_branches
        outs: List[torch.Tensor] = []
        for i, conv in enumerate(self.convs):
            outs.insert(0, conv(inputs[i]))
        return outs

    def attention(self, feats: torch.Tensor) -> torch.Tensor:
        """The softmax attention ``[N, S * C, 1, 1]`` for the concatenated branch features ``feats``.

        One batched call of the shared SE module over all branches (``[N * S, C, 1, 1]``), then a
        softmax over the branch axis; the same numbers as applying the SE to each branch separately.
        """
        return self.attention_from_pooled(feats.mean(dim=(2, 3)))

    def attention_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """:meth:`attention` from the features' spatial means ``pooled`` (``[N, S * C]``)."""
        s, c = self.num_branches, self.branch_chs
        pooled = pooled.reshape(-1, c, 1, 1)
        return self.se(pooled).reshape(-1, s, c, 1, 1).softmax(dim=1).reshape(-1, s * c, 1, 1)


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
