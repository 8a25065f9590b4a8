"""Causal attention over packed rows (kernels/attention.py, CPU) against ``reference.packed_causal_attention``:
softmax attention written out row by row, autograd through it."""

from __future__ import annotations

import pytest
import torch

from fusedtune.kernels import reference
from fusedtune.kernels.attention import packed_causal_attention

# (dtype, forward tolerance, gradient tolerance): 16-bit outputs are rounded once from fp32 math
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 5e-6),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 3.2e-2),
}


def _qkv(t: int, hq: int, hk: int, d: int, dtype, seed: int = 0):
    """q as HF's attention hands it over (a ``[1, T, H, D]`` projection seen as ``[1, H, T, D]``), k and v too."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, t, h, d, generator=g).to(dtype).transpose(1, 2) for h in (hq, hk, hk))
    return [x.requires_grad_() for x in (q, k, v)]


def _run(fn, q, k, v, bounds, scale, grad):
    out = fn(q, k, v, bounds, scale)
    return out, torch.autograd.grad(out, (q, k, v), grad)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize(
    "t,hq,hk,d,bounds",
    [
        (19, 6, 2, 16, (0, 5, 6, 19)),  # grouped-query, a one-token row, odd lengths
        (24, 4, 4, 32, (0, 24)),  # one row, multi-head
        (33, 3, 1, 8, (0, 11, 22, 33)),  # multi-query
    ],
)
def test_matches_reference(dtype, t, hq, hk, d, bounds):
    q, k, v = _qkv(t, hq, hk, d, dtype)
    grad = torch.randn(1, t, hq, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale = 0.3
    out, grads = _run(packed_causal_attention, q, k, v, bounds, scale, grad)
    ref, ref_grads = _run(reference.packed_causal_attention, q, k, v, bounds, scale, grad)
    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert out.shape == (1, t, hq, d) and out.is_contiguous() and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=fwd_tol, atol=fwd_tol)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g, r, rtol=grad_tol, atol=grad_tol, msg=f"d{name}")


def test_rows_do_not_see_each_other():
    """Changing one row's keys and values leaves every other row's output as it was."""
    q, k, v = (x.detach() for x in _qkv(20, 2, 1, 8, torch.float32))
    bounds = (0, 7, 20)
    before = packed_causal_attention(q, k, v, bounds)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 7:] += 1.0
    v2[:, :, 7:] -= 2.0
    after = packed_causal_attention(q, k2, v2, bounds)
    torch.testing.assert_close(after[:, :7], before[:, :7], rtol=0, atol=0)
    assert not torch.allclose(after[:, 7:], before[:, 7:])


def test_default_scale_is_inverse_sqrt_of_head_dim():
    q, k, v = (x.detach() for x in _qkv(9, 2, 2, 16, torch.float32))
    torch.testing.assert_close(
        packed_causal_attention(q, k, v, (0, 4, 9)), packed_causal_attention(q, k, v, (0, 4, 9), 0.25)
    )


def test_gradcheck_float64():
    q, k, v = _qkv(7, 2, 1, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: packed_causal_attention(q, k, v, (0, 3, 7)), (q, k, v))


def test_only_the_inputs_that_need_a_gradient_get_one():
    q, k, v = _qkv(10, 2, 1, 8, torch.float32)
    k.requires_grad_(False)
    bounds = (0, 4, 10)
    packed_causal_attention(q, k, v, bounds).sum().backward()
    assert k.grad is None
    dq, dv = torch.autograd.grad(reference.packed_causal_attention(q, k, v, bounds).sum(), (q, v))
    torch.testing.assert_close(q.grad, dq, rtol=5e-6, atol=5e-6)
    torch.testing.assert_close(v.grad, dv, rtol=5e-6, atol=5e-6)


@pytest.mark.parametrize(
    "bounds,message",
    [
        ((0, 5), "bounds must rise strictly from 0 to 10"),
        ((0, 5, 5, 10), "rise strictly"),
        ((1, 10), "from 0"),
    ],
)
def test_bad_bounds_are_refused(bounds, message):
    q, k, v = _qkv(10, 2, 1, 8, torch.float32)
    with pytest.raises(ValueError, match=message):
        packed_causal_attention(q, k, v, bounds)


def test_heads_must_group():
    q, k, v = _qkv(10, 3, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2 kv heads"):
        packed_causal_attention(q, k, v, (0, 10))
