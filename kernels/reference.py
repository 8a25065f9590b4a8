"""Pure-torch references: the test oracle, the CPU path and the benchmark baseline.

Every Triton kernel in this package has its reference here, written for clarity, not speed. The fused
paths are checked against these functions, and ``kernels: torch`` runs them.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------
# LoRA linear
# ---------------------------------------------------------------------------------------------------


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """LoRA linear ``Y = X Wᵀ (+ b) + s · (D(X) Aᵀ) Bᵀ``, differentiable by autograd.

    Args:
        x: input ``[..., K]``.
        weight: frozen base weight ``W [N, K]``.
        lora_a: ``A [r, K]``.
        lora_b: ``B [N, r]``.
        scale: ``s = alpha / r``.
        bias: optional frozen bias ``[N]``.
        dropout_mask: optional keep-mask broadcastable to ``x`` (1 keeps, 0 drops); with it,
            ``D(X) = X · mask / (1 - dropout_p)``.
        dropout_p: dropout probability the mask was drawn with.

    Returns:
        ``Y [..., N]`` in the dtype of ``x``.
    """
    y = F.linear(x, weight, bias)
    xd = x
    if dropout_mask is not None:
        xd = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    return y + scale * F.linear(F.linear(xd, lora_a), lora_b)


# ---------------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------------


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated MLP's ``silu(G) ⊙ U``, differentiable by autograd."""
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------------


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Llama ``apply_rotary_pos_emb`` (``unsqueeze_dim=1``): ``x·cos + rotate_half(x)·sin``
    for q ``[B, Hq, T, D]`` and k ``[B, Hk, T, D]``, tables ``[B or 1, T, D]``. Autograd."""

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


# ---------------------------------------------------------------------------------------------------
# Causal attention over packed rows
# ---------------------------------------------------------------------------------------------------


def packed_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: tuple[int, ...], scale: float | None = None
) -> torch.Tensor:
    """Softmax attention written out, row by row of a packed sequence: q ``[1, H, T, D]``, k and v
    ``[1, Hk, T, D]`` (each kv head serves ``H/Hk`` query heads), causal within each row, fp32 math
    (fp64 for fp64). Returns ``[1, T, H, D]`` in q's dtype. Autograd."""
    acc = torch.promote_types(q.dtype, torch.float32)
    groups = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rows = []
    for a, b in itertools.pairwise(bounds):
        qs = q[0, :, a:b].to(acc)
        ks, vs = (x[0, :, a:b].to(acc).repeat_interleave(groups, 0) for x in (k, v))
        logits = (qs @ ks.transpose(-1, -2)) * scale
        future = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).triu(1)
        p = logits.masked_fill(future, float("-inf")).softmax(-1)
        rows.append((p @ vs).transpose(0, 1))  # [t, H, D]
    return torch.cat(rows)[None].to(q.dtype)


# ---------------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, style: str = "llama") -> torch.Tensor:
    """``LlamaRMSNorm.forward``: fp32 statistics (fp64 for fp64), ``x̂`` rounded to x's dtype, then the
    weight; ``style="gemma"``: ``GemmaRMSNorm.forward``, ``x̂ · (1 + weight)`` in fp32, rounded once.
    Autograd."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    xhat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if style == "gemma":
        return (xhat * (1.0 + weight.to(x32.dtype))).to(x.dtype)
    return weight * xhat.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Cross-entropy
# ---------------------------------------------------------------------------------------------------


def cross_entropy_grad(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-row cross-entropy of ``logits [N, V]`` (fp32 math or wider); ``logits`` becomes ``softmax - onehot``.

    Rows whose target is ``ignore_index`` get loss 0 and a zero gradient.
    """
    # At least fp32 math; the same tensor when logits are fp32/fp64: overwritten in place, no temporaries.
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    active = target != ignore_index
    t = torch.where(active, target, 0)
    z_t = z.gather(1, t[:, None])[:, 0]
    m = z.amax(dim=-1)
    z.sub_(m[:, None]).exp_()
    total = z.sum(dim=-1)
    loss = torch.where(active, m + total.log() - z_t, 0.0)
    z.div_(total[:, None])
    rows = torch.arange(z.shape[0], device=z.device)
    z[rows, t] -= active.to(z.dtype)
    z.masked_fill_(~active[:, None], 0.0)  # not a multiply: an ignored row of -inf would give nan
    if z.data_ptr() != logits.data_ptr():
        logits.copy_(z)
    return loss


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` in fp32, by autograd (the oracle)."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")


# The fused kernels regenerate the dropout mask from a seed with Triton's Philox (``tl.randint``: 10
# rounds, counter (offset_lo, offset_hi, 0, 0), key (seed_lo, seed_hi)) instead of storing it. This is
# the same stream in plain torch integer arithmetic, so that tests reproduce the kernels' mask exactly.
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a · b`` for uint32 values held in int64, without int64 overflow."""
    t_lo = a * (b & 0xFFFF)  # < 2^48
    t_hi = a * (b >> 16)  # < 2^48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & _MASK32
    return hi, lo


def philox_randint(seed: int, offsets: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """``tl.randint(seed, offsets)`` for int64 ``offsets``: uint32 values, returned in an int64 tensor."""
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return c0


def dropout_threshold(p: float) -> int:
    """Dropout threshold on 24 random bits: an element is kept when ``bits >> 8 >= threshold``."""
    return round(p * (1 << 24))


def dropout_keep_mask(
    seed: int, rows: int, cols: int, p: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """The fused kernels' dropout keep-mask for an input flattened to ``[rows, cols]``.

    Args:
        seed: the Philox seed the kernels were given.
        rows, cols: ``M`` (all leading dimensions) and ``K`` (in_features).
        p: dropout probability.
        device: where to build the mask.

    Returns:
        A bool tensor ``[rows, cols]``: ``philox(seed, row · cols + col) >> 8 >= round(p · 2²⁴)``.
    """
    offsets = torch.arange(rows * cols, device=device, dtype=torch.int64).view(rows, cols)
    return (philox_randint(seed, offsets) >> 8) >= dropout_threshold(p)


# ---------------------------------------------------------------------------------------------------
# Quantized weights: NF4 / FP4 in bitsandbytes' layout, bnb's blockwise 8-bit (double quant), int8 rows
#
# These replay bitsandbytes' CPU arithmetic step for step (bnb 0.50: the torch "default" ops for 4-bit
# quantize, the C++ CPU library for blockwise 8-bit quantize and for dequantize), so that they are
# bit-exact against ``bitsandbytes.functional`` on CPU. The Triton kernels in ``quant.py`` follow them.
# ---------------------------------------------------------------------------------------------------

# bitsandbytes' NF4 table (``get_4bit_type("nf4")``): quantiles of N(0, 1) scaled to [-1, 1].
NF4_CODE_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# bitsandbytes' FP4 (e2m1, bias 2) in bit-pattern order, before the division by its max (12).
FP4_CODE_VALUES = (
    0.0,
    0.0625,
    8.0,
    12.0,
    4.0,
    6.0,
    2.0,
    3.0,
    -0.0,
    -0.0625,
    -8.0,
    -12.0,
    -4.0,
    -6.0,
    -2.0,
    -3.0,
)

QUANT_4BIT_TYPES = ("nf4", "fp4")
DYNAMIC_BLOCKSIZE = 256  # bnb's blocksize for the nested (double) quantization of the absmax vector
_LUT_SIZE = 65536  # bnb's CPU 8-bit quantizer: [-1, 1] discretised into 65536 bins


def code_4bit(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry fp32 code table of ``quant_type``, exactly ``bitsandbytes.functional.get_4bit_type``."""
    if quant_type == "nf4":
        values = NF4_CODE_VALUES
    elif quant_type == "fp4":
        values = FP4_CODE_VALUES
    else:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    code = torch.tensor(values, dtype=torch.float32)
    code = code / code.abs().max()
    return code.to(device) if device is not None else code


def quantize_4bit_bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision bounds of bnb's 4-bit quantizer: 15 sorted midpoints, and sorted rank -> code index.

    A scaled value ``x`` gets rank ``#{bounds < x}`` (``torch.bucketize``, ties go to the lower code),
    then code index ``order[rank]``. NF4 is sorted (``order`` is the identity); FP4 is in bit order.
    """
    code = code_4bit(quant_type)
    order = torch.argsort(code, stable=True)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    return bounds, order.to(torch.int32)


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map()``): 256 sorted fp32 values."""
    data: list[float] = []
    for i in range(7):  # exponent 10^-6 .. 10^0, 2^i fraction values each, both signs
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    code = torch.tensor(sorted(data), dtype=torch.float32)
    return code.to(device) if device is not None else code


def blockwise_lut(code: torch.Tensor) -> torch.Tensor:
    """bnb's CPU lookup table for 8-bit blockwise quantization: bin index -> code index (uint8 [65536]).

    Bin ``i`` stands for ``v_i = -1 + 2i / 65535`` and maps to the first code whose upper midpoint is not
    below ``v_i``. This is how bnb quantizes on CPU (not an exact nearest-code search).
    """
    code = code.detach().float().cpu()
    mid = 0.5 * (code[:-1] + code[1:])
    v = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(mid, v, side="left").to(torch.uint8)


def quantize_4bit(
    w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization of the flattened ``w``, as ``bitsandbytes.functional.quantize_4bit``.

    Args:
        w: any-shape fp32/fp16/bf16 tensor; blocks of ``blocksize`` run over ``w.reshape(-1)``.
        blocksize: elements per absmax block (even).
        quant_type: ``"nf4"`` or ``"fp4"``.

    Returns:
        ``(packed, absmax)``: uint8 ``[(numel + 1) // 2]`` with element ``2i`` in the high nibble of
        byte ``i`` (the odd tail padded with the code of 0), and fp32 absmax ``[ceil(numel / blocksize)]``.
    """
    bounds, order = quantize_4bit_bounds(quant_type)
    bounds, order = bounds.to(w.device), order.to(w.device)
    flat = w.reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    body = flat[:full].reshape(full // blocksize, blocksize)
    absmax = body.abs().max(dim=-1)[0] if full else flat.new_empty(0)
    # bnb: full blocks multiply by the reciprocal, the short tail block divides (both fp32, same rounding)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    if n % 2:
        scaled = F.pad(scaled, (0, 1))
    q = order[torch.bucketize(scaled, bounds)].to(torch.uint8)
    return (q[0::2] << 4) | q[1::2], absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int = 64,
    quant_type: str = "nf4",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit`: ``code[q] · absmax[block]`` in fp32, then cast to ``dtype``.

    Args:
        packed: uint8 codes, any shape with ``(numel(shape) + 1) // 2`` elements (bnb stores ``[n, 1]``).
        absmax: fp32 per-block scales (already decoded if double-quantized).
        shape: shape of the dequantized tensor.
        blocksize, quant_type: as quantized.
        dtype: output dtype.

    Returns:
        The dequantized tensor of ``shape`` and ``dtype``.
    """
    code = code_4bit(quant_type, packed.device)
    n = math.prod(shape)
    # One gather per packed byte from a [256, 2] table of (code[high nibble], code[low nibble]): 2.2x
    # faster than splitting the nibbles into a code-index tensor first (SmolLM2's 1536x576 NF4 weight,
    # 2 CPU threads: 0.94 ms vs 2.08 ms, best of 30; the same fp32 products, so still bit-exact).
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=-1)
    vals = pairs.index_select(0, packed.reshape(-1).view(torch.uint8).int()).reshape(-1)
    n_blocks = absmax.numel()
    if vals.numel() != n_blocks * blocksize:
        vals = F.pad(vals, (0, n_blocks * blocksize - vals.numel()))  # tail dropped below
    out = vals.view(n_blocks, blocksize).mul_(absmax.float().view(-1, 1))
    return out.reshape(-1)[:n].reshape(shape).to(dtype)


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = DYNAMIC_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's CPU blockwise 8-bit quantization (``quantize_blockwise``), used for double quant.

    Per block: ``absmax = max|x|``; ``v = clamp(x · (1 / absmax), -1, 1)``; bin
    ``trunc(((v + 1) · 0.5) · 65535 + 0.5)`` looked up in :func:`blockwise_lut`; all-zero blocks give 0.

    Returns:
        ``(q, absmax)``: uint8 codes shaped like ``x`` and fp32 ``[ceil(numel / blocksize)]``.
    """
    lut = blockwise_lut(code).to(x.device)
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = F.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = padded.abs().max(dim=-1)[0]
    v = torch.clamp(padded * (1.0 / absmax).view(-1, 1), -1.0, 1.0)
    bins = (((v + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    q = torch.where((absmax == 0).view(-1, 1), 0, lut[bins.clamp(0, _LUT_SIZE - 1)])
    return q.reshape(-1)[:n].reshape(x.shape).to(torch.uint8), absmax


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = DYNAMIC_BLOCKSIZE
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit`: ``code[q] · absmax[block]`` in fp32."""
    n = q.numel()
    block = torch.arange(n, device=q.device) // blocksize
    return (code.float()[q.reshape(-1).long()] * absmax.float()[block]).reshape(q.shape)


def double_quantize_absmax(
    absmax: torch.Tensor, code: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """bnb's double quantization (``compress_statistics=True``) of a 4-bit absmax vector.

    ``offset = mean(absmax)``; ``absmax - offset`` is quantized blockwise (256) with the dynamic map.

    Returns:
        ``(qabsmax uint8, offset fp32 scalar, nested_absmax fp32, nested_code fp32 [256])``.
    """
    code = dynamic_code(absmax.device) if code is None else code
    offset = absmax.mean()
    qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, code, DYNAMIC_BLOCKSIZE)
    return qabsmax, offset, nested_absmax, code


def dequantize_absmax(
    qabsmax: torch.Tensor,
    offset: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    nested_blocksize: int = DYNAMIC_BLOCKSIZE,
) -> torch.Tensor:
    """Decode a double-quantized absmax: ``code[q] · nested_absmax[i // 256]``, then ``+ offset`` (fp32)."""
    return dequantize_blockwise_8bit(qabsmax, nested_absmax, nested_code, nested_blocksize) + offset.float()


def quantize_int8_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise int8 as ``bnb.nn.Linear8bitLt`` stores a weight (``Int8Params._quantize``).

    The weight is cast to fp16 first; ``scale = max|row|`` (fp32); ``q = round(w · (127 / scale))``
    with round-half-to-even.

    Returns:
        ``(q int8 [N, K], scale fp32 [N])``.
    """
    w16 = w.to(torch.float16)
    scale = w16.abs().max(dim=1).values.float()
    q = torch.round(w16.float() * (127.0 / scale).unsqueeze(-1)).to(torch.int8)
    return q, scale


def dequantize_int8_rowwise(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_int8_rowwise`: ``(q · scale) · (1/127)`` in fp32, as bnb, then ``dtype``."""
    return (q.float() * scale.float().view(-1, 1) * 7.874015718698502e-3).to(dtype)
