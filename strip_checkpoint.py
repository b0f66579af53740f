"""Strip a checkpoint for deployment: the network and its metadata, without the training state.

    python strip_checkpoint.py results/runs/base/last.pth base_deploy.pth

A train.py last.pth carries the optimiser, schedule and scaler state that only --resume needs (with
AdamW, twice the size of the weights); best.pth is already written without it. The output is read
by every script like the input; it is written atomically and an existing OUT is refused without
--overwrite.
"""
import argparse
import os

from utils.checkpoint import strip_for_deployment
from utils.cli import ArgumentParser, add_bool, require_path, run_main, script_main


def get_args_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="IN.pth", help="a CrackSense checkpoint (train.py, torchvision_pruning.py)")
    parser.add_argument("target", metavar="OUT.pth", help="the stripped checkpoint to write")
    add_bool(parser, "--overwrite", False, "replace an existing OUT.pth")
    return parser


def run(args):
    require_path(args.source, "checkpoint", "file")
    before = os.path.getsize(args.source)
    dropped = strip_for_deployment(args.source, args.target, args.overwrite)
    after = os.path.getsize(args.target)
    print(f"wrote {args.target}: {after / 1e6:.1f} MB ({before / 1e6:.1f} MB before; dropped "
          f"{', '.join(dropped) or 'nothing: it held no training state'})")


main = script_main(get_args_parser, run)


if __name__ == "__main__":
    run_main(main)
