"""``FusedBatchNorm2d``: a training-mode BatchNorm, and the ReLU after it, in two passes each way.

PyTorch runs a BatchNorm and the ReLU after it as separate kernels: over a channels_last float32 map
the forward pass reads the input for the statistics, normalises it and rectifies the result in place;
the backward pass masks the gradient with the ReLU output, then reduces and maps it in the BatchNorm's
backward. The C kernels in ``kernels/batchnorm_act.c`` (built on first use, :mod:`epsanet.optimize.native`)
do the same arithmetic in one pass for the statistics and one for the output, forward and backward; the
backward recomputes the ReLU mask from the BatchNorm input, which autograd keeps anyway. A block's last
BatchNorm also adds the shortcut before its ReLU (:class:`FusedResidualPSABottleneck`): one output pass
instead of a normalisation, an in-place sum and an in-place ReLU; its backward reads the ReLU mask from the
output and writes the shortcut's gradient in the same pass as the input's.

A ``FusedBatchNorm2d`` *is* an ``nn.BatchNorm2d`` holding the replaced module's own parameters and buffers
(the same state-dict keys and tensors), called as a module, with ``relu=True`` when it also applies the
ReLU that follows it. That ReLU module becomes a :class:`FusedReLU`, still an ``nn.ReLU``, which passes
through a tensor its BatchNorm has already rectified and rectifies anything else: a BatchNorm replaced
later (timm's ``freeze`` makes ``FrozenBatchNorm2d``, ``nn.SyncBatchNorm.convert_sync_batchnorm``
makes ``SyncBatchNorm``) or an output changed in place by a hook never loses its ReLU.

The kernels run in training mode on CPU float32 channels_last input, with affine parameters; everywhere
else (eval mode, NCHW input, other dtypes or devices, autocast, TorchScript, tracing, ``torch.compile``,
no C compiler) it runs PyTorch's ``batch_norm`` and ``relu``. Running statistics, ``momentum=None`` and
``num_batches_tracked`` behave as in ``nn.BatchNorm2d``.

:func:`fuse_batchnorm_act` swaps them into an EPSANet (part of :func:`epsanet.optimize_for_training`);
:func:`unfuse_batchnorm_act` puts plain ``BatchNorm2d`` + ``ReLU`` modules back.
"""
import ctypes
from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import autocast_enabled, is_compiling
from ..models.epsanet import PSABottleneck
from . import native

__all__ = ['FusedBatchNorm2d', 'FusedReLU', 'FusedResidualPSABottleneck', 'fuse_batchnorm_act', 'unfuse_batchnorm_act',
           'kernels_available']

_RECTIFIED = '_epsanet_rectified_at_version'  # set on a FusedBatchNorm2d(relu=True) output

_P, _I = ctypes.c_void_p, ctypes.c_int64
_lib: Optional[ctypes.CDLL] = None
_lib_loaded = False


def _kernels() -> Optional[ctypes.CDLL]:
    global _lib, _lib_loaded
    if not _lib_loaded:
        lib = native.load('batchnorm_act')
        if lib is not None:
            lib.batchnorm_act_forward.argtypes = [_P, _P, _P, _I, _I, _P, _P, ctypes.c_double, ctypes.c_int, _P, _P,
                                                  _P, ctypes.c_int]
            lib.batchnorm_act_backward.argtypes = [_P, _P, _P, _P, _P, _I, _I, _P, _P, _P, _P, ctypes.c_int, _P, _P,
                                                   ctypes.c_int]
            lib.batchnorm_act_forward.restype = lib.batchnorm_act_backward.restype = ctypes.c_int
        _lib, _lib_loaded = lib, True
    return _lib


def kernels_available() -> bool:
    """Whether the fused kernels are built and loaded (see :mod:`epsanet.optimize.native`)."""
    return _kernels() is not None


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class _BatchNormActFunction(torch.autograd.Function):
    """Training-mode BatchNorm (+ residual) (+ ReLU) by the C kernels. Updates the running statistics like
    ``F.batch_norm``; saves the input, the parameters, the batch mean and 1/std, and with a residual and a ReLU
    the output (its ReLU mask)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], momentum: float, eps: float,
                relu: bool) -> torch.Tensor:
        n, c, h, w = x.shape
        rows = n * h * w
        weight, bias = weight.detach().contiguous(), bias.detach().contiguous()
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
        y = torch.empty_like(x, memory_format=torch.channels_last)
        mean, invstd = x.new_empty(c), x.new_empty(c)
        var = torch.empty(c, dtype=torch.float64)
        status = _kernels().batchnorm_act_forward(
            x.data_ptr(), _ptr(residual), y.data_ptr(), rows, c, weight.data_ptr(), bias.data_ptr(), eps, int(relu),
            mean.data_ptr(), invstd.data_ptr(), var.data_ptr(), torch.get_num_threads())
        if status:
            raise MemoryError(f'batchnorm_act_forward could not allocate its {c}-channel work buffers.')
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                running_var.mul_(1 - momentum).add_((var * (rows / (rows - 1))).to(running_var.dtype), alpha=momentum)
        mask_from_output = relu and residual is not None
        ctx.save_for_backward(x, weight, bias, mean, invstd, y if mask_from_output else None)
        ctx.relu, ctx.has_residual = relu, residual is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias, mean, invstd, y = ctx.saved_tensors
        n, c, h, w = x.shape
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last) if ctx.needs_input_grad[0] else None
        grad_r = None
        if ctx.has_residual and ctx.needs_input_grad[1]:
            grad_r = torch.empty_like(x, memory_format=torch.channels_last) if ctx.relu else grad
        grad_w, grad_b = x.new_empty(c), x.new_empty(c)
        status = _kernels().batchnorm_act_backward(
            grad.data_ptr(), x.data_ptr(), _ptr(y), _ptr(grad_x), _ptr(grad_r) if ctx.relu else None, n * h * w, c,
            weight.data_ptr(), bias.data_ptr(), mean.data_ptr(), invstd.data_ptr(), int(ctx.relu), grad_w.data_ptr(),
            grad_b.data_ptr(), torch.get_num_threads())
        if status:
            raise MemoryError(f'batchnorm_act_backward could not allocate its {c}-channel work buffers.')
        return (grad_x, grad_r, grad_w if ctx.needs_input_grad[2] else None,
                grad_b if ctx.needs_input_grad[3] else None, None, None, None, None, None)


def _batchnorm_sharing(cls: Type[nn.BatchNorm2d], bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A ``cls`` with ``bn``'s settings and train/eval mode, holding ``bn``'s own parameters and buffers."""
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device='meta')
    new.weight, new.bias = bn.weight, bn.bias
    for name in ('running_mean', 'running_var', 'num_batches_tracked'):
        new.register_buffer(name, getattr(bn, name))
    new.train(bn.training)
    return new


class FusedBatchNorm2d(nn.BatchNorm2d):
    """See the module docstring. Build it with :meth:`from_batchnorm`."""

    relu: bool

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, relu: bool) -> 'FusedBatchNorm2d':
        """A ``FusedBatchNorm2d`` holding ``bn``'s own parameters and buffers (no copies), in ``bn``'s mode,
        that also applies a ReLU when ``relu``."""
        new = _batchnorm_sharing(cls, bn)
        new.relu = relu
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + (', relu=True' if self.relu else '')

    def _fusable(self, x: torch.Tensor) -> bool:
        return (self.training and self.affine and type(x) is torch.Tensor and x.device.type == 'cpu'
                and x.dtype == torch.float32 and x.dim() == 4 and self.weight.dtype == torch.float32
                and x.is_contiguous(memory_format=torch.channels_last) and x.shape[0] * x.shape[2] * x.shape[3] > 1
                and not autocast_enabled('cpu') and not torch.jit.is_scripting()
                and not torch.jit.is_tracing() and not is_compiling() and kernels_available())

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``relu(bn(x) [+ residual])`` with ``relu``, else ``bn(x) [+ residual]``."""
        if not self._fusable(x) or (residual is not None and not _same_layout(residual, x)):
            out = super().forward(x)
            if residual is not None:
                out = out + residual
            if not self.relu:
                return out
            out = F.relu(out, inplace=True)
        else:
            momentum = 0.0 if self.momentum is None else self.momentum
            if self.track_running_stats and self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    momentum = 1.0 / float(self.num_batches_tracked)
            running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
            out = _BatchNormActFunction.apply(x, residual, self.weight, self.bias, *running, momentum, self.eps,
                                              self.relu)
            if not self.relu:
                return out
        if not torch.jit.is_scripting() and not torch.jit.is_tracing() and not is_compiling():
            setattr(out, _RECTIFIED, out._version)
        return out


def _same_layout(residual: torch.Tensor, x: torch.Tensor) -> bool:
    return (type(residual) is torch.Tensor and residual.shape == x.shape and residual.dtype == x.dtype
            and residual.device == x.device)


class FusedReLU(nn.ReLU):
    """The ReLU after a ``FusedBatchNorm2d(relu=True)``: returns a tensor that module rectified (and nothing has
    changed in place since) as it is, and rectifies any other input like ``nn.ReLU``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(x, _RECTIFIED, None) == x._version:
            return x
        return super().forward(x)


class FusedResidualPSABottleneck(PSABottleneck):
    """A ``PSABottleneck`` whose last BatchNorm also adds the shortcut and applies ``act3``'s ReLU:
    ``act3(bn3(x, shortcut))`` with ``bn3`` a ``FusedBatchNorm2d(relu=True)`` and ``act3`` a :class:`FusedReLU`.
    The same modules (called as modules) and state-dict keys. Any other ``bn3`` (e.g. frozen afterwards) gets
    the plain block's ``act3(bn3(x) + shortcut)``."""

    def _norm_add_act(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        if isinstance(self.bn3, FusedBatchNorm2d) and self.drop_path is None:
            return self.act3(self.bn3(x, shortcut))
        return super()._norm_add_act(x, shortcut)


# (BatchNorm, the ReLU right after it) attribute names in a PSABottleneck and in the stem of a timm ResNet
_BLOCK_PAIRS: Tuple[Tuple[str, str], ...] = (('bn1', 'act1'), ('bn2', 'act2'))
_STEM_PAIRS: Tuple[Tuple[str, str], ...] = (('bn1', 'act1'),)


def fuse_batchnorm_act(model: nn.Module) -> int:
    """Swap every plain ``nn.BatchNorm2d`` of an EPSANet for a :class:`FusedBatchNorm2d` (in place), with the
    ReLU that directly follows it (a block's ``bn1``/``act1`` and ``bn2``/``act2`` when ``drop_block`` is
    identity, the stem's ``bn1``/``act1``) fused in and that ReLU module replaced by a :class:`FusedReLU`; a
    block without ``drop_path`` becomes a :class:`FusedResidualPSABottleneck`, whose ``bn3`` also adds the
    shortcut and applies ``act3``'s ReLU. Returns the number of BatchNorms swapped; 0 (nothing changed) when
    the kernels are not available."""
    if not kernels_available():
        return 0
    count = 0
    for parent in list(model.modules()):
        if isinstance(parent, PSABottleneck):
            pairs = _BLOCK_PAIRS if isinstance(parent.drop_block, nn.Identity) else _BLOCK_PAIRS[:1]
            if parent.drop_path is None and type(parent) is PSABottleneck:
                pairs = pairs + (('bn3', 'act3'),)
        elif parent is model:
            pairs = _STEM_PAIRS
        else:
            pairs = ()
        for bn_name, act_name in pairs:
            bn, act = getattr(parent, bn_name, None), getattr(parent, act_name, None)
            if type(bn) is nn.BatchNorm2d and type(act) is nn.ReLU:
                setattr(parent, bn_name, FusedBatchNorm2d.from_batchnorm(bn, relu=True))
                setattr(parent, act_name, FusedReLU(inplace=act.inplace))
                count += 1
                if bn_name == 'bn3':
                    parent.__class__ = FusedResidualPSABottleneck
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(parent, name, FusedBatchNorm2d.from_batchnorm(child, relu=False))
                count += 1
    return count


def unfuse_batchnorm_act(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_batchnorm_act` in place: each ``FusedBatchNorm2d`` becomes a plain ``nn.BatchNorm2d``
    holding the same tensors, each ``FusedReLU`` a plain ``nn.ReLU`` and each ``FusedResidualPSABottleneck`` a
    ``PSABottleneck``."""
    for parent in list(model.modules()):
        if type(parent) is FusedResidualPSABottleneck:
            parent.__class__ = PSABottleneck
        for name, child in list(parent.named_children()):
            if isinstance(child, FusedReLU):
                setattr(parent, name, nn.ReLU(inplace=child.inplace))
            elif isinstance(child, FusedBatchNorm2d):
                setattr(parent, name, _batchnorm_sharing(nn.BatchNorm2d, child))
    return model
