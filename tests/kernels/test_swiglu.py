"""Fused SwiGLU gate (kernels/swiglu.py) against autograd through ``reference.silu_mul``."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close

from fusedtune.kernels import reference
from fusedtune.kernels.swiglu import SwiGLUFunction, silu_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize(
    "backend,dtype",
    [(b, d) for b in ("triton", "torch") for d in DTYPES]
    + ([("torch", torch.bfloat16)] if DEVICE == "cpu" else []),  # the CPU's bf16 path is torch's
)
@pytest.mark.parametrize("shape", [(3, 7, 45), (2100,)])  # odd sizes; one spans several kernel blocks
def test_silu_mul_matches_autograd(backend, dtype, shape):
    g = torch.Generator().manual_seed(0)
    gate, up, dy = (torch.randn(shape, generator=g) * 3 for _ in range(3))
    gate, up, dy = (t.to(DEVICE, dtype) for t in (gate, up, dy))
    gi, ui = gate.clone().requires_grad_(), up.clone().requires_grad_()
    y = silu_mul(gi, ui, backend=backend)
    y.backward(dy)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    ref = reference.silu_mul(g64, u64)
    ref.backward(dy.double())
    assert y.dtype == dtype
    assert_close(y, ref, dtype, "Y")
    assert_close(gi.grad, g64.grad, dtype, "dG")
    assert_close(ui.grad, u64.grad, dtype, "dU")


def test_saves_only_its_inputs():
    gate = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    up = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    g, u = gate * 1, up * 1  # non-leaf inputs, as in the MLP
    y = silu_mul(g, u, backend="torch")
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {g.data_ptr(), u.data_ptr()}
    assert isinstance(y.grad_fn, SwiGLUFunction._backward_cls)


def test_gradcheck_float64():
    gate = torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    up = torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, u: silu_mul(g, u, backend="torch"), (gate, up))


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="must match"):
        silu_mul(torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(ValueError, match="backend"):
        silu_mul(torch.randn(2), torch.randn(2), backend="cuda")
