"""Export a checkpoint to ONNX for TensorRT (e.g. on a Jetson), checked against PyTorch with onnxruntime.

    python export.py results/runs/demo/best.pth --output model.onnx
    python export.py P.pth --output pruned.onnx --size 512 --dynamic --opset 17
    python export.py P.pth --output pruned.onnx --size 512 --int8 --calib_data data/val --calib_images 16
    python export.py P.pth --output jetson.onnx --size 512 --dynamic --int8 --int8_target tensorrt --calib_data data/val

The graph takes a normalised image batch (N,3,H,W; ImageNet mean/std, as in training) named "image"
and returns the main head's logits (N,7,H,W) named "logits": the auxiliary head is dropped. The
check runs the file in onnxruntime and prints the largest absolute logit difference and the share
of pixels whose class agrees; exit status 1 when they are outside tolerance (float32: 1e-3 + 1e-4 x the
largest |logit| and 99.9%; float16: 98% agreement). Then it prints the trtexec line that builds the TensorRT engine.

--int8 also writes <output stem>_int8.onnx: onnxruntime's static quantisation in QDQ format for the runtime
--int8_target names: cpu (the default: uint8 asymmetric activations, int8 weights, U8S8, what onnxruntime's x86
and ARM kernels run fast) or tensorrt (int8 symmetric activations and weights, every zero point 0, S8S8, what
trtexec --int8 takes; its trtexec line is printed). Weights get one scale per output channel (--int8_weights
per_tensor: one per tensor; --int8_reduce_range: 7 bits); activation ranges are calibrated on --calib_images
images of the split --calib_data, read as in training and resized to --size (--int8_calibration percentile or
entropy clips them); --int8_float_layers N keeps in float the N convolutions whose quantisation alone costs the
most agreement. It prints the share of pixels whose class the INT8 graph predicts as the float32 graph does, and
its mIoU against the float32 predictions, on every image of that split. docs/deployment_int8.md says which target
to take for a laptop, an x86 edge box and a Jetson.
"""
import argparse

from utils.cli import ArgumentParser, add_bool, add_quiet, options_from, run_main, script_main
from utils.deploy import ExportOptions, run_export
from utils.model import add_output_stride_option
from utils.options import add_allow_pickle, add_int8_recipe_options, add_output_options, add_system_options


def get_args_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="any checkpoint (dense or pruned) or plain state_dict")
    parser.add_argument("--output", metavar="MODEL.onnx", default=None,
                        help="ONNX file to write (default: OUTPUT_DIR/export/<checkpoint name>.onnx)")
    parser.add_argument("--size", type=int, default=512, help="input side in px traced (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="batch size traced (default: %(default)s)")
    add_bool(parser, "--dynamic", False, "free batch, height and width axes (one file for every photo size)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    add_bool(parser, "--half", False, "store the graph in float16 (TensorRT --fp16 also works from float32)")
    add_bool(parser, "--int8", False, "also write OUTPUT_int8.onnx, statically quantised (QDQ) for INT8 "
                                      "(needs --calib_data)")
    parser.add_argument("--calib_data", metavar="SPLIT", default=None,
                        help="split whose Images/ calibrate --int8's activation ranges (e.g. the val split)")
    parser.add_argument("--calib_images", type=int, default=16, metavar="N",
                        help="calibration images, spread over the split (default: %(default)s)")
    add_int8_recipe_options(parser)
    add_allow_pickle(parser)
    add_output_stride_option(parser)
    add_output_options(parser, "an existing --output file")
    add_system_options(parser)
    add_quiet(parser)
    return parser


def run(args):
    """Checks (utils.deploy.ExportOptions, when made) and the run on the typed options."""
    return run_export(options_from(ExportOptions, vars(args)))


main = script_main(get_args_parser, run)


if __name__ == "__main__":
    run_main(main)
