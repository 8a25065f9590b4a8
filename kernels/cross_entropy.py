"""Fused linear cross-entropy: the LM head and the loss, chunked, with the gradient computed in forward.

For hidden states ``H [N, d]`` at the target positions, the LM head ``W [V, d]`` (+ ``b``) and targets
``t [N]``::

    loss = Σᵢ ( logsumexp(Hᵢ Wᵀ + b) - (Hᵢ Wᵀ + b)[tᵢ] )

Written the plain way, autograd keeps the ``[N, V]`` logits, their fp32 upcast, the log-softmax and,
in backward, a gradient of the same size: four ``N x V`` buffers, the largest activations of a small
model (SmolLM2: V = 49152 = 85 x its hidden size). Here the rows go through in chunks of at most
``chunk_bytes`` of logits. For each chunk:

    Z  = H_c Wᵀ (+ b)                          [c, V]   one GEMM
    ℓ, Z ← softmax(Z) - onehot(t)              [c], in place: _ce_grad_kernel (two passes over Z)
    dH_c = Z W ;  dW += Zᵀ H_c ;  db += Σ Z    only those that need a gradient

so the loss is a scalar of the whole batch and backward only scales the saved ``dH`` (and ``dW``, ``db``)
by the incoming gradient. The saved ``dH`` has the size of ``H``, which autograd would have kept anyway.
Rows whose target is ``ignore_index`` add nothing to the loss and get a zero gradient.

``_ce_grad_kernel`` is one program per row: an online max / sum-of-exponentials pass over the row
(upcast to fp32 right after each load), then a pass that overwrites the row with
``exp(z - lse) - [col == t]`` in the logits' dtype. ``reference.cross_entropy_grad`` is the same
computation in torch (the CPU path), and ``reference.linear_cross_entropy`` the plain autograd oracle.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import reference
from ._autocast import autocast_dtype, autocast_off, cast_to
from ._triton import cdiv, interpreter_active, next_power_of_2, tl, triton

__all__ = ["DEFAULT_CHUNK_BYTES", "chunk_rows", "cross_entropy_grad", "linear_cross_entropy"]

DEFAULT_CHUNK_BYTES = 32 << 20  # logits per chunk: a GEMM big enough to run well, a buffer small enough


@triton.jit
def _ce_grad_kernel(
    z_ptr,
    t_ptr,
    loss_ptr,
    n_cols,
    stride_z,
    stride_t,
    ignore_index,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    t = tl.load(t_ptr + row * stride_t)
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        z = tl.load(z_row + c, mask=c < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        # a lane that has seen only -inf keeps s = 0 (exp(-inf - -inf) would be nan)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(z - m_safe)
        m = m_new
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(s * tl.exp(m - m_row), axis=0)
    lse = m_row + tl.log(s_row)
    active = t != ignore_index
    # a target outside [0, V) gives a nan loss and gradient (checking it on the host would cost a sync)
    bad = active & ((t < 0) | (t >= n_cols))
    t_safe = tl.where(active & ~bad, t, 0).to(tl.int64)
    z_t = tl.load(z_row + t_safe).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(active, tl.where(bad, float("nan"), lse - z_t), 0.0))
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        inb = c < n_cols
        z = tl.load(z_row + c, mask=inb, other=0.0).to(tl.float32)
        g = tl.exp(z - lse) - tl.where(c == t_safe, 1.0, 0.0)
        g = tl.where(active, tl.where(bad, float("nan"), g), 0.0)
        tl.store(z_row + c, g.to(z_ptr.dtype.element_ty), mask=inb)


def _ce_grad_triton(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    rows, cols = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows == 0:
        return loss
    block = min(next_power_of_2(cols), 1024 if interpreter_active() else 4096)
    _ce_grad_kernel[(rows,)](
        logits, target, loss, cols, logits.stride(0), target.stride(0), ignore_index, BLOCK=block, num_warps=8
    )
    return loss


def cross_entropy_grad(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, backend: str = "triton"
) -> torch.Tensor:
    """Per-row cross-entropy of ``logits [N, V]``, overwriting ``logits`` with ``softmax - onehot``.

    Args:
        logits: contiguous rows, fp32/fp16/bf16; overwritten with the gradient of the summed loss.
        target: ``[N]`` class indices (int64, any stride), ``ignore_index`` for rows without loss. A target
            outside ``[0, V)``: the row's loss and gradient are nan on the triton backend (no device sync
            to check it); the torch backend raises.
        ignore_index: rows with this target get loss 0 and gradient 0.
        backend: ``triton`` (the kernel) or ``torch`` (``reference.cross_entropy_grad``).

    Returns:
        The loss of each row ``[N]``, fp32 (fp64 for fp64 logits).
    """
    if logits.ndim != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D with contiguous rows, got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1] or target.dtype != torch.int64:
        raise ValueError(
            f"target must be int64 [{logits.shape[0]}], got {target.dtype} {tuple(target.shape)}"
        )
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"logits dtype {logits.dtype} is not supported")
    if backend == "torch" or logits.dtype == torch.float64:  # fp64 (gradcheck): the reference's exact math
        return reference.cross_entropy_grad(logits, target, ignore_index)
    return _ce_grad_triton(logits, target, ignore_index)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Summed cross-entropy of ``H Wᵀ + b``; gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, backend, chunk_rows, grad_enabled):
        n = hidden.shape[0]
        # needs_input_grad ignores grad mode: under no_grad (evaluation) compute the loss alone
        need_h, need_w, need_b = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        acc = torch.promote_types(hidden.dtype, torch.float32)
        grad_h = torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc) if need_w else None
        grad_b = torch.zeros(bias.shape, device=bias.device, dtype=acc) if need_b else None
        loss = torch.zeros((), device=hidden.device, dtype=acc)
        for start in range(0, n, chunk_rows):
            h = hidden[start : start + chunk_rows]
            z = torch.nn.functional.linear(h, weight, bias)
            loss += cross_entropy_grad(z, target[start : start + chunk_rows], ignore_index, backend).sum()
            if need_h:
                torch.mm(z, weight, out=grad_h[start : start + chunk_rows])
            if need_w:
                grad_w.addmm_(z.t().to(acc), h.to(acc))
            if need_b:
                grad_b += z.sum(dim=0, dtype=acc)
            del z  # before the next chunk's logits exist: one chunk at a time
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    @once_differentiable  # the gradients were computed in forward: no graph for a second derivative
    def backward(ctx, grad_loss):
        if getattr(ctx, "scaled", False):
            raise RuntimeError(
                "linear_cross_entropy: a second backward through one forward (retain_graph) is not "
                "supported; its saved gradients were scaled in place"
            )
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        g = grad_loss  # the scale (typically 1/targets), in fp32 or wider: not rounded to 16 bits first
        if g.dtype == torch.float64:  # gradcheck's fp64: copies, so that it may run backward repeatedly
            dh = None if grad_h is None else grad_h * g
            dw = None if grad_w is None else (grad_w * g).to(w_dtype)
            db = None if grad_b is None else (grad_b * g).to(b_dtype)
            return dh, dw, db, None, None, None, None, None
        # Scaled in place, so that backward holds no second copy of them: the saved dH (16-bit: through
        # one fp32 temporary) and the fp32 dW, which a trainable LM head makes V·d·4 bytes.
        ctx.scaled = True
        dh = db = dw = None
        if grad_h is not None:
            dh = grad_h.mul_(g) if grad_h.dtype == g.dtype else grad_h.copy_(grad_h.to(g.dtype).mul_(g))
        if grad_w is not None:
            dw = grad_w.mul_(g).to(w_dtype)
        if grad_b is not None:
            db = grad_b.mul_(g).to(b_dtype)
        return dh, dw, db, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    backend: str = "triton",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Summed next-token cross-entropy of ``hidden @ weight.T (+ bias)`` without an ``[N, V]`` activation.

    Args:
        hidden: ``[N, d]`` hidden states (only the rows that carry loss).
        weight: LM head ``[V, d]``; trainable or frozen (no dW is computed when frozen).
        target: ``[N]`` int64 class indices.
        bias: optional ``[V]``.
        ignore_index: targets to skip.
        backend: ``triton`` or ``torch`` for the softmax-gradient step; the GEMMs are torch's either way.
        chunk_bytes: the most logits held at once (rounded to whole rows, at least one).

    Returns:
        The scalar sum of the rows' losses, fp32 (fp64 for fp64 inputs); divide by the target count for
        the mean. Its graph takes one backward: the gradients computed in forward are scaled in place
        there, so a second pass through it (``retain_graph=True``, or ``autograd.grad`` for dH and then
        for dW separately) raises; ask for every gradient in one call.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, d] and weight [V, d] do not fit: {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"target must be [{hidden.shape[0]}], got {tuple(target.shape)}")
    if (dt := autocast_dtype(hidden)) is not None:  # the head as autocast runs nn.Linear (_autocast.py)
        hidden, weight, bias = cast_to(dt, hidden, weight, bias)
        with autocast_off(hidden):
            return linear_cross_entropy(
                hidden,
                weight,
                target,
                bias,
                ignore_index=ignore_index,
                backend=backend,
                chunk_bytes=chunk_bytes,
            )
    rows = chunk_rows(hidden.shape[0], weight.shape[0], hidden.element_size(), chunk_bytes)
    return LinearCrossEntropyFunction.apply(
        hidden, weight, bias, target.to(torch.int64), ignore_index, backend, rows, torch.is_grad_enabled()
    )


def chunk_rows(n: int, vocab: int, elem_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk for ``n`` rows: at most ``chunk_bytes`` of logits, in equal chunks (at least one row).

    Equal chunks rather than full ones and a sliver: the same number of GEMMs, better shaped.
    """
    if n <= 0:
        return 1
    most = max(1, min(n, chunk_bytes // (vocab * elem_size)))
    return cdiv(n, cdiv(n, most))
