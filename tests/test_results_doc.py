"""docs/results.md is rendered from the files a run wrote, and the manual quotes no measured figure it lacks."""
import json
import sys

import pandas as pd

from conftest import REPO, run_script

sys.path.insert(0, str(REPO / "scripts"))

import render_results  # noqa: E402
from utils.evaluation import COMPARISON  # noqa: E402
from utils.study.tables import SUMMARY  # noqa: E402


def test_the_manual_quotes_only_rendered_figures():
    assert render_results.unbacked_figures(render_results.documents()) == []


def test_a_planted_wrong_figure_is_caught(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("| demo | 25.93% | 23.64% | 94.70 | 4.26 |\n")
    manual = tmp_path / "README.md"
    manual.write_text("test mIoU 25.93% and crack tolerance F1 23.46% (planted: the digits swapped), 94.70 ms,\n"
                      "4.26 GMACs, 15.12 GMACs (planted), 159.48 ms (planted); settings: --pruning_ratio 50 removes\n"
                      "50% of the channels, 4 px tolerance, 98% target, 99.9% argmax agreement, lr 0.001\n")
    found = render_results.unbacked_figures([manual], page)
    assert [(line, figure) for _, line, figure in found] == [(1, "23.46%"), (2, "15.12 GMACs"), (2, "159.48 ms")]


def test_the_real_manual_fails_once_a_wrong_number_is_planted(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text() + "\nThe demo reached a test mIoU of 99.87%.\n")
    assert [figure for _, _, figure in render_results.unbacked_figures([readme])] == ["99.87%"]


def _run_files(results):
    """A run's files as the scripts write them: a training run, the comparison workbook, a study summary."""
    run = results / "runs" / "demo"
    run.mkdir(parents=True)
    pd.DataFrame([{"epoch": 1, "step": 4, "train_loss": 2.0, "val_loss": 1.9, "val_miou": 0.1234, "lr": 1e-3,
                   "data_seconds": 1.0, "compute_seconds": 10.0, "val_seconds": 2.0},
                  {"epoch": 2, "step": 8, "train_loss": 1.5, "val_loss": 1.4, "val_miou": 0.2208, "lr": 0.0,
                   "data_seconds": 1.0, "compute_seconds": 10.0, "val_seconds": 2.0}]).to_csv(run / "metrics.csv")
    (run / "args.json").write_text(json.dumps({"train_dir": "d/train", "val_dir": "d/val", "arch": "deeplabv3"}))
    row = {column.heading: None for column in COMPARISON.columns}
    row.update({"name": "demo_best", "date": "2026-12-06T10:00:00", "checkpoint": "runs/demo/best.pth",
                "dataset": "d/test", "params": 58_627_399, "MACs per image (all tiles)": 4.26e9, "mIoU": 0.2593,
                "tolerance F1": 0.2364, "latency per image (ms)": 94.7, "device": "CPU x86_64, 2 threads"})
    pd.DataFrame([row]).to_excel(results / "model_test_results.xlsx", index=False)
    study = results / "studies" / "demo_study"
    study.mkdir(parents=True)
    summary = {column.key: 0.0 for column in SUMMARY.columns}
    summary.update(variant="taylor_30pct_1step", criterion="Taylor", seeds=2, test_miou_mean=0.0734,
                   test_miou_spread=0.0652, latency_ms_mean=56.72, test_miou_verdict="within noise",
                   crack_tolerance_f1_verdict="within noise", int8_agreement_mean=float("nan"))
    pd.DataFrame([summary]).to_csv(study / "study_summary.csv", index=False)


def test_render_reads_every_figure_from_the_files_and_notes_what_is_missing(tmp_path):
    results = tmp_path / "results"
    _run_files(results)
    text = render_results.render(results, tmp_path / "results.md")
    assert "22.08%" in text and "at epoch" in text and "`arch` deeplabv3" in text
    assert "| demo_best | 2026-12-06T10:00:00 | 25.93% |" in text and "94.70" in text and "23.64%" in text
    assert "python test.py d/test --weights runs/demo/best.pth --name demo_best" in text
    assert "7.34% ± 6.52%" in text and "56.72" in text
    assert text.count("- commit: ") == 3 and text.count("- machine: ") == 3 and "written 20" in text
    for missing in ("pruned/<name>_steps.csv", "benchmark/<name>.csv", "export/<name>.onnx", "side_by_side.png"):
        assert f"{missing}`)" in text
    assert text.count("Not rendered: no ") == 4 and "12.34%" not in text  # the best validation, not the first


def test_a_missing_results_folder_is_one_line_and_exit_2(tmp_path):
    result = run_script("scripts/render_results.py", "--results", tmp_path / "absent", "--output", tmp_path / "r.md")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "absent" in result.stderr and not (tmp_path / "r.md").exists()
