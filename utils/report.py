"""Files people read: CSV tables, curves and confusion-matrix plots, Excel workbooks.

Model-free. Every write goes to a temporary file first and is then moved into place, so an
interrupted run never leaves half a table behind.
"""
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from openpyxl import Workbook, load_workbook  # noqa: E402
from openpyxl.formatting.rule import ColorScaleRule  # noqa: E402
from openpyxl.styles import Alignment, Font  # noqa: E402
from openpyxl.utils import get_column_letter  # noqa: E402

from utils.cli import UserError  # noqa: E402
from utils.files import refuse_read_only, replace_atomically  # noqa: E402


def write_csv(rows, path):
    """A list of dicts as a CSV table (columns in first-seen order)."""
    replace_atomically(path, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))


def plot_curves(rows, path, class_names=()):
    """Loss and IoU over epochs from metrics.csv rows: the first thing to look at after training.

    Loss is on a log axis, so one early spike (an epoch-1 val loss in the thousands) does not flatten
    the rest; epochs are whole numbers on the x axis however few there are.
    """
    frame = pd.DataFrame(rows)
    figure, (loss_axis, iou_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    loss_axis.plot(frame["epoch"], frame["train_loss"], "o-", label="train loss")
    if frame["val_loss"].notna().any():
        loss_axis.plot(frame["epoch"], frame["val_loss"], "o-", label="val loss")
    loss_axis.set(xlabel="epoch", ylabel="loss (log scale)", title="Loss", yscale="log")
    loss_axis.legend()
    iou_axis.plot(frame["epoch"], 100 * frame["val_miou"], "o-", color="black", linewidth=2.5, label="mIoU")
    for name in class_names:
        column = f"val_iou_{name}"
        if column in frame and frame[column].notna().any():
            iou_axis.plot(frame["epoch"], 100 * frame[column], ".--", linewidth=1, label=name)
    iou_axis.set(xlabel="epoch", ylabel="IoU (%)", title="Validation IoU", ylim=(0, 100))
    iou_axis.legend(fontsize=8, ncol=2)
    for axis in (loss_axis, iou_axis):
        axis.grid(alpha=0.3, which="both")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    replace_atomically(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)


# --- Excel workbooks --------------------------------------------------------------------------------------

PERCENT_FORMAT = "0.00%"
_NUMBER_FORMATS = {int: "#,##0", float: "0.0000"}
_MIN_WIDTH, _MAX_WIDTH = 6, 80
RESULTS_SHEET = "results"


@dataclass
class Table:
    """One block of a sheet: a DataFrame with its own title and formats.

    Fractions in `percent_columns` (or, for key/value sheets, in the `value_column` of the rows at the
    positions in `percent_rows`) are stored as fractions and shown as percentages, so the numbers read
    back exactly. `color_scale` shades the numeric cells from white (0) to red (1).
    """
    frame: pd.DataFrame
    title: str | None = None
    percent_columns: tuple = ()
    percent_rows: tuple = ()
    value_column: str = "value"
    index: bool = False
    color_scale: bool = False


def _cell_value(value):
    """A value openpyxl can store; NaN and None become an empty cell."""
    if value is None:
        return None
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return value


def _number_format(value, percent):
    if percent:
        return PERCENT_FORMAT
    if isinstance(value, bool):
        return None
    return _NUMBER_FORMATS.get(type(value))


def _display_width(value, number_format):
    """Roughly how many characters Excel shows for this cell, for fitting the column."""
    if value is None:
        return 0
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return max(len(line) for line in str(value).splitlines() or [""])
    if number_format == PERCENT_FORMAT:
        return len(f"{100 * value:.2f}%")
    if number_format == "#,##0":
        return len(f"{value:,.0f}")
    if number_format == "0.0000":
        return len(f"{value:.4f}")
    return max(len(line) for line in str(value).splitlines() or [""])


def _write_table(sheet, table, first_row, widths):
    """Write one Table from `first_row`; returns the next free row (one blank row left after it)."""
    frame = table.frame.reset_index() if table.index else table.frame
    row = first_row
    if table.title:
        sheet.cell(row=row, column=1, value=table.title).font = Font(bold=True, italic=True)
        row += 1
    for column, name in enumerate(frame.columns, start=1):
        cell = sheet.cell(row=row, column=column, value=str(name))
        cell.font = Font(bold=True)
        cell.alignment = Alignment(horizontal="center", wrap_text=False)
        widths[column] = max(widths.get(column, 0), len(str(name)))
    header_row = row
    percent_rows = set(table.percent_rows)
    for position, values in enumerate(frame.itertuples(index=False)):
        row += 1
        for column, (name, raw) in enumerate(zip(frame.columns, values), start=1):
            value = _cell_value(raw)
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            percent = numeric and (name in table.percent_columns or
                                   (name == table.value_column and position in percent_rows))
            cell = sheet.cell(row=row, column=column, value=value)
            number_format = _number_format(value, percent) if numeric else None
            if number_format:
                cell.number_format = number_format
            if table.index and column == 1:
                cell.font = Font(bold=True)
            widths[column] = max(widths.get(column, 0), _display_width(value, number_format))
    if table.color_scale and row > header_row:
        first_column = 2 if table.index else 1
        span = (f"{get_column_letter(first_column)}{header_row + 1}:"
                f"{get_column_letter(len(frame.columns))}{row}")
        sheet.conditional_formatting.add(span, ColorScaleRule(
            start_type="num", start_value=0, start_color="FFFFFF", end_type="num", end_value=1,
            end_color="F8696B"))
    return row + 2


def _fit_columns(sheet, widths):
    for column, width in widths.items():
        sheet.column_dimensions[get_column_letter(column)].width = min(_MAX_WIDTH, max(_MIN_WIDTH, width + 2))


def write_workbook(path, sheets):
    """An .xlsx from {sheet name: [Table, ...]}: bold headers, percentages, fitted widths; written atomically."""
    workbook = Workbook()
    workbook.remove(workbook.active)
    for name, tables in sheets.items():
        sheet = workbook.create_sheet(title=name)
        widths, row = {}, 1
        for table in tables:
            row = _write_table(sheet, table, row, widths)
        _fit_columns(sheet, widths)
    replace_atomically(path, workbook.save)


# --- columns declared once: rows, sheets and printed tables from one schema -------------------------------

@dataclass(frozen=True)
class Column:
    """One column of a table people read, declared once with everything its outputs need.

    `key` names it in code, `header` (plus ` (unit)` when `unit` is given) in CSV and Excel; `percent`: a
    fraction stored as such and shown as a percentage; `digits`: decimals printed; `label`: a shorter printed
    heading; `width`: the least width it takes in a printed table; `na`: printed for NaN (None is always "-",
    a value that was not measured); `optional`: a row may leave it out (the crack columns of a set without cracks);
    `signed`: printed with its sign (a change); `spread`: the key of the column holding this value's spread, printed
    beside it as "value ± spread"; `scale`: the printed value is the value times this (1e-9: MACs printed as GMACs),
    CSV and Excel keep the value itself.
    """
    key: str
    header: str
    unit: str | None = None
    percent: bool = False
    digits: int = 2
    label: str | None = None
    width: int = 0
    na: str = "-"
    optional: bool = False
    signed: bool = False
    spread: str | None = None
    scale: float = 1

    def __post_init__(self):
        if not self.key or not self.header:
            raise ValueError(f"a column needs a key and a header, got {self.key!r}, {self.header!r}")
        if self.percent and self.unit:
            raise ValueError(f"column {self.key!r} is a percentage; it cannot also be in {self.unit}")

    @property
    def heading(self):
        """The column's name in CSV and Excel."""
        return f"{self.header} ({self.unit})" if self.unit else self.header

    def text(self, value, spread=None):
        """The value as printed (with its spread when one is given and finite)."""
        text = cell_text(self._scaled(value), self.percent, self.digits, self.na, self.signed)
        if spread is not None and cell_text(spread) != "-":
            text += f" ± {cell_text(self._scaled(spread), self.percent, self.digits, self.na)}"
        return text

    def _scaled(self, value):
        if self.scale == 1 or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            return value
        return value * self.scale


def cell_text(value, percent=False, digits=2, na="-", signed=False):
    """A value as printed: a fraction in percent with `digits` decimals, thousands separated, None as "-",
    NaN as `na`, with a + before a positive change when `signed`; text as it is."""
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        value = value.item()
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return na
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    sign = "+" if signed else ""
    if percent:
        return f"{100 * value:{sign}.{digits}f}%"
    return f"{value:{sign},d}" if isinstance(value, int) else f"{value:{sign},.{digits}f}"


class Schema:
    """The columns of one table, in order, declared once: rows built through it refuse a key it does not have,
    so a misspelt column fails where the row is made instead of printing "-" in a report."""

    def __init__(self, name, columns):
        self.name, self.columns = name, tuple(columns)
        for attribute in ("key", "heading"):
            names = [getattr(column, attribute) for column in self.columns]
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ValueError(f"table {name!r} declares the {attribute}(s) {', '.join(repeated)} twice")
        self._by_key = {column.key: column for column in self.columns}
        for column in self.columns:
            if column.spread is not None:
                self.column(column.spread)

    def __repr__(self):
        return f"Schema({self.name!r}, {[column.key for column in self.columns]})"

    def column(self, key):
        if key not in self._by_key:
            raise KeyError(f"table {self.name!r} has no column {key!r} (its columns: {', '.join(self._by_key)})")
        return self._by_key[key]

    def inserted(self, before, columns):
        """A copy with `columns` placed before the column `before`: the columns a class table generates."""
        position = self.columns.index(self.column(before))
        return Schema(self.name, self.columns[:position] + tuple(columns) + self.columns[position:])

    def row(self, values=(), **more):
        """A row of this table in its column order; an unknown key, or a missing one not marked optional, is a
        KeyError naming the key and the table. None is a value: "not measured"."""
        values = dict(values, **more)
        for key in values:
            self.column(key)
        missing = [column.key for column in self.columns if column.key not in values and not column.optional]
        if missing:
            raise KeyError(f"a row of table {self.name!r} lacks {', '.join(missing)}")
        return {column.key: values[column.key] for column in self.columns if column.key in values}

    def taken(self, record):
        """The row of this table in a wider record (a run's facts): every column taken from it, so a column the
        record lacks is a KeyError rather than a "-" in a report; keys the table does not show are left behind."""
        missing = [column.key for column in self.columns if column.key not in record and not column.optional]
        if missing:
            raise KeyError(f"table {self.name!r} needs {', '.join(missing)}, which the record lacks")
        return self.row({column.key: record[column.key] for column in self.columns if column.key in record})

    def present(self, rows):
        """The columns that at least one of `rows` holds (each row checked)."""
        rows = [self.row(row) for row in rows]
        return [column for column in self.columns if any(column.key in row for row in rows)]

    def headed(self, row):
        """{heading: value} of one row, as a CSV or the comparison workbook stores it."""
        return {self.column(key).heading: value for key, value in self.row(row).items()}

    @property
    def percent_headings(self):
        return tuple(column.heading for column in self.columns if column.percent)

    def frame(self, rows):
        """The rows as a DataFrame under the columns' headings (columns no row holds are left out)."""
        columns = self.present(rows)
        return pd.DataFrame([[row.get(column.key) for column in columns] for row in rows],
                            columns=[column.heading for column in columns])

    def table(self, rows, title=None):
        """A Table for write_workbook: headings and percent formats from the columns."""
        return Table(self.frame(rows), title=title, percent_columns=self.percent_headings)

    def format(self, rows, keys=None, headings=True, separator="  "):
        """The one printed table: fixed-width text of `keys` (by default the columns the rows hold, or all of them
        for the headings alone); text columns left-aligned, numbers right-aligned, each column at least its
        `width` (so a table printed a row at a time stays aligned); no trailing spaces."""
        columns = [self.column(key) for key in keys] if keys else self.present(rows) if rows else self.columns
        rows = [self.row(row) for row in rows]
        cells = [[column.text(row.get(column.key), row.get(column.spread)) for column in columns] for row in rows]
        if headings:
            cells.insert(0, [column.label or column.heading for column in columns])
        widths = [max([column.width] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]
        left = [any(isinstance(row.get(column.key), str) for row in rows) for column in columns]
        return "\n".join(separator.join(f"{text:<{width}}" if is_left else f"{text:>{width}}"
                                        for text, width, is_left in zip(line, widths, left)).rstrip()
                         for line in cells)


# --- the cumulative comparison workbook -----------------------------------------------------------------

@contextmanager
def _exclusive_lock(path):
    """Serialise appends from evaluations running side by side (POSIX; a no-op where fcntl is missing). The lock
    is held on the workbook's folder itself, so no lock file is left behind."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing releases the lock


def _open_results_workbook(path):
    """The existing comparison workbook and its results sheet, or a UserError that leaves the file alone."""
    hint = "it was left untouched; close it if Excel has it open, or move it away to start a new one"
    try:
        workbook = load_workbook(path)
    except PermissionError:
        raise UserError(f"cannot open {path}: permission denied (locked?); {hint}") from None
    except Exception as error:  # openpyxl reports a damaged file with many exception types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot read {path} as an Excel workbook ({reason}); {hint}") from None
    if RESULTS_SHEET not in workbook.sheetnames:
        raise UserError(f"{path} has no '{RESULTS_SHEET}' sheet, so it is not a results table; {hint}")
    return workbook, workbook[RESULTS_SHEET]


def check_results_workbook(path):
    """Refuse early (before a long evaluation) when an existing comparison workbook cannot be appended to."""
    if os.path.exists(path):
        refuse_read_only(path)
        _open_results_workbook(path)


def append_results_row(path, row, percent_columns=()):
    """Add one row (a dict) to the comparison workbook, creating it if needed; returns the row count.

    Earlier rows, extra sheets and formatting people added are kept: the workbook is opened, one row is
    appended (new keys become new columns at the right), and the copy replaces the file atomically. An
    unreadable or locked workbook raises UserError and is not touched.
    """
    with _exclusive_lock(path):
        if os.path.exists(path):
            workbook, sheet = _open_results_workbook(path)
            header = [cell.value for cell in sheet[1]]
            while header and header[-1] is None:
                header.pop()
            new_row = sheet.max_row + 1
        else:
            workbook = Workbook()
            sheet = workbook.active
            sheet.title = RESULTS_SHEET
            header, new_row = [], 2
        for key in row:
            if key not in header:
                header.append(key)
                sheet.cell(row=1, column=len(header), value=key).font = Font(bold=True)
        for column, key in enumerate(header, start=1):
            if key in row:
                value = _cell_value(row[key])
                cell = sheet.cell(row=new_row, column=column, value=value)
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                number_format = _number_format(value, key in percent_columns) if numeric else None
                if number_format:
                    cell.number_format = number_format
        widths = {}
        for column, cells in enumerate(sheet.iter_cols(min_row=1, max_row=new_row, max_col=len(header)), start=1):
            widths[column] = max(_display_width(cell.value, cell.number_format) for cell in cells)
        _fit_columns(sheet, widths)
        sheet.freeze_panes = "B2"
        try:
            replace_atomically(path, workbook.save)
        except PermissionError:
            raise UserError(f"cannot write {path}: permission denied (open in Excel?); the old file is "
                            f"unchanged, close it and run again") from None
        return new_row - 1


# --- confusion matrix figure ----------------------------------------------------------------------------

def plot_confusion(normalised, class_names, path, title="Confusion matrix"):
    """A heatmap of a row-normalised confusion matrix: class names, the % in each cell, grey rows for
    classes absent from the ground truth."""
    matrix = np.asarray(normalised, dtype=np.float64)
    size = max(5.0, 0.9 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    colours = plt.get_cmap("Blues").with_extremes(bad="lightgrey")
    image = axis.imshow(np.ma.masked_invalid(100 * matrix), cmap=colours, vmin=0, vmax=100)
    axis.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set(xlabel="prediction", ylabel="ground truth", title=f"{title}\n(% of each ground-truth class)")
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            axis.text(j, i, f"{100 * value:.1f}", ha="center", va="center", fontsize=8,
                      color="white" if value > 0.5 else "black")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="% of the ground-truth class")
    figure.tight_layout()
    replace_atomically(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)
