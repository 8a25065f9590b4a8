"""``optim.master_weights``: bf16/fp16 trainable weights updated through fp32 copies.

The reference is the same optimizer over fp32 weights fed the same gradients: the copies must follow it
bit for bit (each copy steps alone, and every optimizer here keeps per-parameter state), and each bf16
weight must be its copy rounded. Without copies, small updates to a bf16 weight round away.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fusedtune.trainer.config import OptimConfig
from fusedtune.trainer.optim import build_optimizer, clip_and_step, master_weights_of

OPTIMIZERS = ["adamw_torch", "adamw8bit", "adamw32bit"]


class _Toy(nn.Module):
    """A 2-D weight big enough for bitsandbytes' 8-bit state (>= 4096 elements), a bias, a frozen weight."""

    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter((torch.randn(96, 64, generator=g) * 0.5 + 1.0).to(dtype))
        self.b = nn.Parameter(torch.randn(96, generator=g).to(dtype))
        self.frozen = nn.Parameter(torch.randn(8, 8, generator=g).to(dtype), requires_grad=False)


def _grads(step: int, like: _Toy) -> dict[str, torch.Tensor]:
    """bf16-representable gradients, so the fp32 reference and the bf16 model see the same values."""
    g = torch.Generator().manual_seed(100 + step)
    return {
        n: torch.randn(p.shape, generator=g).to(torch.bfloat16).float()
        for n, p in like.named_parameters()
        if p.requires_grad
    }


def _train(model: _Toy, name: str, steps: int, lr: float, master: bool, max_norm=None, grads=_grads):
    cfg = OptimConfig(name=name, lr=lr, weight_decay=0.01, master_weights=master)
    opt = build_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        for n, g in grads(step, model).items():
            getattr(model, n).grad = g.to(getattr(model, n).dtype)
        clip_and_step(opt, params, max_norm)
        assert all(p.grad is None for p in model.parameters())
    return opt


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_copies_follow_the_fp32_optimizer_bit_for_bit(name):
    ref = _Toy(torch.float32)
    with torch.no_grad():  # start from the same (bf16-representable) values
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16))
    half = _Toy(torch.bfloat16)
    _train(ref, name, 5, 1e-3, master=False)
    opt = _train(half, name, 5, 1e-3, master=True)
    masters = master_weights_of(opt)
    assert masters is not None and masters.names == ["w", "b"]  # the frozen weight has no copy
    for n, m in masters.values().items():
        assert m.dtype == torch.float32
        assert torch.equal(m, getattr(ref, n)), n
        assert torch.equal(getattr(half, n), m.to(torch.bfloat16)), n
    # state for the copies only, and exactly the fp32 reference's
    assert len(opt.state) == 2 and all(p.dtype == torch.float32 for p in opt.state)
    assert masters.nbytes == 4 * (96 * 64 + 96)


def test_clipping_scales_the_copies_gradients():
    """Clipped steps: the copies follow the fp32 reference within the error of a norm taken over bf16
    gradients. Adam's update hardly depends on the gradients' scale, so the second moments (which do)
    are compared too: clipped to 0.5 they are far below the unclipped gradients' squares."""
    ref, half = _Toy(torch.float32), _Toy(torch.bfloat16)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16))
    opt_ref = _train(ref, "adamw_torch", 3, 1e-3, master=False, max_norm=0.5)
    opt = _train(half, "adamw_torch", 3, 1e-3, master=True, max_norm=0.5)
    for n, m in master_weights_of(opt).values().items():
        torch.testing.assert_close(m, getattr(ref, n), rtol=0, atol=2e-5)
    for a, b in zip(opt_ref.state.values(), opt.state.values(), strict=True):
        torch.testing.assert_close(b["exp_avg_sq"], a["exp_avg_sq"], rtol=2e-2, atol=1e-12)
    unclipped = _train(_Toy(torch.float32), "adamw_torch", 3, 1e-3, master=False)
    for a, b in zip(unclipped.state.values(), opt.state.values(), strict=True):
        assert b["exp_avg_sq"].sum() < 0.01 * a["exp_avg_sq"].sum()


@pytest.mark.parametrize("name", ["adamw_torch", "adamw8bit"])
def test_small_updates_accumulate_with_copies_and_round_away_without(name):
    """Weights in [1, 1.9] (bf16 spacing 2^-7) at lr 1e-4 with a steady gradient: each of Adam's steps
    (about lr) is far below half a spacing. Without copies nothing moves, ever; with them the copies move
    by about lr a step, and after 60 steps (6e-3, past half a spacing) every weight has followed."""
    steps, lr = 60, 1e-4
    steady = {n: g.sign() for n, g in _grads(0, _Toy(torch.float32)).items()}  # one size: 8-bit moments exact

    def toy():
        m = _Toy(torch.bfloat16)
        u = torch.rand(m.w.shape, generator=torch.Generator().manual_seed(1))
        m.w.data = (1.0 + 0.9 * u).to(torch.bfloat16)
        return m

    plain = toy()
    before = plain.w.detach().clone()
    _train(plain, name, steps, lr, master=False, grads=lambda *_: steady)
    assert torch.equal(plain.w, before)  # rounded away: the bug the copies fix

    kept = toy()
    opt = _train(kept, name, steps, lr, master=True, grads=lambda *_: steady)
    master = master_weights_of(opt).values()["w"]
    moved = (master - before.float()).abs()
    assert moved.min() > 0.8 * steps * lr and moved.max() < 1.2 * steps * lr
    assert (kept.w != before).all()
    assert torch.equal(kept.w, master.to(torch.bfloat16))


def test_fp32_weights_and_master_weights_false_get_no_copies():
    assert master_weights_of(build_optimizer(_Toy(torch.float32), OptimConfig(lr=1e-3))) is None
    half = _Toy(torch.bfloat16)
    opt = build_optimizer(half, OptimConfig(lr=1e-3, master_weights=False))
    assert master_weights_of(opt) is None
    assert {p.dtype for g in opt.param_groups for p in g["params"]} == {torch.bfloat16}


def test_fp32_parameters_beside_copies_step_once():
    """A model with fp32 trainable tensors beside bf16 ones (adapters on a bf16 model): the fp32 ones step
    in the first call only, and match an all-fp32 reference."""
    mixed, ref = _Toy(torch.bfloat16), _Toy(torch.float32)
    with torch.no_grad():
        mixed.b.data = mixed.b.data.float()
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16))
    _train(ref, "adamw_torch", 4, 1e-3, master=False)
    opt = _train(mixed, "adamw_torch", 4, 1e-3, master=True)
    assert master_weights_of(opt).names == ["w"]
    assert torch.equal(mixed.b, ref.b)
    assert all(int(s["step"]) == 4 for s in opt.state.values())
    assert torch.equal(master_weights_of(opt).values()["w"], ref.w)


def test_a_skipped_step_clears_the_weights_gradients():
    """A non-finite loss skips the update; the bf16 weights' gradients (which the optimizer does not hold)
    are dropped too, not carried into the next step."""
    model = _Toy(torch.bfloat16)
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, g in _grads(0, model).items():
        getattr(model, n).grad = g.to(torch.bfloat16)
    norm, skipped, *_ = clip_and_step(opt, [model.w, model.b], 1.0, loss_finite=False)
    assert skipped and math.isfinite(norm)
    assert model.w.grad is None and model.b.grad is None and not opt.state
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
