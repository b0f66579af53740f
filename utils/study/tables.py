"""The study's tables: study.csv (one row per (variant, seed)), the summary (mean and spread over seeds, changes
against the dense fine-tuned twin with their noise verdicts) of study_summary.csv, study.xlsx and the printed table.

Floor 5 (docs/ARCHITECTURE.md): columns are declared once in utils.report's Schema.
"""
import math

import numpy as np
import pandas as pd

from utils.report import Column, Schema
from utils.study.grid import TWIN

# study.csv (headed by key, fractions) and study.xlsx's "per seed" sheet: one row per (variant, seed).
PER_SEED = Schema("study per seed", (
    Column("seed", "seed"), Column("criterion", "criterion"), Column("p_value", "p (norm)"),
    Column("pruning_ratio", "ratio", unit="%"), Column("steps", "steps"), Column("target_gmacs", "GMACs budget"),
    Column("plan", "per-part ratios (budgeted)"), Column("precision", "precision"), Column("gmacs", "GMACs"),
    Column("params_m", "params", unit="M"), Column("latency_ms", "latency", unit="ms"), Column("speedup", "speed-up"),
    Column("test_miou", "test mIoU", percent=True), Column("crack_iou", "crack IoU", percent=True),
    Column("crack_tolerance_f1", "crack tolerance F1", percent=True),
    Column("test_miou_change", "mIoU change vs dense fine-tuned", percent=True),
    Column("crack_tolerance_f1_change", "crack tol. F1 change vs dense fine-tuned", percent=True),
    Column("val_miou", "val mIoU (best step)", percent=True), Column("best_step", "best fine-tuning step"),
    Column("int8_agreement", "INT8 vs float32 pixel agreement (val)", percent=True),
    Column("variant", "variant"), Column("run", "checkpoint")))
# The scores summarised as mean and spread over seeds, and the two compared with the dense fine-tuned twin.
# Where each test score of a row comes from, in evaluation.collect_metrics' (scores, tolerance scores) of the test
# split with its crack class id (None: no crack class): a new score is its Columns above and below and an entry here.
SCORES = {
    "test_miou": lambda scores, tolerance, crack: scores["mean_iou"],
    "crack_iou": lambda scores, tolerance, crack: math.nan if crack is None else scores["iou"][crack],
    "crack_tolerance_f1": lambda scores, tolerance, crack: math.nan if crack is None else tolerance["lt_f1"],
}
SUMMARISED = ("gmacs", "params_m", "latency_ms", "speedup", *SCORES, "val_miou", "int8_agreement")
COMPARED = ("test_miou", "crack_tolerance_f1")


def table_rows(rows):
    """study.csv's rows: GMACs, params in millions and each score's change against the dense fine-tuned twin of
    the same seed. A run finished before a column was added (a resumed study) lacks it: shown as not measured
    ("-"), with one note, instead of failing the whole table."""
    twins = {row["seed"]: row for row in rows if row["variant"] == TWIN}
    out, older = [], set()
    for row in rows:
        twin = twins[row["seed"]]
        row = {**row, "gmacs": row["macs"] / 1e9, "params_m": row["params"] / 1e6,
               **{f"{key}_change": row[key] - twin[key] for key in COMPARED}}
        lacking = {column.key for column in PER_SEED.columns} - set(row)
        older |= lacking
        out.append(PER_SEED.taken({**dict.fromkeys(lacking), **row}) | {"family": row["family"]})
    if older:
        print(f"note: runs finished by an earlier version lack {', '.join(sorted(older))}: shown as not measured; "
              f"--overwrite measures them", flush=True)
    return out


def _spread(values):
    """Sample standard deviation over seeds (n - 1); NaN with one seed, where there is no spread to give."""
    values = np.asarray([np.nan if value is None else value for value in values], dtype=float)
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


# Changes are shown to 0.01 percentage points: one that rounds to 0.00 is never called a difference, even where
# every seed gave the same score (zero spread), as a deterministic network's INT8 twin can.
SHOWN_RESOLUTION = 0.00005


def verdict(change, spread, twin_spread):
    """'within noise' when the mean change is no larger than the larger spread of variant and twin over seeds, or
    too small to show in the table."""
    noise = max(spread, twin_spread)
    if np.isnan(noise):
        return "one seed: no spread"
    if abs(change) <= max(noise, SHOWN_RESOLUTION):
        return "within noise"
    return "above dense (beyond noise)" if change > 0 else "below dense (beyond noise)"


def summary_rows(table):
    """study.xlsx's summary and the printed table: per variant the mean and spread (sample standard deviation)
    over seeds of every score, and the mean change against the dense fine-tuned twin with its verdict."""
    frame = pd.DataFrame(table)
    groups = list(frame.groupby("variant", sort=False))
    twin = dict(groups)[TWIN]
    out = []
    for _, members in groups:
        first = members.iloc[0]
        row = {key: first[key] for key in ("criterion", "p_value", "pruning_ratio", "steps", "target_gmacs", "plan",
                                           "precision", "family", "variant")}
        row["seeds"] = len(members)
        for key in SUMMARISED + tuple(f"{key}_change" for key in COMPARED):
            row[f"{key}_mean"] = float(members[key].astype(float).mean())
            row[f"{key}_spread"] = _spread(members[key])
        for key in COMPARED:
            row[f"{key}_verdict"] = ("reference" if first["variant"] == TWIN else
                                     verdict(row[f"{key}_change_mean"], row[f"{key}_spread"],
                                             _spread(twin[key])))
        out.append(row)
    return out


# study.xlsx's summary sheet and the printed table (its columns, labels and "mean ± spread"): per variant.
SUMMARY = Schema("study summary", (
    Column("criterion", "criterion"), Column("p_value", "p (norm)"), Column("pruning_ratio", "ratio", unit="%"),
    Column("steps", "steps"), Column("target_gmacs", "GMACs budget"), Column("plan", "per-part ratios (budgeted)"),
    Column("precision", "precision"), Column("seeds", "seeds"), Column("gmacs_mean", "GMACs"),
    Column("params_m_mean", "params", unit="M"), Column("latency_ms_mean", "latency", unit="ms", label="latency ms"),
    Column("speedup_mean", "speed-up", spread="speedup_spread"), Column("speedup_spread", "speed-up spread"),
    Column("test_miou_mean", "test mIoU", percent=True, spread="test_miou_spread"),
    Column("test_miou_spread", "test mIoU spread", percent=True),
    Column("crack_iou_mean", "crack IoU", percent=True), Column("crack_iou_spread", "crack IoU spread", percent=True),
    Column("crack_tolerance_f1_mean", "crack tolerance F1", percent=True, label="crack tol. F1",
           spread="crack_tolerance_f1_spread"),
    Column("crack_tolerance_f1_spread", "crack tolerance F1 spread", percent=True),
    Column("test_miou_change_mean", "mIoU change vs dense fine-tuned", percent=True, signed=True,
           label="mIoU vs dense ft", spread="test_miou_change_spread"),
    Column("test_miou_change_spread", "mIoU change spread", percent=True),
    Column("test_miou_verdict", "mIoU: vs dense", label="mIoU verdict"),
    Column("crack_tolerance_f1_change_mean", "crack tol. F1 change vs dense fine-tuned", percent=True, signed=True,
           label="crack F1 vs dense ft", spread="crack_tolerance_f1_change_spread"),
    Column("crack_tolerance_f1_change_spread", "crack tol. F1 change spread", percent=True),
    Column("crack_tolerance_f1_verdict", "crack tol. F1: vs dense", label="crack F1 verdict"),
    Column("val_miou_mean", "val mIoU (best step)", percent=True),
    Column("int8_agreement_mean", "INT8 vs float32 pixel agreement (val)", percent=True),
    Column("variant", "variant")))
PRINTED_SUMMARY = ("variant", "seeds", "gmacs_mean", "latency_ms_mean", "speedup_mean", "test_miou_mean",
                   "crack_tolerance_f1_mean", "test_miou_change_mean", "test_miou_verdict",
                   "crack_tolerance_f1_change_mean", "crack_tolerance_f1_verdict")


def format_table(summary):
    """The table printed at the end: mean ± spread over seeds; changes are percentage points against the twin."""
    return SUMMARY.format([SUMMARY.taken(row) for row in summary], keys=PRINTED_SUMMARY)
