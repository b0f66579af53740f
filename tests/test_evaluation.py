"""test.py end to end: checkpoint kinds, the workbook against metrics recomputed with numpy, bad inputs."""
import dataclasses
import importlib.metadata
import importlib.util
import shutil
import subprocess
import typing

import numpy as np
import pandas as pd
import pytest
import torch
import torch_pruning as tp
from openpyxl import load_workbook
from PIL import Image

from conftest import REPO, assert_user_error, run_script
from utils import data, model as models
from utils.checkpoint import make_checkpoint, save_atomic
from utils.cli import UserError, default_name, run_main
from utils.data import CLASS_NAMES, NUM_CLASSES
from utils import evaluation
from utils.cli import options_from
from utils.evaluation import LATENCY_LABEL
from utils.inference import InferenceOptions, NetworkOptions

# Loaded by path: "test" is also the name of Python's own regression-test package.
_spec = importlib.util.spec_from_file_location("cracksense_test_script", REPO / "test.py")
test_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_script)
main = test_script.main

MOBILENET = "deeplabv3_mobilenet_v3_large"
NAN = float("nan")


def evaluate_cli(test_dir, weights, output_dir, *extra):
    """test.py's main in-process, quiet and without worker processes."""
    return main([str(test_dir), "--weights", str(weights), "--output_dir", str(output_dir), "--workers", "0",
                 "--device", "cpu", *map(str, extra)])


def read_summary(workbook):
    frame = pd.read_excel(workbook, sheet_name="summary")
    return dict(zip(frame["item"], frame["value"]))


def comparison_rows(output_dir):
    return pd.read_excel(output_dir / "model_test_results.xlsx", sheet_name="results")


@pytest.fixture(scope="module")
def varied_checkpoint(tmp_path_factory):
    """An untrained MobileNet whose head is scaled up so it predicts many classes, not one."""
    torch.manual_seed(0)
    network = models.build(MOBILENET, NUM_CLASSES, init="none").eval()
    torch.nn.init.normal_(network.classifier[4].weight, 0.0, 1.0)
    torch.nn.init.zeros_(network.classifier[4].bias)
    path = tmp_path_factory.mktemp("varied") / "varied_mobilenet.pth"
    save_atomic(make_checkpoint(network, MOBILENET), path)
    return path


@pytest.fixture(scope="module")
def pruned_files(tmp_path_factory):
    """Our pruned checkpoint, a plain state_dict and a whole pickled model of one pruned network."""
    torch.manual_seed(1)
    network = models.build(MOBILENET, NUM_CLASSES, init="none").eval()
    pruner = tp.pruner.MagnitudePruner(network, torch.randn(1, 3, 64, 64),
                                       importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.3,
                                       ignored_layers=models.head_layers(network))
    pruner.step()
    folder = tmp_path_factory.mktemp("pruned")
    save_atomic(make_checkpoint(network, MOBILENET, pruning=pruner.pruning_history()), folder / "m_pruned.pth")
    torch.save(network.state_dict(), folder / "m_pruned_weights.pth")
    torch.save(network, folder / "m_pruned_pickle.pth")  # how the thesis code saved pruned networks
    return folder / "m_pruned.pth", folder / "m_pruned_weights.pth", folder / "m_pruned_pickle.pth"


# --- acceptance: the workbook agrees with metrics recomputed from the saved predictions alone -------------

def numpy_confusion(pairs):
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for label, prediction in pairs:
        keep = label != 255
        np.add.at(matrix, (label[keep].astype(np.int64), prediction[keep].astype(np.int64)), 1)
    return matrix


def numpy_scores(matrix):
    tp_ = np.diag(matrix).astype(float)
    fp = matrix.sum(axis=0) - tp_
    fn = matrix.sum(axis=1) - tp_
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"IoU": tp_ / (tp_ + fp + fn), "precision": tp_ / (tp_ + fp), "recall": tp_ / (tp_ + fn),
                "F1 (Dice)": 2 * tp_ / (2 * tp_ + fp + fn)}


@pytest.fixture(scope="module")
def varied_run(dataset_dir, varied_checkpoint, tmp_path_factory):
    """One evaluation with saved predictions, at a reduced size so predictions are resized to the labels."""
    output_dir = tmp_path_factory.mktemp("varied_run")
    evaluate_cli(dataset_dir / "test", varied_checkpoint, output_dir, "--save_predictions", "--eval_size", "48")
    return output_dir


def test_workbook_agrees_with_numpy_on_saved_predictions(dataset_dir, varied_run):
    test_dir, tmp_path = dataset_dir / "test", varied_run
    folder = tmp_path / "test"
    predictions = folder / "varied_mobilenet_predictions"
    images = sorted(p.stem for p in (test_dir / "Images").iterdir())
    assert sorted(p.stem for p in predictions.iterdir()) == images

    pairs = []
    for stem in images:
        label = np.array(Image.open(test_dir / "Labels_grayscale" / f"{stem}.png"))
        prediction = np.array(Image.open(predictions / f"{stem}.png"))
        assert prediction.shape == label.shape and prediction.dtype == np.uint8  # label's resolution
        pairs.append((label, prediction))
    matrix = numpy_confusion(pairs)
    expected = numpy_scores(matrix)
    assert np.count_nonzero(matrix.sum(axis=0)) >= 3, "the check needs a model that predicts several classes"

    workbook = folder / "varied_mobilenet.xlsx"
    per_class = pd.read_excel(workbook, sheet_name="per_class")
    assert per_class["class"].tolist() == list(CLASS_NAMES)
    for column, values in expected.items():
        np.testing.assert_allclose(per_class[column].to_numpy(float), values, atol=1e-6, equal_nan=True)
    assert per_class["support pixels"].tolist() == matrix.sum(axis=1).tolist()

    summary = read_summary(workbook)
    assert summary["mIoU"] == pytest.approx(np.nanmean(expected["IoU"]), abs=1e-6)
    assert summary["mIoU without background"] == pytest.approx(np.nanmean(expected["IoU"][1:]), abs=1e-6)
    assert summary["mean F1 (Dice)"] == pytest.approx(np.nanmean(expected["F1 (Dice)"]), abs=1e-6)
    assert summary["pixel accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum(), abs=1e-6)
    frequency = matrix.sum(axis=1) / matrix.sum()
    assert summary["frequency-weighted IoU"] == pytest.approx(np.nansum(frequency * expected["IoU"]), abs=1e-6)
    assert summary["crack IoU"] == pytest.approx(expected["IoU"][6], abs=1e-6, nan_ok=True)
    assert summary["images"] == len(images) and summary["evaluation size"] == "shorter side 48 px"

    counts = pd.read_excel(workbook, sheet_name="confusion_matrix", skiprows=1, nrows=NUM_CLASSES, index_col=0)
    assert counts.to_numpy().tolist() == matrix.tolist()
    normalised = pd.read_excel(workbook, sheet_name="confusion_matrix", skiprows=NUM_CLASSES + 4,
                               nrows=NUM_CLASSES, index_col=0)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(normalised.to_numpy(float), matrix / matrix.sum(axis=1, keepdims=True),
                                   atol=1e-9, equal_nan=True)

    per_image = pd.read_excel(workbook, sheet_name="per_image")
    assert per_image["image"].tolist() == [f"{stem}.png" for stem in images]
    for (label, prediction), miou in zip(pairs, per_image["mIoU (per image)"]):
        assert miou == pytest.approx(np.nanmean(numpy_scores(numpy_confusion([(label, prediction)]))["IoU"]))
    per_image_std = per_image["mIoU (per image)"].std(ddof=0)
    assert summary["per-image mIoU, std (population)"] == pytest.approx(per_image_std, abs=1e-9)

    rows = comparison_rows(tmp_path)
    assert len(rows) == 1 and rows.loc[0, "name"] == "varied_mobilenet"
    assert rows.loc[0, "mIoU"] == pytest.approx(summary["mIoU"], abs=1e-12)
    np.testing.assert_allclose(rows.loc[0, [f"IoU {name}" for name in CLASS_NAMES]].to_numpy(float),
                               expected["IoU"], atol=1e-6, equal_nan=True)
    assert (folder / "varied_mobilenet_confusion.png").stat().st_size > 0


def test_workbook_is_formatted_for_people(varied_run):
    book = load_workbook(varied_run / "test" / "varied_mobilenet.xlsx")
    assert book.sheetnames == ["summary", "per_class", "per_image", "confusion_matrix"]
    per_class = book["per_class"]
    assert all(cell.font.bold for cell in per_class[1])
    assert per_class["C2"].number_format == "0.00%"  # IoU of background
    assert per_class["G2"].number_format == "#,##0"  # support pixels
    assert per_class.column_dimensions["B"].width >= len("control_point")
    summary = {row[0].value: row[1] for row in book["summary"].iter_rows(min_row=2)}
    assert summary["mIoU"].number_format == "0.00%"
    assert summary["images"].number_format != "0.00%"
    for item in ("checkpoint", "arch", "classes", "params (aux head dropped)", "dataset", "images", "device",
                 "version: torch", "images per second (deployed network, batch 1)", LATENCY_LABEL,
                 "crack ltIoU (4 px tolerance)", "crack tolerance F1 (4 px)",
                 "per-image crack IoU, std (population)"):
        assert item in summary, item
    assert any(key.startswith("MACs per image at 48x48") for key in summary)
    assert summary["images per second (deployed network, batch 1)"].value > 0
    assert len(book["confusion_matrix"].conditional_formatting) == 1


def test_summary_states_the_means_rule_and_installed_versions(varied_run):
    summary = read_summary(varied_run / "test" / "varied_mobilenet.xlsx")
    assert "counts as 0" in summary["means over classes"]
    assert summary["version: torch-pruning"] == importlib.metadata.version("torch-pruning")
    assert summary["version: torch"] == importlib.metadata.version("torch")
    row = comparison_rows(varied_run).iloc[0]
    assert row["MACs per image (all tiles)"] == summary["MACs per image at 48x48 (all tiles)"]
    assert row["image size"] == "48x48" and row["eval size (shorter side, px)"] == 48
    assert row["boundary ignore (px)"] == 0 and pd.isna(row["tile (px)"]) and pd.isna(row["pruning ratio (%)"])
    assert row["latency per image (ms)"] > 0


# --- checkpoint kinds ------------------------------------------------------------------------------------

def test_thesis_state_dict_and_pruned_checkpoints_each_add_one_row(dataset_dir, pruned_files, tmp_path):
    test_dir = dataset_dir / "test"
    thesis = models.build(MOBILENET, NUM_CLASSES + 1, init="none").eval()
    torch.save(thesis.state_dict(), tmp_path / "thesis_weights.pth")
    evaluate_cli(test_dir, tmp_path / "thesis_weights.pth", tmp_path / "out", "--amp")
    summary = read_summary(tmp_path / "out" / "test" / "thesis_weights.xlsx")
    assert summary["model outputs"] == NUM_CLASSES + 1 and summary["checkpoint format"] == "state_dict"
    assert len(comparison_rows(tmp_path / "out")) == 1

    pruned, pruned_weights, pickled = pruned_files
    evaluate_cli(test_dir, pruned, tmp_path / "out")
    summary = read_summary(tmp_path / "out" / "test" / "m_pruned.xlsx")
    assert 0.3 < summary["params vs dense"] < 0.8 and summary["MACs vs dense"] < 1
    assert summary["pruning history entries (channel groups removed)"] > 0
    assert len(comparison_rows(tmp_path / "out")) == 2

    # The seed form: the pruned architecture from one file, the weights from the other.
    main([str(test_dir), "--weights", str(pruned_weights), "--pruned_model", str(pruned), "--use_pruned",
          "--output_dir", str(tmp_path / "out"), "--workers", "0"])
    summary = read_summary(tmp_path / "out" / "test" / "m_pruned_weights.xlsx")
    assert summary["weights"] == str(pruned_weights) and summary["pruned architecture from"] == str(pruned)

    with pytest.raises(UserError, match="--allow_pickle"):
        evaluate_cli(test_dir, pickled, tmp_path / "out")
    evaluate_cli(test_dir, pickled, tmp_path / "out", "--allow_pickle")
    summary = read_summary(tmp_path / "out" / "test" / "m_pruned_pickle.xlsx")
    assert summary["checkpoint format"] == "pickled_model" and summary["params vs dense"] < 0.8

    rows = comparison_rows(tmp_path / "out")
    assert rows["name"].tolist() == ["thesis_weights", "m_pruned", "m_pruned_weights", "m_pruned_pickle"]
    assert rows.loc[1, "mIoU"] == pytest.approx(rows.loc[2, "mIoU"], abs=1e-12)  # same network, same weights
    assert rows.loc[1, "mIoU"] == pytest.approx(rows.loc[3, "mIoU"], abs=1e-12)


def test_resnet101_with_sliding_window_and_boundary_ignore(dataset_dir, resnet101_checkpoint, tmp_path, capsys):
    result = evaluate_cli(dataset_dir / "test", resnet101_checkpoint, tmp_path, "--tile", "48", "--stride", "32",
                          "--boundary_ignore", "2", "--lt_tolerance", "2", "--batch_size", "2")
    summary = read_summary(tmp_path / "test" / "deeplabv3_resnet101.xlsx")
    assert summary["arch"] == "deeplabv3_resnet101" and summary["sliding window"] == "tile 48, stride 32"
    assert any(item.startswith("MACs per tile at 48x48") for item in summary)
    assert "crack ltIoU (2 px tolerance)" in summary and summary["boundary ignore (px)"] == 2
    assert summary["labelled pixels"] == int(result.confusion.matrix.sum()) < 2 * 64 * 64  # the band is ignored
    assert result.images == 2
    printed = capsys.readouterr().out  # the summary table at the end
    for line_start in ("crack ", "mIoU ", "crack ltIoU (2 px tolerance) ", "latency per image"):
        assert any(line.startswith(line_start) for line in printed.splitlines()), line_start
    assert "model_test_results.xlsx now holds 1 run(s)" in printed
    # 64 px covered by 48 px windows at most 32 apart: 2 windows of 40 px each way, so 4 per image.
    row = comparison_rows(tmp_path).iloc[0]
    assert (row["tile (px)"], row["stride (px)"], row["boundary ignore (px)"]) == (48, 32, 2)
    network = models.strip_aux_head(models.build("deeplabv3_resnet101", NUM_CLASSES, init="none"))
    assert row["MACs per image (all tiles)"] == 4 * models.count_macs(network, (40, 40))[0]


# --- names and overwriting -------------------------------------------------------------------------------

def test_default_name():
    assert default_name("results/pruned/r101_l2_50.pth") == "r101_l2_50"
    assert default_name("results/runs/demo/best.pth") == "demo_best"
    assert default_name("P.pth") == "P"


def test_existing_report_is_kept_unless_overwrite(dataset_dir, mobilenet_checkpoint, tmp_path):
    test_dir = dataset_dir / "test"
    evaluate_cli(test_dir, mobilenet_checkpoint, tmp_path, "--name", "run", "--save_predictions")
    workbook = tmp_path / "test" / "run.xlsx"
    before = workbook.read_bytes()
    with pytest.raises(UserError, match="--overwrite"):
        evaluate_cli(test_dir, mobilenet_checkpoint, tmp_path, "--name", "run")
    assert workbook.read_bytes() == before and len(comparison_rows(tmp_path)) == 1
    (tmp_path / "test" / "run_predictions" / "stale.png").write_bytes(b"old")
    evaluate_cli(test_dir, mobilenet_checkpoint, tmp_path, "--name", "run", "--overwrite", "--save_predictions")
    assert workbook.read_bytes() != before
    assert not (tmp_path / "test" / "run_predictions" / "stale.png").exists()
    assert len(list((tmp_path / "test" / "run_predictions").iterdir())) == 2
    assert len(comparison_rows(tmp_path)) == 2  # the comparison keeps both runs


def test_the_seed_command_parses_as_written():
    args = test_script.get_args_parser().parse_args("TEST_DIR --weights W.pth --pruned_model P.pth --use_pruned".split())
    assert (args.test_dir, args.weights, args.pruned_model, args.use_pruned) == ("TEST_DIR", "W.pth", "P.pth", True)
    assert (args.batch_size, args.lt_tolerance, args.boundary_ignore, args.output_dir) == (1, 4, 0, "results")


# --- typed options: every field is an option of its script, checked when made -------------------------------

def load_script(path):
    spec = importlib.util.spec_from_file_location(f"cracksense_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def option_fields(spec):
    """(leaf field names, names of the nested option dataclasses) of an options dataclass, recursively."""
    hints, leaves, nested = typing.get_type_hints(spec), set(), set()
    for field in dataclasses.fields(spec):
        if dataclasses.is_dataclass(hints[field.name]):
            inner_leaves, inner_nested = option_fields(hints[field.name])
            leaves |= inner_leaves
            nested |= inner_nested | {field.name}
        else:
            leaves.add(field.name)
    return leaves, nested


# cli.options_from keeps a field's default when no option has its name: a misspelt field would run on silently.
SPECS_AND_SCRIPTS = [(evaluation.TestOptions, "test.py"), (InferenceOptions, "inference.py"),
                     (NetworkOptions, "scripts/benchmark_tiling.py")]


@pytest.mark.parametrize("spec, script", SPECS_AND_SCRIPTS, ids=[script for _, script in SPECS_AND_SCRIPTS])
def test_every_options_field_is_an_option_of_its_script(spec, script):
    dests = {action.dest for action in load_script(REPO / script).get_args_parser()._actions}
    leaves, nested = option_fields(spec)
    assert leaves - dests == set(), f"fields of {spec.__name__} that {script} has no option for"
    assert nested & dests == set(), f"nested specs of {spec.__name__} named like an option of {script}"
    if script != "scripts/benchmark_tiling.py":  # the runs' specs also take every option their script offers
        assert dests - leaves <= {"help", "quiet"}, f"options of {script} that {spec.__name__} drops"


def test_options_are_checked_and_settled_when_made(monkeypatch, capsys):
    monkeypatch.setattr("utils.cli.usable_cpus", lambda: 2)
    parse = test_script.get_args_parser().parse_args
    options = options_from(evaluation.TestOptions, vars(parse("TEST_DIR --pruned_model runs/demo/best.pth "
                                                              "--workers 9 --tile 64 --stride 48".split())))
    assert (options.name, options.workers, options.tiling.window_stride) == ("demo_best", 2, 48)
    assert "--workers 9 is more than the 2 CPU(s)" in capsys.readouterr().out
    settings = options.eval_settings(data.S2DS_CLASSES)
    assert (settings.tiling, settings.num_classes, settings.crack_id) == (options.tiling, 7, 6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.name = "other"
    for argv, fragment in [("--stride 48", "--stride"), ("--batch_size 0", "--batch_size"),
                           ("--lt_tolerance -1", "--lt_tolerance"), ("--name ../up", "--name"),
                           ("--amp", "ONNX graph")]:
        with pytest.raises(UserError, match=fragment):
            options_from(evaluation.TestOptions, vars(parse(f"TEST_DIR --weights W.onnx {argv}".split())))


# --- bad inputs: one line, exit status 2 -----------------------------------------------------------------

@pytest.fixture(scope="module")
def five_class_checkpoint(tmp_path_factory):
    network = models.build(MOBILENET, 5, init="none")
    path = tmp_path_factory.mktemp("five") / "five_classes.pth"
    five = data.ClassTable(("background", "crack", "rust", "spall", "stain"),
                           ((0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)))
    save_atomic(make_checkpoint(network, MOBILENET, five), path)
    return path


def run_main_in_process(capsys, *argv):
    """What a user sees from `python test.py ARGS` for an expected failure, without a new process."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [str(arg) for arg in argv])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, exit_info.value.code, captured.out, captured.err)


def test_missing_weights_file_as_a_user_runs_it(dataset_dir, tmp_path):
    result = run_script("test.py", dataset_dir / "test", "--weights", tmp_path / "missing.pth",
                        "--output_dir", tmp_path / "out")
    assert_user_error(result, "not found", "missing.pth")
    assert result.stderr.startswith("test.py: error:")


def test_bad_inputs_give_one_line(dataset_dir, mobilenet_checkpoint, five_class_checkpoint, tmp_path, capsys):
    test_dir = dataset_dir / "test"
    common = ["--output_dir", tmp_path / "out", "--workers", "0", "--device", "cpu"]

    assert_user_error(run_main_in_process(capsys, test_dir, "--weights", five_class_checkpoint, *common),
                      "5 classes")
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(test_dir / "Images", unlabelled / "Images")
    assert_user_error(run_main_in_process(capsys, unlabelled, "--weights", mobilenet_checkpoint, *common),
                      "no labels")
    empty = tmp_path / "empty"
    for folder in ("Images", "Labels_grayscale"):
        (empty / folder).mkdir(parents=True)
    assert_user_error(run_main_in_process(capsys, empty, "--weights", mobilenet_checkpoint, *common),
                      "holds no images")
    assert_user_error(run_main_in_process(capsys, test_dir, "--weights", mobilenet_checkpoint, "--use_pruned",
                                          *common), "--pruned_model")
    assert_user_error(run_main_in_process(capsys, test_dir, "--weights", mobilenet_checkpoint, "--tile", "64",
                                          "--stride", "80", *common), "--stride")

    comparison = tmp_path / "out" / "model_test_results.xlsx"
    comparison.parent.mkdir(parents=True)
    comparison.write_bytes(b"not a workbook at all")
    assert_user_error(run_main_in_process(capsys, test_dir, "--weights", mobilenet_checkpoint, *common),
                      "model_test_results.xlsx", "untouched")
    assert comparison.read_bytes() == b"not a workbook at all"
    assert not (tmp_path / "out" / "test").exists()  # refused before anything was written


# --- the tables' columns, declared once in utils.evaluation ---------------------------------------------------

def test_comparison_columns_keep_their_headings_and_percent_formats():
    schema = evaluation.comparison_schema(["background", "crack"])
    assert [column.heading for column in schema.columns] == [
        "name", "date", "checkpoint", "pruned architecture from", "arch", "dataset", "images", "params",
        "MACs per image (all tiles)", "image size", "eval size (shorter side, px)", "boundary ignore (px)", "tile (px)",
        "stride (px)", "pruning ratio (%)", "pruning importance", "mIoU", "mIoU without background", "classes",
        "pixel accuracy", "crack IoU", "crack F1", "ltIoU", "tolerance F1", "lt tolerance (px)", "IoU background",
        "IoU crack", "latency per image (ms)", "images/s", "device"]
    assert set(schema.percent_headings) == {"mIoU", "mIoU without background", "pixel accuracy", "crack IoU",
                                            "crack F1", "ltIoU", "tolerance F1", "IoU background", "IoU crack"}
    with pytest.raises(KeyError, match="'comparison' has no column 'iou_vegetation'"):
        schema.row({"iou_vegetation": 0.5})  # a class the table does not have


def test_printed_summary_of_hand_made_scores():
    classes = data.ClassTable(("background", "crack"), ((0, 0, 0), (255, 255, 255)))
    scores = {"iou": np.array([0.9075, NAN]), "precision": np.array([0.9334, NAN]), "recall": np.array([1.0, 0.0]),
              "f1": np.array([0.9515, 0.0]), "support_pixels": np.array([175978, 3144]),
              "support_images": np.array([12, 8])}
    per_class = evaluation.per_class_rows(scores, classes)
    assert per_class[1]["pixel_share"] == pytest.approx(3144 / (175978 + 3144))
    summary = [("name", "demo", False), ("classes", "background, crack", False), ("mIoU", 0.2463, True),
               ("crack IoU", NAN, True), ("images", 12345, False), (LATENCY_LABEL, 159.478, False),
               ("mixed precision", False, False), ("version: torch", "2", False)]
    assert evaluation.format_summary(summary, per_class).splitlines() == [
        "class                IoU  precision   recall       F1        pixels  images",
        "background        90.75%     93.34%  100.00%   95.15%       175,978      12",
        "crack                n/a        n/a    0.00%    0.00%         3,144       8",
        "",
        "name                                                       demo",
        "mIoU                                                       24.63%",
        "crack IoU                                                  n/a",
        "images                                                     12,345",
        "latency per image (ms, deployed network, batch 1, median)  159.48",
        "mixed precision                                            False"]
