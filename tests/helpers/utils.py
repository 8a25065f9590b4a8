"""Shared test helpers: one tolerance table keyed by dtype, a readable assert_close, SQNR."""

from __future__ import annotations

import math

import torch

# Tolerances for a fused kernel against its pure-torch reference, both accumulating in fp32.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-8},
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
    torch.bfloat16: {"atol": 5e-2, "rtol": 2e-2},
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, name: str = ""
):
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype`` and a short report."""
    tol = TOLERANCES[dtype or expected.dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs()
    bound = tol["atol"] + tol["rtol"] * e.abs()
    bad = err > bound
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{name or 'tensor'} mismatch: {int(bad.sum())}/{bad.numel()} elements out of tolerance "
            f"{tol}; max abs err {err.max().item():.3g}; first at {idx}: "
            f"got {a[idx].item():.6g}, expected {e[idx].item():.6g}; SQNR {sqnr_db(e, a):.1f} dB"
        )


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``reference`` in dB."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def backward_extra_bytes(forward, backward, held) -> int:
    """Bytes of CPU tensor storage a backward adds at its peak over what its forward left, counted op by
    op (``estimate.LiveTensorTracker``): ``out = forward()``, then ``backward(out)``; ``held`` are the
    inputs made before, counted as there from the start."""
    from fusedtune.trainer.estimate import LiveTensorTracker

    tracker = LiveTensorTracker()
    for t in held:
        tracker.add(t)
    with tracker._mode:
        out = forward()
        tracker.peak = start = tracker.current
        backward(out)
    return tracker.peak - start
