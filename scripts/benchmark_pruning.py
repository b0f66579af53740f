"""Dense vs pruned: MACs, parameters and measured latency (median, batch 1) at one image size.

    python scripts/benchmark_pruning.py --arch deeplabv3_resnet101 --pruning_ratio 30 50 70
    python scripts/benchmark_pruning.py --pruned_model results/pruned/NAME.pth

Speed depends only on the channel counts, so the ratios are applied to an untrained network (no
download); --pruned_model times a real pruned checkpoint against the dense network of its arch.
Networks are timed in interleaved rounds so a busy machine slows all of them alike. The last column
divides the measured speed-up (of the medians) by the MACs reduction: near 1 means the saved
arithmetic turns into saved time. Prints a table and writes OUTPUT_DIR/pruning_benchmark.csv.
"""
import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import data, model as models  # noqa: E402
from utils.checkpoint import load_model  # noqa: E402
from utils.cli import ArgumentParser, UserError, resolve_device, run_main  # noqa: E402
from utils.prune_ops import build_pruner, importance_name, make_importance, prune_step, ratio_fraction  # noqa: E402
from utils.report import write_csv  # noqa: E402
from utils.timing import interleaved_times  # noqa: E402


def get_args_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=models.DEFAULT_ARCH, choices=list(models.ARCHS),
                        help="network to prune (default: %(default)s)")
    parser.add_argument("--pruning_ratio", type=float, nargs="+", default=[50], metavar="PERCENT",
                        help="one or more percentages of channels to remove (default: 50)")
    parser.add_argument("--importance_type", default="Magnitude", help="(default: %(default)s)")
    parser.add_argument("--p_value", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--pruned_model", metavar="P.pth", help="time this pruned checkpoint instead")
    parser.add_argument("--size", type=int, default=512, help="image side in px (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per network, median (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--output_dir", default="results", help="(default: %(default)s)")
    return parser


def candidates(args):
    """(name, percent, network) pairs: dense first."""
    if args.pruned_model:
        pruned, metadata = load_model(args.pruned_model)
        dense = models.build(metadata["arch"], data.NUM_CLASSES, init="none").eval()
        return [("dense", 0.0, dense), (os.path.basename(args.pruned_model),
                                        float(metadata.get("pruning_ratio", float("nan"))), pruned)]
    importance_name(args.importance_type)
    fractions = [ratio_fraction(percent) for percent in args.pruning_ratio]
    torch.manual_seed(0)
    dense = models.build(args.arch, data.NUM_CLASSES, init="none").eval()
    rows = [("dense", 0.0, dense)]
    for percent, fraction in zip(args.pruning_ratio, fractions):
        network = copy.deepcopy(dense)
        prune_step(build_pruner(network, make_importance(args.importance_type, args.p_value), fraction), network)
        rows.append((f"{args.importance_type} {percent:g}%", percent, network.eval()))
    return rows


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.runs < 1 or args.size < 32:
        raise UserError("--runs must be at least 1 and --size at least 32")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    networks = candidates(args)
    networks = [(name, percent, models.strip_aux_head(network).to(device).eval()) for name, percent, network in networks]
    image = torch.randn(1, 3, args.size, args.size, device=device)
    calls = [lambda network=network: network(image) for _, _, network in networks]
    with torch.inference_mode():
        times = interleaved_times(calls, args.runs, 1, device)
    rows = []
    for (name, percent, network), seconds in zip(networks, times):
        macs, params = models.count_macs(network, args.size, device)
        dense = rows[0] if rows else None
        row = {"model": name, "pruning_ratio": percent, "gmacs": macs / 1e9, "params_m": params / 1e6,
               "latency_ms": 1000 * statistics.median(seconds), "latency_min_ms": 1000 * min(seconds)}
        row["macs_percent_of_dense"] = 100 * macs / (dense["gmacs"] * 1e9) if dense else 100.0
        row["macs_reduction"] = dense["gmacs"] / row["gmacs"] if dense else 1.0
        row["speedup"] = dense["latency_ms"] / row["latency_ms"] if dense else 1.0
        row["speedup_per_macs_reduction"] = row["speedup"] / row["macs_reduction"]
        rows.append(row)
        print(f"{name:>16}: {row['gmacs']:8.2f} GMACs ({row['macs_percent_of_dense']:5.1f}%) {row['params_m']:6.1f} M "
              f"params {row['latency_ms']:9.1f} ms (min {row['latency_min_ms']:.1f})  speed-up "
              f"{row['speedup']:5.2f}x  MACs reduction {row['macs_reduction']:5.2f}x  ratio "
              f"{row['speedup_per_macs_reduction']:.2f}", flush=True)
    path = os.path.join(args.output_dir, "pruning_benchmark.csv")
    write_csv(rows, path)
    print(f"{args.size}x{args.size}, batch 1, {device.type}, {torch.get_num_threads()} threads, median of "
          f"{args.runs} runs; table in {path}")


if __name__ == "__main__":
    run_main(main)
