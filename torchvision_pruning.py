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
from utils.losses import LOSSES
from utils.model import ARCHS, INITS, add_output_stride_option
from utils.prune_ops import IMPORTANCES
from utils.pruning import run
from utils.recipe import OPTIMIZERS


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
    add_bool(model, "--allow_pickle", False, "accept a whole pickled model (unpickling runs code from the file)")
    add_output_stride_option(model)

    pruning = parser.add_argument_group("pruning")
    pruning.add_argument("--pruning_ratio", type=float, required=True, metavar="PERCENT",
                         help="percent of channels to remove, 0 to 99 (50 halves every prunable layer)")
    pruning.add_argument("--importance_type", default="Magnitude", metavar="NAME",
                         help=f"channel ranking: {', '.join(IMPORTANCES)}. Taylor uses gradients of the real "
                              f"loss on --data (default: %(default)s)")
    pruning.add_argument("--p_value", type=int, default=2,
                         help="norm of Magnitude/LAMP/FPGM: 1 = L1, 2 = L2, any positive integer "
                              "(default: %(default)s)")
    pruning.add_argument("--iterative_steps", type=int, default=1,
                         help="reach the ratio in this many equal steps (default: %(default)s)")
    add_bool(pruning, "--global_pruning", False,
             "rank channels across layers instead of removing the same share from each")
    pruning.add_argument("--round_to", type=int, default=None, metavar="N",
                         help="keep channel counts multiples of N (8 or 16 suit TensorRT and tensor cores)")
    pruning.add_argument("--model_name", default=None,
                         help="output name under OUTPUT_DIR/pruned/ (default: arch_importance_ratio)")

    tuning = parser.add_argument_group("data: Taylor gradients, fine-tuning and scoring between steps")
    tuning.add_argument("--data", metavar="TRAIN_DIR",
                        help="training split; required by Taylor and by --finetune_epochs")
    tuning.add_argument("--val_data", metavar="VAL_DIR", help="score the val mIoU after every step")
    tuning.add_argument("--calib_batches", type=int, default=8,
                        help="batches whose loss gradients rank channels for Taylor, fresh before every step "
                             "(default: %(default)s)")
    tuning.add_argument("--calib_mode", default="eval", choices=("eval", "train"),
                        help="BatchNorm while Taylor's gradients are taken: eval (running statistics, as "
                             "deployed) or train (batch statistics; the loss is then blind to the scale of a "
                             "convolution followed by BatchNorm, which weakens the ranking) (default: %(default)s)")
    tuning.add_argument("--finetune_epochs", type=int, default=0,
                        help="epochs of fine-tuning on --data after every step; 0 = none, as in the thesis "
                             "(default: %(default)s)")
    tuning.add_argument("--batch_size", type=int, default=4,
                        help="images per batch, at least 2 (default: %(default)s)")
    tuning.add_argument("--crop_size", type=int, default=512, help="random crop side in px (default: %(default)s)")
    tuning.add_argument("--lr", type=float, default=0.001,
                        help="fine-tuning learning rate, poly decay per step (default: %(default)s)")
    tuning.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help="(default: %(default)s)")
    tuning.add_argument("--weight_decay", type=float, default=1e-4, help="(default: %(default)s)")
    tuning.add_argument("--loss", default="ce_weighted", choices=LOSSES,
                        help="segmentation loss, as in train.py (default: %(default)s)")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="results", help="(default: %(default)s)")
    add_bool(output, "--overwrite", False, "replace an existing OUTPUT_DIR/pruned/NAME.pth")
    add_bool(output, "--save_pickle", False,
             "also write NAME_pickled.pth, a whole pickled model (needs --allow_pickle to load again)")
    output.add_argument("--measure_size", type=int, default=512,
                        help="image side in px at which MACs and latency are measured (default: %(default)s)")
    output.add_argument("--latency_runs", type=int, default=5,
                        help="timed batch-1 forward passes, dense and pruned (median); 0 skips (default: "
                             "%(default)s)")

    system = parser.add_argument_group("system")
    system.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    system.add_argument("--workers", type=int, default=2, help="data-loading processes (default: %(default)s)")
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
