"""LoRA dropout on the torch paths: the keep-mask drawn with torch's generator and saved as bits.

``D(X) = X ⊙ keep / (1 - p)`` on the adapter's input. The fused Triton kernels never store ``keep``:
they regenerate it from a Philox seed (``lora.py``). The torch paths (``lora.lora_linear_torch`` and the
QLoRA function in ``qmatmul.py``) draw it with torch's generator, so ``torch.manual_seed`` makes runs
repeatable. Between forward and backward they keep it packed, eight elements a byte: ``⌈K/8⌉`` bytes per
row instead of ``K`` for a bool mask (or ``2K`` to ``4K`` for a saved dropped input, as autograd through
``nn.Dropout`` keeps).
"""

from __future__ import annotations

import torch

__all__ = ["apply_keep", "apply_keep_", "draw_keep", "pack_keep", "unpack_keep"]


def draw_keep(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """A bool keep-mask of ``shape``: each element kept with probability ``1 - p`` (torch's generator)."""
    return torch.empty(shape, device=device, dtype=torch.bool).bernoulli_(1.0 - p)


def apply_keep(x2: torch.Tensor, keep2: torch.Tensor, p: float) -> torch.Tensor:
    """``x2 ⊙ keep2 / (1 - p)`` in x2's dtype (a new tensor)."""
    return (x2 * keep2).div_(1.0 - p)


def apply_keep_(t: torch.Tensor, keep2: torch.Tensor, p: float) -> torch.Tensor:
    """:func:`apply_keep` in place on ``t`` (a temporary the caller owns)."""
    return t.mul_(keep2).div_(1.0 - p)


_BIT_VALUES: dict[torch.device, torch.Tensor] = {}


def _bit_values(device: torch.device) -> torch.Tensor:
    """``[1, 2, 4, ..., 128]`` uint8 on ``device``, made there once (a host-to-GPU copy per call would
    wait for the stream)."""
    bits = _BIT_VALUES.get(device)
    if bits is None:
        shifts = torch.arange(8, dtype=torch.uint8, device=device)
        bits = _BIT_VALUES[device] = torch.ones_like(shifts) << shifts
    return bits


def pack_keep(keep2: torch.Tensor) -> torch.Tensor:
    """``[M, K]`` bool -> ``[M, ⌈K/8⌉]`` uint8, element ``k`` in bit ``k % 8`` of byte ``k // 8``."""
    m, k = keep2.shape
    pad = -k % 8
    bits = keep2.to(torch.uint8)
    if pad:
        bits = torch.cat([bits, bits.new_zeros(m, pad)], dim=1)
    return (bits.view(m, (k + pad) // 8, 8) * _bit_values(keep2.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_keep(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_keep`: ``[M, ⌈K/8⌉]`` uint8 -> ``[M, K]`` bool."""
    m, nbytes = packed.shape
    bits = (packed[..., None] & _bit_values(packed.device)) != 0
    return bits.view(m, nbytes * 8)[:, :k]
