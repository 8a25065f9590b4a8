"""Matmul over a frozen quantized weight, decoded inside the K loop, with the LoRA update folded in.

For ``X [M, K]`` (leading dimensions flattened into M), a frozen quantized ``W [N, K]`` (NF4/FP4 in
bitsandbytes' layout, or int8 row-wise; see ``quant.py``), trainable ``A [r, K]``, ``B [N, r]``,
``s = alpha / r`` and dropout ``D`` (``D(X) = X ⊙ keep / (1 - p)``)::

    S  = D(X) Aᵀ                                  [M, r]   torch (a thin GEMM)
    Y  = X deq(W)ᵀ + (s S) Bᵀ (+ b)               [M, N]   _qmatmul_fwd_kernel
    dS = s dY B                                   [M, r]   torch
    dB = s dYᵀ S                                  [N, r]   torch
    dA = dSᵀ D(X)                                 [r, K]   torch
    dX = dY deq(W) + D'(dS A)                     [M, K]   _qmatmul_bwd_dx_kernel

``deq(W)`` never exists in memory on the fused path: every ``[BLOCK_N, BLOCK_K]`` tile of W is read as
packed bytes (0.5 byte per weight for 4-bit, 1 for int8) plus its block scales, decoded in registers
(``code[q] · absmax[block]``, double-quantized absmax decoded on the fly), cast to the compute dtype and
fed to ``tl.dot`` with fp32 accumulation. The forward reads tiles of W along K; dX reads the same
packed weight along N (``W`` rather than ``Wᵀ``), so there is one stored copy of W. There is no dW.

Without dropout the LoRA term of dX shares the accumulator (``[dY | dS] · [W ; A]``); with dropout
(``D' = keep / (1 - p)``) it is added outside the kernel. Saved for backward: X (only when dA is
needed), S ``[M, r]`` and the keep-mask packed as bits when p > 0 (``dropout.py``); never a
dequantized W.

Dispatch: when the GEMM is long enough to be compute-bound, decoding W once into a temporary and
calling cuBLAS wins; ``use_dequant_gemm`` chooses, by a threshold measured on an H200 (see
``DEQUANT_MIN_TOKENS``). The temporary lives for one GEMM and is never saved for backward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import quant
from ._autocast import autocast_dtype, autocast_off, cast_to
from ._triton import TORCH_TO_TL, cdiv, interpreter_active, next_power_of_2, tl, triton
from .dropout import apply_keep, apply_keep_, draw_keep, pack_keep, unpack_keep
from .lora import unflatten_rows
from .quant import PackedWeight, PackedWeightInt8, _cast_rne, _decode_4bit, _decode_absmax

__all__ = [
    "DEQUANT_MIN_TOKENS",
    "QLoRAConfig",
    "QLoRALinearFunction",
    "qlora_linear",
    "qmatmul_backward_dx",
    "qmatmul_forward",
    "use_dequant_gemm",
]

# At or above this many tokens the dequantize + cuBLAS path runs. Measured on an NVIDIA H200 (torch 2.11,
# Triton 3.6, commit 99b4beb; bench/results/qmatmul_nf4_targets-h200.md), NF4 with double quant, bf16,
# fused time / (Triton dequantize + cuBLAS) time, Llama-3-8B shapes 4096->4096, 4096->14336, 14336->4096:
#   M =   512: forward 1.57/3.49/3.59x, dX 2.07/2.63/2.70x, QLoRA layer fwd+bwd 1.02/1.06/1.02x slower
#   M =  2048: forward 4.5-5.6x, dX 3.0-5.1x slower;  M = 8192 and 16384: 4.6-7.1x slower
# so dequantize + cuBLAS from the smallest M measured. The fused kernel decodes ~20 instructions per
# weight per M tile (50-170 TFLOPS against cuBLAS's ~700), while the dequantize is one pass of 0.06 ms
# for a 4096x4096 weight. Below 512 tokens nothing was measured: the fused kernel stays there, where it
# decodes W for one or two M tiles only; bench/gpu_qmatmul.py measures M = 128 and 256 for the next card.
DEQUANT_MIN_TOKENS = 512
MAX_RANK = 256
_FORMAT_4BIT, _FORMAT_INT8 = 0, 1

# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _grouped_tile(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """Map a linear program id to a (row tile, col tile) pair, GROUP row tiles at a time (L2 reuse)."""
    in_group = GROUP * n_cols
    group = pid // in_group
    first = group * GROUP
    size = tl.minimum(n_rows - first, GROUP)
    return first + (pid % in_group) % size, (pid % in_group) // size


@triton.jit
def _load_w_tile(
    w_ptr,  # *u8 packed 4-bit [(N·K + 1) // 2]  |  *i8 [N, K] (FORMAT int8)
    absmax_ptr,  # *fp32 [n_blocks] | *u8 [n_blocks] (NESTED)       |  *fp32 [N] row scales (int8)
    nested_absmax_ptr,  # *fp32 nested scales (NESTED only)
    nested_code_ptr,  # *fp32 [256] (NESTED only)
    offset_ptr,  # *fp32 [1] (NESTED only)
    code_ptr,  # *fp32 [16] code table (4-bit, CODE == CODE_TABLE only)
    offs_n,  # [BLOCK_N] row indices of W
    k_first,  # first column of this tile (a multiple of BLOCK_K)
    N,
    K,
    FORMAT: tl.constexpr,  # 0: 4-bit bnb layout, 1: int8 row-wise
    BLOCKSIZE: tl.constexpr,  # 4-bit absmax block
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr,  # K % BLOCKSIZE == 0 and BLOCKSIZE % BLOCK_K == 0: one scale per tile row
    CODE: tl.constexpr,  # 4-bit decode (quant.code_mode)
    K_EVEN: tl.constexpr,  # K % 2 == 0: rows are whole bytes
    BLOCK_K: tl.constexpr,
):
    """Decode a ``[BLOCK_N, BLOCK_K]`` tile of ``deq(W)`` in fp32 straight from the packed weight.

    4-bit with K even: a row of W is a whole number of bytes, so the tile is read as contiguous
    ``[BLOCK_N, BLOCK_K / 2]`` bytes, both nibbles are decoded, and ``tl.interleave`` puts element 2i
    (high nibble) before 2i + 1. Odd K (rows that start mid-byte) reads each element's byte.
    """
    offs_k = k_first + tl.arange(0, BLOCK_K)
    rows = offs_n < N
    mask = rows[:, None] & (offs_k < K)[None, :]
    if FORMAT == 0:
        if K_EVEN:
            HALF_K: tl.constexpr = BLOCK_K // 2
            offs_b = k_first // 2 + tl.arange(0, HALF_K)  # byte column within the row
            bmask = rows[:, None] & (offs_b < K // 2)[None, :]
            byte = tl.load(w_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :], mask=bmask, other=0)
            byte = byte.to(tl.int32)
            hi = _decode_4bit((byte >> 4) & 0xF, code_ptr, CODE)
            lo = _decode_4bit(byte & 0xF, code_ptr, CODE)
            if SCALE_PER_ROW:
                scale = _decode_absmax(
                    absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, (offs_n * K + k_first) // BLOCKSIZE,
                    rows, NESTED, NESTED_BLOCKSIZE,
                )[:, None]  # fmt: skip
            else:  # both elements of a byte share a block (blocks start at even elements)
                scale = _decode_absmax(
                    absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                    (offs_n[:, None] * K + 2 * offs_b[None, :]) // BLOCKSIZE, bmask, NESTED, NESTED_BLOCKSIZE,
                )  # fmt: skip
            w = tl.interleave(hi * scale, lo * scale)
        else:
            e = offs_n[:, None] * K + offs_k[None, :]  # flat index into the row-major weight
            byte = tl.load(w_ptr + e // 2, mask=mask, other=0).to(tl.int32)
            q = (byte >> (4 - 4 * (e % 2))) & 0xF  # element 2i sits in the high nibble of byte i
            scale = _decode_absmax(
                absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, e // BLOCKSIZE, mask, NESTED,
                NESTED_BLOCKSIZE,
            )  # fmt: skip
            w = _decode_4bit(q, code_ptr, CODE) * scale
    else:
        q = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0).to(tl.float32)
        scale = tl.load(absmax_ptr + offs_n, mask=rows, other=0.0).to(tl.float32)
        w = q * scale[:, None] * 7.874015718698502e-3  # (q · s) · (1/127), as bnb
    return tl.where(mask, w, 0.0)


@triton.jit
def _qmatmul_fwd_kernel(
    x_ptr,  # *T [M, K] input
    w_ptr,  # packed weight (see _load_w_tile)
    absmax_ptr,  # block / row scales
    nested_absmax_ptr,  # double-quant scales
    nested_code_ptr,  # double-quant map
    offset_ptr,  # double-quant offset
    code_ptr,  # 4-bit code table
    s_ptr,  # *T [M, R]: s · D(X) Aᵀ (HAS_LORA)
    b_ptr,  # *T [N, R]: LoRA B (HAS_LORA)
    bias_ptr,  # *T [N] (HAS_BIAS)
    y_ptr,  # *T [M, N] out
    M,
    N,
    K,
    R,  # LoRA rank
    stride_xm,  # x row stride
    stride_xk,  # x column stride
    stride_sm,  # S row stride (column stride 1)
    stride_bn,  # B row stride (column stride 1)
    stride_ym,  # y row stride (column stride 1)
    FORMAT: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    CODE: tl.constexpr,  # 4-bit decode (quant.code_mode)
    K_EVEN: tl.constexpr,  # K % 2 == 0
    K_ALIGNED: tl.constexpr,  # K % BLOCKSIZE == 0
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    W_DTYPE: tl.constexpr,  # dtype deq(W) is rounded to (the compute dtype), as bnb's dequantize
    DOT_DTYPE: tl.constexpr,  # operand dtype of tl.dot (fp32 under the interpreter)
    EMULATE_RNE: tl.constexpr,  # interpreter: round deq(W) to bf16 by hand (its cast truncates)
    PRECISION: tl.constexpr,  # "ieee" for fp32 operands, else "tf32" (ignored for 16-bit)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``Y = X deq(W)ᵀ + S' Bᵀ (+ b)`` with W decoded tile by tile inside the K loop."""
    SCALE_PER_ROW: tl.constexpr = K_ALIGNED and (BLOCKSIZE % BLOCK_K == 0)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m < M)[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )
        w = _load_w_tile(
            w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, offs_n, k0, N, K,
            FORMAT, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, SCALE_PER_ROW, CODE, K_EVEN, BLOCK_K,
        )  # fmt: skip
        w = _cast_rne(w, W_DTYPE, EMULATE_RNE)
        acc += tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=PRECISION)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        s = tl.load(
            s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :],
            mask=(offs_m < M)[:, None] & (offs_r < R)[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :],
            mask=(offs_n < N)[:, None] & (offs_r < R)[None, :],
            other=0.0,
        )
        acc += tl.dot(s.to(DOT_DTYPE), tl.trans(b.to(DOT_DTYPE)), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=(offs_m < M)[:, None] & (offs_n < N)[None, :],
    )


@triton.jit
def _qmatmul_bwd_dx_kernel(
    dy_ptr,  # *T [M, N] upstream gradient
    w_ptr,  # packed weight (see _load_w_tile)
    absmax_ptr,  # block / row scales
    nested_absmax_ptr,  # double-quant scales
    nested_code_ptr,  # double-quant map
    offset_ptr,  # double-quant offset
    code_ptr,  # 4-bit code table
    ds_ptr,  # *T [M, R]: dS = s dY B (HAS_LORA)
    a_ptr,  # *T [R, K]: LoRA A (HAS_LORA)
    dx_ptr,  # *T [M, K] out
    M,
    N,
    K,
    R,  # LoRA rank
    stride_dym,  # dY row stride
    stride_dyn,  # dY column stride
    stride_dsm,  # dS row stride (column stride 1)
    stride_ar,  # A row stride (column stride 1)
    stride_dxm,  # dX row stride (column stride 1)
    FORMAT: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    CODE: tl.constexpr,
    K_EVEN: tl.constexpr,
    K_ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr,
    W_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # reduction step over N
    BLOCK_K: tl.constexpr,  # output tile width over K
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``dX = dY deq(W) + dS A``: the same packed W, tiles walked down N for a fixed K range."""
    SCALE_PER_ROW: tl.constexpr = K_ALIGNED and (BLOCKSIZE % BLOCK_K == 0)
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_first = pid_k * BLOCK_K
    offs_k = k_first + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=(offs_m < M)[:, None] & (offs_n < N)[None, :],
            other=0.0,
        )
        w = _load_w_tile(
            w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, offs_n, k_first, N, K,
            FORMAT, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, SCALE_PER_ROW, CODE, K_EVEN, BLOCK_K,
        )  # fmt: skip
        w = _cast_rne(w, W_DTYPE, EMULATE_RNE)
        acc += tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=PRECISION)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        ds = tl.load(
            ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :],
            mask=(offs_m < M)[:, None] & (offs_r < R)[None, :],
            other=0.0,
        )
        a = tl.load(
            a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :],
            mask=(offs_r < R)[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )
        acc += tl.dot(ds.to(DOT_DTYPE), a.to(DOT_DTYPE), input_precision=PRECISION)
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=(offs_m < M)[:, None] & (offs_k < K)[None, :],
    )


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def use_dequant_gemm(m: int, n: int, k: int) -> bool:
    """True when dequantize-once + cuBLAS beats the fused kernel (the measured ``DEQUANT_MIN_TOKENS``)."""
    del n, k  # on the H200 the crossover did not depend on the projection's shape
    return m >= DEQUANT_MIN_TOKENS


def _weight_args(pw: PackedWeight) -> tuple[list[torch.Tensor], dict]:
    """Kernel pointer arguments and constexprs describing the packed weight (read as dense row-major
    buffers: a strided view, such as a column slice of an int8 weight, is copied first)."""
    if isinstance(pw, PackedWeightInt8):
        s = pw.scale.contiguous()
        return [pw.qweight.contiguous(), s, s, s, s, s], {
            "FORMAT": _FORMAT_INT8,
            "BLOCKSIZE": 64,
            "NESTED": False,
            "NESTED_BLOCKSIZE": 256,
            "CODE": quant.CODE_TABLE,
            "K_EVEN": False,
            "K_ALIGNED": False,
        }
    nested = [t.contiguous() for t in quant._nested_args(pw)]
    return [pw.packed.contiguous(), pw.absmax.contiguous(), *nested, pw.code.contiguous()], {
        "FORMAT": _FORMAT_4BIT,
        "BLOCKSIZE": pw.blocksize,
        "NESTED": pw.nested,
        "NESTED_BLOCKSIZE": pw.nested_blocksize,
        "CODE": quant.code_mode(pw.quant_type, quant.DECODE_SELECT),
        "K_EVEN": pw.shape[1] % 2 == 0,
        "K_ALIGNED": pw.shape[1] % pw.blocksize == 0,
    }


def _dot_args(dtype: torch.dtype) -> dict:
    if interpreter_active():  # the interpreter's 16-bit arithmetic is not IEEE: dot in fp32
        return {
            "W_DTYPE": TORCH_TO_TL[dtype],
            "DOT_DTYPE": tl.float32,
            "PRECISION": "ieee",
            "EMULATE_RNE": True,
        }
    return {
        "W_DTYPE": TORCH_TO_TL[dtype],
        "DOT_DTYPE": TORCH_TO_TL[dtype],
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "EMULATE_RNE": False,
    }


# Forward-kernel tiles to use instead of _tiles' choice ({"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps",
# "num_stages"}; dX swaps BLOCK_N and BLOCK_K): set by bench/gpu_qmatmul.py's tile sweep, never in training.
TILES_OVERRIDE: dict | None = None


def _tiles(m: int, rank: int, wmeta: dict, dtype: torch.dtype, dx: bool = False) -> dict:
    """Fixed tiles (no autotuning: the interpreter cannot time), from the H200 tile sweep.

    Forward tiles; the dX launcher swaps BLOCK_N (there the reduction) and BLOCK_K.
    """
    blocksize = wmeta["BLOCKSIZE"]
    block_r = max(16, next_power_of_2(rank))
    if interpreter_active():
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_R": block_r, "GROUP_M": 8}
    if TILES_OVERRIDE is not None:
        return {"BLOCK_R": block_r, "GROUP_M": 8, **TILES_OVERRIDE}
    # bench/results/qmatmul_nf4_sweep-h200.md (K = N = 4096, NF4 + double quant, bf16; forward / dX ms):
    #   M = 512:  128x64 (4 warps, 4 stages) 0.204 / 0.246, 128x128 (8, 3) 0.235 / 0.213, 256x128 0.252 / 0.248
    #   M = 2048: 256x128 (8 warps, 3 stages) 0.483 / 0.620, 128x128 0.776 / 0.654, 128x64 0.653 / 0.641
    #   M = 8192: 256x128 1.621 / 1.911, 128x128 2.674 / 2.158
    # BLOCK_K <= blocksize keeps one absmax per tile row; dX's K tile (the swapped BLOCK_N) is clamped to
    # the blocksize too, so at blocksize 64 its 128x128 and 128x64 rows differ in warps and stages only.
    # M <= 64: one 64-row tile (not swept).
    if m >= 2048:
        block_m, block_n, warps, stages = 256, 128, 8, 3
    elif m > 64 and not dx:
        block_m, block_n, warps, stages = 128, 64, 4, 4
    elif m > 64:
        block_m, block_n, warps, stages = 128, 128, 8, 3
    else:
        block_m, block_n, warps, stages = 64, 128, 4, 3
    tiles = {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": min(64, blocksize),
        "BLOCK_R": block_r,
        "GROUP_M": 8,
        "num_warps": warps,
        "num_stages": stages,
    }
    # Shared memory on sm_90 (227 KiB a block; sizes from compiling offline with Triton 3.6/3.7): the
    # per-element scale gathers (K not a multiple of the block size) need 229-262 KiB at 3 stages and
    # 128-147 KiB at 2; fp32 operands with the rank-256 LoRA tile need 256 KiB at 128x128 tiles.
    if wmeta["FORMAT"] == _FORMAT_4BIT and not wmeta["K_ALIGNED"]:  # BLOCK_K always divides blocksize
        tiles["num_stages"] = 2
    if dtype == torch.float32:  # the tests' dtype, not a training one: small tiles that fit
        tiles.update(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    return tiles


def _check(
    x: torch.Tensor,
    pw: PackedWeight,
    rows: torch.Tensor | None,
    factor: torch.Tensor | None,
    factor_shape: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> None:
    """Validate a fused launch before it reads memory by the shapes it is given.

    Args:
        x: the ``[M, ·]`` activation (X, or dY for dX).
        rows: the ``[M, r]`` LoRA side input (``S'`` or ``dS``), or None.
        factor: the LoRA factor it multiplies (``B [N, r]`` or ``A [r, K]``), with ``rows``.
        factor_shape: ``factor``'s expected shape.
        bias: optional ``[N]``.
    """
    if x.dtype not in TORCH_TO_TL:
        raise ValueError(f"expected a fp32/fp16/bf16 input, got {x.dtype}")
    if (rows is None) != (factor is None):
        raise ValueError("the LoRA term needs both its [M, r] input and its factor")
    data = pw.qweight if isinstance(pw, PackedWeightInt8) else pw.packed
    tensors = {"weight": data, "lora input": rows, "lora factor": factor, "bias": bias}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, the input on {x.device}")
    if x.device.type != "cuda" and not interpreter_active():
        raise RuntimeError("the fused quantized matmul needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    if rows is not None:
        r = rows.shape[-1]
        if rows.dim() != 2 or rows.shape[0] != x.shape[0]:
            raise ValueError(f"the LoRA input must be [{x.shape[0]}, r], got {tuple(rows.shape)}")
        if not 1 <= r <= MAX_RANK:
            raise ValueError(f"LoRA rank must be in [1, {MAX_RANK}] for the fused kernels, got {r}")
        want = tuple(r if d == -1 else d for d in factor_shape)
        if tuple(factor.shape) != want:
            raise ValueError(f"the LoRA factor must be {list(want)}, got {list(factor.shape)}")
    if bias is not None and tuple(bias.shape) != (pw.shape[0],):
        raise ValueError(f"bias must be [{pw.shape[0]}], got {list(bias.shape)}")


def qmatmul_forward(
    x: torch.Tensor,
    pw: PackedWeight,
    s_scaled: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``Y = X deq(W)ᵀ (+ S' Bᵀ) (+ b)``.

    Args:
        x: ``[M, K]`` fp32/fp16/bf16 (any strides).
        pw: the packed weight ``[N, K]``.
        s_scaled: optional ``S' = s · D(X) Aᵀ`` ``[M, r]`` (dtype of x).
        lora_b: ``B [N, r]`` (with ``s_scaled``).
        bias: optional ``[N]``.

    Returns:
        ``Y [M, N]`` in the dtype of x.

    Raises:
        ValueError: shapes or dtypes disagree.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D, got shape {tuple(x.shape)}")
    M, K = x.shape
    N, Kw = pw.shape
    if Kw != K:
        raise ValueError(f"x has K={K} but the weight is {pw.shape}")
    _check(x, pw, s_scaled, lora_b, (N, -1), bias)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    has_lora = s_scaled is not None
    if has_lora:
        s_scaled = s_scaled.to(x.dtype).contiguous()
        lora_b = lora_b.to(x.dtype).contiguous()
    if bias is not None:
        bias = bias.contiguous()  # read as bias_ptr + column
    rank = s_scaled.shape[1] if has_lora else 1
    wargs, wmeta = _weight_args(pw)
    tiles = _tiles(M, rank, wmeta, x.dtype)
    grid = (cdiv(M, tiles["BLOCK_M"]) * cdiv(N, tiles["BLOCK_N"]),)
    _qmatmul_fwd_kernel[grid](
        x,
        *wargs,
        s_scaled if has_lora else y,
        lora_b if has_lora else y,
        bias if bias is not None else y,
        y,
        M,
        N,
        K,
        rank,
        x.stride(0),
        x.stride(1),
        s_scaled.stride(0) if has_lora else 0,
        lora_b.stride(0) if has_lora else 0,
        y.stride(0),
        HAS_LORA=has_lora,
        HAS_BIAS=bias is not None,
        **wmeta,
        **_dot_args(x.dtype),
        **tiles,
    )
    return y


def qmatmul_backward_dx(
    dy: torch.Tensor,
    pw: PackedWeight,
    ds: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``dX = dY deq(W) (+ dS A)``, reading the packed W along N.

    Args:
        dy: ``[M, N]``.
        pw: the packed weight ``[N, K]``.
        ds: optional ``dS = s dY B`` ``[M, r]``.
        lora_a: ``A [r, K]`` (with ``ds``).

    Returns:
        ``dX [M, K]`` in the dtype of dy.
    """
    if dy.dim() != 2:
        raise ValueError(f"dy must be 2-D, got shape {tuple(dy.shape)}")
    M, N = dy.shape
    Nw, K = pw.shape
    if Nw != N:
        raise ValueError(f"dY has N={N} but the weight is {pw.shape}")
    _check(dy, pw, ds, lora_a, (-1, K))
    dx = torch.empty(M, K, dtype=dy.dtype, device=dy.device)
    has_lora = ds is not None
    if has_lora:
        ds = ds.to(dy.dtype).contiguous()
        lora_a = lora_a.to(dy.dtype).contiguous()
    rank = ds.shape[1] if has_lora else 1
    wargs, wmeta = _weight_args(pw)
    tiles = _tiles(M, rank, wmeta, dy.dtype, dx=True)
    tiles["BLOCK_N"], tiles["BLOCK_K"] = tiles["BLOCK_K"], tiles["BLOCK_N"]  # reduce over N, tile over K
    if wmeta["FORMAT"] == _FORMAT_4BIT and not interpreter_active():
        tiles["BLOCK_K"] = min(tiles["BLOCK_K"], wmeta["BLOCKSIZE"])  # keep one scale per tile row
    grid = (cdiv(M, tiles["BLOCK_M"]) * cdiv(K, tiles["BLOCK_K"]),)
    _qmatmul_bwd_dx_kernel[grid](
        dy,
        *wargs,
        ds if has_lora else dx,
        lora_a if has_lora else dx,
        dx,
        M,
        N,
        K,
        rank,
        dy.stride(0),
        dy.stride(1),
        ds.stride(0) if has_lora else 0,
        lora_a.stride(0) if has_lora else 0,
        dx.stride(0),
        HAS_LORA=has_lora,
        **wmeta,
        **_dot_args(dy.dtype),
        **tiles,
    )
    return dx


# ---------------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QLoRAConfig:
    """Static settings of one QLoRA linear call.

    Attributes:
        scale: ``s = alpha / r``.
        dropout_p: LoRA dropout probability (the keep-mask is drawn by the caller).
        backend: ``"triton"`` (fused kernels) or ``"torch"`` (reference dequantize + torch matmul).
        path: ``"auto"`` (``use_dequant_gemm`` decides), ``"fused"`` or ``"dequant"`` (Triton only).
    """

    scale: float
    dropout_p: float = 0.0
    backend: Literal["torch", "triton"] = "triton"
    path: Literal["auto", "fused", "dequant"] = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {self.dropout_p}")
        if self.backend not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {self.backend!r}")
        if self.path not in ("auto", "fused", "dequant"):
            raise ValueError(f"path must be 'auto', 'fused' or 'dequant', got {self.path!r}")


def _fused(cfg: QLoRAConfig, m: int, pw: PackedWeight) -> bool:
    if cfg.backend == "torch" or cfg.path == "dequant":
        return False
    return cfg.path == "fused" or not use_dequant_gemm(m, *pw.shape)


def _dense(pw: PackedWeight, dtype: torch.dtype, cfg: QLoRAConfig) -> torch.Tensor:
    """The one-GEMM temporary of the dequantize path (never saved).

    On the torch path with a CPU 4-bit weight this is bitsandbytes' native CPU dequantize when it is
    installed: bit-identical to ``reference.dequantize_4bit`` (tests/kernels/test_qmatmul.py) and 15x
    faster (SmolLM2's 1536x576 NF4 weight, 1 thread: 0.18 ms vs 2.8 ms), which is most of a CPU QLoRA
    step's overhead over LoRA. Elsewhere the reference (torch) or the Triton kernel (triton).

    bnb's CPU kernel (0.50, AVX-512) looks a 2-D weight's absmax up per row, which is wrong when a block
    straddles two rows (``K % blocksize != 0``: SmolLM2's K = 576 at blocksize 128). Such a weight is
    handed to it as one flat row, where the per-row lookup is the flat index's.
    """
    if (
        cfg.backend == "torch"
        and isinstance(pw, quant.PackedWeight4bit)
        and pw.packed.device.type == "cpu"
        and dtype in (torch.float16, torch.bfloat16, torch.float32)  # bnb's; fp64 (gradcheck): the reference
    ):
        bnb_dequantize = _bnb_dequantize_4bit()
        if bnb_dequantize is not None:
            data, state = pw.to_bnb()
            state.dtype = dtype  # bnb computes in fp32 and rounds once, into this dtype: as the reference
            n_rows, k = pw.shape
            if k % pw.blocksize:
                state.shape = torch.Size([n_rows * k])
                return bnb_dequantize(data, state).reshape(n_rows, k)
            return bnb_dequantize(data, state)
    return quant.dequantize(pw, dtype, backend=cfg.backend)


@functools.cache
def _bnb_dequantize_4bit():
    try:
        from bitsandbytes.functional import dequantize_4bit
    except ImportError:
        return None
    return dequantize_4bit


_BIAS_GRAD_ERROR = "QLoRA never computes a gradient for the frozen bias (it requires grad here)"


class QLoRALinearFunction(torch.autograd.Function):
    """QLoRA linear over a packed frozen weight; saves X, S (and the keep-mask), never deq(W)."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        bias: torch.Tensor | None,
        keep: torch.Tensor | None,
        pw: PackedWeight,
        cfg: QLoRAConfig,
    ) -> torch.Tensor:
        # x [M, K] and keep its [M, K] mask or None: qlora_linear flattens and unflattens around the node
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        xd = x if keep is None else apply_keep(x, keep, cfg.dropout_p)
        s = xd @ a.t()  # [M, r]
        del xd
        if _fused(cfg, x.shape[0], pw):
            y = qmatmul_forward(x, pw, s * cfg.scale, b, bias)
        else:
            bias_ = None if bias is None else bias.to(x.dtype)  # as the fused kernel: any bias dtype
            y = F.linear(x, _dense(pw, x.dtype, cfg), bias_).addmm_(s, b.t(), alpha=cfg.scale)
        ctx.pw, ctx.cfg = pw, cfg
        bits = None if keep is None else pack_keep(keep)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, s, lora_a, lora_b, bits)
        return y

    @staticmethod
    @once_differentiable  # kernels autograd cannot see: a second derivative raises, never silently 0
    def backward(ctx, dy: torch.Tensor):
        x, s, lora_a, lora_b, bits = ctx.saved_tensors
        pw, cfg = ctx.pw, ctx.cfg
        if ctx.needs_input_grad[3]:  # qlora_linear refuses this up front; a direct apply ends here
            raise RuntimeError(_BIAS_GRAD_ERROR)
        K = pw.shape[1]
        a, b = lora_a.to(dy.dtype), lora_b.to(dy.dtype)
        ds = cfg.scale * (dy @ b)  # [M, r]
        keep2 = None if bits is None else unpack_keep(bits, K)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            fold = keep2 is None
            if _fused(cfg, dy.shape[0], pw):
                dx = qmatmul_backward_dx(dy, pw, ds if fold else None, a if fold else None)
            else:
                dx = dy @ _dense(pw, dy.dtype, cfg)
                if fold:
                    dx.addmm_(ds, a)
            if not fold:
                dx.add_(apply_keep_(ds @ a, keep2, cfg.dropout_p))
        if ctx.needs_input_grad[1]:
            xd = x if keep2 is None else apply_keep(x, keep2, cfg.dropout_p)
            da = (ds.t() @ xd).to(lora_a.dtype)
        if ctx.needs_input_grad[2]:
            db = (s.t() @ dy).mul_(cfg.scale).t().contiguous().to(lora_b.dtype)  # (Sᵀ dY)ᵀ: see lora.py
        return dx, da, db, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# Functional
# ---------------------------------------------------------------------------------------------------


def qlora_linear(
    x: torch.Tensor,
    pw: PackedWeight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: Literal["torch", "triton"] = "triton",
    path: Literal["auto", "fused", "dequant"] = "auto",
) -> torch.Tensor:
    """QLoRA linear ``Y = X deq(W)ᵀ (+ b) + s · (D(X) Aᵀ) Bᵀ`` over a packed frozen weight.

    Args:
        x: ``[..., K]``.
        pw: ``PackedWeight4bit`` or ``PackedWeightInt8`` of shape ``[N, K]``.
        lora_a: ``A [r, K]``; lora_b: ``B [N, r]``.
        scale: ``s = alpha / r``.
        bias: optional frozen ``[N]``.
        dropout_p: LoRA dropout probability (a keep-mask is drawn here when > 0).
        backend: ``"triton"`` (fused kernels) or ``"torch"`` (reference dequantize + matmul).
        path: ``"auto"``, ``"fused"`` or ``"dequant"`` (see ``use_dequant_gemm``).

    Returns:
        ``Y [..., N]`` in the dtype of x (under ``torch.autocast``: x and the bias are cast to its dtype
        first, as for an ``nn.Linear``).

    Raises:
        ValueError: a dropout probability outside [0, 1), an unknown backend or path, or A/B shapes
            that do not fit the weight.
        RuntimeError: a bias that requires grad (the base stays frozen).
    """
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(_BIAS_GRAD_ERROR)  # before any work: the backward has no gradient for it
    if (dt := autocast_dtype(x)) is not None:  # as autocast runs nn.Linear: in its dtype (_autocast.py)
        x, bias = cast_to(dt, x, bias)
        with autocast_off(x):
            return qlora_linear(x, pw, lora_a, lora_b, scale, bias, dropout_p, backend, path)
    cfg = QLoRAConfig(scale=float(scale), dropout_p=float(dropout_p), backend=backend, path=path)
    N, K = pw.shape
    if x.shape[-1] != K or lora_a.dim() != 2 or lora_a.shape[1] != K:
        raise ValueError(
            f"in_features mismatch: x {tuple(x.shape)}, weight {tuple(pw.shape)}, A {tuple(lora_a.shape)}"
        )
    if tuple(lora_b.shape) != (N, lora_a.shape[0]):
        raise ValueError(
            f"lora_b must be [{N}, {lora_a.shape[0]}] (out_features, rank), got {tuple(lora_b.shape)}"
        )
    keep = draw_keep(x.shape, dropout_p, x.device) if dropout_p > 0.0 else None
    keep2 = None if keep is None else keep.reshape(-1, K)
    y = QLoRALinearFunction.apply(x.reshape(-1, K), lora_a, lora_b, bias, keep2, pw, cfg)
    return unflatten_rows(y, x)
