"""Private working directories on tmpfs, named after the process that made them.

The conf store of ``--workers`` and the ``local://`` plugin state live in memory-backed
directories. A runner killed with SIGKILL cannot remove its own, so each directory's
name carries its maker's pid, and the next runner removes those whose maker is gone.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

log = logging.getLogger("a6.tmpdirs")


def tmpfs_base(fallback: Path) -> Path:
    """``/dev/shm`` when it can be used (memory, never a disk write), else ``fallback``."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else fallback


def make_private_dir(prefix: str, base: Path) -> Path:
    """A new 0700 directory ``<prefix><pid>-<random>`` in ``base``, after removing the
    ones of that prefix whose maker is gone."""
    remove_orphans(prefix, base)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base))


def remove_orphans(prefix: str, base: Path) -> None:
    """Remove our user's ``prefix`` directories in ``base`` whose maker is gone."""
    uid = os.getuid()
    for path in base.glob(f"{prefix}*-*"):
        try:
            pid = int(path.name[len(prefix) :].split("-", 1)[0])
            st = path.lstat()
        except (ValueError, OSError):
            continue
        if st.st_uid != uid or not stat.S_ISDIR(st.st_mode) or _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by a runner that is gone", path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
