"""Model cards (``README.md`` of a Hub folder)."""
import json
from typing import Any, Dict, Optional

__all__ = ['render_model_card']


def _fmt(value: Any) -> str:
    return f'`{value}`' if isinstance(value, str) and ' ' in value and '/' in value else str(value)


def render_model_card(info: Dict[str, Any]) -> str:
    """The Hub ``README.md`` for a converted folder.

    ``info`` keys: model, tag, num_classes, in_chans, params, gflops, sha256, file_size, license,
    provenance (dict), metrics (dict or None), source_name, source_sha256, max_abs_diff, label_names
    (list or None).
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
    names = info.get('label_names')
    lines += ['', '## Classes', '']
    if names:
        lines += [f'{len(names)} classes, in classifier order (also `label_names` in config.json):', '',
                  '| index | label |', '|---|---|']
        lines += [f'| {i} | {n} |' for i, n in enumerate(names)]
    else:
        lines.append('No class names were given to `epsanet convert`: predictions are class indices.')
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
