"""``trainer run``: the recipe, top to bottom, and the training loop it drives.

Loss normalization: an optimizer step sees ``grad_accum`` micro-batches; each contributes
``sum of its token losses / T``, where ``T`` is the number of target tokens across all micro-batches of
the step. So accumulating k micro-batches gives exactly the gradient of one batch k times the size.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import memory
from .adapt import AdaptReport, apply_method
from .checkpoint import save_peft_adapter, save_trainable
from .config import Config
from .data import Datasets, Example, build_datasets, collate, epoch_order, pack
from .errors import UserError
from .evaluate import heldout_loss, task_accuracy
from .metrics import MetricsLog, plot_loss
from .model import load_model, load_tokenizer, resolve_model_path, vocab_size_of
from .optim import build_optimizer, build_scheduler, trainable_parameters


class TrainingDiverged(UserError):
    """Too many optimizer steps in a row were skipped for a non-finite loss or gradient norm."""

    exit_code = 3


def training_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


# ---------------------------------------------------------------------------------------------------
# Loss and one optimizer step
# ---------------------------------------------------------------------------------------------------


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss in a batch (labels are shifted by one for next-token prediction)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _head_at_targets_supported(model: nn.Module) -> bool:
    # The LM head can be applied to the target positions alone when logits are a plain Linear of the
    # decoder's last hidden state (no soft-capping or scaling in between, as in Gemma 2/3).
    cfg = getattr(model, "config", None)
    return (
        hasattr(model, "get_decoder")
        and isinstance(model.get_output_embeddings(), nn.Linear)
        and not getattr(cfg, "final_logit_softcapping", None)
        and getattr(cfg, "logit_scale", None) in (None, 1.0)
    )


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropies over the batch's target tokens (fp32).

    The vocabulary projection runs only at positions that carry loss: with completion-only labels
    most positions are prompt, and the [tokens, vocab] logits are the largest activation of a
    small model (SmolLM2-135M: 49152 x 576 per token, about a fifth of its forward FLOPs).
    """
    targets = batch["labels"][:, 1:]
    if _head_at_targets_supported(model):
        hidden = model.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        keep = targets != -100
        logits = model.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(_at_least_fp32(logits), targets[keep], reduction="sum")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = _at_least_fp32(logits[:, :-1].flatten(0, 1))
    return F.cross_entropy(logits, targets.flatten(), ignore_index=-100, reduction="sum")


@dataclass
class StepResult:
    loss: float  # token-normalized loss of the step
    grad_norm: float
    tokens: int  # non-pad input tokens processed
    targets: int  # target tokens
    skipped: bool


def accumulate_gradients(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Backward every micro-batch's summed token loss divided by the step's total target tokens.

    Returns:
        (the step's token-normalized loss, its number of target tokens).
    """
    total_targets = sum(target_tokens(b) for b in micro_batches)
    if total_targets == 0:
        raise UserError("every label in this optimizer step is masked; nothing to learn from")
    loss_value = 0.0
    for batch in micro_batches:
        loss = loss_sum(model, batch) / total_targets
        loss.backward()
        loss_value += loss.item()
    return loss_value, total_targets


def optimizer_step(
    model: nn.Module,
    params: list[nn.Parameter],
    micro_batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float | None,
) -> StepResult:
    """Accumulate gradients over the micro-batches, clip, and step (or skip).

    A non-finite loss or gradient norm skips the optimizer update; the gradients are dropped.
    """
    loss_value, total_targets = accumulate_gradients(model, micro_batches)
    clip = max_grad_norm if max_grad_norm is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
    return StepResult(loss_value, grad_norm, tokens, total_targets, skipped)


# ---------------------------------------------------------------------------------------------------
# Micro-batch stream
# ---------------------------------------------------------------------------------------------------


def micro_batch_stream(
    examples: list[Example], micro_batch_size: int, seed: int, pad_id: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches: each epoch a fresh deterministic order of ``examples``."""
    epoch = 0
    while True:
        order = epoch_order(len(examples), seed, epoch)
        for start in range(0, len(order), micro_batch_size):
            chunk = [examples[i] for i in order[start : start + micro_batch_size]]
            yield {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        epoch += 1


def total_steps(cfg: Config, n_examples: int) -> int:
    """``train.max_steps``, or the optimizer steps in ``train.epochs`` epochs."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    per_epoch = math.ceil(n_examples / cfg.train.micro_batch_size)
    return max(1, math.ceil(cfg.train.epochs * per_epoch / cfg.train.grad_accum))


# ---------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What a run measured, also written to ``summary.json``."""

    output_dir: str
    steps: int
    skipped_steps: int
    first_loss: float
    last_loss: float
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)
    accounting: dict = field(default_factory=dict)
    adapt: list[str] = field(default_factory=list)


def check_output_dir(cfg: Config) -> Path:
    """Refuse to write into a non-empty directory unless ``overwrite`` is set (before anything runs)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"output_dir: {out} is not empty; choose another output_dir or set overwrite=true")
    probe = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir() or not _writable(probe):
        raise UserError(f"output_dir: {out} is not writable")
    return out


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK | os.X_OK)


def evaluate(model, tokenizer, data: Datasets, cfg: Config, pad_id: int) -> dict:
    """Held-out loss, and task accuracy when the data is a built-in task."""
    result: dict = {}
    if data.eval:
        result["eval_loss"] = heldout_loss(model, data.eval, cfg.train.micro_batch_size, pad_id)
    if data.task is not None and data.eval_rows:
        acc, samples = task_accuracy(model, tokenizer, data.eval_rows, data.task)
        result["accuracy"] = acc
        result["samples"] = samples[:3]
    return result


def _describe_eval(tag: str, ev: dict) -> str:
    parts = []
    if "eval_loss" in ev:
        parts.append(f"held-out loss {ev['eval_loss']:.4f}")
    if "accuracy" in ev:
        parts.append(f"task accuracy {ev['accuracy']:.1%}")
    return f"{tag}: " + (", ".join(parts) if parts else "no held-out data")


def run(cfg: Config, log=print) -> RunResult:
    """Fine-tune as ``cfg`` says and write the run directory.

    Every check that can fail on user input (output dir, model, tokenizer, data) runs before the
    first byte is written to ``output_dir``.

    Raises:
        UserError: bad input anywhere, or a diverged run.
    """
    torch.manual_seed(cfg.train.seed)
    out = check_output_dir(cfg)
    device = training_device()

    # Model path, tokenizer and data first: cheap, and they catch most mistakes.
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model)
    vocab = vocab_size_of(model_path, cfg.model)
    data = build_datasets(cfg.data, tokenizer, vocab)
    train_examples = data.train
    if cfg.data.packing:
        train_examples = pack(train_examples, cfg.data.max_seq_len, tokenizer.eos_token_id)
    pad_id = tokenizer.pad_token_id
    log(f"data: {len(train_examples)} training examples, {len(data.eval)} held-out ({data.format})")
    for stats in (data.train_stats, data.eval_stats):
        if stats.truncated or stats.dropped_overlength or stats.dropped_no_targets:
            log(f"data: {stats.describe()}")

    # Model, adapters, optimizer.
    load_device = torch.device("cpu") if cfg.method == "qlora" else device
    model, dtype = load_model(model_path, cfg.model, device, load_device)
    report: AdaptReport = apply_method(model, cfg, device)
    for line in report.lines():
        log(line)
    model.train()
    params = [p for _, p in trainable_parameters(model)]
    optimizer = build_optimizer(model, cfg.optim)
    steps = total_steps(cfg, len(train_examples))
    scheduler = build_scheduler(optimizer, cfg.optim, steps)

    # Everything validated: now the run directory is ours.
    if out.exists():
        for name in ("adapter_model.safetensors", "adapter_config.json", "trainable.safetensors"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    metrics = MetricsLog(out / "metrics.jsonl")

    eval_before = evaluate(model, tokenizer, data, cfg, pad_id)
    log(_describe_eval("before", eval_before))
    metrics.write({"kind": "eval", "step": 0, **{k: v for k, v in eval_before.items() if k != "samples"}})

    stream = micro_batch_stream(train_examples, cfg.train.micro_batch_size, cfg.train.seed, pad_id, device)
    losses: list[float] = []
    skipped = consecutive = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = _progress(steps, cfg.train.progress)
    t_start = time.perf_counter()
    window_tokens, window_t0 = 0, t_start
    for step in range(1, steps + 1):
        micro = [next(stream) for _ in range(cfg.train.grad_accum)]
        result = optimizer_step(model, params, micro, optimizer, cfg.optim.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        window_tokens += result.tokens
        if result.skipped:
            skipped += 1
            consecutive += 1
            log(f"step {step}: non-finite loss {result.loss} or grad norm {result.grad_norm}; update skipped")
            if consecutive >= cfg.train.max_consecutive_nonfinite:
                metrics.close()
                raise TrainingDiverged(
                    f"train.max_consecutive_nonfinite: {consecutive} optimizer steps in a row had a non-finite "
                    "loss or gradient norm; aborting (lower optim.lr, or check the data)"
                )
        else:
            consecutive = 0
            losses.append(result.loss)
        if step % cfg.train.log_every == 0 or step == steps:
            now = time.perf_counter()
            tok_s = window_tokens / max(now - window_t0, 1e-9)
            window_tokens, window_t0 = 0, now
            record = {
                "kind": "train",
                "step": step,
                "loss": result.loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "tokens_per_s": tok_s,
                "peak_memory_bytes": memory.peak_memory_bytes(device),
                "skipped": result.skipped,
                "elapsed_s": now - t_start,
            }
            metrics.write(record)
            if bar is not None:
                bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tok_s:.0f}")
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != steps and data.eval:
            ev = {"eval_loss": heldout_loss(model, data.eval, cfg.train.micro_batch_size, pad_id)}
            metrics.write({"kind": "eval", "step": step, **ev})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t_start

    eval_after = evaluate(model, tokenizer, data, cfg, pad_id)
    log(_describe_eval("after", eval_after))
    metrics.write({"kind": "eval", "step": steps, **{k: v for k, v in eval_after.items() if k != "samples"}})
    metrics.close()

    # Outputs.
    if cfg.method in ("lora", "qlora"):
        save_peft_adapter(model, cfg, model_path, out)
    else:
        save_trainable(model, out / "trainable.safetensors")
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    acc = memory.param_accounting(model)
    state_bytes = memory.optimizer_state_bytes(optimizer)
    accounting = {
        "trainable_params": acc.trainable_params,
        "trainable_bytes": acc.trainable_bytes,
        "frozen_params": acc.frozen_params,
        "frozen_bytes": acc.frozen_bytes,
        "frozen_by_format": memory.frozen_bytes_by_format(model),
        "gradient_bytes": sum(p.numel() * p.element_size() for p in params),
        "optimizer_state_bytes": state_bytes,
        "peak_memory_bytes": memory.peak_memory_bytes(device),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "train_seconds": train_seconds,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    result = RunResult(
        output_dir=str(out),
        steps=steps,
        skipped_steps=skipped,
        first_loss=losses[0] if losses else math.nan,
        last_loss=losses[-1] if losses else math.nan,
        eval_before=eval_before,
        eval_after=eval_after,
        accounting=accounting,
        adapt=report.lines(),
    )
    (out / "summary.json").write_text(json.dumps(result.__dict__, indent=2, default=str))
    for line in summary_lines(result):
        log(line)
    return result


def summary_lines(result: RunResult) -> list[str]:
    """The final summary: parameters, bytes, optimizer state, peak memory, before/after."""
    a = result.accounting
    fb = memory.fmt_bytes
    total = a["trainable_params"] + a["frozen_params"]
    return [
        f"done: {result.steps} steps in {a['train_seconds']:.1f} s on {a['device']} ({a['dtype']}); "
        f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
        + (f"; {result.skipped_steps} steps skipped (non-finite)" if result.skipped_steps else ""),
        f"parameters: {a['trainable_params']:,} trainable ({fb(a['trainable_bytes'])}), "
        f"{a['frozen_params']:,} frozen ({fb(a['frozen_bytes'])}); "
        f"{100 * a['trainable_params'] / max(total, 1):.2f}% trainable",
        *memory.measured_breakdown_lines(a),
        _describe_eval("before", result.eval_before) + " | " + _describe_eval("after", result.eval_after),
        f"outputs in {result.output_dir}/",
    ]


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
