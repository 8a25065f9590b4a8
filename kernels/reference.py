"""Pure-torch references: the test oracle, the CPU path and the benchmark baseline.

Every Triton kernel in this package has its reference here, written for clarity, not speed. The fused
paths are checked against these functions, and ``kernels: torch`` runs them.
"""

from __future__ import annotations

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
