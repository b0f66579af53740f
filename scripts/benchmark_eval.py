"""How close test.py's evaluation loop comes to the bare model forward, in images per second.

    python scripts/benchmark_eval.py                       # generated 256 px images, DeepLabV3-ResNet101
    python scripts/benchmark_eval.py --data data/test --weights results/runs/base/best.pth --device cuda

Both sides see the same images on the same device at the same batch size: the loop is
utils.evaluation.evaluate_split exactly as test.py runs it (data loading, forward, resizing to the
label, confusion matrix, per-image scores, crack tolerance metric); the bare forward is
`model(images)` on the same tensors already on the device. Prints numbers; asserts nothing.
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import data  # noqa: E402
from utils.checkpoint import load_for_inference  # noqa: E402
from utils.engine import EvalSettings, autocast  # noqa: E402
from utils.cli import ArgumentParser, device_name, resolve_device, run_main  # noqa: E402
from utils.evaluation import evaluate_split  # noqa: E402
from utils.model import ARCHS, build, strip_aux_head  # noqa: E402
from utils.synthetic import generate  # noqa: E402
from utils.timing import time_calls  # noqa: E402


def get_args_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a labelled split folder (default: generated images)")
    parser.add_argument("--weights", help="a checkpoint (default: an untrained --arch)")
    parser.add_argument("--arch", default="deeplabv3_resnet101", choices=list(ARCHS), help="(default: %(default)s)")
    parser.add_argument("--images", type=int, default=8, help="generated images (default: %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="generated image side in px (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=1, help="(default: %(default)s, as test.py)")
    parser.add_argument("--workers", type=int, default=2, help="loader processes (default: %(default)s, as test.py)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side; the median is shown")
    parser.add_argument("--amp", action="store_true", help="mixed precision on both sides")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--output_dir", default="results", help="unused; accepted like every script's")
    return parser


@torch.no_grad()
def bare_forward_rate(model, batches, device, amp):
    """Images per second of model(images) alone, inputs already on the device."""
    def forward_all():
        for images in batches:
            with autocast(device, amp):
                model(images)

    seconds = time_calls(forward_all, 1, 0, device)[0]
    return sum(len(images) for images in batches) / seconds


def loop_rate(model, dataset, device, args):
    settings = EvalSettings(data.NUM_CLASSES, args.amp, tolerance_px=4, progress=False)
    result = evaluate_split(model, dataset, device, settings, args.batch_size, args.workers)
    return result.images / result.seconds, result.images / result.forward_seconds


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        split = args.data
        if split is None:
            generate(scratch, count=args.images, size=args.size, seed=0, splits=(("test", 1.0),))
            split = Path(scratch) / "test"
        dataset = data.S2DSDataset(split, data.EvalTransform(None))
        if args.weights:
            model, metadata = load_for_inference(args.weights, device=device)
            arch = metadata["arch"]
        else:
            torch.manual_seed(0)
            model, arch = build(args.arch, data.NUM_CLASSES, init="none").to(device).eval(), args.arch
        model = strip_aux_head(model)
        inputs = [dataset[index][0] for index in range(len(dataset))]
        batches = [torch.stack(inputs[i:i + args.batch_size]).to(device)
                   for i in range(0, len(inputs), args.batch_size)]
        shape = "x".join(map(str, inputs[0].shape[-2:]))
        print(f"{arch}, {len(dataset)} images of {shape}, batch {args.batch_size}, workers {args.workers}, "
              f"amp {args.amp}, on {device_name(device)}", flush=True)
        bare_forward_rate(model, batches[:1], device, args.amp)  # warm-up: allocator, cuDNN/oneDNN choices
        loops, models_in_loop, bares = [], [], []
        for _ in range(args.repeats):  # interleaved, so drifting clocks or load hit both sides alike
            loop, in_loop = loop_rate(model, dataset, device, args)
            loops.append(loop)
            models_in_loop.append(in_loop)
            bares.append(bare_forward_rate(model, batches, device, args.amp))
    paired = [100 * loop / bare for loop, bare in zip(loops, bares)]
    print(f"bare model forward:             {statistics.median(bares):8.3f} images/s  (runs: {_listed(bares)})")
    print(f"test.py evaluation loop:        {statistics.median(loops):8.3f} images/s  (runs: {_listed(loops)})")
    print(f"  its model time alone:         {statistics.median(models_in_loop):8.3f} images/s")
    print(f"evaluation loop / bare forward: {statistics.median(paired):7.1f}%  (median of the runs' ratios: "
          f"{_listed(paired, 1)}; acceptance: at least 90%)")


def _listed(values, digits=3):
    return ", ".join(f"{value:.{digits}f}" for value in values)


if __name__ == "__main__":
    run_main(main)
