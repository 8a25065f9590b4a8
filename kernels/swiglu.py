"""SwiGLU gate: ``silu(G) ⊙ U``, saving only its two inputs.

The gated MLP of Llama-style models computes ``down(silu(gate(x)) ⊙ up(x))``. Through autograd the
product keeps ``silu(G)`` for backward besides G and U: a third ``[tokens, intermediate]`` tensor per
layer, the widest activation of the block. Here the forward is one pass writing the product, only G and
U are saved, and backward recomputes the sigmoid::

    σ = sigmoid(G)
    dU = dY ⊙ G σ
    dG = dY ⊙ U ⊙ σ (1 + G (1 - σ))

``_swiglu_fwd_kernel`` / ``_swiglu_bwd_kernel`` do each direction in one pass over the elements (fp32
math after each load). ``backend="torch"`` runs the same formulas in torch ops with in-place updates
(the CPU path); ``reference.silu_mul`` is the plain-autograd oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._triton import cdiv, interpreter_active, tl, triton

__all__ = ["SwiGLUFunction", "silu_mul"]


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    dy = tl.load(dy_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(du_ptr + offs, (dy * silu).to(du_ptr.dtype.element_ty), mask=inb)
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=inb)


def _block() -> int:
    return 1024 if interpreter_active() else 2048


def _forward(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "torch":
        return F.silu(gate).mul_(up)
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(cdiv(n, _block()),)](gate, up, y, n, BLOCK=_block(), num_warps=4)
    return y


def _backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str):
    if backend == "torch":  # two passes and two outputs, no temporaries: silu_backward is ATen's fused
        du = F.silu(gate).mul_(dy)  # dU = dY silu(G)
        dg = torch.mul(dy, up)  # dG = dY U σ(G) (1 + G (1 - σ(G))), the last factors in one pass, in place
        return torch.ops.aten.silu_backward.grad_input(dg, gate, grad_input=dg), du
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(cdiv(n, _block()),)](dy, gate, up, dg, du, n, BLOCK=_block(), num_warps=4)
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    """``silu(G) ⊙ U`` as one autograd node that saves G and U only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
        ctx.backend = backend
        ctx.save_for_backward(gate, up)
        return _forward(gate, up, backend)

    @staticmethod
    @once_differentiable  # kernels autograd cannot see: a second derivative raises, never silently 0
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dg, du = _backward(dy.contiguous(), gate, up, ctx.backend)
        return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None), None


def silu_mul(gate: torch.Tensor, up: torch.Tensor, backend: str = "triton") -> torch.Tensor:
    """``silu(gate) * up`` saving only its inputs for backward.

    Args:
        gate, up: tensors of one shape and dtype (fp32/fp16/bf16; fp64 with ``backend="torch"``).
        backend: ``triton`` (one-pass kernels) or ``torch``.

    Returns:
        The product, in the inputs' dtype.
    """
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"gate and up must match: {tuple(gate.shape)} {gate.dtype} vs {tuple(up.shape)} {up.dtype}"
        )
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and gate.dtype == torch.float64:
        backend = "torch"
    return SwiGLUFunction.apply(gate.contiguous(), up.contiguous(), backend)
