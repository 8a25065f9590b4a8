"""The training loss: summed next-token cross-entropy over a micro-batch's target tokens.

Shared by the loop (training) and ``evaluate.heldout_loss`` (no grad), so both compute the same thing
the same way: the decoder on the real tokens (``padding_free``), then the LM head fused with the loss
at the target positions only (``kernels.cross_entropy``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusedtune.kernels.cross_entropy import linear_cross_entropy

from . import memory, padding_free
from .data import IGNORE_INDEX


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss in a batch (labels are shifted by one for next-token prediction)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def head_at_targets_supported(model: nn.Module) -> bool:
    # The LM head can be applied to the target positions alone when logits are a plain Linear of the
    # decoder's last hidden state (no soft-capping or scaling in between, as in Gemma 2/3, Cohere, Granite).
    cfg = getattr(model, "config", None)
    return (
        hasattr(model, "get_decoder")
        and isinstance(model.get_output_embeddings(), nn.Linear)
        and not getattr(cfg, "final_logit_softcapping", None)
        and getattr(cfg, "logit_scale", None) in (None, 1.0)
        and getattr(cfg, "logits_scaling", None) in (None, 1.0)  # Granite divides logits by it
    )


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], backend: str = "torch") -> torch.Tensor:
    """Sum of next-token cross-entropies over the batch's target tokens (fp32).

    The vocabulary projection runs only at positions that carry loss: with completion-only labels
    most positions are prompt, and the [tokens, vocab] logits are the largest activation of a
    small model (SmolLM2-135M: 49152 x 576 per token, about a fifth of its forward FLOPs). It runs
    fused with the loss (``kernels.cross_entropy``): chunked, so no [targets, vocab] buffer outlives
    its chunk. With padding-free micro-batches (``padding_free``) the decoder sees only real tokens.

    Args:
        backend: ``triton`` or ``torch``, for the fused loss's softmax-gradient step.
    """
    targets = batch["labels"][:, 1:]
    if head_at_targets_supported(model):
        keep = targets != IGNORE_INDEX
        if padding_free.enabled(model) and padding_free.packable(batch["attention_mask"]):
            hidden, real = padding_free.decoder_hidden(model, batch)
            at = torch.zeros_like(real)
            at[:, :-1] = keep
            hidden = hidden[at[real]]  # row-major over (row, position), as targets[keep]
        else:
            hidden = model.get_decoder()(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state[:, :-1][keep]
        head = model.get_output_embeddings()
        with memory.saved_as("loss"):
            return linear_cross_entropy(hidden, head.weight, targets[keep], head.bias, backend=backend)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with memory.saved_as("loss"):  # the head's own saved input counts as the decoder's activations
        logits = _at_least_fp32(logits[:, :-1].flatten(0, 1))
        return F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
