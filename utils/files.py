"""Output files: atomic replacement (a crash or a full disk never leaves half a checkpoint or table behind)
and the one "refuse an existing output unless --overwrite" rule."""
import os
import tempfile
import time
from pathlib import Path

from utils.cli import UserError, forget_frames, quiet_close_failures, storage_errno


TEMPORARY_PREFIX = ".tmp_"
STALE_SECONDS = 24 * 3600


def _owner_gone(name):
    """True when the temporary file's name carries the id of a process that no longer runs here."""
    pid = name[len(TEMPORARY_PREFIX):].split("_", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def remove_stale_temporaries(folder):
    """Remove our own temporary files that a killed run left in `folder`: those whose writer is gone, or a day
    old. Other files, and temporaries a live run is still writing, stay."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(TEMPORARY_PREFIX) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if _owner_gone(entry.name) or time.time() - entry.stat().st_mtime > STALE_SECONDS:
                os.remove(entry.path)
        except OSError:
            pass


def _temporary_beside(path, suffix):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    handle, temporary = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{os.getpid()}_", suffix=suffix, dir=folder)
    os.close(handle)
    return temporary


def refuse_read_only(path):
    """A file the user made read-only is theirs to keep: refused, not replaced (root ignores permissions,
    so the write bits are read, not only os.access)."""
    if os.path.isfile(path) and (not os.stat(path).st_mode & 0o222 or not os.access(path, os.W_OK)):
        raise UserError(f"{path} is read-only, so it was left unchanged; make it writable, move it away or "
                        f"choose another name")


def _file_mode(path):
    """The replaced file's permissions, or the umask's for a new file (mkstemp alone would give 0600)."""
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def replace_atomically(path, write):
    """Call write(temporary_path), then move it over `path`; on failure the old file is untouched and the temporary
    removed. A full disk, used-up quota or I/O error is raised as an OSError naming `path`, however the library
    reported it (torch.save: a RuntimeError; openpyxl, PIL, ONNX: an OSError without the file's name)."""
    refuse_read_only(path)
    temporary = _temporary_beside(path, os.path.splitext(path)[1])
    try:
        with quiet_close_failures():
            fault = _write(write, temporary, path)
        if fault is not None:
            raise fault
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _write(write, temporary, path):
    """Write and move into place: None when done, or the OSError naming `path` to raise for a failure of the
    storage (or an OSError about the temporary file); anything else propagates with its traceback."""
    try:
        write(temporary)
        os.chmod(temporary, _file_mode(path))
        os.replace(temporary, path)
        return None
    except Exception as error:
        code = storage_errno(error) or _disk_fault(os.path.dirname(os.path.abspath(path)))
        about_temporary = isinstance(error, OSError) and error.filename in (None, temporary)
        if code is None and not (about_temporary and error.errno):
            raise
        code = code or error.errno
        forget_frames(error)
        return OSError(code, os.strerror(code), path)


PROBE_BYTES = 64 * 1024


def _disk_fault(folder):
    """ENOSPC, EDQUOT or EIO when writing into `folder` fails now (a library that reports a failed write without
    its errno, such as torch.save, is diagnosed with this small probe write), else None."""
    try:
        handle, probe = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{os.getpid()}_probe_", dir=folder)
        os.close(handle)
    except OSError as error:
        return storage_errno(error)
    try:
        with open(probe, "wb") as stream:
            stream.write(b"\0" * PROBE_BYTES)
            stream.flush()
            os.fsync(stream.fileno())
    except OSError as error:
        return storage_errno(error)
    finally:
        os.remove(probe)
    return None


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
            raise UserError(f"{path} already exists{_empty_note(path)}; pass --overwrite to replace it, or {hint}")


def _empty_note(path):
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return " but is empty (a name reserved by a run that is still going, or that was killed: then delete it)"
    return ""


def reserve(path, hint="choose another name"):
    """Claim a new output's name by creating it exclusively (O_EXCL), so of two runs that check the same name at
    once, one gets it and the other is refused; `release` gives back a name the run never filled."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileExistsError:
        raise UserError(f"{path} already exists{_empty_note(path)}; {hint}") from None
    return path


def release(path):
    """Remove a reservation that is still empty (its run failed), so the same command can run again."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        os.remove(path)


_held_locks = {}


def hold_folder_lock(folder, busy_message):
    """Claim `folder` for this process until release_folder_locks or its end (an exclusive flock on the folder itself, POSIX), so a second
    run into the same folder is refused with `busy_message` while the first runs. No lock file is written; the
    kernel drops the lock when its process dies, so a killed run's folder is free at once. A path that is a file
    is left to the caller's own check."""
    try:
        import fcntl
    except ImportError:  # Windows: unguarded
        return
    key = os.path.realpath(folder)
    if key in _held_locks or (os.path.exists(folder) and not os.path.isdir(folder)):
        return
    os.makedirs(folder, exist_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise UserError(busy_message) from None
    _held_locks[key] = handle


def release_folder_locks():
    """Give back every folder this process claimed (a run that ended, so the next one in this process, or another
    process, may use the folder)."""
    while _held_locks:
        import fcntl  # only POSIX ever holds one

        handle = _held_locks.popitem()[1]
        fcntl.flock(handle, fcntl.LOCK_UN)  # also for DataLoader workers forked meanwhile, which share the lock
        os.close(handle)
