"""study.py under torchrun (gloo, two CPU processes): the runs are shared out, the rows equal one process's, the
outputs are written once, and a worker killed with SIGKILL costs only its unfinished runs."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import REPO, assert_user_error, run_script

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SCORES = ["test_miou", "crack_iou", "crack_tolerance_f1", "gmacs", "params_m", "val_miou", "best_step", "int8_agreement"]


def study_args(checkpoint, dataset_dir, out, name):
    return ["study.py", "--state_dict", checkpoint, "--data", dataset_dir / "train", "--val_data", dataset_dir / "val",
            "--test_data", dataset_dir / "test", "--pruning_ratio", "30", "50", "--importance_type", "Magnitude",
            "Random", "--seeds", "1", "--finetune_steps", "2", "--calib_batches", "1", "--batch_size", "2",
            "--crop_size", "64", "--measure_size", "64", "--latency_runs", "1", "--workers", "1", "--device", "cpu",
            "--int8", "dense_finetuned", "--calib_images", "1", "--name", name, "--output_dir", out]


def environment():
    """One thread per process, for the single process too: the same arithmetic, so rows compare closely."""
    return {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=environment(), capture_output=True,
                          text=True, timeout=1800)


def workers_of(launcher):
    """The worker processes torchrun started (its children)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


def kill_a_worker_after_first_result(command, results):
    """Start the torchrun command; as soon as one run's result is in, SIGKILL one worker; wait for torchrun to end."""
    launcher = subprocess.Popen([sys.executable, *map(str, command)], cwd=REPO, env=environment(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and launcher.poll() is None and not list(results.glob("*.json")):
        time.sleep(0.05)
    workers = workers_of(launcher)
    assert workers and launcher.poll() is None, "the study ended before a worker could be killed"
    os.kill(workers[-1], signal.SIGKILL)
    return launcher.wait(timeout=300)


def test_torchrun_shares_the_runs_resumes_after_a_killed_worker_and_matches_one_process(
        lively_mobilenet_checkpoint, dataset_dir, tmp_path):
    out = tmp_path / "results"
    spread = out / "studies" / "spread"
    command = [*TORCHRUN, *study_args(lively_mobilenet_checkpoint, dataset_dir, out, "spread")]
    assert kill_a_worker_after_first_result(command, spread / "runs") != 0
    finished = {path.name: path.stat().st_mtime_ns for path in (spread / "runs").glob("*.json")}
    assert finished and not (spread / "study.csv").exists()

    resumed = run(*command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("finished in an earlier run, reused") == len(finished)
    for name, written in finished.items():
        assert (spread / "runs" / name).stat().st_mtime_ns == written, f"{name} was run again"
    ran_by = {line.split(", process ")[1][0] for line in resumed.stdout.splitlines() if ", process " in line}
    assert ran_by == {"0", "1"} or len(finished) >= 3, resumed.stdout  # both took runs, unless few were left
    assert resumed.stdout.count("study.csv (one row per seed)") == 1, "the outputs are written by one process"

    alone = run(*study_args(lively_mobilenet_checkpoint, dataset_dir, out, "alone"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    one, two = (pd.read_csv(out / "studies" / name / "study.csv").set_index("run") for name in ("alone", "spread"))
    assert sorted(one.index) == sorted(two.index) and len(one) == 1 + 1 + 4 + 2  # dense, twin, 4 variants, 2 graphs
    pd.testing.assert_frame_equal(one.loc[two.index, SCORES], two[SCORES], check_exact=False, atol=1e-6)
    for run_name in one.index[one["precision"] == "float32"].drop("dense"):
        weights = [torch.load(out / "studies" / name / f"{run_name}.pth", weights_only=True)["model"]
                   for name in ("alone", "spread")]
        for key, tensor in weights[0].items():
            assert torch.allclose(tensor.float(), weights[1][key].float(), atol=1e-6), (run_name, key)


def test_torchrun_refusals_are_one_line_from_every_process(lively_mobilenet_checkpoint, dataset_dir, tmp_path):
    """A study that cannot resume is refused by the first process and the others stop with it, no traceback."""
    out = tmp_path / "results"
    args = study_args(lively_mobilenet_checkpoint, dataset_dir, out, "refused")
    (out / "studies" / "refused").mkdir(parents=True)
    (out / "studies" / "refused" / "study.json").write_text("{not json")
    result = run(*TORCHRUN, *args)
    assert result.returncode != 0 and not re.search(rf'File "{REPO}/(utils/|study\.py)', result.stderr), result.stderr
    assert result.stderr.count("study.json is damaged") == 2, result.stderr[-3000:]
    assert_user_error(run_script(*args), "study.json is damaged")


@pytest.mark.parametrize("world", [1, 2])
def test_every_job_is_claimed_once(world):
    """Launch.claimed hands each index to exactly one process, through the launch's shared counter."""
    from utils.distributed import Launch
    if world == 1:
        assert list(Launch().claimed(5, "jobs")) == [0, 1, 2, 3, 4]
        return
    store = torch.distributed.HashStore()
    first, second = (Launch(rank, 2, store=store).claimed(5, "jobs") for rank in (0, 1))
    taken = [next(first), next(second), next(second), next(first), next(first)]
    assert taken == [0, 1, 2, 3, 4] and list(first) == [] and list(second) == []


def test_work_done_once_reaches_every_process_and_so_does_its_error():
    """from_first runs the work on the first process only; the second waits for its result, or its one-line error;
    barrier lets no process past until both arrived."""
    from utils.cli import UserError
    from utils.distributed import Launch
    store, calls, arrived, seen = torch.distributed.HashStore(), [], [], {}

    def process(rank):
        launch = Launch(rank, 2, store=store)
        seen[rank, "value"] = launch.from_first(lambda: calls.append(rank) or {"dense": (0.5, 1)})
        try:
            launch.from_first(lambda: (_ for _ in ()).throw(UserError("study.json is damaged")))
        except UserError as error:
            seen[rank, "error"] = str(error)
        if rank == 0:
            time.sleep(0.3)  # the first process comes late to the barrier; the second must wait for it
            arrived.append(rank)
        launch.barrier("end")
        seen[rank, "through"] = list(arrived)

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (1, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert calls == [0]
    assert seen == {**{(rank, "value"): {"dense": [0.5, 1]} for rank in (0, 1)},
                    **{(rank, "error"): "study.json is damaged" for rank in (0, 1)},
                    **{(rank, "through"): [0] for rank in (0, 1)}}


def test_the_processes_benchmark_times_both_and_finds_equal_rows(lively_mobilenet_checkpoint, dataset_dir, tmp_path):
    """scripts/benchmark_study_processes.py runs one study twice (one process, torchrun's two) and reports the wall
    times and the largest difference of every score column; refuses the arguments it sets itself."""
    args = study_args(lively_mobilenet_checkpoint, dataset_dir, tmp_path, "unused")[1:]
    args = args[:args.index("--pruning_ratio")] + ["--pruning_ratio", "50", "--importance_type", "Random",
                                                   "--finetune_steps", "1", "--batch_size", "2", "--crop_size", "64",
                                                   "--measure_size", "64", "--latency_runs", "1", "--workers", "0",
                                                   "--device", "cpu"]
    result = run("scripts/benchmark_study_processes.py", "--output_dir", tmp_path / "bench", "--", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "bench" / "processes.json").read_text())
    assert record["runs"] == 3 and record["runs_in_one_only"] == [] and record["one_process_s"] > 0
    assert record["largest_difference"]["test_miou"] <= 1e-6 and record["largest_difference"]["gmacs"] <= 1e-9
    assert "2 processes" in result.stdout and "CPU:" in result.stdout
    assert_user_error(run_script("scripts/benchmark_study_processes.py", "--output_dir", tmp_path / "bench", "--",
                                 *args, "--name", "mine"), "without --name and --output_dir")
