"""Frozen, validated configuration for adapters.

Every config is a frozen dataclass checked at construction: a bad value raises
``ConfigError`` naming the field, the value and what is allowed, e.g.
``lora.r=0: must be a positive integer``. Configs round-trip through plain dicts
(and therefore JSON / YAML) with ``to_dict`` / ``config_from_dict``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

ALL_LINEAR = "all-linear"
INIT_CHOICES = ("kaiming", "gaussian")
BIAS_CHOICES = ("none", "all", "lora_only")
# Module type names accepted by ``target_types`` (the class name of the layer to wrap).
TYPE_CHOICES = ("Linear", "Conv1D", "Embedding", "Conv1d", "Conv2d", "Linear4bit")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names field, value and what is allowed."""


def _fail(prefix: str, name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{prefix}.{name}={value!r}: {allowed}")


def _check_pos_int(prefix: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(prefix, name, value, "must be a positive integer")


def _check_str_tuple(prefix: str, name: str, value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
        _fail(prefix, name, value, "must be a list of non-empty strings")


def _as_tuple(value: Any) -> Any:
    """Lists (from YAML/JSON) become tuples so the frozen config stays hashable."""
    return tuple(value) if isinstance(value, list) else value


def _check_patterns(prefix: str, name: str, value: Any, kind: type) -> None:
    if not isinstance(value, Mapping):
        _fail(prefix, name, value, "must be a mapping of module-name pattern to number")
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            _fail(prefix, name, value, "keys must be non-empty module-name patterns")
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int) or v <= 0:
            _fail(prefix, f"{name}[{key!r}]", v, f"must be a positive {kind.__name__}")
        try:
            re.compile(key)
        except re.error as exc:
            _fail(prefix, f"{name}[{key!r}]", key, f"is not a valid regular expression ({exc})")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA: h = W0 x + s * B(A(dropout(x))), s = alpha / r (or alpha / sqrt(r) with rsLoRA).

    target_modules: names or dotted-name suffixes (``("q_proj", "v_proj")``), a regular
        expression string matched against the full module name, or ``"all-linear"``
        (every Linear-like layer except the output head).
    target_types: class names to wrap (``("Linear", "Conv2d")``), combined with target_modules
        by union.
    exclude_modules: names/suffixes never wrapped, even if a target matches.
    layers_to_transform / layers_pattern: only wrap modules inside these block indices, where
        the block list is the ModuleList named ``layers_pattern`` (``layers``, ``h``, ``layer``...).
    rank_pattern / alpha_pattern: per-module overrides; keys are regexes matched against the
        end of the module name (as in Hugging Face PEFT).
    modules_to_save: modules trained fully and stored with the adapter (e.g. a classifier head).
    init: ``kaiming`` (A ~ kaiming-uniform, PEFT's default) or ``gaussian`` (A ~ N(0, 1/r),
        the LoRA paper's); B = 0 either way so the adapted model equals the base at step 0.
    bias: which biases train and are saved: ``none``, ``all``, or ``lora_only`` (wrapped layers').
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    target_types: tuple[str, ...] = ()
    exclude_modules: tuple[str, ...] = ()
    layers_to_transform: tuple[int, ...] = ()
    layers_pattern: str | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    init: str = "kaiming"
    use_rslora: bool = False
    bias: str = "none"

    method = "lora"

    def __post_init__(self) -> None:
        for name in ("target_modules", "target_types", "exclude_modules", "layers_to_transform",
                     "modules_to_save"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
        self._validate()

    def _validate(self) -> None:
        p = self.method
        _check_pos_int(p, "r", self.r)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            _fail(p, "alpha", self.alpha, "must be a positive number")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            _fail(p, "dropout", self.dropout, "must be a number in [0, 1)")
        self._validate_targets(p)
        if self.layers_pattern is not None and (not isinstance(self.layers_pattern, str)
                                                 or not self.layers_pattern):
            _fail(p, "layers_pattern", self.layers_pattern, "must be a module-list name such as 'layers'")
        if not isinstance(self.layers_to_transform, tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform):
            _fail(p, "layers_to_transform", self.layers_to_transform, "must be a list of block indices >= 0")
        _check_patterns(p, "rank_pattern", self.rank_pattern, int)
        _check_patterns(p, "alpha_pattern", self.alpha_pattern, float)
        _check_str_tuple(p, "modules_to_save", self.modules_to_save)
        if self.init not in INIT_CHOICES:
            _fail(p, "init", self.init, f"must be one of {', '.join(INIT_CHOICES)}")
        if not isinstance(self.use_rslora, bool):
            _fail(p, "use_rslora", self.use_rslora, "must be true or false")
        if self.bias not in BIAS_CHOICES:
            _fail(p, "bias", self.bias, f"must be one of {', '.join(BIAS_CHOICES)}")

    def _validate_targets(self, p: str) -> None:
        tm = self.target_modules
        if isinstance(tm, str):
            if tm != ALL_LINEAR:
                try:
                    re.compile(tm)
                except re.error as exc:
                    _fail(p, "target_modules", tm, f"is not a valid regular expression ({exc})")
        else:
            _check_str_tuple(p, "target_modules", tm)
        _check_str_tuple(p, "target_types", self.target_types)
        for t in self.target_types:
            if t not in TYPE_CHOICES:
                _fail(p, "target_types", t, f"must be one of {', '.join(TYPE_CHOICES)}")
        if not tm and not self.target_types:
            _fail(p, "target_modules", tm, "must name at least one module (or set target_types)")
        _check_str_tuple(p, "exclude_modules", self.exclude_modules)

    def rank_for(self, module_name: str) -> int:
        """The rank for one module: the first rank_pattern key matching its name's end, else r."""
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        """The alpha for one module: the first alpha_pattern key matching its name's end, else alpha."""
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, Mapping) else v)
        return out


def _pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


CONFIG_TYPES: dict[str, type] = {"lora": LoraConfig}


def config_from_dict(data: Mapping[str, Any]) -> Any:
    """Build a config from a dict with a ``method`` key; unknown keys are an error naming them."""
    data = dict(data)
    method = data.pop("method", "lora")
    cls = CONFIG_TYPES.get(method)
    if cls is None:
        raise ConfigError(f"method={method!r}: must be one of {', '.join(sorted(CONFIG_TYPES))}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{method}: unknown field(s) {unknown}; allowed: {sorted(names)}")
    return cls(**data)
