"""Weight formats against bitsandbytes on CPU: bit-exact quantize and dequantize, both backends.

bitsandbytes 0.50 on CPU: 4-bit quantize runs its torch "default" op; blockwise 8-bit quantize (double
quant) and 4-bit dequantize run its C++ library. Every comparison here is ``torch.equal``. On a CUDA
machine the "triton" backend runs compiled on the GPU (its kernels are launched without FMA contraction)
and is still compared with bnb's CPU results.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

from fusedtune.kernels import quant, reference  # noqa: E402

BACKENDS = ["torch", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on(backend: str) -> str:
    """Where a backend runs here: Triton compiled on the GPU when there is one, torch on the CPU."""
    return DEVICE if backend == "triton" else "cpu"


def to_device(pw: quant.PackedWeight4bit, device: str) -> quant.PackedWeight4bit:
    fields = {f.name: getattr(pw, f.name) for f in dataclasses.fields(pw)}
    return dataclasses.replace(
        pw, **{k: v.to(device) for k, v in fields.items() if isinstance(v, torch.Tensor)}
    )


def bnb_dequantize_4bit_flat(packed, quant_state) -> torch.Tensor:
    """bnb's dequantize over the flat index, the layout's definition.

    ``BF.dequantize_4bit`` on an AVX-512 CPU takes a C++ path that looks the absmax up per row
    (``absmax[row · (K // blocksize) + k // blocksize]``): wrong whenever a block straddles two rows
    (``K % blocksize != 0``). bnb's CUDA kernel and its torch "default" op index the flat weight; the
    latter is the oracle for such shapes.
    """
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = BF.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip torch.compile
    code = BF.get_4bit_type(quant_state.quant_type, device=packed.device)
    return fn(
        packed.reshape(-1), absmax.float(), code, quant_state.blocksize, quant_state.shape, quant_state.dtype
    )


def make_weight(shape, dtype, scale=0.02) -> torch.Tensor:
    w = torch.randn(shape) * scale
    w[1] = 0.0  # an all-zero row: zero blocks, and a 0 absmax in the double quant
    w[0, :3] = torch.tensor([scale * 4, -scale * 4, 0.0])
    return w.to(dtype)


def test_code_tables_match_bnb():
    for qt in ("nf4", "fp4"):
        assert torch.equal(reference.code_4bit(qt), BF.get_4bit_type(qt, device="cpu"))
    assert torch.equal(reference.dynamic_code(), BF.create_dynamic_map())


@pytest.mark.parametrize("select", [True, False], ids=["select", "table"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_decode_modes_cover_every_code(quant_type, select, monkeypatch):
    """Both decodes of the Triton kernels (compiled-in selects, table loads) on every byte value, so every
    code in both nibbles, bit for bit against the reference (signed zeros included)."""
    monkeypatch.setattr(quant, "DECODE_SELECT", select)
    packed = torch.arange(256, dtype=torch.uint8).repeat(2)  # 1024 elements: a (16, 64) weight
    absmax = torch.rand(1024 // 64) + 0.5
    pw = quant.PackedWeight4bit(
        packed=packed.to(DEVICE),
        absmax=absmax.to(DEVICE),
        shape=(16, 64),
        blocksize=64,
        quant_type=quant_type,
    )
    ours = quant.dequantize_4bit(pw, torch.float32, backend="triton").cpu()
    ref = reference.dequantize_4bit(packed, absmax, (16, 64), 64, quant_type, torch.float32)
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("per_prog", [1, 8, 128])
def test_dequantize_launch_shape_does_not_change_the_result(per_prog, monkeypatch):
    """The benchmark's launch-shape override (blocks per program, tails past the last block included)
    gives the reference's bits, with double quant."""
    w = torch.randn(37, 96, generator=torch.Generator().manual_seed(3))
    pw = quant.quantize_4bit(w.to(DEVICE), 64, "nf4", double_quant=True, backend="torch")
    ref = quant.dequantize_4bit(pw, torch.float32, backend="torch").cpu()
    monkeypatch.setattr(quant, "DEQUANT_LAUNCH_OVERRIDE", {"BLOCKS_PER_PROG": per_prog, "num_warps": 8})
    ours = quant.dequantize_4bit(pw, torch.float32, backend="triton").cpu()
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))


CASES_4BIT = [
    # shape, blocksize, dtype: K % 64 != 0 (blocks straddle rows), odd numel, tails, small blocks
    ((64, 128), 64, torch.float32),
    ((5, 123), 64, torch.float32),
    ((33, 65), 32, torch.float16),
    ((17, 300), 256, torch.bfloat16),
    ((48, 96), 128, torch.bfloat16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize,dtype", CASES_4BIT, ids=lambda v: str(v))
def test_4bit_bit_exact(shape, blocksize, dtype, quant_type, double_quant, backend):
    w = make_weight(shape, dtype)
    packed, qs = BF.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    dev = on(backend)
    pw = quant.quantize_4bit(w.to(dev), blocksize, quant_type, double_quant, backend=backend)

    assert torch.equal(pw.packed.cpu(), packed.reshape(-1))
    assert pw.nested == qs.nested
    if double_quant and dev != "cpu":
        # offset = mean(absmax) is torch's reduction on the GPU (bnb's CUDA path takes it there too), so
        # the double-quant state equals bnb's CPU one only on CPU; the 8-bit kernel is checked bit for bit
        # in test_blockwise_8bit_bit_exact. Dequantize from bnb's own state instead.
        pw = to_device(quant.PackedWeight4bit.from_bnb(packed, qs), dev)
    else:
        assert torch.equal(pw.absmax.cpu(), qs.absmax)
    if double_quant and dev == "cpu":
        assert torch.equal(pw.offset.reshape(()), qs.offset)
        assert torch.equal(pw.nested_absmax, qs.state2.absmax)
        assert torch.equal(pw.nested_code, qs.state2.code)
        decoded = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        assert torch.equal(pw.absmax_fp32(), decoded)

    ours = quant.dequantize_4bit(pw, backend=backend).cpu()
    assert ours.dtype == dtype and ours.shape == shape
    assert torch.equal(ours, bnb_dequantize_4bit_flat(packed, qs))
    if shape[1] % blocksize == 0:  # where bnb's CPU library indexes correctly, match it too
        assert torch.equal(ours, BF.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_4bit_dequantize_to_other_dtype(backend):
    w = make_weight((16, 128), torch.float32)
    packed, qs = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    if on(backend) == "cpu":
        pw = quant.quantize_4bit(w, 64, "nf4", True, backend=backend)
    else:  # bnb's CPU double-quant state (see test_4bit_bit_exact), dequantized on the GPU
        pw = to_device(quant.PackedWeight4bit.from_bnb(packed, qs), on(backend))
    for dtype in (torch.float16, torch.bfloat16):
        qs.dtype = dtype
        ours = quant.dequantize_4bit(pw, dtype, backend=backend).cpu()
        assert torch.equal(ours, BF.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [256, 1000, 4099])
def test_blockwise_8bit_bit_exact(n, backend):
    """bnb's CPU blockwise 8-bit rule (its 65536-bin table), the double-quant building block."""
    x = torch.randn(n) * 3.0
    x[300:556] = 0.0 if n > 556 else x[300:556]  # a zero block where it fits
    q, qs = BF.quantize_blockwise(x, blocksize=256)
    code = reference.dynamic_code()
    if backend == "torch":
        ours_q, ours_absmax = reference.quantize_blockwise_8bit(x, code, 256)
    else:
        ours_q, ours_absmax = quant._quantize_blockwise_8bit_triton(x.to(DEVICE), code, 256)
        ours_q, ours_absmax = ours_q.cpu(), ours_absmax.cpu()
    assert torch.equal(ours_absmax, qs.absmax)
    assert torch.equal(ours_q, q)
    assert torch.equal(
        reference.dequantize_blockwise_8bit(q, qs.absmax, code, 256), BF.dequantize_blockwise(q, qs)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(64, 128), (5, 123)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_rowwise_matches_linear8bitlt(shape, dtype, backend):
    w = torch.randn(shape).to(dtype)
    w[0, 0] = 0.5  # ties: w · 127 / max hits .5 exactly when max = 127 · 2^-k
    w[0, 1] = 127.0
    layer = bnb.nn.Linear8bitLt(shape[1], shape[0], bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")  # Int8Params quantizes when moved off the host copy
    pw = quant.quantize_int8(w.to(on(backend)), backend=backend)
    assert torch.equal(pw.qweight.cpu(), layer.weight.CB)
    assert torch.equal(pw.scale.cpu(), layer.weight.SCB)
    expected = BF.int8_vectorwise_dequant(layer.weight.CB, layer.weight.SCB)
    assert torch.equal(quant.dequantize_int8(pw, torch.float32, backend=backend).cpu(), expected)
    assert torch.equal(quant.dequantize_int8(pw, torch.float16, backend=backend).cpu(), expected.half())


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "dq"])
def test_round_trip_through_linear4bit(double_quant):
    """bnb -> fusedtune takes the data as is; fusedtune -> bnb runs through bnb's own matmul."""
    K, N = 128, 48
    dense = torch.nn.Linear(K, N, bias=False)
    layer = bnb.nn.Linear4bit(
        K, N, bias=False, compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4"
    )
    layer.weight = bnb.nn.Params4bit(
        dense.weight.data.clone(), requires_grad=False, compress_statistics=double_quant, quant_type="nf4"
    )
    layer = layer.to("cpu")  # quantizes
    taken = quant.PackedWeight4bit.from_bnb(layer.weight.data, layer.weight.quant_state)
    assert taken.packed.data_ptr() == layer.weight.data.data_ptr()  # no copy, no re-quantization
    assert torch.equal(
        quant.dequantize_4bit(taken), BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    )

    ours = quant.quantize_4bit(dense.weight.data, 64, "nf4", double_quant)
    assert torch.equal(ours.packed, taken.packed)
    packed, qs = ours.to_bnb()
    assert torch.equal(BF.dequantize_4bit(packed, qs), quant.dequantize_4bit(ours))
    x = torch.randn(3, K, requires_grad=True)  # requires_grad keeps bnb off its CPU repacking fast path
    y_bnb = bnb.matmul_4bit(x, packed.t(), quant_state=qs)
    torch.testing.assert_close(y_bnb, x @ quant.dequantize_4bit(ours).t(), rtol=0, atol=0)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        quant.quantize_4bit(torch.randn(4, 64), blocksize=48)
    with pytest.raises(ValueError):
        quant.quantize_4bit(torch.randn(4, 64), quant_type="int4")
    with pytest.raises(ValueError):
        quant.quantize_4bit(torch.randn(64))
