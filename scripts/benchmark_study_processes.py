"""One study run by one process and by torchrun's N processes: the wall time of each and how far their study.csv
rows differ (latency aside). What a user checks before trusting a spread study, and the issue's acceptance measure.

    python scripts/benchmark_study_processes.py --processes 2 --output_dir results/processes -- \
        --state_dict results/runs/demo/best.pth --data results/demo_data/train --val_data results/demo_data/val \
        --test_data results/demo_data/test --importance_type Magnitude Random --pruning_ratio 30 50 \
        --finetune_steps 20 --crop_size 96 --device cpu

The arguments after `--` are study.py's, without --name and --output_dir (the script names the two studies
`one_process` and `<N>_processes` under --output_dir). Every process, the single one too, computes with
OMP_NUM_THREADS threads (1 when unset, as torchrun sets it): on the CPU the thread count changes the order of
floating-point sums, and over fine-tuning steps that moves a row by more than rounding, so only equal threads per
process compare rows; the single process then shows what one process on the same share of the machine takes.
Prints numbers and writes them to OUTPUT_DIR/processes.json; asserts nothing. Run it on a quiet machine: the two
are timed one after the other.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.benchmarking import cpu_description  # noqa: E402
from utils.cli import ArgumentParser, UserError, run_main  # noqa: E402
from utils.study.tables import SUMMARISED  # noqa: E402

COMPARED = [column for column in (*SUMMARISED, "best_step") if column not in ("latency_ms", "speedup")]


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="torchrun's --nproc_per_node (default 2)")
    parser.add_argument("--output_dir", required=True, help="where both studies and processes.json are written")
    parser.add_argument("study_args", nargs=argparse.REMAINDER, help="-- then study.py's arguments")
    args = parser.parse_args(argv)
    args.study_args = [arg for arg in args.study_args if arg != "--"]
    if any(arg in ("--name", "--output_dir") for arg in args.study_args):
        raise UserError("give study.py's arguments without --name and --output_dir: this script sets them")
    if args.processes < 2:
        raise UserError(f"--processes must be at least 2, got {args.processes}")
    return args


def timed_study(launcher, name, args, threads):
    """(wall seconds, study.csv as a frame indexed by run) of study.py started by `launcher`."""
    command = [*launcher, "study.py", *args.study_args, "--name", name, "--output_dir", args.output_dir]
    print(f"$ OMP_NUM_THREADS={threads} {' '.join(command)}", flush=True)
    start = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": threads})
    seconds = time.perf_counter() - start
    if finished.returncode != 0:
        raise UserError(f"the {name} study failed (exit status {finished.returncode}); its output is above")
    return seconds, pd.read_csv(Path(args.output_dir) / "studies" / name / "study.csv").set_index("run")


def compare(one, spread):
    """{column: largest absolute difference over the runs both studies have}, and the runs only one has."""
    runs = one.index.intersection(spread.index)
    columns = [column for column in COMPARED if column in one.columns and column in spread.columns]
    differences = {column: float((one.loc[runs, column] - spread.loc[runs, column]).abs().max()) for column in columns}
    return differences, sorted(set(one.index) ^ set(spread.index))


def main(argv=None):
    args = parse_args(argv)
    threads = os.environ.get("OMP_NUM_THREADS") or "1"
    alone_seconds, one = timed_study([sys.executable], "one_process", args, threads)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes)]
    spread_seconds, spread = timed_study(launcher, f"{args.processes}_processes", args, threads)
    differences, unmatched = compare(one, spread)
    record = {"machine": cpu_description(), "threads_per_process": int(threads), "study_args": args.study_args,
              "runs": len(one),
              "one_process_s": round(alone_seconds, 1), f"{args.processes}_processes_s": round(spread_seconds, 1),
              "largest_difference": differences, "runs_in_one_only": unmatched}
    Path(args.output_dir, "processes.json").write_text(json.dumps(record, indent=1))
    print(f"\n{record['machine']}\n{len(one)} rows, {threads} thread(s) per process; one process "
          f"{alone_seconds:.1f} s, {args.processes} processes {spread_seconds:.1f} s "
          f"({alone_seconds / spread_seconds:.2f}x)")
    for column, difference in differences.items():
        print(f"  largest |difference| of {column:<22} {difference:.3g}")
    if unmatched:
        print(f"  rows in one study only: {', '.join(unmatched)}")
    print(f"wrote {Path(args.output_dir) / 'processes.json'}")
    return 0


if __name__ == "__main__":
    run_main(main)
