"""Export a checkpoint to ONNX for TensorRT (e.g. on a Jetson), checked against PyTorch with onnxruntime.

    python export.py results/runs/demo/best.pth --output model.onnx
    python export.py P.pth --output pruned.onnx --size 512 --dynamic --opset 17

The graph takes a normalised image batch (N,3,H,W; ImageNet mean/std, as in training) named "image"
and returns the main head's logits (N,7,H,W) named "logits": the auxiliary head is dropped. The
check runs the file in onnxruntime and prints the largest absolute logit difference and the share
of pixels whose class agrees; exit status 1 when they are outside tolerance (float32: 1e-3 and
99.9%; float16: 98% agreement). Then it prints the trtexec line that builds the TensorRT engine.
"""
import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

from utils.checkpoint import load_model
from utils.cli import UserError, add_bool, require_path, resolve_device, run_main
from utils.deploy import (PARITY_RULE, LogitsOnly, check_parity, export_onnx, parity_passed,
                          trtexec_command)
from utils.evaluation import default_name


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="any checkpoint (dense or pruned) or plain state_dict")
    parser.add_argument("--output", metavar="MODEL.onnx", default=None,
                        help="ONNX file to write (default: OUTPUT_DIR/export/<checkpoint name>.onnx)")
    parser.add_argument("--size", type=int, default=512, help="input side in px traced (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="batch size traced (default: %(default)s)")
    add_bool(parser, "--dynamic", False, "free batch, height and width axes (one file for every photo size)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    add_bool(parser, "--half", False, "store the graph in float16 (TensorRT --fp16 also works from float32)")
    add_bool(parser, "--allow_pickle", False, "accept whole pickled models (unpickling runs code from the file)")
    add_bool(parser, "--overwrite", False, "replace an existing --output file")
    parser.add_argument("--device", default="auto",
                        help="where to trace and check: auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--output_dir", default="results", help="(default: %(default)s)")
    return parser


def check_args(args):
    if args.size < 32 or args.size % 8:
        raise UserError(f"--size must be a multiple of 8, at least 32, got {args.size}")
    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    if not 11 <= args.opset <= 20:
        raise UserError(f"--opset must be between 11 and 20, got {args.opset}")
    require_path(args.checkpoint, "checkpoint", "file")
    output = Path(args.output or Path(args.output_dir) / "export" / f"{default_name(args.checkpoint)}.onnx")
    if output.suffix.lower() != ".onnx":
        raise UserError(f"--output should end in .onnx, got {output}")
    if output.exists() and not args.overwrite:
        raise UserError(f"{output} already exists; pass --overwrite to replace it or choose another --output")
    return output


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    output = check_args(args)
    device = resolve_device(args.device)
    model, metadata = load_model(args.checkpoint, device=device, allow_pickle=args.allow_pickle)
    reference = LogitsOnly(model, metadata["num_classes"]).eval()
    network = copy.deepcopy(reference).half() if args.half else reference
    started = time.perf_counter()
    export_onnx(network, output, args.size, args.batch, args.dynamic, args.opset)
    megabytes = os.path.getsize(output) / 2**20
    print(f"wrote {output} ({megabytes:.1f} MB, {metadata['arch']}{' pruned' if metadata.get('pruning') else ''}, "
          f"{'float16' if args.half else 'float32'}, opset {args.opset}, input image "
          f"{'Nx3xHxW' if args.dynamic else f'{args.batch}x3x{args.size}x{args.size}'}) in "
          f"{time.perf_counter() - started:.1f} s")

    shapes = [(args.batch, args.size, args.size)]
    if args.dynamic:
        shapes.append((args.batch + 1, args.size // 2, args.size * 3 // 4))
    with torch.no_grad():
        rows = check_parity(reference, output, shapes, device)
    for row in rows:
        print(f"onnxruntime vs PyTorch (float32) on {row['shape']}: max abs logit diff {row['max_abs_diff']:.2e} "
              f"(logits up to {row['max_abs_logit']:.3g}), mean {row['mean_abs_diff']:.2e}, argmax agreement "
              f"{100 * row['argmax_agreement']:.3f}%")
    if not parity_passed(rows, args.half):
        print(f"export.py: parity check FAILED (tolerance: {PARITY_RULE[args.half]}); {output} was kept for "
              f"inspection. Float32 rounding alone exceeds 1e-3 when logits run into the hundreds, as in an "
              f"untrained network", file=sys.stderr)
        sys.exit(1)
    print("parity check passed")
    print("build the TensorRT engine on the Jetson itself (engines are specific to the device):")
    print(f"  {trtexec_command(output, args.size, args.dynamic)}")


if __name__ == "__main__":
    run_main(main)
