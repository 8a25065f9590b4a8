"""Fused linear cross-entropy (kernels/cross_entropy.py) against autograd through F.cross_entropy.

The oracle is ``reference.linear_cross_entropy`` evaluated in float64 on the same (rounded) inputs. The
Triton kernel runs under the interpreter on CPU (fp32/fp16; bf16 on a GPU only, see conftest).
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_close, backward_extra_bytes

from fusedtune.kernels import reference
from fusedtune.kernels.cross_entropy import chunk_rows, cross_entropy_grad, linear_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
BACKENDS = ["triton", "torch"]


def _problem(n, d, v, dtype, *, bias=False, ignore=(), seed=0, device=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * (2.0 / d**0.5)
    b = torch.randn(v, generator=g) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        t[i] = -100
    device = device or DEVICE
    cast = lambda x: None if x is None else x.to(device, dtype).requires_grad_()
    return cast(h), cast(w), cast(b), t.to(device)


def _oracle(h, w, b, t, grad_scale):
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in (h, w, b)]
    loss = reference.linear_cross_entropy(leaves[0], leaves[1], t, leaves[2])
    (loss * grad_scale).backward()
    return loss.detach(), [None if x is None else x.grad for x in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n", "d", "v", "bias", "chunk"),
    [
        (7, 16, 50, False, None),  # one chunk
        (37, 24, 1001, True, 10),  # several chunks, vocab not a multiple of the kernel's block
        (64, 32, 2048, False, 16),  # four equal chunks
    ],
)
def test_linear_cross_entropy_matches_autograd(backend, dtype, n, d, v, bias, chunk):
    h, w, b, t = _problem(n, d, v, dtype, bias=bias, ignore=(1, n - 1))
    chunk_bytes = (chunk or n) * v * h.element_size()
    loss = linear_cross_entropy(h, w, t, b, backend=backend, chunk_bytes=chunk_bytes)
    (loss * 0.37).backward()
    ref_loss, ref_grads = _oracle(h, w, b, t, 0.37)
    assert loss.dtype == torch.float32
    # the loss is a sum over n rows of O(log v) terms: relative tolerance on it
    torch.testing.assert_close(
        loss.double().cpu(), ref_loss.cpu(), rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=0
    )
    for name, x, ref in zip(("dH", "dW", "db"), (h, w, b), ref_grads, strict=True):
        if x is not None:
            assert_close(x.grad, ref, dtype, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_gets_no_gradient(backend):
    h, w, _, t = _problem(9, 8, 40, torch.float32)
    w.requires_grad_(False)
    linear_cross_entropy(h, w, t, backend=backend).backward()
    assert w.grad is None and h.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_grad_rows(backend):
    """Per-row loss and the in-place softmax-minus-onehot, with ignored rows at zero, against torch."""
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(6, 300, generator=g) * 4).to(DEVICE)
    t = torch.tensor([0, 299, 5, -100, 17, 150], device=DEVICE)
    ref_loss = torch.nn.functional.cross_entropy(z.double(), t, reduction="none")
    ref_grad = torch.softmax(z.double(), -1) - torch.nn.functional.one_hot(t.clamp(min=0), 300)
    ref_grad[t == -100] = 0
    work = z.clone()
    loss = cross_entropy_grad(work, t, backend=backend)
    assert_close(loss, ref_loss, torch.float32, name="loss")
    assert_close(work, ref_grad, torch.float32, name="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_target(backend):
    """A target that is a column of a wider tensor (stride 2) is read by its stride."""
    h, w, _, t = _problem(9, 16, 40, torch.float32, ignore=(4,))
    pairs = torch.stack([t, torch.zeros_like(t)], dim=1)  # [N, 2]: pairs[:, 0] has stride 2
    ref_loss, ref_grads = _oracle(h, w, None, t, 1.0)
    loss = linear_cross_entropy(h, w, pairs[:, 0], backend=backend, chunk_bytes=3 * 40 * 4)
    loss.backward()
    assert_close(loss, ref_loss, torch.float32, name="loss")
    assert_close(h.grad, ref_grads[0], torch.float32, name="dh")
    assert_close(w.grad, ref_grads[1], torch.float32, name="dw")


def test_target_out_of_range_is_not_a_finite_loss():
    """Triton: nan loss and gradient in that row only (no device sync to check); torch raises."""
    z = torch.randn(3, 40, device=DEVICE)
    for bad in (40, -5):
        t = torch.tensor([1, bad, 7], device=DEVICE)
        work = z.clone()
        loss = cross_entropy_grad(work, t, backend="triton")
        assert torch.isnan(loss[1]) and torch.isnan(work[1]).all()
        assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(work[[0, 2]]).all()
        with pytest.raises((RuntimeError, IndexError)):
            cross_entropy_grad(z.clone(), t, backend="torch")


def test_gradcheck_float64():
    h, w, b, t = _problem(4, 3, 11, torch.float64, bias=True, ignore=(2,))
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_cross_entropy(h, w, t, b, backend="torch", chunk_bytes=2 * 11 * 8),
        (h, w, b),
    )


def test_chunk_rows_bounds_the_logits():
    assert chunk_rows(240, 49152, 4, 32 << 20) == 120  # 170 rows fit; two equal chunks instead of 170 + 70
    assert chunk_rows(10, 1000, 2, 1) == 1  # never below one row
    assert chunk_rows(5, 10, 4) == 5


def test_bad_input_is_rejected():
    h, w, _, t = _problem(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(h, w[:, :4], t)
    with pytest.raises(ValueError, match="target"):
        linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(h, w, t, backend="cuda")


def test_peak_memory_is_one_chunk_of_logits():
    """Memory accounting, counted op by op: the fused loss never holds more than one chunk of logits
    (plus H-sized buffers), where autograd through F.cross_entropy holds several [N, V] tensors at once."""
    from fusedtune.trainer.estimate import LiveTensorTracker

    n, d, v, rows = 64, 32, 4096, 16
    # the tracker counts CPU storages (estimate --measure's CPU path); the accounting is the same anywhere
    h, w, _, t = _problem(n, d, v, torch.float32, device="cpu")
    w.requires_grad_(False)
    chunk = rows * v * 4
    peaks = {}
    for name in ("fused", "plain"):
        h.grad = None
        tracker = LiveTensorTracker()
        for x in (h, w, t):
            tracker.add(x)
        base = tracker.current
        with tracker._mode:
            if name == "fused":
                loss = linear_cross_entropy(h, w, t, backend="torch", chunk_bytes=chunk)
            else:
                loss = reference.linear_cross_entropy(h, w, t)
            loss.backward()
        peaks[name] = tracker.peak - base
    assert peaks["fused"] <= chunk + 3 * n * d * 4 + 4096, peaks
    assert peaks["plain"] >= 2 * n * v * 4, peaks  # the test can fail: the plain path is far above


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_scales_in_place(dtype):
    """Backward holds no second copy of the saved gradients (a trainable head's fp32 dW is V·d·4 bytes):
    fp32 ones are scaled in place; a 16-bit dH goes through one fp32 temporary and a 16-bit dW is made
    beside its fp32 sum. Counted op by op; the gradients still equal the oracle's."""
    n, d, v = 24, 32, 3000
    h, w, _, t = _problem(n, d, v, dtype, device="cpu")
    extra = backward_extra_bytes(
        lambda: linear_cross_entropy(h, w, t, backend="torch"), lambda loss: (loss / 7).backward(), (h, w, t)
    )
    b = torch.finfo(dtype).bits // 8
    allowed = 0 if b == 4 else n * d * 4 + v * d * b  # the dH temporary and the 16-bit dW
    assert extra <= allowed + 1024, (extra, allowed)  # + scalars
    _, (gh, gw, _) = _oracle(h, w, None, t, 1 / 7)
    assert_close(h.grad, gh, dtype, name="dH")
    assert_close(w.grad, gw, dtype, name="dW")


def test_second_backward_through_one_forward_is_refused():
    h, w, _, t = _problem(4, 8, 30, torch.float32)
    loss = linear_cross_entropy(h, w, t, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through one forward"):
        loss.backward()


def test_no_grad_computes_the_loss_alone():
    """Evaluation with a trainable head: no dW buffer, no gradient work, the same loss."""
    from fusedtune.trainer.estimate import LiveTensorTracker

    h, w, _, t = _problem(8, 16, 3000, torch.float32)
    with torch.no_grad():
        tracker = LiveTensorTracker()
        for x in (h, w, t):
            tracker.add(x)
        base = tracker.current
        with tracker._mode:
            loss = linear_cross_entropy(h, w, t, backend="torch")
    assert tracker.peak - base < w.nbytes  # an fp32 [V, d] gradient buffer would be that large
    torch.testing.assert_close(loss, reference.linear_cross_entropy(h, w, t).detach())
    assert w.grad is None and h.grad is None


def test_no_second_derivative():
    """The gradient was computed in forward: with create_graph it comes back without a graph, and
    differentiating it again is an error, not a silent zero."""
    h, w, _, t = _problem(4, 8, 30, torch.float32)
    (gh,) = torch.autograd.grad(linear_cross_entropy(h, w, t, backend="torch"), h, create_graph=True)
    assert not gh.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        gh.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_row_of_minus_inf_has_zero_gradient(backend):
    z = torch.randn(3, 50, device=DEVICE)
    z[1] = float("-inf")
    t = torch.tensor([4, -100, 7], device=DEVICE)
    loss = cross_entropy_grad(z, t, backend=backend)
    assert loss[1] == 0 and torch.isfinite(loss).all()
    assert torch.equal(z[1], torch.zeros_like(z[1])) and torch.isfinite(z).all()
