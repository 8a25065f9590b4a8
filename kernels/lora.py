"""Fused LoRA linear: the LoRA update folded into the frozen base GEMM, forward and backward.

A LoRA layer computes, for ``X [M, K]`` (leading dimensions flattened into M), a frozen ``W [N, K]``,
trainable ``A [r, K]`` and ``B [N, r]``, ``s = alpha / r`` and dropout ``D`` with probability p::

    Y = X Wᵀ (+ b) + s · (D(X) Aᵀ) Bᵀ                                   [M, N]

``D(X) = X ⊙ keep / (1 - p)``, where ``keep [M, K]`` is never stored: every kernel that needs it
regenerates it from one integer seed with Philox (``keep[m, k] = (philox(seed, m·K + k) >> 8) >=
round(p · 2²⁴)``, reproduced bit for bit by ``reference.dropout_keep_mask``).

Forward, two kernels:

    S' = s/(1-p) · (keep ⊙ X) Aᵀ                  [M, r]   _lora_down_kernel     (one read of X)
    Y  = [X | S'] · [W | B]ᵀ (+ b)                [M, N]   _lora_fwd_kernel

The second is one GEMM whose reduction runs over K and then on over the r columns of ``S'``, so Y is
written once and no [M, N] temporary exists. Saved for backward: X (only when dA is needed; it rebuilds
D(X) with the seed) and ``S'`` [M, r]; never anything of size [M, N].

Backward, three kernels, for ``dY [M, N]`` (``dS'`` carries the 1/(1-p) of the dropout)::

    dS' = s/(1-p) · dY B                          [M, r]   _lora_bwd_ds_db_kernel (one read of dY
    dB  = dYᵀ S'                                  [N, r]    for both, when r <= its r-block)
    dA  = dS'ᵀ (keep ⊙ X)                         [r, K]   _lora_bwd_da_kernel
    dX  = dY W + keep ⊙ (dS' A)                   [M, K]   _lora_bwd_dx_kernel

The last is one GEMM over the concatenated reduction ``[dY | dS'] · [W ; A]`` (without dropout both
halves share one accumulator; with it, the LoRA half gets its own and is masked before the sum). There
is no dW: W is frozen. Each of dX, dA, dB is computed only when ``ctx.needs_input_grad`` asks for it.

Every kernel accumulates in fp32 (fp64 for fp64 inputs). Under Triton's CPU interpreter the tiles are
upcast to fp32 right after each load, since the interpreter's bf16/fp16 arithmetic is not IEEE; on a GPU
they stay in the input dtype so that ``tl.dot`` runs on tensor cores.

Sibling projections that share one input (q|k|v): ``_lora_down_kernel`` over the row-concatenated
``[A_q; A_k; A_v]`` gives all ``S'`` in one read of X, and ``_lora_fwd_kernel`` takes ``S'`` by pointer
and strides, so each projection can read its column slice. ``lora_linear`` builds the single case.

On the torch path, siblings without dropout run as one node (``lora_siblings_torch``): for n projections
of one X with ``Â = [A₁; …; Aₙ]`` and ``dŜ = [s₁ dY₁ B₁ | … | sₙ dYₙ Bₙ]``::

    Ŝ = X Âᵀ                         [M, Σr]  one GEMM for every A
    Yᵢ = X Wᵢᵀ (+ bᵢ) + sᵢ Ŝᵢ Bᵢᵀ     [M, Nᵢ]
    dX = Σᵢ dYᵢ Wᵢ + dŜ Â             [M, K]   accumulated in place in one buffer
    dÂ = dŜᵀ X                       [Σr, K]  one GEMM for every A;  dBᵢ = sᵢ dYᵢᵀ Ŝᵢ
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._autocast import autocast_dtype, autocast_off, cast_to
from ._triton import TORCH_TO_TL, cdiv, interpreter_active, next_power_of_2, tl, triton
from .dropout import apply_keep, apply_keep_, draw_keep, pack_keep, unpack_keep
from .reference import dropout_threshold

__all__ = [
    "LoRAConfig",
    "LoRALinearFunction",
    "LoRALinearTorchFunction",
    "LoRASiblingsTorchFunction",
    "lora_backward",
    "lora_forward",
    "lora_linear",
    "lora_linear_torch",
    "lora_siblings_torch",
]

MAX_RANK = 256

# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _dropout_keep(seed, rows, cols, n_cols, threshold):
    """Dropout keep-mask at ``rows x cols`` of an ``[M, n_cols]`` input (rows are int64)."""
    offsets = rows[:, None] * n_cols + cols[None, :]
    bits = tl.randint(seed, offsets)
    return (bits >> 8).to(tl.int32) >= threshold


@triton.jit
def _grouped_tile(
    pid, n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr
):
    """Program id -> (row tile, col tile), GROUP row tiles at a time so that col tiles stay in L2."""
    num_pid_r = tl.cdiv(n_rows, BLOCK_ROWS)
    num_pid_c = tl.cdiv(n_cols, BLOCK_COLS)
    num_pid_in_group = GROUP * num_pid_c
    group_id = pid // num_pid_in_group
    first_r = group_id * GROUP
    group_size = tl.minimum(num_pid_r - first_r, GROUP)
    pid_r = first_r + (pid % num_pid_in_group) % group_size
    pid_c = (pid % num_pid_in_group) // group_size
    return pid_r, pid_c


@triton.jit
def _lora_down_kernel(
    x_ptr,  # X [M, K], input
    a_ptr,  # A [R, K], LoRA down-projection
    s_ptr,  # S' [M, R], output: s/(1-p) · D(X) Aᵀ, in X's dtype
    M,
    K,
    R,
    stride_xm,  # X row stride
    stride_xk,  # X column stride
    stride_ar,  # A row stride
    stride_ak,  # A column stride
    stride_sm,  # S' row stride
    stride_sr,  # S' column stride
    out_scale,  # s / (1 - p)
    seed,  # dropout seed (unused without dropout)
    threshold,  # dropout threshold on 24 random bits
    split_k,  # programs sharing one tile's K reduction (grid axis 2)
    HAS_DROPOUT: tl.constexpr,
    ATOMIC_S: tl.constexpr,  # split_k > 1: add the partial sums into an fp32 S' (zeroed)
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # dtype tiles are cast to before tl.dot
    ACC_DTYPE: tl.constexpr,  # accumulator dtype (fp32, or fp64 for fp64 inputs)
    INPUT_PRECISION: tl.constexpr,  # "ieee": no tf32 for fp32 inputs
):
    """S' = s/(1-p) · (keep ⊙ X) Aᵀ for one [BLOCK_M, BLOCK_R] tile, over every split_k-th K block."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = rows < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for k0 in range(pid_k * BLOCK_K, K, split_k * BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        if HAS_DROPOUT:
            x = tl.where(_dropout_keep(seed, rows, cols, K, threshold), x, 0.0)
        a_t = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + cols[:, None] * stride_ak,
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        acc = tl.dot(x, a_t, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    acc = acc * out_scale
    s_ptrs = s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr
    if ATOMIC_S:
        tl.atomic_add(s_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :], sem="relaxed")
    else:
        tl.store(s_ptrs, acc.to(s_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_fwd_kernel(
    x_ptr,  # X [M, K], input
    w_ptr,  # W [N, K], frozen base weight
    s_ptr,  # S' [M, R], from _lora_down_kernel (already scaled by s/(1-p))
    b_ptr,  # B [N, R], LoRA up-projection
    bias_ptr,  # bias [N] (ignored unless HAS_BIAS)
    y_ptr,  # Y [M, N], output
    M,
    N,
    K,
    R,
    M_BUCKET,  # next_power_of_2(M): the autotune key (padding-free batches change M every step)
    stride_xm,  # X row stride
    stride_xk,  # X column stride
    stride_wn,  # W row stride
    stride_wk,  # W column stride
    stride_sm,  # S' row stride
    stride_sr,  # S' column stride
    stride_bn,  # B row stride
    stride_br,  # B column stride
    stride_ym,  # Y row stride
    stride_yn,  # Y column stride
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Y = [X | S'] · [W | B]ᵀ (+ bias) for one [BLOCK_M, BLOCK_N] tile: K steps, then r steps."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    outs = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = rows < M
    mask_n = outs < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    # Base GEMM: X Wᵀ.
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + outs[None, :] * stride_wn + offs_k[:, None] * stride_wk
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        w_t = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(x, w_t, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    # The same reduction continued over the r columns of [S' | B]: + S' Bᵀ.
    s_ptrs = s_ptr + rows[:, None] * stride_sm + offs_k[None, :] * stride_sr
    b_ptrs = b_ptr + outs[None, :] * stride_bn + offs_k[:, None] * stride_br
    for r0 in range(0, R, BLOCK_K):
        mask_r = (r0 + offs_k) < R
        s = tl.load(s_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
        b_t = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(s, b_t, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        s_ptrs += BLOCK_K * stride_sr
        b_ptrs += BLOCK_K * stride_br
    if HAS_BIAS:
        bias = tl.load(bias_ptr + outs, mask=mask_n, other=0.0).to(ACC_DTYPE)
        acc += bias[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + outs[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def _lora_bwd_ds_db_kernel(
    dy_ptr,  # dY [M, N], upstream gradient
    b_ptr,  # B [N, R]
    s_ptr,  # S' [M, R], saved by the forward
    ds_ptr,  # dS' [M, R] fp32, output (zeroed by the launcher when split_n > 1: atomics)
    db_ptr,  # dB [N, R] fp32, output, zeroed by the launcher (atomics over row tiles)
    M,
    N,
    R,
    stride_dym,  # dY row stride
    stride_dyn,  # dY column stride
    stride_bn,  # B row stride
    stride_br,  # B column stride
    stride_sm,  # S' row stride
    stride_sr,  # S' column stride
    stride_dsm,  # dS' row stride
    stride_dsr,  # dS' column stride
    stride_dbn,  # dB row stride
    stride_dbr,  # dB column stride
    ds_scale,  # s / (1 - p)
    split_n,  # programs sharing one row tile, each over a slice of N (runtime: no recompile per value)
    NEED_DS: tl.constexpr,
    NEED_DB: tl.constexpr,
    ATOMIC_DS: tl.constexpr,  # split_n > 1: the slices' partial dS' meet in atomics
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dS' = s/(1-p) · dY B and dB = dYᵀ S' from one read of each dY tile."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_split = tl.program_id(2)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_r = offs_r < R
    if NEED_DB:
        s = tl.load(
            s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    n_per_split = tl.cdiv(tl.cdiv(N, BLOCK_N), split_n) * BLOCK_N
    n_start = pid_split * n_per_split
    n_end = tl.minimum(N, n_start + n_per_split)
    for n0 in range(n_start, n_end, BLOCK_N):
        outs = (n0 + offs_n).to(tl.int64)
        mask_n = outs < N
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + outs[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        if NEED_DS:
            b = tl.load(
                b_ptr + outs[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=mask_n[:, None] & mask_r[None, :],
                other=0.0,
            ).to(DOT_DTYPE)
            ds = tl.dot(dy, b, ds, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if NEED_DB:
            db = tl.dot(tl.trans(dy), s, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            tl.atomic_add(
                db_ptr + outs[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
                db.to(db_ptr.dtype.element_ty),
                mask=mask_n[:, None] & mask_r[None, :],
                sem="relaxed",
            )
    if NEED_DS:
        ds = ds * ds_scale
        ds_ptrs = ds_ptr + rows[:, None] * stride_dsm + offs_r[None, :] * stride_dsr
        mask = mask_m[:, None] & mask_r[None, :]
        if not ATOMIC_DS:
            tl.store(ds_ptrs, ds.to(ds_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(ds_ptrs, ds.to(ds_ptr.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit
def _lora_bwd_da_kernel(
    ds_ptr,  # dS' [M, R] fp32, from _lora_bwd_ds_db_kernel
    x_ptr,  # X [M, K], saved input
    da_ptr,  # dA [R, K] fp32, output (zeroed by the launcher when split_m > 1: atomics)
    M,
    K,
    R,
    stride_dsm,  # dS' row stride
    stride_dsr,  # dS' column stride
    stride_xm,  # X row stride
    stride_xk,  # X column stride
    stride_dar,  # dA row stride
    stride_dak,  # dA column stride
    seed,  # dropout seed (unused without dropout)
    threshold,  # dropout threshold on 24 random bits
    split_m,  # programs sharing one [BLOCK_R, BLOCK_K] tile, each over a slice of M (runtime)
    HAS_DROPOUT: tl.constexpr,
    ATOMIC_DA: tl.constexpr,  # split_m > 1: the slices' partial dA meet in atomics
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dA = dS'ᵀ (keep ⊙ X) for one [BLOCK_R, BLOCK_K] tile, reducing over (a slice of) M."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_split = tl.program_id(2)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M)
    mask_k = cols < K
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC_DTYPE)
    m_per_split = tl.cdiv(tl.cdiv(M, BLOCK_M), split_m) * BLOCK_M
    m_start = pid_split * m_per_split
    m_end = tl.minimum(M, m_start + m_per_split)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = (m0 + offs_m).to(tl.int64)
        mask_m = rows < M
        ds_t = tl.load(
            ds_ptr + rows[None, :] * stride_dsm + offs_r[:, None] * stride_dsr,
            mask=mask_r[:, None] & mask_m[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        if HAS_DROPOUT:
            x = tl.where(_dropout_keep(seed, rows, cols, K, threshold), x, 0.0)
        acc = tl.dot(ds_t, x, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    da_ptrs = da_ptr + offs_r[:, None] * stride_dar + cols[None, :] * stride_dak
    mask = mask_r[:, None] & mask_k[None, :]
    if not ATOMIC_DA:
        tl.store(da_ptrs, acc.to(da_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(da_ptrs, acc.to(da_ptr.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit
def _lora_bwd_dx_kernel(
    dy_ptr,  # dY [M, N], upstream gradient
    w_ptr,  # W [N, K], frozen base weight
    ds_ptr,  # dS' [M, R] fp32, from _lora_bwd_ds_db_kernel
    a_ptr,  # A [R, K]
    dx_ptr,  # dX [M, K], output
    M,
    N,
    K,
    R,
    M_BUCKET,  # next_power_of_2(M): the autotune key
    stride_dym,  # dY row stride
    stride_dyn,  # dY column stride
    stride_wn,  # W row stride
    stride_wk,  # W column stride
    stride_dsm,  # dS' row stride
    stride_dsr,  # dS' column stride
    stride_ar,  # A row stride
    stride_ak,  # A column stride
    stride_dxm,  # dX row stride
    stride_dxk,  # dX column stride
    seed,  # dropout seed (unused without dropout)
    threshold,  # dropout threshold on 24 random bits
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # output-column tile (over K)
    BLOCK_K: tl.constexpr,  # reduction step (over N, then over R)
    GROUP_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dX = [dY | dS'] · [W ; A] (the dS' A half masked by keep) for one [BLOCK_M, BLOCK_N] tile."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_k * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_red = tl.arange(0, BLOCK_K)
    mask_m = rows < M
    mask_k = cols < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    # dY W, reducing over N.
    dy_ptrs = dy_ptr + rows[:, None] * stride_dym + offs_red[None, :] * stride_dyn
    w_ptrs = w_ptr + offs_red[:, None] * stride_wn + cols[None, :] * stride_wk
    for n0 in range(0, N, BLOCK_K):
        mask_n = (n0 + offs_red) < N
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        dy_ptrs += BLOCK_K * stride_dyn
        w_ptrs += BLOCK_K * stride_wn
    # dS' A, reducing over R: into the same accumulator, or its own when dropout masks it.
    if HAS_DROPOUT:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    else:
        lora = acc
    ds_ptrs = ds_ptr + rows[:, None] * stride_dsm + offs_red[None, :] * stride_dsr
    a_ptrs = a_ptr + offs_red[:, None] * stride_ar + cols[None, :] * stride_ak
    for r0 in range(0, R, BLOCK_K):
        mask_r = (r0 + offs_red) < R
        ds = tl.load(ds_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
        a = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        lora = tl.dot(ds, a, lora, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        ds_ptrs += BLOCK_K * stride_dsr
        a_ptrs += BLOCK_K * stride_ar
    if HAS_DROPOUT:
        acc += tl.where(_dropout_keep(seed, rows, cols, K, threshold), lora, 0.0)
    else:
        acc = lora
    tl.store(
        dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
        acc.to(dx_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_k[None, :],
    )


# ---------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRAConfig:
    """What a fused LoRA call needs besides its tensors.

    Attributes:
        scale: ``s = alpha / r``.
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1).
        seed: Philox seed of the dropout mask (ignored when ``dropout_p == 0``).
    """

    scale: float
    dropout_p: float = 0.0
    seed: int = 0

    @property
    def has_dropout(self) -> bool:
        return self.dropout_p > 0.0


# Under the interpreter each tl op costs Python overhead per program, so tiles are large (fewer programs)
# and fixed: autotuning needs a GPU.
# Under the interpreter every program is a Python-level loop: fewer, larger tiles run faster (a 160x64x128
# LoRA layer fwd+bwd: 0.22 s with BLOCK_M=32, 0.13 s with 64, on this project's 2-core CPU).
_INTERPRETER_GEMM = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}
# Thin kernels (the r-wide side GEMMs) on a GPU. Not tuned: chosen, not measured (no GPU in the session
# that wrote them); dB and split reductions use fp32 atomics, which autotuning would replay. The atomics
# are relaxed: pure sums read only by later launches, where Triton's default (acq_rel) fences each one.
_GPU_THIN = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
_GPU_MAX_BLOCK_R = 128


def _gemm_configs() -> list:
    """The small config list the two big GEMMs (Y, dX) are autotuned over on a GPU."""
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        cfg({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        # Fits shared memory with fp32 operands, where the larger tiles do not.
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
    ]


_TUNED: dict[str, object] = {}
# Below this many multiply-adds a GEMM launches with _GPU_SMALL_GEMM instead of being autotuned: tuning
# costs a compile per config and seconds of benchmarking, which small layers (and tests) never earn back.
_AUTOTUNE_MIN_MACS = 1 << 30
_GPU_SMALL_GEMM = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def _gemm_launcher(name: str, macs: int) -> tuple[object, dict]:
    """The big GEMM kernel ``name`` as launched, with the meta-parameters the caller must pass.

    Fixed tiles under the interpreter and for small problems; on a GPU above ``_AUTOTUNE_MIN_MACS``,
    autotuned over ``_gemm_configs()``, keyed on N, K, the dtypes and M rounded up to a power of two:
    padding-free micro-batches give a new M nearly every step, and a re-tune costs a second or more.
    """
    kernel = globals()[name]
    if interpreter_active():
        return kernel, dict(_INTERPRETER_GEMM)
    if macs < _AUTOTUNE_MIN_MACS:
        return kernel, dict(_GPU_SMALL_GEMM)
    if name not in _TUNED:
        _TUNED[name] = triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K"])(kernel)
    return _TUNED[name], {}


def _dtypes(x: torch.Tensor) -> dict:
    """DOT_DTYPE / ACC_DTYPE / INPUT_PRECISION for inputs of x's dtype."""
    if x.dtype == torch.float64:
        return {"DOT_DTYPE": tl.float64, "ACC_DTYPE": tl.float64, "INPUT_PRECISION": "ieee"}
    if interpreter_active():
        dot = tl.float32  # the interpreter's fp16/bf16 arithmetic is not IEEE: upcast after each load
    else:
        dot = TORCH_TO_TL[x.dtype]  # tensor cores; fp32 stays fp32 ("ieee", no tf32)
    return {"DOT_DTYPE": dot, "ACC_DTYPE": tl.float32, "INPUT_PRECISION": "ieee"}


def _thin_blocks(rank: int) -> dict:
    """Tile sizes of the r-wide kernels; BLOCK_R covers the whole rank when it can (one read of X/dY)."""
    cap = 64 if interpreter_active() else _GPU_MAX_BLOCK_R
    block_r = max(16, min(next_power_of_2(rank), cap))
    if interpreter_active():
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_R": block_r}
    blocks = dict(_GPU_THIN, BLOCK_R=block_r)
    if block_r > 64:
        blocks["num_warps"] = 8
    return blocks


def _split(tiles: int, reduction_blocks: int, device: torch.device) -> int:
    """How many programs share one output tile's reduction so that the grid fills the GPU (~2 waves)."""
    if interpreter_active() or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(reduction_blocks, cdiv(2 * sms, max(tiles, 1))))


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[int, int, int, int]:
    """Validate a 2-D LoRA problem; returns (M, N, K, r)."""
    if x.dim() != 2 or weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(
            f"expected 2-D x, weight, lora_a, lora_b; got {x.dim()}, {weight.dim()}, {lora_a.dim()}, {lora_b.dim()}"
        )
    m, k = x.shape
    n, k_w = weight.shape
    r, k_a = lora_a.shape
    if k_w != k or k_a != k:
        raise ValueError(
            f"in_features mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, A {tuple(lora_a.shape)}"
        )
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_b must be [{n}, {r}] (out_features, rank), got {tuple(lora_b.shape)}")
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"rank must be in [1, {MAX_RANK}], got {r}")
    if k < 1 or n < 1:
        raise ValueError(f"in_features and out_features must be >= 1, got {k} and {n}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be one of {_FLOAT_DTYPES}, got {x.dtype}")
    if x.dtype == torch.float64 and not interpreter_active():
        # fp64 tl.dot lowers on some Triton/GPU pairs only; the interpreter runs it (for gradcheck).
        raise TypeError("float64 runs only under the Triton interpreter; use fp32/fp16/bf16 on a GPU")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    tensors = [t for t in (x, weight, lora_a, lora_b, bias) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    if x.device.type != "cuda" and not interpreter_active():
        raise RuntimeError("Triton LoRA kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    return m, n, k, r


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    config: LoRAConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LoRA forward on a 2-D input: ``S' = s/(1-p) · D(X) Aᵀ``, then ``Y = [X | S'] [W | B]ᵀ (+ b)``.

    Args:
        x: ``X [M, K]`` (any strides).
        weight: frozen ``W [N, K]``, same dtype as x.
        lora_a: ``A [r, K]``; any float dtype (tiles are cast to x's dtype for the GEMM).
        lora_b: ``B [N, r]``.
        bias: optional ``[N]`` (any strides: the kernel reads a contiguous copy).
        config: scale, dropout probability and seed.

    Returns:
        ``(Y [M, N], S' [M, r])``, both in x's dtype; ``S'`` is what the backward needs.

    Raises:
        ValueError, TypeError: on mismatched shapes, dtypes or devices.
    """
    m, n, k, r = _check_inputs(x, weight, lora_a, lora_b, bias)
    if bias is not None:  # the kernel reads bias_ptr + n: a strided or expanded view would be misread
        bias = bias.contiguous()
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    s = torch.empty((m, r), device=x.device, dtype=x.dtype)
    if m == 0:
        return y, s
    dt = _dtypes(x)
    thin = _thin_blocks(r)
    down_meta = {
        key: thin[key] for key in ("BLOCK_M", "BLOCK_R", "BLOCK_K", "num_warps", "num_stages") if key in thin
    }
    p = config.dropout_p
    # One program per [BLOCK_M, BLOCK_R] tile leaves the GPU idle at small M (M = 512: 8 programs, each
    # walking all of K); split K across programs to fill it, summing into an fp32 S' with atomics.
    m_tiles, r_tiles = cdiv(m, thin["BLOCK_M"]), cdiv(r, thin["BLOCK_R"])
    split_k = _split(m_tiles * r_tiles, cdiv(k, thin["BLOCK_K"]), x.device)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    s_out = torch.zeros((m, r), device=x.device, dtype=acc_dtype) if split_k > 1 else s
    _lora_down_kernel[(m_tiles, r_tiles, split_k)](
        x, lora_a, s_out, m, k, r,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), s_out.stride(0), s_out.stride(1),
        config.scale / (1.0 - p), config.seed, dropout_threshold(p), split_k,
        HAS_DROPOUT=config.has_dropout, ATOMIC_S=split_k > 1, **down_meta, **dt,
    )  # fmt: skip
    if split_k > 1:
        s.copy_(s_out)  # rounded to x's dtype once, as the single-program path stores it
    kernel, meta = _gemm_launcher("_lora_fwd_kernel", m * n * (k + r))
    grid = lambda META: (cdiv(m, META["BLOCK_M"]) * cdiv(n, META["BLOCK_N"]),)
    kernel[grid](
        x, weight, s, lora_b, bias if bias is not None else x, y, m, n, k, r, next_power_of_2(m),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), s.stride(0), s.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, **meta, **dt,
    )  # fmt: skip
    return y, s


def lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor | None,
    config: LoRAConfig,
    *,
    need_dx: bool = True,
    need_da: bool = True,
    need_db: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Fused LoRA backward on 2-D tensors: dX, dA, dB (each only when asked for); never dW.

    Args:
        grad_y: ``dY [M, N]``.
        x: the forward's ``X [M, K]``; needed only for dA (may be None otherwise).
        weight: frozen ``W [N, K]``.
        lora_a: ``A [r, K]``.
        lora_b: ``B [N, r]``.
        s: the forward's ``S' [M, r]``; needed only for dB (may be None otherwise).
        config: the forward's config (same seed: the dropout mask is regenerated, not stored).
        need_dx, need_da, need_db: which gradients to compute.

    Returns:
        ``(dX [M, K] in dY's dtype, dA [r, K] in A's dtype, dB [N, r] in B's dtype)``, None where not asked.

    Raises:
        ValueError: when x or s is missing for a gradient that needs it, or on shape mismatches.
    """
    n, k = weight.shape
    r = lora_a.shape[0]
    m = grad_y.shape[0]
    if grad_y.dim() != 2 or grad_y.shape[1] != n:
        raise ValueError(f"grad_y must be [M, {n}], got {tuple(grad_y.shape)}")
    if need_da and (x is None or tuple(x.shape) != (m, k)):
        raise ValueError(f"dA needs the forward's x [{m}, {k}]")
    if need_db and (s is None or tuple(s.shape) != (m, r)):
        raise ValueError(f"dB needs the forward's S' [{m}, {r}]")
    dx = da = db = None
    if not (need_dx or need_da or need_db):
        return dx, da, db
    dev = grad_y.device
    if m == 0:
        dx = torch.zeros((0, k), device=dev, dtype=grad_y.dtype) if need_dx else None
        da = torch.zeros_like(lora_a) if need_da else None
        db = torch.zeros_like(lora_b) if need_db else None
        return dx, da, db
    dt = _dtypes(grad_y)
    thin = _thin_blocks(r)
    launch = {key: thin[key] for key in ("num_warps", "num_stages") if key in thin}
    p = config.dropout_p
    need_ds = need_dx or need_da
    acc_dtype = torch.float64 if grad_y.dtype == torch.float64 else torch.float32

    # dS' = s/(1-p) · dY B and dB = dYᵀ S': one pass over dY.
    m_tiles, r_tiles = cdiv(m, thin["BLOCK_M"]), cdiv(r, thin["BLOCK_R"])
    split_n = _split(m_tiles * r_tiles, cdiv(n, thin["BLOCK_N"]), dev) if need_ds else 1
    ds32 = (torch.zeros if split_n > 1 else torch.empty)((m, r), device=dev, dtype=acc_dtype)
    db32 = torch.zeros((n, r), device=dev, dtype=acc_dtype) if need_db else ds32
    s_arg = s if need_db else ds32
    _lora_bwd_ds_db_kernel[(m_tiles, r_tiles, split_n)](
        grad_y, lora_b, s_arg, ds32, db32, m, n, r,
        grad_y.stride(0), grad_y.stride(1), lora_b.stride(0), lora_b.stride(1),
        s_arg.stride(0), s_arg.stride(1), ds32.stride(0), ds32.stride(1), db32.stride(0), db32.stride(1),
        config.scale / (1.0 - p), split_n,
        NEED_DS=need_ds, NEED_DB=need_db, ATOMIC_DS=split_n > 1,
        BLOCK_M=thin["BLOCK_M"], BLOCK_N=thin["BLOCK_N"], BLOCK_R=thin["BLOCK_R"], **launch, **dt,
    )  # fmt: skip
    if need_db:
        db = db32.to(lora_b.dtype)

    # dA = dS'ᵀ (keep ⊙ X).
    if need_da:
        k_tiles = cdiv(k, thin["BLOCK_K"])
        split_m = _split(k_tiles * r_tiles, cdiv(m, thin["BLOCK_M"]), dev)
        da32 = (torch.zeros if split_m > 1 else torch.empty)((r, k), device=dev, dtype=acc_dtype)
        _lora_bwd_da_kernel[(k_tiles, r_tiles, split_m)](
            ds32, x, da32, m, k, r,
            ds32.stride(0), ds32.stride(1), x.stride(0), x.stride(1), da32.stride(0), da32.stride(1),
            config.seed, dropout_threshold(p), split_m,
            HAS_DROPOUT=config.has_dropout, ATOMIC_DA=split_m > 1,
            BLOCK_M=thin["BLOCK_M"], BLOCK_R=thin["BLOCK_R"], BLOCK_K=thin["BLOCK_K"], **launch, **dt,
        )  # fmt: skip
        da = da32.to(lora_a.dtype)

    # dX = [dY | dS'] · [W ; A], the dS' A half masked by keep.
    if need_dx:
        dx = torch.empty((m, k), device=dev, dtype=grad_y.dtype)
        kernel, meta = _gemm_launcher("_lora_bwd_dx_kernel", m * k * (n + r))
        grid = lambda META: (cdiv(m, META["BLOCK_M"]) * cdiv(k, META["BLOCK_N"]),)
        kernel[grid](
            grad_y, weight, ds32, lora_a, dx, m, n, k, r, next_power_of_2(m),
            grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
            ds32.stride(0), ds32.stride(1), lora_a.stride(0), lora_a.stride(1), dx.stride(0), dx.stride(1),
            config.seed, dropout_threshold(p),
            HAS_DROPOUT=config.has_dropout, **meta, **dt,
        )  # fmt: skip
    return dx, da, db


# ---------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------


class LoRALinearFunction(torch.autograd.Function):
    """Fused LoRA linear as one autograd node. Saves X (only if dA is needed) and S'; no [M, N] tensor."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        bias: torch.Tensor | None,
        config: LoRAConfig,
    ) -> torch.Tensor:
        y, s = lora_forward(x, weight, lora_a, lora_b, bias, config)  # x [M, K] (see lora_linear)
        ctx.config = config
        need_da, need_db = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        ctx.save_for_backward(x if need_da else None, weight, lora_a, lora_b, s if need_db else None)
        return y

    @staticmethod
    @once_differentiable  # kernels autograd cannot see: a second derivative raises, never silently 0
    def backward(ctx, grad_y: torch.Tensor):
        x2, weight, lora_a, lora_b, s = ctx.saved_tensors
        need_dx, need_dw, need_da, need_db, need_dbias, _ = ctx.needs_input_grad
        if need_dw or need_dbias:
            raise RuntimeError("fused LoRA never computes a gradient for the frozen weight or bias")
        dx, da, db = lora_backward(
            grad_y,
            x2,
            weight,
            lora_a,
            lora_b,
            s,
            ctx.config,
            need_dx=need_dx,
            need_da=need_da,
            need_db=need_db,
        )
        return dx, None, da, db, None, None


class LoRALinearTorchFunction(torch.autograd.Function):
    """The same algebra in torch ops: the CPU path (and ``kernels: torch``).

    Y is the base GEMM's output with the LoRA product added in place (``addmm_``), and dX is ``dY W``
    with ``dS' A`` added in place, so, as in the fused kernels, no ``[M, N]`` temporary exists beside
    Y (the autograd composition ``y + s · (X Aᵀ) Bᵀ`` makes three) and nothing of size ``[M, N]`` is
    saved. Dropout uses an explicit keep-mask (``dropout.draw_keep``), saved packed as bits.
    """

    @staticmethod
    def forward(ctx, x2, weight, lora_a, lora_b, bias, scale: float, keep2, dropout_p: float):
        a, b = lora_a.to(x2.dtype), lora_b.to(x2.dtype)  # x2 [M, K] (see lora_linear_torch)
        xd = x2 if keep2 is None else apply_keep(x2, keep2, dropout_p)
        s = xd @ a.t()  # [M, r]
        del xd
        y = F.linear(x2, weight, None if bias is None else bias.to(x2.dtype))  # as the kernel, any bias dtype
        y.addmm_(s, b.t(), alpha=scale)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        need_da, need_db = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        bits = None if keep2 is None else pack_keep(keep2)
        ctx.save_for_backward(x2 if need_da else None, weight, lora_a, lora_b, s if need_db else None, bits)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, s, bits = ctx.saved_tensors
        need_dx, need_dw, need_da, need_db, need_dbias = ctx.needs_input_grad[:5]
        if need_dw or need_dbias:
            raise RuntimeError("LoRA never computes a gradient for the frozen weight or bias")
        a, b = lora_a.to(dy.dtype), lora_b.to(dy.dtype)
        ds = (dy @ b).mul_(ctx.scale)  # [M, r]
        keep2 = None if bits is None else unpack_keep(bits, weight.shape[1])
        dx = da = db = None
        if need_dx:
            dx = dy @ weight.to(dy.dtype)
            if keep2 is None:
                dx.addmm_(ds, a)
            else:
                dx.add_(apply_keep_(ds @ a, keep2, ctx.dropout_p))
        if need_da:
            xd = x2 if keep2 is None else apply_keep(x2, keep2, ctx.dropout_p)
            da = (ds.t() @ xd).to(lora_a.dtype)
        if need_db:  # (Sᵀ dY)ᵀ: on the CPU 1.4-1.6x faster than dYᵀ S (oneDNN, [485, 1536] fp32, r = 16)
            db = (s.t() @ dy).mul_(ctx.scale).t().contiguous().to(lora_b.dtype)
        return dx, None, da, db, None, None, None, None


def unflatten_rows(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y [M, N]`` as ``[*x.shape[:-1], N]``. The autograd nodes take and return 2-D tensors, and this
    reshape happens outside them: a view made inside a custom Function cannot be modified in place (the
    models that add into a projection's output, ``out.add_(...)``, as Llama 4's MoE does, would fail)."""
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def lora_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``Y = X Wᵀ (+ b) + s · (D(X) Aᵀ) Bᵀ`` in torch ops (:class:`LoRALinearTorchFunction`), any device.

    The dropout keep-mask is drawn with torch's generator (``torch.manual_seed`` makes it repeatable).
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if (dt := autocast_dtype(x)) is not None:  # as autocast runs nn.Linear: in its dtype (_autocast.py)
        x, weight, bias = cast_to(dt, x, weight, bias)
        with autocast_off(x):
            return lora_linear_torch(x, weight, lora_a, lora_b, scale, bias, dropout_p)
    keep = draw_keep(x.shape, dropout_p, x.device) if dropout_p > 0.0 else None
    K = x.shape[-1]
    y = LoRALinearTorchFunction.apply(
        x.reshape(-1, K),
        weight,
        lora_a,
        lora_b,
        bias,
        float(scale),
        None if keep is None else keep.reshape(-1, K),
        float(dropout_p),
    )
    return unflatten_rows(y, x)


class LoRASiblingsTorchFunction(torch.autograd.Function):
    """n LoRA projections of one input without dropout, as one node (the module docstring's sibling
    algebra): one GEMM for every A forward and backward, and one dX buffer that every projection's
    ``dYᵢ Wᵢ`` is added into, instead of n dX tensors summed by autograd.

    ``apply(x, scales, *weights, *lora_as, *lora_bs, *biases)``: n of each, a bias may be None.
    """

    @staticmethod
    def forward(ctx, x, scales: tuple[float, ...], *tensors):
        n = len(scales)
        weights, lora_as, lora_bs, biases = (tensors[i * n : (i + 1) * n] for i in range(4))
        # x [M, K]: lora_siblings_torch flattens and unflattens around the node
        ranks = [a.shape[0] for a in lora_as]
        a_cat = torch.cat([a.to(x.dtype) for a in lora_as])  # [Σr, K]
        s_cat = x @ a_cat.t()  # [M, Σr]
        ys = []
        for w, b_, bias, s_i, scale in zip(
            weights, lora_bs, biases, s_cat.split(ranks, 1), scales, strict=True
        ):
            y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
            y.addmm_(s_i, b_.to(x.dtype).t(), alpha=scale)
            ys.append(y)
        need = ctx.needs_input_grad
        need_da = any(need[2 + n : 2 + 2 * n])
        need_db = any(need[2 + 2 * n : 2 + 3 * n])
        ctx.scales, ctx.ranks = scales, ranks
        ctx.save_for_backward(
            x if need_da else None, s_cat if need_db else None, *weights, *lora_as, *lora_bs
        )
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        x2, s_cat, *rest = ctx.saved_tensors
        n = len(ctx.scales)
        weights, lora_as, lora_bs = rest[:n], rest[n : 2 * n], rest[2 * n :]
        need = ctx.needs_input_grad
        if any(need[2 : 2 + n]) or any(need[2 + 3 * n :]):
            raise RuntimeError("LoRA never computes a gradient for the frozen weight or bias")
        # (an output nothing used arrives as zeros: autograd materializes it)
        dtype = dys[0].dtype
        ds_cat = torch.cat(
            [
                (dy @ b_.to(dy.dtype)).mul_(scale)
                for dy, b_, scale in zip(dys, lora_bs, ctx.scales, strict=True)
            ],
            dim=1,
        )  # [M, Σr]
        dx = None
        if need[0]:
            dx = dys[0] @ weights[0].to(dtype)
            for dy, w in zip(dys[1:], weights[1:], strict=True):
                dx.addmm_(dy, w.to(dtype))
            dx.addmm_(ds_cat, torch.cat([a.to(dtype) for a in lora_as]))
        das: list[torch.Tensor | None] = [None] * n
        if x2 is not None:
            da_cat = ds_cat.t() @ x2  # [Σr, K]
            das = [  # own storage each: .grad must not alias another parameter's
                d.to(a.dtype, copy=True) if need[2 + n + i] else None
                for i, (d, a) in enumerate(zip(da_cat.split(ctx.ranks), lora_as, strict=True))
            ]
        dbs: list[torch.Tensor | None] = [None] * n
        if s_cat is not None:
            dbs = [
                (s_i.t() @ dy).mul_(scale).t().contiguous().to(b_.dtype)
                if need[2 + 2 * n + i]
                else None  # (Sᵢᵀ dYᵢ)ᵀ: see LoRALinearTorchFunction.backward
                for i, (dy, s_i, scale, b_) in enumerate(
                    zip(dys, s_cat.split(ctx.ranks, 1), ctx.scales, lora_bs, strict=True)
                )
            ]
        return (dx, None, *([None] * n), *das, *dbs, *([None] * n))


def lora_siblings_torch(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor],
    scales: list[float],
    biases: list[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, ...]:
    """``Yᵢ = X Wᵢᵀ (+ bᵢ) + sᵢ · (X Aᵢᵀ) Bᵢᵀ`` for n projections of one X, as one node
    (:class:`LoRASiblingsTorchFunction`), any device. No dropout: each projection would draw its own
    mask, and the shared ``X Âᵀ`` GEMM needs one X.

    Returns:
        The n outputs, each as ``lora_linear_torch`` would give it.
    """
    n = len(weights)
    biases = list(biases) if biases is not None else [None] * n
    if not n or not (len(lora_as) == len(lora_bs) == len(scales) == len(biases) == n):
        raise ValueError("lora_siblings_torch: one A, B, scale and bias (or None) per weight")
    if (dt := autocast_dtype(x)) is not None:  # as autocast runs nn.Linear: in its dtype (_autocast.py)
        x, *frozen = cast_to(dt, x, *weights, *biases)
        with autocast_off(x):
            return lora_siblings_torch(x, frozen[:n], lora_as, lora_bs, scales, frozen[n:])
    K = x.shape[-1]
    for w, a, b_ in zip(weights, lora_as, lora_bs, strict=True):
        if w.shape[1] != K or a.shape[1] != K or b_.shape != (w.shape[0], a.shape[0]):
            raise ValueError(
                f"shapes disagree: x [..., {K}], W {tuple(w.shape)}, A {tuple(a.shape)}, B {tuple(b_.shape)}"
            )
    ys = LoRASiblingsTorchFunction.apply(
        x.reshape(-1, K), tuple(float(s) for s in scales), *weights, *lora_as, *lora_bs, *biases
    )
    return tuple(unflatten_rows(y, x) for y in ys)


# ---------------------------------------------------------------------------------------------------
# Functional
# ---------------------------------------------------------------------------------------------------


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """Fused LoRA linear ``Y = X Wᵀ (+ b) + s · (D(X) Aᵀ) Bᵀ`` with Triton kernels.

    Args:
        x: input ``[..., K]``.
        weight: frozen base weight ``W [N, K]`` (must not require grad: there is no dW).
        lora_a: ``A [r, K]``, r <= 256.
        lora_b: ``B [N, r]``.
        scale: ``s = alpha / r``.
        bias: optional frozen bias ``[N]``.
        dropout_p: dropout probability on the LoRA branch's input; pass 0 in eval mode.
        dropout_seed: Philox seed of the mask (``reference.dropout_keep_mask`` reproduces it); drawn from
            torch's CPU generator when None, so ``torch.manual_seed`` makes runs repeatable.

    Returns:
        ``Y [..., N]`` in x's dtype.

    Raises:
        ValueError: on a bad dropout probability, mismatched shapes, or a frozen weight/bias requiring grad.
        TypeError: on unsupported dtypes.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("the fused LoRA path keeps weight and bias frozen: set requires_grad=False on them")
    if (dt := autocast_dtype(x)) is not None:  # as autocast runs nn.Linear: in its dtype (_autocast.py)
        x, weight, bias = cast_to(dt, x, weight, bias)
        with autocast_off(x):
            return lora_linear(x, weight, lora_a, lora_b, scale, bias, dropout_p, dropout_seed=dropout_seed)
    seed = 0
    if dropout_p > 0.0:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_seed is None else int(dropout_seed)
    config = LoRAConfig(scale=float(scale), dropout_p=float(dropout_p), seed=seed)
    return unflatten_rows(
        LoRALinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, lora_a, lora_b, bias, config), x
    )
