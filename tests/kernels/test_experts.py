"""Expert-grouped LoRA / QLoRA (kernels/experts.py) against a per-expert autograd reference."""

from __future__ import annotations

import pytest
import torch

from fusedtune.kernels import quant
from fusedtune.kernels.experts import (
    DenseExperts,
    ExpertsLoRA,
    GroupedLoRAFunction,
    QuantExperts,
    grouped_lora,
)


def _reference(x, counts, w, a, b, scale, bias=None):
    """Plain autograd, one expert at a time: ``Y_e = X_e W_eᵀ (+ b_e) + s (X_e A_eᵀ) B_eᵀ``."""
    out, lo = [], 0
    for e, n in enumerate(counts):
        xe = x[lo : lo + n]
        y = xe @ w[e].t() + scale * (xe @ a[e].t()) @ b[e].t()
        out.append(y if bias is None else y + bias[e])
        lo += n
    return torch.cat(out)


def _problem(E=4, K=24, N=20, r=4, counts=(3, 0, 5, 2), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), K, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(E, N, K, generator=g, dtype=dtype)
    lora = ExpertsLoRA(E, K, N, r, alpha=2.0 * r, dtype=dtype)
    with torch.no_grad():
        lora.lora_A.copy_(torch.randn(E, r, K, generator=g, dtype=dtype))
        lora.lora_B.copy_(torch.randn(E, N, r, generator=g, dtype=dtype))
    return x, list(counts), w, lora


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_grouped_lora_matches_per_expert_autograd(transposed, with_bias):
    x, counts, w, lora = _problem()
    bias = torch.randn(4, 20, dtype=torch.float64) if with_bias else None
    stored = w.transpose(1, 2).contiguous() if transposed else w  # [E, K, N] as GPT-OSS keeps it
    y = grouped_lora(x, counts, DenseExperts(stored, transposed), lora, bias)
    xr = x.detach().clone().requires_grad_(True)
    ar, br = (
        lora.lora_A.detach().clone().requires_grad_(True),
        lora.lora_B.detach().clone().requires_grad_(True),
    )
    yr = _reference(xr, counts, w, ar, br, lora.scaling, bias)
    torch.testing.assert_close(y, yr)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(lora.lora_A.grad, ar.grad)
    torch.testing.assert_close(lora.lora_B.grad, br.grad)
    assert lora.lora_A.grad[1].abs().max() == 0 and lora.lora_B.grad[1].abs().max() == 0  # no tokens


def test_gradcheck_float64():
    x, counts, w, lora = _problem(E=3, K=6, N=5, r=2, counts=(2, 0, 3))
    weights = DenseExperts(w)

    def g(x, a, b):
        return GroupedLoRAFunction.apply(x, a, b, None, weights, tuple(counts), lora.scaling, "torch")

    a = lora.lora_A.detach().clone().requires_grad_(True)
    b = lora.lora_B.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(g, (x, a, b))


def test_without_lora_is_the_frozen_projection():
    x, counts, w, _ = _problem()
    y = grouped_lora(x, counts, DenseExperts(w), None)
    torch.testing.assert_close(y, torch.cat([xe @ w[e].t() for e, xe in enumerate(x.split(counts))]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.cat([w[e].sum(0).expand(n, -1) for e, n in enumerate(counts)]))


@pytest.mark.parametrize(
    "quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False)]
)
def test_quant_experts_are_each_expert_quantized_alone(quant_type, double_quant):
    """Expert e's packed state is bit for bit what quantizing its [N, K] weight on its own gives, for both
    storage orders, and dequantizes to the same weight."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 40, 48, generator=g)  # [E, N, K]
    for transposed in (False, True):
        stored = w.transpose(1, 2).contiguous() if transposed else w
        qe = QuantExperts.from_dense(stored, transposed, quant_type, 64, double_quant)
        for e in range(3):
            alone = quant.quantize(w[e], quant_type, 64, double_quant)
            pe = qe.packed(e)
            if quant_type == "int8":
                assert torch.equal(pe.qweight, alone.qweight) and torch.equal(pe.scale, alone.scale)
            else:
                assert torch.equal(pe.packed, alone.packed) and torch.equal(pe.absmax, alone.absmax)
            torch.testing.assert_close(quant.dequantize(pe, torch.float32), quant.dequantize(alone, torch.float32),
                                       rtol=0, atol=0)  # fmt: skip
        assert qe.dequantized(torch.float32).shape == (3, 40, 48)


def test_quant_experts_match_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(4))
    qe = QuantExperts.from_dense(w, False, "nf4", 64, True)
    for e in range(2):
        data, state = bnb.functional.quantize_4bit(
            w[e], blocksize=64, quant_type="nf4", compress_statistics=True
        )
        ref = bnb.functional.dequantize_4bit(data, state)
        torch.testing.assert_close(quant.dequantize(qe.packed(e), torch.float32), ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("backend", "rank"),
    [("torch", 4), ("triton", 4), ("triton", 272)],
    ids=["torch", "triton", "triton-r272"],
)
def test_quantized_grouped_lora_matches_dequantized_reference(backend, rank):
    """Over packed experts: the forward and every gradient equal the dense computation on deq(W);
    on the Triton backend small groups take the fused dequantize-in-GEMM kernel (with a rank over its
    256, the low-rank GEMMs beside it: that rank crashed the fused launch)."""
    torch.manual_seed(0)
    x, counts, w, lora = _problem(E=3, K=64, N=48, r=rank, counts=(5, 0, 7), dtype=torch.float32)
    qe = QuantExperts.from_dense(w, False, "nf4", 64, True)
    deq = qe.dequantized(torch.float32)
    y = grouped_lora(x, counts, qe, lora, backend=backend)
    xr = x.detach().clone().requires_grad_(True)
    ar, br = (
        lora.lora_A.detach().clone().requires_grad_(True),
        lora.lora_B.detach().clone().requires_grad_(True),
    )
    yr = _reference(xr, counts, deq, ar, br, lora.scaling)
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-4)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lora.lora_A.grad, ar.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lora.lora_B.grad, br.grad, rtol=1e-4, atol=1e-4)


def test_peft_factor_layout_round_trips():
    lora = ExpertsLoRA(3, 8, 6, 2, alpha=4.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    a, b = lora.peft_factors()
    assert a.shape == (2 * 3, 8) and b.shape == (6, 2 * 3)
    # PEFT's ParamWrapper.get_delta_weight (the "e o i" branch), written out
    wa = a.reshape(3, -1, 8)
    wb = b.reshape(6, -1, 3)
    delta = torch.einsum("o r e, e r i -> e o i", wb, wa) * lora.scaling
    torch.testing.assert_close(delta, lora.delta())
    other = ExpertsLoRA(3, 8, 6, 2, alpha=4.0)
    other.from_peft_factors(a, b)
    assert torch.equal(other.lora_A, lora.lora_A) and torch.equal(other.lora_B, lora.lora_B)


def test_bad_counts_are_refused():
    x, counts, w, lora = _problem()
    with pytest.raises(ValueError, match="counts"):
        grouped_lora(x, [1, 2, 3], DenseExperts(w), lora)
    with pytest.raises(ValueError, match="none negative"):  # sums to M, yet expert 2 would overwrite rows
        grouped_lora(x, [counts[0] + 2, -2, *counts[2:]], DenseExperts(w), lora)
    with pytest.raises(ValueError, match="expected x"):
        grouped_lora(x[:, :5], counts, DenseExperts(w), lora)


def test_second_derivative_raises():
    x, counts, w, lora = _problem()
    y = grouped_lora(x, counts, DenseExperts(w), lora)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()
