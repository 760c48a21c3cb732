"""Field checkers for run configs: each takes a raw value (from YAML) and returns (normalised value, None)
or (value, what is allowed), so a caller can collect every problem instead of stopping at the first.

The adapter section is checked here too (by slimtune.config, collecting past its first error). Also the
shared wording of the messages: the nearest valid key for an unknown one (difflib) and a one-line
YAML error. Pure Python, no torch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

from slimtune.config import CONFIG_TYPES, ConfigError, LoraConfig, MethodConfig, config_from_dict, config_method

Checker = Callable[[Any], tuple[Any, Any]]  # value -> (normalised value, None) or (value, what is allowed)
AUTO = "auto"  # train.batch_size: auto (slimtune.train.fit picks the micro-batch)
FORMATS = ("alpaca", "chat", "text", "classification", "images")  # images: slimtune.diffusion
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
# YAML 1.1 (PyYAML) reads 1e-4 as a string (it wants 1.0e-4); numeric fields accept such strings.
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def as_number(value: Any) -> Any:
    """``value`` as a float when it is a number or a numeric string (``"1e-4"``), else unchanged."""
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        return float(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def number(lo: float, hi: float, allowed: str, lo_open: bool = False) -> Checker:
    """A float in [lo, hi) (or (lo, hi) with lo_open); ints and numeric strings become floats."""
    def check(value: Any) -> tuple[Any, str | None]:
        v = as_number(value)
        ok = isinstance(v, float) and (lo < v if lo_open else lo <= v) and v < hi
        return (v, None) if ok else (value, allowed)
    return check


positive = number(0.0, float("inf"), "must be a positive number", lo_open=True)
non_negative = number(0.0, float("inf"), "must be a number >= 0")
fraction = number(0.0, 1.0, "must be a number in [0, 1)")


def integer(lo: int, hi: int, allowed: str) -> Checker:
    """An int in [lo, hi] (not a bool, not a float: 2.5 steps is a mistake, not a rounding)."""
    def check(value: Any) -> tuple[Any, str | None]:
        ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
        return (value, None) if ok else (value, allowed)
    return check


positive_int = integer(1, 2**63 - 1, "must be a positive integer")


def choice(options: Sequence[str]) -> Checker:
    """One of ``options`` (exact spelling)."""
    return lambda v: (v, None) if isinstance(v, str) and v in options else (v, f"must be one of {', '.join(options)}")


def boolean(value: Any) -> tuple[Any, str | None]:
    """True or false (YAML true/false/yes/no); not 0/1 or strings."""
    return (value, None) if isinstance(value, bool) else (value, "must be true or false")


def text(value: Any) -> tuple[Any, str | None]:
    """A string with something other than whitespace in it."""
    return (value, None) if isinstance(value, str) and value.strip() else (value, "must be a non-empty string")


def data_path(value: Any) -> tuple[Any, str | None]:
    """A data file name with a suffix the loader reads (json, jsonl, csv, parquet, txt)."""
    if isinstance(value, str) and value.lower().endswith(DATA_SUFFIXES):
        return value, None
    return value, f"must be a {', '.join(DATA_SUFFIXES[:-1])} or {DATA_SUFFIXES[-1]} file path"


def optional(check: Checker) -> Checker:
    """``check``, or null (YAML ``null`` / ``~``); the message says null is allowed too."""
    def run(value: Any) -> tuple[Any, str | None]:
        if value is None:
            return None, None
        v, why = check(value)
        return v, why if why is None else f"{why} (or null)"
    return run


# Names from PEFT / transformers' TrainingArguments that difflib would not match to ours.
KEY_ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
               "learning_rate": "lr", "num_train_epochs": "epochs", "steps": "max_steps",
               "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
               "warmup_steps": "warmup", "warmup_ratio": "warmup", "lr_scheduler_type": "scheduler",
               "gradient_checkpointing": "grad_checkpointing", "save_total_limit": "keep_last",
               "max_seq_length": "max_length", "quantization": "quantize", "peft": "adapter", "lora": "adapter"}


def nearest(name: Any, options: Sequence[str]) -> str | None:
    """The option closest to ``name`` (a known alias such as ``lora_alpha``, else difflib), or None."""
    import difflib

    alias = KEY_ALIASES.get(str(name).strip().lower())
    if alias in options:
        return alias
    found = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_key_issue(path: str, key: Any, options: Sequence[str], what: str = "field") -> str:
    """``train.lrr: unknown field; did you mean train.lr?`` (or the list of allowed keys when nothing is close)."""
    prefix = f"{path}." if path else ""
    near = nearest(key, options)
    hint = f"did you mean {prefix}{near}?" if near else f"allowed: {', '.join(options)}"
    return f"{prefix}{key}: unknown {what}; {hint}"


def yaml_problem(exc: Exception) -> str:
    """One line from a YAML error: ``line 3, column 5: mapping values are not allowed here``."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (problem or " ".join(str(exc).split()))


def warmup(value: Any) -> tuple[Any, str | None]:
    """A fraction of the steps in [0, 1), or a whole step count >= 1 (an integral float becomes an int)."""
    why = "must be a fraction of the steps in [0, 1) or a whole number of steps >= 1"
    value = as_number(value) if isinstance(value, str) else value  # "5e-2": YAML 1.1 reads it as text
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        return value, why
    if value < 1:
        return float(value), None
    return (int(value), None) if float(value).is_integer() else (value, why)


def check_fields(section: str, checkers: Mapping[str, Checker], values: Mapping[str, Any]
                 ) -> tuple[dict[str, Any], list[str]]:
    """Check each field of ``values`` present in ``checkers``: (the good values, normalised; one issue per bad one)."""
    good, issues = {}, []
    for name, raw in values.items():  # in the order written, so the issues read like the file
        if name in checkers:
            value, why = checkers[name](raw)
            if why is None:
                good[name] = value
            else:
                issues.append(f"{section}.{name}={raw!r}: {why}")
    return good, issues


def default_adapter() -> MethodConfig:
    """The run's default adapter: LoRA r=8, alpha=16 on every linear layer but the output head."""
    return LoraConfig(r=8, alpha=16, target_modules="all-linear")


def adapter_fields(method: str) -> tuple[str, ...]:
    """The field names a method config of ``method`` (canonical) takes, ``method`` first."""
    return ("method",) + tuple(f.name for f in dataclasses.fields(CONFIG_TYPES[method]) if f.init)


def adapter_message(message: str) -> str:
    """slimtune.config's ``lora.r=0: ...`` / ``method='x': ...`` as ``adapter.r=0: ...`` / ``adapter.method=...``."""
    message = re.sub(rf"^({'|'.join(CONFIG_TYPES)})\.", "adapter.", message)
    return message if message.startswith("adapter.") else f"adapter.{message}"


def check_adapter(raw: Any) -> tuple[MethodConfig | None, str | None, list[str]]:
    """(config or None, canonical method or None, issues) for the ``adapter`` section.

    slimtune.config stops at its first error, so a field it names is dropped and the rest checked again:
    independent bad fields are all reported. A lora/dora section without target_modules gets all-linear.
    """
    if raw is None:
        return default_adapter(), "lora", []
    if not isinstance(raw, Mapping):
        return None, None, [f"adapter={raw!r}: must be a mapping with a method (lora, dora, ...) and its fields"]
    values = dict(raw)
    method_name = values.get("method", "lora")
    if isinstance(method_name, str) and method_name.strip().lower() == "qlora":
        return None, None, [f"adapter.method={method_name!r}: QLoRA is LoRA on a 4-bit base; write "
                            f"adapter.method: lora and quantize: nf4"]
    try:
        method = config_method(method_name)
    except ConfigError as exc:
        return None, None, [adapter_message(str(exc))]
    known = adapter_fields(method)
    issues = [unknown_key_issue("adapter", k, known) for k in values if k not in known]
    values = {k: float(v) if isinstance(v, str) and EXPONENT.fullmatch(v.strip()) else v  # alpha: 1e-1
              for k, v in values.items() if k in known}
    if method in ("lora", "dora"):
        values.setdefault("target_modules", "all-linear")
    for _ in range(len(values) + 1):
        try:
            cfg = config_from_dict(values)
        except ConfigError as exc:
            issues.append(adapter_message(str(exc)))
            bad = re.match(r"adapter\.(\w+)", issues[-1])
            if bad is None or bad.group(1) not in values or bad.group(1) == "method":
                break
            del values[bad.group(1)]  # check the other fields without this one
            continue
        return (None if issues else cfg), method, issues
    return None, method, issues
