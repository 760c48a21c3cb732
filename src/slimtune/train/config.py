"""The run config of ``slimtune train``: frozen, validated sections read from YAML, every problem reported at once.

A run config is a YAML mapping with these sections (all optional; ``slimtune train`` with no file runs the
packaged ``default.yaml``)::

    model:      {name, dtype}                      # the bundled smollm2-135m, a local HF folder, or a .gguf file
    quantize:   none | nf4                         # nf4: QLoRA (the base in 4 bits, the adapter on top)
    adapter:    {method, ...}                      # a method config, checked by slimtune.config
    data:       {train, eval, format, max_length, packing, ...}
    train:      {max_steps | epochs, batch_size, grad_accum, lr, scheduler, warmup, ...}
    output_dir: runs/train

:func:`run_config_from_dict` checks every field and every cross-field rule and raises one
:class:`RunConfigError` whose ``issues`` list them all, one line each, e.g.
``train.lr=-1: must be a positive number`` or ``trian: unknown section; did you mean train?``.
Relative paths are relative to the directory slimtune runs in (not to the config file). No torch here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from slimtune.config import CONFIG_TYPES, ConfigError, LoraConfig, MethodConfig, config_method
from slimtune.train.checks import (AUTO, FORMATS, Checker, adapter_fields, boolean, check_adapter, check_fields,
                                   choice, data_path, default_adapter, fraction, integer, non_negative, optional,
                                   positive, positive_int, text, unknown_key_issue, warmup, yaml_problem)
from slimtune.train.image_rules import PREDICTION_TYPES, channels_check, image_cross_rules, image_data_rules

BUNDLED_MODELS = ("smollm2-135m",)
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("none", "nf4")
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit", "offload")
DEFAULT_MAX_STEPS = 100  # when neither train.max_steps nor train.epochs is given
DEFAULT_EFFECTIVE_BATCH = 8  # train.batch_size: auto without train.effective_batch
SECTIONS = ("model", "quantize", "adapter", "data", "train", "output_dir")
QUANTIZABLE_METHODS = ("lora", "dora", "bottleneck", "prompt")  # freeze/full train the base, which nf4 freezes


class RunConfigError(ValueError):
    """A run config with problems: ``issues`` holds every one, a line each; ``source`` is the file (or None).

    ``str()`` lists them all, one per line, each prefixed with ``source: `` when there is a source.
    """

    def __init__(self, issues: Sequence[str], source: str | os.PathLike | None = None) -> None:
        self.issues: tuple[str, ...] = tuple(issues)
        self.source = None if source is None else str(source)
        super().__init__("\n".join(f"{self.source}: {i}" if self.source else i for i in self.issues))


def batch_size_check(value: Any) -> tuple[Any, str | None]:
    """A positive integer, or ``auto`` (the micro-batch that fits train.memory, chosen before the model loads)."""
    if value == AUTO:
        return value, None
    v, why = positive_int(value)
    return (v, None) if why is None else (value, "must be a positive integer or auto")


def memory_size(value: Any) -> tuple[Any, str | None]:
    """A memory budget such as ``8GB`` (1e9 bytes) or ``8GiB``, or a card name (``rtx-4090``), kept as written."""
    from slimtune.memory.presets import GPUS, gpu_bytes

    try:
        ok = isinstance(value, str) and gpu_bytes(value) > 0
    except ValueError:
        ok = False
    return (value, None) if ok else (value, f"must be a size such as 8GB or 8GiB, or a card ({', '.join(GPUS)})")


MODEL_FIELDS: dict[str, Checker] = {"name": text, "dtype": choice(DTYPES)}
DATA_FIELDS: dict[str, Checker] = {
    "train": optional(text), "eval": optional(data_path), "eval_fraction": fraction,
    "general": optional(text), "format": choice(FORMATS), "max_length": positive_int, "packing": boolean,
    "skip_bad_rows": boolean, "text_field": text, "label_field": text, "messages_field": text,
    "resolution": positive_int, "channels": channels_check}
TRAIN_FIELDS: dict[str, Checker] = {
    "max_steps": optional(positive_int), "epochs": optional(positive), "batch_size": batch_size_check,
    "memory": optional(memory_size), "effective_batch": optional(positive_int),
    "grad_accum": positive_int, "lr": positive, "scheduler": choice(SCHEDULERS), "warmup": warmup,
    "weight_decay": non_negative, "max_grad_norm": optional(positive),
    "precision": choice(PRECISIONS), "grad_checkpointing": boolean, "optimizer": choice(OPTIMIZERS),
    "loraplus_ratio": optional(positive), "seed": integer(0, 2**63 - 1, "must be an integer >= 0"),
    "log_every": positive_int,
    "eval_every": optional(positive_int), "save_every": optional(positive_int), "keep_last": positive_int,
    "fsdp": boolean, "snr_gamma": optional(positive), "prediction_type": choice(PREDICTION_TYPES),
    "text_encoder": boolean}


def train_rules(t: Mapping[str, Any]) -> list[str]:
    """Rules between train fields (given the good, normalised values; a missing field skips its rules)."""
    issues = []
    steps, epochs = t.get("max_steps"), t.get("epochs")
    if steps is not None and epochs is not None:
        issues.append(f"train.epochs={epochs!r}: cannot be set with train.max_steps={steps!r}; set exactly one")
    warmup = t.get("warmup")
    if isinstance(warmup, int) and steps is not None and warmup >= steps:
        issues.append(f"train.warmup={warmup!r}: must be fewer steps than train.max_steps={steps!r}")
    auto, accum, effective = t.get("batch_size") == AUTO, t.get("grad_accum"), t.get("effective_batch")
    if auto and accum not in (None, 1):
        issues.append(f"train.grad_accum={accum!r}: chosen by train.batch_size: auto (to keep "
                      f"train.effective_batch); remove it, or give a number for train.batch_size")
    if not auto and effective is not None:
        issues.append(f"train.effective_batch={effective!r}: only read with train.batch_size: auto; with "
                      f"train.batch_size={t.get('batch_size')!r} the effective batch is batch_size x grad_accum")
    if not auto and t.get("memory") is not None:
        issues.append(f"train.memory={t.get('memory')!r}: only read with train.batch_size: auto (the budget it "
                      "fits); remove it, or set train.batch_size: auto")
    return issues


def _settle(obj: Any, section: str, checkers: Mapping[str, Checker], rules: Callable[[dict], list[str]]) -> None:
    """Validate a section dataclass in place: normalise its fields or raise RunConfigError with every issue."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    good, issues = check_fields(section, checkers, values)
    issues += rules(good)
    if issues:
        raise RunConfigError(issues)
    for name, value in good.items():
        object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class ModelSection:
    """The base model: ``name`` is the bundled ``smollm2-135m``, a local Hugging Face folder, or a ``.gguf`` file;
    ``dtype`` is the weights' dtype as loaded (float32 | bfloat16 | float16). Raises RunConfigError."""

    name: str = "smollm2-135m"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _settle(self, "model", MODEL_FIELDS, lambda good: [])


@dataclass(frozen=True)
class DataSection:
    """Where the examples come from and how they become token rows (see configs/train/*.yaml for each field)."""

    train: str | None = None  # json/jsonl/csv/parquet/txt; None only for the bundled default (BBC News)
    eval: str | None = None
    eval_fraction: float = 0.0  # split off train when eval is None
    general: str | None = None  # forgetting check text; None = the bundled Shakespeare slice
    format: str = "chat"
    max_length: int = 512
    packing: bool = True
    skip_bad_rows: bool = False
    text_field: str = "text"
    label_field: str = "label"
    messages_field: str = "messages"
    resolution: int = 64  # images: side in pixels (scaled, centre-cropped)
    channels: int = 3  # images: 1 (grey) or 3 (RGB)

    def __post_init__(self) -> None:
        _settle(self, "data", DATA_FIELDS, data_rules)


def data_rules(d: Mapping[str, Any]) -> list[str]:
    """Rules between data fields (given the good values)."""
    issues = []
    if d.get("eval") is not None and d.get("eval_fraction", 0.0) > 0:
        issues.append(f"data.eval_fraction={d['eval_fraction']!r}: must be 0 when data.eval is set "
                      f"(the eval file is the held-out set)")
    fmt = d.get("format")
    if fmt == "images":
        return issues + image_data_rules(d)
    train = d.get("train")
    if train is not None and data_path(train)[1] is not None:
        issues.append(f"data.train={train!r}: {data_path(train)[1]} (or null), or a folder with data.format: images")
    for key in ("train", "eval"):
        path = d.get(key)
        if isinstance(path, str) and path.lower().endswith(".txt") and fmt not in (None, "text"):
            issues.append(f"data.{key}={path!r}: a .txt file holds raw text, so data.format must be text "
                          f"(got {fmt!r}); use .json, .jsonl, .csv or .parquet for {fmt}")
    return issues


@dataclass(frozen=True)
class TrainSection:
    """The optimisation: steps, batch, learning-rate schedule, precision, optimizer, logging and checkpoints.

    Exactly one of ``max_steps`` / ``epochs``; with neither, ``max_steps`` is 100. ``warmup`` < 1 is a
    fraction of the steps, >= 1 a step count. Raises RunConfigError naming every bad field.
    """

    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int | str = 8  # or "auto": slimtune.train.fit chooses it and grad_accum within `memory`
    memory: str | None = None  # auto's budget: "8GB"; None = free device memory / available RAM
    effective_batch: int | None = None  # auto keeps this many examples per step (None: 8)
    grad_accum: int = 1
    lr: float = 2e-4
    scheduler: str = "cosine"
    warmup: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"  # fp16 is CUDA only: refused on CPU at run time, not here
    grad_checkpointing: bool = False
    optimizer: str = "adamw"
    loraplus_ratio: float | None = None
    seed: int = 0
    log_every: int = 1
    eval_every: int | None = None
    save_every: int | None = None
    keep_last: int = 2
    fsdp: bool = False  # several processes: shard the frozen base over them (FSDP2); see train/distributed.py
    snr_gamma: float | None = None  # images: Min-SNR loss weighting (5 in the paper); None = plain MSE
    prediction_type: str = "epsilon"  # images: what the UNet predicts (epsilon | v_prediction)
    text_encoder: bool = False  # images, pipeline folder: also a LoRA on its CLIP text encoder

    def __post_init__(self) -> None:
        _settle(self, "train", TRAIN_FIELDS, train_rules)
        if self.max_steps is None and self.epochs is None:
            object.__setattr__(self, "max_steps", DEFAULT_MAX_STEPS)

    def warmup_steps(self, total: int) -> int:
        """Warmup in optimizer steps for a run of ``total`` steps (a fraction is rounded down)."""
        return self.warmup if isinstance(self.warmup, int) else int(self.warmup * total)


def cross_rules(quantize: str | None, method: str | None, data: Mapping[str, Any], train: Mapping[str, Any]
                ) -> list[str]:
    """Rules across sections; None (or a missing key) means that part was invalid, and its rules are skipped."""
    issues = []
    if quantize == "nf4" and method in ("freeze", "full"):
        issues.append(f"quantize='nf4': cannot be used with adapter.method={method!r}, which trains base weights "
                      f"that nf4 stores frozen in 4 bits; use one of {', '.join(QUANTIZABLE_METHODS)}")
    if data.get("packing") is True and data.get("format") == "classification":
        issues.append("data.packing=True: classification rows are not packed (one label per row); "
                      "set data.packing: false")
    if data.get("packing") is True and method == "prompt":
        issues.append("data.packing=True: prompt tuning prepends its virtual tokens to each row, so packed "
                      "examples after the first would not see them; set data.packing: false")
    if train.get("fsdp") is True and method in ("freeze", "full"):
        issues.append(f"train.fsdp=True: shards the frozen base under an adapter; adapter.method={method!r} trains "
                      "base weights, which are kept whole on every rank; set train.fsdp: false")
    issues += image_cross_rules(quantize, method, data, train)
    ratio = train.get("loraplus_ratio")
    if ratio is not None and method not in (None, "lora", "dora"):
        issues.append(f"train.loraplus_ratio={ratio!r}: LoRA+ needs adapter.method lora or dora "
                      f"(got {method!r}); remove it")
    return issues


def kind_name(section: str) -> str:
    """What a RunConfig field must hold, in words."""
    return ("a method config (slimtune.LoraConfig, BottleneckConfig, ...)" if section == "adapter"
            else f"a {section.capitalize()}Section")


@dataclass(frozen=True)
class RunConfig:
    """One training run, resolved and validated (see the module docstring). Raises RunConfigError."""

    model: ModelSection = field(default_factory=ModelSection)
    quantize: str = "none"
    adapter: MethodConfig = field(default_factory=default_adapter)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "runs/train"

    def __post_init__(self) -> None:
        issues = []
        for name, kind in (("model", ModelSection), ("data", DataSection), ("train", TrainSection),
                           ("adapter", tuple(set(CONFIG_TYPES.values())))):
            if not isinstance(getattr(self, name), kind):
                issues.append(f"{name}={getattr(self, name)!r}: must be {kind_name(name)}")
        _, why = choice(QUANTIZE)(self.quantize)
        if why:
            issues.append(f"quantize={self.quantize!r}: {why}")
        _, why = text(self.output_dir)
        if why:
            issues.append(f"output_dir={self.output_dir!r}: {why}")
        if not issues:
            issues = cross_rules(self.quantize, self.adapter.method, dataclasses.asdict(self.data),
                                 dataclasses.asdict(self.train))
        if issues:
            raise RunConfigError(issues)

    @property
    def effective_batch(self) -> int:
        """Examples (or packed rows) per optimizer step: batch_size * grad_accum (auto: train.effective_batch)."""
        if self.train.batch_size == AUTO:
            return self.train.effective_batch or DEFAULT_EFFECTIVE_BATCH
        return self.train.batch_size * self.train.grad_accum


# -- from a dict: every problem at once -------------------------------------------------------------------

def section_fields(section: str, d: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The keys ``section`` takes in the run-config dict ``d`` (None: a scalar section, or an unknown method)."""
    if section == "adapter":
        raw = d.get("adapter")
        method = raw.get("method", "lora") if isinstance(raw, Mapping) else "lora"
        try:
            return adapter_fields(config_method(method))
        except ConfigError:
            return None
    fields = {"model": MODEL_FIELDS, "data": DATA_FIELDS, "train": TRAIN_FIELDS}.get(section)
    return tuple(fields) if fields is not None else None


def _section(d: Mapping[str, Any], name: str, cls: type, checkers: Mapping[str, Checker], issues: list[str]
             ) -> dict:
    """One mapping section's good, normalised values, with the defaults of fields not given (a bad field is
    left out, so rules on it are skipped); its problems go to ``issues``."""
    raw = d.get(name, {})
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        issues.append(f"{name}={raw!r}: must be a mapping of field names to values")
        return {}
    issues += [unknown_key_issue(name, k, tuple(checkers)) for k in raw if k not in checkers]
    good, bad = check_fields(name, checkers, raw)
    issues += bad
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in raw}
    return {**defaults, **good}


def run_config_from_dict(d: Mapping[str, Any], *, check_files: bool = False) -> RunConfig:
    """Build a RunConfig from a plain dict (a parsed YAML file), checking every field and rule.

    With ``check_files``, the model (unless bundled) and the data files must exist on disk.
    Raises RunConfigError listing every problem: unknown sections/fields (with the nearest valid name),
    bad values (field, value, what is allowed), and broken cross-field rules.
    """
    if not isinstance(d, Mapping):
        raise RunConfigError([f"config={d!r}: must be a mapping of sections ({', '.join(SECTIONS)})"])
    issues = [unknown_key_issue("", k, SECTIONS, "section") for k in d if k not in SECTIONS]
    model = _section(d, "model", ModelSection, MODEL_FIELDS, issues)
    quantize, bad_quantize = choice(QUANTIZE)(d.get("quantize", "none"))
    issues += [f"quantize={quantize!r}: {bad_quantize}"] if bad_quantize else []
    adapter, method, adapter_issues = check_adapter(d.get("adapter"))
    issues += adapter_issues
    data = _section(d, "data", DataSection, DATA_FIELDS, issues)
    train = _section(d, "train", TrainSection, TRAIN_FIELDS, issues)
    output_dir, why = text(d.get("output_dir", "runs/train"))
    issues += [f"output_dir={output_dir!r}: {why}"] if why else []
    issues += data_rules(data) + train_rules(train)
    issues += cross_rules(None if bad_quantize else quantize, method, data, train)
    if check_files:
        issues += file_issues(model, data)
    if issues:
        raise RunConfigError(issues)
    return RunConfig(model=ModelSection(**model), quantize=quantize, adapter=adapter, data=DataSection(**data),
                     train=TrainSection(**train), output_dir=output_dir)


def file_issues(model: Mapping[str, Any], data: Mapping[str, Any]) -> list[str]:
    """Missing model folder/file and data files (paths relative to the current directory)."""
    issues = []
    name = model.get("name", ModelSection.name)
    if name not in BUNDLED_MODELS:
        p = Path(name).expanduser()
        ok = p.is_file() if name.lower().endswith(".gguf") else (p / "config.json").is_file()
        ok = ok or (data.get("format") == "images" and (p / "model_index.json").is_file())  # a pipeline folder
        if not ok and data.get("format") == "images":
            issues.append(f"model.name={name!r}: data.format: images needs a diffusers UNet folder (config.json, "
                          f"safetensors weights, prompts.safetensors) or a pipeline folder (model_index.json, "
                          f"unet/, text_encoder/, tokenizer/) (relative to {os.getcwd()})")
        elif not ok:
            issues.append(f"model.name={name!r}: must be the bundled {', '.join(BUNDLED_MODELS)}, a folder holding "
                          f"a Hugging Face config.json, or an existing .gguf file (relative to {os.getcwd()})")
    images = data.get("format") == "images"
    if images and data.get("train") is not None and not Path(data["train"]).expanduser().is_dir():
        issues.append(f"data.train={data['train']!r}: no such folder (relative to {os.getcwd()})")
    for key in ("eval", "general") if images else ("train", "eval", "general"):
        path = data.get(key)
        if key == "train" and path is not None and data_path(path)[1] is not None:
            continue  # not a data file name: data_rules named it already
        if path is not None and not Path(path).expanduser().is_file():
            issues.append(f"data.{key}={path!r}: no such file (relative to {os.getcwd()})")
    return issues


# -- files ------------------------------------------------------------------------------------------------

def default_config_path() -> Path:
    """The packaged default run config (``slimtune train`` with no file)."""
    return Path(__file__).with_name("default.yaml")


def read_yaml(path: str | os.PathLike) -> Any:
    """``yaml.safe_load`` of a file; RunConfigError naming the file when it is missing, unreadable or bad YAML."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        problem = "no such config file"
    except (OSError, UnicodeDecodeError) as exc:
        problem = f"cannot be read as UTF-8 text ({exc})"
    except yaml.YAMLError as exc:
        problem = f"not valid YAML: {yaml_problem(exc)}"
    raise RunConfigError([problem], source=path)


def load_run_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), *,
                    check_files: bool = False) -> RunConfig:
    """Read a run config (None: the packaged default.yaml), apply ``key.path=value`` overrides, validate.

    Raises RunConfigError (``source`` = the file) listing every problem: the file's, the overrides'
    (malformed, unknown key) and the resolved config's. ``check_files``: see :func:`run_config_from_dict`.
    """
    from slimtune.train.overrides import overrides_with_issues  # overrides.py imports this module's schema

    path = default_config_path() if path is None else path
    d = read_yaml(path)
    d = {} if d is None else d
    if not isinstance(d, Mapping):
        raise RunConfigError([f"must be a mapping of sections ({', '.join(SECTIONS)}), not a {type(d).__name__}"],
                             source=path)
    d, issues = overrides_with_issues(dict(d), overrides)
    try:
        cfg = run_config_from_dict(d, check_files=check_files)
    except RunConfigError as exc:
        issues += exc.issues
    if issues:
        raise RunConfigError(issues, source=path)
    return cfg


def run_config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data (every field, defaults filled) that run_config_from_dict reads back equal."""
    return {"model": dataclasses.asdict(cfg.model), "quantize": cfg.quantize, "adapter": cfg.adapter.to_dict(),
            "data": dataclasses.asdict(cfg.data), "train": dataclasses.asdict(cfg.train),
            "output_dir": cfg.output_dir}


def save_run_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (a temp file in the same folder, fsync, rename)."""
    import yaml

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # never a half-written config.yaml
    finally:
        tmp.unlink(missing_ok=True)


def describe_adapter(a: MethodConfig) -> str:
    """``lora r=8 alpha=16 on all-linear`` and the like: the adapter in a few words."""
    if isinstance(a, LoraConfig):
        targets = a.target_modules if isinstance(a.target_modules, str) else ",".join(a.target_modules)
        return f"{a.method} r={a.r} alpha={a.alpha:g} on {targets}"
    detail = {"bottleneck": lambda: f"size={a.size} after {','.join(a.positions) or ','.join(a.target_modules)}",
              "prompt": lambda: f"{a.num_virtual_tokens} virtual tokens ({a.init} init)",
              "freeze": lambda: f"last {a.last_n_blocks} blocks" + (f" + {','.join(a.modules)}" if a.modules else ""),
              "full": lambda: "every parameter" + (" but the embeddings" if a.freeze_embeddings else "")}
    return f"{a.method} ({detail[a.method]()})"


def describe(cfg: RunConfig) -> str:
    """A one-paragraph summary of the resolved run: model, method, data, steps, effective batch, output."""
    t, d = cfg.train, cfg.data
    base = f"{cfg.model.name} ({cfg.model.dtype}{', nf4 4-bit base' if cfg.quantize == 'nf4' else ''})"
    data = d.train if d.train is not None else "the bundled BBC News set"
    length = f"{t.epochs:g} epochs" if t.epochs is not None else f"{t.max_steps} steps"
    batch = (f"batch_size auto x grad_accum auto, within {t.memory or 'the free memory'}" if t.batch_size == AUTO
             else f"batch_size {t.batch_size} x grad_accum {t.grad_accum}")
    shape = (f"{d.resolution}x{d.resolution}, {d.channels} channel{'s' if d.channels > 1 else ''}"
             + (f", Min-SNR gamma {t.snr_gamma:g}" if t.snr_gamma is not None else "")
             if d.format == "images" else f"max_length {d.max_length}, {'packed' if d.packing else 'padded'}")
    return (f"Fine-tunes {base} with {describe_adapter(cfg.adapter)}. Data: {data}, {d.format} format, "
            f"{shape}. Runs {length} of effective batch "
            f"{cfg.effective_batch} ({batch}); lr {t.lr:g} "
            f"{t.scheduler}, {t.optimizer}, {t.precision}, seed {t.seed}. Writes {cfg.output_dir}.")
