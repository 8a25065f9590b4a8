"""``torch.autocast`` at the entry points of the GEMM-bearing ops.

Autocast rewrites only the aten ops it lists (``linear``, ``mm``, ...) and never an in-place or ``out=``
one, while the torch paths here add the LoRA term in place (``addmm_``) and write chunks into
preallocated buffers, and the Triton kernels are no aten ops at all. Inside autocast they raised on
mixed dtypes or ran in fp32. So each functional entry point does what autocast does to an
``nn.Linear``: the input and the frozen tensors are cast to the autocast dtype, and the node runs with
autocast off. Outside autocast nothing changes.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_dtype", "autocast_off", "cast_to"]


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype in force for ``t``'s device type, or None when autocast is off there."""
    kind = t.device.type
    if not torch.amp.is_autocast_available(kind):  # meta (shape tracing) and others autocast never covers
        return None
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def cast_to(dtype: torch.dtype, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Floating tensors cast to ``dtype`` (differentiably); None, fp64 (which autocast leaves alone) and
    other tensors as they are."""
    return tuple(
        t if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64) else t.to(dtype)
        for t in tensors
    )


def autocast_off(t: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.autocast(t.device.type, enabled=False)
