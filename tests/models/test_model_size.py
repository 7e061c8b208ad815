"""Parameter counts and GFLOPs under the paper's counting rule (spec section 3)."""
import pytest
import timm
import torch
from torch import nn

EXPECTED = {
    # name: (params, GFLOPs rounded to 2 decimals)
    'epsanet50': (22_561_715, 3.62),
    'epsanet50_large': (27_899_518, 4.72),
    'epsanet101': (38_900_279, 6.82),
    'epsanet101_large': (49_592_198, 8.97),
}


def paper_flops(model: nn.Module, size: int = 224, in_chans: int = 3) -> int:
    """Conv and linear multiply-accumulates, plus 2 operations per BatchNorm output element.

    Runs on the meta device: only shapes are computed, so a 224x224 EPSANet-101 costs nothing.
    Plain forward hooks: every conv, PSA branches included, is called as a module.
    """
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.BatchNorm2d):
            total += 2 * output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model(torch.empty(1, in_chans, size, size, device='meta'))
    for h in hooks:
        h.remove()
    return total


def test_counter_on_a_known_layer():
    conv = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8))
    # conv: 8 out channels x 5x5 positions x (4/2 in) x 9 MACs; BN: 2 x 8x5x5
    assert paper_flops(conv.to("meta").eval(), size=5, in_chans=4) == 8 * 25 * 2 * 9 + 2 * 8 * 25


@pytest.mark.parametrize('name', list(EXPECTED))
def test_params_and_gflops_match_the_paper(name):
    params, gflops = EXPECTED[name]
    model = timm.create_model(name, device='meta').eval()
    assert sum(p.numel() for p in model.parameters()) == params
    assert round(paper_flops(model) / 1e9, 2) == gflops
