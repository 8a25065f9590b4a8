"""Triton plumbing shared by the kernel files: interpreter detection, launch helpers, dtype maps.

Without a CUDA device, Triton kernels run under Triton's interpreter (``TRITON_INTERPRET=1``): correct
but slow, which is what the CPU test suite relies on. The switch is read when a ``@triton.jit`` function
is defined, so it is set here, before any kernel module of this package defines one.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton
import triton.language as tl

__all__ = [
    "TORCH_TO_TL",
    "cdiv",
    "exact_fp_options",
    "interpreter_active",
    "next_power_of_2",
    "tl",
    "triton",
]

TORCH_TO_TL = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def interpreter_active() -> bool:
    """True when Triton kernels run under the CPU interpreter instead of compiling for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def exact_fp_options() -> dict:
    """Launch options that keep each fp32 ``a * b + c`` as two roundings (no FMA contraction).

    Needed where a kernel must be bit-exact against a reference that rounds after every multiply
    (bitsandbytes' CPU code): Triton contracts ``mul + add`` into FMA on GPUs by default. The
    interpreter never contracts and does not take the option.
    """
    return {} if interpreter_active() else {"enable_fp_fusion": False}
