"""QLoRA's quantization in plain PyTorch: NF4 with double quantization, a frozen 4-bit linear layer,
whole-model conversion, layer-by-layer loading from safetensors, and merge-for-export helpers.

    report = slimtune.quant.quantize_model(model)          # every Linear but lm_head -> NF4
    slimtune.inject(model, slimtune.LoraConfig(target_modules="all-linear"))
    ...train...
    slimtune.quant.dequantize_model(model, torch.float32); slimtune.merge_and_unload(model)
"""

from slimtune.quant.convert import QuantReport, dequantize_model, expected_bits_per_param, measure, quantize_model
from slimtune.quant.linear4bit import Linear4bit
from slimtune.quant.load import load_quantized
from slimtune.quant.nf4 import NF4_LEVELS, QuantState, block_absmax, dequantize_nf4, quantize_nf4

__all__ = [
    "Linear4bit", "NF4_LEVELS", "QuantReport", "QuantState", "block_absmax", "dequantize_model", "dequantize_nf4",
    "expected_bits_per_param", "load_quantized", "measure", "quantize_model", "quantize_nf4",
]
