"""fusedtune.kernels: fused Triton LoRA and quantized-weight matmuls, with pure-torch references.

This package never imports ``fusedtune.trainer``.
"""

from .lora import LoRAConfig, lora_linear, lora_linear_torch
from .modules import Backend, LoRALinear, QuantLoRALinear
from .qmatmul import QLoRAConfig, qlora_linear
from .quant import PackedWeight4bit, PackedWeightInt8, dequantize, quantize

__all__ = [
    "Backend",
    "LoRAConfig",
    "LoRALinear",
    "PackedWeight4bit",
    "PackedWeightInt8",
    "QLoRAConfig",
    "QuantLoRALinear",
    "dequantize",
    "lora_linear",
    "lora_linear_torch",
    "qlora_linear",
    "quantize",
]
