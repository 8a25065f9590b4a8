"""Frozen-weight formats: NF4 / FP4 in bitsandbytes' layout and int8 row-wise; quantize and dequantize.

4-bit (NF4 or FP4), exactly ``bitsandbytes.functional.quantize_4bit``. For ``W [N, K]`` the flat
row-major index is ``e = n·K + k`` and the ``n = N·K`` elements fall in blocks ``b = e // blocksize``
(so a block straddles two rows when ``K % blocksize != 0``)::

    absmax[b] = max_{e in b} |W_e|                                         fp32 [ceil(n / blocksize)]
    x_e       = clamp(W_e · (1 / absmax[b]), -1, 1)      (the short tail block divides: W_e / absmax[b])
    q_e       = order[#{bounds < x_e}]   bounds = 15 midpoints of the sorted 16-entry code table
    packed[i] = q_{2i} << 4 | q_{2i+1}                                     uint8 [(n + 1) // 2]
    deq(W)_e  = code[q_e] · absmax[b]                        fp32, then cast to the compute dtype

Double quant (``compress_statistics``): ``offset = mean(absmax)``, and ``absmax - offset`` is itself
quantized blockwise (256) with bnb's dynamic 8-bit map, using bnb's CPU rule (a 65536-bin lookup
table, see ``reference.quantize_blockwise_8bit``)::

    absmax[b] = dyn[qabsmax[b]] · nested_absmax[b // 256] + offset         (two fp32 roundings)

int8 row-wise, as ``bnb.nn.Linear8bitLt`` stores a weight (cast to fp16 first)::

    scale[n] = max_k |W[n, k]|;   q[n, k] = round_half_even(W[n, k] · (127 / scale[n]))
    deq(W)[n, k] = (q[n, k] · scale[n]) · (1 / 127)

Each Triton kernel below has its pure-torch twin in ``reference.py``; both are bit-exact against
bitsandbytes 0.50 on CPU. On a GPU the kernels are launched without FMA contraction
(``exact_fp_options``) so that they round like the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from . import reference
from ._triton import cdiv, exact_fp_options, interpreter_active, tl, triton

QuantType = Literal["nf4", "fp4", "int8"]
Backend = Literal["torch", "triton"]
# Decode 4-bit codes with compiled-in selects (True) or loads from the code table (False). Selects measured
# 2-4x faster on an H200 (bench/results/qmatmul_nf4_sweep-h200.md, K = N = 4096: fused forward at M = 2048,
# 128x128 tiles, 0.776 vs 3.072 ms; dequantize 0.063 vs 0.139 ms). A switch for bench/gpu_qmatmul.py.
DECODE_SELECT = True
# {"BLOCKS_PER_PROG", "num_warps"} of the 4-bit dequantize launch instead of its defaults: set by
# bench/gpu_qmatmul.py's sweep, never in training (on the H200 the default took 0.063 ms for a 4096x4096
# NF4 weight, bitsandbytes' about 0.03 ms: its matmul_4bit minus the bf16 GEMM). The sweep measures shapes.
DEQUANT_LAUNCH_OVERRIDE: dict | None = None

# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _cast_rne(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even; EMULATE under the interpreter, whose bf16 cast truncates.

    On a GPU the native cast already rounds to nearest even, so EMULATE is off there.
    """
    if EMULATE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)  # now exact in bf16
    return x.to(dtype)


# How a 4-bit kernel turns a code into its table value (``CODE`` constexpr): a load from the 16-entry
# table in memory (any table), or a tree of selects between the table's values compiled in as fp32
# constants (NF4, FP4), which keeps the decode in registers with no dependent load behind the byte load.
CODE_TABLE, CODE_NF4, CODE_FP4 = 0, 1, 2


def code_mode(quant_type: str, select: bool = True) -> int:
    """The ``CODE`` constexpr for ``quant_type``: compiled-in selects when ``select``, else table loads."""
    if not select:
        return CODE_TABLE
    return {"nf4": CODE_NF4, "fp4": CODE_FP4}[quant_type]


@triton.jit
def _select8(q, c0, c1, c2, c3, c4, c5, c6, c7):
    """``(c0, ..., c7)[q & 7]`` by a tree of 7 selects (the constants are fp32 scalars)."""
    b0 = (q & 1) != 0
    v0 = tl.where(b0, c1, c0)
    v1 = tl.where(b0, c3, c2)
    v2 = tl.where(b0, c5, c4)
    v3 = tl.where(b0, c7, c6)
    b1 = (q & 2) != 0
    u0 = tl.where(b1, v1, v0)
    u1 = tl.where(b1, v3, v2)
    return tl.where((q & 4) != 0, u1, u0)


@triton.jit
def _decode_4bit(q, code_ptr, CODE: tl.constexpr):
    """fp32 table value of each 4-bit code ``q`` (int32, 0..15). The constants are bnb's tables exactly
    (``reference.code_4bit``, as fp32; tests/kernels/test_quant.py checks every entry)."""
    if CODE == 1:  # NF4: two 8-way trees, picked by the top bit
        neg = _select8(
            q, -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0,
        )  # fmt: skip
        pos = _select8(
            q, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
        )  # fmt: skip
        return tl.where((q & 8) != 0, pos, neg)
    elif CODE == 2:  # FP4: bit 3 is the sign of one 8-entry magnitude table (0 and -0 included)
        mag = _select8(
            q, 0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204,
            0.25,
        )  # fmt: skip
        return mag * tl.where((q & 8) != 0, -1.0, 1.0)  # not -mag: Triton negates as 0 - x, losing -0
    else:
        return tl.load(code_ptr + q)


@triton.jit
def _quantize_4bit_kernel(
    w_ptr,  # *fp32|fp16|bf16 [n], the flattened weight
    packed_ptr,  # *u8 [(n + 1) // 2], out: two codes per byte, element 2i in the high nibble
    absmax_ptr,  # *fp32 [n_blocks], out: per-block absmax
    bounds_ptr,  # *fp32 [15]: sorted midpoints of the code table
    order_ptr,  # *i32 [16]: sorted rank -> code index
    n,  # number of elements
    n_blocks,  # ceil(n / BLOCKSIZE)
    BLOCKSIZE: tl.constexpr,  # elements per absmax block (even, power of two)
    BLOCKS_PER_PROG: tl.constexpr,  # absmax blocks handled by one program
):
    """Blockwise absmax, scale, nearest-code rank, pack two codes per byte (bnb's torch rule)."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    blocks = tl.program_id(0) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    e_even = blocks[:, None] * BLOCKSIZE + 2 * tl.arange(0, HALF)[None, :]
    e_odd = e_even + 1
    x_even = tl.load(w_ptr + e_even, mask=e_even < n, other=0.0).to(tl.float32)
    x_odd = tl.load(w_ptr + e_odd, mask=e_odd < n, other=0.0).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(x_even), axis=1), tl.max(tl.abs(x_odd), axis=1))
    safe = tl.maximum(absmax, tl.full(absmax.shape, 1e-38, tl.float32))  # bnb's clamp(min=1e-38)
    # bnb multiplies full blocks by the reciprocal but divides the short tail block
    tail = (blocks + 1) * BLOCKSIZE > n
    is_tail = tail[:, None]
    recip = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)[:, None]
    s_even = tl.where(is_tail, tl.math.div_rn(x_even, safe[:, None]), x_even * recip)
    s_odd = tl.where(is_tail, tl.math.div_rn(x_odd, safe[:, None]), x_odd * recip)
    s_even = tl.minimum(tl.maximum(s_even, -1.0), 1.0)
    s_odd = tl.minimum(tl.maximum(s_odd, -1.0), 1.0)
    rank_even = tl.zeros(s_even.shape, tl.int32)
    rank_odd = tl.zeros(s_odd.shape, tl.int32)
    for i in tl.static_range(15):
        bound = tl.load(bounds_ptr + i)
        rank_even += (s_even > bound).to(tl.int32)
        rank_odd += (s_odd > bound).to(tl.int32)
    q_even = tl.load(order_ptr + rank_even)
    q_odd = tl.load(order_ptr + rank_odd)
    byte = ((q_even << 4) | q_odd).to(tl.uint8)
    tl.store(packed_ptr + e_even // 2, byte, mask=e_even < n)
    # the tail block's stored absmax is the clamped one (bnb clamps before storing it)
    tl.store(absmax_ptr + blocks, tl.where(tail, safe, absmax), mask=blocks < n_blocks)


@triton.jit
def _decode_absmax(
    absmax_ptr,  # *fp32 [n_blocks] or, NESTED, *u8 [n_blocks]
    nested_absmax_ptr,  # *fp32 [ceil(n_blocks / NESTED_BLOCKSIZE)] (NESTED only)
    nested_code_ptr,  # *fp32 [256] (NESTED only)
    offset_ptr,  # *fp32 [1] (NESTED only)
    blocks,  # block indices, any shape
    mask,  # same shape as blocks
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
):
    """Per-block fp32 absmax, decoding double quantization in place: ``dyn[q] · a2[b // 256] + off``."""
    if NESTED:
        qa = tl.load(absmax_ptr + blocks, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + qa, mask=mask, other=0.0).to(tl.float32)
        a2 = tl.load(nested_absmax_ptr + blocks // NESTED_BLOCKSIZE, mask=mask, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr).to(tl.float32)
        return scale * a2 + offset
    else:
        return tl.load(absmax_ptr + blocks, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,  # *u8 [(n + 1) // 2]
    absmax_ptr,  # *fp32 [n_blocks] or *u8 [n_blocks] (NESTED)
    nested_absmax_ptr,  # *fp32 nested block scales (NESTED only)
    nested_code_ptr,  # *fp32 [256] dynamic map (NESTED only)
    offset_ptr,  # *fp32 [1] (NESTED only)
    code_ptr,  # *fp32 [16] code table (CODE == CODE_TABLE)
    out_ptr,  # *fp32|fp16|bf16 [n], out
    n,  # number of elements
    n_bytes,  # ceil(n / 2): an argument of its own so that Triton sees its divisibility by 16 and loads
    # each thread's bytes as one vector (as ``2 * i < n`` the mask compiled to one 8-bit load per byte)
    n_blocks,  # ceil(n / BLOCKSIZE)
    BLOCKSIZE: tl.constexpr,  # elements per absmax block
    NESTED: tl.constexpr,  # absmax is double-quantized
    NESTED_BLOCKSIZE: tl.constexpr,  # 256
    CODE: tl.constexpr,  # see code_mode
    BLOCKS_PER_PROG: tl.constexpr,  # absmax blocks handled by one program
    EMULATE_RNE: tl.constexpr,  # interpreter: round to bf16 by hand
):
    """``out[e] = code[q_e] · absmax[e // BLOCKSIZE]`` in fp32, cast to the output dtype.

    One row of the program's ``[BLOCKS_PER_PROG, BLOCKSIZE / 2]`` byte tile is one absmax block: one
    scale per row, contiguous byte loads, and both nibbles decoded and interleaved into contiguous stores.
    """
    HALF: tl.constexpr = BLOCKSIZE // 2
    blocks = tl.program_id(0) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    i = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]  # byte index
    byte = tl.load(packed_ptr + i, mask=i < n_bytes, other=0).to(tl.int32)
    scale = _decode_absmax(
        absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blocks, blocks < n_blocks, NESTED,
        NESTED_BLOCKSIZE,
    )[:, None]  # fmt: skip
    hi = _decode_4bit((byte >> 4) & 0xF, code_ptr, CODE) * scale
    lo = _decode_4bit(byte & 0xF, code_ptr, CODE) * scale
    vals = tl.interleave(hi, lo)  # element 2i then 2i + 1
    offs = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + offs, _cast_rne(vals, out_ptr.dtype.element_ty, EMULATE_RNE), mask=offs < n)


@triton.jit
def _quantize_blockwise_8bit_kernel(
    x_ptr,  # *fp32 [n]
    q_ptr,  # *u8 [n], out
    absmax_ptr,  # *fp32 [n_blocks], out
    lut_ptr,  # *u8 [65536]: bin -> code index (reference.blockwise_lut)
    n,  # number of elements
    BLOCKSIZE: tl.constexpr,  # 256 for double quant
):
    """bnb's CPU blockwise 8-bit rule: ``lut[trunc(((clamp(x / absmax) + 1) · 0.5) · 65535 + 0.5)]``."""
    block = tl.program_id(0)
    offs = block * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=0)
    recip = tl.math.div_rn(tl.full((), 1.0, tl.float32), tl.maximum(absmax, tl.full((), 1e-38, tl.float32)))
    v = tl.minimum(tl.maximum(x * recip, -1.0), 1.0)
    t = ((v + 1.0) * 0.5) * 65535.0 + 0.5
    bins = tl.minimum(tl.maximum(t.to(tl.int32), 0), 65535)
    q = tl.load(lut_ptr + bins, mask=mask, other=0)
    q = tl.where(absmax > 0.0, q, 0).to(tl.uint8)
    tl.store(q_ptr + offs, q, mask=mask)
    tl.store(absmax_ptr + block, absmax)


@triton.jit
def _quantize_int8_rowwise_kernel(
    w_ptr,  # *fp32|fp16|bf16 [N, K]
    q_ptr,  # *i8 [N, K], out
    scale_ptr,  # *fp32 [N], out: row absmax
    K,  # columns
    stride_w,  # row stride of w (elements)
    stride_q,  # row stride of q (elements)
    BLOCK_K: tl.constexpr,  # columns per step
):
    """One row per program: absmax over the fp16-cast row, then round-half-even of ``w · (127 / s)``."""
    row = tl.program_id(0)
    absmax = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + row * stride_w + offs, mask=offs < K, other=0.0)
        absmax = tl.maximum(absmax, tl.abs(w.to(tl.float16).to(tl.float32)))
    scale = tl.max(absmax, axis=0)
    mult = (
        tl.math.div_rn(tl.full((), 1.0, tl.float32), scale) * 127.0
    )  # torch's ``127.0 / t`` is ``t.reciprocal() * 127.0``
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + row * stride_w + offs, mask=offs < K, other=0.0)
        x = w.to(tl.float16).to(tl.float32) * mult
        r = tl.floor(x + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        r = tl.where(((r - x) == 0.5) & odd, r - 1.0, r)  # ties to even, as torch.round
        tl.store(q_ptr + row * stride_q + offs, r.to(tl.int8), mask=offs < K)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _dequantize_int8_rowwise_kernel(
    q_ptr,  # *i8 [N, K]
    scale_ptr,  # *fp32 [N]
    out_ptr,  # *fp32|fp16|bf16 [N, K], out
    K,  # columns
    stride_q,  # row stride of q (elements)
    stride_out,  # row stride of out (elements)
    BLOCK_K: tl.constexpr,  # columns per program
    EMULATE_RNE: tl.constexpr,  # interpreter: round to bf16 by hand
):
    """``out[n, k] = (q[n, k] · scale[n]) · (1/127)`` in fp32, cast to the output dtype."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    q = tl.load(q_ptr + row * stride_q + offs, mask=offs < K, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + row)
    out = q * scale * 7.874015718698502e-3
    tl.store(
        out_ptr + row * stride_out + offs,
        _cast_rne(out, out_ptr.dtype.element_ty, EMULATE_RNE),
        mask=offs < K,
    )


# ---------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------


_CODE_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """``reference.code_4bit`` on ``device``, built once per (type, device): every fused matmul and
    dequantize passes it, and a host-to-GPU copy per call would wait for the GPU's stream each time."""
    key = (quant_type, device)
    table = _CODE_TABLES.get(key)
    if table is None:
        table = _CODE_TABLES[key] = reference.code_4bit(quant_type, device)
    return table


@dataclass
class PackedWeight4bit:
    """A 4-bit weight in bitsandbytes' layout (the data of a ``Params4bit`` plus its ``QuantState``).

    Attributes:
        packed: uint8 ``[(N·K + 1) // 2]``, two codes per byte, flat index ``2i`` in the high nibble.
        absmax: fp32 ``[n_blocks]``, or uint8 ``[n_blocks]`` when double-quantized.
        shape: ``(N, K)`` of the dense weight.
        blocksize: elements per absmax block.
        quant_type: ``"nf4"`` or ``"fp4"``.
        dtype: dtype of the weight that was quantized (bnb's ``QuantState.dtype``).
        offset: fp32 ``[1]`` mean of the absmax (double quant only).
        nested_absmax: fp32 scales of the quantized absmax (double quant only).
        nested_code: fp32 ``[256]`` dynamic map (double quant only).
        nested_blocksize: 256 in bnb.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    blocksize: int = 64
    quant_type: str = "nf4"
    dtype: torch.dtype = torch.float32
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = reference.DYNAMIC_BLOCKSIZE

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def code(self) -> torch.Tensor:
        return _code_table(self.quant_type, self.packed.device)

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block absmax in fp32, decoding double quantization (bit-exact with bnb)."""
        if not self.nested:
            return self.absmax.float()
        return reference.dequantize_absmax(
            self.absmax, self.offset, self.nested_absmax, self.nested_code, self.nested_blocksize
        )

    def nbytes(self) -> int:
        """Bytes of the packed weight and all its scales."""
        tensors = [self.packed, self.absmax, self.offset, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to_bnb(self):
        """``(packed [n, 1] uint8, bitsandbytes.functional.QuantState)``, sharing storage.

        Raises:
            ImportError: bitsandbytes is not installed.
        """
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.nested:
            state2 = QuantState(
                absmax=self.nested_absmax,
                code=self.nested_code,
                blocksize=self.nested_blocksize,
                dtype=torch.float32,
            )
        state = QuantState(
            absmax=self.absmax,
            shape=torch.Size(self.shape),
            code=self.code,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=self.dtype,
            offset=self.offset.reshape(()) if self.nested else None,
            state2=state2,
        )
        return self.packed.reshape(-1, 1), state

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> PackedWeight4bit:
        """Take over bitsandbytes' packed data and ``QuantState`` as they are (no re-quantization).

        Args:
            packed: the ``Params4bit`` data (any ``quant_storage`` dtype; viewed as uint8).
            quant_state: its ``bitsandbytes.functional.QuantState``.

        Raises:
            ValueError: the state is not a 2-D NF4/FP4 weight.
        """
        qs = quant_state
        if qs.quant_type not in reference.QUANT_4BIT_TYPES:
            raise ValueError(f"expected an nf4/fp4 QuantState, got quant_type={qs.quant_type!r}")
        if qs.shape is None or len(qs.shape) != 2:
            raise ValueError(f"expected a 2-D weight shape in the QuantState, got {qs.shape}")
        flat = packed.detach().contiguous().view(torch.uint8).reshape(-1)
        pw = cls(
            packed=flat,
            absmax=qs.absmax,
            shape=(int(qs.shape[0]), int(qs.shape[1])),
            blocksize=int(qs.blocksize),
            quant_type=qs.quant_type,
            dtype=qs.dtype,
        )
        if qs.nested:
            pw.offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=flat.device).reshape(1)
            pw.nested_absmax = qs.state2.absmax
            pw.nested_code = qs.state2.code
            pw.nested_blocksize = int(qs.state2.blocksize)
        return pw


@dataclass
class PackedWeightInt8:
    """An int8 row-wise weight as ``bnb.nn.Linear8bitLt`` stores it (``CB`` and ``SCB``).

    Attributes:
        qweight: int8 ``[N, K]``.
        scale: fp32 ``[N]`` row absmax (``deq = q · scale / 127``).
        dtype: dtype of the weight that was quantized.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype = torch.float16

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.qweight.shape[0]), int(self.qweight.shape[1]))

    def nbytes(self) -> int:
        return self.qweight.numel() + 4 * self.scale.numel()


PackedWeight = PackedWeight4bit | PackedWeightInt8

# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _pick_backend(t: torch.Tensor, backend: Backend | None) -> Backend:
    if backend is None:
        return "triton" if t.is_cuda else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    return backend


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"blocksize must be a power of two in [32, 4096] (as bnb), got {blocksize}")


def _quantize_blockwise_8bit_triton(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Triton twin of ``reference.quantize_blockwise_8bit``."""
    flat = x.reshape(-1).float().contiguous()
    n = flat.numel()
    n_blocks = cdiv(n, blocksize)
    q = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    lut = reference.blockwise_lut(code).to(x.device)
    _quantize_blockwise_8bit_kernel[(n_blocks,)](
        flat, q, absmax, lut, n, BLOCKSIZE=blocksize, **exact_fp_options()
    )
    return q.reshape(x.shape), absmax


def quantize_4bit(
    w: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    backend: Backend | None = None,
) -> PackedWeight4bit:
    """Quantize a 2-D weight to NF4/FP4 in bitsandbytes' layout, bit-exact with ``quantize_4bit``.

    Args:
        w: ``[N, K]`` fp32/fp16/bf16.
        blocksize: elements per absmax block (bnb's choices, 32..4096).
        quant_type: ``"nf4"`` or ``"fp4"``.
        double_quant: also quantize the absmax vector (bnb's ``compress_statistics``).
        backend: ``"triton"`` (kernels), ``"torch"`` (``reference``); default: triton on CUDA.

    Returns:
        The packed weight; ``packed.nbytes + scales`` is about ``N·K/2`` bytes.

    Raises:
        ValueError: bad shape, dtype, blocksize or quant_type.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"expected a fp32/fp16/bf16 weight, got {w.dtype}")
    if quant_type not in reference.QUANT_4BIT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    _check_blocksize(blocksize)
    if w.numel() >= 2**31:
        raise ValueError("weights of 2^31 elements or more are not supported (int32 indexing)")
    if _pick_backend(w, backend) == "torch":
        packed, absmax = reference.quantize_4bit(w, blocksize, quant_type)
    else:
        flat = w.detach().contiguous().reshape(-1)
        n = flat.numel()
        n_blocks = cdiv(n, blocksize)
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
        absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
        bounds, order = reference.quantize_4bit_bounds(quant_type)
        per_prog = max(1, min(16, 4096 // blocksize))
        grid = (cdiv(n_blocks, per_prog),)
        _quantize_4bit_kernel[grid](
            flat,
            packed,
            absmax,
            bounds.to(w.device),
            order.to(w.device),
            n,
            n_blocks,
            BLOCKSIZE=blocksize,
            BLOCKS_PER_PROG=per_prog,
            **exact_fp_options(),
        )
    pw = PackedWeight4bit(
        packed=packed,
        absmax=absmax,
        shape=tuple(w.shape),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=w.dtype,
    )
    if double_quant:
        code = reference.dynamic_code(w.device)
        offset = absmax.mean()  # torch's mean, as bnb: the reduction order decides the last bit
        if _pick_backend(w, backend) == "torch":
            qabsmax, nested_absmax = reference.quantize_blockwise_8bit(absmax - offset, code)
        else:
            qabsmax, nested_absmax = _quantize_blockwise_8bit_triton(
                absmax - offset, code, reference.DYNAMIC_BLOCKSIZE
            )
        pw.absmax, pw.offset, pw.nested_absmax, pw.nested_code = (
            qabsmax,
            offset.reshape(1),
            nested_absmax,
            code,
        )
    return pw


def dequantize_4bit(
    pw: PackedWeight4bit, dtype: torch.dtype | None = None, backend: Backend | None = None
) -> torch.Tensor:
    """Dense ``[N, K]`` weight from a 4-bit one, bit-exact with ``bitsandbytes.functional.dequantize_4bit``.

    Args:
        pw: the packed weight.
        dtype: output dtype (default: ``pw.dtype``).
        backend: ``"triton"`` or ``"torch"``; default: triton on CUDA.

    Returns:
        ``[N, K]`` tensor of ``dtype``.
    """
    dtype = dtype or pw.dtype
    if _pick_backend(pw.packed, backend) == "torch":
        return reference.dequantize_4bit(
            pw.packed, pw.absmax_fp32(), pw.shape, pw.blocksize, pw.quant_type, dtype
        )
    n = pw.numel
    out = torch.empty(pw.shape, dtype=dtype, device=pw.packed.device)
    n_blocks = cdiv(n, pw.blocksize)
    launch = DEQUANT_LAUNCH_OVERRIDE or {}
    per_prog = launch.get("BLOCKS_PER_PROG", max(1, 2048 // pw.blocksize))  # 1 KiB of packed bytes a program
    nested_absmax, nested_code, offset = _nested_args(pw)
    _dequantize_4bit_kernel[(cdiv(n_blocks, per_prog),)](
        pw.packed,
        pw.absmax,
        nested_absmax,
        nested_code,
        offset,
        pw.code,
        out,
        n,
        cdiv(n, 2),
        n_blocks,
        BLOCKSIZE=pw.blocksize,
        NESTED=pw.nested,
        NESTED_BLOCKSIZE=pw.nested_blocksize,
        CODE=code_mode(pw.quant_type, DECODE_SELECT),
        BLOCKS_PER_PROG=per_prog,
        EMULATE_RNE=interpreter_active(),
        num_warps=launch.get("num_warps", 4),
        **exact_fp_options(),
    )
    return out


def _nested_args(pw: PackedWeight4bit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel arguments for the double-quant state (the absmax itself stands in when not nested)."""
    if pw.nested:
        return pw.nested_absmax, pw.nested_code, pw.offset
    return pw.absmax, pw.absmax, pw.absmax


def quantize_int8(w: torch.Tensor, backend: Backend | None = None) -> PackedWeightInt8:
    """Row-wise int8 as ``Linear8bitLt`` (bit-exact with ``bnb.functional.int8_vectorwise_quant``).

    Args:
        w: ``[N, K]`` fp32/fp16/bf16 (cast to fp16 first, as bnb does).
        backend: ``"triton"`` or ``"torch"``; default: triton on CUDA.

    Raises:
        ValueError: not a 2-D float weight.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got {tuple(w.shape)} {w.dtype}")
    if _pick_backend(w, backend) == "torch":
        q, scale = reference.quantize_int8_rowwise(w)
    else:
        w = w.detach()
        if w.stride(1) != 1:
            w = w.contiguous()
        N, K = w.shape
        q = torch.empty(N, K, dtype=torch.int8, device=w.device)
        scale = torch.empty(N, dtype=torch.float32, device=w.device)
        block_k = min(1024, triton.next_power_of_2(K))
        _quantize_int8_rowwise_kernel[(N,)](
            w, q, scale, K, w.stride(0), q.stride(0), BLOCK_K=block_k, **exact_fp_options()
        )
    return PackedWeightInt8(qweight=q, scale=scale, dtype=w.dtype)


def dequantize_int8(
    pw: PackedWeightInt8, dtype: torch.dtype | None = None, backend: Backend | None = None
) -> torch.Tensor:
    """Dense ``[N, K]`` weight from an int8 row-wise one (bit-exact with ``int8_vectorwise_dequant``)."""
    dtype = dtype or pw.dtype
    if _pick_backend(pw.qweight, backend) == "torch":
        return reference.dequantize_int8_rowwise(pw.qweight, pw.scale, dtype)
    N, K = pw.shape
    out = torch.empty(N, K, dtype=dtype, device=pw.qweight.device)
    block_k = min(1024, triton.next_power_of_2(K))
    _dequantize_int8_rowwise_kernel[(N, cdiv(K, block_k))](
        pw.qweight,
        pw.scale,
        out,
        K,
        pw.qweight.stride(0),
        out.stride(0),
        BLOCK_K=block_k,
        EMULATE_RNE=interpreter_active(),
        **exact_fp_options(),
    )
    return out


def quantize(
    w: torch.Tensor,
    quant_type: QuantType = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    backend: Backend | None = None,
) -> PackedWeight:
    """Quantize ``w [N, K]`` to ``quant_type`` (``"nf4"``, ``"fp4"`` or ``"int8"``)."""
    if quant_type == "int8":
        return quantize_int8(w, backend=backend)
    return quantize_4bit(w, blocksize, quant_type, double_quant, backend=backend)


def dequantize(
    pw: PackedWeight, dtype: torch.dtype | None = None, backend: Backend | None = None
) -> torch.Tensor:
    """Dense weight of any packed format."""
    if isinstance(pw, PackedWeightInt8):
        return dequantize_int8(pw, dtype, backend)
    return dequantize_4bit(pw, dtype, backend)


__all__ = [
    "PackedWeight",
    "PackedWeight4bit",
    "PackedWeightInt8",
    "QuantType",
    "dequantize",
    "dequantize_4bit",
    "dequantize_int8",
    "quantize",
    "quantize_4bit",
    "quantize_int8",
]
