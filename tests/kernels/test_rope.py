"""Rotary position embedding (kernels/rope.py) against autograd through ``reference.rope`` (HF's form)."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close

from fusedtune.kernels import reference
from fusedtune.kernels.rope import RoPEFunction, apply_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
CASES = [(b, d) for b in ("triton", "torch") for d in DTYPES] + (
    [("torch", torch.bfloat16)] if DEVICE == "cpu" else []  # the CPU's bf16 path is torch's
)


def _tables(batch: int, t: int, d: int, dtype, generic: bool, seed: int = 1):
    """Llama's tables (both halves alike) from positions, or (``generic``) unrelated halves."""
    g = torch.Generator().manual_seed(seed)
    if generic:
        cos, sin = torch.rand(batch, t, d, generator=g) * 2 - 1, torch.rand(batch, t, d, generator=g) * 2 - 1
    else:
        pos = torch.randint(0, 4096, (batch, t), generator=g).double()
        inv = 1.0 / 10000 ** (torch.arange(0, d, 2).double() / d)
        ang = torch.cat([pos[..., None] * inv] * 2, dim=-1)
        cos, sin = ang.cos(), ang.sin()
    return cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)


def _qk_views(b: int, t: int, hq: int, hk: int, d: int, dtype, seed: int = 0):
    """q and k as HF's attention makes them: ``[B, T, H, D]`` projections seen as ``[B, H, T, D]``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(b, t, hk, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
    return q, k


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize(
    "b,t,hq,hk,d,table_batch,generic",
    [
        (2, 7, 4, 2, 16, 2, False),  # GQA, one table row per batch row
        (1, 5, 3, 3, 10, 1, True),  # D/2 = 5, not a power of two; unrelated cos/sin halves
        (3, 4, 5, 1, 8, 1, True),  # one table for every batch row (padding-free packs to B = 1 anyway)
        (2, 300, 2, 1, 256, 2, False),  # tokens over several programs (a partial last tile)
    ],
)
def test_rope_matches_autograd(backend, dtype, b, t, hq, hk, d, table_batch, generic):
    q, k = _qk_views(b, t, hq, hk, d, dtype)
    cos, sin = _tables(table_batch, t, d, dtype, generic)
    qi, ki = q.detach().requires_grad_(), k.detach().requires_grad_()
    yq, yk = apply_rope(qi, ki, cos, sin, backend=backend)
    g = torch.Generator().manual_seed(5)
    dq, dk = (torch.randn(y.shape, generator=g).to(DEVICE, dtype) for y in (yq, yk))
    torch.autograd.backward((yq, yk), (dq, dk))
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    rq, rk = reference.rope(q64, k64, cos.double(), sin.double())
    torch.autograd.backward((rq, rk), (dq.double(), dk.double()))
    assert yq.dtype == dtype and yk.dtype == dtype
    for y, x in ((yq, q), (yk, k)):  # the projections' layout, as HF's (a size-1 dim's stride aside)
        assert [st for st, n in zip(y.stride(), y.shape) if n > 1] == [
            st for st, n in zip(x.stride(), x.shape) if n > 1
        ]
    for name, got, want in (
        ("q", yq, rq),
        ("k", yk, rk),
        ("dq", qi.grad, q64.grad),
        ("dk", ki.grad, k64.grad),
    ):
        assert_close(got, want, dtype, name)


def test_saves_only_the_tables():
    q, k = _qk_views(1, 3, 2, 1, 8, torch.float32)
    q, k = q.requires_grad_(), k.requires_grad_()
    cos, sin = _tables(1, 3, 8, torch.float32, False)
    yq, _ = apply_rope(q * 1, k * 1, cos, sin, backend="torch")
    assert isinstance(yq.grad_fn, RoPEFunction._backward_cls)
    assert {t.data_ptr() for t in yq.grad_fn.saved_tensors} == {cos.data_ptr(), sin.data_ptr()}


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_only_the_inputs_that_need_it_get_a_gradient(backend):
    q, k = _qk_views(1, 3, 2, 1, 8, torch.float32)
    cos, sin = _tables(1, 3, 8, torch.float32, False)
    qi = q.detach().requires_grad_()
    yq, yk = apply_rope(qi, k, cos, sin, backend=backend)  # k frozen: a first layer with LoRA on q only
    assert not yk.requires_grad
    yq.sum().backward()
    rq, _ = reference.rope(q.detach().requires_grad_(), k, cos, sin)
    assert qi.grad is not None and torch.allclose(yq, rq, atol=1e-6)


def test_tables_in_another_dtype_promote_as_hf():
    q, k = _qk_views(1, 3, 2, 2, 8, torch.float16)
    cos, sin = _tables(1, 3, 8, torch.float32, False)
    qi = q.detach().requires_grad_()
    yq, yk = apply_rope(qi, k, cos, sin, backend="torch")
    rq, rk = reference.rope(q, k, cos, sin)
    assert yq.dtype == rq.dtype == torch.float32 and yk.dtype == rk.dtype
    yq.sum().backward()
    assert qi.grad.dtype == torch.float16


def test_gradcheck_float64():
    q, k = _qk_views(1, 3, 2, 1, 6, torch.float64)
    cos, sin = _tables(1, 3, 6, torch.float64, True)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: apply_rope(a, b, cos, sin, backend="torch"), (q, k))


def test_bad_inputs_are_rejected():
    q, k = _qk_views(1, 3, 2, 1, 8, torch.float32)
    cos, sin = _tables(1, 3, 8, torch.float32, False)
    with pytest.raises(ValueError, match="backend"):
        apply_rope(q, k, cos, sin, backend="cuda")
    with pytest.raises(ValueError, match="shapes disagree"):
        apply_rope(q, k, cos[:, :2], sin[:, :2])
    with pytest.raises(ValueError, match="even"):
        apply_rope(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="require grad"):
        apply_rope(q, k, cos.requires_grad_(), sin)
