"""The pruning study: every combination of criterion, norm, ratio and schedule pruned from one trained network,
fine-tuned, scored on the test split as test.py scores it and timed beside the dense network.

    python study.py --state_dict results/runs/base/best.pth --data data/train --val_data data/val \\
        --test_data data/test --pruning_ratio 20 40 60 --importance_type Magnitude Taylor --p_value 1 2 \\
        --iterative_steps 1 5 --finetune_steps 500 --finetune_val_every 100 --name r101_study
    python study.py ... --sensitivity     each part (ResNet stage, ASPP, head 3x3 conv) pruned alone, untuned

    python study.py ... --importance_type Magnitude Taylor Random --seeds 1 2     with the random control, 2 seeds
    torchrun --nproc_per_node 4 study.py ...     the runs shared out over 4 GPUs (docs/study.md: several machines)

Every variant, and a dense twin fine-tuned with the same recipe, steps and seed (the reference every change is
taken against; the untuned dense row stays, labelled), runs once per --seeds value. Writes OUTPUT_DIR/studies/NAME/:
one checkpoint per (variant, seed) (NAME/<variant>_seed<S>.pth, for test.py, inference.py, benchmark.py), study.csv
(one row per (variant, seed): criterion, p, ratio, steps, GMACs, params, latency, speed-up, test mIoU, crack IoU,
crack tolerance F1, change against the dense fine-tuned twin of that seed), study_summary.csv and study.xlsx (mean
and spread over seeds, changes marked "within noise" when no larger than the spread), study.png (the scores against
GMACs and latency, bars: spread), and with --sensitivity sensitivity.csv and sensitivity.png. Latency is measured as
everywhere in CrackSense (utils/timing.py: deployed network, warm-up, median of interleaved rounds). Rerun the same
command to resume after an interruption: finished (variant, seed) runs (NAME/runs/*.json) are kept. Other arguments
under an existing NAME need --overwrite.
"""
import argparse

from utils.cli import ArgumentParser, add_bool, add_config, add_quiet, options_from, run_main, script_main
from utils.model import add_output_stride_option
from utils.options import (add_allow_pickle, add_finetune_options, add_int8_recipe_options, add_measurement_options,
                           add_output_options, add_pruning_options, add_recipe_options, add_system_options)
from utils.study import StudyOptions, run


def get_args_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("the dense network")
    model.add_argument("--state_dict", required=True, metavar="W.pth",
                       help="trained weights: a CrackSense checkpoint or a plain state_dict (thesis *_weights.pth)")
    add_allow_pickle(model)
    add_output_stride_option(model)

    grid = parser.add_argument_group("the grid (every combination runs)")
    add_pruning_options(grid, grid=True)
    grid.add_argument("--target_gmacs", type=float, nargs="+", default=[], metavar="G",
                      help="budgets in GMACs at --measure_size: each adds, per criterion and schedule, the budget met "
                           "by uniform pruning (the ratio of equal GMACs) and by a per-part plan "
                           "(torchvision_pruning.py --target_gmacs), both fine-tuned alike (needs --val_data)")
    add_bool(grid, "--sensitivity", False,
             "instead of the grid: prune each part alone (ResNet stage, ASPP, head 3x3 conv) at each ratio with the "
             "first criterion, no fine-tuning, and plot the val mIoU drop per part")

    tuning = parser.add_argument_group("data and recovery (torchvision_pruning.py's names; every arm, the dense twin "
                                       "included, gets the same budget)")
    tuning.add_argument("--data", metavar="TRAIN_DIR",
                        help="training split: Taylor gradients, BatchNorm recalibration and fine-tuning")
    tuning.add_argument("--val_data", metavar="VAL_DIR", help="validation split: picks the best fine-tuning step")
    tuning.add_argument("--test_data", metavar="TEST_DIR", help="test split: every variant is scored on it")
    add_finetune_options(tuning)
    add_recipe_options(parser, "the value the dense network was trained with (its checkpoint's args), else the "
                               "default")

    int8 = parser.add_argument_group("INT8 after pruning")
    int8.add_argument("--int8", nargs="*", default=None, metavar="VARIANT",
                      help="add an INT8 row for every variant and the dense fine-tuned twin (or only for the variants "
                           "named, as in study.csv's variant column): export.py --int8's QDQ graph, scored through "
                           "onnxruntime as test.py scores it and timed beside the others")
    int8.add_argument("--calib_images", type=int, default=16, metavar="N",
                      help="--val_data images that calibrate each INT8 graph (default: %(default)s)")
    add_int8_recipe_options(int8)

    output = parser.add_argument_group("measurement and output")
    output.add_argument("--name", required=True, help="study folder under OUTPUT_DIR/studies/")
    output.add_argument("--lt_tolerance", type=int, default=4, metavar="PX",
                        help="tolerance of the crack tolerance F1, as test.py (default: %(default)s)")
    add_measurement_options(output)
    add_output_options(output, "the study of this --name: start it again (needed when its arguments changed)")

    system = add_system_options(parser, workers=2)
    system.add_argument("--seeds", type=int, nargs="+", default=[42], metavar="SEED",
                        help="repeat every variant and the dense fine-tuned twin once per seed (pruning randomness, "
                             "Taylor's calibration batches, crops, fine-tuning order); the tables give mean and "
                             "spread over seeds, e.g. --seeds 1 2 3 (default: 42)")
    add_config(parser)
    add_quiet(parser)
    return parser


def run_options(args):
    """The parsed command line as utils.study's StudyOptions (every check happens as it is made), run."""
    return run(options_from(StudyOptions, vars(args)))


main = script_main(get_args_parser, run_options)


if __name__ == "__main__":
    run_main(main)
