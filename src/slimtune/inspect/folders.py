"""Writing a new output folder all at once: filled under a temporary name beside it, then renamed."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from slimtune.atomic import atomic_folder


class OutputExistsError(ValueError):
    """The output folder (or file) already exists: slimtune never overwrites a result."""


def new_folder(out: Path, fill: Callable[[Path], None], what: str = "out") -> Path:
    """Create folder ``out`` by calling ``fill(tmp)`` on an empty temporary folder in the same parent, then
    renaming it: an interrupted or failed write leaves nothing. Raises OutputExistsError naming ``what``
    (the argument) when ``out`` exists."""
    out = Path(out)
    if out.exists():
        raise OutputExistsError(f"{what}={str(out)!r}: already exists; choose a new folder")
    return atomic_folder(out, fill)
