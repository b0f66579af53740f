"""Segment your own photos (one file, a folder or a pattern) and get figures and masks at full size.

    python inference.py --state_dict W.pth --image IMG.png --mode overlay --save_figure
    python inference.py --state_dict W.pth --image photos/ --mode side_by_side save_mask --save_figure
    python inference.py --state_dict W.pth --pruned_model P.pth --use_pruned --image 'site/*.jpg' --save_figure

Modes: side_by_side (photo | colour mask, legend of the classes present and their share of pixels),
overlay (the mask blended over the photo at the photo's own resolution, with the legend), save_mask
(a class-id grayscale PNG and an RGB mask in the Labels_RGB palette, at the photo's resolution).
Photos whose longer side exceeds --max_size are predicted in overlapping tiles, so a 6000x4000 px
photo runs on a CPU or a Jetson. Outputs: OUTPUT_DIR/inference/<stem>_<name>_<mode>.png, and for save_mask
<stem>_<name>_mask.png and <stem>_<name>_mask_rgb.png, where <name> is --name or comes from the weights file
(runs/demo/best.pth -> demo_best), so two models never write over each other's outputs; a rerun of the same
model replaces them (and says so), an input is never written over, and an --output_dir whose inference/ folder
is (or is inside) a folder --image reads is refused: the next run would read its own outputs as photos.
"""
import argparse

from utils.cli import ArgumentParser, add_bool, add_quiet, options_from, run_main, script_main, str2bool
from utils.inference import DEFAULT_MAX_SIZE, DEFAULT_TILE, MODES, InferenceOptions, run
from utils.options import add_system_options, add_tiling_options, add_trained_network_options


def get_args_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trained_network_options(parser, "--state_dict", "checkpoint or plain state_dict (thesis 8-output files too)")

    inputs = parser.add_argument_group("input and prediction")
    inputs.add_argument("--image", required=True, metavar="PATH",
                        help="a photo, a folder of photos (not recursive) or a quoted pattern like 'site/*.jpg'")
    inputs.add_argument("--max_size", type=int, default=DEFAULT_MAX_SIZE, metavar="PX",
                        help="photos whose longer side exceeds this are predicted in tiles; 0: every photo "
                             "whole, in one forward, when it fits in memory (default: %(default)s)")
    add_tiling_options(inputs, f"largest tile side in px; given, every photo is tiled (default: {DEFAULT_TILE}, "
                               f"above --max_size only)")
    add_bool(inputs, "--half", False, "float16 on a CUDA GPU (e.g. a Jetson); refused on the CPU")
    add_bool(inputs, "--channels_last", False, "channels-last memory format (often faster on GPUs; same masks)")

    output = parser.add_argument_group("output")
    output.add_argument("--mode", nargs="+", default=["overlay"], metavar="MODE",
                        help=f"one or more of {', '.join(MODES)} (default: overlay)")
    add_bool(output, "--save_figure", False,
             "write figures to OUTPUT_DIR/inference/<stem>_<name>_<mode>.png (save_mask always writes its masks)")
    output.add_argument("--show", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                        help="open the figures in a window (default: only when --save_figure is not given)")
    output.add_argument("--alpha", type=float, default=0.5,
                        help="opacity of the class colours in the overlay, 0-1 (default: %(default)s)")
    output.add_argument("--name", default=None,
                        help="the model's name in output file names and captions (default: from the weights "
                             "file, e.g. demo_best from runs/demo/best.pth)")
    output.add_argument("--output_dir", default="results", help="where every output goes (default: %(default)s)")
    add_system_options(parser)
    add_quiet(parser)
    return parser


def run_command(args):
    """The parsed command line as utils.inference.InferenceOptions (checked when made: one-line errors), then
    the run."""
    return run(options_from(InferenceOptions, vars(args)))


main = script_main(get_args_parser, run_command)


if __name__ == "__main__":
    run_main(main)
