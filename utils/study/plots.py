"""The study's figures: study.png (test mIoU and crack tolerance F1 against GMACs and latency, mean and spread over
seeds, the dense twin's noise band) and sensitivity.png (val mIoU drop per part against the share removed).

Floor 5 (docs/ARCHITECTURE.md).
"""
import numpy as np
import pandas as pd
from matplotlib import pyplot as plt

from utils.files import replace_atomically
from utils.study.grid import DENSE, TWIN

def _families(summary):
    """{line label: its rows in ratio order} for the pruned variants."""
    families = {}
    for row in summary:
        if row["variant"] not in (DENSE, TWIN):
            families.setdefault(row["family"], []).append(row)
    return {label: sorted(members, key=lambda row: -row["gmacs_mean"]) for label, members in families.items()}


def _point_label(row):
    """A point's label in study.png: the percent removed, or the budget a per-part plan meets."""
    plan = row.get("plan")
    return f"plan {row['target_gmacs']:g} GMACs" if isinstance(plan, str) else f"{row['pruning_ratio']:g}%"


def _error(row, key):
    spread = row.get(f"{key}_spread", np.nan)
    return 0.0 if spread is None or np.isnan(spread) else spread


def _error_bar(rows, key):
    """matplotlib's yerr in percent: the spread each way, the lower bar cut at 0 (no score is negative)."""
    means = [100 * row[f"{key}_mean"] for row in rows]
    spreads = [100 * _error(row, key) for row in rows]
    return [[min(spread, mean) for spread, mean in zip(spreads, means)], spreads]


def _label_points(axis, points, reach_px=14, levels=6):
    """Write each point's label once and legibly: points within reach_px of each other on the drawn axes
    (collapsed variants that all land on one score) share one label listing their distinct texts, and a label
    that would overprint one already written is lifted a line at a time (up to `levels` lines)."""
    axis.autoscale_view()
    groups = []
    for x, y, text in sorted(points):
        where = axis.transData.transform((x, y))
        near = next((group for group in groups if np.hypot(*(where - group["at"])) <= reach_px), None)
        if near is None:
            groups.append({"at": where, "xy": (x, y), "texts": [text]})
        elif text not in near["texts"]:
            near["texts"].append(text)
    renderer, written = axis.figure.canvas.get_renderer(), []
    for group in groups:
        for level in range(levels):
            label = axis.annotate(", ".join(group["texts"]), group["xy"], textcoords="offset points",
                                  xytext=(4, 4 + 8 * level), fontsize=7)
            box = label.get_window_extent(renderer)
            if level == levels - 1 or not any(box.overlaps(other) for other in written):
                break
            label.remove()
        written.append(box)


def _plot_panel(axis, summary, x_key, y_key):
    """One panel: a line with error bars (spread over seeds) per family, the dense twin's mean ± spread as a grey
    band (a point inside it is within noise of dense), the untuned dense network a black star."""
    by_name = {row["variant"]: row for row in summary}
    twin = by_name[TWIN]
    centre, band = 100 * twin[f"{y_key}_mean"], 100 * _error(twin, y_key)
    axis.axhspan(centre - band, centre + band, color="grey", alpha=0.2, label="dense fine-tuned, mean ± spread")
    axis.axhline(centre, color="grey", linewidth=1)
    points = []
    for label, members in _families(summary).items():
        x = [row[f"{x_key}_mean"] for row in members]
        y = [100 * row[f"{y_key}_mean"] for row in members]
        style = ("s--" if label.endswith("INT8") else "d:" if label.endswith("ONNX float32") else
                 "^-" if "budgeted" in label else "o-")
        axis.errorbar(x, y, yerr=_error_bar(members, y_key), fmt=style, capsize=3, label=label)
        points += [(x_value, y_value, _point_label(row)) for row, x_value, y_value in zip(members, x, y)]
    for name, marker, text in ((DENSE, "k*", "dense, untuned"), (TWIN, "kD", "dense fine-tuned")):
        row = by_name[name]
        axis.errorbar(row[f"{x_key}_mean"], 100 * row[f"{y_key}_mean"], yerr=_error_bar([row], y_key), fmt=marker,
                      markersize=10 if name == DENSE else 7, capsize=3, label=text)
    _label_points(axis, points)


def plot_study(summary, path, title, size, device_type):
    """Test mIoU and crack tolerance F1 (mean, bars: spread over seeds) against GMACs and against latency."""
    with_latency = not np.isnan(summary[0].get("latency_ms_mean", np.nan))
    xs = [("gmacs", f"GMACs per image ({size}x{size} px)")]
    if with_latency:
        xs.append(("latency_ms", f"latency per image (ms, batch 1, {device_type}, deployed)"))
    ys = [("test_miou", "test mIoU (%)"), ("crack_tolerance_f1", "crack tolerance F1 (%)")]
    figure, axes = plt.subplots(len(ys), len(xs), figsize=(6.5 * len(xs), 4.5 * len(ys)), squeeze=False)
    for (y_key, y_label), axis_row in zip(ys, axes):
        for (x_key, x_label), axis in zip(xs, axis_row):
            _plot_panel(axis, summary, x_key, y_key)
            axis.set(xlabel=x_label, ylabel=y_label)
            axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, title_fontsize=8,
                  title="criterion, schedule (point labels: % of channels removed, or the GMACs a per-part plan meets)")
    seeds = summary[0]["seeds"]
    over = (f"mean over {seeds} seeds (bars: spread, cut at 0); inside the grey band = within noise of dense "
            f"fine-tuned" if seeds > 1 else "one seed, so no spread: give --seeds to see the noise")
    figure.suptitle(f"{title}: {over}; up and left is better")
    figure.tight_layout(rect=(0, 0.028 * (len(labels) // 4 + 2), 1, 1))
    replace_atomically(str(path), lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    plt.close(figure)


def plot_sensitivity(rows, path, name, variant):
    """Val mIoU drop against the share of channels removed, one line per part: where the network can be cut."""
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    frame = pd.DataFrame(rows)
    for part, members in frame.groupby("part", sort=False):
        axis.plot(members["pruning_ratio"], 100 * members["val_miou_drop"], "o-", label=part)
    axis.axhline(0, color="black", linewidth=0.8)
    norm = f" L{variant.p_value}" if variant.p_value else ""
    axis.set(xlabel="channels removed from that part alone (%)", ylabel="val mIoU drop (percentage points)",
             title=f"{name}: sensitivity of each part ({variant.importance}{norm}, no fine-tuning)\n"
                   f"low lines: the part can be pruned hard; high lines: leave it wider")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, title="part pruned", title_fontsize=8)
    figure.tight_layout()
    replace_atomically(str(path), lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    plt.close(figure)
