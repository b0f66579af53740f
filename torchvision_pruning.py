"""Structured channel pruning of a trained segmentation network (torch-pruning), pickle-free output.

    python torchvision_pruning.py --pruning_ratio 50 --importance_type Magnitude --p_value 2 \\
        --model_name NAME --iterative_steps 5 --state_dict W.pth --keep_feature_extract False
    python torchvision_pruning.py --pruning_ratio 50 --importance_type Taylor --data TRAIN_DIR \\
        --model_name NAME --state_dict W.pth

Removes --pruning_ratio percent of the channels of every prunable layer (the class-producing
convolutions are never pruned), in --iterative_steps equal steps; with --data, re-estimates BatchNorm
statistics after each step (--bn_recalibrate) and fine-tunes --finetune_steps with the recipe the network
was trained with (--distill: learning from the dense network too), keeping the best step by --val_data. Writes OUTPUT_DIR/pruned/NAME.pth (our checkpoint format
with the pruning history: loads with weights_only=True; train.py --pruned_model and test.py take it)
and NAME_steps.csv (per step: ratio, MACs, params, val mIoU, seconds).

    python torchvision_pruning.py --target_gmacs 40 --val_data VAL_DIR --state_dict W.pth --model_name NAME
    python torchvision_pruning.py --plan results/pruned/NAME_plan.json --state_dict W.pth --model_name AGAIN

Pruning to a budget (--target_gmacs or --target_latency_ms, instead of --pruning_ratio) gives each part its own
ratio: each part cut alone at 10%, 20%, ... 90% is scored on --val_data and measured, then the part whose next
10% saves the most cost per val mIoU lost is cut, repeatedly, until the budget is met (the last cut bisected to
the whole percent). The chosen ratios are printed and saved as NAME_plan.json; --plan replays them.
"""
import argparse

from utils.cli import ArgumentParser, add_bool, add_config, add_quiet, options_from, run_main, script_main
from utils.model import ARCHS, INITS, add_output_stride_option
from utils.options import (add_allow_pickle, add_finetune_options, add_measurement_options, add_output_options,
                           add_pruning_options, add_recipe_options, add_system_options)
from utils.prune_run import PruneRun, run


def get_args_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    model = parser.add_argument_group("model to prune")
    model.add_argument("--state_dict", metavar="W.pth",
                       help="trained weights: a CrackSense checkpoint (dense or already pruned) or a plain "
                            "state_dict such as the thesis' *_weights.pth")
    model.add_argument("--arch", default=None, choices=list(ARCHS),
                       help="architecture; with --state_dict only checked against the file (default: the "
                            "file's; deeplabv3_resnet101 with --init)")
    model.add_argument("--init", default=None, choices=INITS,
                       help="prune a fresh --arch instead of --state_dict (coco, imagenet or none). Rarely "
                            "useful: pruning an untrained network keeps arbitrary channels")
    add_bool(model, "--keep_feature_extract", False,
             "as in training: fine-tune only the classifier head between steps (all layers are still pruned)")
    add_allow_pickle(model)
    add_output_stride_option(model)

    pruning = parser.add_argument_group("pruning")
    add_pruning_options(pruning)
    # --pruning_ratio or a budget (or a plan): PruneRun refuses none and both in one line
    next(action for action in pruning._group_actions if action.dest == "pruning_ratio").required = False
    pruning.add_argument("--model_name", default=None,
                         help="output name under OUTPUT_DIR/pruned/ (default: arch_importance_ratio)")

    budget = parser.add_argument_group(
        "pruning to a budget (instead of --pruning_ratio)",
        "each part (ResNet stage, ASPP, head 3x3 conv) gets its own ratio, chosen from the val mIoU it loses and the "
        "cost it saves when cut alone (measured on --val_data in 10% steps), greedily until the budget is met; the "
        "plan is saved as OUTPUT_DIR/pruned/NAME_plan.json")
    budget.add_argument("--target_gmacs", type=float, default=None, metavar="G",
                        help="GMACs of the deployed network at --measure_size to reach (at or below)")
    budget.add_argument("--target_latency_ms", type=float, default=None, metavar="T",
                        help="latency in ms to reach, measured on --device at --measure_size as every latency here "
                             "(deployed network, batch 1, median of --latency_runs interleaved rounds)")
    budget.add_argument("--plan", metavar="FILE.json", default=None,
                        help="replay a saved NAME_plan.json: its per-part ratios, no new measurements")

    tuning = parser.add_argument_group("data and recovery: Taylor gradients, BatchNorm recalibration, fine-tuning, "
                                       "scoring")
    tuning.add_argument("--data", metavar="TRAIN_DIR",
                        help="training split: Taylor's gradients, BatchNorm recalibration and fine-tuning")
    tuning.add_argument("--val_data", metavar="VAL_DIR",
                        help="score the val mIoU after every step and keep the best fine-tuning step; needed by "
                             "--target_gmacs/--target_latency_ms")
    add_finetune_options(tuning)
    add_recipe_options(parser, "the value the network was trained with (its checkpoint's args), else the default")

    output = parser.add_argument_group("output")
    add_output_options(output, "an existing OUTPUT_DIR/pruned/NAME.pth")
    add_bool(output, "--save_pickle", False,
             "also write NAME_pickled.pth, a whole pickled model (needs --allow_pickle to load again)")
    add_measurement_options(output)

    system = add_system_options(parser, workers=2)
    system.add_argument("--seed", type=int, default=42, help="(default: %(default)s)")
    add_config(parser)
    add_quiet(parser)
    return parser


def run_options(args):
    """The parsed command line as utils.pruning's PruneRun (checked as it is made), run."""
    return run(options_from(PruneRun, vars(args)))


main = script_main(get_args_parser, run_options)


if __name__ == "__main__":
    run_main(main)
