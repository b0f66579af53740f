"""Command-line conventions shared by every script (docs/ARCHITECTURE.md, "Command line").

Expected failures raise UserError; `run_main` turns them into one line on stderr and exit
status 2, while unexpected errors keep their traceback.
"""
import argparse
import dataclasses
import errno
import typing
import gc
import json
import math
import os
import platform
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image


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


def bool_or_auto(value):
    """'auto' or a boolean (str2bool), for options whose default depends on the machine."""
    return "auto" if str(value).strip().lower() == "auto" else str2bool(value)


def add_bool(parser, name, default=False, help=""):
    """A boolean option: `--flag` alone means True, `--flag False` spells it out."""
    parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default,
                        metavar="BOOL", help=f"{help} (default: {default})")


def add_quiet(parser):
    """--quiet: no progress bars. Without a terminal on stderr (a log file, a pipe) there are none either."""
    add_bool(parser, "--quiet", False, "no progress bars (also off when stderr is not a terminal, e.g. a log file)")


_quiet = {"on": False}


def set_quiet(quiet):
    """Called once per script run (script_main does it from --quiet)."""
    _quiet["on"] = bool(quiet)


def progress_enabled(wanted=True):
    """The one rule for every progress bar: the caller wants one, --quiet was not given, and stderr is a
    terminal, so `make demo > log 2>&1` gets no carriage returns or cursor codes."""
    return bool(wanted) and not _quiet["on"] and sys.stderr.isatty()


CONFIG_METADATA = ("world_size", "torch", "config")  # what a run's args.json records besides its options
NOT_FROM_CONFIG = ("resume", "overwrite", "quiet")  # what to do with existing outputs is said on the command line


def add_config(parser):
    """--config FILE.json: option values (a run's args.json is one) used as defaults; flags given win."""
    parser.add_argument("--config", metavar="FILE.json",
                        help="option values as JSON (e.g. a run's args.json) used as defaults; options given on the "
                             "command line win; positional arguments, --resume and --overwrite are not taken")


def _read_config(path):
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except FileNotFoundError:
        raise UserError(f"--config {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"--config {path} is not a readable JSON file ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must hold a JSON object of option values, not {type(values).__name__}")
    return values


def _config_value(action, value, path):
    """A value from the file checked as argparse checks a flag: its type (for text) and its choices."""
    if isinstance(value, str) and action.type is not None:
        try:
            value = action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise UserError(f"--config {path}: {action.dest} {value!r} is not a valid value") from None
    if action.choices is not None and value is not None and value not in action.choices:
        raise UserError(f"--config {path}: {action.dest} {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def apply_config(parser, path):
    """Make the option values in the JSON file `path` the parser's defaults (checked: an option the script does
    not have, a bad type or choice is one line). Positional arguments are always given on the command line."""
    values = _read_config(path)
    options = {action.dest: action for action in parser._actions if action.option_strings}
    positional = {action.dest for action in parser._actions if not action.option_strings}
    unknown = sorted(key for key in values if key not in options and key not in positional | set(CONFIG_METADATA))
    if unknown:
        raise UserError(f"--config {path}: {', '.join(unknown)} "
                        f"{'is not an option' if len(unknown) == 1 else 'are not options'} of this script")
    taken = {key: _config_value(options[key], value, path) for key, value in values.items()
             if key in options and key not in NOT_FROM_CONFIG + CONFIG_METADATA}
    for key in taken:
        options[key].required = False  # the file gives it
    parser.set_defaults(**taken)


def _config_path(parser, argv):
    """--config's value in argv where the script has --config (the command line still wins over the file)."""
    if not any("--config" in action.option_strings for action in parser._actions):
        return None
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config")
    return finder.parse_known_args(sys.argv[1:] if argv is None else argv)[0].config


def options_from(spec, values, **changes):
    """A frozen dataclass `spec` built from a parsed command line (`vars(args)`, a dict of option values), with
    `changes` on top: each field takes the option of its name (lists become tuples), a field whose type is itself
    a dataclass is built the same way from the same values, and a field without an option keeps its default. The
    one bridge from argparse to the typed options below the scripts; their __post_init__ checks the values."""
    values = {**values, **changes}
    hints = typing.get_type_hints(spec)
    chosen = {}
    for field in dataclasses.fields(spec):
        if dataclasses.is_dataclass(hints[field.name]):
            chosen[field.name] = values.get(field.name) or options_from(hints[field.name], values)
        elif field.name in values:
            value = values[field.name]
            chosen[field.name] = tuple(value) if isinstance(value, list) else value
    return spec(**chosen)


def script_main(get_parser, run, check=None):
    """A script's main(argv): parse (over --config's values where the script has it), apply --quiet, check what
    argparse cannot (check(args)), run(args)."""
    def main(argv=None):
        parser = get_parser()
        config = _config_path(parser, argv)
        if config and os.path.exists(config):  # before parsing: the file may give required options
            apply_config(parser, config)
        args = parser.parse_args(argv)
        if config and not os.path.exists(config):
            apply_config(parser, config)  # a one-line error
        set_quiet(getattr(args, "quiet", False))
        if check is not None:
            check(args)
        return run(args)

    return main


def run_main(main, argv=None):
    """Call main(argv); a UserError, or a failure the user's machine caused (disk full, permissions, a path in
    the way, an image too large, memory), becomes one stderr line and exit status 2."""
    try:
        main(argv)
    except Exception as error:  # environment_message tells the machine's failures from programming errors
        message = environment_message(error)
        if message is None:
            raise
        with quiet_close_failures():
            forget_frames(error)
        _close_progress_bars()
        prog = os.path.basename(sys.argv[0]) or "cracksense"
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free some space and run the same command again",
    errno.EDQUOT: "the disk quota is used up; free some space and run the same command again",
    errno.EROFS: "the file system is read-only; choose another --output_dir",
    errno.EACCES: "permission denied; check the permissions or choose another --output_dir",
    errno.EPERM: "permission denied; check the permissions or choose another --output_dir",
    errno.EEXIST: "something of that name is in the way; move it or choose another name",
    errno.ENOTDIR: "a file stands where a folder is needed; move it or choose another path",
    errno.EISDIR: "a folder stands where a file is needed; move it or choose another path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter one",
    errno.EIO: "input/output error (a failing disk or a lost network mount); check the disk and run the same "
               "command again",
    errno.EAGAIN: "the system refused more processes or threads; lower --workers",
}
# Failures of the storage itself: however a library reports them, they are the machine's, never a bug.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)
# torch.save reports a failed write as a RuntimeError of its zip writer, without the errno.
_TORCH_WRITE_FAILED = re.compile(r"PytorchStreamWriter failed|unexpected pos \d+ vs \d+|file write failed",
                                 re.IGNORECASE)
# Messages of a RuntimeError that is a failed memory allocation (the CPU allocator raises plain RuntimeError).
_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|not enough memory|DefaultCPUAllocator",
                            re.IGNORECASE)


def environment_message(error):
    """One line for an error the user or their machine caused, or None for a programming error."""
    if isinstance(error, UserError):
        return _last_line(str(error))
    if isinstance(error, Image.DecompressionBombError):
        return (f"image too large to open safely ({_last_line(str(error))}); scale it down first, or raise "
                f"PIL.Image.MAX_IMAGE_PIXELS if you trust it")
    if isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and _OUT_OF_MEMORY.search(str(error))):
        return ("out of memory (" + (_last_line(str(error))[:120] or "MemoryError") + "); lower the image, "
                "evaluation or batch size")
    error = _storage_error(error) or error  # e.g. a DataLoader's or a library's error raised from a full disk
    if isinstance(error, RuntimeError) and _TORCH_WRITE_FAILED.search(str(error)):
        return (f"writing a checkpoint failed ({_last_line(str(error))[:80]}); check free space and permissions "
                f"and run the same command again")
    if isinstance(error, OSError):
        where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
        cause = _OS_HINTS.get(error.errno, error.strerror or _last_line(str(error)))
        return f"{where}: {cause}" if where else cause
    return None


def _storage_error(error):
    """The OSError with ENOSPC, EDQUOT or EIO that `error` is, or came from (its cause or context), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def storage_errno(error):
    """ENOSPC, EDQUOT or EIO when `error` or an error it came from is one, else None."""
    found = _storage_error(error)
    return None if found is None else found.errno


def forget_frames(error):
    """Drop the tracebacks of `error` and the errors it came from, and collect: a writer that failed may hold a
    file open in its frames (openpyxl's ZipFile), which is closed now, inside quiet_close_failures."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__traceback__ = None
        error = error.__cause__ or error.__context__
    gc.collect()


@contextmanager
def quiet_close_failures():
    """Closing a file a failed writer left open fails again on the full disk; that says nothing new, so it is not
    printed ("Exception ignored in: ZipFile.__del__"): OSErrors of finalisers are dropped meanwhile."""
    default = sys.unraisablehook

    def hook(unraisable):
        if not isinstance(unraisable.exc_value, OSError):
            default(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = default


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
    name = str(name).strip().lower()
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                        f"numbered from 0")
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    return device


def usable_cpus():
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's share), shared among the
    processes torchrun starts on this machine."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def cap_workers(requested, option="--workers"):
    """The one rule for data-loading processes: more than the usable CPUs only adds memory and start-up time (and
    at some hundreds the system refuses to start them), so the count is capped there with a one-line note."""
    limit = usable_cpus()
    if requested <= limit:
        return requested
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {option} {requested} is more than the {limit} CPU(s) this process may use; using {limit}")
    return limit


def check_batch_memory(images, side, options):
    """Refuse, before any work, a batch of `images` inputs of side x side px whose float32 tensor alone is larger
    than this machine's memory (a lower bound: the network needs several times more)."""
    if not images or not side:
        return
    needed = images * 3 * side * side * 4
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return
    if needed > memory:
        raise UserError(f"{options} ({images} x {side}x{side} px) needs {needed / 2**30:,.0f} GiB for the input "
                        f"batch alone, more than this machine's {memory / 2**30:,.0f} GiB of memory; lower them")


def check_number(option, value, minimum=None, above=None, maximum=None):
    """The one check of a numeric option: finite (no NaN, no inf), at least `minimum`, more than `above`, at most
    `maximum`; one line naming the option and the value otherwise. None (not given) passes."""
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"--{option} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"--{option} must be at least {minimum:g}, got {value:g}")
    if above is not None and value <= above:
        raise UserError(f"--{option} must be more than {above:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise UserError(f"--{option} must be at most {maximum:g}, got {value:g}")
    return value


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
