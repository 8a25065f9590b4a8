"""Rotary position embedding of q and k, one pass each way, nothing of q's or k's size saved.

For a head vector ``x = [x₁ | x₂]`` (two halves of ``D/2``) at position t, with the tables
``cos, sin [B, T, D]`` (``c = [c₁ | c₂]``, ``s = [s₁ | s₂]``), Llama's ``x·c + rotate_half(x)·s`` is::

    y₁ = x₁ c₁ - x₂ s₁          dx₁ = dy₁ c₁ + dy₂ s₂
    y₂ = x₂ c₂ + x₁ s₂          dx₂ = dy₂ c₂ - dy₁ s₁

for q ``[B, Hq, T, D]`` and k ``[B, Hk, T, D]`` alike (each head of a token uses the token's row of the
tables). Backward is the transposed rotation, so one kernel serves both directions (``BACKWARD``).

Through autograd, HF's form runs five elementwise ops per tensor forward (mul, slice, neg, cat, mul,
add) and more backward, where the slices' gradients are zero-filled buffers. Here ``_rope_kernel``
takes a tile of tokens of one head per program and writes the rotated tensor in one pass, fp32 math
after each load (each head re-reads the table rows, from L2). Only the tables are saved for backward,
as autograd saves them for HF's form.
``backend="torch"`` runs the same formulas in three torch ops per tensor (a product and two in-place
``addcmul_``, the CPU path); ``reference.rope`` is HF's form, the oracle.

The output keeps the input's memory layout (HF's q and k are transposed views of the projections'
``[B, T, H, D]`` output, and so is what it hands to attention).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._triton import cdiv, interpreter_active, next_power_of_2, tl, triton

__all__ = ["RoPEFunction", "apply_rope"]


@triton.jit
def _rope_kernel(
    x_ptr,  # [B, H, T, D] rotated input (q or k; dY in backward), unit stride in D
    y_ptr,  # [B, H, T, D] output, unit stride in D
    cos_ptr,  # [B or 1, T, D] table, unit stride in D
    sin_ptr,  # [B or 1, T, D] table, same strides as cos
    n_tok,  # B * T
    T,  # positions
    HALF,  # D / 2
    sx_b,
    sx_h,
    sx_t,  # x strides: batch, head, position
    sy_b,
    sy_h,
    sy_t,  # y strides
    sc_b,
    sc_t,  # table strides (sc_b = 0: one table row per position for every batch row)
    BACKWARD: tl.constexpr,  # the transposed rotation (dX from dY)
    BLOCK_T: tl.constexpr,  # tokens per program (one head each: program_id(1))
    BLOCK_D: tl.constexpr,  # >= HALF
):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    b = (tok // T)[:, None]
    t = (tok % T)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    inb = (tok < n_tok)[:, None] & (d < HALF)
    tab = b * sc_b + t * sc_t + d
    c1 = tl.load(cos_ptr + tab, mask=inb, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + tab + HALF, mask=inb, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + tab, mask=inb, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + tab + HALF, mask=inb, other=0.0).to(tl.float32)
    xo = x_ptr + b * sx_b + head * sx_h + t * sx_t + d
    x1 = tl.load(xo, mask=inb, other=0.0).to(tl.float32)
    x2 = tl.load(xo + HALF, mask=inb, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    yo = y_ptr + b * sy_b + head * sy_h + t * sy_t + d
    tl.store(yo, y1.to(y_ptr.dtype.element_ty), mask=inb)
    tl.store(yo + HALF, y2.to(y_ptr.dtype.element_ty), mask=inb)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool, backend: str, dtype):
    """The rotation (or its transpose) of ``x [B, H, T, D]`` by ``cos, sin [B or 1, T, D]``, in ``dtype``."""
    half = x.shape[-1] // 2
    if backend == "torch":
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        y = torch.mul(x, c).to(dtype)  # the layout follows x's
        x1, x2, s1, s2 = x[..., :half], x[..., half:], s[..., :half], s[..., half:]
        if backward:
            y[..., :half].addcmul_(x2, s2)
            y[..., half:].addcmul_(x1, s1, value=-1.0)
        else:
            y[..., :half].addcmul_(x2, s1, value=-1.0)
            y[..., half:].addcmul_(x1, s2)
        return y
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty_like(x, dtype=dtype)  # x's layout when x is dense
    B, H, T, _ = x.shape
    if y.numel():
        block_d = next_power_of_2(half)
        # a [BLOCK_T, BLOCK_D] tile per program and head: 4096 elements on a GPU; under the interpreter,
        # where each program costs far more than its arithmetic, as many tokens as fit 2^16 elements
        budget = 1 << 16 if interpreter_active() else 4096
        block_t = min(next_power_of_2(B * T), max(1, budget // block_d))
        _rope_kernel[(cdiv(B * T, block_t), H)](
            x, y, cos, sin, B * T, T, half,
            x.stride(0), x.stride(1), x.stride(2),
            y.stride(0), y.stride(1), y.stride(2),
            cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
            BACKWARD=backward, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return y


class RoPEFunction(torch.autograd.Function):
    """q and k rotated by one pair of tables, one node; saves the tables only."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, backend: str):
        ctx.backend, ctx.dtypes = backend, (q.dtype, k.dtype)
        ctx.save_for_backward(cos, sin)
        out = [_rotate(x, cos, sin, False, backend, torch.promote_types(x.dtype, cos.dtype)) for x in (q, k)]
        ctx.set_materialize_grads(False)
        for y, need in zip(out, ctx.needs_input_grad[:2], strict=True):
            if not need:  # as autograd through HF's form: a frozen k gives a k that needs no gradient
                ctx.mark_non_differentiable(y)
        return out[0], out[1]

    @staticmethod
    @once_differentiable  # kernels autograd cannot see: a second derivative raises, never silently 0
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        grads = [
            _rotate(g, cos, sin, True, ctx.backend, dtype) if need and g is not None else None
            for g, need, dtype in zip((dq, dk), ctx.needs_input_grad[:2], ctx.dtypes, strict=True)
        ]
        return grads[0], grads[1], None, None, None


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "triton"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q·cos + rotate_half(q)·sin`` and the same for k, as transformers' Llama ``apply_rotary_pos_emb``
    with ``unsqueeze_dim=1``.

    Args:
        q: ``[B, Hq, T, D]``, D even; any strides (HF's transposed view of the projection included).
        k: ``[B, Hk, T, D]``.
        cos, sin: ``[B, T, D]`` or ``[1, T, D]`` (one table for every row), not requiring grad.
        backend: ``triton`` (one-pass kernels) or ``torch``.

    Returns:
        The rotated q and k in q's and k's layout, in the promoted dtype of each and the tables (as HF).
        They come from one autograd node: two separate ``backward`` calls through them (rather than one
        loss over both) need ``retain_graph=True`` on the first, which HF's two chains do not.
    """
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    if q.ndim != 4 or k.ndim != 4 or cos.ndim != 3 or cos.shape != sin.shape:
        raise ValueError(
            f"expected q [B, Hq, T, D], k [B, Hk, T, D], cos and sin [B, T, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (T, D) or cos.shape[1:] != (T, D) or cos.shape[0] not in (1, B):
        raise ValueError(
            f"shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, cos/sin {tuple(cos.shape)}"
        )
    if D % 2:
        raise ValueError(f"head dim must be even, got {D}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos/sin must not require grad (the fused rotation has no gradient for them)")
    if len({q.device, k.device, cos.device, sin.device}) != 1 or cos.dtype != sin.dtype:
        raise ValueError("q, k, cos and sin must be on one device, and cos and sin of one dtype")
    if backend == "triton" and torch.float64 in (q.dtype, k.dtype, cos.dtype):
        backend = "torch"  # fp64 (gradcheck): torch's exact math
    if backend == "triton" and (cos.stride(-1) != 1 or sin.stride() != cos.stride()):
        cos, sin = cos.contiguous(), sin.contiguous()  # the kernel reads both with cos's strides
    return RoPEFunction.apply(q, k, cos, sin, backend)
