"""The optimizer over the trainable parameters ONLY, and its learning-rate schedule.

bitsandbytes' 8-bit AdamW is the default: 2 bytes of state per trainable parameter (plus one fp32
absmax per 256-element block for each of the two moments) instead of 8. Frozen parameters are never
handed to the optimizer, so they hold no state at all.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .config import OptimConfig


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad`` (shared ones once)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


HALF_DTYPES = (torch.bfloat16, torch.float16)


def half_precision_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters held in bf16/fp16 (what :class:`MasterWeights` copies)."""
    return [(n, p) for n, p in trainable_parameters(model) if p.dtype in HALF_DTYPES]


def is_fp16(model: nn.Module) -> bool:
    """Whether ``model`` holds fp16 tensors (what :class:`LossScaler` is for)."""
    return any(p.dtype == torch.float16 for p in model.parameters())


class MasterWeights:
    """fp32 copies of the half-precision trainable parameters, which the optimizer updates instead.

    A bf16 weight updated in place loses every step smaller than half its spacing (2^-9 of its size):
    Adam's steps are about lr, so at lr 2e-5 a weight above ~0.01 never moves. Here the optimizer holds
    the fp32 copy; forward and backward still run on the half-precision weight, which is the copy rounded
    after every step. Costs 4 bytes a parameter, and at the step one fp32 gradient at a time: each copy
    gets its gradient converted from the half-precision one (which is then freed) and steps alone.
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.masters = [p.detach().to(torch.float32, copy=True) for p in self.params]

    @classmethod
    def for_model(cls, model: nn.Module, cfg: OptimConfig) -> MasterWeights | None:
        """The copies ``cfg.master_weights`` asks for, or None (off, or no half-precision trainable weight)."""
        half = half_precision_trainable(model)
        return cls(half) if cfg.master_weights and half else None

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.masters)

    def values(self) -> dict[str, torch.Tensor]:
        """The fp32 values by parameter name (what a checkpoint saves in place of the rounded weights)."""
        return dict(zip(self.names, self.masters, strict=True))

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set each copy from ``tensors`` (a checkpoint's: fp32, or the weights' own dtype when it was
        written without copies) and round it into its weight."""
        for name, p, m in zip(self.names, self.params, self.masters, strict=True):
            m.copy_(tensors[name])
            p.copy_(m)

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, factor: float = 1.0) -> None:
        """One optimizer step from the weights' gradients times ``factor`` (a loss scaler's unscaling
        and clipping; 1: already clipped); clears every gradient.

        The optimizer's own fp32 parameters (adapters beside half-precision weights) step first, in one
        call; then each copy in turn, its gradient converted to fp32 before ``factor`` applies. Every
        parameter's state is its own (AdamW: moments and step count), so the result is that of one call
        over all of them. For each copy's call the param groups hold that copy alone (restored after):
        an optimizer walks all its groups every call, which over N copies would cost N² visits.
        """
        copies = {id(m) for m in self.masters}
        groups = optimizer.param_groups
        others = [p for g in groups for p in g["params"] if id(p) not in copies]
        if any(p.grad is not None for p in others):
            if factor != 1.0:
                for p in others:
                    if p.grad is not None:
                        p.grad.mul_(factor)
            optimizer.step()
            for p in others:
                p.grad = None
        kept = [g["params"] for g in groups]
        group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        try:
            for p, m in zip(self.params, self.masters, strict=True):
                if p.grad is None:
                    continue
                m.grad = p.grad.to(torch.float32)
                p.grad = None
                if factor != 1.0:
                    m.grad.mul_(factor)
                for i, g in enumerate(groups):
                    g["params"] = [m] if i == group_of[id(m)] else []
                optimizer.step()
                m.grad = None
                p.copy_(m)
        finally:
            for g, params in zip(groups, kept, strict=True):
                g["params"] = params


class LossScaler:
    """Dynamic loss scaling for fp16 models (``optim.loss_scale: dynamic``), as ``torch.amp.GradScaler``.

    fp16 keeps 5 exponent bits: a gradient below 2^-24 flushes to zero, and an LM's small activation
    gradients do. The loss is multiplied by ``scale`` before backward and every gradient divided by it
    before the optimizer sees it (in fp32 where there is a master copy or an fp32 parameter). A step
    whose gradients overflow is skipped and the scale halved; ``growth_interval`` good steps in a row
    double it. The scale never drops below 1: an overflow there is a genuinely non-finite gradient.
    """

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale, self.growth_interval, self.good_steps = float(scale), growth_interval, 0

    def update(self, overflow: bool) -> None:
        """After a step: halve on overflow, double after ``growth_interval`` good steps."""
        if overflow:
            self.scale, self.good_steps = max(self.scale / 2.0, 1.0), 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale, self.good_steps = self.scale * 2.0, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def loss_scaler_of(optimizer: torch.optim.Optimizer) -> LossScaler | None:
    """The loss scaler :func:`build_optimizer` made for an fp16 model (None: no scaling)."""
    return getattr(optimizer, "fusedtune_loss_scaler", None)


def master_weights_of(optimizer: torch.optim.Optimizer) -> MasterWeights | None:
    """The copies :func:`build_optimizer` made for ``optimizer`` (None: it updates the weights directly)."""
    return getattr(optimizer, "fusedtune_master_weights", None)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (8-bit, paged 8-bit, 32-bit bitsandbytes, or torch) over the trainable parameters.

    Weight decay applies to matrices only; biases and norm weights (1-D tensors) get none. With
    ``cfg.master_weights`` each bf16/fp16 trainable parameter is handed over as its fp32
    :class:`MasterWeights` copy (:func:`master_weights_of`), and an fp16 model gets a :class:`LossScaler`
    (:func:`loss_scaler_of`). Step it through :func:`clip_and_step`: the optimizer's own ``step()`` sees
    only the copies, which get their gradients there, and knows nothing of the loss scale.

    Args:
        model: the adapted model; only parameters with ``requires_grad`` are optimized.
        cfg: the optim section of the config.

    Returns:
        The optimizer.
    """
    if cfg.lr is None:
        raise ValueError("optim.lr is unresolved: build the optimizer from a validated Config's optim")
    masters = MasterWeights.for_model(model, cfg)
    params = trainable_parameters(model)
    if masters is not None:
        copy_of = {id(p): m for p, m in zip(masters.params, masters.masters, strict=True)}
        params = [(n, copy_of.get(id(p), p)) for n, p in params]
    optimizer = _build(params, cfg)
    optimizer.fusedtune_master_weights = masters
    scaled = is_fp16(model) and cfg.loss_scale == "dynamic"
    optimizer.fusedtune_loss_scaler = LossScaler() if scaled else None
    return optimizer


class StepUpdate(NamedTuple):
    """What :func:`clip_and_step` did."""

    grad_norm: float  # before clipping (unscaled)
    skipped: bool  # no update: a non-finite loss or gradient norm
    # skipped for an fp16 overflow at a loss scale above 1 (the scale was halved): expected now and then,
    # not a sign of divergence; at scale 1 there is nothing left to lower and it counts as non-finite
    overflow: bool
    loss_scale: float | None  # the scale this step's gradients carried (None: no loss scaling)


def clip_and_step(
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    max_grad_norm: float | None,
    loss_finite: bool = True,
) -> StepUpdate:
    """Clip the gradients of ``params`` to ``max_grad_norm`` (None: only measure their norm), step unless
    the loss or the norm is not finite, and clear every gradient.

    The norm is taken in fp32 whatever the gradients' dtype (an fp16 gradient's norm overflows fp16 long
    before the gradient does), and the clipping is one factor applied where the gradient is fp32: in
    place, or on the master copy's gradient after the conversion. With a :class:`LossScaler` the
    gradients are the scaled loss's: the norm is reported unscaled, the unscaling joins the factor, and
    the scaler is updated (an overflow halves it).

    Returns:
        The gradient norm, whether the update was skipped and why, and the loss scale.
    """
    clip = max_grad_norm if max_grad_norm is not None else math.inf
    scaler = loss_scaler_of(optimizer)
    scale = 1.0 if scaler is None else scaler.scale
    grads = [p.grad for p in params if p.grad is not None]
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    norms = [n for gs in by_kind.values() for n in torch._foreach_norm(gs, 2.0, dtype=torch.float32)]
    grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) / scale if norms else 0.0
    factor = min(1.0, clip / (grad_norm + 1e-6)) / scale if math.isfinite(grad_norm) else 1.0
    skipped = not (loss_finite and math.isfinite(grad_norm))
    masters = master_weights_of(optimizer)
    if not skipped:
        if masters is None:
            if factor != 1.0:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(factor)
            optimizer.step()
        else:
            masters.step(optimizer, factor)
    overflow = scaler is not None and loss_finite and not math.isfinite(grad_norm)
    if scaler is not None and loss_finite:
        scaler.update(overflow=overflow)
    optimizer.zero_grad(set_to_none=True)
    for p in params:  # the weights behind fp32 copies: the optimizer does not hold them
        p.grad = None
    return StepUpdate(grad_norm, skipped, overflow and scale > 1.0, None if scaler is None else scale)


def _build(params: list[tuple[str, torch.Tensor]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer over ``params`` (the trainable weights, or their fp32 copies)."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.name == "adamw_torch":
        # never the foreach path (torch's CUDA default): its _foreach_sqrt copies every exp_avg_sq at once.
        # CUDA: the fused kernel; elsewhere one tensor at a time (two temporaries of the largest parameter,
        # which trainer estimate counts at the optimizer step)
        on_cuda = all(p.is_cuda for _, p in params)
        return torch.optim.AdamW(groups, **kwargs, foreach=False, fused=on_cuda or None)
    import bitsandbytes as bnb

    cls = {
        "adamw8bit": bnb.optim.AdamW8bit,
        "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
        "adamw32bit": bnb.optim.AdamW32bit,
    }[cfg.name]
    return cls(groups, **kwargs)


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of the peak lr at optimizer step ``s``: linear warmup, then cosine/linear/constant decay."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    floor = cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant" or total_steps <= warmup:
            return 1.0
        # the floor is reached one step after the last (as transformers' schedules): every step updates
        progress = min(1.0, (step - warmup) / (total_steps - warmup))
        if cfg.schedule == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """A ``LambdaLR`` over :func:`lr_lambda`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
