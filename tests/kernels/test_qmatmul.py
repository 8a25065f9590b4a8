"""Fused matmul over quantized weights (forward, dX, LoRA fold) and QuantLoRALinear.

The oracle is dequantize-then-matmul in fp32 (``reference.lora_linear`` over ``deq(W)``), within the
fp32 tolerance; quantization error itself is reported as SQNR against the unquantized matmul. Tensors
live on DEVICE: on a CUDA machine the kernels run compiled (bench/gpu.sh), where a CPU tensor could not
reach them. Only the bitsandbytes interop tests need bitsandbytes (the GPU image may lack it).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from utils import assert_close, sqnr_db

from fusedtune.kernels import QuantLoRALinear, qmatmul, quant, reference

try:
    import bitsandbytes as bnb
except Exception:  # absent, or present without a usable native library
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_device(module: nn.Module) -> nn.Module:
    """``module`` where the kernels run: a copy on the GPU when there is one (bnb's layers stay on CPU)."""
    return module if DEVICE == "cpu" else copy.deepcopy(module).to(DEVICE)


# SQNR floors (dB) of ``X deq(W)ᵀ`` against ``X Wᵀ`` for Gaussian W, blocksize 64. Measured on CPU
# (seeds 0-2, W 96x128): NF4 20.5-20.8, FP4 18.0-18.3, int8 43.5-43.7; the floors leave ~1 dB.
SQNR_FLOOR_DB = {"nf4": 19.5, "fp4": 17.0, "int8": 42.0}

FORMATS = [("nf4", True), ("fp4", False), ("int8", False)]
FORMAT_IDS = ["nf4-dq", "fp4", "int8"]


def lora_tensors(N, K, rank, dtype=torch.float32):
    a = (torch.randn(rank, K) * 0.1).to(DEVICE, dtype).requires_grad_()
    b = (torch.randn(N, rank) * 0.1).to(DEVICE, dtype).requires_grad_()
    return a, b


def run_and_grads(fn, x, a, b, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(x, a, b)
    dx, da, db = torch.autograd.grad(y, (x, a, b), dy)
    return y, dx, da, db


@pytest.mark.parametrize("fmt,double_quant", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize(
    "M,N,K,rank,bias",
    [
        (37, 96, 128, 8, True),  # aligned K, odd M
        (5, 48, 123, 16, False),  # K % 64 != 0: absmax blocks straddle rows, odd N·K
        (64, 80, 192, 64, True),  # 3 K tiles, rank 64
    ],
)
def test_fused_matches_dequant_then_matmul(M, N, K, rank, bias, fmt, double_quant):
    w = torch.randn(N, K, device=DEVICE) * 0.05
    pw = quant.quantize(w, fmt, 64, double_quant)
    w_deq = quant.dequantize(pw, torch.float32)
    b0 = torch.randn(N, device=DEVICE) if bias else None
    a, b = lora_tensors(N, K, rank)
    x, dy = torch.randn(M, K, device=DEVICE), torch.randn(M, N, device=DEVICE)
    scale = 2.0

    y, dx, da, db = run_and_grads(
        lambda x, a, b: qmatmul.qlora_linear(x, pw, a, b, scale, b0, path="fused"), x, a, b, dy
    )
    y_ref, dx_ref, da_ref, db_ref = run_and_grads(
        lambda x, a, b: reference.lora_linear(x, w_deq, a, b, scale, b0), x, a, b, dy
    )
    assert_close(y, y_ref, name="Y")
    assert_close(dx, dx_ref, name="dX")
    assert_close(da, da_ref, name="dA")
    assert_close(db, db_ref, name="dB")

    # quantization error, against the unquantized weight
    y_dense = x @ w.t()
    y_base = qmatmul.qmatmul_forward(x, pw)
    sqnr = sqnr_db(y_dense, y_base)
    print(f"{fmt} M={M} N={N} K={K}: SQNR vs unquantized {sqnr:.1f} dB")
    assert sqnr > SQNR_FLOOR_DB[fmt]


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("K", [128, 123], ids=["paired", "odd-K"])
def test_fused_decode_modes_agree(fmt, K, monkeypatch):
    """The select-tree decode and the table-load decode give bit-identical forward and dX."""
    N, M = 80, 33
    pw = quant.quantize(torch.randn(N, K, device=DEVICE) * 0.05, fmt, 64, True)
    x, dy = torch.randn(M, K, device=DEVICE), torch.randn(M, N, device=DEVICE)
    out = {}
    for select in (True, False):
        monkeypatch.setattr(quant, "DECODE_SELECT", select)
        out[select] = (qmatmul.qmatmul_forward(x, pw), qmatmul.qmatmul_backward_dx(dy, pw))
    assert torch.equal(out[True][0], out[False][0])
    assert torch.equal(out[True][1], out[False][1])


@pytest.mark.parametrize("fmt,double_quant", FORMATS[:2], ids=FORMAT_IDS[:2])
def test_fused_fp16(fmt, double_quant):
    M, N, K, rank = 33, 64, 128, 16
    w = torch.randn(N, K, device=DEVICE) * 0.05
    pw = quant.quantize(w.half(), fmt, 64, double_quant)
    a, b = lora_tensors(N, K, rank, torch.float16)
    x, dy = torch.randn(M, K, device=DEVICE).half(), torch.randn(M, N, device=DEVICE).half()
    y, dx, da, db = run_and_grads(
        lambda x, a, b: qmatmul.qlora_linear(x, pw, a, b, 0.5, path="fused"), x, a, b, dy
    )
    # oracle in fp32 over the fp16-rounded deq(W), as bnb's fp16 dequantize gives it
    w16 = quant.dequantize(pw, torch.float16).float()
    y_ref, dx_ref, da_ref, db_ref = run_and_grads(
        lambda x, a, b: reference.lora_linear(x, w16, a, b, 0.5), x.float(), a.float(), b.float(), dy.float()
    )
    for got, exp, name in ((y, y_ref, "Y"), (dx, dx_ref, "dX"), (da, da_ref, "dA"), (db, db_ref, "dB")):
        assert got.dtype == torch.float16
        assert_close(got, exp, dtype=torch.float16, name=name)


def test_3d_input_dropout_and_paths_agree():
    """3-D input with LoRA dropout: fused kernels, Triton dequantize path and torch backend agree."""
    N, K, rank = 40, 128, 8
    pw = quant.quantize(torch.randn(N, K, device=DEVICE) * 0.05, "nf4", 64, True)
    a, b = lora_tensors(N, K, rank)
    x, dy = torch.randn(2, 7, K, device=DEVICE), torch.randn(2, 7, N, device=DEVICE)
    keep = torch.rand(2, 7, K, device=DEVICE) >= 0.25
    results = {}
    for backend, path in (("triton", "fused"), ("triton", "dequant"), ("torch", "auto")):
        cfg = qmatmul.QLoRAConfig(scale=1.5, dropout_p=0.25, backend=backend, path=path)
        results[path] = run_and_grads(
            lambda x, a, b, cfg=cfg: qmatmul.QLoRALinearFunction.apply(  # the node takes rows [M, K]
                x.reshape(-1, K), a, b, None, keep.reshape(-1, K), pw, cfg
            ).reshape(2, 7, N),
            x,
            a,
            b,
            dy,
        )
    w_deq = quant.dequantize(pw, torch.float32)
    expected = run_and_grads(
        lambda x, a, b: reference.lora_linear(x, w_deq, a, b, 1.5, dropout_mask=keep, dropout_p=0.25),
        x,
        a,
        b,
        dy,
    )
    for path, got in results.items():
        for g, e, name in zip(got, expected, ("Y", "dX", "dA", "dB")):
            assert_close(g, e, name=f"{path} {name}")


def test_never_saves_a_dense_weight():
    """Nothing of W's size in a float dtype is saved for backward, on either backend."""
    N, K = 64, 128
    layer = QuantLoRALinear.from_linear(nn.Linear(K, N, device=DEVICE), rank=4, alpha=8)
    x = torch.randn(3, K, device=DEVICE, requires_grad=True)
    for backend in ("torch", "triton"):
        layer.backend = backend
        saved = []

        def pack(t, saved=saved):
            saved.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        y.sum().backward()
        assert saved, "the hook saw nothing"
        assert all(
            not (dt.is_floating_point and sh and torch.Size(sh).numel() >= N * K) for sh, dt in saved
        ), saved


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_module_backends_merge_and_state(quant_type):
    N, K, rank, alpha = 48, 128, 8, 16
    linear = nn.Linear(K, N, device=DEVICE)
    torch.nn.init.normal_(linear.weight, std=0.05)
    layer = QuantLoRALinear.from_linear(linear, rank, alpha, quant_type=quant_type)
    nn.init.normal_(layer.lora_B, std=0.1)  # a non-trivial adapter
    assert (layer.in_features, layer.out_features, layer.rank, layer.alpha) == (K, N, rank, alpha)
    assert layer.scaling == alpha / rank and layer.quant_type == quant_type
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert "qweight" in layer.state_dict() and "weight" not in layer.state_dict()

    x = torch.randn(2, 5, K, device=DEVICE)
    outs = {}
    for backend in ("torch", "triton"):
        layer.backend = backend
        layer.zero_grad()
        y = layer(x)
        y.pow(2).sum().backward()
        outs[backend] = (y.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    for got, exp, name in zip(outs["triton"], outs["torch"], ("Y", "dA", "dB")):
        assert_close(got, exp, name=name)

    merged = layer.merge()
    assert isinstance(merged, nn.Linear)
    assert_close(merged(x), outs["torch"][0], name="merged")
    w_deq = layer.dequantized_weight(torch.float32)
    assert sqnr_db(linear.weight, w_deq) > SQNR_FLOOR_DB[quant_type]

    clone = QuantLoRALinear.from_linear(nn.Linear(K, N, device=DEVICE), rank, alpha, quant_type=quant_type)
    clone.load_state_dict(layer.state_dict())
    clone.backend = layer.backend
    assert torch.equal(clone(x), layer(x))


@needs_bnb
def test_from_bnb_linear4bit_same_output_as_bnb_and_back():
    K, N = 128, 64
    dense = nn.Linear(K, N)
    layer = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    layer = layer.to("cpu")
    ours = QuantLoRALinear.from_bnb(layer, rank=8, alpha=16, backend="triton")
    assert ours.qweight.data_ptr() == layer.weight.data.data_ptr()
    x = torch.randn(6, K, requires_grad=True)  # requires_grad: bnb's exact dequantize + matmul path
    y_bnb = layer(x)
    assert_close(on_device(ours)(x.to(DEVICE)), y_bnb, name="fusedtune vs bnb")

    back = ours.to_bnb()
    assert_close(back(x), y_bnb, name="handed back")
    nn.init.normal_(ours.lora_B, std=0.1)
    merged = ours.to_bnb(merge=True)
    assert sqnr_db(on_device(ours)(x.to(DEVICE)).detach().cpu(), merged(x).detach()) > SQNR_FLOOR_DB["nf4"]


@needs_bnb
def test_from_bnb_linear8bitlt():
    K, N = 96, 32
    w = torch.randn(N, K) * 0.05
    layer = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    ours = QuantLoRALinear.from_bnb(layer, rank=4, alpha=4, backend="triton")
    assert ours.quant_type == "int8" and torch.equal(ours.qweight, layer.weight.CB)
    x = torch.randn(4, K)
    w_deq = bnb.functional.int8_vectorwise_dequant(layer.weight.CB, layer.weight.SCB)
    assert_close(on_device(ours)(x.to(DEVICE)), x @ w_deq.t(), name="int8 base")
    assert torch.equal(ours.to_bnb().weight.CB, layer.weight.CB)
    # after its first forward bnb moves CB/SCB into layer.state: still taken over, the same weight
    cb = layer.weight.CB.clone()
    layer(x.half())
    assert layer.weight.CB is None
    again = QuantLoRALinear.from_bnb(layer, rank=4, alpha=4)
    assert torch.equal(again.qweight, cb)


@needs_bnb
def test_transformers_quantized_tiny_model(tmp_path):
    """A Linear4bit loaded by transformers with BitsAndBytesConfig(load_in_4bit) on CPU."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    qcfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, quantization_config=qcfg, device_map="cpu"
    )
    down = model.model.layers[0].mlp.down_proj  # [64, 128]
    assert isinstance(down, bnb.nn.Linear4bit) and down.weight.quant_state.nested
    ours = QuantLoRALinear.from_bnb(down, rank=8, alpha=16, backend="triton")
    x = torch.randn(5, 128, requires_grad=True)
    assert_close(on_device(ours)(x.to(DEVICE)), down(x), name="transformers Linear4bit")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,double_quant", FORMATS, ids=FORMAT_IDS)
def test_fused_bf16_gpu(fmt, double_quant):
    M, N, K, rank = 257, 384, 512, 16
    dev = "cuda"
    pw = quant.quantize(torch.randn(N, K, device=dev).bfloat16() * 0.05, fmt, 64, double_quant)
    a = (torch.randn(rank, K, device=dev) * 0.1).bfloat16().requires_grad_()
    b = (torch.randn(N, rank, device=dev) * 0.1).bfloat16().requires_grad_()
    x, dy = torch.randn(M, K, device=dev).bfloat16(), torch.randn(M, N, device=dev).bfloat16()
    y, dx, da, db = run_and_grads(
        lambda x, a, b: qmatmul.qlora_linear(x, pw, a, b, 2.0, path="fused"), x, a, b, dy
    )
    w_deq = quant.dequantize(pw, torch.bfloat16).float()
    expected = run_and_grads(
        lambda x, a, b: reference.lora_linear(x, w_deq, a, b, 2.0),
        x.float(),
        a.float(),
        b.float(),
        dy.float(),
    )
    # dA and dB are torch GEMMs over the function's bf16 S = X Aᵀ and dS = s·dY B (as PEFT's are), not
    # kernel outputs: their oracle starts from those rounded tensors. (From the exact S and dS instead,
    # the rounding of dS alone puts ~0.07 of absolute error into dA over M = 257: beyond bf16's atol.)
    s16, ds16 = x @ a.detach().t(), 2.0 * (dy @ b.detach())
    expected = (*expected[:2], ds16.float().t() @ x.float(), 2.0 * (dy.float().t() @ s16.float()))
    for g, e, name in zip((y, dx, da, db), expected, ("Y", "dX", "dA", "dB")):
        assert_close(g, e, dtype=torch.bfloat16, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quant_kernels_bit_exact_gpu(quant_type):
    """On a GPU the Triton quantize/dequantize must still equal the torch reference bit for bit."""
    w = torch.randn(96, 320, device="cuda", dtype=torch.bfloat16) * 0.02
    t = quant.quantize_4bit(w, 64, quant_type, True, backend="triton")
    r = quant.quantize_4bit(w, 64, quant_type, True, backend="torch")
    assert torch.equal(t.packed, r.packed) and torch.equal(t.absmax, r.absmax)
    assert torch.equal(t.nested_absmax, r.nested_absmax)
    assert torch.equal(quant.dequantize_4bit(t, backend="triton"), quant.dequantize_4bit(r, backend="torch"))


@pytest.mark.parametrize(
    ("fmt", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False)]
)
def test_torch_path_dense_weight_is_the_reference(fmt, double_quant):
    """The torch path's dequantize (bitsandbytes' CPU kernel where it runs) is bit-identical to ours."""
    cfg = qmatmul.QLoRAConfig(scale=1.0, backend="torch")
    # odd K (bnb's generic path), blocks that straddle rows with K a multiple of 16 (SmolLM2's k_proj at
    # blocksize 128: bnb's AVX-512 kernel got these wrong), and whole blocks per row
    for (n, k), blocksize in (((37, 201), 64), ((24, 576), 128), ((8, 96), 64), ((16, 128), 64)):
        for original in (torch.float32, torch.bfloat16, torch.float16):  # the dtype quantized from
            w = (torch.randn(n, k, device=DEVICE) * 0.1).to(original)
            pw = quant.quantize(w, fmt, blocksize, double_quant, backend="torch")
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                expected = quant.dequantize(pw, dtype, backend="torch")
                got = qmatmul._dense(pw, dtype, cfg)
                assert got.dtype == dtype and torch.equal(got, expected), (n, k, blocksize, original, dtype)


def _bad_launch(case: str):
    """One launch of the fused kernels with one thing wrong; the launcher must refuse it."""
    N, K, M, r = 48, 64, 5, 8
    pw = quant.quantize(torch.randn(N, K, device=DEVICE) * 0.05, "nf4", 64, True)
    x, dy = torch.randn(M, K, device=DEVICE), torch.randn(M, N, device=DEVICE)
    s, a, b = (
        torch.randn(M, r, device=DEVICE),
        torch.randn(r, K, device=DEVICE),
        torch.randn(N, r, device=DEVICE),
    )
    calls = {
        "3-D x": lambda: qmatmul.qmatmul_forward(x[None], pw),
        "K mismatch": lambda: qmatmul.qmatmul_forward(x[:, :32], pw),
        "fp64 x": lambda: qmatmul.qmatmul_forward(x.double(), pw),
        "S' rows": lambda: qmatmul.qmatmul_forward(x, pw, s[:3], b),
        "B shape": lambda: qmatmul.qmatmul_forward(x, pw, s, b[:, :4]),
        "B without S'": lambda: qmatmul.qmatmul_forward(x, pw, None, b),
        "rank 0": lambda: qmatmul.qmatmul_forward(x, pw, s[:, :0], b[:, :0]),
        "bias shape": lambda: qmatmul.qmatmul_forward(x, pw, bias=torch.zeros(N + 1, device=DEVICE)),
        "bias device": lambda: qmatmul.qmatmul_forward(x, pw, bias=torch.zeros(N, device="meta")),
        "dY N mismatch": lambda: qmatmul.qmatmul_backward_dx(dy[:, :40], pw),
        "dS rows": lambda: qmatmul.qmatmul_backward_dx(dy, pw, s[:3], a),
        "A shape": lambda: qmatmul.qmatmul_backward_dx(dy, pw, s, a[:, :32]),
    }
    return calls[case]


@pytest.mark.parametrize(
    "case",
    [
        "3-D x", "K mismatch", "fp64 x", "S' rows", "B shape", "B without S'", "rank 0", "bias shape",
        "bias device", "dY N mismatch", "dS rows", "A shape",
    ],
)  # fmt: skip
def test_launchers_refuse_mismatched_inputs(case):
    """Every shape the kernels index by is checked first: on a GPU a wrong one would read out of bounds."""
    with pytest.raises(ValueError):
        _bad_launch(case)()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"dropout_p": -0.5}, "dropout_p"),
        ({"backend": "cuda"}, "backend"),
        ({"path": "foo"}, "path"),
        ({"b_rows": 47}, "lora_b"),
        ({"a_cols": 32}, "in_features"),
    ],
)
def test_qlora_linear_refuses_bad_arguments(kwargs, match):
    """As lora_linear does: a dropout of 1 returned NaN, and an unknown backend or path ran the fused one."""
    pw = quant.quantize(torch.randn(48, 64, device=DEVICE) * 0.05, "nf4", 64, True)
    a, b = lora_tensors(kwargs.pop("b_rows", 48), kwargs.pop("a_cols", 64), 4)
    with pytest.raises(ValueError, match=match):
        qmatmul.qlora_linear(
            torch.randn(3, 64, device=DEVICE), pw, a, b, 1.0, **{"backend": "torch", **kwargs}
        )


def test_strided_int8_weight_reads_as_its_copy():
    """An int8 weight that is a column slice of a wider one: the fused kernel indexed rows K apart."""
    torch.manual_seed(0)
    wide = quant.quantize(torch.randn(24, 64, device=DEVICE), "int8")
    pw = quant.PackedWeightInt8(wide.qweight[:, :32], wide.scale, torch.float16)
    assert not pw.qweight.is_contiguous()
    x, (a, b) = torch.randn(5, 32, device=DEVICE), lora_tensors(24, 32, 2)
    want = qmatmul.qlora_linear(x, pw, a, b, 1.0, backend="torch")
    for path in ("fused", "dequant"):
        got = qmatmul.qlora_linear(x, pw, a, b, 1.0, backend="triton", path=path)
        assert_close(got, want, torch.float32, name=path)


def test_state_dict_records_the_format():
    """NF4 and FP4 at one blocksize fill identical buffers: the state dict carries the format (a small
    tensor, so safetensors takes it), and a module of another format refuses it before copying anything,
    strict or not, instead of decoding the codes with the wrong table. A state dict from before the
    record loads as before."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    lin = nn.Linear(64, 48).to(DEVICE)
    nf4 = QuantLoRALinear.from_linear(lin, 4, 8.0, quant_type="nf4")
    fp4 = QuantLoRALinear.from_linear(lin, 4, 8.0, quant_type="fp4")
    fp4_before = fp4.dequantized_weight()
    state = st_load(st_save({k: v.contiguous() for k, v in nf4.state_dict().items()}))
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="holds nf4 weights"):
            fp4.load_state_dict(state, strict=strict)
        assert torch.equal(fp4.dequantized_weight(), fp4_before), "a refused load copied nothing"
    other = QuantLoRALinear.from_linear(nn.Linear(64, 48).to(DEVICE, torch.float16), 4, 8.0, quant_type="nf4")
    assert not other.load_state_dict(state).unexpected_keys
    assert other.weight_dtype == nf4.weight_dtype == torch.float32
    assert torch.equal(other.dequantized_weight(), nf4.dequantized_weight())
    older = {k: v for k, v in state.items() if k != "quant_format"}
    assert not other.load_state_dict(older).missing_keys


@pytest.mark.skipif(DEVICE == "cuda", reason="fp64 on the torch path: the CPU's (bnb serves 16/32-bit only)")
def test_torch_path_gradcheck_float64_with_bitsandbytes_installed():
    """The torch path's dequantize goes to bitsandbytes on the CPU, which has no fp64: fp64 uses the
    reference, so gradcheck runs."""
    pw = quant.quantize(torch.randn(6, 64) * 0.1, "nf4", 64, True)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    a = (torch.randn(2, 64, dtype=torch.float64) * 0.1).requires_grad_()
    b = (torch.randn(6, 2, dtype=torch.float64) * 0.1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, a, b: qmatmul.qlora_linear(x, pw, a, b, 0.5, backend="torch"), (x, a, b)
    )


def test_qlora_function_refuses_a_bias_gradient():
    pw = quant.quantize(torch.randn(16, 64, device=DEVICE) * 0.05, "nf4", 64, True)
    a, b = lora_tensors(16, 64, 4)
    bias = torch.zeros(16, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="frozen bias"):  # at the forward, before any work
        qmatmul.qlora_linear(torch.randn(3, 64, device=DEVICE), pw, a, b, 1.0, bias, backend="torch")
    with torch.no_grad():  # no gradient asked for: fine
        qmatmul.qlora_linear(torch.randn(3, 64, device=DEVICE), pw, a, b, 1.0, bias, backend="torch")


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("int8", False)])
def test_dtype_cast_keeps_the_quantization_state(quant_type, double_quant):
    """``module.to(bf16)`` casts the adapter, never the frozen weight's scales (deq(W) stays bit-equal)."""
    linear = nn.Linear(128, 64, device=DEVICE)
    layer = QuantLoRALinear.from_linear(linear, 4, 8, quant_type=quant_type, double_quant=double_quant)
    before = layer.dequantized_weight(torch.float32)
    dtypes = {n: b.dtype for n, b in layer.named_buffers()}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to(DEVICE, torch.float64)):
        layer = cast(layer)
        assert {n: b.dtype for n, b in layer.named_buffers()} == dtypes
        assert torch.equal(layer.dequantized_weight(torch.float32), before)
    assert layer.lora_A.dtype == torch.float64  # the adapter does follow


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_output_may_be_modified_in_place(backend):
    """As for LoRA (test_lora.py): Y of a 3-D input is not a view made inside the node, so a model may
    modify it in place, with the out-of-place gradients."""
    torch.manual_seed(0)
    N, K, r = 24, 64, 4
    pw = quant.quantize(torch.randn(N, K, device=DEVICE) * 0.05, "nf4", 64, True)
    x, (a, b) = torch.randn(2, 3, K, device=DEVICE), lora_tensors(N, K, r)

    def run(in_place):
        xg, ag, bg = (t.detach().clone().requires_grad_() for t in (x, a, b))
        y = qmatmul.qlora_linear(xg, pw, ag, bg, 2.0, backend=backend)
        y = y.add_(1.0) if in_place else y + 1.0
        y.square().sum().backward()
        return y.detach(), xg.grad, ag.grad, bg.grad

    for got, expected in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
