"""LoRA linear on CPU under pytest-benchmark: the pure-torch reference against a real PEFT LoRA layer.

A benchmark, not a test: no timing is asserted. ``make test`` runs it at this size (``testpaths``) so
that it keeps working; ``make bench`` runs ``bench/`` alone.
The Triton kernels are not benchmarked here: on CPU they run in Triton's interpreter, which is a
correctness path, not a performance one. The GPU comparison is ``bench/gpu_lora.py``.

    make bench ARGS="-k lora --benchmark-columns=median,iqr,rounds"
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusedtune.kernels import reference

pytestmark = pytest.mark.slow

SHAPES = [(256, 512, 512), (512, 512, 1376)]  # (M tokens, K in, N out): small Llama-like projections
RANK, ALPHA = 16, 32


def _peft_layer(k: int, n: int):
    peft_lora = pytest.importorskip("peft.tuners.lora")
    from peft import LoraConfig

    base = nn.Linear(k, n, bias=False).requires_grad_(False)  # frozen, as get_peft_model leaves it
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0)
    layer = peft_lora.Linear(base, "default", config=cfg, r=RANK, lora_alpha=ALPHA)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.02)
    return layer


def _provider(name: str, k: int, n: int):
    """A callable x -> y and the trainable tensors whose .grad the backward fills."""
    if name == "peft":
        layer = _peft_layer(k, n)
        return layer, [p for p in layer.parameters() if p.requires_grad]
    w = torch.randn(n, k) / k**0.5
    a = (torch.randn(RANK, k) / k**0.5).requires_grad_()
    b = (torch.randn(n, RANK) * 0.02).requires_grad_()
    return (lambda x: reference.lora_linear(x, w, a, b, ALPHA / RANK)), [a, b]


@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
@pytest.mark.parametrize("provider", ["reference", "peft"])
@pytest.mark.parametrize(("m", "k", "n"), SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in SHAPES])
def test_bench_lora_linear(benchmark, provider, mode, m, k, n):
    torch.manual_seed(0)
    fn, params = _provider(provider, k, n)
    x = torch.randn(m, k, requires_grad=True)
    grad_y = torch.randn(m, n)
    benchmark.group = f"lora-{mode}-M{m}-K{k}-N{n}-r{RANK}"
    benchmark.extra_info.update(provider=provider, mode=mode, M=m, K=k, N=n, r=RANK)

    def clear_grads():
        for t in [x, *params]:
            t.grad = None

    if mode == "forward":
        with torch.no_grad():
            y = benchmark(fn, x)
    elif mode == "backward":

        def setup():
            clear_grads()
            return (fn(x),), {}

        benchmark.pedantic(lambda y: y.backward(grad_y), setup=setup, rounds=20, warmup_rounds=2)
        y = fn(x)
    else:

        def full():
            clear_grads()
            out = fn(x)
            out.backward(grad_y)
            return out

        y = benchmark(full)
    assert y.shape == (m, n)
