"""Model cards (``README.md`` of a Hub folder) and the paper's GFLOPs count."""
import json
from typing import Any, Dict, Optional

import torch
from torch import nn

__all__ = ['count_gflops', 'render_model_card']


@torch.no_grad()
def count_gflops(model: nn.Module, img_size: int = 224, in_chans: int = 3) -> float:
    """GFLOPs as the EPSANet paper counts them, at ``img_size`` x ``img_size``, batch 1.

    Multiply-accumulates of every conv and linear layer, plus two operations per BatchNorm output
    element; activations, pooling and the PSA softmax are not counted (this rule gives the paper's
    3.62 G for EPSANet-50 Small). Counted with forward hooks on one forward pass. A PSA layer's branch
    convs are counted from the layer's output (each branch makes 1/S of it), so the count does not
    depend on how the layer computes them (module calls or fused ``F.conv2d``).
    """
    from ..layers.psa import PyramidSqueezeAttention

    total = 0
    branch_convs = {id(c) for m in model.modules() if isinstance(m, PyramidSqueezeAttention) for c in m.convs}

    def count(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, PyramidSqueezeAttention):
            for conv in module.convs:
                total += output.numel() // len(module.convs) * (conv.in_channels // conv.groups) * \
                    conv.kernel_size[0] * conv.kernel_size[1]
        elif isinstance(module, nn.Conv2d) and id(module) not in branch_convs:
            total += output.numel() * (module.in_channels // module.groups) * \
                module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            total += 2 * output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        model(torch.zeros(1, in_chans, img_size, img_size, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total / 1e9


def _fmt(value: Any) -> str:
    return f'`{value}`' if isinstance(value, str) and ' ' in value and '/' in value else str(value)


def render_model_card(info: Dict[str, Any]) -> str:
    """The Hub ``README.md`` for a converted folder.

    ``info`` keys: model, tag, num_classes, in_chans, params, gflops, sha256, file_size, license,
    provenance (dict), metrics (dict or None), source_name, source_sha256, max_abs_diff.
    """
    model, tag = info['model'], info.get('tag')
    license_ = info.get('license')
    prov: Dict[str, Any] = info.get('provenance') or {}
    metrics: Optional[Dict[str, Any]] = info.get('metrics')
    front = ['---', 'library_name: timm', 'pipeline_tag: image-classification',
             'tags:', '- image-classification', '- timm', '- epsanet']
    if license_:
        front.append(f'license: {license_}')
    front.append('---')

    lines = front + [
        f'# {model}' + (f'.{tag}' if tag else ''),
        '',
        f'EPSANet ({model}) weights for [timm](https://github.com/huggingface/pytorch-image-models), made with '
        '`epsanet convert`. EPSANet is a ResNet whose bottleneck 3x3 conv is a Pyramid Squeeze Attention (PSA) '
        'layer ([paper](https://arxiv.org/abs/2105.14447), [authors\' code](https://github.com/murufeng/EPSANet)). '
        'Large models use the split-input PSA form that reproduces the paper\'s parameter and FLOP counts.',
        '',
        '## Model details',
        '',
        '| | |',
        '|---|---|',
        f'| architecture | `{model}` |',
        f'| classes | {info["num_classes"]} |',
        f'| input channels | {info.get("in_chans", 3)} |',
        f'| parameters | {info["params"]:,} |',
        f'| GFLOPs (224x224, paper\'s rule: conv/linear MACs + 2 per BN output) | {info["gflops"]:.2f} |',
        f'| weights | `model.safetensors`, {info["file_size"]:,} bytes |',
        f'| sha256 | `{info["sha256"]}` |',
        f'| licence | {license_ or "not stated by the converter"} |',
        '',
        '## Provenance',
        '',
    ]
    if prov:
        lines += [f'- **{k.replace("_", " ")}**: {_fmt(v)}' for k, v in prov.items()]
    else:
        lines.append('- Not stated by the converter.')
    lines += [
        f'- **converted from**: `{info.get("source_name", "?")}` (sha256 `{info.get("source_sha256", "?")}`)',
        f'- **conversion check**: the reloaded folder reproduces the source\'s logits '
        f'(max |difference| {info.get("max_abs_diff", 0.0):.2e}).',
        '',
        '## Metrics',
        '',
    ]
    if metrics:
        command = metrics.get('command')
        lines += ['| metric | value |', '|---|---|']
        lines += [f'| {k} | {v} |' for k, v in metrics.items() if k != 'command']
        lines += ['', f'Measured with `{command}`.' if command else
                  'As given to `epsanet convert --metrics` (a results file of `epsanet validate`).']
    else:
        lines.append('No metrics were given to `epsanet convert`: these weights have not been evaluated here.')
    lines += [
        '',
        '## How to load',
        '',
        '```python',
        'import timm',
        'import epsanet  # registers the EPSANet architectures with timm',
        '',
        'model = timm.create_model("hf-hub:<this repo id>", pretrained=True).eval()',
        '# or from a local copy of this folder:',
        'model = timm.create_model("local-dir:path/to/this/folder", pretrained=True).eval()',
        '# or the weights file alone, into any class count (the classifier is re-initialised if it differs):',
        f'model = timm.create_model("{model}", pretrained=True, num_classes=10,',
        '                          pretrained_cfg_overlay=dict(file="model.safetensors"))',
        '```',
        '',
        '## Citation',
        '',
        '```bibtex',
        '@inproceedings{zhang2022epsanet,',
        '  title={EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network},',
        '  author={Zhang, Hu and Zu, Keke and Lu, Jian and Zou, Yuru and Meng, Deyu},',
        '  booktitle={Asian Conference on Computer Vision (ACCV)},',
        '  year={2022}',
        '}',
        '```',
        '',
    ]
    return '\n'.join(lines)


def dumps(obj: Any) -> str:
    """JSON as written into converted folders (stable, readable)."""
    return json.dumps(obj, indent=2, sort_keys=False) + '\n'
