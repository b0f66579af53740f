"""Output files: atomic replacement (a crash or a full disk never leaves half a checkpoint or table behind)
and the one "refuse an existing output unless --overwrite" rule."""
import os
import tempfile
from pathlib import Path

from utils.cli import UserError


def _temporary_beside(path, suffix):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=folder)
    os.close(handle)
    return temporary


def _file_mode(path):
    """The replaced file's permissions, or the umask's for a new file (mkstemp alone would give 0600)."""
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def replace_atomically(path, write):
    """Call write(temporary_path), then move it over `path`; on failure the old file is untouched."""
    temporary = _temporary_beside(path, os.path.splitext(path)[1])
    try:
        write(temporary)
        os.chmod(temporary, _file_mode(path))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _taken(path):
    """An existing file, or a folder with something in it (an empty folder holds nothing to lose)."""
    path = Path(path)
    return path.is_dir() and any(path.iterdir()) or (path.exists() and not path.is_dir())


def refuse_existing(paths, overwrite, hint="choose another name"):
    """Nothing is silently overwritten: the first existing output is refused unless --overwrite."""
    if overwrite:
        return
    for path in paths:
        if _taken(path):
            raise UserError(f"{path} already exists; pass --overwrite to replace it, or {hint}")
