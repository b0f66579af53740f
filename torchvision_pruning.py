"""Structured channel pruning of a trained segmentation network (torch-pruning), pickle-free output.

    python torchvision_pruning.py --pruning_ratio 50 --importance_type Magnitude --p_value 2 \\
        --model_name NAME --iterative_steps 5 --state_dict W.pth --keep_feature_extract False
    python torchvision_pruning.py --pruning_ratio 50 --importance_type Taylor --data TRAIN_DIR \\
        --model_name NAME --state_dict W.pth

Removes --pruning_ratio percent of the channels of every prunable layer (the class-producing
convolutions are never pruned), in --iterative_steps equal steps, optionally fine-tuning on --data
after each step and scoring on --val_data. Writes OUTPUT_DIR/pruned/NAME.pth (our checkpoint format
with the pruning history: loads with weights_only=True; train.py --pruned_model and test.py take it)
and NAME_steps.csv (per step: ratio, MACs, params, val mIoU, seconds).
"""
import argparse

from utils.cli import (ArgumentParser, UserError, add_bool, add_config, add_quiet, cap_workers, check_batch_memory,
                       plain_name, resolve_device, run_main, script_main)
from utils.model import ARCHS, INITS, add_output_stride_option
from utils.options import (add_allow_pickle, add_measurement_options, add_output_options, add_pruning_options,
                           add_system_options, add_tuning_options)
from utils.pruning import run


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
    pruning.add_argument("--model_name", default=None,
                         help="output name under OUTPUT_DIR/pruned/ (default: arch_importance_ratio)")

    tuning = parser.add_argument_group("data: Taylor gradients, fine-tuning and scoring between steps")
    tuning.add_argument("--data", metavar="TRAIN_DIR",
                        help="training split; required by Taylor and by --finetune_epochs")
    tuning.add_argument("--val_data", metavar="VAL_DIR", help="score the val mIoU after every step")
    tuning.add_argument("--finetune_epochs", type=int, default=0,
                        help="epochs of fine-tuning on --data after every step; 0 = none, as in the thesis "
                             "(default: %(default)s)")
    add_tuning_options(tuning)

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


def check_args(args):
    """Checks argparse cannot do, before anything is loaded; each failure is one line and exit status 2."""
    taylor = args.importance_type.lower() == "taylor"
    needs_data = [reason for reason, on in (("--importance_type Taylor", taylor),
                                            ("--finetune_epochs", args.finetune_epochs > 0)) if on]
    if needs_data and not args.data:
        raise UserError(f"{needs_data[0]} needs --data TRAIN_DIR: Taylor importance and fine-tuning use the "
                        f"real segmentation loss on training images, never random input")
    if (args.finetune_epochs > 0 or (taylor and args.calib_mode == "train")) and args.batch_size < 2:
        raise UserError(f"--batch_size must be at least 2 for BatchNorm in train mode, got {args.batch_size}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    for option, lowest in (("iterative_steps", 1), ("calib_batches", 1), ("crop_size", 8), ("measure_size", 32),
                           ("finetune_epochs", 0), ("latency_runs", 0), ("workers", 0)):
        if getattr(args, option) < lowest:
            raise UserError(f"--{option} must be at least {lowest}, got {getattr(args, option)}")
    args.workers = cap_workers(args.workers)
    check_batch_memory(args.batch_size, args.crop_size, "--batch_size x --crop_size")
    if args.round_to is not None and args.round_to < 1:
        raise UserError(f"--round_to must be a positive number of channels, got {args.round_to}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.model_name is not None:
        plain_name(args.model_name, "--model_name")
    args.device = str(resolve_device(args.device))


main = script_main(get_args_parser, run, check_args)


if __name__ == "__main__":
    run_main(main)
