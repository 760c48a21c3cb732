"""What is being estimated: the method, the precision, the workload (frozen, validated; no torch).

Errors name the field, the value and what is allowed, e.g.
``precision.weight_dtype='fp8': must be one of fp32, bf16, fp16, int8, nf4``.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimtune.memory.formulas import DTYPE_BYTES, FLOAT_DTYPES, QUANT_DTYPES
from slimtune.vocab import METHODS, canonical_method

PEFT_METHODS = tuple(m for m in METHODS if m not in ("full", "freeze"))
# Which Method fields each method reads; any other one given explicitly is refused (check_options).
OPTION_USERS = {"rank": ("lora", "qlora", "dora"), "targets": ("lora", "qlora", "dora"),
                "trainable_layers": ("freeze",), "adapter_dim": ("bottleneck",), "prompt_tokens": ("prompt",)}
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd", "none")
ADAPTER_METHODS = ("lora", "qlora", "dora", "bottleneck")  # adapters slimtune.inject creates (adapter_dtype)
ADAPTER_DTYPES = ("float32", "base")
ATTENTIONS = ("sdpa", "eager")
DEVICES = ("cuda", "cpu")


def _one_of(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r}: must be one of {', '.join(allowed)}")


def _positive(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field}={value!r}: must be a positive integer")


def check_options(methods: tuple[str, ...], given: dict[str, object]) -> None:
    """Refuse a Method option that none of ``methods`` reads (``--rank`` with ``full``), rather than ignore it.

    ``given``: the options set explicitly, by Method field name. Raises ValueError naming the field,
    its value and the methods that read it.
    """
    names = tuple(canonical_method(m) for m in methods)
    for option, value in given.items():
        users = OPTION_USERS.get(option)
        if users is not None and not set(names) & set(users):
            raise ValueError(f"method.{option}={value!r}: not used by method {', '.join(names)}; only by "
                             f"{', '.join(users)}")


@dataclass(frozen=True)
class Method:
    """What trains.

    ``name``: one of :data:`slimtune.vocab.METHODS`; aliases (``adapter``, ``prompt-tuning``) are
    normalised. ``rank``: LoRA/DoRA rank r (higher: more capacity, more memory). ``targets``: module
    names LoRA and DoRA wrap, or ``("all-linear",)``; None means the family's usual choice (q/v
    projections). ``trainable_layers``: ``freeze`` trains this many last blocks. ``adapter_dim``:
    bottleneck width of Houlsby adapters. ``prompt_tokens``: soft-prompt length of prompt tuning.
    Raises ValueError naming the field.
    """

    name: str = "full"
    rank: int = 8
    targets: tuple[str, ...] | None = None
    trainable_layers: int = 2
    adapter_dim: int = 64
    prompt_tokens: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", canonical_method(self.name))
        for field in ("rank", "trainable_layers", "adapter_dim", "prompt_tokens"):
            _positive(f"method.{field}", getattr(self, field))
        if self.targets is not None:
            if isinstance(self.targets, str) or not self.targets or not all(
                    isinstance(t, str) and t.strip() for t in self.targets):
                raise ValueError(f"method.targets={self.targets!r}: must be a non-empty tuple of module "
                                 "names, or ('all-linear',)")


@dataclass(frozen=True)
class Precision:
    """Bytes per number of each resident.

    ``weight_dtype``: the base weights (None: bf16, or nf4 for qlora). Quantized bases keep only the
    block linears' weight matrices in int8/nf4, the rest in the compute dtype (bf16). ``grad_dtype``
    (None: that of the trainable weights). ``optim_dtype``: AdamW moments / SGD momentum.
    ``master_weights``: an fp32 copy of every trainable weight (mixed precision).
    ``adapter_dtype``: LoRA/DoRA/bottleneck adapters on a 16-bit or quantized base are ``float32``
    (slimtune's and PEFT's default) or in the ``base`` compute dtype (``LoraConfig.adapter_dtype``).
    """

    weight_dtype: str | None = None
    grad_dtype: str | None = None
    optimizer: str = "adamw"
    optim_dtype: str = "fp32"
    master_weights: bool = False
    double_quant: bool = True
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.weight_dtype is not None:
            _one_of("precision.weight_dtype", self.weight_dtype, FLOAT_DTYPES + QUANT_DTYPES)
        if self.grad_dtype is not None:
            _one_of("precision.grad_dtype", self.grad_dtype, FLOAT_DTYPES)
        _one_of("precision.optimizer", self.optimizer, OPTIMIZERS)
        _one_of("precision.optim_dtype", self.optim_dtype, FLOAT_DTYPES)
        _one_of("precision.adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        for field in ("master_weights", "double_quant"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"precision.{field}={getattr(self, field)!r}: must be true or false")

    def base_dtype(self, method: str) -> str:
        """Storage dtype of the base weights under ``method``.

        Raises ValueError when the method cannot use it: full and freeze train the base (so it must be
        a float dtype), qlora's base is nf4 by definition; an unknown method name.
        """
        method = canonical_method(method)
        if method == "qlora":
            if self.weight_dtype not in (None, "nf4"):
                raise ValueError(f"precision.weight_dtype={self.weight_dtype!r}: method qlora keeps its base in "
                                 "nf4; use method lora for a 16/32-bit or int8 base")
            return "nf4"
        dtype = self.weight_dtype or "bf16"
        if method in ("full", "freeze") and dtype in QUANT_DTYPES:
            raise ValueError(f"precision.weight_dtype={dtype!r}: method {method} trains base weights, which "
                             f"must be one of {', '.join(FLOAT_DTYPES)}")
        return dtype

    def compute_dtype(self, method: str) -> str:
        """Dtype of activations and of non-quantized parts: the base dtype, or bf16 under a quantized base."""
        base = self.base_dtype(method)
        return base if base in FLOAT_DTYPES else "bf16"

    def trainable_dtype(self, method: str) -> str:
        """Dtype of the trainable weights: the base's for full/freeze and prompt tuning; for adapters
        (lora, qlora, dora, adapter) fp32 on a 16-bit or quantized base unless ``adapter_dtype='base'``,
        which keeps the compute dtype (as ``slimtune.inject`` creates them)."""
        compute = self.compute_dtype(method)
        if method in ADAPTER_METHODS and self.adapter_dtype == "float32" and compute in ("bf16", "fp16"):
            return "fp32"
        return compute

    def gradient_dtype(self, method: str) -> str:
        """``grad_dtype``, or the trainable weights' dtype."""
        return self.grad_dtype or self.trainable_dtype(method)

    def bytes_of(self, dtype: str) -> float:
        """Bytes per element of a float dtype."""
        return DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class Workload:
    """One training step: ``batch`` sequences of ``seq`` tokens; gradient checkpointing per block;
    ``attention``: fused ``sdpa`` (flash / memory-efficient: no s^2 tensor kept) or ``eager``;
    ``device``: where it runs (CPU dropout keeps wider masks than CUDA)."""

    batch: int = 1
    seq: int = 512
    checkpointing: bool = False
    attention: str = "sdpa"
    device: str = "cuda"

    def __post_init__(self) -> None:
        _positive("workload.batch", self.batch)
        _positive("workload.seq", self.seq)
        if not isinstance(self.checkpointing, bool):
            raise ValueError(f"workload.checkpointing={self.checkpointing!r}: must be true or false")
        _one_of("workload.attention", self.attention, ATTENTIONS)
        _one_of("workload.device", self.device, DEVICES)
