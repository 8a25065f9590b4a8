"""RMSNorm, fused: one pass forward, one pass backward, saving the input in its own dtype.

Llama-style models normalize with ``y = w ⊙ round(x · r)``, ``r = rsqrt(mean(x²) + ε)`` per row, computed
in fp32 and rounded to the input's dtype before the weight multiplies it (``LlamaRMSNorm`` and its copies
in Qwen2/3, Mistral, SmolLM). Through autograd that is seven or more kernels each way, and the tensor
kept for backward is the fp32 upcast of the input: ``4·h`` bytes per token per norm on a bf16 model,
twice per block. Here the forward is one pass per row that writes ``y`` and ``r``; backward keeps the
input as it came (``b·h`` bytes) and the fp32 ``r`` (4 bytes) per row, and recomputes ``x̂ = x·r``::

    g  = dY ⊙ w
    dX = r · (g − x̂ · mean(g ⊙ x̂))
    dW = Σ_rows dY ⊙ round(x̂)            (only when the weight trains)

Gemma-style norms (``style="gemma"``: ``GemmaRMSNorm`` in Gemma 1/2/3) scale by ``1 + w`` in fp32 and round
once at the end, ``y = round(x̂ ⊙ (1 + w))``: the same kernels with ``g = dY ⊙ (1 + w)`` and
``dW = Σ_rows dY ⊙ x̂``; their output is in x's dtype whatever the weight's.

``_rmsnorm_fwd_kernel`` is one program per row (the whole row in registers, fp32 after each load).
``_rmsnorm_bwd_kernel`` walks ``rows_per_prog`` rows per program, writing dX and adding the dW terms into
an fp32 row of its own; the launcher sums those rows. ``backend="torch"`` is the same computation in
torch ops (the CPU path); ``reference.rms_norm`` is HF's forward, the plain-autograd oracle.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._triton import cdiv, interpreter_active, next_power_of_2, tl, triton

__all__ = ["RMSNormFunction", "rms_norm"]


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr,  # X [rows, h]
    w_ptr,  # weight [h]
    y_ptr,  # Y [rows, h], out
    r_ptr,  # r [rows] fp32, out: rsqrt(mean(x²) + eps)
    h,
    stride_x,  # X row stride
    stride_y,  # Y row stride
    eps,
    GEMMA: tl.constexpr,  # y = round(x̂ ⊙ (1 + w)) instead of w ⊙ round(x̂)
    BLOCK: tl.constexpr,  # next_power_of_2(h)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inb = cols < h
    x = tl.load(x_ptr + row * stride_x + cols, mask=inb, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / h + eps)
    w = tl.load(w_ptr + cols, mask=inb, other=0.0).to(tl.float32)
    if GEMMA:
        y = (x * r) * (1.0 + w)
    else:
        # round x̂ to the input dtype first, as HF does, then multiply by the weight (exact in fp32 for 16-bit)
        y = w * (x * r).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=inb)
    tl.store(r_ptr + row, r)


@triton.jit
def _rmsnorm_bwd_kernel(
    dy_ptr,  # dY [rows, h]
    x_ptr,  # X [rows, h], saved
    w_ptr,  # weight [h]
    r_ptr,  # r [rows] fp32, saved
    dx_ptr,  # dX [rows, h], out (HAS_DX only)
    dw_ptr,  # [programs, h] fp32, out: this program's share of dW (HAS_DW only)
    rows,
    h,
    stride_dy,
    stride_x,
    stride_dx,
    rows_per_prog,  # a runtime bound: a constexpr would compile anew for each micro-batch's row count
    HAS_DX: tl.constexpr,
    HAS_DW: tl.constexpr,
    GEMMA: tl.constexpr,
    BLOCK: tl.constexpr,  # next_power_of_2(h)
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inb = cols < h
    w = tl.load(w_ptr + cols, mask=inb, other=0.0).to(tl.float32)
    if GEMMA:
        w = tl.where(inb, 1.0 + w, 0.0)
    dw = tl.zeros([BLOCK], tl.float32)
    for i in range(rows_per_prog):
        row = pid.to(tl.int64) * rows_per_prog + i
        ok = row < rows
        m = inb & ok
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row, mask=ok, other=0.0)
        xhat = x * r
        if HAS_DX:
            g = dy * w
            dx = r * (g - xhat * (tl.sum(g * xhat, axis=0) / h))
            tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
        if HAS_DW:
            if GEMMA:
                dw += dy * xhat
            else:
                dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * h + cols, dw, mask=inb)


def _rows_per_prog(rows: int, device: torch.device) -> int:
    """Rows per backward program: enough programs to fill the GPU twice over, few dW partials."""
    if interpreter_active() or device.type != "cuda":
        return max(1, min(rows, 64))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, cdiv(rows, 2 * sms))


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str, gemma: bool):
    """``(y, r)`` for 2-D ``x``."""
    if backend == "torch":
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp64 stays fp64 (gradcheck)
        r = torch.rsqrt(x32.pow(2).mean(-1) + eps)
        if gemma:
            return (x32 * r[:, None]).mul_(1.0 + weight.to(x32.dtype)).to(x.dtype), r
        y = weight * (x32 * r[:, None]).to(x.dtype)
        return y.to(torch.promote_types(weight.dtype, x.dtype)), r
    rows, h = x.shape
    y = torch.empty_like(x)
    r = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows:
        _rmsnorm_fwd_kernel[(rows,)](
            x, weight, y, r, h, x.stride(0), y.stride(0), eps,
            GEMMA=gemma, BLOCK=next_power_of_2(h), num_warps=_warps(h),
        )  # fmt: skip
    return y, r


def _backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    r: torch.Tensor,
    need_dx: bool,
    need_dw: bool,
    backend: str,
    gemma: bool = False,
):
    """``(dX or None, dW or None)`` for 2-D ``dy``/``x``."""
    if backend == "torch":  # in place where it can: at most three [rows, h] temporaries in r's dtype
        acc = r.dtype
        xhat = x.to(acc, copy=True).mul_(r[:, None])  # copies: x and dY must stay as they are
        g = dy.to(acc, copy=True)
        dx = dw = None
        if need_dw:  # x̂ as the forward multiplied it: rounded to x's dtype (Llama) or not (Gemma)
            dw = (g * (xhat if gemma else xhat.to(x.dtype))).sum(0)
        if need_dx:
            g.mul_(1.0 + weight.to(acc) if gemma else weight.to(acc))
            dot = (g * xhat).sum(-1, keepdim=True)  # Σ g·x̂ per row (elementwise: no TF32 on a GPU)
            dx = g.sub_(xhat.mul_(dot / x.shape[1])).mul_(r[:, None]).to(x.dtype)
        return dx, dw
    rows, h = x.shape
    dx = torch.empty_like(x) if need_dx else torch.empty(1, device=x.device, dtype=x.dtype)
    per = _rows_per_prog(rows, x.device)
    programs = cdiv(rows, per) if rows else 0
    dw = torch.empty((programs, h) if need_dw else (1,), device=x.device, dtype=torch.float32)
    if rows:
        _rmsnorm_bwd_kernel[(programs,)](
            dy, x, weight, r, dx, dw, rows, h, dy.stride(0), x.stride(0), dx.stride(0), per,
            HAS_DX=need_dx, HAS_DW=need_dw, GEMMA=gemma, BLOCK=next_power_of_2(h), num_warps=_warps(h),
        )  # fmt: skip
    dx = dx if need_dx else None
    if not need_dw:
        return dx, None
    return dx, (dw.sum(0) if rows else torch.zeros(h, device=x.device, dtype=torch.float32))


def _warps(h: int) -> int:
    # backward with dW holds x, dY, w and the dW partial per thread: at h = 16384 it spills (compile_sm90
    # for sm_90: 168 B of stack with 16 warps, 104 B with 32, whose 64-register cap forces it); no GPU has
    # timed which is faster, and only a trainable norm that wide (405B-class) takes that variant
    return 4 if h <= 2048 else 8 if h <= 8192 else 16


def _memory_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """The permutation that makes ``x`` contiguous keeping its last dimension last (a transposed view,
    such as Gemma 3's q/k before their norms: ``[B, T, n, d]`` memory seen as ``[B, n, T, d]``), or None
    when ``x`` is contiguous already or no such permutation exists."""
    if x.dim() <= 2 or x.is_contiguous():
        return None
    order = (*sorted(range(x.dim() - 1), key=lambda i: -x.stride(i)), x.dim() - 1)
    return order if x.permute(order).is_contiguous() else None


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm of rows ``x2 [M, h]`` as one autograd node that saves ``x2`` and the per-row ``r``.

    :func:`rms_norm` flattens the input to rows in its memory order and brings ``y`` back to the input's
    layout outside the node, so a transposed view is normalized in place of reading a copy, ``y`` has the
    layout elementwise ops (HF's norm) would give it, and a model may modify ``y`` in place (a view made
    inside a custom Function may not be).
    """

    @staticmethod
    def forward(ctx, x2: torch.Tensor, weight: torch.Tensor, eps: float, backend: str, gemma: bool):
        y, r = _forward(x2, weight, eps, backend, gemma)
        ctx.backend, ctx.gemma = backend, gemma
        ctx.save_for_backward(x2, weight, r)
        return y

    @staticmethod
    @once_differentiable  # kernels autograd cannot see: a second derivative raises, never silently 0
    def backward(ctx, dy: torch.Tensor):
        x2, weight, r = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        dx, dw = _backward(dy.contiguous(), x2, weight, r, need_dx, need_dw, ctx.backend, ctx.gemma)
        return (dx if need_dx else None), (dw.to(weight.dtype) if need_dw else None), None, None, None


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(order)), key=order.__getitem__))


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "triton", style: str = "llama"
) -> torch.Tensor:
    """``weight * round(x · rsqrt(mean(x²) + eps))`` over the last dimension, as ``LlamaRMSNorm``
    (``style="gemma"``: ``round(x · rsqrt(...) · (1 + weight))``, as ``GemmaRMSNorm``).

    Args:
        x: ``[..., h]``, fp32/fp16/bf16 (fp64 with ``backend="torch"``).
        weight: ``[h]``, trainable or frozen; llama style with ``backend="triton"``: in x's dtype.
        eps: added to the mean square.
        backend: ``triton`` (one-pass kernels) or ``torch``.
        style: ``llama`` or ``gemma``.

    Returns:
        ``y`` like ``x`` (llama style on the torch path: in the promoted dtype of weight and x, as HF's
        module).
    """
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    if style not in ("llama", "gemma"):
        raise ValueError(f"style must be 'llama' or 'gemma', got {style!r}")
    gemma = style == "gemma"
    if weight.ndim != 1 or x.shape[-1:] != weight.shape:
        raise ValueError(f"weight must be [{x.shape[-1]}], got {tuple(weight.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on one device, got {x.device} and {weight.device}")
    if backend == "triton" and x.dtype == torch.float64:
        backend = "torch"  # fp64 (gradcheck): the reference's exact math
    if backend == "triton" and weight.dtype != x.dtype and not gemma:
        raise TypeError(
            f"weight dtype {weight.dtype} must match x's {x.dtype} on the triton path (HF would promote; "
            "use backend='torch')"
        )
    # the kernels index both with unit stride in the last dimension
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = weight if weight.stride(0) == 1 else weight.contiguous()
    order = _memory_order(x)
    xp = x.permute(order) if order else x
    y = RMSNormFunction.apply(xp.reshape(-1, xp.shape[-1]), w, eps, backend, gemma)
    if order:
        return y.view(xp.shape).permute(_inverse(order))
    return y if x.dim() == 2 else y.view(x.shape)
