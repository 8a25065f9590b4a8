"""Fused RMSNorm (kernels/rmsnorm.py) against autograd through ``reference.rms_norm`` and HF's own module."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close, backward_extra_bytes

from fusedtune.kernels import reference
from fusedtune.kernels.rmsnorm import RMSNormFunction, rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 on a GPU only: the CPU interpreter truncates bf16 arithmetic (see tests/conftest.py)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
EPS = 1e-5


def _problem(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    w = 1 + 0.1 * torch.randn(shape[-1], generator=g)
    dy = torch.randn(shape, generator=g)
    return (t.to(DEVICE, dtype) for t in (x, w, dy))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 45), (130, 64), (1, 1000)])  # odd widths; rows past one program
@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_rms_norm_matches_autograd(backend, dtype, shape, train_weight, style):
    x, w, dy = _problem(shape, dtype)
    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_(train_weight)
    y = rms_norm(xi, wi, EPS, backend=backend, style=style)
    y.backward(dy)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_(train_weight)
    ref = reference.rms_norm(x64, w64, EPS, style=style)
    ref.backward(dy.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref, dtype, "Y")
    assert_close(xi.grad, x64.grad, dtype, "dX")
    if train_weight:
        # dW sums over every row: its error grows with the row count, as any reduction's
        assert_close(wi.grad / shape[0], w64.grad / shape[0], dtype, "dW")
    else:
        assert wi.grad is None


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_rounds_as_hf_llama_rmsnorm(backend, dtype):
    """The same rounding as HF's module: statistics in fp32, x̂ rounded to x's dtype, then the weight."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w, _ = _problem((5, 96), dtype, seed=1)
    hf = LlamaRMSNorm(96, eps=EPS).to(DEVICE, dtype)
    with torch.no_grad():
        hf.weight.copy_(w)
        expected = hf(x)
    got = rms_norm(x, w, EPS, backend=backend)
    if dtype == torch.float32:  # one fp32 reduction against another: summation order differs
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
    else:  # 16-bit outputs: the fp32 statistics' last bits vanish in the rounding, nearly always
        assert (got != expected).float().mean() < 0.01


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", ["x", torch.float32])
def test_gemma_style_rounds_as_hf_gemma_rmsnorm(backend, dtype, weight_dtype):
    """``GemmaRMSNorm``: x̂ · (1 + w) in fp32, rounded once to x's dtype, whatever the weight's dtype."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    x, w, _ = _problem((5, 96), dtype, seed=2)
    w = (w - 1).to(dtype if weight_dtype == "x" else weight_dtype)  # Gemma's weights sit around 0
    hf = GemmaRMSNorm(96, eps=EPS).to(DEVICE, w.dtype)
    with torch.no_grad():
        hf.weight.copy_(w)
        expected = hf(x)
    got = rms_norm(x, w, EPS, backend=backend, style="gemma")
    assert got.dtype == expected.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
    else:
        assert (got != expected).float().mean() < 0.01


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_output_may_be_modified_in_place(backend):
    """y is not a view made inside the autograd node: a model may add into it in place (autograd forbids
    that on such a view), and the gradient is the out-of-place one's."""
    x, w, _ = _problem((2, 3, 16), torch.float32)
    x.requires_grad_()
    y = rms_norm(x, w, EPS, backend=backend)
    y.mul_(2.0)
    y.sum().backward()
    xr = x.detach().clone().requires_grad_()
    (rms_norm(xr, w, EPS, backend=backend) * 2.0).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=0)


def test_saves_its_input_and_one_fp32_scalar_per_row():
    x = torch.randn(6, 32, device=DEVICE, dtype=torch.float16, requires_grad=True)
    w = torch.ones(32, device=DEVICE, dtype=torch.float16)
    h = x * 1  # a non-leaf input, as the residual stream
    y = rms_norm(h, w, EPS, backend="torch")
    assert isinstance(y.grad_fn, RMSNormFunction._backward_cls)
    saved = y.grad_fn.saved_tensors
    shapes = sorted((tuple(t.shape), t.dtype) for t in saved)
    assert shapes == sorted([((6, 32), torch.float16), ((32,), torch.float16), ((6,), torch.float32)])
    assert any(t.data_ptr() == h.data_ptr() for t in saved)  # the input itself, no fp32 copy


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_strided_inputs_and_weight(backend):
    """A column slice of a wider tensor and a weight viewed with stride 2 give what contiguous copies give."""
    x, w, _ = _problem((9, 70), torch.float32)
    wide_w = torch.stack([w, -w], dim=1)  # w is its column 0, stride 2
    xs, ws = x[:, 3:45], wide_w[3:45, 0]
    assert not xs.is_contiguous() and ws.stride(0) == 2
    got = rms_norm(xs, ws, EPS, backend=backend)
    expected = rms_norm(xs.contiguous(), ws.contiguous(), EPS, backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_transposed_view_keeps_its_layout_and_is_not_copied(backend):
    """Gemma 3 normalizes q and k after ``transpose(1, 2)``: rows are read in memory order, the saved
    input is the input's own storage, and y and dX come back in its layout (as HF's elementwise norm
    gives them, so attention downstream sees the layout it would have seen)."""
    x, w, _ = _problem((2, 5, 3, 16), torch.float32)  # [B, T, n, d] in memory
    xt = x.transpose(1, 2).requires_grad_()  # seen as [B, n, T, d]
    y = rms_norm(xt, w, EPS, backend=backend)
    assert y.shape == xt.shape and y.stride() == xt.stride()
    node = y.grad_fn  # the norm's node, behind the layout ops rms_norm applies outside it
    while not isinstance(node, RMSNormFunction._backward_cls):
        node = node.next_functions[0][0]
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in node.saved_tensors)
    dy = torch.randn_like(x).transpose(1, 2)
    y.backward(dy)
    assert xt.grad.stride() == xt.stride()
    xc = xt.detach().contiguous().requires_grad_()
    yc = rms_norm(xc, w, EPS, backend=backend)
    yc.backward(dy.contiguous())
    torch.testing.assert_close(y, yc, rtol=0, atol=0)
    torch.testing.assert_close(xt.grad, xc.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("need_dx", [False, True])
def test_each_gradient_only_when_asked(backend, need_dx):
    """A trainable norm over an input that needs no gradient (a frozen embedding's output): dW alone,
    equal to what it is when dX is computed too."""
    x, w, dy = _problem((11, 45), torch.float32)
    xi, wi = x.clone().requires_grad_(need_dx), w.clone().requires_grad_()
    rms_norm(xi, wi, EPS, backend=backend).backward(dy)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    reference.rms_norm(x64, w64, EPS).backward(dy.double())
    assert_close(wi.grad, w64.grad, torch.float32, "dW")
    assert (xi.grad is not None) == need_dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_backward_holds_three_fp32_temporaries(dtype):
    """The CPU path's backward, counted op by op: at most g, x̂ and dW's product as ``[rows, h]`` fp32
    temporaries, and x̂ rounded to x's dtype (it held 22 bytes an element at fp16 before it worked in
    place, 14 now)."""
    rows, h = 64, 256
    x, w, dy = _problem((rows, h), dtype)
    x.requires_grad_(), w.requires_grad_()
    extra = backward_extra_bytes(
        lambda: rms_norm(x, w, EPS, backend="torch"), lambda y: y.backward(dy), (x, w, dy)
    )
    b = torch.finfo(dtype).bits // 8
    assert extra <= rows * h * (3 * 4 + b) + 4 * h + 4096, extra


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_gradcheck_float64(style):
    x = torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, EPS, backend="torch", style=style), (x, w))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(2, 3), torch.randn(4), EPS)
    with pytest.raises(ValueError, match="backend"):
        rms_norm(torch.randn(2, 3), torch.randn(3), EPS, backend="cuda")
    with pytest.raises(ValueError, match="style"):
        rms_norm(torch.randn(2, 3), torch.randn(3), EPS, style="olmo")
