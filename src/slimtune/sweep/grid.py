"""The grid of a sweep: ``key.path=v1,v2`` axes, their combinations and stable run names (no torch).

Values are parsed as ``slimtune train`` overrides are (``yaml.safe_load``), and commas inside brackets belong to
the value, so the layers to adapt are searchable too: ``adapter.target_modules=[q_proj,v_proj],all-linear``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any, Sequence

KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class GridError(ValueError):
    """A malformed ``--grid`` axis (the message names it and what is allowed)."""


@dataclass(frozen=True)
class Axis:
    """One swept key: ``texts`` as written (for overrides and names) and ``values`` as parsed (for tables)."""

    key: str
    texts: tuple[str, ...]
    values: tuple[Any, ...]


def split_values(text: str) -> list[str]:
    """``4,8,[q_proj,v_proj]`` -> ``['4', '8', '[q_proj,v_proj]']``: commas split only outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def parse_axis(text: str) -> Axis:
    """``adapter.r=4,8,16`` -> Axis. Raises GridError for a missing ``=``, a bad key, an empty or repeated value,
    or unbalanced brackets (each message repeats the axis)."""
    import yaml

    key, sep, rest = text.partition("=")
    key = key.strip()
    if not sep or not KEY.fullmatch(key):
        raise GridError(f"--grid {text!r}: must be key.path=value1,value2,... (e.g. adapter.r=4,8,16)")
    if rest.count("[") != rest.count("]") or rest.count("{") != rest.count("}"):
        raise GridError(f"--grid {text!r}: unbalanced brackets in the values")
    texts = split_values(rest)
    if any(not t for t in texts):
        raise GridError(f"--grid {text!r}: an empty value; separate values with single commas")
    if len(set(texts)) != len(texts):
        raise GridError(f"--grid {text!r}: a value is repeated")
    try:
        values = tuple(yaml.safe_load(t) for t in texts)
    except yaml.YAMLError as exc:
        raise GridError(f"--grid {text!r}: a value is not valid YAML ({' '.join(str(exc).split())})") from None
    return Axis(key, tuple(texts), values)


def parse_grid(texts: Sequence[str]) -> tuple[Axis, ...]:
    """Every axis; GridError for none or for a key given twice."""
    if not texts:
        raise GridError("--grid: give at least one axis, e.g. --grid adapter.r=4,8 train.lr=1e-4,3e-4")
    axes = tuple(parse_axis(t) for t in texts)
    keys = [a.key for a in axes]
    for k in keys:
        if keys.count(k) > 1:
            raise GridError(f"--grid {k}: given twice; list all its values in one axis")
    return axes


def combinations(axes: Sequence[Axis]) -> list[dict[str, str]]:
    """Every combination as ``{key: value text}``, the first axis varying slowest."""
    return [dict(zip((a.key for a in axes), combo)) for combo in itertools.product(*(a.texts for a in axes))]


def run_name(index: int, combo: dict[str, str]) -> str:
    """A folder name: ``003-r=16-lr=3e-4``, ``001-target_modules=q_proj+v_proj`` (the last key component; a list's
    items joined by +; other characters unsafe in paths become _)."""
    parts = [f"{k.rsplit('.', 1)[-1]}={re.sub(r'[][{} ]', '', v).replace(',', '+')}" for k, v in combo.items()]
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", f"{index:03d}-" + "-".join(parts))[:120]
