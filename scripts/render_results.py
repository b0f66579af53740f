"""Render the figures a run wrote into one Markdown page, and check that the manual quotes only those figures.

    python scripts/render_results.py [--results results] [--output results/results.md] [--figures DIR]
    python scripts/render_results.py --check [--page docs/results.md]

Measured numbers are data, not prose: this page is made from the files the scripts wrote under --results
(runs/*/metrics.csv and args.json, model_test_results.xlsx, pruned/*_steps.csv, benchmark/*.csv, export/*.onnx,
studies/*/study_summary.csv and study.json), each block stamped with the command that produced it (as far as the
files record it), the file's date, the machine and the git commit. A missing input is skipped with a note, never
invented. `make demo` renders results/results.md from its own run; `make results` refreshes docs/results.md (and,
with --figures imgs, the manual's figures) from a run a maintainer chose.

--check: every measured figure typed in README.md and docs/*.md (a number with decimals followed by %, ms or
GMACs, e.g. "25.93%", "94.7 ms") must appear in the rendered page; integers such as "50%" or "98%" are settings
and targets, not measurements, and are not checked. Exit status 1 lists the figures that do not appear.
"""
import argparse
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.cli import UserError, run_main  # noqa: E402
from utils.benchmarking import cpu_description  # noqa: E402
from utils.evaluation import COMPARISON, COMPARISON_WORKBOOK  # noqa: E402
from utils.onnx_model import open_session  # noqa: E402
from utils.study.tables import PRINTED_SUMMARY, SUMMARY  # noqa: E402

DEFAULT_PAGE = REPO / "docs" / "results.md"
# The demo's documented commands (scripts/demo.sh), stamped where a file does not record its own command line.
DEMO_COMMAND = "make demo (scripts/demo.sh)"
# A measured figure as the manual types it: decimals, then a unit (GMACs, ms or a percent sign).
FIGURE = re.compile(r"(?<![\w.])(\d+\.\d+)\s?(%|ms\b|GMACs\b)")
NUMBER = re.compile(r"(?<![\w.])(\d+\.\d+)(%?)")
# Decimal figures that are settings of the code, not measurements: each with where it is set.
CONSTANTS = {("99.9", "%"): "export.py's float32 argmax-agreement threshold (utils/deploy.py)"}
TEST_COLUMNS = ("miou", "miou_no_background", "pixel_accuracy", "crack_iou", "crack_f1", "lt_f1", "latency_ms")


# --- stamps and Markdown -----------------------------------------------------------------------------------

class Page:
    """What every block needs: the machine and commit stamped on it, where the page goes (figure links are
    relative to it) and, when asked, the folder its figures are copied into (committed pages cannot link into
    the untracked results/)."""

    def __init__(self, output, figures=None, runs=(), levers=None):
        self.output, self.figures, self.runs = Path(output), Path(figures) if figures else None, tuple(runs)
        self.levers = Path(levers) if levers else None
        self.machine, self.commit = machine(), git_commit()

    def stamp(self, command, source, device=None):
        """The lines under a block's heading: how, when, where and at which commit its figures were made."""
        recorded = f" (the file records the device as '{device}')" if device else ""
        return [f"- command: `{command}`", f"- source: `{shown_path(source)}`, written {file_date(source)}",
                f"- machine: {self.machine}{recorded}", f"- commit: {self.commit}", ""]

    def figure(self, path, name, caption):
        """A Markdown image of `path`, copied first as `name` into the figures folder when there is one."""
        if self.figures:
            self.figures.mkdir(parents=True, exist_ok=True)
            path = Path(shutil.copyfile(path, self.figures / name))
        link = os.path.relpath(Path(path).resolve(), self.output.resolve().parent)
        return [f"![{caption}]({link})", ""]


def git_commit():
    """The commit the page was rendered at, marked when tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" with uncommitted changes" if git("diff", "--quiet", "HEAD").returncode else "")


def machine():
    """This machine: its GPU when it has one, and always the CPU model with the flags INT8 kernels use."""
    import torch

    gpu = f"GPU {torch.cuda.get_device_name(0)}; " if torch.cuda.is_available() else ""
    return gpu + cpu_description()


def file_date(path):
    return datetime.datetime.fromtimestamp(Path(path).stat().st_mtime).isoformat(sep=" ", timespec="minutes")


def shown_path(path):
    """A path as a reader types it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def table(headings, rows):
    """A Markdown table; None and NaN cells as '-'."""
    def cell(value):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)

    return (["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
            + ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows] + [""])


def percent(value):
    return "-" if value is None or pd.isna(value) else f"{100 * float(value):.2f}%"


def number(value, digits=2):
    return "-" if value is None or pd.isna(value) else f"{float(value):.{digits}f}"


def skipped(what, expected):
    """The note that stands where an input is missing: nothing is invented in its place."""
    return [f"Not rendered: no {what} (expected `{expected}`).", ""]


# --- blocks, one per kind of file a run writes -------------------------------------------------------------

def training_blocks(results, page):
    """Per run folder (those page.runs names, or all): its validations from metrics.csv, its settings from
    args.json, its curves."""
    runs = sorted(path for path in (results / "runs").glob("*/metrics.csv")
                  if not page.runs or path.parent.name in page.runs)
    if not runs:
        return ["## Training", ""] + skipped("training run", "runs/<run>/metrics.csv")
    lines = []
    for metrics_csv in runs:
        folder, frame = metrics_csv.parent, pd.read_csv(metrics_csv)
        best = frame.loc[frame["val_miou"].idxmax()]
        args = json.loads((folder / "args.json").read_text()) if (folder / "args.json").is_file() else {}
        command = (f"python train.py {args['train_dir']} {args['val_dir']} {folder.name} ... (every setting in "
                   f"{shown_path(folder / 'args.json')}; repeat: --config that file)" if args else DEMO_COMMAND)
        lines += [f"## Training run `{folder.name}`", ""] + page.stamp(command, metrics_csv)
        seconds = frame[["data_seconds", "compute_seconds", "val_seconds"]].to_numpy().sum()
        lines += table(("validations", "last epoch", "steps", "best val mIoU", "at epoch", "training and validation s"),
                       [(len(frame), int(frame["epoch"].iloc[-1]), int(frame["step"].iloc[-1]),
                         percent(best["val_miou"]), int(best["epoch"]), number(seconds, 0))])
        shown = ("arch", "init", "output_stride", "epochs", "max_minutes", "batch_size", "crop_size", "optimizer",
                 "lr", "loss", "skeleton_recall", "pruned_model", "torch")
        if args:
            lines += ["Settings (args.json): " + ", ".join(f"`{key}` {args[key]}" for key in shown
                                                           if args.get(key) is not None) + ".", ""]
        if (folder / "curves.png").is_file():
            lines += page.figure(folder / "curves.png", f"{folder.name}_training_curves.png",
                                 f"training curves of run {folder.name}")
    return lines


def latest_rows(workbook):
    """The comparison workbook's rows, the latest per name (a rerun under the same --name replaces its row)."""
    frame = pd.read_excel(workbook, sheet_name=0)
    return frame.drop_duplicates(subset=COMPARISON.column("name").heading, keep="last")


def test_block(results, page):
    """The comparison workbook (one row per test.py run): the scores of every evaluated network side by side."""
    workbook = results / COMPARISON_WORKBOOK
    lines = ["## Test scores (test.py)", ""]
    if not workbook.is_file():
        return lines + skipped("comparison workbook", COMPARISON_WORKBOOK)
    frame = latest_rows(workbook)
    heading = {key: COMPARISON.column(key).heading for key in
               ("name", "date", "checkpoint", "dataset", "params", "macs_per_image", "device", *TEST_COLUMNS)}
    devices = sorted(set(frame[heading["device"]].astype(str)))
    lines += page.stamp("python test.py DATASET --weights CHECKPOINT --name NAME (each row's below)", workbook,
                        ", ".join(devices))
    rows = []
    for _, row in frame.iterrows():
        scores = [percent(row.get(heading[key])) for key in TEST_COLUMNS[:-1]]
        rows.append((row[heading["name"]], row[heading["date"]], *scores, number(row[heading["latency_ms"]]),
                     number(row[heading["params"]] / 1e6), number(row[heading["macs_per_image"]] / 1e9)))
    lines += table(("name", "date", *(COMPARISON.column(key).heading for key in TEST_COLUMNS[:-1]),
                    "latency per image (ms)", "params (M)", "GMACs per image"), rows)
    return lines + [f"- `{name}`: `python test.py {shown_path(data)} --weights {shown_path(weights)} --name {name}`"
                    for name, data, weights in zip(frame[heading["name"]], frame[heading["dataset"]],
                                                   frame[heading["checkpoint"]])] + [""]


def pruning_blocks(results, page):
    """Per pruned network: its steps table (MACs, parameters and val mIoU after each step)."""
    steps = sorted((results / "pruned").glob("*_steps.csv"))
    if not steps:
        return ["## Pruning (torchvision_pruning.py)", ""] + skipped("pruning run", "pruned/<name>_steps.csv")
    lines = []
    for path in steps:
        name, frame = path.name[:-len("_steps.csv")], pd.read_csv(path)
        lines += [f"## Pruning `{name}` (torchvision_pruning.py)", ""]
        lines += page.stamp(f"python torchvision_pruning.py ... --model_name {name} (its settings are recorded in "
                            f"pruned/{name}.pth)", path)
        lines += table(("step", "ratio (%)", "GMACs", "MACs of dense", "params (M)", "val mIoU", "seconds"),
                       [(int(row["step"]), number(row["pruning_ratio"], 1), number(row["macs"] / 1e9),
                         number(row["macs_percent_of_dense"], 1) + "%", number(row["params"] / 1e6),
                         percent(row.get("val_miou")), number(row["seconds"], 1)) for _, row in frame.iterrows()])
    return lines


def benchmark_blocks(results, page):
    """Per benchmark.py table: latency, size and speed-up of every variant timed in one process."""
    tables = sorted((results / "benchmark").glob("*.csv"))
    if not tables:
        return ["## Speed and size (benchmark.py)", ""] + skipped("benchmark table", "benchmark/<name>.csv")
    lines = []
    for path in tables:
        frame = pd.read_csv(path)
        first = frame.iloc[0]
        checkpoints = " ".join(shown_path(item) for item in dict.fromkeys(frame["checkpoint"]))
        command = (f"python benchmark.py {checkpoints} --size {first['size']} --batch {first['batch']}"
                   f"{' --half' if first['dtype'] == 'float16' else ''} --name {path.stem} (--runs not recorded)")
        lines += [f"## Speed and size `{path.stem}` (benchmark.py)", ""]
        lines += page.stamp(command, path, f"{first['device']}, {first['dtype']}, batch {first['batch']} x "
                                           f"{first['size']}x{first['size']} px")
        lines += table(("model", "backend", "params (M)", "GMACs", "median ms", "p90 ms", "speed-up", "MACs x"),
                       [(row["model"], row["backend"], number(row["params_m"]), number(row["gmacs"]),
                         number(row["median_ms"]), number(row["p90_ms"]), number(row["speedup"]) + "x",
                         number(row["macs_ratio"])) for _, row in frame.iterrows()])
        if path.with_suffix(".png").is_file():
            lines += page.figure(path.with_suffix(".png"), f"benchmark_{path.stem}.png", "latency against MACs")
    return lines


def export_block(results, page):
    """The ONNX graphs of export.py, described by the facts export.py stored in each."""
    graphs = sorted((results / "export").glob("*.onnx"))
    lines = ["## ONNX graphs (export.py)", ""]
    if not graphs:
        return lines + skipped("ONNX graph", "export/<name>.onnx")
    rows, commands = [], []
    for path in graphs:
        facts = open_session(path)[1]
        rows.append((path.name, facts["precision"], facts["arch"], facts["pruned"], number(facts["params"] / 1e6),
                     number(facts["macs"] / 1e9), facts["macs_size"], number(path.stat().st_size / 2**20, 1),
                     file_date(path)))
        if facts["precision"] != "int8":
            int8 = path.with_name(f"{path.stem}_int8.onnx")
            commands.append(f"- `{path.name}`: `python export.py {shown_path(facts['source'])} --size "
                            f"{facts['macs_size']}{' --int8 --calib_data VAL_DIR' if int8.is_file() else ''}`")
    lines += page.stamp("python export.py CHECKPOINT --size N (each graph's below)", graphs[-1])
    lines += table(("file", "precision", "arch", "pruned", "params (M)", "GMACs", "at px", "MB", "written"), rows)
    return lines + commands + ["", "export.py prints its parity check and the INT8 graph's agreement with float32 "
                                   "but writes them to no file, so they are not rendered here; a study with "
                                   "`--int8` records the agreement (its table, below).", ""]


def study_command(study_json, name):
    """study.py's command line rebuilt from the settings study.json recorded (the digest of the weights left out)."""
    settings = json.loads(Path(study_json).read_text())["settings"]
    flat = {}
    for key, value in settings.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    words = ["python study.py"]
    for key, value in flat.items():
        if key.endswith("sha256") or value in (None, False, [], ""):
            continue
        values = value if isinstance(value, list) else [] if value is True else [value]
        words.append(" ".join([f"--{key}", *(shown_path(item) if "/" in str(item) else str(item)
                                             for item in values)]))
    return " ".join(words + [f"--name {name}"])


def study_blocks(results, page):
    """Per study: the printed summary table (mean ± spread over seeds) from study_summary.csv, and its plot."""
    summaries = sorted((results / "studies").glob("*/study_summary.csv"))
    if not summaries:
        return ["## Pruning study (study.py)", ""] + skipped("study", "studies/<name>/study_summary.csv")
    lines = []
    for path in summaries:
        folder = path.parent
        study_json = folder / "study.json"
        command = study_command(study_json, folder.name) if study_json.is_file() else DEMO_COMMAND
        lines += [f"## Pruning study `{folder.name}` (study.py)", ""] + page.stamp(command, path)
        keys = PRINTED_SUMMARY + ("int8_agreement_mean",)
        rows = [SUMMARY.taken({key: (None if pd.isna(value) else value) for key, value in row.items()})
                for row in pd.read_csv(path).to_dict("records")]
        lines += table([SUMMARY.column(key).label or SUMMARY.column(key).heading for key in keys],
                       [[SUMMARY.column(key).text(row.get(key), row.get(SUMMARY.column(key).spread)) for key in keys]
                        for row in rows])
        if (folder / "study.png").is_file():
            lines += page.figure(folder / "study.png", f"{folder.name}.png", f"pruning study {folder.name}")
    return lines


def inference_block(results, page):
    """One side-by-side figure of inference.py, the first by name."""
    figures = sorted((results / "inference").glob("*_side_by_side.png"))
    lines = ["## Inference (inference.py)", ""]
    if not figures:
        return lines + skipped("side-by-side figure", "inference/<photo>_<model>_side_by_side.png")
    return (lines + page.stamp(f"python inference.py --image PHOTO --mode side_by_side --save_figure "
                               f"({DEMO_COMMAND}, step 6)", figures[0])
            + page.figure(figures[0], "inference_example.png", figures[0].name))


def lever_setting(study_json):
    """'BN 20, 40 steps, distill 1': the recovery a lever study gave every arm, from its recorded settings."""
    settings = json.loads(Path(study_json).read_text())["settings"]
    tuning, recipe = settings["finetuning"], settings["recipe"]
    steps = f"{tuning['finetune_steps']} fine-tuning steps" if tuning["finetune_steps"] else "no fine-tuning"
    distill = f", distill {recipe['distill']:g}" if recipe.get("distill") else ""
    return f"BN recalibration {settings['bn_recalibrate'] or 'off'}, {steps}{distill}"


def lever_blocks(results, page):
    """--levers DIR: one table of the studies under DIR/studies (one study per recovery setting, the same network,
    grid and seeds): each variant's test mIoU and crack tolerance F1 under each setting."""
    if page.levers is None:
        return []
    folders = sorted(path.parent for path in (page.levers / "studies").glob("*/study_summary.csv"))
    lines = ["## Recovery levers (study.py, one study per setting)", ""]
    if not folders:
        return lines + skipped("lever study", f"{shown_path(page.levers)}/studies/<setting>/study_summary.csv")
    frames = {folder.name: pd.read_csv(folder / "study_summary.csv").set_index("variant") for folder in folders}
    lines += page.stamp(study_command(folders[0] / "study.json", folders[0].name) + " (and one study per setting)",
                        folders[0] / "study_summary.csv")
    lines += [f"- `{name}`: {lever_setting(page.levers / 'studies' / name / 'study.json')}" for name in frames] + [""]
    variants = list(next(iter(frames.values())).index)
    for key, what in (("test_miou_mean", "test mIoU"), ("crack_tolerance_f1_mean", "crack tolerance F1")):
        lines += [f"{what}, per variant (rows) and setting (columns):", ""]
        lines += table(["variant", *frames], [[variant, *(percent(frame[key].get(variant)) for frame in
                                                            frames.values())] for variant in variants])
    return lines


BLOCKS = (training_blocks, test_block, pruning_blocks, benchmark_blocks, export_block, study_blocks, lever_blocks,
          inference_block)


def render(results, output, figures=None, runs=(), levers=None):
    """The page of every block (training runs: those named in `runs`, or all; the lever table of the studies under
    `levers`), written to `output`; returns its text."""
    results = Path(results)
    if not results.is_dir():
        raise UserError(f"no results folder {results}; run `make demo` (or give --results)")
    page = Page(output, figures, runs, levers)
    lines = ["# Results", "", f"Rendered by `python scripts/render_results.py --results {shown_path(results)}` on "
             f"{datetime.datetime.now().isoformat(sep=' ', timespec='minutes')} from the files a run wrote: every "
             "figure below is read from a file, none is typed. Percentages are of pixels; latencies are medians in "
             "ms of the deployed network (docs/evaluation.md).", ""]
    for block in BLOCKS:
        lines += block(results, page)
    lines += ["## Not recorded by any script", "",
              "The test suite's time and disk use (`make test` prints its slowest tests but writes no file) and "
              "the demo's wall-clock time are not rendered.", ""]
    text = "\n".join(lines)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(text)
    return text


# --- the check: no measured figure in the manual that the page does not hold -------------------------------

def documents():
    """The manual: README.md and docs/*.md, the rendered page itself left out."""
    return [REPO / "README.md"] + sorted(path for path in (REPO / "docs").glob("*.md") if path != DEFAULT_PAGE)


def unbacked_figures(manual, page_path=DEFAULT_PAGE):
    """[(document, line number, figure)] of each measured figure typed in `manual` that `page_path` lacks."""
    page_text = Path(page_path).read_text() if Path(page_path).is_file() else ""
    held = {(digits, sign) for digits, sign in NUMBER.findall(page_text)}
    found = []
    for document in manual:
        for number_line, line in enumerate(Path(document).read_text().splitlines(), start=1):
            for match in FIGURE.finditer(line):
                digits, unit = match.groups()
                backed = (digits, "%") in held if unit == "%" else any(held_digits == digits for held_digits, _ in held)
                if not backed and (digits, unit) not in CONSTANTS:
                    found.append((shown_path(document), number_line, match.group(0)))
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results", help="the folder a run wrote (default: %(default)s)")
    parser.add_argument("--output", default="results/results.md", help="the page to write (default: %(default)s)")
    parser.add_argument("--figures", help="copy the figures into this folder and link them there (docs: imgs)")
    parser.add_argument("--runs", nargs="+", default=(), metavar="RUN",
                        help="the training runs to render (default: every folder under runs/)")
    parser.add_argument("--levers", metavar="DIR",
                        help="also render one table of the studies under DIR/studies, one per recovery setting")
    parser.add_argument("--check", action="store_true",
                        help="instead: list measured figures in README.md and docs/*.md that --page lacks")
    parser.add_argument("--page", default=str(DEFAULT_PAGE), help="the page --check compares with")
    args = parser.parse_args(argv)
    if args.check:
        problems = unbacked_figures(documents(), args.page)
        for document, line, figure in problems:
            print(f"{document}:{line}: {figure} is not in {shown_path(args.page)}; cite the rendered block instead")
        sys.exit(1 if problems else 0)
    render(args.results, args.output, args.figures, args.runs, args.levers)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_main(main)
