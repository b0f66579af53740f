"""Measure size and speed of model variants side by side in one run (e.g. dense vs pruned).

    python benchmark.py results/runs/demo/best.pth results/pruned/r101_50.pth --size 512 --runs 20
    python benchmark.py A.pth B.pth --device cuda --half --channels_last --onnx
    python benchmark.py A.pth export/A.onnx export/A_int8.onnx --size 512 --device cpu
    python benchmark.py A.pth A.onnx A_int8.onnx P.pth P.onnx P_int8.onnx --size 256 512 --test_data data/test

For each checkpoint: parameters, MACs per image (torch-pruning's counter), median and p90 latency
of one forward of a BATCH x 3 x SIZE x SIZE batch (auxiliary head dropped, as in inference), images
per second, and ratios against the first checkpoint (params x, MACs x, speed-up). An .onnx file of
export.py (float32, float16 or INT8) runs in onnxruntime in the same interleaved rounds, its ratios
against the first .onnx file (A_int8.onnx after A.onnx gives INT8's speed-up); on the CPU the CPU's
model and INT8-relevant flags are printed, and each graph's precision (an INT8 graph's target: "int8 cpu
U8S8" or "int8 tensorrt S8S8"). With --onnx each checkpoint also runs exported in onnxruntime. With
--test_data each file is also scored on that split after the timing (test mIoU and crack tolerance F1, by
test.py's evaluation loop at each --size), so one command gives a deployment table; several --size values
are timed one after the other, each size in its own interleaved rounds (an .onnx file must then have free
axes: export.py --dynamic). Prints the tables and writes OUTPUT_DIR/benchmark/NAME.csv and NAME.png
(latency against MACs); a rerun with the same --name replaces them and says so.
"""
import argparse

from utils.cli import ArgumentParser, add_bool, add_quiet, run_main, script_main
from utils.benchmarking import benchmark_runs, run_benchmark
from utils.model import add_output_stride_option
from utils.options import add_allow_pickle, add_output_options, add_system_options
from utils.timing import WARMUP


def get_args_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="checkpoints (or .onnx files of export.py) to compare; ratios are against the "
                             "first of the same backend")
    parser.add_argument("--size", type=int, nargs="+", default=[512], metavar="PX",
                        help="input side in px; several sizes are timed one after the other, each in its own "
                             "interleaved rounds, into one CSV (default: 512)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=20, help="timed forwards per model (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed forwards first (default: %(default)s)")
    add_bool(parser, "--half", False, "float16 (CUDA only)")
    add_bool(parser, "--channels_last", False, "channels-last memory format (often faster on GPUs)")
    add_bool(parser, "--fold_batchnorm", True, "fold each BatchNorm into its convolution, as deployed")
    add_bool(parser, "--onnx", False, "also time each network exported to ONNX in onnxruntime")
    parser.add_argument("--test_data", metavar="TEST_DIR", default=None,
                        help="also score every file on this labelled split at each --size (test.py's mIoU and crack "
                             "tolerance F1, as test.py --eval_size SIZE), after the timing")
    parser.add_argument("--lt_tolerance", type=int, default=4, metavar="PX",
                        help="tolerance in px of the crack tolerance F1, as test.py's (default: %(default)s)")
    add_allow_pickle(parser)
    add_output_stride_option(parser)
    parser.add_argument("--name", default="benchmark", help="file name of the CSV and plot (default: %(default)s)")
    add_output_options(parser)
    add_system_options(parser)
    add_quiet(parser)
    return parser


def run(args):
    """Checks (utils.benchmarking.BenchmarkOptions and VariantSpec, one per --size, when made) and the run on them."""
    return run_benchmark(benchmark_runs(vars(args)))


main = script_main(get_args_parser, run)


if __name__ == "__main__":
    run_main(main)
