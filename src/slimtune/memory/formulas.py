"""Bytes-per-parameter rules, each a named pure function citing its source (no torch here)."""

from __future__ import annotations

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": 0.5}
FLOAT_DTYPES = ("fp32", "bf16", "fp16")
QUANT_DTYPES = ("int8", "nf4")


def nf4_bits_per_param(block: int = 64, double_quant: bool = True, block2: int = 256) -> float:
    """Bits per weight of NF4 storage (Dettmers et al. 2023, QLoRA, arXiv:2305.14314, section 3).

    4 bits per weight plus one absmax per ``block`` weights. Without double quantization the absmax is
    fp32: 32/64 = 0.5 bits. With it the absmaxes are themselves 8-bit, with one fp32 constant per
    ``block2`` of them: 8/64 + 32/(64*256) = 0.127 bits, so 4.127 bits in all.
    """
    if not double_quant:
        return 4.0 + 32.0 / block
    return 4.0 + 8.0 / block + 32.0 / (block * block2)


def nf4_layer_bytes(weights: int, block: int = 64, double_quant: bool = True, block2: int = 256) -> int:
    """Exact bytes of one NF4 matrix of ``weights`` values, as slimtune's ``Linear4bit`` (and
    bitsandbytes) stores it: two 4-bit codes per byte, one absmax per ``block`` weights (a partial last
    block counts whole) in 1 B (double quant) or 4 B, and with double quant one fp32 constant per
    ``block2`` absmaxes (again rounded up) plus a 4 B fp32 offset. Shared maps: :func:`nf4_map_bytes`. For large layers this tends to :func:`nf4_bits_per_param` / 8
    per weight."""
    blocks = -(-weights // block)
    codes = (weights + 1) // 2
    if not double_quant:
        return codes + 4 * blocks
    groups = -(-blocks // block2)
    return codes + blocks + 4 * groups + 4


def nf4_map_bytes(double_quant: bool = True) -> int:
    """The lookup tables every NF4 layer shares (held once per device): the 16 fp32 NF4 levels and,
    with double quant, the 256 fp32 values of the 8-bit dynamic map for the absmaxes."""
    return 16 * 4 + (256 * 4 if double_quant else 0)


def int8_bytes(weights: int, rows: int) -> float:
    """LLM.int8 storage (Dettmers et al. 2022, arXiv:2208.07339; bitsandbytes ``Int8Params``):
    one byte per weight plus one fp32 scale per output row."""
    return weights + 4.0 * rows


def optimizer_state_bytes(optimizer: str, optim_dtype: str) -> float:
    """Optimizer state per trainable parameter.

    AdamW (Loshchilov & Hutter 2019) keeps two moments: 2 x 4 B in fp32 (the "8 bytes" of the seeds'
    tables), 2 x 2 B in 16 bits. 8-bit AdamW (Dettmers et al. 2022, arXiv:2110.02861) keeps both moments
    in one byte with an fp32 absmax per 256-value block: 2 + 2*4/256 B. SGD with momentum keeps one
    buffer; ``none`` keeps nothing. torch's per-tensor ``step`` scalars are ignored.
    """
    if optimizer == "adamw":
        return 2 * DTYPE_BYTES[optim_dtype]
    if optimizer == "adamw-8bit":
        return 2 + 2 * 4 / 256
    if optimizer == "sgd":
        return DTYPE_BYTES[optim_dtype]
    return 0.0


def master_weight_bytes() -> float:
    """Mixed-precision training (Micikevicius et al. 2018, arXiv:1710.03740) keeps an fp32 copy of
    every trainable 16-bit weight for the update: 4 B per parameter. Counted with the optimizer, as
    ZeRO (Rajbhandari et al. 2020) does: 2 + 2 + (4 + 4 + 4) = 16 B per parameter."""
    return 4.0


def gb(n: float) -> float:
    """Bytes to GB (1e9 bytes), the unit of the seeds' tables."""
    return n / 1e9


def gib(n: float) -> float:
    """Bytes to GiB (2**30 bytes), the unit of GPU memory sizes."""
    return n / 2**30
