"""Files people read: CSV tables, curves and confusion-matrix plots, Excel workbooks.

Model-free. Every write goes to a temporary file first and is then moved into place, so an
interrupted run never leaves half a table behind.
"""
import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _temporary_beside(path, suffix):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=folder)
    os.close(handle)
    return temporary


def replace_atomically(path, write):
    """Call write(temporary_path), then move it over `path`; on failure the old file is untouched."""
    temporary = _temporary_beside(path, os.path.splitext(path)[1])
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_csv(rows, path):
    """A list of dicts as a CSV table (columns in first-seen order)."""
    replace_atomically(path, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))


def plot_curves(rows, path, class_names=()):
    """Loss and IoU over epochs from metrics.csv rows: the first thing to look at after training."""
    frame = pd.DataFrame(rows)
    figure, (loss_axis, iou_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    loss_axis.plot(frame["epoch"], frame["train_loss"], "o-", label="train loss")
    if frame["val_loss"].notna().any():
        loss_axis.plot(frame["epoch"], frame["val_loss"], "o-", label="val loss")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_axis.legend()
    iou_axis.plot(frame["epoch"], 100 * frame["val_miou"], "o-", color="black", linewidth=2.5, label="mIoU")
    for name in class_names:
        column = f"val_iou_{name}"
        if column in frame and frame[column].notna().any():
            iou_axis.plot(frame["epoch"], 100 * frame[column], ".--", linewidth=1, label=name)
    iou_axis.set(xlabel="epoch", ylabel="IoU (%)", title="Validation IoU", ylim=(0, 100))
    iou_axis.legend(fontsize=8, ncol=2)
    for axis in (loss_axis, iou_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    replace_atomically(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)
