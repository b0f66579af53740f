"""Train a segmentation network on an S2DS-format dataset (several GPUs: torchrun).

    python train.py TRAIN_DIR VAL_DIR RUN_NAME [options]
    torchrun --nproc_per_node 2 train.py TRAIN_DIR VAL_DIR RUN_NAME [options]

Writes results/runs/RUN_NAME/: last.pth, best.pth, metrics.csv, curves.png, args.json.
"""
import argparse

from utils.cli import ArgumentParser, UserError, add_bool, run_main, script_main
from utils.losses import LOSSES
from utils.model import ARCHS, DEFAULT_ARCH, INITS
from utils.recipe import OPTIMIZERS
from utils.training import run


def get_args_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_dir", metavar="TRAIN_DIR",
                        help="training split (Images/ + Labels_grayscale/ or Labels_RGB/)")
    parser.add_argument("val_dir", metavar="VAL_DIR", help="validation split, scored every epoch")
    parser.add_argument("run_name", metavar="RUN_NAME", help="name of the run folder under OUTPUT_DIR/runs/")

    model = parser.add_argument_group("model")
    model.add_argument("--arch", default=DEFAULT_ARCH, choices=list(ARCHS), help="network (default: %(default)s)")
    model.add_argument("--init", default="coco", choices=INITS,
                       help="coco: torchvision's COCO-with-VOC-labels weights, head replaced; imagenet: backbone "
                            "only; none: random (default: %(default)s)")
    add_bool(model, "--aux_loss", True, "train the auxiliary FCN head too (weight 0.5; DeepLabV3 only)")
    add_bool(model, "--keep_feature_extract", False, "freeze everything but the new classifier head")
    model.add_argument("--pruned_model", metavar="P.pth", help="fine-tune this pruned network instead of --arch")
    add_bool(model, "--train_pruned_fully", True, "with --pruned_model: True trains everything, False the head only")
    model.add_argument("--load_pretrained_weights", metavar="W.pth",
                       help="start from these weights (checkpoint or plain state_dict), e.g. on top of --pruned_model")
    add_bool(model, "--allow_pickle", False, "accept whole pickled models (unpickling runs code from the file)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=30, help="(default: %(default)s)")
    optim.add_argument("--batch_size", type=int, default=4, help="images per step per process (default: %(default)s)")
    optim.add_argument("--crop_size", type=int, default=512, help="random crop side in px (default: %(default)s)")
    optim.add_argument("--eval_size", type=int, default=None,
                       help="validation images resized to this shorter side (default: native resolution)")
    optim.add_argument("--lr", type=float, default=0.01,
                       help="initial learning rate, poly decay (default: %(default)s)")
    optim.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help="(default: %(default)s)")
    optim.add_argument("--weight_decay", type=float, default=1e-4, help="(default: %(default)s)")
    optim.add_argument("--loss", default="ce_weighted", choices=LOSSES,
                       help="ce, ce_weighted (class weights from the training labels), dice, ce_dice "
                            "(default: %(default)s)")
    optim.add_argument("--patience", type=int, default=0,
                       help="stop after this many epochs without a better val mIoU; 0 = never (default: 0)")
    add_bool(optim, "--amp", False, "mixed precision (float16 on CUDA, bfloat16 on CPU)")

    system = parser.add_argument_group("system")
    system.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    system.add_argument("--workers", type=int, default=4, help="data-loading processes (default: %(default)s)")
    system.add_argument("--seed", type=int, default=42, help="(default: %(default)s)")
    add_bool(system, "--deterministic", False, "deterministic algorithms (slower)")
    add_bool(system, "--resume", False, "continue RUN_NAME from its last.pth")
    add_bool(system, "--overwrite", False, "replace an existing RUN_NAME folder")
    system.add_argument("--output_dir", default="results", help="(default: %(default)s)")
    add_bool(system, "--tensorboard", False, "also write TensorBoard events into the run folder")
    return parser


def check_args(args):
    """Value checks argparse cannot do; each failure is one line and exit status 2."""
    for name in ("epochs", "batch_size", "crop_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.workers < 0 or args.patience < 0:
        raise UserError("--workers and --patience cannot be negative")


main = script_main(get_args_parser, run, check_args)


if __name__ == "__main__":
    run_main(main)
