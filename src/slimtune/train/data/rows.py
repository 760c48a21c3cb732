"""Row validation for the four data formats: every bad row becomes a ``BadRow`` naming file, row and field.

Rows come from ``datasets`` (JSON, JSONL, CSV, parquet, text) as plain dicts. ``check_row`` validates one row
strictly and returns it *normalized to canonical keys*, so the encoders never see user field names:

- ``alpaca``: ``{"instruction": str, "input": str, "output": str}`` (``input`` optional: ``""`` when absent)
- ``chat``: ``{"messages": [{"role": str, "content": str}, ...]}`` (a CSV cell may hold the list as JSON text)
- ``text``: ``{"text": str}``
- ``classification``: ``{"text": str, "label": str | int}``

A missing key and a null value read the same (``datasets`` fills absent keys with ``None``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FORMATS = ("alpaca", "chat", "text", "classification")
ROLES = ("system", "user", "assistant", "tool")


class BadRow(ValueError):
    """A data row that cannot be used: ``file``, ``row`` (1-based, as in the file), ``field``, ``why``.

    ``str()`` reads like ``data.jsonl row 7: field 'output' is missing (alpaca rows need instruction, output;
    input optional)``.
    """

    def __init__(self, file: str, row: int, field: str, why: str) -> None:
        self.file, self.row, self.field, self.why = str(file), int(row), field, why
        super().__init__(f"{self.file} row {self.row}: field {field!r} {why}")

    def __reduce__(self):  # keep it picklable across processes despite the 4-argument __init__
        return (BadRow, (self.file, self.row, self.field, self.why))


@dataclass(frozen=True)
class Fields:
    """The user's column names for the formats that let them be renamed (``data.*_field``)."""

    text: str = "text"
    label: str = "label"
    messages: str = "messages"


def describe(value: Any) -> str:
    """A short ``type value`` description for error messages (long values cut)."""
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def need_text(row: Mapping, field: str, bad, need: str, *, allow_empty: bool = False) -> str:
    """``row[field]`` as a string; calls ``bad(field, why)`` (which raises) when missing, not a string or empty."""
    value = row.get(field)
    if value is None:
        bad(field, f"is missing ({need})")
    if not isinstance(value, str):
        bad(field, f"must be a string, got {describe(value)}")
    if not allow_empty and not value.strip():
        bad(field, "is empty")
    return value


def check_alpaca(row: Mapping, bad) -> dict:
    need = "alpaca rows need instruction, output; input optional"
    instruction = need_text(row, "instruction", bad, need)
    output = need_text(row, "output", bad, need)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        bad("input", f"must be a string, got {describe(extra)}")
    return {"instruction": instruction, "input": extra or "", "output": output}


def check_messages(value: Any, field: str, bad) -> list[dict]:
    """Validate an OpenAI-style message list; returns ``[{"role", "content"}, ...]``."""
    if value is None:
        bad(field, "is missing (chat rows need a list of {role, content} messages)")
    if isinstance(value, str):  # CSV cells carry the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            bad(field, f"is a string that is not a JSON list of messages ({e.msg})")
    if not isinstance(value, list):
        bad(field, f"must be a list of {{role, content}} messages, got {describe(value)}")
    if not value:
        bad(field, "is an empty list (chat rows need at least one assistant message)")
    out = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, Mapping):
            bad(where, f"must be a {{role, content}} object, got {describe(msg)}")
        role = msg.get("role")
        if role is None:
            bad(f"{where}.role", "is missing")
        if role not in ROLES:
            bad(f"{where}.role", f"is {role!r}; allowed: {', '.join(ROLES)}")
        content = need_text(msg, "content", lambda _f, why: bad(f"{where}.content", why), "every message needs one")
        out.append({"role": role, "content": content})
    if out[0]["role"] == "assistant":  # nothing before it to answer; templates would put their default system
        bad(f"{field}[0].role", "is 'assistant'; a conversation starts with a system or user message")
    if not any(m["role"] == "assistant" for m in out):
        bad(field, "has no assistant message (nothing to train on)")
    return out


def check_label(value: Any, field: str, bad) -> str | int:
    if value is None:
        bad(field, "is missing (classification rows need text and a label)")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        bad(field, f"must be a string or a non-negative integer, got {describe(value)}")
    if isinstance(value, int) and value < 0:
        bad(field, f"must be a non-negative integer, got {value}")
    if isinstance(value, str) and not value.strip():
        bad(field, "is empty")
    return value


def check_row(row: Mapping, fmt: str, file: str, number: int, fields: Fields = Fields()) -> dict:
    """Validate one row of format ``fmt``; returns it normalized (canonical keys, see the module docstring).

    ``number`` is the row's 1-based number in ``file``. Raises BadRow on the first problem found, ValueError on
    an unknown ``fmt``.
    """

    def bad(field: str, why: str):
        raise BadRow(file, number, field, why)

    if not isinstance(row, Mapping):
        bad("(row)", f"must be an object, got {describe(row)}")
    if fmt == "alpaca":
        return check_alpaca(row, bad)
    if fmt == "chat":
        return {"messages": check_messages(row.get(fields.messages), fields.messages, bad)}
    if fmt == "text":
        return {"text": need_text(row, fields.text, bad, "text rows need it")}
    if fmt == "classification":
        text = need_text(row, fields.text, bad, "classification rows need text and a label")
        return {"text": text, "label": check_label(row.get(fields.label), fields.label, bad)}
    raise ValueError(f"format={fmt!r}: must be one of {', '.join(FORMATS)}")
