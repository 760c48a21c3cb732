"""Atomic writes: a file or folder appears whole under its name, or not at all.

Everything slimtune writes for a user (adapters, exports, optimizer state, reports) goes through a temporary in
the same folder and ``os.replace``. ``tempfile`` creates those temporaries private (0600 files, 0700 folders);
the result gets the permissions a plain ``open``/``mkdir`` would give (0666/0777 less the umask), so an adapter
saved by one account can be served or loaded by another, as with ``save_pretrained``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux; else set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_file(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name next to ``path``, then rename it to ``path``; on any failure
    the temporary is removed and ``path`` is left as it was. Returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_folder(out: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Create folder ``out`` by calling ``fill(tmp)`` on an empty temporary folder in the same parent, then
    renaming it; a failed or interrupted fill leaves nothing. The caller checks that ``out`` does not exist
    (each names the flag in its own error). Returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
