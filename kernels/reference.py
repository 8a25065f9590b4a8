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
