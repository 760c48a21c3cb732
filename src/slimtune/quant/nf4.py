"""NF4 quantization with double quantization, in plain PyTorch (any device, no compiled code).

The maths follows QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314):

* weights are cut into blocks of ``block_size`` consecutive values (row-major order), each block is divided
  by its absolute maximum and every value is rounded to the nearest of the 16 NormalFloat levels;
* two 4-bit codes share a byte, the first value in the high nibble;
* with double quantization, the float32 block maxima are shifted by their mean and quantized again to 8 bits
  with the dynamic map of Dettmers (2016, https://arxiv.org/abs/1511.04561), in blocks of 256.

Codes, statistics and dequantized values are bit for bit those of ``bitsandbytes.functional.quantize_4bit`` /
``dequantize_4bit`` on CPU (checked in ``tests/quant/test_nf4.py``): the 4-bit rounding uses midpoints between
levels (ties go to the lower level) and the 8-bit rounding goes through the same 65,536-entry lookup table as
bitsandbytes' CPU kernel. The same functions run unchanged on CUDA tensors. (bitsandbytes' CUDA kernel rounds
the nested 8-bit statistics with an exact nearest-level search instead, so on GPU a few block scales can
differ from bitsandbytes' by one 8-bit step; 4-bit codes are unaffected.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from slimtune.quant.blockwise import NESTED_BLOCK_SIZE, dequantize_blockwise, dynamic_map, quantize_blockwise, scale_blocks

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA, appendix E).
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK_SIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True, eq=False)
class QuantState:
    """Everything needed to dequantize packed NF4 codes.

    absmax: (n_blocks,) uint8 codes of the block maxima when ``nested``, else float32 block maxima.
    shape / dtype: shape and floating dtype of the tensor that was quantized.
    code: (16,) float32 NF4 levels.
    offset: () float32 mean subtracted from the block maxima before the 8-bit step (nested only).
    nested_absmax: (ceil(n_blocks / 256),) float32 maxima of the shifted block maxima (nested only).
    nested_code: (256,) float32 signed dynamic map (nested only).
    """

    absmax: Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_size: int
    code: Tensor
    offset: Tensor | None = None
    nested_absmax: Tensor | None = None
    nested_code: Tensor | None = None
    nested_block_size: int = NESTED_BLOCK_SIZE

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> QuantState:
        """A copy with every tensor on ``device`` (dtypes unchanged)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantState(
            absmax=move(self.absmax), shape=self.shape, dtype=self.dtype, block_size=self.block_size,
            code=move(self.code), offset=move(self.offset), nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code), nested_block_size=self.nested_block_size,
        )

    def nbytes(self) -> int:
        """Bytes held by the statistics (not the packed codes)."""
        tensors = (self.absmax, self.code, self.offset, self.nested_absmax, self.nested_code)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def check_block_size(block_size: int, name: str = "block_size") -> None:
    """Raise ValueError unless ``block_size`` is one of BLOCK_SIZES."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(f"{name}={block_size!r}: must be a power of two between 32 and 4096")


def nf4_code(device: torch.device | str | None = None) -> Tensor:
    """The 16 NF4 levels as a (16,) float32 tensor."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def quantize_nf4(x: Tensor, block_size: int = 64, double_quant: bool = True) -> tuple[Tensor, QuantState]:
    """Quantize ``x`` to NF4, two codes per byte.

    Returns (packed, state): packed is (ceil(numel / 2), 1) uint8 (bitsandbytes' layout), the first value of
    each pair in the high nibble; an odd element count is padded with the code of 0.0.
    Raises ValueError for a block size outside BLOCK_SIZES, a non-float dtype or an empty tensor.
    """
    check_block_size(block_size)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x.dtype={x.dtype}: must be float32, float16 or bfloat16")
    if x.numel() == 0:
        raise ValueError(f"x.shape={tuple(x.shape)}: cannot quantize an empty tensor")
    code = nf4_code(x.device)
    flat = x.reshape(-1).float()  # (n,)
    n = flat.numel()
    full = n - n % block_size
    absmax = flat[:full].view(-1, block_size).abs().amax(dim=1)  # (n_full_blocks,)
    scaled = (flat[:full].view(-1, block_size) * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)
    if full < n:
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, flat[full:] / tail_max])
    scaled = scaled.clamp_(-1.0, 1.0)
    if n % 2:
        scaled = F.pad(scaled, (0, 1))
    # nearest level; a value exactly on a midpoint goes to the lower level
    nibbles = torch.bucketize(scaled, 0.5 * (code[:-1] + code[1:]), out_int32=True).to(torch.uint8)
    packed = (nibbles[::2] << 4 | nibbles[1::2]).unsqueeze(1)  # (ceil(n / 2), 1)

    if not double_quant:
        return packed, QuantState(absmax=absmax, shape=tuple(x.shape), dtype=x.dtype,
                                  block_size=block_size, code=code)
    offset = absmax.mean()
    nested_code = dynamic_map(True).to(x.device)
    qabsmax, nested_absmax = quantize_blockwise(absmax - offset, nested_code)
    return packed, QuantState(
        absmax=qabsmax, shape=tuple(x.shape), dtype=x.dtype, block_size=block_size, code=code,
        offset=offset, nested_absmax=nested_absmax, nested_code=nested_code,
    )


def block_absmax(state: QuantState) -> Tensor:
    """(n_blocks,) float32 block maxima, undoing the double quantization when there is one.

    level * nested absmax, then + offset, each rounded to float32 as bitsandbytes does.
    """
    if not state.nested:
        return state.absmax.float()
    absmax = state.nested_code.index_select(0, state.absmax.int())  # (n_blocks,) levels
    return scale_blocks(absmax, state.nested_absmax, state.nested_block_size).add_(state.offset)


_pair_cache: dict[tuple[str, tuple[float, ...]], Tensor] = {}


def _pair_table(code: Tensor) -> Tensor:
    """(256,) int64 whose bytes are the float32 pair (code[b >> 4], code[b & 15]) for each byte b."""
    key = (str(code.device), tuple(code.tolist()))
    table = _pair_cache.get(key)
    if table is None:
        b = torch.arange(256, device=code.device)
        table = torch.stack([code[b >> 4], code[b & 15]], dim=1).contiguous().view(torch.int64).view(256)
        _pair_cache[key] = table
    return table


def dequantize_nf4(packed: Tensor, state: QuantState, dtype: torch.dtype | None = None) -> Tensor:
    """Values of ``state.shape`` in ``dtype`` (default: the dtype that was quantized).

    Each value is level * block absmax computed in float32, then rounded once to ``dtype``.
    Raises ValueError if ``packed`` does not hold ceil(numel / 2) bytes.
    """
    n = state.numel
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed.numel()={packed.numel()}: expected {(n + 1) // 2} bytes for shape {state.shape}")
    # one gather of 8 bytes per packed byte = two float32 levels, high nibble first
    pairs = _pair_table(state.code).index_select(0, packed.reshape(-1).view(torch.uint8).int())
    values = pairs.view(torch.float32)[:n]  # (n,)
    scale_blocks(values, block_absmax(state), state.block_size)
    dtype = dtype or state.dtype
    return values.view(state.shape) if dtype == torch.float32 else values.to(dtype).view(state.shape)
