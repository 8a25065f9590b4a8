"""``optim.loss_scale: dynamic``: fp16 gradients that would flush to zero survive, overflows skip the
step and halve the scale, and the scale comes back with a resumed run.

The reference is the same optimizer over fp32 weights fed the unscaled gradients."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import write_config
from torch import nn

from fusedtune.trainer import loop, optim
from fusedtune.trainer.config import OptimConfig, load_config
from fusedtune.trainer.optim import build_optimizer, clip_and_step, loss_scaler_of, master_weights_of


class _Linear(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(64, 96, generator=g).to(torch.float16).to(dtype))


def _backward(model: _Linear, scale: float) -> None:
    """A loss whose gradient (x / 2^30 ≈ 1e-9) lies below fp16's smallest subnormal (2^-24 ≈ 6e-8)."""
    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(1)).to(model.w.dtype)
    loss = (x @ model.w.t()).float().sum() * 2.0**-30
    (loss * scale).backward()


def _steps(model: _Linear, cfg: OptimConfig, n: int) -> torch.optim.Optimizer:
    opt = build_optimizer(model, cfg)
    scaler = loss_scaler_of(opt)
    for _ in range(n):
        _backward(model, 1.0 if scaler is None else scaler.scale)
        _, skipped, *_ = clip_and_step(opt, [model.w], None)
        assert not skipped
    return opt


def test_scaled_fp16_gradients_follow_fp32_where_unscaled_ones_vanish():
    cfg = OptimConfig(name="adamw_torch", lr=1e-3)
    ref = _Linear(torch.float32)
    _steps(ref, cfg, 3)

    plain = _Linear(torch.float16)
    before = plain.w.detach().clone()
    opt = _steps(plain, cfg.model_copy(update={"loss_scale": "none"}), 3)
    assert loss_scaler_of(opt) is None
    assert torch.equal(master_weights_of(opt).values()["w"], before.float())  # every gradient was 0

    scaled = _Linear(torch.float16)
    opt = _steps(scaled, cfg, 3)
    assert loss_scaler_of(opt).scale == 2.0**16
    master = master_weights_of(opt).values()["w"]
    assert not torch.equal(master, before.float())
    # the gradients carried fp16's 11 bits: Adam's normalized steps agree with fp32's to ~1e-3 of lr
    torch.testing.assert_close(master, ref.w.detach(), rtol=0, atol=3e-6)


def test_overflow_skips_the_step_and_halves_the_scale_then_growth_doubles_it():
    model = _Linear(torch.float16)
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    scaler = loss_scaler_of(opt)
    scaler.growth_interval = 2
    before = model.w.detach().clone()
    model.w.grad = torch.full_like(model.w, float("inf"))
    norm, skipped, *_ = clip_and_step(opt, [model.w], 1.0)
    assert skipped and norm == float("inf") and scaler.scale == 2.0**15
    assert model.w.grad is None and not opt.state and torch.equal(model.w, before)
    for expected in (2.0**15, 2.0**16):
        _backward(model, scaler.scale)
        _, skipped, *_ = clip_and_step(opt, [model.w], 1.0)
        assert not skipped and scaler.scale == expected


def test_the_scale_stops_at_one_and_an_overflow_there_counts_as_non_finite():
    scaler = optim.LossScaler(scale=2.0)
    scaler.update(overflow=True)
    scaler.update(overflow=True)
    assert scaler.scale == 1.0
    model = _Linear(torch.float16)
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    loss_scaler_of(opt).scale = 1.0

    def broken_backward(*_args, **_kw):
        model.w.grad = torch.full_like(model.w, float("inf"))
        return 1.0, 1

    result = _optimizer_step_with(opt, model, broken_backward)
    assert result.skipped and not result.overflow  # the loop counts it toward max_consecutive_nonfinite
    loss_scaler_of(opt).scale = 4.0
    result = _optimizer_step_with(opt, model, broken_backward)
    assert result.skipped and result.overflow and loss_scaler_of(opt).scale == 2.0


def _optimizer_step_with(opt, model, backward):
    real = loop.accumulate_gradients
    loop.accumulate_gradients = backward
    try:
        batch = {"attention_mask": torch.ones(1, 4, dtype=torch.long)}
        return loop.optimizer_step(model, [model.w], [batch], opt, 1.0)
    finally:
        loop.accumulate_gradients = real


def test_fp32_and_bf16_models_are_never_scaled():
    for dtype in (torch.float32, torch.bfloat16):
        assert loss_scaler_of(build_optimizer(_Linear(dtype), OptimConfig(lr=1e-3))) is None


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fp16_run_recovers_from_overflows_without_aborting(tiny_model_dir, tmp_path, monkeypatch, method):
    """Started at 2^24 the scaled gradients overflow fp16 until the scale has come down: those steps are
    skipped with a line each, the scale logged, and the run (max_consecutive_nonfinite 1) goes on."""
    real_init = optim.LossScaler.__init__
    monkeypatch.setattr(
        optim.LossScaler, "__init__", lambda self, scale=2.0**24, growth_interval=2000: real_init(self, scale)
    )
    cfg = load_config(
        write_config(tmp_path, tiny_model_dir),
        [f"method={method}", "model.dtype=fp16", "train.max_steps=16", "train.max_consecutive_nonfinite=1"],
    )
    lines: list[str] = []
    result = loop.run(cfg, log=lines.append)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    overflowed = [r for r in train if r["skipped"]]
    assert overflowed and len(overflowed) == result.skipped_steps < 16
    assert [r["loss_scale"] for r in overflowed] == [2.0**24 / 2**i for i in range(len(overflowed))]
    assert not train[-1]["skipped"] and train[-1]["loss_scale"] == 2.0**24 / 2 ** len(overflowed)
    assert sum("gradients overflowed fp16 at loss scale" in x for x in lines) == len(overflowed)
    assert result.last_loss < result.first_loss


class _Adapted(nn.Module):
    """An fp32 trainable tensor (an adapter) beside a frozen fp16 weight: an fp16 model, no master copy."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(32, 48))
        self.frozen = nn.Parameter(torch.zeros(4, 4, dtype=torch.float16), requires_grad=False)


@pytest.mark.parametrize("kind", ["fp16-weight-with-copy", "fp32-adapter"])
@pytest.mark.parametrize("max_norm", [None, 0.01])  # the gradient's norm is ~0.04
def test_unscaled_clipped_gradients_reach_the_optimizer(kind, max_norm):
    """AdamW's update hardly depends on the gradient's scale, so its first moment is checked: after one
    step it is 0.1 x the gradient the optimizer saw, which must be the fp32 reference's unscaled,
    clipped gradient (to fp16's rounding of the scaled gradient where the weight is fp16)."""
    g = torch.randn(32, 48, generator=torch.Generator().manual_seed(2)) * 1e-3
    ref = nn.Parameter(torch.zeros(32, 48))
    ref.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_([ref], max_norm or float("inf"))
    ref_opt = torch.optim.AdamW([ref], lr=1e-3)
    ref_opt.step()

    cfg = OptimConfig(name="adamw_torch", lr=1e-3)
    if kind == "fp32-adapter":
        model = _Adapted()
        param = model.a
    else:
        model = _Linear(torch.float16)
        model.w.data = torch.zeros(32, 48, dtype=torch.float16)
        param = model.w
    opt = build_optimizer(model, cfg)
    scale = loss_scaler_of(opt).scale
    param.grad = (g * scale).to(param.dtype)
    norm, skipped, *_ = clip_and_step(opt, [param], max_norm)
    assert not skipped
    assert norm == pytest.approx(float(ref_norm), rel=1e-3)
    (state,) = opt.state.values()
    tol = 1e-6 if kind == "fp32-adapter" else 1e-3  # fp16 keeps 11 bits of the scaled gradient
    torch.testing.assert_close(state["exp_avg"], ref_opt.state[ref]["exp_avg"], rtol=tol, atol=1e-12)


def test_fp16_gradient_norms_are_taken_in_fp32():
    """Unscaled (loss_scale none), a large fp16 gradient's norm (78,000) overflows fp16's 65,504: taken
    in fp16 it read as non-finite and skipped a good step."""
    model = _Linear(torch.float16)
    opt = build_optimizer(model, OptimConfig(lr=1e-3, loss_scale="none"))
    model.w.grad = torch.full_like(model.w, 1000.0)
    norm, skipped, *_ = clip_and_step(opt, [model.w], 1.0)
    assert not skipped and norm == pytest.approx(1000.0 * (64 * 96) ** 0.5)


def test_fp16_full_training_without_master_weights_is_refused():
    from fusedtune.trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"optim\.master_weights: false with model\.dtype fp16"):
        load_config(None, ["method=full", "model.dtype=fp16", "optim.master_weights=false"])
    load_config(None, ["method=lora", "model.dtype=fp16", "optim.master_weights=false"])  # fp32 adapters


def test_estimate_measure_counts_only_steps_that_updated(tiny_model_dir, tmp_path, monkeypatch):
    """Started at 2^24 the first fp16 steps overflow and allocate no optimizer state: measure runs on
    until three steps have updated, so the measured optimizer state is the real one."""
    from fusedtune.trainer import estimate as est_mod

    real_init = optim.LossScaler.__init__
    monkeypatch.setattr(optim.LossScaler, "__init__", lambda self, scale=2.0**24, **_: real_init(self, scale))
    cfg = load_config(write_config(tmp_path, tiny_model_dir), ["method=full", "model.dtype=fp16"])
    lines: list[str] = []
    m = est_mod.measure(cfg, steps=3, log=lines.append)
    assert any("not counted" in x for x in lines) and len(m.losses) == 3
    est = est_mod.estimate_for_batches(cfg, m.batches, on_gpu=False)
    assert m.optimizer_state_bytes == est.optimizer_state_bytes > 0
