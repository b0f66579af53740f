"""Train a segmentation network on an S2DS-format dataset (several GPUs: torchrun).

    python train.py TRAIN_DIR VAL_DIR RUN_NAME [options]
    torchrun --nproc_per_node 2 train.py TRAIN_DIR VAL_DIR RUN_NAME [options]

Writes results/runs/RUN_NAME/: last.pth, best.pth, metrics.csv, curves.png, args.json.
"""
import argparse

from utils.cli import (ArgumentParser, add_bool, add_config, add_quiet, bool_or_auto, cap_workers, check_batch_memory,
                       options_from, run_main, script_main, str2bool)
from utils.model import ARCHS, INITS, OUTPUT_STRIDES
from utils.options import add_allow_pickle, add_output_options, add_recipe_options, add_system_options
from utils.training import RUN_DEFAULTS, TrainOptions, run


def setting(group, name, help, **kwargs):
    """A run setting: None when not given, so that a new run takes RUN_DEFAULTS and a resumed run its own value
    (utils.training.TrainOptions.settled); booleans take True/False/yes/no/1/0, a bare flag meaning True."""
    if kwargs.get("type") in (str2bool, bool_or_auto):
        kwargs.update(nargs="?", const=True, metavar="BOOL" if kwargs["type"] is str2bool else "auto|BOOL")
    default = RUN_DEFAULTS[name.lstrip("-")]
    group.add_argument(name, default=None, help=f"{help} (default: {default})".lstrip(" "), **kwargs)


def get_args_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_dir", metavar="TRAIN_DIR",
                        help="training split (Images/ + Labels_grayscale/ or Labels_RGB/)")
    parser.add_argument("val_dir", metavar="VAL_DIR", help="validation split, scored every epoch")
    parser.add_argument("run_name", metavar="RUN_NAME", help="name of the run folder under OUTPUT_DIR/runs/")

    model = parser.add_argument_group("model (a --resume run keeps its own; a different value is refused)")
    setting(model, "--arch", "network", choices=list(ARCHS))
    setting(model, "--init", "coco: torchvision's COCO-with-VOC-labels weights, head replaced; imagenet: backbone "
                             "only; none: random", choices=INITS)
    setting(model, "--output_stride", "DeepLabV3-ResNet: 16 (layer4 dilated, ASPP rates 6/12/18) trains about "
                                      "twice as fast as 8 (layer3 and layer4 dilated, 12/24/36); the checkpoint "
                                      "records it (None: the weights' own, else 8)", type=int, choices=OUTPUT_STRIDES)
    setting(model, "--aux_loss", "train the auxiliary FCN head too (weight 0.5; DeepLabV3 only)", type=str2bool)
    setting(model, "--keep_feature_extract", "freeze everything but the new classifier head", type=str2bool)
    setting(model, "--pruned_model", "fine-tune this pruned network instead of --arch", metavar="P.pth")
    setting(model, "--train_pruned_fully", "with --pruned_model: True trains everything, False the head only",
            type=str2bool)
    setting(model, "--load_pretrained_weights", "start from these weights (checkpoint or plain state_dict), e.g. on "
                                                "top of --pruned_model", metavar="W.pth")
    add_allow_pickle(model)

    setting(model, "--teacher", "with --distill: the network the student learns from (e.g. the dense network a "
                                "--pruned_model was cut from)", metavar="T.pth")

    schedule = parser.add_argument_group("schedule (a --resume run keeps its own; only --epochs may change)")
    setting(schedule, "--epochs", "passes over the training split", type=int)
    setting(schedule, "--steps", "optimisation steps instead of --epochs (rounded up to whole epochs)", type=int)
    setting(schedule, "--max_minutes", "time budget from the start: after epoch 1 (and after each validation) the "
                                       "run sizes its epochs and its poly schedule to end within it; replaces --epochs",
            type=float)
    setting(schedule, "--val_every", "validate (and save last.pth/best.pth) after epoch 1, every N-th epoch and the "
                                     "last", type=int)
    setting(schedule, "--eval_size", "validation images resized to this shorter side (None: native resolution)",
            type=int)
    setting(schedule, "--patience", "stop after this many epochs without a better val mIoU; 0 = never", type=int)
    setting(schedule, "--seed", "", type=int)
    add_recipe_options(parser, "a new run takes the default, a --resume run its own (a different value is refused)")

    system = add_system_options(parser, workers=4)
    add_bool(system, "--resume", False, "continue RUN_NAME from its last.pth")
    add_output_options(system, "an existing RUN_NAME folder")
    add_bool(system, "--tensorboard", False, "also write TensorBoard events into the run folder")
    system.add_argument("--amp_dtype", default="auto", choices=("auto", "float16", "bfloat16"),
                        help="--amp's type: auto is bfloat16 on the CPU and on GPUs of compute capability 8+ "
                             "(no GradScaler), float16 with a GradScaler on older GPUs (default: %(default)s)")
    add_bool(system, "--channels_last", False, "channels-last memory format (faster convolutions on most GPUs)")
    add_bool(system, "--compile", False, "torch.compile the network (refused in one line where unsupported)")
    add_config(system)
    add_quiet(parser)
    return parser


def train_options(args):
    """The typed options, checked as they are made (one line and exit status 2 each), --workers capped."""
    check_batch_memory(args.batch_size, args.crop_size, "--batch_size x --crop_size")
    return options_from(TrainOptions, vars(args), workers=cap_workers(args.workers))


def train(args):
    run(train_options(args))


main = script_main(get_args_parser, train)


if __name__ == "__main__":
    run_main(main)
