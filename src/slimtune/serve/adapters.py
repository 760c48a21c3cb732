"""Reading an adapter folder for serving: slimtune's reader and checks, then what batching needs.

``files.read_folder`` reads only JSON and safetensors and checks the config, the tensors (floating point,
finite) and slimtune's manifest. On top, an adapter served in a mixed batch must be a low-rank update
y += s (x A^T) B^T of Linear-like layers, or DoRA's form of it; everything else is refused with the reason
(``AdapterRefused``):

- DoRA is served, batched: at inference its per-row rescaling c = m / ||W0 + s B A|| (d_out,) is a constant,
  computed here once from the served base's weight, and the layer adds (c - 1) * (W0 x) + c * s B A x, the
  same expression PEFT's DoRA layer computes.
- Bottleneck adapters are served, batched: h + s up(act(down(h))) on a layer's output is a per-row function of
  that row's own output (serve.bottleneck).
- Prompt tuning prepends virtual tokens (changing every row's length), ``modules_to_save`` replaces whole modules
  per adapter, and trained biases replace the base's bias: none is a per-row term of a shared layer.
- PiSSA/OLoRA files are relative to a *rewritten* base (W0 - s B0 A0), which a shared base cannot be.
A base-model fingerprint that does not match, or an adapter trained on an NF4 base served on a float base (or
back), is ``BaseMismatch``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtune import fingerprint
from slimtune.config import BottleneckConfig, LoraConfig
from slimtune.files import PREFIX, AdapterFileError, read_folder
from slimtune.injection import is_linear_like
from slimtune.layers.dora import dense_weight
from slimtune.merging import dora_norm, lora_scale
from slimtune.serve.layer import MultiLoraLinear, linear_dims

LORA_KEYS = ("lora_A.weight", "lora_B.weight")
MAGNITUDE_KEY = "lora_magnitude_vector"  # DoRA's m (d_out,), as PEFT and slimtune write it
BOTTLENECK_KEYS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


class AdapterRefused(ValueError):
    """The adapter is valid but cannot be served in a mixed batch (the message says why)."""


class BaseMismatch(ValueError):
    """The adapter was trained on another base model or another quantization scheme of it."""


@dataclass(frozen=True)
class LoraWeights:
    """One module's update: A (r, d_in), B (d_out, r), scale s; for DoRA, ``column_scale`` c (d_out,) =
    m / ||W0 + s B A|| per output row (None for LoRA)."""

    A: Tensor
    B: Tensor
    scale: float
    column_scale: Tensor | None = None


@dataclass(frozen=True)
class BottleneckWeights:
    """One layer's bottleneck adapter: down (m, d) + down_bias (m,), up (d, m) + up_bias (d,), scale s, the
    nonlinearity's name."""

    down: Tensor
    down_bias: Tensor
    up: Tensor
    up_bias: Tensor
    scale: float
    nonlinearity: str


@dataclass(frozen=True)
class ServableAdapter:
    """A validated adapter: module name (as in the base model) -> its LoRA / DoRA or bottleneck weights."""

    path: str
    config: LoraConfig | BottleneckConfig
    modules: dict[str, LoraWeights | BottleneckWeights]


def read_servable(path: str | os.PathLike, model: nn.Module, bases: dict[str, nn.Module]) -> ServableAdapter:
    """Read and check the adapter folder at ``path`` against ``model``, whose Linear-like base layers by module name
    are ``bases``. Raises AdapterFileError (a bad folder), AdapterRefused (not batchable, with the reason) or
    BaseMismatch (another base). Reads only; the model is untouched."""
    folder = read_folder(path)
    config = folder.config
    refuse_unbatchable(config, folder.config_path)
    if isinstance(config, BottleneckConfig):
        weights = bottleneck_modules(folder.tensors, config, bases, folder.weights_path)
        if folder.fingerprint is not None:
            check_base(folder.fingerprint, model, {n: bases[n] for n in weights}, folder.weights_path)
        return ServableAdapter(str(path), config, weights)
    modules, magnitudes = lora_modules(folder.tensors, folder.weights_path)
    weights = {}
    for name, (A, B) in modules.items():
        base = bases.get(name)
        if base is None:
            kind = type(model.get_submodule(name)).__name__ if _has(model, name) else None
            raise AdapterRefused(f"{folder.weights_path}: module {name!r} " + (
                f"is a {kind}; only Linear-like layers are served" if kind else "does not exist in this model"))
        d_in, d_out = linear_dims(base)
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != d_in or B.shape[0] != d_out or A.shape[0] != B.shape[1]:
            raise AdapterFileError(f"{folder.weights_path}: {name} has lora_A {tuple(A.shape)} and lora_B "
                                   f"{tuple(B.shape)}; this model needs (r, {d_in}) and ({d_out}, r)")
        r = A.shape[0]
        scale = lora_scale(config.alpha_for(name), r, config.use_rslora)
        weights[name] = LoraWeights(A.float(), B.float(), scale, dora_column_scale(
            magnitudes.get(name), base, A, B, scale, folder.weights_path, name) if config.use_dora else None)
    if folder.fingerprint is not None:
        check_base(folder.fingerprint, model, {n: bases[n] for n in weights}, folder.weights_path)
    return ServableAdapter(str(path), config, weights)


def dora_column_scale(m: Tensor | None, base: nn.Module, A: Tensor, B: Tensor, scale: float, where: object,
                      name: str) -> Tensor:
    """DoRA's inference constant c = m / ||W0 + s B A|| (d_out,), fp32, from the base layer's (dequantized)
    weight. AdapterFileError when the magnitude is missing or not (d_out,)."""
    W0 = dense_weight(base)  # (d_out, d_in)
    if m is None or tuple(m.shape) != (W0.shape[0],):
        raise AdapterFileError(f"{where}: DoRA module {name!r} needs {MAGNITUDE_KEY} of shape ({W0.shape[0]},), "
                               f"found {None if m is None else tuple(m.shape)}")
    with torch.no_grad():
        return m.float() / dora_norm(W0.float(), A.float(), B.float(), scale)


def bottleneck_modules(tensors: dict[str, Tensor], config: BottleneckConfig, bases: dict[str, nn.Module],
                       where: object) -> dict[str, BottleneckWeights]:
    """Module name -> BottleneckWeights from keys ``base_model.model.<module>.adapter_{down,up}.{weight,bias}``.
    AdapterRefused for another tensor or a module that is not a Linear-like layer here; AdapterFileError for a
    missing part or a shape that does not fit the layer."""
    found: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        suffix = next((s for s in BOTTLENECK_KEYS if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise AdapterRefused(f"{where}: tensor {key!r} is not part of a bottleneck adapter")
        found.setdefault(key[len(PREFIX):-len(suffix) - 1], {})[suffix] = t
    if not found:
        raise AdapterFileError(f"{where}: holds no bottleneck tensors")
    out = {}
    for name, parts in found.items():
        if name not in bases:
            raise AdapterRefused(f"{where}: module {name!r} is not a Linear-like layer of this model")
        missing = [k for k in BOTTLENECK_KEYS if k not in parts]
        if missing:
            raise AdapterFileError(f"{where}: module {name!r} lacks {missing}")
        d = linear_dims(bases[name])[1]
        dw, db, uw, ub = (parts[k] for k in BOTTLENECK_KEYS)
        m = dw.shape[0]
        if dw.shape != (m, d) or db.shape != (m,) or uw.shape != (d, m) or ub.shape != (d,):
            raise AdapterFileError(f"{where}: module {name!r}: adapter_down {tuple(dw.shape)} + {tuple(db.shape)}, "
                                   f"adapter_up {tuple(uw.shape)} + {tuple(ub.shape)} do not fit its output width {d}")
        out[name] = BottleneckWeights(dw.float(), db.float(), uw.float(), ub.float(), config.scale,
                                      config.nonlinearity)
    return out


def refuse_unbatchable(config: object, where: object) -> None:
    """AdapterRefused naming what makes ``config`` unservable in a mixed batch (see the module docstring)."""
    if isinstance(config, BottleneckConfig):
        if config.modules_to_save:
            raise AdapterRefused(f"{where}: cannot be served in a mixed batch: modules_to_save="
                                 f"{list(config.modules_to_save)} (whole modules replaced per adapter)")
        return
    if not isinstance(config, LoraConfig):
        method = getattr(config, "method", type(config).__name__)
        raise AdapterRefused(f"{where}: a {method} adapter changes the input rather than a layer's output (prompt "
                             "tuning prepends virtual tokens), so it cannot share a batch with others; LoRA, DoRA "
                             "and bottleneck adapters are served")
    reasons = []
    if config.rewrites_base:
        reasons.append(f"init={config.init!r} (the file is relative to a rewritten base weight)")
    if config.modules_to_save:
        reasons.append(f"modules_to_save={list(config.modules_to_save)} (whole modules replaced per adapter)")
    if config.bias != "none":
        reasons.append(f"bias={config.bias!r} (trained biases replace the shared base's)")
    if reasons:
        raise AdapterRefused(f"{where}: cannot be served in a mixed batch: {'; '.join(reasons)}")


def lora_modules(tensors: dict[str, Tensor], where: object) -> tuple[dict[str, tuple[Tensor, Tensor]],
                                                                      dict[str, Tensor]]:
    """(module name -> (A, B), module name -> DoRA magnitude) from PEFT keys
    ``base_model.model.<module>.lora_A.weight`` / ``.lora_magnitude_vector``. AdapterRefused for any other tensor
    (an embedding or conv LoRA, a bias); AdapterFileError for an A without its B or a magnitude without both."""
    found: dict[str, dict[str, Tensor]] = {}
    magnitudes: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if key.startswith(PREFIX) and key.endswith("." + MAGNITUDE_KEY):
            magnitudes[key[len(PREFIX):-len(MAGNITUDE_KEY) - 1]] = t
            continue
        suffix = next((s for s in LORA_KEYS if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise AdapterRefused(f"{where}: tensor {key!r} is not a LoRA A/B of a linear layer; only those are "
                                 "served in a mixed batch")
        found.setdefault(key[len(PREFIX):-len(suffix) - 1], {})[suffix] = t
    if not found:
        raise AdapterFileError(f"{where}: holds no LoRA tensors")
    out = {}
    for name, pair in found.items():
        if len(pair) != 2:
            raise AdapterFileError(f"{where}: module {name!r} has {list(pair)} but not both of {list(LORA_KEYS)}")
        out[name] = (pair[LORA_KEYS[0]], pair[LORA_KEYS[1]])
    stray = sorted(set(magnitudes) - set(out))
    if stray:
        raise AdapterFileError(f"{where}: module {stray[0]!r} has a {MAGNITUDE_KEY} but no lora_A/lora_B")
    return out, magnitudes


def check_base(saved: fingerprint.Fingerprint, model: nn.Module, bases: dict[str, nn.Module], where: object) -> None:
    """BaseMismatch when the fingerprint of the layers the adapter targets differs from the one saved, or the
    adapter was trained on a 4-bit (NF4) base and this one is not, or back."""
    current = fingerprint.compute(model, list(bases.items()))
    for name, fmt in saved.formats.items():
        now = current.formats.get(name)
        if now is not None and fmt.startswith("nf4") != now.startswith("nf4"):
            raise BaseMismatch(
                f"{where}: adapter was trained on a {_scheme(fmt)} base, this server's base is {_scheme(now)} "
                f"(e.g. {name}); serve it on a base quantized the same way (slimtune serve --quantize nf4 or not)")
    try:
        fingerprint.check(saved, current)
    except fingerprint.BaseModelMismatch as e:
        raise BaseMismatch(f"{where}: {e}") from None


def _scheme(fmt: str) -> str:
    return "4-bit NF4" if fmt.startswith("nf4") else f"{fmt} (not quantized)"


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> every Linear-like layer of ``model`` (seeing through serving wrappers)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MultiLoraLinear):
            out[name] = module.base_layer
        elif name and is_linear_like(module) and not name.endswith(".base_layer"):
            out[name] = module
    return out
