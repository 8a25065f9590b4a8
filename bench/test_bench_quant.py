"""Weight formats and the QLoRA layer on CPU under pytest-benchmark: fusedtune's torch references vs bnb.

A benchmark, not a test: no timing is asserted. ``make test`` runs it at this size (``testpaths``) so
that it keeps working; ``make bench`` runs ``bench/`` alone.
The Triton kernels are not benchmarked here (the CPU interpreter is a correctness path); the GPU
comparison is ``bench/gpu_qmatmul.py``.

    make bench ARGS="-k quant --benchmark-columns=median,iqr,rounds"
"""

from __future__ import annotations

import pytest
import torch

from fusedtune.kernels import qmatmul, quant

pytestmark = pytest.mark.slow

N, K = 1376, 512  # a small Llama-like projection
M, RANK = 256, 16


@pytest.fixture(scope="module")
def weight():
    torch.manual_seed(0)
    return torch.randn(N, K) * 0.02


@pytest.mark.parametrize("provider", ["fusedtune", "bnb"])
@pytest.mark.parametrize("op", ["quantize", "dequantize"])
def test_bench_nf4(benchmark, weight, provider, op):
    if provider == "bnb":
        bf = pytest.importorskip("bitsandbytes").functional
        packed, qs = bf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        fn = {
            "quantize": lambda: bf.quantize_4bit(
                weight, blocksize=64, quant_type="nf4", compress_statistics=True
            ),
            "dequantize": lambda: bf.dequantize_4bit(packed, qs),
        }[op]
    else:
        pw = quant.quantize_4bit(weight, 64, "nf4", True, backend="torch")
        fn = {
            "quantize": lambda: quant.quantize_4bit(weight, 64, "nf4", True, backend="torch"),
            "dequantize": lambda: quant.dequantize_4bit(pw, backend="torch"),
        }[op]
    benchmark(fn)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_bench_qlora_layer_full(benchmark, weight, quant_type):
    """Forward + backward of the torch-backend QLoRA layer (dequantize per GEMM, never saved)."""
    pw = quant.quantize(weight, quant_type, backend="torch")
    a = (torch.randn(RANK, K) / K**0.5).requires_grad_()
    b = (torch.randn(N, RANK) * 0.02).requires_grad_()
    x = torch.randn(M, K, requires_grad=True)
    dy = torch.randn(M, N)

    def step():
        qmatmul.qlora_linear(x, pw, a, b, 2.0, backend="torch").backward(dy)

    benchmark(step)
