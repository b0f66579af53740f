"""Figures of a prediction for inspection reports: the palette overlay, the side-by-side view, their legend.

Colours are the Labels_RGB palette of utils.data, so a figure reads like the dataset's own labels.
Pyplot's backend is the caller's choice (Agg unless inference.py --show asks for a window).
"""
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files by default; inference.py --show switches to a window backend explicitly
import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from utils.cli import UserError  # noqa: E402
from utils.data import S2DS_CLASSES, encode_rgb_label  # noqa: E402
from utils.files import replace_atomically  # noqa: E402

DPI = 128  # a power of two: width_px / DPI * DPI is exact, so Agg's int() gives exactly the size asked for
PANEL_PX = 768
LEGEND_PX = 112
TITLE_PX = 32
STRIP_FONT_PX = 13  # the overlay legend's smallest font; it grows with the photo (a 35th of its shorter side)
GUI_BACKENDS = ("MacOSX", "QtAgg", "GTK4Agg", "GTK3Agg", "TkAgg", "WXAgg")


def blend(image, ids, alpha=0.5, classes=S2DS_CLASSES):
    """The photo with each defect pixel tinted by its class colour (ClassTable `classes`); background pixels stay
    untouched."""
    colours = encode_rgb_label(ids, classes).astype(np.float32)
    tinted = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    defect = (ids != classes.background_id) & (ids < classes.num_classes)
    return np.where(defect[..., None], tinted, image).round().astype(np.uint8)


def class_shares(ids, classes=S2DS_CLASSES):
    """[(class id, name, share of pixels)] for the classes present, in class-table order."""
    counts = np.bincount(ids.ravel(), minlength=256)[:classes.num_classes]
    total = max(1, ids.size)
    return [(class_id, name, counts[class_id] / total) for class_id, name in enumerate(classes.names)
            if counts[class_id]]


def format_share(share):
    """A percentage that never shows a present class as 0.00%."""
    return "<0.01%" if 0 < share < 1e-4 else f"{100 * share:.2f}%"


def legend_handles(shares, classes=S2DS_CLASSES):
    """Colour patches labelled 'crack 0.42%' (outlined, so white crack and black background show)."""
    return [Patch(facecolor=classes.palette[class_id] / 255.0, edgecolor="0.4", label=f"{name} {format_share(share)}")
            for class_id, name, share in shares]


def overlay_figure(image, ids, alpha=0.5, title="", classes=S2DS_CLASSES):
    """The blended photo pixel for pixel at the PNG's top left and its legend (titled `title`) in a strip
    beside it, so the legend hides no part of the photo however small; the font grows with the photo."""
    height, width = ids.shape
    figure = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    axis = figure.add_axes((0, 0, 1, 1))
    axis.imshow(blend(image, ids, alpha, classes), interpolation="nearest")
    axis.set_axis_off()
    points = float(np.clip(min(height, width) / 35, STRIP_FONT_PX, 40)) * 72 / DPI
    legend = figure.legend(handles=legend_handles(class_shares(ids, classes), classes), loc="upper left", frameon=False,
                           fontsize=points, title=title or None, title_fontsize=points, handlelength=1.2)
    box = legend.get_window_extent(figure.canvas.get_renderer())
    margin = math.ceil(points * DPI / 72 / 2)
    total_width = width + math.ceil(box.width) + 3 * margin
    total_height = max(height, math.ceil(box.height) + 2 * margin)
    figure.set_size_inches(total_width / DPI, total_height / DPI)
    axis.set_position((0, 1 - height / total_height, width / total_width, height / total_height))
    legend.set_bbox_to_anchor(((width + margin) / total_width, 1 - margin / total_height))
    return figure


def side_by_side_size(height, width):
    """(width, height) in px of the side-by-side PNG: two PANEL_PX-wide panels, titles above, a legend strip below."""
    return 2 * PANEL_PX, max(1, round(PANEL_PX * height / width)) + LEGEND_PX + TITLE_PX


def side_by_side_figure(image, ids, title="", prediction_title="prediction", classes=S2DS_CLASSES):
    """Photo | colour mask, each titled above (nothing drawn over the pictures), with a shared legend of the
    classes present and their share of pixels, titled `title`."""
    width_px, height_px = side_by_side_size(*ids.shape)
    figure = plt.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    bottom, top = LEGEND_PX / height_px, TITLE_PX / height_px
    for index, (picture, label) in enumerate(((image, "photo"), (encode_rgb_label(ids, classes), prediction_title))):
        axis = figure.add_axes((index / 2 + 0.005, bottom, 0.49, 1 - bottom - top))
        axis.imshow(picture, interpolation="nearest")
        axis.set_axis_off()
        axis.set_title(label, fontsize=9, pad=4)
    shares = class_shares(ids, classes)
    figure.legend(handles=legend_handles(shares, classes), loc="lower center", ncol=min(4, max(1, len(shares))),
                  fontsize=9, frameon=False, bbox_to_anchor=(0.5, 0.0), title=title or None,
                  title_fontsize=9)
    return figure


def save_figure(figure, path):
    """Write a figure as PNG atomically at its own size (no tight bounding box); the caller closes it."""
    dpi = figure.get_dpi()
    replace_atomically(str(path), lambda temporary: figure.savefig(temporary, dpi=dpi, format="png"))


def has_display():
    """Whether a window can open: always on macOS/Windows, on Linux only with an X11 or Wayland display."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def use_window_backend():
    """Switch pyplot from Agg to the first GUI backend that loads; a clear error when none does."""
    for name in GUI_BACKENDS:
        try:
            plt.switch_backend(name)
            return name
        except (ImportError, RuntimeError, ValueError):
            continue
    raise UserError("--show found no GUI toolkit for matplotlib (install tkinter or PyQt); "
                    "use --save_figure to write the figures instead")
