"""Second derivatives through the kernels' autograd Functions raise; they are never silently zero.

Each Function's backward runs kernels autograd cannot see (the Triton ones, and in-place torch ops on the
CPU path). Asked for a graph of the gradient (``create_graph=True``), it must not hand back a gradient
that looks differentiable and is not: ``once_differentiable`` turns the second backward into an error.
Before, the fused LoRA layer returned a dX with no graph, and a gradient penalty on it trained nothing.
"""

from __future__ import annotations

import pytest
import torch

from fusedtune.kernels import quant
from fusedtune.kernels.lora import lora_linear, lora_linear_torch
from fusedtune.kernels.qmatmul import qlora_linear
from fusedtune.kernels.rmsnorm import rms_norm
from fusedtune.kernels.rope import apply_rope
from fusedtune.kernels.swiglu import silu_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(*shapes):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(s, generator=g) * 0.5).to(DEVICE) for s in shapes]


def _lora(backend):
    x, w, a, b = _inputs((5, 16), (12, 16), (4, 16), (12, 4))
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    fn = lora_linear if backend == "triton" else lora_linear_torch
    return fn(x, w, a, b, 2.0), x


def _qlora(backend):
    x, w, a, b = _inputs((5, 64), (12, 64), (4, 64), (12, 4))
    pw = quant.quantize(w, "nf4", 64, True, backend="torch")
    x.requires_grad_()
    a.requires_grad_()
    return qlora_linear(x, pw, a, b, 2.0, backend=backend), x


def _rmsnorm(backend):
    x, w = _inputs((5, 16), (16,))
    x.requires_grad_()
    return rms_norm(x, w.requires_grad_(), 1e-6, backend=backend), x


def _swiglu(backend):
    g, u = _inputs((5, 16), (5, 16))
    g.requires_grad_()
    return silu_mul(g, u.requires_grad_(), backend=backend), g


def _rope(backend):
    q, k, cos, sin = _inputs((1, 2, 5, 8), (1, 1, 5, 8), (1, 5, 8), (1, 5, 8))
    q.requires_grad_()
    q_out, k_out = apply_rope(q, k.requires_grad_(), cos, sin, backend=backend)
    return q_out * 2 + k_out.sum(), q


CASES = {"lora": _lora, "qlora": _qlora, "rmsnorm": _rmsnorm, "swiglu": _swiglu, "rope": _rope}


@pytest.mark.parametrize(
    ("case", "backend"),
    # lora_linear_torch's backward is differentiable torch ops: the test below checks its numbers
    [(c, b) for c in sorted(CASES) for b in ("triton", "torch") if (c, b) != ("lora", "torch")],
)
def test_second_derivative_raises(case, backend):
    y, x = CASES[case](backend)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.square().sum().backward()


def test_lora_torch_second_derivative_matches_autograd():
    """The torch LoRA path stays twice differentiable, with autograd's own composition's numbers."""
    x, w, a, b = _inputs((5, 16), (12, 16), (4, 16), (12, 4))
    grads = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        xx, aa, bb = leaves
        y = lora_linear_torch(xx, w, aa, bb, 2.0) if fused else xx @ w.t() + 2.0 * (xx @ aa.t()) @ bb.t()
        (gx,) = torch.autograd.grad(y.square().sum(), xx, create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), (aa, bb)))
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
