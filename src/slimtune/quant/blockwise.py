"""8-bit blockwise quantization against a 256-level map, in plain PyTorch.

Used twice: for the block maxima of NF4 weights (double quantization, QLoRA section 3) and for the two
moments of the 8-bit AdamW (Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization",
https://arxiv.org/abs/2110.02861). The maps and the rounding are bitsandbytes' CPU ones, bit for bit.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

NESTED_BLOCK_SIZE = 256  # block size of the double quantization and of 8-bit optimizer states
_LUT_SIZE = 65536  # resolution of the 8-bit rounding table (as bitsandbytes' CPU kernel)


def dynamic_map(signed: bool = True) -> Tensor:
    """The (256,) float32 dynamic map (Dettmers 2016), sorted ascending; signed or unsigned. A fresh copy."""
    return _dynamic_map(signed).clone()


@functools.cache
def _dynamic_map(signed: bool, max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """The (2**total_bits,) float32 dynamic quantization map (Dettmers 2016), sorted ascending.

    Each exponent step 10**-k holds a linear grid of fractions; the unsigned map spends the sign bit on
    twice as many fractions, which suits non-negative tensors such as Adam's second moment. Built with the
    same float32 operations as bitsandbytes' ``create_dynamic_map`` so that the values agree bit for bit.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        shift = 0 if signed else 1
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits + shift) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


_lut_cache: dict[tuple[str, tuple[float, ...]], Tensor] = {}


def _rounding_lut(code: Tensor) -> Tensor:
    """(65536,) uint8: index of the nearest ``code`` level for each point of a uniform grid over [-1, 1]."""
    key = (str(code.device), tuple(code.tolist()))
    lut = _lut_cache.get(key)
    if lut is None:
        grid = (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)) / (_LUT_SIZE - 1) - 1.0
        midpoints = 0.5 * (code[:-1] + code[1:])
        lut = torch.searchsorted(midpoints, grid).to(torch.uint8)  # number of midpoints below each grid point
        _lut_cache[key] = lut
    return lut


def quantize_blockwise(x: Tensor, code: Tensor, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """8-bit blockwise quantization of ``x`` against a sorted 256-level ``code``.

    Returns (codes, absmax): codes is uint8 with the shape of ``x``; absmax is (ceil(numel / block_size),)
    float32. NaNs are ignored when taking block maxima; an all-zero block gets code 0 and absmax 0.
    Raises ValueError if ``code`` does not hold 256 values or ``x`` is not floating point.
    """
    if code.numel() != 256:
        raise ValueError(f"code.numel()={code.numel()}: an 8-bit map must hold 256 values")
    if not x.is_floating_point():
        raise ValueError(f"x.dtype={x.dtype}: must be a floating dtype")
    n = x.numel()
    n_blocks = -(-n // block_size)
    blocks = F.pad(x.reshape(-1).float(), (0, n_blocks * block_size - n)).view(n_blocks, block_size)
    absmax = torch.nan_to_num(blocks.abs(), nan=0.0).amax(dim=1)  # (n_blocks,)
    scaled = (blocks * (1.0 / absmax)[:, None]).clamp_(-1.0, 1.0).nan_to_num_(0.0)
    # grid index of each value, rounded half up: ((v + 1) / 2) * 65535 + 0.5, truncated
    grid_idx = scaled.add_(1.0).mul_(0.5).mul_(_LUT_SIZE - 1).add_(0.5).to(torch.int32)
    codes = _rounding_lut(code.to(x.device))[grid_idx.view(-1)].view(n_blocks, block_size)
    codes.masked_fill_((absmax == 0)[:, None], 0)
    flat = codes.view(-1)
    flat = flat[:n].clone() if n < flat.numel() else flat  # do not keep the padded block's bytes alive
    return flat.view(x.shape), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, code: Tensor, block_size: int = 256) -> Tensor:
    """Inverse of :func:`quantize_blockwise`: float32 tensor with the shape of ``codes``."""
    values = code.to(codes.device).index_select(0, codes.reshape(-1).int())  # (n,)
    return scale_blocks(values, absmax, block_size).view(codes.shape)


def scale_blocks(values: Tensor, absmax: Tensor, block_size: int) -> Tensor:
    """Multiply each block of the flat float32 ``values`` by its absmax, in place."""
    n = values.numel()
    full = n - n % block_size
    if full:
        values[:full].view(-1, block_size).mul_(absmax[: full // block_size, None])
    if full < n:
        values[full:].mul_(absmax[full // block_size])
    return values


