"""A frozen NF4 linear layer: packed codes plus quantized statistics, dequantized on the fly.

The layer stores only what bitsandbytes stores (two codes per byte, 8-bit block maxima, their float32
maxima, the two maps and a JSON blob) and serializes under bitsandbytes' key names, so a state dict from
either library loads in the other:

    weight                                   (ceil(out*in / 2), 1) uint8 packed codes
    weight.absmax                            (n_blocks,) uint8 (double quant) or float32
    weight.quant_map                         (16,) float32 NF4 levels
    weight.nested_absmax                     (ceil(n_blocks / 256),) float32   (double quant only)
    weight.nested_quant_map                  (256,) float32 dynamic map        (double quant only)
    weight.quant_state.bitsandbytes__nf4     uint8 bytes of a JSON dict (block sizes, dtype, shape, offset)

Forward and backward dequantize the weight again instead of keeping it for backward, so a 4-bit model's
activation memory does not grow by a full-precision copy of every weight. Only the input (and a trainable
bias) get gradients: the codes are frozen, adapters such as LoRA train on top.

``model.to(torch.bfloat16)`` / ``.half()`` after quantizing casts the bias only: the statistics keep their
dtypes and ``compute_dtype`` is unchanged, as with bitsandbytes' ``Linear4bit``.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.layers.amp import compute_dtype, no_autocast
from slimtune.quant.blockwise import NESTED_BLOCK_SIZE, dynamic_map
from slimtune.quant.nf4 import (FLOAT_DTYPES, QuantState, check_block_size, dequantize_nf4, nf4_code,
                                quantize_nf4)

QS_KEY = "quant_state.bitsandbytes__nf4"
_STAT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class Linear4bitFn(torch.autograd.Function):
    """y = x @ W^T + b with W dequantized in forward and again in backward; nothing weight-sized is saved.

    The maths runs in autocast's dtype under autocast (as ``nn.Linear`` would), else in x's dtype; the
    bias gradient is summed in at least float32 and each gradient comes back in its input's dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, layer: "Linear4bit") -> Tensor:
        dev = x.device.type
        cd = compute_dtype(dev, x.dtype)
        with no_autocast(dev):
            w = layer.dequantize(cd)  # (out, in)
            out = F.linear(x.to(cd), w, None if bias is None else bias.to(cd))
        ctx.layer, ctx.cd, ctx.x_dtype = layer, cd, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g.to(ctx.cd) @ ctx.layer.dequantize(ctx.cd)).to(ctx.x_dtype)  # (..., in)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            acc = torch.promote_types(g.dtype, torch.float32)
            grad_b = g.reshape(-1, g.shape[-1]).to(acc).sum(0).to(ctx.bias_dtype)  # (out,)
        return grad_x, grad_b, None


class Linear4bit(nn.Module):
    """A frozen NF4 linear layer. ``weight`` holds packed uint8 codes; use ``dequantize()`` for the matrix.

    Build one with :meth:`from_linear` (or :meth:`from_weight`); the plain constructor makes an empty
    layer whose codes and statistics come from ``load_state_dict`` (bitsandbytes' layout).
    Input (..., in_features) in any float dtype -> output (..., out_features) in the input's dtype,
    computed in ``compute_dtype``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                 quant_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        for field, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r}: must be a positive integer")
        check_block_size(block_size)
        check_dtype(compute_dtype, "compute_dtype")
        check_dtype(quant_dtype, "quant_dtype")
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.double_quant = block_size, bool(double_quant)
        self.compute_dtype, self.quant_dtype = compute_dtype, quant_dtype
        n = in_features * out_features
        n_blocks = -(-n // block_size)
        self.weight = nn.Parameter(torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        # statistics: buffers so .to(device) moves them; saved by _save_to_state_dict under bnb's names
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8 if double_quant else torch.float32,
                                                   device=device), persistent=False)
        self.register_buffer("quant_map", _shared_map(nf4_code(device)), persistent=False)
        if double_quant:
            self.register_buffer("nested_absmax", torch.zeros(-(-n_blocks // NESTED_BLOCK_SIZE), device=device),
                                 persistent=False)
            self.register_buffer("nested_quant_map", _shared_map(dynamic_map(True).to(device)),
                                 persistent=False)
            self.register_buffer("offset", torch.zeros((), device=device), persistent=False)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None, block_size: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype = torch.float32) -> "Linear4bit":
        """Quantize a (out_features, in_features) float weight (and keep ``bias`` in ``compute_dtype``)."""
        if weight.dim() != 2:
            raise ValueError(f"weight.shape={tuple(weight.shape)}: must be (out_features, in_features)")
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bias is not None, block_size, double_quant, compute_dtype,
                    quant_dtype=weight.dtype if weight.dtype in FLOAT_DTYPES else torch.float32,
                    device=weight.device)
        packed, state = quantize_nf4(weight.detach(), block_size, double_quant)
        layer._set_state(packed, state)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(compute_dtype).clone(), requires_grad=bias.requires_grad)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.float32) -> "Linear4bit":
        """A 4-bit copy of ``linear`` (its weight is quantized; its bias kept in ``compute_dtype``)."""
        return cls.from_weight(linear.weight, linear.bias, block_size, double_quant, compute_dtype)

    def _set_state(self, packed: Tensor, state: QuantState) -> None:
        self.weight.data = packed
        self.block_size, self.double_quant, self.quant_dtype = state.block_size, state.nested, state.dtype
        nested = {"nested_absmax": state.nested_absmax, "nested_quant_map": _shared_map(state.nested_code),
                  "offset": state.offset}
        for name, value in {"absmax": state.absmax, "quant_map": _shared_map(state.code), **nested}.items():
            if value is None:
                self._buffers.pop(name, None)
            else:
                self.register_buffer(name, value, persistent=False)

    def load_float_weight(self, weight: Tensor, prefix: str = "") -> None:
        """Quantize a float (out_features, in_features) ``weight`` into this layer (its settings kept)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{prefix}weight.shape={list(weight.shape)}: this layer is "
                             f"[{self.out_features}, {self.in_features}]")
        packed, state = quantize_nf4(weight.detach().to(self.weight.device), self.block_size, self.double_quant)
        self._set_state(packed, state)

    # -- maths -------------------------------------------------------------------------
    @property
    def quant_state(self) -> QuantState:
        """The statistics as a :class:`QuantState` (views of this layer's buffers)."""
        nested = self.double_quant
        return QuantState(
            absmax=self.absmax, shape=(self.out_features, self.in_features), dtype=self.quant_dtype,
            block_size=self.block_size, code=self.quant_map, offset=self.offset if nested else None,
            nested_absmax=self.nested_absmax if nested else None,
            nested_code=self.nested_quant_map if nested else None)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out_features, in_features) weight in ``dtype`` (default ``compute_dtype``)."""
        return dequantize_nf4(self.weight, self.quant_state, dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        in_dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = Linear4bitFn.apply(x.to(self.compute_dtype), bias, self)
        return out.to(in_dtype)

    def _apply(self, fn, recurse: bool = True):
        """Move the layer like any module, but never cast its quantization statistics.

        ``model.to(torch.bfloat16)`` / ``.half()`` cast every floating buffer; the NF4 map, the
        nested maxima and maps and the offset must stay float32 (a bf16 NF4 map dequantizes to other
        values). They follow the codes' device instead; the bias is cast like any parameter. As in
        bitsandbytes, whose statistics live outside the module's buffers, ``compute_dtype`` is
        unchanged by a cast: set it with ``quantize_model(..., compute_dtype=)``.
        """
        stats, self._buffers = self._buffers, {}  # every buffer of this layer is quantization state
        try:
            super()._apply(fn, recurse)  # codes (uint8: never cast) and bias
        except BaseException:
            self._buffers = stats
            raise
        for name, t in stats.items():
            new = None if t is None else fn(t)
            if new is not None and new.dtype != t.dtype:  # a dtype cast: only the device follows
                new = t.to(new.device)
            self._buffers[name] = _shared_map(new) if name.endswith("quant_map") else new
        return self

    def quantized_tensors(self) -> list[Tensor]:
        """The packed codes and every statistics tensor (not the bias)."""
        return [self.weight] + [b for n, b in self._buffers.items() if b is not None]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")

    # -- bitsandbytes' serialization layout ---------------------------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight and bias
        for k, v in self.bnb_stats().items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def bnb_stats(self) -> dict[str, Tensor]:
        """The statistics under bitsandbytes' names (without the ``weight.`` prefix)."""
        meta: dict[str, Any] = {"quant_type": "nf4", "blocksize": self.block_size,
                                "dtype": _DTYPE_NAMES[self.quant_dtype],
                                "shape": [self.out_features, self.in_features]}
        # maps are shared between layers in memory; state dicts get copies (safetensors refuses shared storage)
        stats = {"absmax": self.absmax, "quant_map": self.quant_map.clone()}
        if self.double_quant:
            stats.update(nested_absmax=self.nested_absmax, nested_quant_map=self.nested_quant_map.clone())
            meta.update(nested_blocksize=NESTED_BLOCK_SIZE, nested_dtype="float32",
                        nested_offset=float(self.offset))
        stats[QS_KEY] = pack_json(meta)
        return stats

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        weight = state_dict.get(prefix + "weight")
        try:
            if prefix + "weight." + QS_KEY in state_dict:
                self.load_bnb(state_dict, prefix)
            elif prefix + "weight.quant_state.bitsandbytes__fp4" in state_dict:
                raise ValueError(f"{prefix}weight: quant_type='fp4': only NF4 checkpoints are supported")
            elif weight is not None and weight.is_floating_point():  # a plain Linear's weight: quantize it
                self.load_float_weight(weight, prefix)
            else:
                missing_keys.append(prefix + "weight." + QS_KEY)
        except ValueError as e:
            error_msgs.append(str(e))
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                self.bias.data = state_dict[prefix + "bias"].detach().to(self.bias.device, self.compute_dtype).clone()
            else:
                missing_keys.append(prefix + "bias")
        if strict:  # as nn.Module does: a key is unexpected unless it starts with weight or bias
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix)
                                   and k[len(prefix):].split(".", 1)[0] not in ("weight", "bias"))

    def load_bnb(self, sd: dict[str, Tensor], prefix: str = "") -> None:
        """Take codes and statistics from ``sd`` in bitsandbytes' layout. Raises ValueError if they don't fit."""
        meta = unpack_json(sd[prefix + "weight." + QS_KEY])
        where = f"{prefix}weight"
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"{where}: quant_type={meta.get('quant_type')!r}: only 'nf4' is supported")
        shape = tuple(meta.get("shape") or ())
        if shape != (self.out_features, self.in_features):
            raise ValueError(f"{where}: shape={list(shape)}: this layer is "
                             f"[{self.out_features}, {self.in_features}]")
        check_block_size(meta.get("blocksize"), f"{where}.blocksize")
        dtype = getattr(torch, str(meta.get("dtype")), None)
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{where}: dtype={meta.get('dtype')!r}: must be float32, float16 or bfloat16")
        nested = prefix + "weight.nested_absmax" in sd
        for k in _STAT_KEYS[:2] + (_STAT_KEYS[2:] if nested else ()):
            if prefix + "weight." + k not in sd:
                raise ValueError(f"{where}.{k}: missing from the state dict (bitsandbytes' NF4 layout needs it)")
        if nested and meta.get("nested_blocksize") != NESTED_BLOCK_SIZE:
            raise ValueError(f"{where}: nested_blocksize={meta.get('nested_blocksize')!r}: must be {NESTED_BLOCK_SIZE}")
        packed = sd[prefix + "weight"].detach()
        n = self.in_features * self.out_features
        if packed.numel() != (n + 1) // 2:
            raise ValueError(f"{where}: {packed.numel()} bytes of codes: expected {(n + 1) // 2}")
        dev = self.weight.device
        get = lambda k: sd[prefix + "weight." + k].detach().to(dev).clone()  # noqa: E731
        state = QuantState(
            absmax=get("absmax"), shape=shape, dtype=dtype, block_size=meta["blocksize"],
            code=get("quant_map").float(),
            offset=torch.tensor(float(meta["nested_offset"]), device=dev) if nested else None,
            nested_absmax=get("nested_absmax").float() if nested else None,
            nested_code=get("nested_quant_map").float() if nested else None)
        self._set_state(packed.view(torch.uint8).reshape(-1, 1).to(dev).clone(), state)


_maps: dict[tuple[str, int], list[Tensor]] = {}


def _shared_map(code: Tensor | None) -> Tensor | None:
    """One tensor per device for each distinct map, so 200 layers hold the NF4 levels once, not 200 times."""
    if code is None or code.is_meta:
        return code
    for known in _maps.setdefault((str(code.device), code.numel()), []):
        if torch.equal(known, code):
            return known
    _maps[(str(code.device), code.numel())].append(code)
    return code


def check_dtype(dtype: Any, field: str) -> None:
    """Raise ValueError naming ``field`` unless ``dtype`` is float32, float16 or bfloat16."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{field}={dtype!r}: must be torch.float32, torch.float16 or torch.bfloat16")


def pack_json(meta: dict[str, Any]) -> Tensor:
    """A dict as a uint8 tensor of its JSON bytes (bitsandbytes' ``pack_dict_to_tensor``)."""
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def unpack_json(t: Tensor) -> dict[str, Any]:
    """Inverse of :func:`pack_json`. Raises ValueError for bytes that are not a JSON object."""
    try:
        meta = json.loads(bytes(t.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{QS_KEY}: not a JSON object ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{QS_KEY}: must hold a JSON object, got {type(meta).__name__}")
    return meta
