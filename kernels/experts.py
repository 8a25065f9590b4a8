"""LoRA and QLoRA over a mixture-of-experts layer's stacked expert weights.

An MoE layer keeps its E experts' projections as one 3-D weight (``[E, N, K]``, or ``[E, K, N]`` when
stored transposed). Tokens routed to expert e form a contiguous group once sorted by expert; for each
group, with the expert's frozen ``W_e [N, K]``, trainable ``A_e [r, K]``, ``B_e [N, r]`` and
``s = alpha / r``::

    S_e  = X_e A_eᵀ                        [M_e, r]
    Y_e  = X_e W_eᵀ (+ b_e) + s S_e B_eᵀ   [M_e, N]
    dS_e = s dY_e B_e,   dB_e = s dY_eᵀ S_e,   dA_e = dS_eᵀ X_e
    dX_e = dY_e W_e + dS_e A_e

:class:`GroupedLoRAFunction` runs those per group in one autograd node: A and B are ``[E, r, K]`` and
``[E, N, r]`` Parameters whose gradients are written expert by expert (slicing them per expert under
autograd would allocate a full-size zero gradient per expert). Saved for backward: X and S (``[M, r]``);
never a weight. There is no dW, and no LoRA dropout (PEFT's expert LoRA has none either).

The frozen weight is either the dense 3-D tensor (:class:`DenseExperts`) or a stack of per-expert
quantized weights (:class:`QuantExperts`), each expert quantized on its own exactly as a Linear's
``[N, K]`` weight would be (bnb's layout, ``quant.py``). A quantized expert runs as a QLoRA Linear does
(``qmatmul.py``): the fused dequantize-in-GEMM kernel below ``DEQUANT_MIN_TOKENS`` tokens on the Triton
backend, otherwise decoded into a one-GEMM temporary that is never saved.

The experts' LoRA is PEFT's (``LoraConfig(target_parameters=...)``, ``lora.ParamWrapper``): the same
delta ``s B_e A_e`` per expert; ``peft_factors`` / ``from_peft_factors`` convert to its tensor layout.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import quant
from ._autocast import autocast_dtype, autocast_off, cast_to
from .modules import PackedBuffers
from .qmatmul import MAX_RANK, QLoRAConfig, _dense, _fused, qmatmul_backward_dx, qmatmul_forward

__all__ = [
    "DenseExperts",
    "ExpertsLoRA",
    "GroupedLoRAFunction",
    "QuantExperts",
    "grouped_lora",
]


class DenseExperts:
    """The frozen expert weights as they are: ``[E, N, K]`` (or ``[E, K, N]`` when ``transposed``)."""

    def __init__(self, weight: torch.Tensor, transposed: bool = False) -> None:
        if weight.dim() != 3:
            raise ValueError(f"expected a 3-D [experts, out, in] weight, got {tuple(weight.shape)}")
        self.weight, self.transposed = weight, transposed
        e, a, b = weight.shape
        self.num_experts = e
        self.shape = (b, a) if transposed else (a, b)  # (N, K)

    def _w(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight[e].to(dtype)
        return w.t() if self.transposed else w  # [N, K]

    def project(self, e, x, s_scaled, lora_b, bias, backend) -> torch.Tensor:
        """Expert e's ``X W_eᵀ (+ S' B_eᵀ) (+ b_e)``."""
        y = F.linear(x, self._w(e, x.dtype), bias)
        return y if s_scaled is None else y.addmm_(s_scaled, lora_b.t())

    def project_dx(self, e, dy, ds, lora_a, backend) -> torch.Tensor:
        """Expert e's ``dY W_e (+ dS A_e)``."""
        dx = dy @ self._w(e, dy.dtype)
        return dx if ds is None else dx.addmm_(ds, lora_a)


class QuantExperts(PackedBuffers):
    """E experts' frozen ``[N, K]`` weights, each quantized on its own, stacked along a leading axis.

    Buffers are :class:`~fusedtune.kernels.QuantLoRALinear`'s with a leading ``[E]``: 4-bit ``qweight``
    ``[E, (N·K + 1) // 2]``, ``absmax`` ``[E, blocks]`` and with double quant ``quant_offset [E, 1]``,
    ``nested_absmax [E, ·]``, ``nested_code [256]`` (one table for all); int8 ``qweight [E, N, K]``,
    ``weight_scale [E, N]``. ``packed(e)`` is expert e as a ``PackedWeight`` view.
    """

    def __init__(self, experts: list[quant.PackedWeight]) -> None:
        super().__init__()
        self.num_experts = len(experts)
        self.shape = tuple(experts[0].shape)
        self._register_packed(experts, stacked=True)

    @property
    def weight_numel(self) -> int:
        return self.num_experts * self.shape[0] * self.shape[1]

    @classmethod
    @torch.no_grad()
    def from_dense(
        cls,
        weight: torch.Tensor,
        transposed: bool = False,
        quant_type: quant.QuantType = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        device: torch.device | None = None,
    ) -> QuantExperts:
        """Quantize a ``[E, N, K]`` (``[E, K, N]`` when ``transposed``) weight expert by expert; each expert
        is moved to ``device`` on its own, so the dense stack never sits there whole."""
        packed = []
        for e in range(weight.shape[0]):
            w = weight[e].to(device) if device is not None else weight[e]
            packed.append(
                quant.quantize((w.t() if transposed else w).contiguous(), quant_type, blocksize, double_quant)
            )
        return cls(packed)

    def packed(self, e: int) -> quant.PackedWeight:
        return self._packed_view(self.shape, e)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.no_grad()
    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[E, N, K]`` dense weights (for export and checks, not for training)."""
        return torch.stack(
            [quant.dequantize(self.packed(e), dtype or self.weight_dtype) for e in range(self.num_experts)]
        )

    def project(self, e, x, s_scaled, lora_b, bias, backend) -> torch.Tensor:
        """Expert e's ``X deq(W_e)ᵀ (+ S' B_eᵀ) (+ b_e)``."""
        pw, cfg = self.packed(e), QLoRAConfig(scale=1.0, backend=backend)
        if _fused(cfg, x.shape[0], pw):
            if s_scaled is None or s_scaled.shape[1] <= MAX_RANK:
                return qmatmul_forward(x, pw, s_scaled, lora_b, bias)
            y = qmatmul_forward(x, pw, None, None, bias)  # a rank over the kernel's: the low-rank GEMM apart
        else:
            y = F.linear(x, _dense(pw, x.dtype, cfg), bias)
        return y if s_scaled is None else y.addmm_(s_scaled, lora_b.t())

    def project_dx(self, e, dy, ds, lora_a, backend) -> torch.Tensor:
        """Expert e's ``dY W_e (+ dS A_e)``."""
        pw, cfg = self.packed(e), QLoRAConfig(scale=1.0, backend=backend)
        if _fused(cfg, dy.shape[0], pw):
            if ds is None or ds.shape[1] <= MAX_RANK:
                return qmatmul_backward_dx(dy, pw, ds, lora_a)
            dx = qmatmul_backward_dx(dy, pw)
        else:
            dx = dy @ _dense(pw, dy.dtype, cfg)
        return dx if ds is None else dx.addmm_(ds, lora_a)

    def extra_repr(self) -> str:
        n, k = self.shape
        return f"experts={self.num_experts}, out={n}, in={k}, quant_type={self.quant_type}, blocksize={self.blocksize}"


class ExpertsLoRA(nn.Module):
    """Per-expert LoRA factors: ``lora_A [E, r, K]``, ``lora_B [E, N, r]``, ``scaling = alpha / rank``.

    Initialised as PEFT's ``ParamWrapper``: each ``A_e`` kaiming-uniform(a=√5) over fan-in K, B = 0.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int, alpha: float,
                 device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank, **factory))
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A.view(num_experts * rank, in_features), a=math.sqrt(5))

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A [r·E, K], lora_B [N, r·E])`` in PEFT's ``ParamWrapper`` layout: A's rows expert-major
        (row ``e·r + j``), B's columns rank-major (column ``j·E + e``)."""
        e, r = self.num_experts, self.rank
        a = self.lora_A.detach().reshape(e * r, self.in_features)
        b = self.lora_B.detach().permute(1, 2, 0).reshape(self.out_features, r * e)
        return a.contiguous(), b.contiguous()

    @torch.no_grad()
    def from_peft_factors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Load PEFT's ``(lora_A [r·E, K], lora_B [N, r·E])`` (the inverse of :meth:`peft_factors`)."""
        e, r = self.num_experts, self.rank
        self.lora_A.copy_(a.reshape(e, r, self.in_features))
        self.lora_B.copy_(b.reshape(self.out_features, r, e).permute(2, 0, 1))

    def delta(self) -> torch.Tensor:
        """``s B_e A_e`` for every expert, ``[E, N, K]`` fp32 (for merging and checks)."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha}"
        )


class GroupedLoRAFunction(torch.autograd.Function):
    """Expert-grouped ``Y = X W_eᵀ (+ b_e) + s (X A_eᵀ) B_eᵀ``; saves X and S, never a weight."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, weights, counts, scale, backend):
        m, n = x.shape[0], weights.shape[0]
        y = x.new_empty(m, n)
        lora = lora_a is not None
        s_all = x.new_empty(m, lora_a.shape[1]) if lora else None
        bounds = list(itertools.accumulate(counts, initial=0))
        for e, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            if hi == lo:
                continue
            xe = x[lo:hi]
            b_e = None if bias is None else bias[e].to(x.dtype)
            if lora:
                s = torch.mm(xe, lora_a[e].to(x.dtype).t(), out=s_all[lo:hi])
                y[lo:hi] = weights.project(e, xe, s * scale, lora_b[e].to(x.dtype), b_e, backend)
            else:
                y[lo:hi] = weights.project(e, xe, None, None, b_e, backend)
        ctx.weights, ctx.bounds, ctx.scale, ctx.backend = weights, bounds, scale, backend
        ctx.save_for_backward(x if lora and ctx.needs_input_grad[1] else None, s_all, lora_a, lora_b)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, s_all, lora_a, lora_b = ctx.saved_tensors
        weights, scale, backend = ctx.weights, ctx.scale, ctx.backend
        need_dx, need_da, need_db = ctx.needs_input_grad[:3]
        if ctx.needs_input_grad[3]:
            raise RuntimeError("grouped LoRA never computes a gradient for the frozen expert bias")
        lora = lora_a is not None
        dx = dy.new_empty(dy.shape[0], weights.shape[1]) if need_dx else None
        da = torch.zeros_like(lora_a) if need_da else None
        db = torch.zeros_like(lora_b) if need_db else None
        for e, (lo, hi) in enumerate(itertools.pairwise(ctx.bounds)):
            if hi == lo:
                continue
            dye = dy[lo:hi]
            if lora:
                a, b = lora_a[e].to(dy.dtype), lora_b[e].to(dy.dtype)
                ds = scale * (dye @ b)  # [M_e, r]
                if need_da:
                    da[e] = ds.t() @ x[lo:hi]
                if need_db:
                    db[e] = (s_all[lo:hi].t() @ dye).mul_(scale).t()
            else:
                a = ds = None
            if need_dx:
                dx[lo:hi] = weights.project_dx(e, dye, ds, a, backend)
        return dx, da, db, None, None, None, None, None


def grouped_lora(
    x: torch.Tensor,
    counts: list[int],
    weights: DenseExperts | QuantExperts,
    lora: ExpertsLoRA | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """``Y [M, N]`` for ``x [M, K]`` sorted by expert, ``counts[e]`` rows for expert e.

    Args:
        weights: the frozen expert weights (dense or quantized).
        lora: the experts' adapters, or None (the frozen projection only).
        bias: optional frozen ``[E, N]``.
        backend: ``"torch"`` or ``"triton"`` (quantized experts: the fused kernel for small groups).
    """
    if x.dim() != 2 or x.shape[1] != weights.shape[1]:
        raise ValueError(f"expected x [M, {weights.shape[1]}], got {tuple(x.shape)}")
    if len(counts) != weights.num_experts or sum(counts) != x.shape[0] or min(counts, default=0) < 0:
        raise ValueError(
            f"counts must give {weights.num_experts} group sizes, none negative, summing to {x.shape[0]}; "
            f"got {list(counts)}"
        )
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("grouped LoRA never computes a gradient for the frozen expert bias")
    if (dt := autocast_dtype(x)) is not None:  # as autocast runs nn.Linear: in its dtype (_autocast.py)
        (x,) = cast_to(dt, x)  # the experts' weights and bias follow x's dtype inside
        with autocast_off(x):
            return grouped_lora(x, counts, weights, lora, bias, backend)
    a = b = None
    scale = 0.0
    if lora is not None:
        a, b, scale = lora.lora_A, lora.lora_B, lora.scaling
    return GroupedLoRAFunction.apply(x, a, b, bias, weights, tuple(counts), scale, backend)
