"""Command-line conventions shared by every script (docs/ARCHITECTURE.md, "Command line").

Expected failures raise UserError; `run_main` turns them into one line on stderr and exit
status 2, while unexpected errors keep their traceback.
"""
import argparse
import os
import platform
import re
import sys
from pathlib import Path

import torch


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error style: one line on stderr (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class UserError(Exception):
    """A problem the user can fix (bad path, bad dataset, bad value): one line, exit 2."""


_TRUE = {"true", "yes", "1", "y", "t", "on"}
_FALSE = {"false", "no", "0", "n", "f", "off"}


def str2bool(value):
    """Parse True/False/yes/no/1/0 in any case, for argparse."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False/yes/no/1/0), got {value!r}")


def add_bool(parser, name, default=False, help=""):
    """A boolean option: `--flag` alone means True, `--flag False` spells it out."""
    parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default,
                        metavar="BOOL", help=f"{help} (default: {default})")


def script_main(get_parser, run, check=None):
    """A script's main(argv): parse, check what argparse cannot (check(args)), run(args)."""
    def main(argv=None):
        args = get_parser().parse_args(argv)
        if check is not None:
            check(args)
        return run(args)

    return main


def run_main(main, argv=None):
    """Call main(argv); a UserError becomes one stderr line and exit status 2."""
    try:
        main(argv)
    except UserError as error:
        _close_progress_bars()
        prog = os.path.basename(sys.argv[0]) or "cracksense"
        message = _last_line(str(error))
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _close_progress_bars():
    """Clear bars an error interrupted, so the error line starts on a clean line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _last_line(text):
    """One line: a DataLoader worker re-raises our error with its traceback above the message."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()] or ["unknown error"]
    return re.sub(r"^[\w.]*Error: ", "", lines[-1])


def resolve_device(name):
    """Map --device auto|cpu|cuda|cuda:N to a torch.device, refusing CUDA where there is none.

    On the CPU, denormal floats (below ~1e-38) are flushed to zero: trained networks carry such
    tiny values and x86 CPUs compute with them 10-40x slower (measured: DeepLabV3-ResNet101 at
    128 px, 5.6 s -> 0.22 s per image). GPUs compute with them at full speed.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    return device


def percent_or_fraction_hint(value):
    """Shared text for options whose unit is percent."""
    return f"{value} looks like a fraction; the unit is percent (e.g. 50 for half)"


def require_path(path, what, kind="any"):
    """Refuse a missing file or folder with a line naming it."""
    if not os.path.exists(path):
        raise UserError(f"{what} not found: {path}")
    if kind == "file" and not os.path.isfile(path):
        raise UserError(f"{what} is not a file: {path}")
    if kind == "dir" and not os.path.isdir(path):
        raise UserError(f"{what} is not a folder: {path}")
    return path


def plain_name(value, option):
    """A name that becomes a file or folder name: no separators, not '.'/'..', not empty, not absolute."""
    text = str(value)
    if (not text.strip() or text in (".", "..") or any(sep in text for sep in ("/", "\\", "\0"))
            or os.path.isabs(text)):
        raise UserError(f"{option} {value!r} must be a plain name (no folders, not '.' or '..', not empty)")
    return text


# File stems that say nothing about the model; default_name then takes the folder name too.
GENERIC_STEMS = {"best", "last", "model", "checkpoint", "weights", "final"}


def default_name(path):
    """A short name for outputs from a weights file: 'r101_l2_50' from r101_l2_50.pth, 'demo_best' from
    runs/demo/best.pth."""
    path = Path(path)
    if path.stem.lower() in GENERIC_STEMS and path.resolve().parent.name:
        return f"{path.resolve().parent.name}_{path.stem}"
    return path.stem


def device_name(device):
    """The GPU's name, or the CPU and its thread count, for reports and benchmark titles."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
