"""Atomic file replacement: a crash or a full disk never leaves half a checkpoint or table behind."""
import os
import tempfile


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
