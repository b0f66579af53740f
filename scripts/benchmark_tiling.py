"""What tiled prediction costs, and how far its mask departs from the whole-photo mask, for one checkpoint and photo.

    python scripts/benchmark_tiling.py --state_dict results/runs/demo/best.pth --image site/IMG_0001.jpg
    python scripts/benchmark_tiling.py --state_dict W.pth --image IMG.jpg --tile 768 --tile_batch 4 --device cuda

The photo is predicted whole (inference.py --max_size 0), then tiled with inference.py's defaults (or the
--tile/--stride given) and with the former half-tile stride. Per setting it prints the windows, the pixels
the network runs through as a multiple of the photo's, the seconds of one prediction and the share of
pixels whose class agrees with the whole-photo mask. The network is loaded as inference.py loads it
(auxiliary head dropped, BatchNorm folded). Prints numbers; asserts nothing; writes nothing.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import (ArgumentParser, add_bool, device_name, options_from, require_path, resolve_device,  # noqa: E402
                       run_main)
from utils.data import read_image  # noqa: E402
from utils.inference import DEFAULT_MAX_SIZE, DEFAULT_TILE, NetworkOptions, load_network, predict  # noqa: E402
from utils.model import Tiling, add_output_stride_option, default_stride, tile_cost  # noqa: E402
from utils.timing import synchronize  # noqa: E402


def get_args_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state_dict", required=True, metavar="W.pth", help="checkpoint, as inference.py takes it")
    parser.add_argument("--pruned_model", metavar="P.pth", help="as inference.py's --pruned_model")
    add_bool(parser, "--use_pruned", False, "as inference.py's --use_pruned")
    add_bool(parser, "--allow_pickle", False, "accept whole pickled models (unpickling runs code from the file)")
    add_output_stride_option(parser)
    parser.add_argument("--image", required=True, metavar="PHOTO", help="one photo (e.g. 3000x2000 px)")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, help="largest tile side (default: %(default)s)")
    parser.add_argument("--stride", type=int, default=None, help="largest stride (default: 7/8 of the tile)")
    parser.add_argument("--tile_batch", type=int, default=1, help="tiles per forward (default: %(default)s)")
    add_bool(parser, "--half", False, "float16 on a CUDA GPU")
    add_bool(parser, "--channels_last", False, "as inference.py's --channels_last")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--output_dir", default="results", help="unused; accepted like every script's")
    return parser


def timed_prediction(model, image, num_classes, device, dtype, tiling=Tiling(), max_size=DEFAULT_MAX_SIZE):
    """(class ids, seconds) of one prediction, GPU work waited for."""
    synchronize(device)
    started = time.perf_counter()
    ids = predict(model, image, num_classes, device, tiling, max_size, dtype)
    synchronize(device)
    return ids, time.perf_counter() - started


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    require_path(args.image, "image")
    device = resolve_device(args.device)
    model, metadata, dtype = load_network(options_from(NetworkOptions, vars(args)), device)
    num_classes = metadata["num_classes"]
    image = read_image(Path(args.image), upright=True)
    height, width = image.shape[:2]
    print(f"{metadata['arch']} from {metadata['path']} on {device_name(device)} "
          f"({str(dtype).replace('torch.', '')}), photo {args.image}: {width}x{height} px, torch {torch.__version__}")
    timed_prediction(model, image[:min(height, args.tile), :min(width, args.tile)], num_classes, device, dtype,
                     max_size=0)  # warm-up
    whole, seconds = timed_prediction(model, image, num_classes, device, dtype, max_size=0)
    print(f"whole photo: 1 window, 1.00x the photo's pixels, {seconds:.2f} s")
    settings = [(args.tile, args.stride or default_stride(args.tile), "default" if args.stride is None else "asked"),
                (args.tile, args.tile // 2, "half-tile stride, the former default")]
    for tile, stride, what in settings:
        count, cost = tile_cost(height, width, tile, stride)
        ids, seconds = timed_prediction(model, image, num_classes, device, dtype, Tiling(tile, stride, args.tile_batch))
        agreement = float(np.mean(ids == whole))
        print(f"tile {tile}, stride {stride} ({what}): {count} windows, {cost:.2f}x the photo's pixels, "
              f"{seconds:.2f} s, {100 * agreement:.2f}% of pixels agree with the whole-photo mask")


if __name__ == "__main__":
    run_main(main)
