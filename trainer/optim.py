"""The optimizer over the trainable parameters ONLY, and its learning-rate schedule.

bitsandbytes' 8-bit AdamW is the default: 2 bytes of state per trainable parameter (plus one fp32
absmax per 256-element block for each of the two moments) instead of 8. Frozen parameters are never
handed to the optimizer, so they hold no state at all.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad`` (shared ones once)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (8-bit, paged 8-bit, 32-bit bitsandbytes, or torch) over the trainable parameters.

    Weight decay applies to matrices only; biases and norm weights (1-D tensors) get none.

    Args:
        model: the adapted model; only parameters with ``requires_grad`` are optimized.
        cfg: the optim section of the config.

    Returns:
        The optimizer.
    """
    params = trainable_parameters(model)
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if cfg.lr is None:
        raise ValueError("optim.lr is unresolved: build the optimizer from a validated Config's optim")
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
