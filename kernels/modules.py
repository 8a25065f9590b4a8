"""nn.Modules over the kernels: frozen base weights plus trainable low-rank adapters.

``backend`` picks the path per module: ``"torch"`` runs the pure-torch reference (the CPU path),
``"triton"`` runs the fused kernels.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from . import reference

Backend = Literal["torch", "triton"]

# ---------------------------------------------------------------------------------------------------
# LoRALinear
# ---------------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable LoRA update ``s · B A`` (PEFT's parameterisation).

    ``weight`` and ``bias`` are frozen Parameters (``requires_grad=False``) so that state-dict names
    match the ``nn.Linear`` they replace; ``lora_A [r, K]`` and ``lora_B [N, r]`` train.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = False,
        backend: Backend = "torch",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.dropout = dropout
        self.backend: Backend = backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A ~ kaiming-uniform(a=√5), B = 0, so the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        backend: Backend = "torch",
        lora_dtype: torch.dtype | None = None,
    ) -> LoRALinear:
        """Wrap an existing ``nn.Linear``, sharing (not copying) its weight and bias storage.

        Args:
            linear: the layer to adapt; its weight becomes the frozen base.
            rank, alpha, dropout: LoRA hyper-parameters (``scaling = alpha / rank``).
            backend: ``"torch"`` or ``"triton"``.
            lora_dtype: dtype of A and B (default: the base weight's dtype).

        Returns:
            The new module, on the linear's device.
        """
        w = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            rank,
            alpha,
            dropout=dropout,
            bias=linear.bias is not None,
            backend=backend,
            device="meta",
        )
        module.weight = nn.Parameter(w.data, requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        a_dtype = lora_dtype or w.dtype
        module.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=a_dtype))
        module.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=w.device, dtype=a_dtype))
        module.reset_lora_parameters()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        if self.backend == "triton":
            from .lora import lora_linear as fused_lora_linear

            return fused_lora_linear(
                x, self.weight, self.lora_A, self.lora_B, self.scaling, bias=self.bias, dropout_p=p
            )
        mask = None
        if p > 0.0:
            mask = torch.empty_like(x).bernoulli_(1.0 - p)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return reference.lora_linear(
            x, self.weight, a, b, self.scaling, bias=self.bias, dropout_mask=mask, dropout_p=p
        )

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Return a plain ``nn.Linear`` with ``W + s · B A`` folded in (the adapter is not modified)."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
        linear.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, dropout={self.dropout}, bias={self.bias is not None}, "
            f"backend={self.backend}"
        )


__all__ = ["Backend", "LoRALinear"]
