"""``epsanet models``: list the registered EPSANet models with their size and cost."""
import argparse

COMMAND = 'models'


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        COMMAND, help='list the EPSANet models with params and GFLOPs (paper counting rule, 224x224)')
    parser.add_argument('--pretrained', action='store_true', help='only models with registered pretrained weights')
    return parser


def run(args: argparse.Namespace) -> int:
    import timm

    import epsanet  # noqa: F401  (registers the models)
    from epsanet.models.flops import count_gflops

    names = timm.list_models('epsanet*', pretrained=args.pretrained)
    if not names:
        print('No EPSANet weights are registered yet: see the "Weights" section of the README.')
        return 0
    print(f'| {"model":<22} | {"params":>12} | {"GFLOPs":>6} |')
    print(f'|{"-" * 24}|{"-" * 14}|{"-" * 8}|')
    for name in names:
        model = timm.create_model(name, device='meta')  # shapes only: no memory, no compute
        params = sum(p.numel() for p in model.parameters())
        print(f'| {name:<22} | {params:>12,} | {count_gflops(model):>6.2f} |')
    return 0
