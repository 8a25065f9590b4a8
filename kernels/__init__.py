"""fusedtune.kernels: fused Triton LoRA and quantized-weight matmuls, with pure-torch references.

This package never imports ``fusedtune.trainer``.
"""

from .lora import LoRAConfig, lora_linear
from .modules import Backend, LoRALinear

__all__ = ["Backend", "LoRAConfig", "LoRALinear", "lora_linear"]
