"""Export a model to ONNX, TorchScript or a ``torch.export`` ExportedProgram, checked against PyTorch.

Every export is written to a temporary file next to the target, loaded back with its own runtime
(onnxruntime, ``torch.jit.load``, ``torch.export.load``), run on a fresh random batch and compared
with the PyTorch model's outputs; only a file that passes replaces the target (atomically).
With ``dynamic_batch`` the check batch has another size than the example batch, which proves the
batch axis is dynamic.

* ONNX uses ``torch.onnx.export(..., dynamo=False)`` (the TorchScript-based exporter): the dynamo
  exporter needs the ``onnxscript`` package, which this project does not depend on.
* TorchScript is deprecated by PyTorch (2.10+ warns); it is kept for runtimes that still need it.
* ExportedPrograms are saved with ``torch.export.save`` and must end in ``.pt2``.
"""
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._compat import HAS_EXPORT_DIM, onnx_export
from ..errors import EpsanetError
from ..files import atomic_write
from .onnx_forms import optimize_for_onnxruntime

__all__ = ['FORMATS', 'ExportError', 'ExportResult', 'export_model', 'load_exported', 'onnxruntime_session',
           'optimize_for_onnxruntime']

# format -> default file extension
FORMATS: Dict[str, str] = {'onnx': '.onnx', 'torchscript': '.pt', 'exported-program': '.pt2'}


class ExportError(EpsanetError, RuntimeError):
    """The model could not be exported, or the exported file disagrees with PyTorch."""


@dataclass
class ExportResult:
    path: str
    format: str
    input_shape: Tuple[int, ...]
    dynamic_batch: bool
    max_abs_diff: Optional[float] = None  # None when the check was skipped
    check_batch_size: Optional[int] = None


def export_model(
        model: nn.Module,
        path: str,
        format: str = 'onnx',
        input_size: Sequence[int] = (3, 224, 224),
        batch_size: int = 2,
        dynamic_batch: bool = True,
        opset: int = 17,
        method: str = 'trace',
        check: bool = True,
        atol: float = 1e-4,
        rtol: float = 1e-5,
        check_batch_size: Optional[int] = None,
) -> ExportResult:
    """Export ``model`` (in eval mode) to ``path`` and check the file against PyTorch.

    Args:
        model: a module taking one ``[N, C, H, W]`` tensor and returning a tensor or a
            list/tuple of tensors (classifiers, ``features_only`` models, ...).
        path: output file (``.pt2`` for ``exported-program``).
        format: ``onnx``, ``torchscript`` or ``exported-program``.
        input_size: ``(C, H, W)`` of the example input; H and W are fixed in the export.
        batch_size: batch of the example input.
        dynamic_batch: make the batch axis dynamic (ONNX and ExportedProgram; TorchScript
            modules are not tied to a batch size).
        opset: ONNX opset.
        method: TorchScript ``trace`` (default: needs no TorchScript support in the model code;
            the check at another batch size shows the trace is not tied to the example batch)
            or ``script``.
        check: reload the file and compare its outputs with PyTorch's.
        atol, rtol: the check accepts a largest absolute difference of ``atol + rtol * max|output|``. The
            ``rtol`` part scales with the outputs: float32 rounding differs by a few parts in a million, which
            for a trained network's logits in the tens exceeds a fixed ``atol`` (tolerances as in
            ``torch.testing.assert_close``, over the whole output instead of per element).
        check_batch_size: batch of the check input; default ``batch_size + 1`` when the batch is
            dynamic, else ``batch_size``.

    Raises:
        ValueError: unknown format or method, or a bad ``path``.
        ExportError: the export failed, or the outputs differ by more than that; nothing
            is written then.
    """
    if format not in FORMATS:
        raise ValueError(f'Unknown export format {format!r}: choose one of {", ".join(FORMATS)}.')
    if format == 'exported-program' and not str(path).endswith('.pt2'):
        raise ValueError(f'An ExportedProgram file must end in .pt2 (torch.export.load needs it), got {path!r}.')
    if method not in ('script', 'trace'):
        raise ValueError(f'TorchScript method must be "script" or "trace", got {method!r}.')
    if len(input_size) != 3:
        raise ValueError(f'input_size must be (channels, height, width), got {tuple(input_size)}.')
    model = model.eval()
    device = _device_of(model)
    example = torch.randn(batch_size, *input_size, device=device)
    with torch.no_grad():
        num_outputs = len(_flatten(model(example)))

    writers: Dict[str, Callable[[str], None]] = {
        'onnx': lambda f: _write_onnx(model, example, f, num_outputs, dynamic_batch, opset),
        'torchscript': lambda f: _write_torchscript(model, example, f, method),
        'exported-program': lambda f: _write_exported_program(model, example, f, dynamic_batch),
    }
    result = ExportResult(str(path), format, tuple(example.shape), dynamic_batch)

    def write_and_check(tmp: str) -> None:
        try:
            writers[format](tmp)
        except Exception as e:  # the exporters raise many types; name the step that failed
            raise ExportError(f'{format} export of {type(model).__name__} failed: {e}') from e
        if check:
            n = check_batch_size or (batch_size + 1 if dynamic_batch else batch_size)
            result.check_batch_size = n
            result.max_abs_diff = _check(model, load_exported(tmp, format), n, input_size, device, atol, rtol,
                                          format)
    # the temporary file keeps the extension: torch.export.load needs .pt2
    atomic_write(path, write_and_check, suffix=os.path.splitext(str(path))[1])
    return result


def onnxruntime_session(path: str, threads: Optional[int] = None):
    """onnxruntime's CPU session on ``path``; with ``threads``, that many intra-op threads and one inter-op
    thread (what the benchmark, the int8 comparison and the branch-form timing run under)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])


def load_exported(path: str, format: str) -> Callable[[torch.Tensor], List[torch.Tensor]]:
    """Load an exported file with its runtime; returns ``fn(x) -> list of output tensors``."""
    if format == 'onnx':
        import onnx

        onnx.checker.check_model(path)
        session = onnxruntime_session(path)
        input_name = session.get_inputs()[0].name
        return lambda x: [torch.from_numpy(o) for o in session.run(None, {input_name: x.detach().cpu().numpy()})]
    if format == 'torchscript':
        module = torch.jit.load(path, map_location='cpu')
        return lambda x: _flatten(module(x.cpu()))
    if format == 'exported-program':
        module = torch.export.load(path).module()
        return lambda x: _flatten(module(x))
    raise ValueError(f'Unknown export format {format!r}: choose one of {", ".join(FORMATS)}.')


def _write_onnx(model: nn.Module, example: torch.Tensor, path: str, num_outputs: int, dynamic: bool, opset: int):
    output_names = ['output'] if num_outputs == 1 else [f'output{i}' for i in range(num_outputs)]
    dynamic_axes = {n: {0: 'batch'} for n in ['input', *output_names]} if dynamic else None
    with warnings.catch_warnings():
        # the TorchScript-based exporter on purpose (the dynamo one needs onnxscript): silence its deprecation notice
        warnings.filterwarnings('ignore', message='.*legacy TorchScript-based ONNX export.*')
        onnx_export(
            model, (example,), path, opset_version=opset, input_names=['input'],
            output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    if dynamic:
        keep_batch_in_reshapes(path)


def keep_batch_in_reshapes(path: str) -> int:
    """Rewrite, in the ONNX file at ``path``, every ``Reshape`` to a constant ``[-1, d1, ...]`` that keeps the
    batch (the input's first dimension, as ONNX shape inference shows when ``d1 * ... `` is the input's
    per-sample size) as a ``Reshape`` to ``[0, d1, ...]`` (0: copy the input's dimension). The numbers do
    not change; shape inference then keeps the name of the dynamic batch dimension through the reshape,
    so that onnxruntime's layout optimiser can show that a residual ``Add`` has equal input shapes and fuse
    it into the conv before it. Returns the number of reshapes rewritten."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value if d.HasField('dim_value') else None for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.graph.value_info, *inferred.graph.input]}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == 'Constant'}
    initializers = {t.name: t for t in model.graph.initializer}
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != 'Reshape':
            continue
        source = constants.get(node.input[1])
        tensor = source.attribute[0].t if source is not None and source.attribute else initializers.get(node.input[1])
        if tensor is None:
            continue
        shape = numpy_helper.to_array(tensor)
        in_dims = dims.get(node.input[0])
        if (shape.ndim != 1 or len(shape) < 2 or shape[0] != -1 or (shape[1:] <= 0).any() or not in_dims
                or any(d is None for d in in_dims[1:]) or int(np.prod(in_dims[1:])) != int(np.prod(shape[1:]))):
            continue
        new = numpy_helper.from_array(np.concatenate([[0], shape[1:]]).astype(np.int64), f'{node.name}_keep_batch')
        model.graph.initializer.append(new)
        node.input[1] = new.name
        rewritten += 1
    if rewritten:
        used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
        unused = [t for t in model.graph.initializer if t.name not in used]
        for t in unused:  # the replaced shapes (onnxruntime would warn about each)
            model.graph.initializer.remove(t)
        for n in [n for n in model.graph.node if n.op_type == 'Constant' and n.output[0] not in used]:
            model.graph.node.remove(n)
        onnx.save(model, path)
    return rewritten


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: str, method: str):
    # check_trace=False: export_model runs its own check against PyTorch on a fresh batch
    module = torch.jit.script(model) if method == 'script' else torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(module, path)


def _write_exported_program(model: nn.Module, example: torch.Tensor, path: str, dynamic: bool):
    if not HAS_EXPORT_DIM:
        raise ExportError(f'torch {torch.__version__} has no torch.export.Dim; a .pt2 needs a newer torch '
                          '(ONNX and TorchScript export work with this one)')
    shapes = ({0: torch.export.Dim('batch', min=1)},) if dynamic else None
    program = torch.export.export(model, (example,), dynamic_shapes=shapes)
    torch.export.save(program, path)


@torch.no_grad()
def _check(model, run, batch_size: int, input_size, device, atol: float, rtol: float, format: str) -> float:
    x = torch.randn(batch_size, *input_size, device=device)
    expected = _flatten(model(x))
    got = run(x)
    if len(got) != len(expected):
        raise ExportError(f'The {format} file returns {len(got)} outputs, PyTorch {len(expected)}.')
    diff = scale = 0.0
    for i, (e, g) in enumerate(zip(expected, got)):
        if tuple(g.shape) != tuple(e.shape):
            raise ExportError(
                f'{format} output {i} has shape {tuple(g.shape)} for a batch of {batch_size}, PyTorch '
                f'{tuple(e.shape)}.')
        diff = max(diff, (g.to(e.device, e.dtype) - e).abs().max().item())
        scale = max(scale, e.abs().max().item())
    if not diff <= atol + rtol * scale:
        raise ExportError(
            f'The {format} file differs from PyTorch by {diff:.3g} (max abs), more than atol + rtol * max|output| = '
            f'{atol:g} + {rtol:g} * {scale:.3g}; nothing was written. A difference far above float32 rounding means '
            'the file computes something else; allow a larger difference (atol, rtol) only if you accept that.')
    return diff


def _flatten(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return list(out)
    raise ExportError(
        f'export_model needs a model returning a tensor or a list/tuple of tensors, got {type(out).__name__}.')


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device('cpu')

