"""Whole-model conversion: every Linear to NF4 (``quantize_model``) and back (``dequantize_model``).

Both see through slimtune's wrappers (``AdaptedLayer.base_layer``, ``TrainedCopy.original``) and quantize
only frozen base layers, never a layer inside an adapter or a ``modules_to_save`` copy, nor a Linear left
trainable in a partly frozen model; so quantizing before or after ``inject`` gives the same model, and a
4-bit model dequantizes before merging for export.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

from slimtune.layers.base import AdaptedLayer, TrainedCopy
from slimtune.modules import set_submodule
from slimtune.names import suffix_match
from slimtune.quant.linear4bit import Linear4bit, check_dtype
from slimtune.quant.nf4 import check_block_size

_WRAPPED = (".base_layer", ".original")  # the frozen layer inside an AdaptedLayer / TrainedCopy


@dataclass(frozen=True)
class QuantReport:
    """What ``quantize_model`` did and the memory it measured (bytes actually held by tensors).

    quantized_bytes counts packed codes and statistics only; other_bytes every other parameter and buffer
    (embeddings, norms, kept layers, biases, adapters), reported apart.
    """

    quantized: tuple[str, ...]
    kept: tuple[str, ...]
    quantized_params: int
    quantized_bytes: int
    other_params: int
    other_bytes: int

    @property
    def bits_per_param(self) -> float:
        """Measured bits per quantized weight (4.127 for block 64 with double quantization)."""
        return 8.0 * self.quantized_bytes / max(self.quantized_params, 1)

    def __str__(self) -> str:
        mib = 2.0**20
        return (f"slimtune NF4: quantized {len(self.quantized)} linear layers, "
                f"{self.quantized_params:,} weights in {self.quantized_bytes / mib:.2f} MiB "
                f"({self.bits_per_param:.3f} bits/param); kept in full precision: "
                f"{', '.join(self.kept) or 'none'}; other tensors: {self.other_params:,} values in "
                f"{self.other_bytes / mib:.2f} MiB")


def expected_bits_per_param(block_size: int = 64, double_quant: bool = True) -> float:
    """Bits per weight from the layout (QLoRA section 3, "Double Quantization").

    4 bits of code, plus per block of ``block_size`` weights either a float32 absmax (32 / block_size) or an
    8-bit code (8 / block_size) plus a float32 second-level absmax per 256 blocks (32 / (256 * block_size)).
    Block 64 with double quantization: 4 + 8/64 + 32/16384 = 4.127 bits.
    """
    if not double_quant:
        return 4.0 + 32.0 / block_size
    return 4.0 + 8.0 / block_size + 32.0 / (256 * block_size)


def _logical_name(name: str) -> str:
    """The name a user sees: ``layers.0.q_proj`` for ``layers.0.q_proj.base_layer``."""
    for suffix in _WRAPPED:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether module ``name``, seen through a wrapper (``.base_layer``, ``.original``), matches ``patterns``."""
    return suffix_match(_logical_name(name), patterns)


def base_linears(model: nn.Module) -> list[tuple[str, nn.Linear, bool]]:
    """(name, layer, trains) for every ``nn.Linear`` of the base model, i.e. not inside an adapter or a
    ``modules_to_save`` copy. ``trains``: the weight is trainable while other weights of the model are
    frozen (a layer chosen for training, e.g. by the freeze method); in a model that trains everything
    (nothing frozen yet) it is False for every layer."""
    inside = {id(m) for w in model.modules() if isinstance(w, AdaptedLayer) for m in w.adapters.modules()}
    inside |= {id(m) for w in model.modules() if isinstance(w, TrainedCopy) for m in w.copies.modules()}
    some_frozen = any(not p.requires_grad for p in model.parameters())
    return [(n, m, some_frozen and m.weight.requires_grad) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m) not in inside]


def check_quant_args(keep, block_size, double_quant, compute_dtype) -> tuple[str, ...]:
    """Validate ``quantize_model``'s arguments; returns ``keep`` as a tuple. Raises ValueError/TypeError."""
    if isinstance(keep, str):
        keep = (keep,)
    if not isinstance(keep, (tuple, list)) or not all(isinstance(k, str) and k for k in keep):
        raise ValueError(f"keep={keep!r}: must be a tuple of module names (e.g. ('lm_head',))")
    check_block_size(block_size)
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant={double_quant!r}: must be True or False")
    check_dtype(compute_dtype, "compute_dtype")
    return tuple(keep)


def quantize_model(model: nn.Module, keep: tuple[str, ...] = ("lm_head",), block_size: int = 64,
                   double_quant: bool = True, compute_dtype: torch.dtype = torch.float32) -> QuantReport:
    """Replace every frozen base ``nn.Linear`` in ``model`` (in place) by a frozen NF4 :class:`Linear4bit`.

    Layers inside adapters (LoRA, bottleneck) and ``modules_to_save`` copies are never quantized, nor a Linear
    left trainable in a partly frozen model (reported as kept); the layer an adapter wraps is.
    keep: module names (or name suffixes) left in full precision; the output head by default.
    Layers are converted one at a time, so peak memory grows by one layer's float copy at most.
    Raises ValueError for a bad argument, for a ``keep`` entry naming no module (with the closest names),
    or when no Linear is left to quantize.
    """
    keep = check_quant_args(keep, block_size, double_quant, compute_dtype)
    names = [n for n, _ in model.named_modules()]
    for k in keep:
        if not any(matches(n, (k,)) for n in names) and k != "lm_head":
            near = difflib.get_close_matches(k, sorted({n.rsplit(".", 1)[-1] for n in names} | set(names)), n=3)
            raise ValueError(f"keep={k!r} matches no module in {type(model).__name__}; "
                             f"closest names: {', '.join(near) or 'none'}")
    quantized, kept = [], []
    for name, module, trains in base_linears(model):
        if matches(name, keep) or trains:
            kept.append(_logical_name(name))
            continue
        new = Linear4bit.from_linear(module, block_size, double_quant, compute_dtype).train(module.training)
        set_submodule(model, name, new)
        quantized.append(_logical_name(name))
    if not quantized:
        raise ValueError(f"{type(model).__name__} has no nn.Linear left to quantize "
                         f"(keep={keep!r}; the rest is already quantized, trainable, or inside adapters)")
    return measure(model, tuple(quantized), tuple(kept))


def measure(model: nn.Module, quantized: tuple[str, ...] = (), kept: tuple[str, ...] = ()) -> QuantReport:
    """Bytes held by ``model``'s 4-bit layers (codes + statistics) and by everything else, apart."""
    q_params, q_tensors = 0, {}
    for m in model.modules():
        if isinstance(m, Linear4bit):
            q_params += m.in_features * m.out_features
            q_tensors.update((id(t), t) for t in m.quantized_tensors())  # shared NF4/dynamic maps count once
    other = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in q_tensors}.values()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return QuantReport(quantized, kept, q_params, nbytes(q_tensors.values()), sum(t.numel() for t in other),
                       nbytes(other))


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every :class:`Linear4bit` (also inside adapter wrappers) by an ``nn.Linear`` in ``dtype``.

    Afterwards ``slimtune.merge_and_unload(model)`` can merge adapters and the model saves as a plain
    Hugging Face model. Dequantize to float32 and cast after merging to round only once.
    Returns the names of the layers replaced. Raises ValueError for a non-float ``dtype``.
    """
    check_dtype(dtype, "dtype")
    done = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                            device="meta")
            new.weight = nn.Parameter(module.dequantize(dtype), requires_grad=False)
            if module.bias is not None:
                new.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=module.bias.requires_grad)
            set_submodule(model, name, new.train(module.training))
            done.append(_logical_name(name))
    return done
