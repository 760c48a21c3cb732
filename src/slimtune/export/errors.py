"""Export's named errors and the output-path rule (refuse an existing output unless asked to overwrite)."""

from __future__ import annotations

from pathlib import Path


class ExportError(ValueError):
    """Bad export input: a source or base that does not fit, an unsupported architecture or dtype, an existing
    output. The message names the flag or file, the value and what is allowed."""


def check_output(out: Path, overwrite: bool, file: bool) -> None:
    """Raise ExportError when ``out`` exists and ``overwrite`` is off, or when a file export (``file``) would
    replace a folder."""
    if out.exists() and not overwrite:
        raise ExportError(f"-o {str(out)!r}: already exists; choose another path or pass --overwrite")
    if file and out.is_dir():
        raise ExportError(f"-o {str(out)!r}: is a folder; a GGUF export writes one file (e.g. {out.name}.gguf)")
