"""``epsanet quantize``: an int8 ONNX model for onnxruntime, calibrated on images, with what it costs."""
import argparse

COMMAND = 'quantize'


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..app.flags import add_config_arguments
    from ..quantize import QuantizeConfig

    parser = subparsers.add_parser(
        COMMAND, help='write an int8 ONNX model (onnxruntime static quantization) and compare it with float32',
        description='Export the weights to ONNX, calibrate int8 activation ranges on --split images and compare '
                    'the float32 and int8 files: top-1 on --eval-split and speed in onnxruntime on this CPU.')
    add_config_arguments(parser, QuantizeConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..app.errors import TrainError
    from ..app.flags import config_from_args
    from ..data import DataError
    from ..export import ExportError
    from ..quantize import QuantizeConfig, quantize
    from . import CLIError

    try:
        r = quantize(config_from_args(QuantizeConfig, args))
    except (DataError, TrainError, ExportError) as e:
        raise CLIError(str(e)) from e
    print(f'wrote {r["output"]} (int8, {r["size_mib_int8"]} MiB; float32 {r["size_mib_float32"]} MiB), calibrated on '
          f'{r["calibration_images"]} images ({r["calibrate_method"]})')
    if 'top1_int8' in r:
        print(f'{r["eval_split"]}: top-1 float32 {r["top1_float32"]:.2f}%, int8 {r["top1_int8"]:.2f}%, same top-1 on '
              f'{r["top1_agreement"]:.2f}% of {r["eval_images"]} images')
    if 'int8_speedup' in r:
        print(f'onnxruntime on {r["cpu"]}, batch {r["speed_batch_size"]}: float32 {r["img_per_s_float32"]:.1f} img/s, '
              f'int8 {r["img_per_s_int8"]:.1f} img/s ({r["int8_speedup"]:.2f}x)')
    return 0
