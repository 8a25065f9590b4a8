"""Fused LoRA linear (kernels/lora.py) against the pure-torch reference, under Triton's interpreter on CPU.

The oracle is the LoRA linear evaluated in float64 on the same (rounded) inputs, with S' and dS' rounded
where the kernels round them (``reference_grads``): the kernels accumulate in fp32 and round once per
output, so their distance to that result is what TOLERANCES bounds.
Shapes are tiny: every kernel launch costs Python time per program under the interpreter. On a CUDA
machine (bench/gpu.sh) the same tests run on the GPU with the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from utils import assert_close

from fusedtune.kernels import LoRALinear, reference
from fusedtune.kernels import dropout as dropout_mod
from fusedtune.kernels import lora as lora_mod
from fusedtune.kernels._triton import TORCH_TO_TL
from fusedtune.kernels.lora import LoRAConfig, lora_backward, lora_forward, lora_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALIGNED = (64, 64, 128)  # M, K, N: multiples of the interpreter's tiles
ODD = (5, 123, 77)
_TL_TO_TORCH = {v: k for k, v in TORCH_TO_TL.items()}


def make_problem(m, k, n, r, dtype, *, bias=False, batch=None, seed=0):
    """x [(batch,) m, k], W [n, k], A [r, k], B [n, r], bias [n], scaled so outputs and grads are O(1)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, m, k) if batch else (m, k)
    x = torch.randn(shape, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    a = torch.randn(r, k, generator=g) / k**0.5
    b = torch.randn(n, r, generator=g) / r**0.5
    bb = torch.randn(n, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)
    return cast(x), cast(w), cast(a), cast(b), cast(bb)


class _RoundedLowRank(torch.autograd.Function):
    """``u = D(X) Aᵀ -> S' = rnd(c·u)``; backward ``g -> rnd'(c·g)``: where the kernels round S' and dS'."""

    @staticmethod
    def forward(ctx, u, c, s_dtype, ds_dtype):
        ctx.c, ctx.ds_dtype = c, ds_dtype
        return (c * u).to(s_dtype).double()

    @staticmethod
    def backward(ctx, g):
        return (ctx.c * g).to(ctx.ds_dtype).double(), None, None, None


def reference_grads(x, w, a, b, bias, scale, grad_y, mask=None, p=0.0):
    """Output and (dX, dA, dB) in float64 on the given inputs, rounding where the kernels round.

    The kernels store ``S' = s/(1-p) · D(X) Aᵀ`` in x's dtype, and feed ``dS'`` (fp32) to the dA and dX
    GEMMs in their dot dtype (x's dtype on a GPU's tensor cores, fp32 under the interpreter). Over a long
    reduction those roundings alone exceed the 16-bit tolerances (bf16 dA over M=300: ~0.16 absolute),
    so the oracle makes the same two roundings and is exact elsewhere.
    """
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a, b))
    keep = xd if mask is None else xd * mask.to(torch.float64)
    ds_dtype = _TL_TO_TORCH.get(lora_mod._dtypes(x)["DOT_DTYPE"], torch.float64)
    s_prime = _RoundedLowRank.apply(F.linear(keep, ad), scale / (1.0 - p), x.dtype, ds_dtype)
    y = F.linear(xd, w.double(), None if bias is None else bias.double()) + F.linear(s_prime, bd)
    y.backward(grad_y.double())
    return y.detach(), xd.grad, ad.grad, bd.grad


CASES = [
    # (m, k, n), rank, bias, dropout_p, batch (3-D input when set)
    pytest.param(ALIGNED, 8, False, 0.0, None, id="aligned-r8"),
    pytest.param(ALIGNED, 16, True, 0.25, 2, id="aligned-r16-bias-dropout-3d"),
    pytest.param(ALIGNED, 64, True, 0.0, None, id="aligned-r64-bias"),
    pytest.param(ODD, 8, True, 0.1, None, id="odd-r8-bias-dropout"),
    pytest.param(ODD, 16, False, 0.0, 3, id="odd-r16-3d"),
    pytest.param(ODD, 64, False, 0.5, 2, id="odd-r64-dropout-3d"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("mkn", "rank", "has_bias", "p", "batch"), CASES)
def test_lora_linear_matches_reference(mkn, rank, has_bias, p, batch, dtype):
    m, k, n = mkn
    x, w, a, b, bias = make_problem(m, k, n, rank, dtype, bias=has_bias, batch=batch)
    scale, seed = 2.0, 1234
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    y = lora_linear(x, w, a, b, scale, bias=bias, dropout_p=p, dropout_seed=seed)
    grad_y = torch.randn(y.shape).to(DEVICE, dtype)
    y.backward(grad_y)

    mask = None
    if p > 0:
        mask = reference.dropout_keep_mask(seed, x[..., 0].numel(), k, p, DEVICE).view(x.shape)
    ref_y, ref_dx, ref_da, ref_db = reference_grads(x, w, a, b, bias, scale, grad_y, mask, p)
    assert y.dtype == dtype and y.shape == ref_y.shape
    assert_close(y, ref_y, dtype, "Y")
    assert_close(x.grad, ref_dx, dtype, "dX")
    assert_close(a.grad, ref_da, dtype, "dA")
    assert_close(b.grad, ref_db, dtype, "dB")


@pytest.mark.parametrize("rank", [3, 256])
def test_rank_extremes(rank):
    """A rank that is no power of two, and the largest supported (several r-tiles per row)."""
    x, w, a, b, bias = make_problem(9, 40, 24, rank, torch.float32, bias=True)
    for t in (x, a, b):
        t.requires_grad_()
    y = lora_linear(x, w, a, b, 0.5, bias=bias, dropout_p=0.2, dropout_seed=5)
    grad_y = torch.randn(y.shape, device=DEVICE)
    y.backward(grad_y)
    mask = reference.dropout_keep_mask(5, 9, 40, 0.2, DEVICE)
    ref = reference_grads(x, w, a, b, bias, 0.5, grad_y, mask, 0.2)
    for name, got, exp in zip(("Y", "dX", "dA", "dB"), (y, x.grad, a.grad, b.grad), ref):
        assert_close(got, exp, torch.float32, name)


def test_strided_inputs_and_lora_dtype():
    """Non-contiguous x and W, and A/B kept in fp32 under fp16 activations (LoRALinear's lora_dtype)."""
    x_big, w_big, a, b, _ = make_problem(12, 2 * 48, 2 * 20, 8, torch.float16)
    x = x_big[:, ::2]  # column stride 2
    w = w_big[::2, :48].t().contiguous().t()  # column-major
    a, b = a[:, :48].float().contiguous(), b[:20].float()
    assert not x.is_contiguous() and not w.is_contiguous()
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    y = lora_linear(x, w, a, b, 1.5)
    grad_y = torch.randn(y.shape, device=DEVICE).half()
    y.backward(grad_y)
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and x.grad.dtype == torch.float16
    # The torch path casts A, B to the activation dtype first; so do the kernels' tiles.
    ref = reference_grads(x, w, a.half(), b.half(), None, 1.5, grad_y)
    for name, got, exp in zip(("Y", "dX", "dA", "dB"), (y, x.grad, a.grad, b.grad), ref):
        assert_close(got, exp, torch.float16, name)


@pytest.mark.skipif(DEVICE == "cuda", reason="float64 runs only under the interpreter (fp64 tl.dot)")
def test_gradcheck_float64():
    """The interpreter runs the kernels in fp64 (fp64 tl.dot), so autograd's numerical check applies."""
    x, w, a, b, bias = make_problem(3, 7, 5, 2, torch.float64, bias=True, batch=2)
    for t in (x, a, b):
        t.requires_grad_()
    fn = lambda x, a, b: lora_linear(x, w, a, b, 1.7, bias=bias, dropout_p=0.3, dropout_seed=11)
    assert torch.autograd.gradcheck(fn, (x, a, b), eps=1e-6, atol=1e-7, rtol=1e-5)


class _LaunchCounter:
    """Stands in for a kernel (jitted or autotuned): counts launches and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_needs_input_grad_skips_dx(monkeypatch):
    """The first layer's input needs no gradient: no dX kernel runs, dA and dB are still right."""
    da_kernel = _LaunchCounter(lora_mod._lora_bwd_da_kernel)
    monkeypatch.setattr(lora_mod, "_lora_bwd_da_kernel", da_kernel)
    dx_kernel = None
    gemm_launcher = lora_mod._gemm_launcher

    def counting_launcher(name, macs):
        nonlocal dx_kernel
        kernel, meta = gemm_launcher(name, macs)
        if name == "_lora_bwd_dx_kernel":
            dx_kernel = dx_kernel or _LaunchCounter(kernel)
            return dx_kernel, meta
        return kernel, meta

    monkeypatch.setattr(lora_mod, "_gemm_launcher", counting_launcher)
    x, w, a, b, _ = make_problem(*ODD, 8, torch.float32)
    a.requires_grad_()
    b.requires_grad_()
    y = lora_linear(x, w, a, b, 2.0)
    grad_y = torch.randn(y.shape, device=DEVICE)
    y.backward(grad_y)
    assert x.grad is None
    assert dx_kernel is None and da_kernel.launches == 1
    _, _, ref_da, ref_db = reference_grads(x, w, a, b, None, 2.0, grad_y)
    assert_close(a.grad, ref_da, torch.float32, "dA")
    assert_close(b.grad, ref_db, torch.float32, "dB")

    # And the other way: frozen A, trainable input: dX and dB only.
    x.requires_grad_()
    a.requires_grad_(False)
    a.grad = None
    lora_linear(x, w, a, b, 2.0).backward(grad_y)
    assert a.grad is None and x.grad is not None
    assert dx_kernel.launches == 1 and da_kernel.launches == 1


def test_saves_nothing_of_size_m_by_n():
    """The autograd node keeps X, W, A, B and S' [M, r]; no [M, N] tensor (and no X when A is frozen)."""
    m, k, n, r = 6, 20, 48, 8
    x, w, a, b, bias = make_problem(m, k, n, r, torch.float32, bias=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    for a_trainable in (True, False):
        saved.clear()
        a.requires_grad_(a_trainable)
        b.requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lora_linear(x, w, a, b, 1.0, bias=bias)
        expected = {(n, k), (r, k), (n, r), (m, r)} | ({(m, k)} if a_trainable else set())
        assert set(saved) == expected, saved


def test_dropout_mask_is_seeded():
    """Same seed, same output; another seed, another mask; the kept fraction is about 1 - p."""
    x, w, a, b, _ = make_problem(8, 32, 16, 8, torch.float32)
    y1 = lora_linear(x, w, a, b, 4.0, dropout_p=0.5, dropout_seed=1)
    y2 = lora_linear(x, w, a, b, 4.0, dropout_p=0.5, dropout_seed=1)
    y3 = lora_linear(x, w, a, b, 4.0, dropout_p=0.5, dropout_seed=2)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)
    keep = reference.dropout_keep_mask(3, 256, 256, 0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    assert reference.dropout_keep_mask(3, 4, 4, 0.0).all()


def test_launchers_validate():
    x, w, a, b, _ = make_problem(4, 16, 8, 4, torch.float32)
    cfg = LoRAConfig(scale=1.0)
    with pytest.raises(ValueError, match="in_features"):
        lora_forward(x[:, :8], w, a, b, None, cfg)
    with pytest.raises(ValueError, match="lora_b"):
        lora_forward(x, w, a, b.t(), None, cfg)
    with pytest.raises(TypeError, match="weight dtype"):
        lora_forward(x, w.half(), a, b, None, cfg)
    with pytest.raises(ValueError, match="rank"):
        lora_forward(x, w, torch.zeros(257, 16, device=DEVICE), torch.zeros(8, 257, device=DEVICE), None, cfg)
    with pytest.raises(ValueError, match="dA needs"):
        lora_backward(torch.zeros(4, 8, device=DEVICE), None, w, a, b, None, cfg)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, w, a, b, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, w.requires_grad_(), a, b, 1.0)


def test_empty_batch():
    x, w, a, b, _ = make_problem(1, 16, 8, 4, torch.float32)
    x = x[:0].requires_grad_()
    a.requires_grad_()
    y = lora_linear(x, w, a, b, 1.0)
    y.sum().backward()
    assert y.shape == (0, 8) and x.grad.shape == (0, 16)
    assert torch.equal(a.grad, torch.zeros_like(a))


# ---------------------------------------------------------------------------------------------------
# LoRALinear
# ---------------------------------------------------------------------------------------------------


def _trained_module(backend, dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    module = LoRALinear(40, 24, rank=8, alpha=16, dropout=dropout, bias=bias, backend=backend, device=DEVICE)
    nn.init.normal_(module.weight, std=0.1)
    if bias:
        nn.init.normal_(module.bias)
    nn.init.normal_(module.lora_B, std=0.3)  # B = 0 at init would hide the adapter
    return module


def test_module_triton_matches_torch_backend():
    torch_mod = _trained_module("torch")
    triton_mod = _trained_module("triton")
    x = torch.randn(2, 5, 40, device=DEVICE)
    outs = []
    for module in (torch_mod, triton_mod):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(torch.ones_like(y))
        outs.append((y, xi.grad, module.lora_A.grad, module.lora_B.grad))
        assert module.weight.grad is None and module.bias.grad is None
    for name, got, exp in zip(("Y", "dX", "dA", "dB"), outs[1], outs[0]):
        assert_close(got, exp, torch.float32, name)


def test_module_dropout_only_in_training():
    module = _trained_module("triton", dropout=0.5)
    x = torch.randn(6, 40, device=DEVICE)
    module.eval()
    y_eval = module(x)
    assert_close(y_eval, _trained_module("torch", dropout=0.5).eval()(x), torch.float32, "eval")
    module.train()
    assert not torch.allclose(module(x), y_eval)


def test_dropout_seed_survives_activation_checkpointing():
    """The seed comes from torch's CPU generator, which checkpointing restores: the recomputed forward
    draws the same mask, so gradients equal the un-checkpointed run's."""
    from torch.utils.checkpoint import checkpoint

    module = _trained_module("triton", dropout=0.4).train()
    x = torch.randn(2, 3, 40, device=DEVICE)
    grads = []
    for use_checkpoint in (False, True):
        module.zero_grad()
        torch.manual_seed(7)
        y = checkpoint(module, x, use_reentrant=False) if use_checkpoint else module(x)
        y.backward(torch.ones_like(y))
        grads.append((y.detach(), module.lora_A.grad.clone(), module.lora_B.grad.clone()))
    for name, got, exp in zip(("Y", "dA", "dB"), grads[1], grads[0]):
        assert torch.equal(got, exp), name


def test_from_linear_and_merge():
    torch.manual_seed(0)
    linear = nn.Linear(40, 24, device=DEVICE)
    module = LoRALinear.from_linear(linear, rank=8, alpha=16, backend="triton", lora_dtype=torch.float32)
    assert module.weight.data_ptr() == linear.weight.data_ptr() and not module.weight.requires_grad
    assert module.bias.data_ptr() == linear.bias.data_ptr() and not module.bias.requires_grad
    assert module.lora_A.requires_grad and module.lora_B.requires_grad
    x = torch.randn(7, 40, device=DEVICE)
    with torch.no_grad():
        assert_close(module(x), linear(x), torch.float32, "B = 0 at init")
        module.lora_B.normal_(std=0.3)
        merged = module.merge()
        assert_close(merged(x), module(x), torch.float32, "merged")
        assert not torch.allclose(merged(x), linear(x))


def test_module_matches_peft_lora_layer():
    """Same base Linear, same A and B: our module's output equals PEFT's ``lora.Linear``."""
    peft_lora = pytest.importorskip("peft.tuners.lora")
    from peft import LoraConfig

    torch.manual_seed(0)
    base = nn.Linear(40, 24, device=DEVICE)
    rank, alpha = 8, 16
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0)
    peft_layer = peft_lora.Linear(base, "default", config=cfg, r=rank, lora_alpha=alpha)
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_(std=0.3)
    ours = LoRALinear.from_linear(base, rank=rank, alpha=alpha, backend="triton")
    with torch.no_grad():
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    assert ours.scaling == peft_layer.scaling["default"]
    x = torch.randn(3, 4, 40, device=DEVICE)
    with torch.no_grad():
        assert_close(ours(x), peft_layer(x), torch.float32, "vs PEFT")


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bf16_on_gpu(dropout):
    """bf16 needs real tensor cores: the interpreter's bf16 arithmetic is not IEEE."""
    dtype, dev = torch.bfloat16, "cuda"
    x, w, a, b, bias = make_problem(300, 256, 384, 16, dtype, bias=True)
    for t in (x, a, b):
        t.requires_grad_()
    y = lora_linear(x, w, a, b, 2.0, bias=bias, dropout_p=dropout, dropout_seed=3)
    grad_y = torch.randn(y.shape, device=dev).to(dtype)
    y.backward(grad_y)
    mask = reference.dropout_keep_mask(3, 300, 256, dropout, device=dev) if dropout else None
    ref = reference_grads(x, w, a, b, bias, 2.0, grad_y, mask, dropout)
    for name, got, exp in zip(("Y", "dX", "dA", "dB"), (y, x.grad, a.grad, b.grad), ref):
        assert_close(got, exp, dtype, name)


@pytest.mark.gpu
def test_fp32_and_fp16_on_gpu():
    """The compiled kernels (autotuned GEMMs, split reductions with atomics) on a mid-size problem."""
    for dtype in (torch.float32, torch.float16):
        x, w, a, b, bias = make_problem(1000, 520, 700, 64, dtype, bias=True)
        for t in (x, a, b):
            t.requires_grad_()
        y = lora_linear(x, w, a, b, 0.5, bias=bias)
        grad_y = torch.randn(y.shape, device="cuda").to(dtype)
        y.backward(grad_y)
        ref = reference_grads(x, w, a, b, bias, 0.5, grad_y)
        for name, got, exp in zip(("Y", "dX", "dA", "dB"), (y, x.grad, a.grad, b.grad), ref):
            assert_close(got, exp, dtype, name)


# ---------------------------------------------------------------------------------------------------
# The torch path (LoRALinear's backend "torch": what the trainer runs on CPU)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch", [None, 2])
def test_torch_path_matches_reference(dropout, bias, batch):
    """``lora_linear_torch`` (in-place accumulation, own backward) against autograd through the reference."""
    x, w, a, b, bb = make_problem(5, 23, 17, 4, torch.float64, bias=bias, batch=batch)
    grad_y = torch.randn(*x.shape[:-1], 17, dtype=torch.float64, device=DEVICE)
    results = []
    for path in ("torch", "reference"):
        xi, ai, bi = (t.clone().requires_grad_() for t in (x, a, b))
        torch.manual_seed(11)
        if path == "torch":
            y = lora_mod.lora_linear_torch(xi, w, ai, bi, 2.0, bb, dropout)
        else:
            mask = None
            if dropout:
                mask = torch.empty(x.shape, dtype=torch.bool, device=DEVICE).bernoulli_(1.0 - dropout)
            y = reference.lora_linear(xi, w, ai, bi, 2.0, bb, mask, dropout)
        y.backward(grad_y)
        results.append((y, xi.grad, ai.grad, bi.grad))
    for name, got, exp in zip(("Y", "dX", "dA", "dB"), *results, strict=True):
        assert_close(got, exp, torch.float64, name)


def test_torch_path_gradcheck():
    x, w, a, b, bb = make_problem(3, 6, 5, 2, torch.float64, bias=True)
    inputs = tuple(t.requires_grad_() for t in (x, a, b))
    assert torch.autograd.gradcheck(lambda x, a, b: lora_mod.lora_linear_torch(x, w, a, b, 1.5, bb), inputs)


@pytest.mark.parametrize("k", [1, 8, 23, 64])
def test_keep_mask_packs_to_bits_and_back(k):
    keep = torch.rand(7, k, generator=torch.Generator().manual_seed(k)) >= 0.4
    bits = dropout_mod.pack_keep(keep)
    assert bits.dtype == torch.uint8 and tuple(bits.shape) == (7, (k + 7) // 8)
    assert torch.equal(dropout_mod.unpack_keep(bits, k), keep)


@pytest.mark.parametrize("path", ["lora", "qlora"])
def test_torch_paths_save_the_dropout_mask_as_bits(path):
    """With dropout the torch paths save ⌈K/8⌉ bytes of mask per row, no bool [M, K] mask, no dropped X."""
    from fusedtune.kernels import qmatmul, quant

    m, k, n, r = 6, 40, 24, 4
    x, w, a, b, _ = make_problem(m, k, n, r, torch.float32)
    a.requires_grad_()
    b.requires_grad_()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if path == "lora":
            lora_mod.lora_linear_torch(x, w, a, b, 2.0, None, 0.3)
        else:
            pw = quant.quantize(w, "nf4", 32, False, backend="torch")
            qmatmul.qlora_linear(x, pw, a, b, 2.0, None, 0.3, backend="torch")
    assert ((m, k // 8), torch.uint8) in saved
    assert not any(shape == (m, k) and dtype != torch.float32 for shape, dtype in saved), saved
    assert sum(1 for shape, _ in saved if shape == (m, k)) == 1, saved  # X itself (for dA), once


@pytest.mark.parametrize("path", ["lora", "qlora"])
def test_torch_paths_take_an_empty_batch_with_dropout(path):
    from fusedtune.kernels import qmatmul, quant

    _, w, a, b, _ = make_problem(1, 40, 24, 4, torch.float32)
    x = torch.zeros(0, 40, device=DEVICE, requires_grad=True)
    a.requires_grad_()
    if path == "lora":
        y = lora_mod.lora_linear_torch(x, w, a, b, 2.0, None, 0.3)
    else:
        y = qmatmul.qlora_linear(
            x, quant.quantize(w, "nf4", 32, False, backend="torch"), a, b, 2.0, None, 0.3, "torch"
        )
    y.sum().backward()
    assert tuple(y.shape) == (0, 24) and tuple(x.grad.shape) == (0, 40) and float(a.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_split_reductions_match_single_program(monkeypatch, dtype, dropout):
    """The split-reduction paths a GPU takes when a tile grid alone would not fill it (S' over K, dS'/dB
    over N, dA over M, summed with fp32 atomics) against one program per tile, forced here under the
    interpreter (where ``_split`` otherwise returns 1)."""
    x, w, a, b, bias = make_problem(70, 150, 90, 8, dtype, bias=True)
    grad_y = torch.randn(70, 90, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    results = []
    for split in (1, 3):
        monkeypatch.setattr(lora_mod, "_split", lambda tiles, red, dev, split=split: max(1, min(split, red)))
        xi, ai, bi = (t.clone().requires_grad_() for t in (x, a, b))
        y = lora_linear(xi, w, ai, bi, 2.0, bias=bias, dropout_p=dropout, dropout_seed=7)
        y.backward(grad_y)
        results.append((y, xi.grad, ai.grad, bi.grad))
    for name, got, exp in zip(("Y", "dX", "dA", "dB"), *results, strict=True):
        assert_close(got, exp, dtype, f"{name} split 3 vs 1")
    assert not torch.equal(results[0][2], torch.zeros_like(results[0][2]))


# -- Siblings: projections of one input as one node (torch path) ------------------------------------


def _siblings(dtype, n_out=(12, 5, 5), k=9, bias=(False, True, False), rank=(4, 4, 3)):
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(n, k, generator=g).to(dtype) for n in n_out]
    As = [(torch.randn(r, k, generator=g) * 0.3).to(dtype).requires_grad_() for r in rank]
    Bs = [(torch.randn(n, r, generator=g) * 0.3).to(dtype).requires_grad_() for n, r in zip(n_out, rank)]
    bs = [torch.randn(n, generator=g).to(dtype) if b else None for n, b in zip(n_out, bias)]
    return ws, As, Bs, bs, [2.0, 0.5, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_siblings_match_single_layers(dtype):
    ws, As, Bs, bs, scales = _siblings(dtype)
    x = torch.randn(2, 3, 9).to(dtype).requires_grad_()
    dys = [torch.randn(2, 3, w.shape[0]).to(dtype) for w in ws]
    ys = lora_mod.lora_siblings_torch(x, ws, As, Bs, scales, bs)
    torch.autograd.backward(ys, dys)
    got = [x.grad, *[a.grad for a in As], *[b.grad for b in Bs]]
    x64 = x.detach().double().requires_grad_()
    A64 = [a.detach().double().requires_grad_() for a in As]
    B64 = [b.detach().double().requires_grad_() for b in Bs]
    refs = [
        reference.lora_linear(x64, w.double(), a, b, s, None if bias is None else bias.double())
        for w, a, b, s, bias in zip(ws, A64, B64, scales, bs)
    ]
    torch.autograd.backward(refs, [d.double() for d in dys])
    for i, (y, ref) in enumerate(zip(ys, refs)):
        assert y.dtype == dtype
        assert_close(y, ref, dtype, f"Y{i}")
    want = [x64.grad, *[a.grad for a in A64], *[b.grad for b in B64]]
    for i, (g_, w_) in enumerate(zip(got, want)):
        assert_close(g_, w_, dtype, f"grad {i}")
    grads = [a.grad for a in As]  # each A's gradient in its own storage, not a view of a shared one
    assert len({g_.untyped_storage().data_ptr() for g_ in grads}) == len(grads)


def test_siblings_gradcheck_float64_and_frozen_parts():
    ws, As, Bs, bs, scales = _siblings(torch.float64, n_out=(4, 3), bias=(True, False), rank=(2, 3))
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, a0, a1, b0, b1: lora_mod.lora_siblings_torch(x, ws, [a0, a1], [b0, b1], scales[:2], bs),
        (x, *As, *Bs),
    )
    x0 = torch.randn(3, 9, dtype=torch.float64)  # a first layer's input: no dX
    ys = lora_mod.lora_siblings_torch(x0, ws, As, Bs, scales[:2], bs)
    sum(y.sum() for y in ys).backward()
    assert all(a.grad is not None for a in As)


def test_sibling_modules_compute_once_and_match_their_own_forward():
    from fusedtune.kernels.modules import LoRASiblings

    torch.manual_seed(0)
    mods = [LoRALinear(9, n, 4, 8.0) for n in (12, 5, 5)]
    for m in mods:
        nn.init.normal_(m.lora_B, std=0.3)
        m.weight.data.normal_()
    x = torch.randn(2, 3, 9, requires_grad=True)
    alone = [m(x) for m in mods]
    group = LoRASiblings(mods)
    calls = []
    real = lora_mod.lora_siblings_torch
    lora_mod.lora_siblings_torch = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        ys = [mods[1](x), mods[0](x), mods[2](x)]  # any member may come first
        assert len(calls) == 1 and group._pending == {}
        for y, want in zip([ys[1], ys[0], ys[2]], alone):
            torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
        mods[0](x)
        x2 = x.detach().clone()
        mods[1](x2)  # another tensor: computed afresh, not a stale output
        assert len(calls) == 3
        with torch.no_grad():
            assert not mods[2](x2).requires_grad and len(calls) == 4  # grad mode is part of the key
    finally:
        lora_mod.lora_siblings_torch = real
    for m in mods:
        m.dropout = 0.1
    mods[0].train()
    torch.testing.assert_close(mods[0].eval()(x), alone[0])  # eval: dropout off, grouped again


def test_sibling_cache_never_serves_a_stale_output():
    from fusedtune.kernels.modules import LoRASiblings

    torch.manual_seed(0)
    mods = [LoRALinear(9, n, 4, 8.0) for n in (6, 5)]
    for m in mods:
        nn.init.normal_(m.lora_B, std=0.3)
    LoRASiblings(mods)
    x = torch.randn(3, 9)
    changes = {  # each makes member 1's cached output stale
        "B in place": lambda m: m.lora_B.add_(1.0),
        "frozen weight in place": lambda m: m.weight.mul_(1.5),
        "weight replaced": lambda m: setattr(m, "weight", nn.Parameter(m.weight * 2, requires_grad=False)),
        "scaling": lambda m: setattr(m, "scaling", m.scaling * 3),
    }
    for what, change in changes.items():
        with torch.no_grad():
            mods[0](x)  # member 1's output now waits in the cache
            change(mods[1])  # ... and is stale
            got = mods[1](x)
        m1 = mods[1]
        want = lora_mod.lora_linear_torch(x, m1.weight, m1.lora_A, m1.lora_B, m1.scaling)
        torch.testing.assert_close(got, want, msg=what)
    with torch.inference_mode():  # no version counters: each member alone
        xi = torch.randn(3, 9)
        ys = [m(xi) for m in mods]
    with torch.no_grad():
        for m, y in zip(mods, ys):
            want = lora_mod.lora_linear_torch(xi, m.weight, m.lora_A, m.lora_B, m.scaling)
            torch.testing.assert_close(y, want)
    stranger = LoRALinear(9, 6, 4, 8.0)  # a copy that shares the group (a DataParallel replica)
    stranger.siblings = mods[0].siblings
    torch.testing.assert_close(
        stranger(x), lora_mod.lora_linear_torch(x, stranger.weight, stranger.lora_A, stranger.lora_B, 2.0)
    )


def test_strided_and_expanded_bias():
    """A bias that is a view (every other element, a column, one value expanded): the kernel reads a
    dense copy (it read bias_ptr + n, so a stride-0 view ran past its one element)."""
    x, w, a, b, _ = make_problem(5, 24, 10, 4, torch.float32)
    for bias in (
        torch.randn(20, device=DEVICE)[::2],
        torch.randn(10, 3, device=DEVICE)[:, 1],
        torch.tensor([3.0], device=DEVICE).expand(10),
    ):
        assert_close(
            lora_linear(x, w, a, b, 0.5, bias=bias),
            lora_mod.lora_linear_torch(x, w, a, b, 0.5, bias=bias),
            torch.float32,
            name=f"bias stride {bias.stride()}",
        )


def test_bias_in_another_dtype_than_x():
    """An fp32 bias beside fp16 x and W: every path takes it (the torch ones used to raise in addmm)."""
    from fusedtune.kernels import quant
    from fusedtune.kernels.qmatmul import qlora_linear

    x, w, a, b, _ = make_problem(6, 64, 24, 4, torch.float16)
    bias = torch.randn(24, device=DEVICE)
    expected = (x.float() @ w.float().t() + bias + 2.0 * (x.float() @ a.float().t()) @ b.float().t()).half()
    outs = {
        "triton": lora_linear(x, w, a.float(), b.float(), 2.0, bias=bias),
        "torch": lora_mod.lora_linear_torch(x, w, a.float(), b.float(), 2.0, bias=bias),
        "siblings": lora_mod.lora_siblings_torch(x, [w], [a.float()], [b.float()], [2.0], [bias])[0],
    }
    pw = quant.quantize(w, "int8")
    deq = quant.dequantize(pw, torch.float32)
    q_expected = (x.float() @ deq.t() + bias + 2.0 * (x.float() @ a.float().t()) @ b.float().t()).half()
    for backend in ("triton", "torch"):
        y = qlora_linear(x, pw, a.float(), b.float(), 2.0, bias=bias, backend=backend, path="dequant")
        assert_close(y, q_expected, torch.float16, name=f"qlora {backend}")
    for name, y in outs.items():
        assert y.dtype == torch.float16
        assert_close(y, expected, torch.float16, name=name)


def test_a_constructed_layer_starts_as_nn_linear_does():
    """LoRALinear(in, out, ...) initialises its frozen weight and bias as nn.Linear would; they were
    torch.empty, whatever memory held (NaN at times: a test comparing two outputs failed on a fresh run)."""
    torch.manual_seed(0)
    m = LoRALinear(96, 40, 4, 8.0, bias=True)
    bound = 1.0 / 96**0.5
    for t in (m.weight, m.bias):
        assert torch.isfinite(t).all() and t.abs().max() <= bound and t.abs().max() > bound / 2
    assert torch.equal(m(torch.zeros(2, 96)), m.bias.expand(2, -1))  # B = 0: the base layer alone


@pytest.mark.parametrize("path", ["triton", "torch", "siblings"])
@pytest.mark.parametrize("shape", [(2, 3), (6,)], ids=["3d", "2d"])
def test_output_may_be_modified_in_place(path, shape):
    """Y is not a view made inside the autograd node: a model may add into a projection's output in
    place (Llama 4's MoE does ``out.add_(routed)``; autograd forbids that on such a view), and the
    gradients are the out-of-place ones."""
    torch.manual_seed(0)
    K, N, r = 16, 8, 4
    x = torch.randn(*shape, K, device=DEVICE)
    w = torch.randn(N, K, device=DEVICE)
    a, b = torch.randn(r, K, device=DEVICE), torch.randn(N, r, device=DEVICE)

    def run(in_place):
        xg, ag, bg = (t.clone().requires_grad_() for t in (x, a, b))
        if path == "triton":
            y = lora_linear(xg, w, ag, bg, 2.0)
        elif path == "torch":
            y = lora_mod.lora_linear_torch(xg, w, ag, bg, 2.0)
        else:
            y = lora_mod.lora_siblings_torch(xg, [w, w], [ag, ag], [bg, bg], [2.0, 2.0])[1]
        y = y.mul_(3.0) if in_place else y * 3.0
        y.square().sum().backward()
        return y.detach(), xg.grad, ag.grad, bg.grad

    for got, expected in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
