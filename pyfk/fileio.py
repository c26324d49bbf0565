"""Small file-system helpers shared by the layers that write files (stores, the AL runner)."""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Flush a directory entry (a rename into it) to disk; a no-op where directories cannot be synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
