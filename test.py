"""Evaluate a checkpoint on a labelled S2DS-format split and write an Excel report.

    python test.py TEST_DIR --weights W.pth
    python test.py TEST_DIR --weights W.pth --pruned_model P.pth --use_pruned
    python test.py TEST_DIR --weights results/export/W_int8.onnx

Scores the whole split at each label's own resolution from one confusion matrix: per class IoU,
precision, recall, F1 (= Dice), support; pixel accuracy, mIoU (with and without background), mean
F1, frequency-weighted IoU; crack ltIoU and tolerance F1 on thinned lines; per-image mIoU and crack
IoU (mean and std); latency. Writes OUTPUT_DIR/test/NAME.xlsx and NAME_confusion.png, and appends one
row to OUTPUT_DIR/model_test_results.xlsx so variants (e.g. pruned ones) sit side by side.
"""
import argparse

from utils.cli import ArgumentParser, add_bool, add_quiet, options_from, run_main, script_main
from utils.evaluation import TestOptions, run
from utils.options import add_output_options, add_system_options, add_tiling_options, add_trained_network_options


def get_args_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("test_dir", metavar="TEST_DIR",
                        help="split to score (Images/ + Labels_grayscale/ or Labels_RGB/)")

    add_trained_network_options(parser, "--weights", "checkpoint or plain state_dict (thesis 8-output files too); "
                                "alone when it describes itself; or an ONNX graph from export.py (float32, float16 "
                                "or INT8), run by onnxruntime")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval_size", type=int, default=None,
                            help="resize images to this shorter side before the network; predictions are "
                                 "scored at the label's resolution (default: native resolution)")
    add_tiling_options(evaluation, "sliding-window evaluation with tiles of at most this side in px, for large images")
    evaluation.add_argument("--boundary_ignore", type=int, default=0, metavar="PX",
                            help="ignore a band of PX px around areal defects (not cracks), as the S2DS "
                                 "authors do (default: %(default)s)")
    evaluation.add_argument("--lt_tolerance", type=int, default=4, metavar="PX",
                            help="tolerance in px of the crack ltIoU / tolerance F1 (default: %(default)s)")
    evaluation.add_argument("--batch_size", type=int, default=1,
                            help="images per forward; 1 gives the per-image latency (default: %(default)s)")
    add_bool(evaluation, "--amp", False, "mixed precision (float16 on CUDA, bfloat16 on CPU)")

    output = parser.add_argument_group("output")
    output.add_argument("--name", default=None,
                        help="report name (default: the weights file's stem; its folder too for best/last.pth)")
    add_bool(output, "--save_predictions", False,
             "save each prediction as a grayscale class-id PNG under OUTPUT_DIR/test/NAME_predictions/")
    add_output_options(output, "an existing report of the same --name")
    add_system_options(parser, workers=2)
    add_quiet(parser)
    return parser


def run_command(args):
    """The parsed command line as utils.evaluation.TestOptions (checked when made: one-line errors), then the run."""
    return run(options_from(TestOptions, vars(args)))


main = script_main(get_args_parser, run_command)


if __name__ == "__main__":
    run_main(main)
