"""utils.report's workbooks: formatting, exact read-back, and an append that never loses rows."""
import multiprocessing
import os
import stat

import numpy as np
import pandas as pd
import pytest
from openpyxl import load_workbook
from PIL import Image

from utils import report
from utils.cli import UserError
from utils.report import (Column, Schema, Table, append_results_row, cell_text, check_results_workbook,
                          plot_confusion, write_workbook)

NAN = float("nan")


def test_workbook_reads_back_exactly_with_formats(tmp_path):
    path = tmp_path / "book.xlsx"
    scores = pd.DataFrame({"class": ["background", "a_long_class_name_here"], "IoU": [0.123456789, NAN],
                           "pixels": [1234567, 0]})
    summary = pd.DataFrame({"item": ["name", "mIoU", "images"], "value": ["run", 2 / 3, 12]})
    matrix = pd.DataFrame([[0.9, 0.1], [NAN, NAN]], index=pd.Index(["a", "b"], name="gt"), columns=["a", "b"])
    write_workbook(path, {"summary": [Table(summary, percent_rows=(1,))],
                          "scores": [Table(scores, percent_columns=("IoU",))],
                          "matrix": [Table(matrix, title="first", index=True),
                                     Table(matrix, title="second", index=True, percent_columns=("a", "b"),
                                           color_scale=True)]})
    back = pd.read_excel(path, sheet_name=None)
    assert list(back) == ["summary", "scores", "matrix"]
    assert back["scores"]["IoU"][0] == 0.123456789 and np.isnan(back["scores"]["IoU"][1])  # NaN: empty cell
    assert back["summary"]["value"].tolist() == ["run", 2 / 3, 12]
    second = pd.read_excel(path, sheet_name="matrix", skiprows=6, nrows=2, index_col=0)
    np.testing.assert_array_equal(second.to_numpy(float), matrix.to_numpy(), strict=False)

    book = load_workbook(path)
    sheet = book["scores"]
    assert [cell.font.bold for cell in sheet[1]] == [True, True, True]
    assert sheet["B2"].number_format == "0.00%" and sheet["C2"].number_format == "#,##0"
    assert sheet.column_dimensions["A"].width >= len("a_long_class_name_here")
    assert book["summary"]["B3"].number_format == "0.00%" and book["summary"]["B4"].number_format == "#,##0"
    assert book["matrix"]["A1"].value == "first" and book["matrix"]["A1"].font.bold
    rules = book["matrix"].conditional_formatting
    assert len(rules) == 1 and str(next(iter(rules)).sqref) == "B8:C9"  # title row 6, header row 7


def test_append_creates_then_adds_rows_and_keeps_what_people_added(tmp_path):
    path = tmp_path / "results" / "model_test_results.xlsx"
    assert append_results_row(path, {"name": "dense", "mIoU": 0.5, "params": 100}, ("mIoU",)) == 1
    book = load_workbook(path)
    book.create_sheet("my notes")["A1"] = "keep me"
    book["results"]["H1"] = None  # an empty cell at the right of the header must not become a column
    book.save(path)
    assert append_results_row(path, {"name": "pruned", "mIoU": 0.4, "params": 50, "latency (ms)": 3.5},
                              ("mIoU",)) == 2
    rows = pd.read_excel(path, sheet_name="results")
    assert rows["name"].tolist() == ["dense", "pruned"]
    assert rows["mIoU"].tolist() == [0.5, 0.4]
    assert rows.columns.tolist() == ["name", "mIoU", "params", "latency (ms)"]
    assert np.isnan(rows["latency (ms)"][0])
    book = load_workbook(path)
    assert book["my notes"]["A1"].value == "keep me"
    assert book["results"]["B3"].number_format == "0.00%" and book["results"]["A1"].font.bold


@pytest.mark.parametrize("content", [b"not a workbook", b"PK\x03\x04 truncated zip"])
def test_unreadable_workbook_is_refused_and_survives(tmp_path, content):
    path = tmp_path / "model_test_results.xlsx"
    path.write_bytes(content)
    with pytest.raises(UserError, match="untouched"):
        check_results_workbook(path)
    with pytest.raises(UserError, match="cannot read"):
        append_results_row(path, {"name": "x"})
    assert path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [path.name]


def test_workbook_without_results_sheet_is_refused(tmp_path):
    path = tmp_path / "other.xlsx"
    write_workbook(path, {"mine": [Table(pd.DataFrame({"a": [1]}))]})
    before = path.read_bytes()
    with pytest.raises(UserError, match="no 'results' sheet"):
        append_results_row(path, {"name": "x"})
    assert path.read_bytes() == before


def test_locked_workbook_gives_a_clear_error_and_survives(tmp_path, monkeypatch):
    """Excel on Windows holds the file: replacing it fails with PermissionError."""
    path = tmp_path / "model_test_results.xlsx"
    append_results_row(path, {"name": "first"})
    before = path.read_bytes()

    def locked(source, destination):
        raise PermissionError(13, "The process cannot access the file", str(destination))

    monkeypatch.setattr(report.os, "replace", locked)
    with pytest.raises(UserError, match="permission denied"):
        append_results_row(path, {"name": "second"})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp_")]  # no temporary left behind


def _append_many(path, worker, count):
    for step in range(count):
        append_results_row(path, {"name": f"{worker}-{step}"})


def test_appends_side_by_side_lose_nothing(tmp_path):
    path = str(tmp_path / "model_test_results.xlsx")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(path, worker, 6)) for worker in range(2)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    names = pd.read_excel(path)["name"].tolist()
    assert sorted(names) == sorted(f"{w}-{s}" for w in range(2) for s in range(6))


def test_files_are_written_with_the_usual_permissions(tmp_path):
    path = tmp_path / "book.xlsx"
    write_workbook(path, {"a": [Table(pd.DataFrame({"x": [1]}))]})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600


def test_confusion_plot(tmp_path):
    matrix = np.array([[0.9, 0.1, 0.0], [NAN, NAN, NAN], [0.2, 0.0, 0.8]])
    path = tmp_path / "confusion.png"
    plot_confusion(matrix, ["background", "control_point", "crack"], path, title="run: confusion matrix")
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 300


@pytest.fixture
def kept_figures(monkeypatch):
    """The figures the plot functions close, kept open so a test can read their axes."""
    figures = []
    monkeypatch.setattr(report.plt, "close", figures.append)
    return figures


def test_confusion_colour_bar_is_in_the_cells_percent(tmp_path, kept_figures):
    matrix = np.array([[0.9, 0.1], [0.25, 0.75]])
    plot_confusion(matrix, ["background", "crack"], tmp_path / "c.png")
    heatmap, colour_bar = kept_figures[0].axes
    assert colour_bar.get_ylim() == (0.0, 100.0)
    assert "%" in colour_bar.get_ylabel()
    assert [text.get_text() for text in heatmap.texts] == ["90.0", "10.0", "25.0", "75.0"]
    assert heatmap.images[0].get_array()[1, 0] == pytest.approx(25.0)  # colour of a cell = its printed %


def test_curves_survive_a_loss_spike_and_count_whole_epochs(tmp_path, kept_figures):
    rows = [{"epoch": 1, "train_loss": 1.9, "val_loss": 24642.0, "val_miou": 0.05, "val_iou_crack": 0.01},
            {"epoch": 2, "train_loss": 0.8, "val_loss": 0.9, "val_miou": 0.21, "val_iou_crack": 0.1}]
    report.plot_curves(rows, tmp_path / "curves.png", ["crack"])
    loss_axis, iou_axis = kept_figures[0].axes
    assert loss_axis.get_yscale() == "log"  # 0.8 and 0.9 stay apart from a 24,642 spike
    for axis in (loss_axis, iou_axis):
        ticks = [tick for tick in axis.get_xticks() if axis.get_xlim()[0] <= tick <= axis.get_xlim()[1]]
        assert ticks == [1.0, 2.0]


# --- one schema per table: rows, sheets and the printed table ------------------------------------------------

SCORES = Schema("scores", (Column("name", "name"), Column("miou", "mIoU", percent=True, na="n/a"),
                           Column("latency_ms", "latency", unit="ms", digits=1), Column("params", "params"),
                           Column("crack_iou", "crack IoU", percent=True, optional=True)))


def test_a_misspelt_or_missing_key_is_refused_naming_key_and_table():
    with pytest.raises(KeyError, match=r"table 'scores' has no column 'mIou'"):
        SCORES.row(name="a", mIou=0.5, latency_ms=1.0, params=3)
    with pytest.raises(KeyError, match=r"row of table 'scores' lacks params"):
        SCORES.row(name="a", miou=0.5, latency_ms=1.0)
    with pytest.raises(KeyError, match="no column 'mIoU'"):  # a hand-made row is checked where it is used too
        SCORES.format([{"name": "a", "mIoU": 0.5, "latency_ms": 1.0, "params": 3}])
    with pytest.raises(ValueError, match="declares the heading"):
        Schema("twice", (Column("a", "size"), Column("b", "size")))
    with pytest.raises(ValueError, match="percentage"):
        Column("ratio", "ratio", unit="%", percent=True)
    row = SCORES.row(name="a", miou=0.5, latency_ms=None, params=3)  # None: not measured, still a value
    assert list(row) == ["name", "miou", "latency_ms", "params"]  # the optional column left out


def test_schema_headings_and_percent_formats_reach_the_workbook(tmp_path):
    rows = [SCORES.row(name="dense", miou=0.5, latency_ms=12.5, params=1000, crack_iou=0.25),
            SCORES.row(name="pruned", miou=NAN, latency_ms=3.25, params=10)]
    assert SCORES.headed(rows[0]) == {"name": "dense", "mIoU": 0.5, "latency (ms)": 12.5, "params": 1000,
                                      "crack IoU": 0.25}
    path = tmp_path / "book.xlsx"
    write_workbook(path, {"scores": [SCORES.table(rows)]})
    sheet = load_workbook(path)["scores"]
    assert [cell.value for cell in sheet[1]] == ["name", "mIoU", "latency (ms)", "params", "crack IoU"]
    assert sheet["B2"].number_format == "0.00%" and sheet["E2"].number_format == "0.00%"
    assert sheet["C2"].number_format == "0.0000" and sheet["D2"].number_format == "#,##0"
    assert sheet["B3"].value is None and sheet["E3"].value is None  # NaN and left out: empty cells
    append_results_row(tmp_path / "results.xlsx", SCORES.headed(rows[0]), SCORES.percent_headings)
    results = load_workbook(tmp_path / "results.xlsx")["results"]
    assert results["B2"].number_format == "0.00%" and results["E2"].number_format == "0.00%"


def test_the_printed_table_of_hand_made_rows():
    rows = [SCORES.row(name="dense", miou=0.5, latency_ms=1234.56, params=61000000),
            SCORES.row(name="a_longer_name", miou=NAN, latency_ms=None, params=7, crack_iou=0.0412)]
    assert SCORES.format(rows).splitlines() == [
        "name             mIoU  latency (ms)      params  crack IoU",
        "dense          50.00%       1,234.6  61,000,000          -",
        "a_longer_name     n/a             -           7      4.12%"]
    assert SCORES.format(rows, keys=("params", "name"), headings=False, separator="  ").splitlines() == [
        "61,000,000  dense", "         7  a_longer_name"]
    assert Schema("w", (Column("x", "x", percent=True, width=9),)).format([{"x": 0.5}]) == "        x\n   50.00%"


def test_cell_text():
    assert [cell_text(value) for value in (None, NAN, True, "text", 12345, 0.5, np.int64(3))] == [
        "-", "-", "True", "text", "12,345", "0.50", "3"]
    assert cell_text(0.12345, percent=True) == "12.35%" and cell_text(NAN, percent=True, na="n/a") == "n/a"
    assert cell_text(2 / 3, digits=4) == "0.6667"


def test_a_wider_record_gives_its_row_and_a_change_prints_with_its_spread():
    schema = Schema("changes", (Column("variant", "variant"),
                                Column("change", "mIoU change", percent=True, signed=True, spread="spread"),
                                Column("spread", "mIoU change spread", percent=True)))
    record = {"variant": "taylor", "change": 0.005, "spread": 0.0212, "family": "Taylor"}  # family: not shown
    assert schema.taken(record) == {"variant": "taylor", "change": 0.005, "spread": 0.0212}
    with pytest.raises(KeyError, match="'changes' needs spread"):
        schema.taken({"variant": "taylor", "change": 0.005})
    rows = [schema.taken(record), schema.row(variant="one seed", change=-0.2, spread=NAN)]
    assert schema.format(rows, keys=("variant", "change")).splitlines() == [
        "variant      mIoU change", "taylor    +0.50% ± 2.12%", "one seed         -20.00%"]
    with pytest.raises(KeyError, match="no column 'sprd'"):  # a spread naming no column fails when declared
        Schema("bad", (Column("change", "change", spread="sprd"),))


def test_a_scaled_column_prints_its_unit_and_keeps_the_value():
    schema = Schema("steps", (Column("step", "step", width=4), Column("macs", "macs", label="GMACs", scale=1e-9,
                                                                            width=9)))
    row = schema.row(step=1, macs=62_890_000_000)
    assert schema.format([row], separator=" ").splitlines() == ["step     GMACs", "   1     62.89"]
    assert schema.format([], separator=" ") == "step     GMACs"  # the heading alone, for a table printed as it grows
    assert schema.frame([row])["macs"].tolist() == [62_890_000_000]
