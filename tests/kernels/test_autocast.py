"""The GEMM-bearing ops inside ``torch.autocast`` (kernels/_autocast.py).

A user's own loop under autocast runs an ``nn.Linear`` in the autocast dtype. Each op here must do the
same: its output and gradients equal the same op run outside autocast on the inputs cast as autocast
casts them (x and the frozen tensors; A and B stay as they are, their gradients in their own dtype).
Before, the torch paths raised on mixed dtypes (``addmm_`` and ``out=`` are not autocast) and the
Triton path ran in fp32.

On the CPU, Triton's interpreter runs fp16 correctly but not bf16, so the Triton cases use an fp16
autocast there.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusedtune.kernels import LoRALinear, QuantLoRALinear, quant
from fusedtune.kernels.cross_entropy import linear_cross_entropy
from fusedtune.kernels.lora import lora_linear, lora_linear_torch, lora_siblings_torch
from fusedtune.kernels.qmatmul import qlora_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(backend: str) -> torch.dtype:
    return torch.float16 if backend == "triton" and DEVICE == "cpu" else torch.bfloat16


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _check(under, plain, leaves_under, leaves_plain, dtype):
    """``under()`` inside autocast against ``plain()`` outside it: same output, same gradients, bit for bit
    (the same kernels run on the same rounded inputs)."""
    with torch.autocast(DEVICE, dtype=dtype):
        y = under()
    y_ref = plain()
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    g = torch.randn_like(y_ref.float()).to(y_ref.dtype) if y_ref.dim() else None
    y.backward(g)
    y_ref.backward(g)
    for got, want in zip(leaves_under, leaves_plain, strict=True):
        assert got.grad.dtype == got.dtype, "a leaf's gradient comes back in its own dtype"
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_linear(backend):
    dt = _dtype(backend)
    torch.manual_seed(0)
    x, a, b = (
        torch.randn(2, 5, 48, device=DEVICE),
        torch.randn(4, 48, device=DEVICE),
        torch.randn(24, 4, device=DEVICE),
    )
    w, bias = torch.randn(24, 48, device=DEVICE) / 7, torch.randn(24, device=DEVICE)
    fn = lora_linear if backend == "triton" else lora_linear_torch
    xu, au, bu = _leaves(x, a, b)
    xp, ap, bp = _leaves(x, a, b)
    _check(
        lambda: fn(xu, w, au, bu, 0.5, bias),
        lambda: fn(xp.to(dt), w.to(dt), ap, bp, 0.5, bias.to(dt)),
        (xu, au, bu),
        (xp, ap, bp),
        dt,
    )


def test_lora_siblings():
    dt = torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(6, 32, device=DEVICE)
    ws = [torch.randn(n, 32, device=DEVICE) / 6 for n in (16, 8)]
    abs_ = [torch.randn(4, 32, device=DEVICE) for _ in ws] + [
        torch.randn(n, 4, device=DEVICE) for n in (16, 8)
    ]
    under, plain = _leaves(x, *abs_), _leaves(x, *abs_)

    def run(leaves, cast):
        x_, a1, a2, b1, b2 = leaves
        ys = lora_siblings_torch(cast(x_), [cast(w) for w in ws], [a1, a2], [b1, b2], [0.5, 2.0])
        return torch.cat([y.flatten() for y in ys])

    _check(lambda: run(under, lambda t: t), lambda: run(plain, lambda t: t.to(dt)), under, plain, dt)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_modules_follow_autocast_like_nn_linear(backend):
    """LoRALinear and QuantLoRALinear in a user's autocast loop: the output is in the autocast dtype, as
    an nn.Linear's, and A/B get fp32 gradients."""
    dt = _dtype(backend)
    torch.manual_seed(0)
    lin = nn.Linear(32, 16).to(DEVICE)
    for mod in (
        LoRALinear.from_linear(lin, 4, 8.0, backend=backend),
        QuantLoRALinear.from_linear(lin, 4, 8.0, quant_type="nf4", backend=backend),
    ):
        nn.init.normal_(mod.lora_B, std=0.1)
        x = torch.randn(3, 32, device=DEVICE, requires_grad=True)
        with torch.autocast(DEVICE, dtype=dt):
            y = mod(x)
            y_lin = lin(x)
        assert y.dtype == y_lin.dtype == dt
        y.float().square().sum().backward()
        assert x.grad.dtype == torch.float32 and mod.lora_A.grad.dtype == torch.float32
        assert mod.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_qlora_linear(backend):
    dt = _dtype(backend)
    torch.manual_seed(0)
    pw = quant.quantize(torch.randn(24, 64, device=DEVICE) * 0.1, "nf4", 64, True)
    x, a, b = (
        torch.randn(5, 64, device=DEVICE),
        torch.randn(4, 64, device=DEVICE),
        torch.randn(24, 4, device=DEVICE),
    )
    xu, au, bu = _leaves(x, a, b)
    xp, ap, bp = _leaves(x, a, b)
    _check(
        lambda: qlora_linear(xu, pw, au, bu, 0.5, backend=backend),
        lambda: qlora_linear(xp.to(dt), pw, ap, bp, 0.5, backend=backend),
        (xu, au, bu),
        (xp, ap, bp),
        dt,
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_cross_entropy(backend):
    """The LM head as autocast runs it (hidden and weight in the autocast dtype); the loss in fp32."""
    dt = _dtype(backend)
    torch.manual_seed(0)
    h, w = torch.randn(7, 16, device=DEVICE), torch.randn(40, 16, device=DEVICE) / 4
    t = torch.randint(0, 40, (7,), device=DEVICE)
    under, plain = _leaves(h, w), _leaves(h, w)
    _check(
        lambda: linear_cross_entropy(*under, t, backend=backend),
        lambda: linear_cross_entropy(plain[0].to(dt), plain[1].to(dt), t, backend=backend),
        under,
        plain,
        dt,
    )


def test_grouped_experts():
    """MoE experts' grouped LoRA raised on mixed dtypes under autocast, as the Linears' did."""
    from fusedtune.kernels.experts import DenseExperts, ExpertsLoRA, grouped_lora

    dt = torch.bfloat16
    torch.manual_seed(0)
    w = torch.randn(3, 12, 16, device=DEVICE) / 4
    lora = ExpertsLoRA(3, 16, 12, 4, 8.0).to(DEVICE)
    nn.init.normal_(lora.lora_B, std=0.1)
    x, counts = torch.randn(7, 16, device=DEVICE), [2, 0, 5]
    xu, xp = _leaves(x)[0], _leaves(x)[0]
    with torch.autocast(DEVICE, dtype=dt):
        y = grouped_lora(xu, counts, DenseExperts(w), lora)
    y_ref = grouped_lora(xp.to(dt), counts, DenseExperts(w), lora)
    assert y.dtype == dt
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def test_fp64_and_meta_tensors_are_left_alone():
    """Autocast never touches fp64, and has no meta device (shape tracing raised there)."""
    w, a, b = torch.randn(6, 8, dtype=torch.float64), torch.randn(2, 8), torch.randn(6, 2)
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora_linear_torch(x, w, a, b, 1.0).dtype == torch.float64
    meta = [t.to("meta") for t in (x.float(), w.float(), a, b)]
    assert lora_linear_torch(*meta, 1.0).shape == (3, 6)
    h, head = torch.randn(4, 8, device="meta"), torch.randn(10, 8, device="meta")
    assert linear_cross_entropy(
        h, head, torch.zeros(4, dtype=torch.long, device="meta"), backend="torch"
    ).is_meta


def test_compute_dtype_gives_way_to_autocast():
    """A QuantLoRALinear with an fp16 compute dtype (a bnb checkpoint's) under a bf16 autocast computes in
    bf16 whatever its input's dtype: a bf16 input went through fp16 and overflowed."""
    torch.manual_seed(0)
    q = QuantLoRALinear.from_linear(nn.Linear(32, 8).to(DEVICE), 4, 8.0, quant_type="nf4")
    q.compute_dtype = torch.float16
    x = torch.full((2, 32), 1e5, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y32, y16 = q(x), q(x.bfloat16())
    assert torch.isfinite(y32).all() and torch.equal(y32, y16)
