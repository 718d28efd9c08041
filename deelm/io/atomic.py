"""Directories replaced in one step: readers see the old one or the new one, never half of either."""
import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
from pathlib import Path


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a, b):
    """Atomically swaps two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(tmp, target):
    if not os.path.lexists(target):
        os.replace(tmp, target)
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if _exchange(tmp, target):
        shutil.rmtree(tmp)          # tmp now holds the old contents
        return
    # Without an atomic exchange: move the old directory aside, put the new one
    # in place, and put the old one back if that fails.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target):
    """Yields a fresh temporary directory next to `target`; on success it replaces `target`.

    Files written there are fsynced, then the directory is swapped in with
    one atomic rename (an exchange when `target` exists, on Linux), so
    readers see the old directory or the new one, never a half-written one.
    On any exception the temporary directory is removed and `target` is
    untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        # mkdtemp (and some writers) create owner-only files; give the result
        # the modes a plain mkdir / open would, so others can read an adapter
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
            _fsync_path(f)
        _fsync_path(tmp)
        _swap_in(tmp, target)
        _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
