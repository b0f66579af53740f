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

from utils.checkpoint import check_model_options
from utils.cli import (ArgumentParser, UserError, add_bool, add_quiet, cap_workers, check_batch_memory, run_main,
                       script_main)
from utils.evaluation import run
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


def check_args(args):
    """Value checks argparse cannot do; each failure is one line and exit status 2."""
    check_model_options(args.weights, args.pruned_model, args.use_pruned)
    if str(args.weights).lower().endswith(".onnx") and (args.pruned_model or args.amp):
        raise UserError(f"--weights {args.weights} is an ONNX graph: it is scored as exported, without "
                        f"{'--pruned_model' if args.pruned_model else '--amp'} (its precision was fixed by export.py)")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    for option in ("eval_size", "tile"):
        value = getattr(args, option)
        if value is not None and value < 8:
            raise UserError(f"--{option} must be at least 8 px, got {value}")
    if args.stride is not None and (args.tile is None or not 0 < args.stride <= args.tile):
        raise UserError("--stride needs --tile and must be between 1 and --tile")
    if args.tile_batch < 1:
        raise UserError(f"--tile_batch must be at least 1, got {args.tile_batch}")
    for option in ("workers", "boundary_ignore", "lt_tolerance"):
        if getattr(args, option) < 0:
            raise UserError(f"--{option} cannot be negative, got {getattr(args, option)}")
    args.workers = cap_workers(args.workers)
    check_batch_memory(args.tile_batch, args.tile, "--tile_batch x --tile")


main = script_main(get_args_parser, run, check_args)


if __name__ == "__main__":
    run_main(main)
