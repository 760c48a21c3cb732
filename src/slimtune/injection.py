"""Target matching, wrapping, freezing, and the report of what was done.

``inject(model, config)`` wraps every matching layer in place in an ``AdaptedLayer`` holding one
adapter object, freezes everything that is not an adapter (or a module to save), and returns an
``InjectionReport``. A target that matches nothing is an error suggesting the nearest real names.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from slimtune import merging as merge_math
from slimtune.config import ALL_LINEAR, BottleneckConfig, LoraConfig
from slimtune.layers.amp import adapter_dtype
from slimtune.layers.base import AdaptedLayer, TrainedCopy
from slimtune.layers.bottleneck import BottleneckAdapter, position_of
from slimtune.layers.dora import DoraLinear, dense_weight
from slimtune.layers.dora_conv import DoraConv
from slimtune.layers.lora import LoraConv, LoraEmbedding, LoraLinear
from slimtune.modules import set_submodule
from slimtune.names import suffix_match
from slimtune.params import ParamCounts, count_params
from slimtune.rollback import Rollback, rollback_on_error

AdapterConfig = LoraConfig | BottleneckConfig

CLASSIFIER_HEADS = ("score", "classifier")
_BLOCK_INDEX = re.compile(r"\.(\d+)(\.|$)")


@dataclass(frozen=True)
class WrappedModule:
    name: str
    kind: str  # base layer class name
    shape: tuple[int, ...]  # base weight shape
    r: int
    params: int  # adapter parameters added


@dataclass(frozen=True)
class InjectionReport(ParamCounts):
    """What ``inject`` did: modules wrapped, and trainable vs total parameters after it."""

    adapter_name: str
    method: str
    wrapped: tuple[WrappedModule, ...]
    saved_modules: tuple[str, ...]
    trainable_params: int
    total_params: int

    def __str__(self) -> str:
        lines = [f"slimtune {self.method} adapter {self.adapter_name!r}: wrapped {len(self.wrapped)} modules"]
        shown = self.wrapped if len(self.wrapped) <= 12 else self.wrapped[:6] + self.wrapped[-3:]
        for i, w in enumerate(shown):
            if len(self.wrapped) > 12 and i == 6:
                lines.append(f"  ... {len(self.wrapped) - 9} more ...")
            lines.append(f"  {w.name:<48} {w.kind:<10} {'x'.join(map(str, w.shape)):<14} r={w.r:<4} +{w.params:,}")
        if self.saved_modules:
            lines.append(f"  trained fully and saved with the adapter: {', '.join(self.saved_modules)}")
        lines.append(self.counts_line())
        return "\n".join(lines)


# -- layer kinds ---------------------------------------------------------------------------

def _is_conv1d_transposed(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): a linear whose weight is stored (d_in, d_out). By type,
    # not class name: a subclass counts, an unrelated class that happens to be called Conv1D does not.
    return isinstance(module, Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, GPT-2's Conv1D, or a quantized linear (anything exposing ``dequantize()``)."""
    return (isinstance(module, nn.Linear) or _is_conv1d_transposed(module)
            or (hasattr(module, "in_features") and hasattr(module, "out_features")
                and callable(getattr(module, "dequantize", None))))


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def make_adapter(base: nn.Module, name: str, cfg: AdapterConfig) -> nn.Module:
    """Build the adapter object ``cfg`` asks for, fitting ``base``'s type (module ``name``), on the base's
    device and in ``adapter_dtype(base_dtype, cfg.adapter_dtype)``: fp32 on a bf16/fp16/4-bit base by
    default (as PEFT), the base's (compute) dtype with ``adapter_dtype="base"``."""
    adapter = _build_adapter(base, name, cfg)
    ref = next(base.parameters(), None)
    if ref is not None:
        dtype = ref.dtype if ref.is_floating_point() else getattr(base, "compute_dtype", None)
        adapter.to(device=ref.device, dtype=None if dtype is None else adapter_dtype(dtype, cfg.adapter_dtype))
    return adapter


def _build_adapter(base: nn.Module, name: str, cfg: AdapterConfig) -> nn.Module:
    if isinstance(cfg, BottleneckConfig):
        if not is_linear_like(base):
            raise TypeError(f"bottleneck adapters wrap linear output projections; {name} is a {type(base).__name__}")
        d_out = base.weight.shape[1] if _is_conv1d_transposed(base) else base.out_features
        return BottleneckAdapter(d_out, cfg.size, cfg.nonlinearity, cfg.dropout, cfg.scale)
    r, alpha = cfg.rank_for(name), cfg.alpha_for(name)
    if cfg.rewrites_base and not is_linear_like(base):
        raise TypeError(f"lora.init={cfg.init!r}: supported on linear layers only; {name} is a "
                        f"{type(base).__name__} (exclude it with exclude_modules)")
    if cfg.use_dora:
        kw = dict(dropout=cfg.dropout, use_rslora=cfg.use_rslora, init=_random_init(cfg.init))
        if isinstance(base, (nn.Conv1d, nn.Conv2d)):
            return DoraConv(base, r, alpha, **kw)
        if not is_linear_like(base):
            raise TypeError(f"lora.use_dora=True: supported on linear and conv (Conv1d, Conv2d) layers only; "
                            f"{name} is a {type(base).__name__} (exclude it with exclude_modules)")
        return DoraLinear(base, r, alpha, fan_in_fan_out=_is_conv1d_transposed(base), **kw)
    return make_lora(base, r, alpha, cfg)


def _random_init(init: str) -> str:
    return init if init in ("kaiming", "gaussian") else "kaiming"  # pissa/olora overwrite A, B afterwards


def make_lora(base: nn.Module, r: int, alpha: float, cfg: LoraConfig) -> nn.Module:
    """Build the LoRA adapter object fitting ``base``'s type."""
    kw = dict(r=r, alpha=alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora, init=_random_init(cfg.init))
    if _is_conv1d_transposed(base):
        d_in, d_out = base.weight.shape
        return LoraLinear(d_in, d_out, fan_in_fan_out=True, **kw)
    if is_linear_like(base):
        return LoraLinear(base.in_features, base.out_features, **kw)
    if isinstance(base, nn.Embedding):
        return LoraEmbedding(base.num_embeddings, base.embedding_dim, **kw)
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return LoraConv(base, **kw)
    raise TypeError(f"LoRA cannot wrap a {type(base).__name__}; supported: Linear, Conv1D, "
                    "Embedding, Conv1d, Conv2d and 4-bit linear layers")


def _logical_shape(base: nn.Module) -> tuple[int, ...]:
    """The weight shape as the layer computes with it (a packed 4-bit weight reports (out, in))."""
    if is_linear_like(base) and not _is_conv1d_transposed(base):
        return (base.out_features, base.in_features)
    return tuple(base.weight.shape)


def _supported(module: nn.Module) -> bool:
    return is_linear_like(module) or isinstance(module, (nn.Embedding, nn.Conv1d, nn.Conv2d))


# -- matching ------------------------------------------------------------------------------

def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every layer an adapter could wrap, seeing through existing wrappers."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module
        elif name and _supported(module) and not _inside_wrapper(model, name):
            yield name, module


def _inside_wrapper(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[:i]))
        if isinstance(parent, (AdaptedLayer, TrainedCopy)):
            return True
    return False


def output_head_names(model: nn.Module) -> set[str]:
    """Names excluded from "all-linear", as Hugging Face PEFT does: the output embedding (LM head), or
    for a model without one, a classification head called ``score`` or ``classifier``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    heads = [_base_of(head)] if head is not None else [
        _base_of(m) for m in (getattr(model, a, None) for a in CLASSIFIER_HEADS) if isinstance(m, nn.Module)]
    return {n for n, m in model.named_modules() if any(_base_of(m) is h for h in heads)}


def build_matcher(model: nn.Module, cfg: AdapterConfig) -> Callable[[str, nn.Module], bool]:
    """A predicate (name, module) -> bool for the config's targets, excludes and layer filter."""
    heads = output_head_names(model)
    tm = cfg.target_modules

    def by_target(name: str, base: nn.Module) -> bool:
        if isinstance(cfg, BottleneckConfig) and not tm:
            hit = is_linear_like(base) and position_of(name) in cfg.positions
        elif tm == ALL_LINEAR:
            hit = is_linear_like(base) and name not in heads
        elif isinstance(tm, str):
            hit = re.fullmatch(tm, name) is not None
        else:
            hit = suffix_match(name, tm)
        return hit or type(base).__name__ in cfg.target_types

    def in_layers(name: str) -> bool:
        if not cfg.layers_to_transform:
            return True
        pat = (re.compile(rf"(?:^|\.){re.escape(cfg.layers_pattern)}\.(\d+)(?:\.|$)")
               if cfg.layers_pattern else _BLOCK_INDEX)
        m = pat.search(name)
        return m is not None and int(m.group(1)) in cfg.layers_to_transform

    def match(name: str, module: nn.Module) -> bool:
        return (by_target(name, _base_of(module)) and not suffix_match(name, cfg.exclude_modules)
                and in_layers(name))

    return match


def no_match_error(model: nn.Module, what: Any, field: str) -> ValueError:
    """An error for a target matching nothing, suggesting the nearest real module names."""
    names = [n for n, _ in candidate_modules(model)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = [what] if isinstance(what, str) else list(what)
    near = sorted({c for w in wanted for c in difflib.get_close_matches(str(w), leaves + names, n=3, cutoff=0.5)})
    hint = f"closest real module names: {', '.join(near)}" if near else f"adaptable module names include: {', '.join(leaves[:12])}"
    return ValueError(f"{field}={what!r} matches no adaptable module in {type(model).__name__}; {hint}")


# -- injection -----------------------------------------------------------------------------

def _check_adapter_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"adapter_name={name!r}: must be a non-empty string of letters, digits, '_' or '-'")
    if name in getattr(model, "slimtune_configs", {}):
        raise ValueError(f"adapter_name={name!r}: the model already has an adapter of that name; "
                         "pick another name or slimtune.delete_adapter(model, name) first")


def saved_module_names(model: nn.Module, cfg: Any) -> list[str]:
    """Modules ``cfg.modules_to_save`` names (existing TrainedCopy wrappers included); raises ValueError
    naming the closest real modules when a target matches nothing. Changes nothing."""
    names = []
    for target in cfg.modules_to_save:
        hits = [n for n, m in model.named_modules()
                if n and suffix_match(n, (target,)) and not isinstance(m, AdaptedLayer)
                and not _inside_wrapper(model, n)]
        hits += [n for n, m in model.named_modules() if isinstance(m, TrainedCopy) and suffix_match(n, (target,))]
        if not hits:
            raise no_match_error(model, target, f"{cfg.method}.modules_to_save")
        names += hits
    return names


def wrap_saved_modules(model: nn.Module, cfg: Any, adapter_name: str, log: Rollback) -> tuple[str, ...]:
    """Give ``adapter_name`` a trainable copy of each module to save, recording undo steps in ``log``."""
    saved = []
    for name in saved_module_names(model, cfg):
        module = model.get_submodule(name)
        if not isinstance(module, TrainedCopy):
            original = module
            module = TrainedCopy(original).train(original.training)
            set_submodule(model, name, module)
            log.add(lambda name=name, original=original: set_submodule(model, name, original))
        module.add(adapter_name, trainable_copy(module.original, getattr(cfg, "adapter_dtype", "float32")))
        log.add(lambda module=module: module.remove(adapter_name))
        saved.append(name)
    return tuple(saved)


def trainable_copy(module: nn.Module, choice: str = "float32") -> nn.Module:
    """A fully trainable copy of ``module`` for ``modules_to_save``; the original is left as it is.

    A frozen 4-bit layer (a linear-like module whose weight is not floating point, e.g. one the user
    quantized with ``keep=()``), on its own or inside ``module``, is copied as a dequantized ``nn.Linear``
    (same PEFT key names ``weight``/``bias``) in ``adapter_dtype(compute_dtype, choice)``: fp32 by default,
    since 4-bit codes cannot train.
    """
    if _is_quantized(module):
        return _dequantized_linear(module, choice)
    trained = copy.deepcopy(module)
    for name, sub in list(trained.named_modules()):
        if name and _is_quantized(sub):
            set_submodule(trained, name, _dequantized_linear(sub, choice))
    for p in trained.parameters():
        p.requires_grad_(True)
    return trained


def _is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return is_linear_like(module) and isinstance(weight, Tensor) and not weight.is_floating_point()


def _dequantized_linear(layer: nn.Module, choice: str) -> nn.Linear:
    """An ``nn.Linear`` (trainable) holding ``layer.dequantize()``: weight (out, in), bias (out,)."""
    dtype = adapter_dtype(getattr(layer, "compute_dtype", None) or torch.float32, choice)
    bias = getattr(layer, "bias", None)
    new = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
    with torch.no_grad():
        new.weight = nn.Parameter(layer.dequantize(dtype).detach().clone())
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().to(dtype).clone())
    return new.train(layer.training)


def _apply_bias_mode(model: nn.Module, cfg: LoraConfig, wrapped: list[str]) -> None:
    if cfg.bias == "all":
        # the frozen originals kept beside modules_to_save copies stay frozen (as in PEFT)
        originals = {id(p) for m in model.modules() if isinstance(m, TrainedCopy) for p in m.original.parameters()}
        for name, p in model.named_parameters():
            if name.endswith("bias") and id(p) not in originals:
                p.requires_grad_(True)
    elif cfg.bias == "lora_only":
        for name in wrapped:
            bias = getattr(model.get_submodule(name).base_layer, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)


def inject(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> InjectionReport:
    """Wrap every layer ``config`` targets with a new adapter named ``adapter_name``, in place.

    ``config`` is a LoraConfig (LoRA, DoRA, rsLoRA, PiSSA/OLoRA init) or a BottleneckConfig. Base
    weights are frozen; only adapter parameters, ``modules_to_save`` copies and (per ``config.bias``)
    biases train. Raises ValueError when a target matches nothing (naming the closest real modules)
    or the adapter name is taken; TypeError for a layer the method cannot wrap. Every check (and the
    PiSSA/OLoRA factorization) runs before the model changes; on any error the model is left exactly
    as it was, ``requires_grad`` flags included.
    """
    if not isinstance(config, (LoraConfig, BottleneckConfig)):
        raise TypeError(f"config must be a slimtune.LoraConfig or BottleneckConfig, got {type(config).__name__} "
                        "(slimtune.methods.prepare(model, config) takes every method)")
    _check_adapter_name(model, adapter_name)
    match = build_matcher(model, config)
    targets = [(n, m) for n, m in candidate_modules(model) if match(n, m)]
    if not targets:
        if isinstance(config, BottleneckConfig) and not config.target_modules:
            raise no_match_error(model, config.positions, "bottleneck.positions")
        field = "target_modules" if config.target_modules or not config.target_types else "target_types"
        raise no_match_error(model, config.target_modules or config.target_types, f"{config.method}.{field}")
    adapters = [make_adapter(_base_of(m), n, config) for n, m in targets]  # all checks before any change
    saved_module_names(model, config)
    factors = {}
    if isinstance(config, LoraConfig) and config.rewrites_base:
        factors = {n: principal_factors(_base_of(m), config.init, a.r, a.scale, n)
                   for (n, m), a in zip(targets, adapters)}
    with rollback_on_error(model) as log:
        for p in model.parameters():
            p.requires_grad_(False)
        wrapped = [_attach(model, name, module, adapter, config, adapter_name, log)
                   for (name, module), adapter in zip(targets, adapters)]
        saved = wrap_saved_modules(model, config, adapter_name, log)
        _apply_bias_mode(model, config, [w.name for w in wrapped])
        _set_trainable(model, adapter_name)
        # last: the only step that changes base weights, after everything that can fail
        for (name, module), adapter in zip(targets, adapters):
            if name in factors:
                write_principal(adapter, _base_of(module), *factors[name])
            if isinstance(adapter, (DoraLinear, DoraConv)):
                adapter.init_magnitude(_base_of(module))  # after any init that moved W0, and in the final dtype
    configs = dict(getattr(model, "slimtune_configs", {}))
    model.slimtune_active = tuple(getattr(model, "slimtune_active", tuple(configs))) + (adapter_name,)
    configs[adapter_name] = config
    model.slimtune_configs = configs
    trainable, total = count_params(model)
    return InjectionReport(adapter_name, config.method, tuple(wrapped), saved, trainable, total)


def _attach(model: nn.Module, name: str, module: nn.Module, adapter: nn.Module, config: AdapterConfig,
            adapter_name: str, log: Rollback) -> WrappedModule:
    """Add ``adapter`` to the (new or existing) wrapper at ``name``."""
    base = _base_of(module)  # make_adapter already placed the adapter (device, adapter_dtype)
    adapter.train(base.training)  # a new adapter in an eval() model must not apply dropout
    if not isinstance(module, AdaptedLayer):
        module = AdaptedLayer(base).train(base.training)
        set_submodule(model, name, module)
        log.add(lambda: set_submodule(model, name, base))
    module.add(adapter_name, adapter)
    log.add(lambda: module.remove(adapter_name))
    n_params = sum(p.numel() for p in adapter.adapter_params())
    return WrappedModule(name, type(base).__name__, _logical_shape(base), config.rank_for(name), n_params)


def principal_factors(base: nn.Module, init: str, r: int, scale: float, name: str) -> tuple[Tensor, Tensor]:
    """PiSSA / OLoRA factors of W0 (``dense_weight(base)``, (d_out, d_in)): A (r, d_in), B (d_out, r) in fp32,
    with W0 = W_res + scale * B @ A. Reads the base, changes nothing. Raises TypeError for a base without
    a floating-point weight (a 4-bit base)."""
    weight = getattr(base, "weight", None)
    if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
        raise TypeError(f"lora.init={init!r}: {name} has no floating-point weight to split (a 4-bit base? "
                        "initialize on the full-precision model, then quantize the residual)")
    split = merge_math.pissa_split if init == "pissa" else merge_math.olora_split
    A, B, _ = split(dense_weight(base).detach(), r, scale)
    return A, B


def principal_residual(base: nn.Module, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """W_res = W0 - scale * B @ A in fp32, in the base weight's storage layout (GPT-2 Conv1D: (d_in, d_out))."""
    residual = dense_weight(base).detach().float() - scale * (B @ A)  # as pissa_split/olora_split compute it
    return residual.T if _is_conv1d_transposed(base) else residual


def write_principal(adapter: nn.Module, base: nn.Module, A: Tensor, B: Tensor) -> None:
    """PiSSA / OLoRA: the adapter takes W0's principal part (A, B); W0 becomes the residual."""
    residual = principal_residual(base, A, B, adapter.scale)
    with torch.no_grad():
        adapter.lora_A.copy_(A)
        adapter.lora_B.copy_(B)
        base.weight.copy_(residual)


def _set_trainable(model: nn.Module, adapter_name: str) -> None:
    for module in model.modules():
        if isinstance(module, AdaptedLayer) and adapter_name in module.adapters:
            for p in module.adapters[adapter_name].adapter_params():
                p.requires_grad_(True)
