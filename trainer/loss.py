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


def head_at_targets_reason(model: nn.Module) -> str | None:
    """Why the loss cannot apply the LM head at the target positions alone; None when it can.

    It can when the logits are exactly a plain ``nn.Linear`` of the decoder's last hidden state. Known
    scalings between them are refused by their config names (Gemma 2/3's soft-capping, Cohere's
    ``logit_scale``, Granite's ``logits_scaling``), a head of another type by its type (a subclass may
    scale, as Dory's does), and anything else by one probe forward of four tokens, once per model and
    head: hooks read the decoder's output and the head's input and output, and the model's logits must be
    the head's output of the decoder's output, bit for bit (Falcon-H1's ``lm_head_multiplier``, a
    ``mup`` width multiplier, a vocabulary slice). On the meta device (``trainer estimate``) there is no
    probe.
    """
    cfg = getattr(model, "config", None)
    if not hasattr(model, "get_decoder"):
        return f"{type(model).__name__} has no get_decoder()"
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"its LM head is a {type(head).__name__}, not a plain Linear"
    if head._forward_hooks or head._forward_pre_hooks:
        return "its LM head has forward hooks"
    if getattr(cfg, "final_logit_softcapping", None):
        return "final_logit_softcapping"
    for name in ("logit_scale", "logits_scaling"):
        if getattr(cfg, name, None) not in (None, 1.0):
            return f"{name} = {getattr(cfg, name)}"
    if head.weight.device.type == "meta":
        return None
    cached = model.__dict__.get("_fusedtune_head_probe")
    if cached is not None and cached[0] is head:
        return cached[1]
    reason = _probe_head(model, head)
    model.__dict__["_fusedtune_head_probe"] = (head, reason)  # not a submodule: no setattr
    return reason


def _probe_head(model: nn.Module, head: nn.Linear) -> str | None:
    seen: dict[str, torch.Tensor] = {}

    def on_decoder(_module, _args, out):
        seen["hidden"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

    def on_head(_module, args, out):
        seen["head_in"], seen["head_out"] = args[0], out

    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(1, 5, device=head.weight.device) % vocab)[None]
    hooks = [
        model.get_decoder().register_forward_hook(on_decoder),
        head.register_forward_hook(on_head),
    ]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    if "head_in" not in seen or "hidden" not in seen:
        return "its forward does not run the decoder and then the LM head"
    hidden, head_in, head_out = seen["hidden"], seen["head_in"], seen["head_out"]
    if head_in.shape != hidden.shape or not torch.equal(head_in, hidden):
        return "its forward changes the hidden state between the decoder and the LM head"
    if logits.shape != head_out.shape or not torch.equal(logits.to(head_out.dtype), head_out):
        return "its forward changes the LM head's output (a scale, a cap or a slice)"
    return None


def head_at_targets_supported(model: nn.Module) -> bool:
    """:func:`head_at_targets_reason` is None."""
    return head_at_targets_reason(model) is None


def head_report(model: nn.Module) -> str:
    """The run's line on the loss path."""
    reason = head_at_targets_reason(model)
    if reason is None:
        return "LM head + loss: fused, at the target positions only"
    return f"LM head + loss: the model's own full logits ({type(model).__name__}: {reason})"


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
