"""Frozen, validated configuration for adapters.

Every config is a frozen dataclass checked at construction: a bad value raises
``ConfigError`` naming the field, the value and what is allowed, e.g.
``lora.r=0: must be a positive integer``. Configs round-trip through plain dicts
(and therefore JSON / YAML) with ``to_dict`` / ``config_from_dict`` / ``load_config``.

One schema covers every method; the ``method`` field picks the type, so two runs compared in a
benchmark are one field apart:

    method: lora | dora | bottleneck | prompt | freeze | full

These are the names of :mod:`slimtune.vocab`, shared with the memory estimator (which adds ``qlora``:
LoRA on a 4-bit base). Older spellings (``adapter``, ``prompt-tuning``) are read as aliases.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from slimtune.vocab import MethodNameError, canonical_method

ALL_LINEAR = "all-linear"
INIT_CHOICES = ("kaiming", "gaussian", "pissa", "olora")
# inits that split the base weight: the file's A, B are relative to W0 - s B0 A0, not to W0 itself
PRINCIPAL_INITS = ("pissa", "olora")
BIAS_CHOICES = ("none", "all", "lora_only")
# Adapter parameter dtype on a bf16/fp16 base: float32 (PEFT's default; small AdamW updates round away in
# bf16) or the base's own dtype (half the adapter memory).
ADAPTER_DTYPES = ("float32", "base")
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
        ``pissa`` (Meng et al. 2024) puts the top-r singular vectors of W0 in A and B and keeps
        the residual in W0; ``olora`` (Buyukakyuz 2024) does the same with a QR decomposition.
        Both rewrite the base weight, so the step-0 output still equals the base.
    use_rslora: scale by alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r.
    use_dora: DoRA (Liu et al. 2024): W' = m * (W0 + s B A) / ||W0 + s B A|| per output row,
        with a trainable magnitude m. Linear-like (Linear, Conv1D, 4-bit) and Conv1d/Conv2d layers.
    bias: which biases train and are saved: ``none``, ``all``, or ``lora_only`` (wrapped layers').
    adapter_dtype: on a bf16/fp16 (or 4-bit) base, adapters are created in ``float32`` (as PEFT does) or
        in the ``base`` dtype (the base's, or a 4-bit layer's compute dtype). fp32 and fp64 bases keep theirs.
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
    use_dora: bool = False
    bias: str = "none"
    adapter_dtype: str = "float32"

    @property
    def method(self) -> str:
        """``dora`` with ``use_dora``, else ``lora``: what reports, errors and saved files call it."""
        return "dora" if self.use_dora is True else "lora"

    def __post_init__(self) -> None:
        for name in ("target_modules", "target_types", "exclude_modules", "layers_to_transform",
                     "modules_to_save"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        for name in ("rank_pattern", "alpha_pattern"):  # a non-mapping is left for _validate to name
            if isinstance(getattr(self, name), Mapping):
                object.__setattr__(self, name, dict(getattr(self, name)))
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
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                _fail(p, flag, getattr(self, flag), "must be true or false")
        if self.bias not in BIAS_CHOICES:
            _fail(p, "bias", self.bias, f"must be one of {', '.join(BIAS_CHOICES)}")
        _check_adapter_dtype(p, self.adapter_dtype)

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

    @property
    def rewrites_base(self) -> bool:
        """PiSSA / OLoRA: the base weight becomes W0 - s B0 A0, so the update is relative to a rewritten base."""
        return self.init in PRINCIPAL_INITS

    def alpha_for(self, module_name: str) -> float:
        """The alpha for one module: the first alpha_pattern key matching its name's end, else alpha."""
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)  # method: dora when use_dora (the property)


def _to_dict(cfg: Any) -> dict[str, Any]:
    out = {"method": cfg.method}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, Mapping) else v)
    return out


def _check_adapter_dtype(prefix: str, value: Any) -> None:
    if value not in ADAPTER_DTYPES:
        _fail(prefix, "adapter_dtype", value, f"must be one of {', '.join(ADAPTER_DTYPES)}")


def _pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default



def _check_number(prefix: str, name: str, value: Any, lo: float, hi: float, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value < hi:
        _fail(prefix, name, value, allowed)


def _check_layers(p: str, layers: Any, pattern: Any) -> None:
    if pattern is not None and (not isinstance(pattern, str) or not pattern):
        _fail(p, "layers_pattern", pattern, "must be a module-list name such as 'layers'")
    if not isinstance(layers, tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        _fail(p, "layers_to_transform", layers, "must be a list of block indices >= 0")


NONLINEARITIES = ("relu", "gelu", "silu", "tanh")
POSITIONS = ("attention", "mlp")


@dataclass(frozen=True)
class BottleneckConfig:
    """Bottleneck adapters (Houlsby et al. 2019): h + up(act(down(h))) after a block's output projection.

    size: bottleneck width m (params per adapter: 2 * d * m + m + d).  # higher: more capacity, more memory
    positions: where adapters go: after the attention output projection and/or the MLP's
        (Houlsby: both; Pfeiffer et al. 2020: MLP only). Resolved per architecture by name.
    target_modules: explicit output-projection names instead of ``positions`` (suffix or regex).
    The up-projection starts at zero, so step 0 equals the base. These cannot be merged.
    adapter_dtype: ``float32`` (default) or ``base``, as for LoRA.
    """

    size: int = 64
    positions: tuple[str, ...] = POSITIONS
    target_modules: tuple[str, ...] | str = ()
    nonlinearity: str = "relu"
    dropout: float = 0.0
    scale: float = 1.0
    exclude_modules: tuple[str, ...] = ()
    layers_to_transform: tuple[int, ...] = ()
    layers_pattern: str | None = None
    modules_to_save: tuple[str, ...] = ()
    adapter_dtype: str = "float32"

    method = "bottleneck"
    target_types: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)
    bias = "none"

    def __post_init__(self) -> None:
        for name in ("positions", "target_modules", "exclude_modules", "layers_to_transform", "modules_to_save"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        p = self.method
        _check_pos_int(p, "size", self.size)
        _check_str_tuple(p, "positions", self.positions)
        for pos in self.positions:
            if pos not in POSITIONS:
                _fail(p, "positions", pos, f"must be one of {', '.join(POSITIONS)}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                _fail(p, "target_modules", self.target_modules, f"is not a valid regular expression ({exc})")
        else:
            _check_str_tuple(p, "target_modules", self.target_modules)
        if not self.positions and not self.target_modules:
            _fail(p, "positions", self.positions, "must name attention and/or mlp (or set target_modules)")
        if self.nonlinearity not in NONLINEARITIES:
            _fail(p, "nonlinearity", self.nonlinearity, f"must be one of {', '.join(NONLINEARITIES)}")
        _check_number(p, "dropout", self.dropout, 0.0, 1.0, "must be a number in [0, 1)")
        _check_number(p, "scale", self.scale, 1e-12, float("inf"), "must be a positive number")
        _check_str_tuple(p, "exclude_modules", self.exclude_modules)
        _check_str_tuple(p, "modules_to_save", self.modules_to_save)
        _check_layers(p, self.layers_to_transform, self.layers_pattern)
        _check_adapter_dtype(p, self.adapter_dtype)

    def rank_for(self, module_name: str) -> int:
        return self.size

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


PROMPT_INITS = ("random", "text")


@dataclass(frozen=True)
class PromptTuningConfig:
    """Prompt tuning (Lester et al. 2021): n trainable virtual-token embeddings prepended to the input.

    num_virtual_tokens: n.  # more: more capacity, and n more positions of attention per step
    init: ``random`` (N(0, 1) scaled like the embedding table, as PEFT) or ``text`` (the embeddings of
        ``init_text``'s tokens, repeated or cut to n; needs a tokenizer at setup).
    modules_to_save: modules trained fully and stored with the prompt, e.g. a classifier head
        (``("classifier",)`` for BERT, ``("score",)`` for Llama); PEFT adds these itself for SEQ_CLS.
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    modules_to_save: tuple[str, ...] = ()

    method = "prompt"

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules_to_save", _as_tuple(self.modules_to_save))
        p = self.method
        _check_str_tuple(p, "modules_to_save", self.modules_to_save)
        _check_pos_int(p, "num_virtual_tokens", self.num_virtual_tokens)
        if self.init not in PROMPT_INITS:
            _fail(p, "init", self.init, f"must be one of {', '.join(PROMPT_INITS)}")
        if self.init == "text" and (not isinstance(self.init_text, str) or not self.init_text):
            _fail(p, "init_text", self.init_text, "must be a non-empty string when init='text'")
        if self.init_text is not None and not isinstance(self.init_text, str):
            _fail(p, "init_text", self.init_text, "must be a string or null")

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass(frozen=True)
class FreezeConfig:
    """Freeze-tuning: train only the last N transformer blocks and/or named modules; the rest is frozen.

    last_n_blocks: how many blocks, counted from the output end, train in full (0: none).
    modules: module names or dotted-name suffixes trained in full (e.g. ``("lm_head", "norm")``).
    layers_pattern: the block list's name (``layers``, ``h``, ``layer``); found automatically if unset.
    """

    last_n_blocks: int = 2
    modules: tuple[str, ...] = ()
    layers_pattern: str | None = None

    method = "freeze"

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", _as_tuple(self.modules))
        p = self.method
        if isinstance(self.last_n_blocks, bool) or not isinstance(self.last_n_blocks, int) or self.last_n_blocks < 0:
            _fail(p, "last_n_blocks", self.last_n_blocks, "must be an integer >= 0")
        _check_str_tuple(p, "modules", self.modules)
        if self.last_n_blocks == 0 and not self.modules:
            _fail(p, "last_n_blocks", 0, "must be > 0 when no modules are named (nothing would train)")
        _check_layers(p, (), self.layers_pattern)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass(frozen=True)
class FullConfig:
    """Full fine-tuning, the baseline: every parameter trains (optionally not the embeddings)."""

    freeze_embeddings: bool = False

    method = "full"

    def __post_init__(self) -> None:
        if not isinstance(self.freeze_embeddings, bool):
            _fail(self.method, "freeze_embeddings", self.freeze_embeddings, "must be true or false")

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


MethodConfig = LoraConfig | BottleneckConfig | PromptTuningConfig | FreezeConfig | FullConfig
CONFIG_TYPES: dict[str, type] = {"lora": LoraConfig, "dora": LoraConfig, "bottleneck": BottleneckConfig,
                                 "prompt": PromptTuningConfig, "freeze": FreezeConfig, "full": FullConfig}


def config_method(name: Any) -> str:
    """The canonical config ``method`` for ``name`` (aliases such as ``prompt-tuning`` accepted).

    Raises ConfigError listing the config methods; for ``qlora`` it says how to get it (a config
    method on a 4-bit base) instead.
    """
    if isinstance(name, str) and name.strip().lower() == "qlora":
        raise ConfigError("method='qlora': QLoRA is lora (or dora, bottleneck, prompt) on a 4-bit base; write "
                          "method: lora and quantize the base (quantize: nf4 in a slimtune train config, slimtune.load_quantized)")
    try:
        return canonical_method(name, tuple(CONFIG_TYPES))
    except MethodNameError as exc:
        raise ConfigError(str(exc)) from None


def config_from_dict(data: Mapping[str, Any]) -> MethodConfig:
    """Build a config from a dict with a ``method`` key (default ``lora``); unknown keys are an error.

    ``method: dora`` is LoRA with ``use_dora: true``. Raises ConfigError naming the field, the value and
    what is allowed (for ``method``: the canonical names, see :func:`config_method`).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"config={data!r}: must be a mapping of field names to values")
    data = dict(data)
    method = config_method(data.pop("method", "lora"))
    cls = CONFIG_TYPES[method]
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names, key=str)  # YAML keys need not be strings
    if unknown:
        raise ConfigError(f"{method}: unknown field(s) {unknown}; allowed: {sorted(names)}")
    if method == "dora":
        if data.get("use_dora", True) is not True:
            raise ConfigError(f"dora.use_dora={data['use_dora']!r}: must be true for method dora (or use method lora)")
        data["use_dora"] = True
    return cls(**data)


def load_config(path: str | os.PathLike) -> MethodConfig:
    """Read a config from a YAML (or JSON) file with ``yaml.safe_load``; see ``config_from_dict``.

    Raises ConfigError, prefixed with the path, for a file that cannot be read, is not YAML (with the
    line and column), or holds a bad value; FileNotFoundError when it does not exist.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    try:
        return config_from_dict({} if data is None else data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _yaml_problem(exc: Exception) -> str:
    """One line from a YAML error: ``line 3, column 5: mapping values are not allowed here``."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (problem or " ".join(str(exc).split()))


def save_config(config: MethodConfig, path: str | os.PathLike) -> None:
    """Write a config as YAML that ``load_config`` reads back equal."""
    import yaml

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
        os.replace(tmp, path)  # never a half-written config
    finally:
        tmp.unlink(missing_ok=True)
