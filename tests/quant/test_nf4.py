"""NF4 and 8-bit blockwise quantization against bitsandbytes (the oracle), bit for bit, on CPU.

bitsandbytes is the oracle for codes and statistics. Dequantized values are checked against the NF4 formula
applied to bitsandbytes' own codes and statistics, not against ``bf.dequantize_4bit``: bitsandbytes 0.50's
CPU dequantize is wrong on AVX-512 machines for some block sizes (e.g. 256 on a 192x576 weight).
"""

from __future__ import annotations

import pytest
import torch

from slimtune.quant import NF4_LEVELS, dequantize_nf4, expected_bits_per_param, quantize_nf4
from slimtune.quant.blockwise import dequantize_blockwise, dynamic_map, quantize_blockwise

bf = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(1,), (7,), (63,), (65,), (129,), (1000, 37), (3, 5, 7), (17, 1), (192, 576), (4097,), (256 * 64 + 1,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def assert_same_as_bnb(x: torch.Tensor, block_size: int, double_quant: bool) -> None:
    q, s = bf.quantize_4bit(x, blocksize=block_size, compress_statistics=double_quant, quant_type="nf4")
    packed, state = quantize_nf4(x, block_size, double_quant)
    assert torch.equal(packed, q)
    assert torch.equal(state.absmax, s.absmax)
    assert torch.equal(state.code, s.code)
    if double_quant:
        assert torch.equal(state.offset, s.offset)
        assert torch.equal(state.nested_absmax, s.state2.absmax)
        assert torch.equal(state.nested_code, s.state2.code)
    ours = dequantize_nf4(packed, state)
    theirs = nf4_formula(q, s, x.shape)
    assert ours.dtype == theirs.dtype == x.dtype and ours.shape == x.shape
    assert torch.equal(_bits(ours), _bits(theirs))


def nf4_formula(q: torch.Tensor, s, shape: tuple[int, ...]) -> torch.Tensor:
    """QLoRA's dequantization from bitsandbytes' codes ``q`` and state ``s``, written out in float32:
    absmax_b = nested_code[absmax_code_b] * nested_absmax_(b // 256) + offset (double quant), then
    value_i = code[nibble_i] * absmax_(i // block), rounded once to the quantized dtype."""
    n = torch.Size(shape).numel()
    nibbles = torch.stack([q.view(-1) >> 4, q.view(-1) & 15], dim=1).view(-1)[:n].long()
    if s.state2 is not None:
        nested = s.state2.absmax.repeat_interleave(s.state2.blocksize)[: s.absmax.numel()]
        absmax = s.state2.code[s.absmax.long()] * nested + s.offset
    else:
        absmax = s.absmax.float()
    values = s.code[nibbles] * absmax.repeat_interleave(s.blocksize)[:n]
    return values.to(s.dtype).view(shape)


def test_the_formula_oracle_agrees_with_bnb_dequantize_where_bnb_is_right():
    # block 64 is right in bitsandbytes' CPU kernel on every machine: the formula reproduces it bit for bit
    torch.manual_seed(0)
    x = torch.randn(192, 576)
    for dq in (True, False):
        q, s = bf.quantize_4bit(x, blocksize=64, compress_statistics=dq, quant_type="nf4")
        assert torch.equal(_bits(nf4_formula(q, s, x.shape)), _bits(bf.dequantize_4bit(q, s)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_shapes_match_bnb(shape, dtype):
    torch.manual_seed(len(shape) * 1000 + shape[0])
    x = torch.randn(shape).to(dtype)
    for block_size, dq in ((32, False), (64, True), (64, False), (256, True), (4096, True)):
        assert_same_as_bnb(x, block_size, dq)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_blocks_outliers_and_ties_match_bnb(dtype):
    torch.manual_seed(0)
    x = torch.randn(5000)
    x[:200] = 0  # all-zero blocks
    x[1000], x[3000] = 1000.0, -50.0  # outliers
    code = torch.tensor(NF4_LEVELS)
    mids = 0.5 * (code[:-1] + code[1:])
    ties = torch.cat([torch.tensor([1.0]), mids, -mids, code]).repeat(8)  # values exactly between two levels
    cases = [x, torch.zeros(777), torch.randn(3000) * 1e-3, torch.rand(4000) * 2 - 1, ties]
    for case in cases:
        for block_size in (32, 64, 2048):
            for dq in (True, False):
                assert_same_as_bnb(case.to(dtype), block_size, dq)


def test_levels_and_packing():
    assert len(NF4_LEVELS) == 16 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[7] == 0.0 and NF4_LEVELS[15] == 1.0
    x = torch.tensor([-1.0, 1.0, 0.0])  # codes 0, 15, 7 -> bytes 0x0F, 0x77 (odd count padded with 0.0's code 7)
    packed, state = quantize_nf4(x, 32, double_quant=False)
    assert packed.view(-1).tolist() == [0x0F, 0x77]
    assert dequantize_nf4(packed, state).tolist() == [-1.0, 1.0, 0.0]


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_8bit_matches_bnb(signed):
    assert torch.equal(dynamic_map(signed), bf.create_dynamic_map(signed=signed))
    code = dynamic_map(signed)
    torch.manual_seed(1)
    for n in (1, 255, 257, 5000):
        x = torch.randn(n)
        x = x if signed else x.square()
        if n > 300:
            x[:256] = 0  # an all-zero block
        q, s = bf.quantize_blockwise(x, code=code, blocksize=256)
        codes, absmax = quantize_blockwise(x, code, 256)
        assert torch.equal(codes, q) and torch.equal(absmax, s.absmax)
        assert torch.equal(dequantize_blockwise(codes, absmax, code, 256), bf.dequantize_blockwise(q, s))


def test_expected_bits_by_hand():
    assert expected_bits_per_param(64, True) == pytest.approx(4.127, abs=5e-4)  # 4 + 0.125 + 0.00195
    assert expected_bits_per_param(64, False) == 4.5
    assert expected_bits_per_param(4096, False) == pytest.approx(4.0078125)


@pytest.mark.parametrize("kwargs, field", [
    ({"block_size": 48}, "block_size=48"), ({"block_size": 8192}, "block_size=8192"),
    ({"block_size": True}, "block_size=True"),
])
def test_bad_block_size(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("=", "=").replace("(", r"\(")):
        quantize_nf4(torch.randn(64), **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="x.dtype=torch.int64"):
        quantize_nf4(torch.arange(64))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.zeros(0))
    packed, state = quantize_nf4(torch.randn(64))
    with pytest.raises(ValueError, match="packed.numel"):
        dequantize_nf4(packed[:5], state)



def test_blockwise_codes_own_only_their_bytes():
    # a tail block is padded for the maths; the returned codes must not keep the padding's storage alive
    codes, absmax = quantize_blockwise(torch.randn(10), dynamic_map(), 256)
    assert codes.untyped_storage().nbytes() == 10 and absmax.numel() == 1
    full, _ = quantize_blockwise(torch.randn(512), dynamic_map(), 256)
    assert full.untyped_storage().nbytes() == 512
