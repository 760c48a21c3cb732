"""Whole-model conversion: every Linear to NF4 (``quantize_model``) and back (``dequantize_model``).

Both see through slimtune's wrappers (``AdaptedLayer.base_layer``, ``TrainedCopy.original``) and quantize
only frozen base layers, never a layer inside an adapter or a ``modules_to_save`` copy, nor a Linear left
trainable in a partly frozen model; so quantizing before or after ``inject`` gives the same model, and a
4-bit model dequantizes before merging for export. The output heads stay in full precision by default (as
transformers keeps them for bitsandbytes), and an untrained DoRA adapter gets its magnitude from the 4-bit
weight whichever order ``inject`` and ``quantize_model`` run in.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

from slimtune import merging as merge_math
from slimtune.injection import output_head_names
from slimtune.layers.base import AdaptedLayer, TrainedCopy
from slimtune.layers.dora import DoraLinear, dense_weight
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
        raise ValueError(f"keep={keep!r}: must be a tuple of module names (e.g. ('lm_head',)) or None")
    check_block_size(block_size)
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant={double_quant!r}: must be True or False")
    check_dtype(compute_dtype, "compute_dtype")
    return tuple(keep)


def quantize_model(model: nn.Module, keep: tuple[str, ...] | None = None, block_size: int = 64,
                   double_quant: bool = True, compute_dtype: torch.dtype = torch.float32) -> QuantReport:
    """Replace every frozen base ``nn.Linear`` in ``model`` (in place) by a frozen NF4 :class:`Linear4bit`.

    Layers inside adapters (LoRA, bottleneck) and ``modules_to_save`` copies are never quantized, nor a Linear
    left trainable in a partly frozen model (reported as kept); the layer an adapter wraps is.
    keep: module names (or name suffixes) left in full precision. Default (None): the model's output heads,
    as transformers does for bitsandbytes: the LM head (``get_output_embeddings()``), or for a model without
    one a classification head named ``score`` or ``classifier`` (every Linear inside it). An explicit tuple
    replaces the default (``keep=()`` quantizes the heads too).
    DoRA: an untrained DoRA adapter (lora_B == 0, or its magnitude still ||W0 + s B A||) on a layer quantized
    here gets its magnitude re-initialised from the 4-bit weight, so its output stays the (quantized) base's,
    as when quantizing before ``inject``.
    Layers are converted one at a time, so peak memory grows by one layer's float copy at most.
    Raises ValueError for a bad argument, for a ``keep`` entry naming no module (with the closest names),
    when no Linear is left to quantize, or for a trained DoRA adapter on a layer to quantize (quantizing
    would change its output: quantize before training, or merge first); the model is unchanged then.
    """
    heads = output_head_names(model) if keep is None else set()
    keep = check_quant_args(() if keep is None else keep, block_size, double_quant, compute_dtype)
    _check_keep_names(model, keep)
    quantized, kept, todo = [], [], []
    for name, module, trains in base_linears(model):
        logical = _logical_name(name)
        if trains or matches(name, keep) or any(logical == h or logical.startswith(h + ".") for h in heads):
            kept.append(logical)
        else:
            todo.append((name, module))
    if not todo:
        raise ValueError(f"{type(model).__name__} has no nn.Linear left to quantize "
                         f"(keep={keep or tuple(sorted(heads))!r}; the rest is already quantized, trainable, "
                         "or inside adapters)")
    for name, module in todo:  # every check before the first change
        for adapter_name, adapter in dora_adapters(model, name):
            check_dora_untrained(adapter, module, adapter_name, _logical_name(name))
    for name, module in todo:
        new = Linear4bit.from_linear(module, block_size, double_quant, compute_dtype).train(module.training)
        set_submodule(model, name, new)
        for _, adapter in dora_adapters(model, name):
            adapter.init_magnitude(new)  # m = ||W0' + s B A|| of the weight it now computes with
        quantized.append(_logical_name(name))
    return measure(model, tuple(quantized), tuple(kept))


def _check_keep_names(model: nn.Module, keep: tuple[str, ...]) -> None:
    names = [n for n, _ in model.named_modules()]
    for k in keep:
        if not any(matches(n, (k,)) for n in names) and k != "lm_head":
            near = difflib.get_close_matches(k, sorted({n.rsplit(".", 1)[-1] for n in names} | set(names)), n=3)
            raise ValueError(f"keep={k!r} matches no module in {type(model).__name__}; "
                             f"closest names: {', '.join(near) or 'none'}")


def dora_adapters(model: nn.Module, name: str) -> list[tuple[str, DoraLinear]]:
    """(adapter name, adapter) for the unmerged DoRA adapters wrapping the base layer called ``name``
    (``<layer>.base_layer``); empty for a layer no AdaptedLayer wraps."""
    if not name.endswith(".base_layer"):
        return []
    wrapper = model.get_submodule(name[: -len(".base_layer")])
    if not isinstance(wrapper, AdaptedLayer):
        return []
    return [(n, a) for n, a in wrapper.adapters.items() if isinstance(a, DoraLinear) and n not in wrapper.merged]


def check_dora_untrained(adapter: DoraLinear, base: nn.Module, adapter_name: str, layer: str) -> None:
    """Raise ValueError unless ``adapter`` is still at its initial state on ``base``: lora_B all zero, or
    its magnitude m (d_out,) still equal to ||W0 + s B A|| per row (what ``inject`` set; 1e-6 relative)."""
    if not adapter.lora_B.detach().any():
        return
    with torch.no_grad():
        norm = merge_math.dora_norm(dense_weight(base), adapter.lora_A, adapter.lora_B, adapter.scale)
    m = adapter.magnitude.detach()
    if torch.allclose(m.float(), norm.to(m.dtype).float(), rtol=1e-6, atol=0.0):  # in m's own rounding
        return
    raise ValueError(
        f"quantize_model: {layer} carries a trained DoRA adapter {adapter_name!r} (lora_B and its magnitude "
        "moved from their initial values); DoRA rescales each output row by m / ||W0 + s B A||, so quantizing "
        "W0 under it changes the adapter's output. Quantize before training (quantize_model, then inject), "
        "or merge the adapter first (slimtune.merge_and_unload) and quantize the merged model")


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
