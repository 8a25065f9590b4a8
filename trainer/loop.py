"""``trainer run``: the recipe, top to bottom, and the training loop it drives.

Loss normalization: an optimizer step sees ``grad_accum`` micro-batches; each contributes
``sum of its token losses / T``, where ``T`` is the number of target tokens across all micro-batches of
the step. So accumulating k micro-batches gives exactly the gradient of one batch k times the size.

Checkpoints are written at optimizer-step boundaries (every ``train.save_every`` steps, at the end, and
when a SIGTERM/SIGINT asks the run to stop). They hold everything the rest of the run depends on, so a
resumed run is bit-identical to one that never stopped: the data position is (epoch, offset within the
epoch's fixed order), which need not be aligned with an accumulation group or an epoch start.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import memory
from .adapt import AdaptReport, apply_method
from .checkpoint import (
    CHECKPOINTS,
    LR_SCHEDULE_VERSION,
    Checkpoint,
    CheckpointError,
    checkpoint_root,
    checkpoints_after,
    config_differences,
    latest_checkpoint,
    read_checkpoint,
    remove_checkpoints,
    restore_trainable,
    save_checkpoint,
    save_peft_adapter,
    save_trainable,
    set_rng_state,
)
from .config import Config
from .data import IGNORE_INDEX, Datasets, Example, build_datasets, collate, epoch_order, pack
from .errors import ConfigError, ModelError, UserError
from .evaluate import heldout_loss, task_accuracy
from .loss import loss_sum, target_tokens
from .metrics import MetricsError, MetricsLog, plot_loss
from .model import (
    BASE_LAYOUT_FILE,
    base_difference,
    base_record,
    load_model,
    load_tokenizer,
    resolve_model_path,
    vocab_size_of,
)
from .optim import (
    build_optimizer,
    build_scheduler,
    clip_and_step,
    half_precision_trainable,
    is_fp16,
    loss_scaler_of,
    master_weights_of,
    trainable_parameters,
)
from .patches import apply_patches


class TrainingDiverged(UserError):
    """Too many optimizer steps in a row were skipped for a non-finite loss or gradient norm."""

    exit_code = 3


class OutOfMemory(UserError):
    """The device ran out of memory; the message carries the memory breakdown and what to change."""

    exit_code = 4


def lr_warning(cfg: Config) -> str | None:
    """A line when a full/partial run takes an adapter-sized learning rate (it usually diverges)."""
    from .config import DEFAULT_LR

    if cfg.method in ("full", "partial") and cfg.optim.lr >= 1e-4:
        return (
            f"optim.lr {cfg.optim.lr:g} is large for method {cfg.method} (the model's own weights train, not adapters; "
            f"1e-5 to 5e-5 is usual, the default for full/partial is {DEFAULT_LR['full']:g})"
        )
    return None


# The sections each method reads (lora: targets and rank; quant: the frozen weights' format).
_METHOD_SECTIONS = {"lora": {"lora"}, "qlora": {"lora", "quant"}, "full": set(), "partial": {"partial"}}


def unused_sections_note(cfg: Config) -> str | None:
    """A line naming the keys given non-default values in sections this method never reads (``quant.*``
    under ``method: lora`` is usually a forgotten ``method: qlora``), which the run would otherwise
    ignore without a word."""
    keys = [  # the keys given a value other than the schema's default (a resolved config.yaml has all)
        f"{section}.{key}"
        for section in ("lora", "quant", "partial")
        if section not in _METHOD_SECTIONS[cfg.method]
        for key, field in type(getattr(cfg, section)).model_fields.items()
        if getattr(getattr(cfg, section), key) != field.get_default(call_default_factory=True)
    ]
    data = cfg.data
    task_only = [
        f"data.{key}"
        for key in ("num_train", "num_eval")
        if data is not None
        and data.task is None
        and getattr(data, key) != type(data).model_fields[key].get_default()
    ]
    notes = []
    if keys:
        notes.append(f"{', '.join(keys)} set, but method {cfg.method} does not use them")
    if task_only:
        notes.append(f"{', '.join(task_only)} set, but with data.train (a file) every row is used")
    return f"config: {'; '.join(notes)} (ignored)" if notes else None


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


@dataclass
class StepResult:
    loss: float  # token-normalized loss of the step
    grad_norm: float
    tokens: int  # non-pad input tokens processed
    targets: int  # target tokens
    skipped: bool
    overflow: bool = False  # skipped for an fp16 overflow (optim.StepUpdate)
    loss_scale: float | None = None  # fp16 loss scaling: the scale this step's gradients carried


def accumulate_gradients(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    backend: str = "torch",
    meter: memory.SavedTensorMeter | None = None,
    loss_scale: float = 1.0,
) -> tuple[float, int]:
    """Backward every micro-batch's summed token loss divided by the step's total target tokens.

    Args:
        meter: counts what each micro-batch's forward saves for backward (the run summary's numbers).
        loss_scale: fp16 loss scaling (:class:`~.optim.LossScaler`): the gradients are of the loss times
            this; the returned loss is not.

    Returns:
        (the step's token-normalized loss, its number of target tokens).
    """
    total_targets = sum(target_tokens(b) for b in micro_batches)
    if total_targets == 0:
        raise UserError("every label in this optimizer step is masked; nothing to learn from")
    loss_value = 0.0
    for batch in micro_batches:
        with meter.micro_batch(batch) if meter is not None else contextlib.nullcontext():
            loss = loss_sum(model, batch, backend) / total_targets
        (loss * loss_scale if loss_scale != 1.0 else loss).backward()
        loss_value += loss.item()
    return loss_value, total_targets


def optimizer_step(
    model: nn.Module,
    params: list[nn.Parameter],
    micro_batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float | None,
    backend: str = "torch",
    meter: memory.SavedTensorMeter | None = None,
) -> StepResult:
    """Accumulate gradients over the micro-batches, clip, and step (or skip).

    A non-finite loss or gradient norm skips the optimizer update; the gradients are dropped.
    """
    scaler = loss_scaler_of(optimizer)
    scale = 1.0 if scaler is None else scaler.scale
    loss_value, total_targets = accumulate_gradients(model, micro_batches, backend, meter, scale)
    update = clip_and_step(optimizer, params, max_grad_norm, math.isfinite(loss_value))
    tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
    return StepResult(
        loss_value,
        update.grad_norm,
        tokens,
        total_targets,
        update.skipped,
        update.overflow,
        update.loss_scale,
    )


# ---------------------------------------------------------------------------------------------------
# Micro-batch stream
# ---------------------------------------------------------------------------------------------------


class MicroBatchStream:
    """Endless micro-batches: each epoch a fresh deterministic order of ``examples``, resumable.

    The position is (``epoch``, ``offset``): the next micro-batch starts at ``offset`` in epoch
    ``epoch``'s order (:func:`epoch_order`, fixed by seed and epoch). The last micro-batch of an epoch
    may be short; the next epoch starts a fresh micro-batch.
    """

    def __init__(
        self,
        examples: list[Example],
        micro_batch_size: int,
        seed: int,
        pad_id: int,
        device: torch.device,
        epoch: int = 0,
        offset: int = 0,
    ) -> None:
        self.examples, self.micro_batch_size, self.seed = examples, micro_batch_size, seed
        self.pad_id, self.device = pad_id, device
        self.epoch, self.offset = epoch, offset
        self._order_epoch, self._order = -1, []

    def position(self) -> dict:
        """Where the next micro-batch starts (what a checkpoint stores)."""
        return {"epoch": self.epoch, "offset": self.offset, "examples": len(self.examples)}

    def __iter__(self) -> MicroBatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.offset >= len(self.examples):
            self.epoch, self.offset = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order_epoch, self._order = (
                self.epoch,
                epoch_order(len(self.examples), self.seed, self.epoch),
            )
        ids = self._order[self.offset : self.offset + self.micro_batch_size]
        self.offset += len(ids)
        chunk = [self.examples[i] for i in ids]
        return {k: v.to(self.device) for k, v in collate(chunk, self.pad_id).items()}


def micro_batch_stream(
    examples: list[Example], micro_batch_size: int, seed: int, pad_id: int, device: torch.device
) -> MicroBatchStream:
    """A :class:`MicroBatchStream` from the start of epoch 0."""
    return MicroBatchStream(examples, micro_batch_size, seed, pad_id, device)


def data_fingerprint(examples: list[Example]) -> str:
    """A hash of the training examples' token ids and labels, in order (a resume checks it)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(array.array("q", e.input_ids).tobytes())
        h.update(array.array("q", e.labels).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def total_steps(cfg: Config, n_examples: int) -> int:
    """``train.max_steps``, or the optimizer steps in ``train.epochs`` epochs."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(_epoch_micro_batches(cfg, n_examples) / cfg.train.grad_accum))


def _epoch_micro_batches(cfg: Config, n_examples: int) -> int:
    return max(1, math.ceil(cfg.train.epochs * math.ceil(n_examples / cfg.train.micro_batch_size)))


def micro_batches_in_step(cfg: Config, n_examples: int, step: int) -> int:
    """``train.grad_accum``, except that the last step of a run by epochs takes only the micro-batches left
    in its last epoch (the loss is normalized by the step's target tokens, so a shorter step is exact):
    ``epochs: 1`` sees each example once, whatever the accumulation."""
    if cfg.train.max_steps is not None:
        return cfg.train.grad_accum
    left = _epoch_micro_batches(cfg, n_examples) - (step - 1) * cfg.train.grad_accum
    return max(1, min(cfg.train.grad_accum, left))


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
    resumed_from: str | None = None  # the checkpoint this run continued from
    stopped: bool = False  # stopped early on request (SIGTERM/SIGINT): resume to finish
    checkpoint: str | None = None  # the last checkpoint written


# What a run directory holds from its first step (config.yaml and metrics.jsonl are written before training).
_RUN_MARKERS = ("config.yaml", "metrics.jsonl", CHECKPOINTS)


# What a resume reads from a checkpoint's state beside save_checkpoint's own fields (write_checkpoint)
RESUME_STATE = {"config": dict, "data": dict, "data_fingerprint": str, "metrics_bytes": int}


def check_output_dir(cfg: Config, resuming: bool = False) -> Path:
    """Refuse to write into a non-empty directory unless ``overwrite`` is set or the run resumes from a
    checkpoint in it (before anything runs)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: {out} exists and is not a directory")
    non_empty = out.is_dir() and any(out.iterdir())
    if non_empty and not (cfg.overwrite or resuming):
        raise UserError(
            f"output_dir: {out} is not empty; choose another output_dir, set overwrite=true, "
            "or resume=auto to continue its run"
        )
    if non_empty and not any((out / n).exists() for n in _RUN_MARKERS):
        # overwrite replaces an earlier run, not a folder of other things (`output_dir=~` is $HOME)
        raise UserError(
            f"output_dir: {out} is not empty and holds no earlier run (none of {', '.join(_RUN_MARKERS)}); "
            "overwrite replaces a run's outputs only: choose a new or empty output_dir"
        )
    probe = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise UserError(f"output_dir: {out} cannot be created: {probe} is not a directory")
    if (why := _cannot_write(out)) is not None:
        raise UserError(f"output_dir: {out} is not writable ({why})")
    return out


def _cannot_write(out: Path) -> str | None:
    """Why a file cannot be written in ``out`` (None: it can), found by trying: creating the missing
    folders and a file, all removed again. ``os.access`` answers yes to root everywhere, /proc and /sys too."""
    created: list[Path] = []
    out = Path(os.path.abspath(out))  # `a/../b`: `a` need not exist
    try:
        for folder in reversed([p for p in (out, *out.parents) if not p.exists()]):
            folder.mkdir()
            created.append(folder)
        fd, name = tempfile.mkstemp(dir=out, prefix=".fusedtune-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return e.strerror or str(e)
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
    return None


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


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU and CUDA) generators: a fresh run is reproducible."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def find_resume_checkpoint(cfg: Config, log=print) -> Checkpoint | None:
    """The checkpoint ``cfg.resume`` names (verified), or ``None`` for a fresh run.

    ``auto`` takes the newest valid checkpoint in ``output_dir/checkpoints``; checkpoints with a missing
    or mismatching manifest (interrupted writes) are skipped with a message. With none to take, the run
    starts fresh, but only in an empty (or new) ``output_dir`` or with ``overwrite``.

    Raises:
        CheckpointError: a path that is not a usable checkpoint; one whose config differs from ``cfg`` in
            keys that change the math (unless ``resume_allow_config_changes``) or in ``optim.name``; a
            checkpoint of ``output_dir`` with later checkpoints beside it (another continuation of the
            run); ``resume=auto`` with nothing to resume in a non-empty ``output_dir``.
    """
    if cfg.resume is None:
        return None
    root = checkpoint_root(cfg.output_dir)
    if cfg.resume == "auto":
        skipped: list[tuple[Path, str]] = []
        path = latest_checkpoint(root, log, skipped)
        if path is None:
            _check_fresh_start_after_auto(cfg, root, skipped)
            log(f"resume: auto: no checkpoint in {root}; starting fresh")
            return None
    else:
        path = Path(cfg.resume)
    ckpt = read_checkpoint(path, RESUME_STATE)
    saved_optimizer = ckpt.state["config"].get("optim", {}).get("name")
    if saved_optimizer is not None and saved_optimizer != cfg.optim.name:
        raise CheckpointError(
            f"optim.name: {ckpt.path} holds {saved_optimizer} optimizer state, which {cfg.optim.name} cannot "
            f"continue from (resume_allow_config_changes does not cover a change of optimizer); resume with "
            f"optim.name={saved_optimizer}, or start a fresh run in another output_dir"
        )
    if cfg.resume != "auto" and ckpt.path.resolve().parent == root.resolve():
        later = checkpoints_after(root, ckpt.step)
        if later:
            names = ", ".join(p.name for p in later[:3]) + (
                f" (+{len(later) - 3} more)" if len(later) > 3 else ""
            )
            raise CheckpointError(
                f"resume: {root} also holds checkpoints after {ckpt.path.name}: {names}, from a run that went "
                f"on past it; resuming {ckpt.path.name} there would mix the two runs' checkpoints (rotation "
                "and resume=auto go by step number); move those out of the way first, or resume into a new "
                "output_dir, or set resume=auto to continue from the newest"
            )
    diffs = config_differences(ckpt.state["config"], cfg.model_dump(mode="json"))
    if diffs and not cfg.resume_allow_config_changes:
        more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise CheckpointError(
            f"resume: {ckpt.path} was written with a different config: {'; '.join(diffs[:3])}{more}; "
            "restore those keys, or set resume_allow_config_changes=true to continue anyway"
        )
    for d in diffs:
        log(f"resume: config differs from the checkpoint's (allowed): {d}")
    if ckpt.state.get("lr_schedule", 1) != LR_SCHEDULE_VERSION and cfg.optim.schedule != "constant":
        log(
            f"resume: {ckpt.path} was written by an earlier fusedtune, whose {cfg.optim.schedule} schedule "
            "reached its floor at the last step; the remaining steps follow today's, which reaches it one "
            "step after the last (the lr of the resumed steps is a little higher than that run's would be)"
        )
    return ckpt


def _check_fresh_start_after_auto(cfg: Config, root: Path, skipped: list[tuple[Path, str]]) -> None:
    """``resume=auto`` found nothing to resume: a fresh start needs an empty output_dir or ``overwrite``."""
    out = Path(cfg.output_dir)
    if cfg.overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    if skipped:
        first = f"{skipped[0][0].name}: {skipped[0][1]}"
        more = f" (+{len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise CheckpointError(
            f"resume: auto: no usable checkpoint in {root} ({first}{more}), so the run in {out} cannot be "
            "continued; set overwrite=true to start it over there (the unusable checkpoints are deleted), "
            "or choose another output_dir"
        )
    raise CheckpointError(
        f"resume: auto: {out} is not empty and holds no checkpoint to continue from; set overwrite=true to "
        "start over there, or choose another output_dir"
    )


def _expand_paths(cfg: Config) -> Config:
    """``output_dir`` and a ``resume`` path with ``~`` expanded (as model and data paths are)."""
    update = {}
    if cfg.output_dir.startswith("~"):
        update["output_dir"] = str(Path(cfg.output_dir).expanduser())
    if cfg.resume is not None and cfg.resume.startswith("~"):
        update["resume"] = str(Path(cfg.resume).expanduser())
    return cfg.model_copy(update=update) if update else cfg


def restore_optimizer(optimizer: torch.optim.Optimizer, scheduler, ckpt: Checkpoint) -> list[str]:
    """Load the checkpoint's optimizer and scheduler state, then take this config's hyperparameters.

    The state (moments, step counts) and the schedule's position come from the checkpoint; the peak
    learning rate, betas, eps and weight decay of each parameter group, and the schedule's shape (the
    scheduler's lambda), are the ones ``optimizer`` and ``scheduler`` were built with from the current
    config. Unchanged, these are the saved values, so a plain resume stays bit-identical; changed (an
    allowed config change), the change takes effect from the first resumed step.

    Returns:
        The hyperparameters whose saved values were replaced (``lr``, ``weight_decay`` ...).
    """
    built = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt.optimizer_state())
    scheduler.load_state_dict(ckpt.scheduler_state())
    changed: set[str] = set()
    for group, new in zip(optimizer.param_groups, built, strict=True):
        for key, value in new.items():
            if key == "lr":
                continue
            if key == "initial_lr":
                key = "lr"  # the peak lr, which the schedule scales
                value = new["initial_lr"]
                if group.get("initial_lr") != value:
                    changed.add(key)
                group["initial_lr"] = value
                continue
            if group.get(key) != value:
                changed.add(key)
            group[key] = value
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, factor, base in zip(optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs):
        group["lr"] = base * factor(scheduler.last_epoch)  # what LambdaLR.step() sets
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return sorted(changed)


# What a run writes at its end (the weights first), and what a run that takes a directory over removes.
_WEIGHT_OUTPUTS = ("adapter_model.safetensors", "trainable.safetensors")
_END_OUTPUTS = (*_WEIGHT_OUTPUTS, "adapter_config.json", "summary.json")


def missing_eos_note(tokenizer, fmt: str) -> str | None:
    """A tokenizer without an EOS token leaves text and (template-less) alpaca examples without an end:
    the model is never shown where to stop, and packed examples run into each other."""
    if (
        tokenizer.eos_token_id is not None
        or fmt == "messages"
        or (fmt == "alpaca" and tokenizer.chat_template)
    ):
        return None
    return (
        f"tokenizer: no EOS token, so the {fmt} examples end without one and the model is not taught where to "
        "stop (set eos_token in the tokenizer's config)"
    )


def data_loss_lines(data) -> list[str]:
    """``data: train: N rows, K truncated ...`` for each split that lost rows or tokens on the way."""
    return [
        f"data: {split}: {stats.describe()}"
        for split, stats in (("train", data.train_stats), ("eval", data.eval_stats))
        if stats.truncated or stats.dropped_overlength or stats.dropped_no_targets
    ]


def half_precision_lines(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """How bf16/fp16 trainable weights are updated: through fp32 copies (``optim.master_weights``), or in
    their own dtype, where a step smaller than half the spacing between neighbouring values (2^-9 of a
    bf16 weight's size) rounds to nothing. Said either way, with the cost or the fix. An fp16 model also
    gets a line on its loss scaling (``optim.loss_scale``)."""
    lines = []
    scaler = loss_scaler_of(optimizer)
    if scaler is not None:
        lines.append(
            f"model.dtype fp16: the loss is scaled ({scaler.scale:g} at first, optim.loss_scale dynamic) so "
            "small gradients do not flush to zero; a step whose gradients overflow is skipped and the scale "
            "halved; use bf16 where the GPU supports it"
        )
    elif is_fp16(model):
        lines.append(
            "model.dtype fp16 with optim.loss_scale none: gradients below 2^-24 flush to zero; "
            "optim.loss_scale=dynamic scales the loss, or use bf16 where the GPU supports it"
        )
    masters = master_weights_of(optimizer)
    half = masters.params if masters is not None else [p for _, p in half_precision_trainable(model)]
    if not half:
        return lines
    name = memory.dtype_label(half[0].dtype)
    if masters is not None:
        lines.append(
            f"optim.master_weights: the optimizer updates fp32 copies of the {len(half)} {name} trainable "
            f"tensors ({memory.fmt_bytes(masters.nbytes)}); the model runs on them rounded to {name}"
        )
    else:
        lines.append(
            f"optim.master_weights false: {len(half)} trainable tensors are {name} and are updated in {name}: "
            f"an update smaller than half a {name} step of a weight rounds away (Adam's steps move a weight "
            "by about lr); optim.master_weights=true keeps every update, at 4 bytes a parameter"
        )
    return lines


# Where configs state their context: Llama-style, GPT-2's, and names remote-code models use.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def check_context_length(model: torch.nn.Module, longest: int) -> str | None:
    """Refuse examples longer than a model's learned position embeddings (they index past its table:
    OPT, GPT-2); for other models (rotary), a note when they are longer than its stated context.

    Raises:
        ConfigError: naming ``data.max_seq_len``.
    """
    config = model.config.get_text_config()
    n_pos = next((v for k in _CONTEXT_KEYS if isinstance(v := getattr(config, k, None), int) and v > 0), None)
    if n_pos is None:
        return None
    tokens = model.get_input_embeddings()
    learned = [  # the text model's tables only (a vision tower's may happen to have n_pos rows)
        (name, n_pos if m.padding_idx is None else min(n_pos, m.num_embeddings - m.padding_idx - 1))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Embedding)
        and m is not tokens
        and n_pos <= m.num_embeddings <= n_pos + 2
        and not any(w in name for w in ("vision", "visual", "image", "audio"))
    ]
    if learned:  # RoBERTa's table starts after padding_idx: two positions fewer
        name, usable = learned[0]
        if longest > usable:
            raise ConfigError(
                f"data.max_seq_len: examples of up to {longest} tokens, but the model's learned position "
                f"embeddings ({name}) cover {usable} positions; set data.max_seq_len <= {usable}"
            )
        return None
    if longest <= n_pos:
        return None
    return (
        f"data: examples of up to {longest} tokens are longer than the model's context "
        f"(max_position_embeddings {n_pos}): positions past it are extrapolated"
    )


def _remove_outputs(out: Path) -> None:
    """An earlier run's outputs and checkpoints in ``out`` (``overwrite=true``); its log is rewritten."""
    for name in _END_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    remove_checkpoints(checkpoint_root(out))


def packing_line(examples: int, sequences: int, max_seq_len: int) -> str:
    """What ``data.packing`` did, and what it costs."""
    return (
        f"data.packing: {examples} examples in {sequences} sequences of at most {max_seq_len} tokens, whole "
        "examples each; attention and positions run on across the examples of a sequence "
        "(train.padding_free alone skips padding and keeps attention within each example)"
    )


def _resumed_base_changed(model: nn.Module, model_path: str, ckpt, cfg: Config, log) -> bool:
    """Whether the base model loaded to resume ``ckpt`` differs from the one its run recorded
    (``base_model.json`` beside its ``checkpoints/``): refused unless ``resume_allow_config_changes``,
    as changed data are. A run from before the record has nothing to compare."""
    record = ckpt.path.parent.parent / BASE_LAYOUT_FILE
    try:
        diff = base_difference(json.loads(record.read_text()), model)
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log(f"resume: {record} is unreadable ({e!r}); the base model is not compared")
        return False
    if diff is None:
        return False
    if not cfg.resume_allow_config_changes:
        raise CheckpointError(
            f"resume: {model_path} is not the base model {ckpt.path} was trained on ({diff}); restore it, "
            "or set resume_allow_config_changes=true"
        )
    log(f"resume: the base model differs from the one {ckpt.path} was trained on (allowed): {diff}")
    return True


def _finished_run(out: Path, ckpt: Checkpoint, steps: int) -> RunResult | None:
    """The run's ``summary.json`` as a result, when the run that wrote it ended with ``ckpt``.

    That run's last checkpoint has ``ckpt``'s name and the same losses and skip count (a summary left by
    another continuation of the run, killed before it wrote its own, does not match).
    """
    if not any((out / name).is_file() for name in _WEIGHT_OUTPUTS):
        return None  # killed after its last checkpoint, before its outputs: finish it
    try:
        summary = json.loads((out / "summary.json").read_text())
        names = {f.name for f in dataclasses.fields(RunResult)}
        result = RunResult(**{k: v for k, v in summary.items() if k in names})
        summary_lines(result)  # every field it shows is there
    except (OSError, ValueError, TypeError, KeyError):
        return None
    result.first_loss, result.last_loss = _nan(result.first_loss), _nan(result.last_loss)
    st = ckpt.state
    same = (
        not result.stopped
        and result.steps == steps
        and result.checkpoint is not None
        and Path(result.checkpoint).name == ckpt.path.name
        and result.skipped_steps == st["skipped_steps"]
        and _same_float(result.first_loss, _nan(st["first_loss"]))
        and _same_float(result.last_loss, _nan(st["last_loss"]))
    )
    if not same:
        return None
    result.output_dir = str(out)  # where it is now (the directory may have been moved or copied)
    return result


def _same_float(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _metrics_up_to(ckpt: Checkpoint) -> bytes:
    """The records its run had logged when ``ckpt`` was written, from that run's ``metrics.jsonl``.

    Empty when the checkpoint is not in a run directory's ``checkpoints/`` or the file no longer has them.
    """
    size = int(ckpt.state.get("metrics_bytes", 0))
    path = ckpt.path.resolve()  # a symlink to the checkpoint: its run is where it really is
    source = path.parent.parent / "metrics.jsonl"
    if path.parent.name != CHECKPOINTS or size <= 0 or not source.is_file():
        return b""
    with open(source, "rb") as f:
        data = f.read(size)
    return data if len(data) == size and data.endswith(b"\n") else b""


def _check_tokenizer_fits(tokenizer, vocab: int, path: str) -> None:
    if len(tokenizer) > vocab:
        raise ModelError(
            f"model.name_or_path: the tokenizer of {path} has {len(tokenizer)} tokens but the model's "
            f"embedding has {vocab} rows (tokenizer and model do not match)"
        )


def out_of_memory_message(model: nn.Module, optimizer, cfg: Config, device: torch.device) -> str:
    """One line: what holds the memory, and the config keys that lower it."""
    acc = memory.param_accounting(model)
    fb = memory.fmt_bytes
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = memory.optimizer_state_bytes(optimizer) if optimizer is not None else 0
    if optimizer is not None:
        masters = master_weights_of(optimizer)
        copies = 0 if masters is None else masters.nbytes
    else:  # out of memory while the optimizer was built: making the fp32 copies is what allocates
        half = half_precision_trainable(model) if cfg.optim.master_weights else []
        copies = sum(4 * p.numel() for _, p in half)
    peak = memory.peak_memory_bytes(device)
    fixes = [
        f"train.micro_batch_size={max(1, cfg.train.micro_batch_size // 2)} with "
        f"train.grad_accum={cfg.train.grad_accum * 2} (same effective batch)",
        f"data.max_seq_len={max(8, cfg.data.max_seq_len // 2)}",
    ]
    if not cfg.model.gradient_checkpointing:
        fixes.append("model.gradient_checkpointing=true")
    if cfg.method in ("lora", "full", "partial"):
        fixes.append("method=qlora" if cfg.method == "lora" else "method=lora")
    if cfg.optim.name in ("adamw32bit", "adamw_torch"):
        fixes.append("optim.name=adamw8bit")
    if copies and cfg.model.dtype != "fp16":  # fp16 needs them (config._method_needs)
        fixes.append("optim.master_weights=false")
    return (
        f"out of memory on {device} (micro-batch {cfg.train.micro_batch_size} x {cfg.data.max_seq_len} "
        f"tokens): weights {fb(acc.trainable_bytes)} trainable + {fb(acc.frozen_bytes)} frozen, "
        f"gradients {fb(grads)}, optimizer state {fb(state)}"
        + (f", fp32 master weights {fb(copies)}" if copies else "")
        + f", peak {fb(peak)}; "
        f"the rest is activations. Try: {', '.join(fixes)}"
    )


def run(cfg: Config, log=print, should_stop: Callable[[int], bool] | None = None) -> RunResult:
    """Fine-tune as ``cfg`` says and write the run directory.

    Every check that can fail on user input (output dir, resume checkpoint, model, tokenizer, data)
    runs before the first byte is written to ``output_dir``.

    Args:
        cfg: the resolved config.
        log: where progress lines go.
        should_stop: asked after every optimizer step with the step number; ``True`` writes a checkpoint
            and returns early (``RunResult.stopped``). The CLI wires SIGTERM/SIGINT to it.

    Raises:
        UserError: bad input anywhere, a checkpoint that cannot be used or written, out of memory, or a
            diverged run.
    """
    cfg = _expand_paths(cfg)
    seed_everything(cfg.train.seed)
    ckpt = find_resume_checkpoint(cfg, log)
    inside = ckpt is not None and checkpoint_root(cfg.output_dir).resolve() in ckpt.path.resolve().parents
    out = check_output_dir(cfg, resuming=inside)
    device = training_device()

    # Model path, tokenizer and data first: cheap, and they catch most mistakes.
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model)
    vocab = vocab_size_of(model_path, cfg.model)
    _check_tokenizer_fits(tokenizer, vocab, model_path)
    data = build_datasets(cfg.data, tokenizer, vocab)
    train_examples = data.train
    if cfg.data.packing:
        train_examples = pack(train_examples, cfg.data.max_seq_len, tokenizer.eos_token_id)
        log(packing_line(len(data.train), len(train_examples), cfg.data.max_seq_len))
    pad_id = tokenizer.pad_token_id
    n = len(train_examples)
    tokens = sum(len(e.input_ids) for e in train_examples)
    targets = sum(sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in train_examples)
    log(
        f"data: {n} training example{'' if n == 1 else 's'} ({tokens:,} tokens, {targets:,} of them carrying loss), "
        f"{len(data.eval)} held-out ({data.format})"
    )
    for line in data_loss_lines(data):
        log(line)
    if (note := missing_eos_note(tokenizer, data.format)) is not None:
        log(note)
    fingerprint = data_fingerprint(train_examples)
    if ckpt is not None and ckpt.state["data_fingerprint"] != fingerprint:
        if not cfg.resume_allow_config_changes:
            raise CheckpointError(
                f"resume: the training data differ from those {ckpt.path} was trained on "
                f"({ckpt.state['data']['examples']} examples then, {len(train_examples)} now, different "
                "token ids); restore them, or set resume_allow_config_changes=true"
            )
        log("resume: the training data differ from the checkpoint's (allowed); the position is kept")

    # Model, adapters, optimizer.
    load_device = torch.device("cpu") if cfg.method == "qlora" else device
    model, dtype = load_model(model_path, cfg.model, device, load_device)
    base_layout = base_record(model, model_path)
    base_changed = ckpt is not None and _resumed_base_changed(model, model_path, ckpt, cfg, log)
    longest = max(len(e.input_ids) for e in (*train_examples, *data.eval))
    if (note := check_context_length(model, longest)) is not None:
        log(note)
    report: AdaptReport = apply_method(model, cfg, device)
    for line in report.lines():
        log(line)
    if (warning := lr_warning(cfg)) is not None:
        log(warning)
    if (note := unused_sections_note(cfg)) is not None:
        log(note)
    for line in apply_patches(model, cfg.train.padding_free, cfg.data.max_seq_len, report.backend):
        log(line)
    model.train()
    params = [p for _, p in trainable_parameters(model)]
    try:
        optimizer = build_optimizer(model, cfg.optim)
    except torch.OutOfMemoryError:
        raise OutOfMemory(out_of_memory_message(model, None, cfg, device)) from None
    masters, scaler = master_weights_of(optimizer), loss_scaler_of(optimizer)
    for line in half_precision_lines(model, optimizer):
        log(line)
    if cfg.optim.name == "paged_adamw8bit" and device.type != "cuda":  # bnb's own warning is filtered
        log(
            "optim.name paged_adamw8bit: paging needs CUDA; here its state is ordinary memory, as adamw8bit's"
        )
    steps = total_steps(cfg, len(train_examples))
    if cfg.optim.warmup_steps >= steps > 0:
        log(
            f"optim.warmup_steps: {cfg.optim.warmup_steps} is not fewer than the run's {steps} steps: the lr "
            f"warms up over {max(steps - 1, 0)} and reaches its peak on the last step"
        )
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    start_step = 0
    if ckpt is not None:
        saved = ckpt.tensors("trainable")
        restore_trainable(model, saved, ckpt.path)
        if masters is not None:  # fp32 when written with copies: the run goes on from the unrounded values
            masters.load(saved)
        del saved
        if scaler is not None and ckpt.state.get("loss_scale"):
            scaler.load_state_dict(ckpt.state["loss_scale"])
        try:
            changed = restore_optimizer(optimizer, scheduler, ckpt)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"resume: {ckpt.path}: cannot restore the optimizer ({e})") from None
        if changed:
            log(
                "resume: the optimizer keeps its state (moments, step counts) and takes this config's "
                f"{', '.join(changed)} from the first resumed step"
            )
        start_step = ckpt.step
        if start_step > steps:
            raise CheckpointError(
                f"resume: {ckpt.path} is at step {start_step}, past this run's {steps} steps"
            )
        if start_step == steps and inside and (done := _finished_run(out, ckpt, steps)) is not None:
            log(
                f"resume: {ckpt.path} is this run's last step ({steps} of {steps}): the run is already "
                f"finished, its outputs in {out} are left as they are (to train on: raise train.max_steps with "
                "resume_allow_config_changes=true; the lr schedule is recomputed over the new length, so the lr first "
                "rises to where that longer schedule is, then decays)"
            )
            for line in summary_lines(done):
                log(line)
            return done

    # Everything validated: now the run directory is ours.
    root = checkpoint_root(out)
    if ckpt is None:
        if out.exists():
            _remove_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
        (out / BASE_LAYOUT_FILE).write_text(json.dumps(base_layout))
        metrics = MetricsLog(out / "metrics.jsonl")
        eval_before = evaluate(model, tokenizer, data, cfg, pad_id)
        log(_describe_eval("before", eval_before))
        metrics.write({"kind": "eval", "step": 0, **{k: v for k, v in eval_before.items() if k != "samples"}})
        first_loss, last_loss, skipped, consecutive = math.nan, math.nan, 0, 0
        position = {"epoch": 0, "offset": 0}
    else:
        metrics_path = out / "metrics.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        if not inside or base_changed or not (out / BASE_LAYOUT_FILE).is_file():  # elsewhere, or older
            (out / BASE_LAYOUT_FILE).write_text(json.dumps(base_layout))
        if inside:  # this run's own log: drop records logged after the checkpoint
            size = ckpt.state["metrics_bytes"]
            if metrics_path.exists() and metrics_path.stat().st_size > size:
                with open(metrics_path, "r+b") as f:
                    f.seek(size)
                    dropped = f.read().count(b"\n")
                    f.truncate(size)
                log(f"resume: metrics.jsonl: dropped the {dropped} records logged after {ckpt.path.name}")
        else:  # another directory's checkpoint: the run continues here, with its log up to the checkpoint
            history = _metrics_up_to(ckpt)
            if out.exists():  # overwrite=true (else it is empty): the earlier run's outputs go
                _remove_outputs(out)
            metrics_path.write_bytes(history)
        (out / "config.yaml").write_text(cfg.to_yaml())
        metrics = MetricsLog(metrics_path, append=True)
        st = ckpt.state
        eval_before = st["eval_before"]
        first_loss, last_loss = _nan(st["first_loss"]), _nan(st["last_loss"])
        skipped, consecutive, position = st["skipped_steps"], st["consecutive_nonfinite"], st["data"]
        log(f"resume: continuing from {ckpt.path} at step {start_step} of {steps}")

    stream = MicroBatchStream(
        train_examples,
        cfg.train.micro_batch_size,
        cfg.train.seed,
        pad_id,
        device,
        position["epoch"],
        position["offset"],
    )
    last_ckpt = str(ckpt.path) if ckpt is not None else None

    def write_checkpoint(step: int) -> str:
        state = {
            "data": stream.position(),
            "data_fingerprint": fingerprint,
            "skipped_steps": skipped,
            "consecutive_nonfinite": consecutive,
            "loss_scale": None if scaler is None else scaler.state_dict(),
            "first_loss": first_loss,
            "last_loss": last_loss,
            "eval_before": eval_before,
            "metrics_bytes": (out / "metrics.jsonl").stat().st_size,
            "config": cfg.model_dump(mode="json"),
            "config_hash": cfg.digest(),
            "total_steps": steps,
        }
        return str(
            save_checkpoint(
                root,
                step,
                model,
                optimizer,
                scheduler,
                state,
                cfg.train.keep_last,
                masters=None if masters is None else masters.values(),
            )
        )

    if ckpt is not None:  # the RNG exactly as it was when the checkpoint was written
        set_rng_state(ckpt.state["rng"], ckpt.tensors("rng"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # what each micro-batch's forward saves for backward, for the summary (checkpointing hides it)
    meter = None if cfg.model.gradient_checkpointing else memory.SavedTensorMeter.for_model(model)
    bar = _progress(steps, cfg.train.progress, initial=start_step)
    t_start = time.perf_counter()
    window_tokens, window_t0 = 0, t_start
    stopped = False
    for step in range(start_step + 1, steps + 1):
        micro = [next(stream) for _ in range(micro_batches_in_step(cfg, len(train_examples), step))]
        try:
            result = optimizer_step(
                model, params, micro, optimizer, cfg.optim.max_grad_norm, report.backend, meter
            )
        except torch.OutOfMemoryError:
            metrics.close()
            optimizer.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            raise OutOfMemory(out_of_memory_message(model, optimizer, cfg, device)) from None
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        window_tokens += result.tokens
        if result.overflow:
            skipped += 1
            log(
                f"step {step}: gradients overflowed fp16 at loss scale {result.loss_scale:g}; update skipped, "
                f"scale now {scaler.scale:g}"
            )
        elif result.skipped:
            skipped += 1
            consecutive += 1
            log(f"step {step}: non-finite loss {result.loss} or grad norm {result.grad_norm}; update skipped")
            if consecutive >= cfg.train.max_consecutive_nonfinite:
                metrics.close()
                kept = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
                raise TrainingDiverged(
                    f"train.max_consecutive_nonfinite: {consecutive} optimizer steps in a row had a non-finite "
                    f"loss or gradient norm; aborting (lower optim.lr, or check the data){kept}"
                )
        else:
            consecutive = 0
            last_loss = result.loss
            if math.isnan(first_loss):
                first_loss = result.loss
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
            if result.loss_scale is not None:
                record["loss_scale"] = result.loss_scale
                record["overflow"] = result.overflow
            metrics.write(record)
            if bar is not None:
                bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tok_s:.0f}")
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != steps and data.eval:
            ev = {"eval_loss": heldout_loss(model, data.eval, cfg.train.micro_batch_size, pad_id)}
            metrics.write({"kind": "eval", "step": step, **ev})
        if bar is not None:
            bar.update(1)
        stopped = should_stop is not None and step < steps and should_stop(step)
        if step == steps or stopped or (cfg.train.save_every and step % cfg.train.save_every == 0):
            last_ckpt = write_checkpoint(step)
        if stopped:
            break
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t_start
    if stopped:
        metrics.close()
        log(f"stopped after step {step} of {steps}; checkpoint {last_ckpt}")
        log("to continue, run the same command with resume=auto")
        return RunResult(
            output_dir=str(out),
            steps=step,
            skipped_steps=skipped,
            first_loss=first_loss,
            last_loss=last_loss,
            eval_before=eval_before,
            resumed_from=str(ckpt.path) if ckpt is not None else None,
            stopped=True,
            checkpoint=last_ckpt,
        )

    eval_after = evaluate(model, tokenizer, data, cfg, pad_id)
    log(_describe_eval("after", eval_after))
    metrics.write({"kind": "eval", "step": steps, **{k: v for k, v in eval_after.items() if k != "samples"}})
    metrics.close()

    # Outputs.
    if cfg.method in ("lora", "qlora"):
        save_peft_adapter(model, cfg, model_path, out)
    else:
        save_trainable(model, out / "trainable.safetensors")
    try:
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    except MetricsError as e:
        log(f"loss.png not written: {e}")
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
        "master_weight_bytes": 0 if masters is None else masters.nbytes,
        "peak_memory_bytes": memory.peak_memory_bytes(device),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "saved_for_backward": None if meter is None else dataclasses.asdict(meter.largest),
        "train_seconds": train_seconds,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    result = RunResult(
        output_dir=str(out),
        steps=steps,
        skipped_steps=skipped,
        first_loss=first_loss,
        last_loss=last_loss,
        eval_before=eval_before,
        eval_after=eval_after,
        accounting=accounting,
        adapt=report.lines(),
        resumed_from=str(ckpt.path) if ckpt is not None else None,
        checkpoint=last_ckpt,
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
        f"done: {result.steps} step{'' if result.steps == 1 else 's'} in {a['train_seconds']:.1f} s on {a['device']} ({a['dtype']}); "
        f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
        + (
            f"; {result.skipped_steps} step{'' if result.skipped_steps == 1 else 's'} skipped (non-finite)"
            if result.skipped_steps
            else ""
        )
        + (f"; resumed from {result.resumed_from}" if result.resumed_from else ""),
        f"parameters: {a['trainable_params']:,} trainable ({fb(a['trainable_bytes'])}), "
        f"{a['frozen_params']:,} frozen ({fb(a['frozen_bytes'])}); "
        f"{100 * a['trainable_params'] / max(total, 1):.2f}% trainable",
        *memory.measured_breakdown_lines(a),
        _describe_eval("before", result.eval_before) + " | " + _describe_eval("after", result.eval_after),
        f"outputs in {result.output_dir}/",
    ]


def _progress(total: int, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


# ---------------------------------------------------------------------------------------------------
# Stopping on a signal
# ---------------------------------------------------------------------------------------------------


class StopRequest:
    """Set by the first SIGTERM/SIGINT; the loop asks it after every optimizer step.

    The first signal lets the current optimizer step finish and a checkpoint be written; a second one
    exits at once (exit code 128 + signal number), leaving the previous checkpoint as it was.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        # Python may run a second signal's handler inside the first one, between any two bytecodes: a
        # check-then-set on ``signum`` could see both as the first. ``next`` on a count is one C call.
        self._seen = itertools.count()

    def __call__(self, step: int | None = None) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def handle(self, signum: int, frame) -> None:
        first = next(self._seen) == 0
        name = signal.Signals(signum).name
        if not first:
            print(
                f"\n{name} again: exiting now; checkpoints already written are kept (a half-written one is "
                "never taken for one)",
                file=sys.stderr,
            )
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        print(
            f"\n{name}: finishing the current optimizer step, then writing a checkpoint "
            f"(send {name} again to exit at once)",
            file=sys.stderr,
        )


@contextlib.contextmanager
def graceful_stop():
    """Install :class:`StopRequest` for SIGTERM and SIGINT for the duration (main thread only)."""
    request = StopRequest()
    previous = {s: signal.signal(s, request.handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
