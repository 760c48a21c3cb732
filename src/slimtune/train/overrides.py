"""``key.path=value`` overrides on a run-config dict, as given on the command line.

    train.lr=1e-4   adapter.target_modules=[q_proj,v_proj]   data.packing=false   model.name=path/to/folder

The value is parsed with ``yaml.safe_load`` (so lists, booleans, null and numbers work; ``1e-4``, which YAML 1.1
reads as text, is accepted by the numeric fields). The first two levels of the path must be a known section and
field (an adapter's fields depend on its ``method``, the overridden one if any); deeper levels go into mapping
fields such as ``adapter.rank_pattern.q_proj=16``. A malformed override or an unknown key is an issue naming it
(with the nearest valid key), and is not applied.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

from slimtune.train.checks import unknown_key_issue, yaml_problem
from slimtune.train.config import SECTIONS, RunConfigError, section_fields

FORM = "must look like key.path=value (e.g. train.lr=1e-4)"


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"train.lr=1e-4"`` -> ``(("train", "lr"), "1e-4")``: the key path and the YAML-parsed value.

    Raises RunConfigError (one issue naming the override) when there is no ``=``, an empty key or key part,
    or a value that is not valid YAML.
    """
    import yaml

    key, sep, raw = text.partition("=") if isinstance(text, str) else ("", "", "")
    parts = tuple(p.strip() for p in key.split("."))
    if not sep or not all(parts):
        raise RunConfigError([f"override {text!r}: {FORM}"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None  # "key=" sets null
    except yaml.YAMLError as exc:
        raise RunConfigError([f"override {text!r}: the value is not valid YAML: {yaml_problem(exc)}"]) from None
    return parts, value


def _final_method(d: dict, parsed: list[tuple[tuple[str, ...], Any]]) -> dict:
    """``d`` with only the adapter method the overrides end with, to look up the adapter's field names."""
    adapter = d.get("adapter")
    view = {"adapter": dict(adapter) if isinstance(adapter, dict) else {}}
    for path, value in parsed:
        if path == ("adapter", "method"):
            view["adapter"]["method"] = value
        elif path == ("adapter",) and isinstance(value, dict):
            view["adapter"] = dict(value)
    return view


def key_issue(path: tuple[str, ...], view: dict) -> str | None:
    """None when the first two levels of ``path`` name a real section and field, else an issue naming it."""
    if path[0] not in SECTIONS:
        return unknown_key_issue("", path[0], SECTIONS, "section")
    fields = section_fields(path[0], view)
    if len(path) == 1 or path[0] == "adapter" and fields is None:  # an unknown method is reported by validation
        return None
    if fields is None:
        return f"{'.'.join(path)}: {path[0]} is a single value, not a section (write {path[0]}=VALUE)"
    return None if path[1] in fields else unknown_key_issue(path[0], path[1], fields)


def set_path(d: dict, path: tuple[str, ...], value: Any) -> str | None:
    """Set ``d[path[0]][path[1]]... = value`` creating mappings on the way; an issue when a level is not one."""
    node = d
    for i, part in enumerate(path[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            return f"{'.'.join(path)}: {'.'.join(path[:i + 1])}={nxt!r} is not a mapping"
        node = nxt
    node[path[-1]] = value
    return None


def overrides_with_issues(d: dict, overrides: Sequence[str]) -> tuple[dict, list[str]]:
    """(a copy of ``d`` with the good overrides applied in order, an issue per bad one); ``d`` is untouched."""
    out, issues, parsed = copy.deepcopy(d), [], []
    for text in overrides:
        try:
            parsed.append(parse_override(text))
        except RunConfigError as exc:
            issues += exc.issues
    view = _final_method(out, parsed)
    for path, value in parsed:
        problem = key_issue(path, view) or set_path(out, path, value)
        if problem:
            issues.append(problem)
    return out, issues


def apply_overrides(d: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``d`` with ``overrides`` (``"a.b=v"``) applied; ``d`` is untouched.

    Raises RunConfigError listing every malformed override and unknown key (with the nearest valid key).
    """
    out, issues = overrides_with_issues(d, overrides)
    if issues:
        raise RunConfigError(issues)
    return out
