"""Local data files -> validated rows -> encoded examples, through ``datasets`` (offline, local files only).

Supported files: ``.json`` (a list of objects, or JSON Lines), ``.jsonl``, ``.csv`` (header row; empty cells
read as ``""``, never as null), ``.parquet`` and ``.txt`` (text format only: **one document per file**, chunked
into ``max_length`` pieces; blank lines inside a document are kept as text).

Row numbers in errors are 1-based: the line number for ``.jsonl`` (blank lines counted), the record number for
``.json``, ``.csv`` (the header is not a row) and ``.parquet``.

``datasets`` writes its Arrow cache into a temporary folder removed after loading (``keep_in_memory=True``), so
nothing lands in ``~/.cache`` and read-only data folders work.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from slimtune.train.data.formats import IGNORE, Example, class_index, encode
from slimtune.train.data.rows import FORMATS, BadRow, Fields, check_row

SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class DataFileError(ValueError):
    """A data file that cannot be used at all (missing, unsupported type, unreadable, no usable rows)."""

    def __init__(self, file: str, why: str) -> None:
        self.file, self.why = str(file), why
        super().__init__(f"{self.file}: {why}")

    def __reduce__(self):
        return (DataFileError, (self.file, self.why))


@dataclass(frozen=True)
class DataStats:
    """What loading produced: valid ``rows`` read, bad rows ``skipped``, examples ``truncated`` at max_length,
    ``tokens`` in all examples, ``trained_tokens`` with a label (classification: one per example)."""

    rows: int
    skipped: int
    truncated: int
    tokens: int
    trained_tokens: int


def supported() -> str:
    return ", ".join(SUFFIXES)


def jsonl_line_numbers(path: Path) -> list[int]:
    """1-based numbers of the non-blank lines of a JSON Lines file (``datasets`` skips blank lines)."""
    with path.open("rb") as f:
        return [i for i, line in enumerate(f, 1) if line.strip()]


def read_json_plain(path: Path) -> list:
    """Parse a JSON/JSONL file with the standard library: used when ``datasets`` cannot build one Arrow table
    (e.g. a field that is a string in one row and a number in another), so the bad row can still be named."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        pass
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFileError(str(path), f"line {number} is not valid JSON ({e.msg})") from None
    return rows


def load_table(path: str) -> tuple[list, list[int]]:
    """All rows of a local data file as Python objects, and each row's 1-based number in the file.

    Raises DataFileError for a missing file, an unsupported extension or content ``datasets`` cannot read.
    """
    import datasets

    p = Path(path)
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise DataFileError(path, f"unsupported file type {p.suffix or '(no extension)'!r}; supported: {supported()}")
    if not p.is_file():
        raise DataFileError(path, f"no such file; expected a data file ({supported()})")
    options = {"csv": {"na_filter": False}, "text": {"sample_by": "document"}}.get(kind, {})
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="slimtune-data-") as cache:
            table = datasets.load_dataset(kind, data_files=str(p.resolve()), split="train", cache_dir=cache,
                                          keep_in_memory=True, **options)
            rows = table.to_list()
    except Exception as e:  # datasets/pyarrow/pandas raise many types; all mean "this file cannot be read"
        if kind != "json":
            raise DataFileError(path, f"cannot be read as {p.suffix} ({type(e).__name__}: {e})") from e
        try:
            rows = read_json_plain(p)
        except UnicodeDecodeError as u:
            raise DataFileError(path, f"is not UTF-8 text ({u})") from e
    finally:
        if not quiet:
            datasets.utils.enable_progress_bars()
    numbers = list(range(1, len(rows) + 1))
    if p.suffix.lower() == ".jsonl":
        lines = jsonl_line_numbers(p)
        numbers = lines if len(lines) == len(rows) else numbers
    return rows, numbers


def read_rows(path: str, fmt: str, *, text_field: str = "text", label_field: str = "label",
              messages_field: str = "messages", skip_bad_rows: bool = False) -> tuple[list[dict], int]:
    """Read and validate every row of a local file for format ``fmt`` -> (normalized rows, skipped count).

    Rows are normalized to canonical keys (see ``rows.py``) plus ``row_number`` (1-based, in the file).
    Raises BadRow for the first bad row unless ``skip_bad_rows`` (then bad rows are counted and left out),
    DataFileError when the file cannot be read, is ``.txt`` for a format other than text, or has no usable
    row; ValueError on an unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: must be one of {', '.join(FORMATS)}")
    if Path(path).suffix.lower() == ".txt" and fmt != "text":
        raise DataFileError(path, f"a .txt file holds plain text (format text); format {fmt!r} needs "
                                  ".json, .jsonl, .csv or .parquet rows")
    table, numbers = load_table(path)
    fields = Fields(text=text_field, label=label_field, messages=messages_field)
    rows, skipped = [], 0
    for raw, number in zip(table, numbers):
        try:
            rows.append({**check_row(raw, fmt, path, number, fields), "row_number": number})
        except BadRow:
            if not skip_bad_rows:
                raise
            skipped += 1
    if not rows:
        what = f"all {skipped} rows are bad" if skipped else "holds no rows"
        raise DataFileError(path, f"{what}; nothing to train on")
    return rows, skipped


def label_names_for(rows: Sequence[dict]) -> tuple[str, ...]:
    """Class names for classification rows, index = class id: integer labels (or all-digit strings, as CSV
    gives them) name classes ``"0".."max"``; other strings are sorted. Mixed kinds raise ValueError."""
    labels = [r["label"] for r in rows]
    if all(isinstance(x, int) or (isinstance(x, str) and x.strip().isdigit()) for x in labels):
        return tuple(str(i) for i in range(max(int(x) for x in labels) + 1))
    if any(isinstance(x, int) for x in labels):
        raise ValueError("labels mix integers and names; use one kind")
    return tuple(sorted(set(labels)))


def examples_from_rows(rows: Sequence[dict], fmt: str, tokenizer, max_length: int, *, file: str = "<rows>",
                       label_names: Sequence[str] | None = None,
                       ) -> tuple[list[Example], DataStats, tuple[str, ...] | None]:
    """Encode normalized rows (``read_rows`` output, or bundled rows) -> (examples, stats, label names).

    For classification, ``label_names`` (e.g. the training set's, for an eval set) fixes the class order;
    None derives it from the rows. A label outside the names raises BadRow (the row's ``row_number`` key, which
    ``read_rows`` sets, names it).
    """
    if not rows:
        raise DataFileError(file, "holds no rows; nothing to train on")
    names = None
    if fmt == "classification":
        try:
            names = tuple(label_names) if label_names is not None else label_names_for(rows)
        except ValueError as e:
            raise DataFileError(file, str(e)) from None
        names = tuple(str(n) for n in names)
    digits = names is not None and all(n.isdigit() for n in names)
    examples, truncated = [], 0
    for i, row in enumerate(rows):
        if fmt == "classification":
            if digits and str(row["label"]).strip().isdigit():
                row = {**row, "label": str(int(row["label"]))}  # 7, "7" and "07" all name class "7"
            try:
                class_index(row["label"], names)
            except ValueError as e:
                raise BadRow(file, row.get("row_number", i + 1), "label", str(e)) from None
        out, cut = encode(row, fmt, tokenizer, max_length, names)
        examples.extend(out)
        truncated += cut
    stats = DataStats(
        rows=len(rows), skipped=0, truncated=truncated, tokens=sum(len(e.input_ids) for e in examples),
        trained_tokens=len(examples) if fmt == "classification"
        else sum(lab != IGNORE for e in examples for lab in e.labels),
    )
    return examples, stats, names


def build_examples(path: str, fmt: str, tokenizer, max_length: int, *, text_field: str = "text",
                   label_field: str = "label", messages_field: str = "messages", skip_bad_rows: bool = False,
                   label_names: Sequence[str] | None = None,
                   ) -> tuple[list[Example], DataStats, tuple[str, ...] | None]:
    """Read, validate and encode a local data file -> (examples, stats, label names or None).

    Raises what ``read_rows`` and ``examples_from_rows`` raise.
    """
    rows, skipped = read_rows(path, fmt, text_field=text_field, label_field=label_field,
                              messages_field=messages_field, skip_bad_rows=skip_bad_rows)
    examples, stats, names = examples_from_rows(rows, fmt, tokenizer, max_length, file=path, label_names=label_names)
    return examples, DataStats(stats.rows, skipped, stats.truncated, stats.tokens, stats.trained_tokens), names
