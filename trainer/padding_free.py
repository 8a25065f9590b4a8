"""Padding-free micro-batches: each micro-batch runs as one sequence of its real tokens.

A right-padded ``[B, T]`` micro-batch spends every GEMM, norm and attention FLOP of its pad positions
on nothing, and the 4-D padding mask keeps SDPA off its causal fast path (it then computes the whole
``T x T`` square instead of the lower triangle). Here the ``B`` rows are packed into ``[1, sum(len)]``
with per-row position ids, the Linears see only real tokens, and attention runs per row with
``is_causal=True``, so no token attends across rows. The math is the padded forward's, token for token.

How it hooks into transformers: the model's attention implementation becomes ``fusedtune_packed``
(registered here). That function runs the per-row attention when the forward carries
``fusedtune_segments`` (the row boundaries, a Python tuple, so no device sync per layer) and is plain
SDPA otherwise, so evaluation, generation and gradient-checkpoint recomputation behave as before. Its
mask function is SDPA's, except during a packed forward (:func:`packed_forward`), where no mask is
built at all: the block-diagonal mask transformers would otherwise derive from the position ids is
``tokens^2`` booleans that nothing reads.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools

import torch
from torch import nn

from fusedtune.kernels.attention import packed_causal_attention

PACKED_ATTENTION = "fusedtune_packed"
_SEGMENTS_KWARG = "fusedtune_segments"
_IN_PACKED_FORWARD = contextvars.ContextVar("fusedtune_in_packed_forward", default=False)


class MissingBoundaries(RuntimeError):
    """A packed forward reached an attention layer without the row boundaries."""


def _packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = kwargs.pop(_SEGMENTS_KWARG, None)
    if segments is None:
        if _IN_PACKED_FORWARD.get():  # a layer dropped the boundaries: attention would cross examples
            raise MissingBoundaries(
                f"padding-free: {type(module).__name__} was called without the row boundaries; "
                "set train.padding_free: false for this model"
            )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    kwargs.pop("is_causal", None)
    if _one_node(query, key, value, dropout, kwargs):
        return packed_causal_attention(query, key, value, segments, scaling), None
    return _per_row_sdpa(module, query, key, value, segments, dropout, scaling, **kwargs), None


def _one_node(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, kwargs: dict
) -> bool:
    """Every row in one node (kernels/attention.py: no zero-filled slice gradients, a 16-bit backward in
    fp32): torch's CPU flash-attention ops, which take one head size for q, k and v (DeepSeek's MLA has a
    narrower v), unit-stride heads, and no dropout, position bias, soft-capping or sinks."""
    return (
        query.device.type == "cpu"
        and not dropout
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and query.shape[2] == key.shape[2] == value.shape[2]
        and all(x.stride(-1) == 1 for x in (query, key, value))
        and all(kwargs.get(k) is None for k in ("position_bias", "softcap", "s_aux", "sinks"))
    )


def _per_row_sdpa(module, query, key, value, segments, dropout, scaling, **kwargs) -> torch.Tensor:
    """transformers' SDPA on each row's slice of q, k and v, causal, the outputs concatenated (a GPU, or
    attention dropout): ``[1, T, H, D]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    outs = [
        sdpa_attention_forward(
            module,
            query[:, :, a:b],
            key[:, :, a:b],
            value[:, :, a:b],
            None,
            dropout=dropout,
            scaling=scaling,
            is_causal=True,
            **kwargs,
        )[0]
        for a, b in itertools.pairwise(segments)
    ]
    return torch.cat(outs, dim=1)


def _packed_mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask

    return None if _IN_PACKED_FORWARD.get() else sdpa_mask(*args, **kwargs)


def unsupported_reason(model: nn.Module, max_seq_len: int) -> str | None:
    """Why ``model`` cannot run padding-free micro-batches, or ``None`` when it can."""
    cfg = getattr(model, "config", None)
    name = type(model).__name__
    if cfg is None or not hasattr(model, "get_decoder"):
        return f"{name} is not a transformers decoder model"
    if not getattr(type(model), "_supports_attention_backend", False):
        return f"{name} does not route attention through transformers' attention interface"
    if not getattr(type(model), "_supports_sdpa", False):
        return f"{name} does not support sdpa attention"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ("sdpa", "eager", PACKED_ATTENTION):
        return f"attention implementation {impl!r} (padding-free runs on sdpa)"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention logit soft-capping (sdpa has none)"
    if getattr(cfg, "is_causal", True) is False or getattr(cfg, "use_bidirectional_attention", False):
        return "non-causal attention"
    if getattr(cfg, "attention_chunk_size", None):
        return "chunked attention"
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < max_seq_len:
        return f"sliding-window attention (window {window} < max_seq_len {max_seq_len})"
    # Hybrid models (Mamba, linear attention, convolutions) carry state along the sequence: packed rows
    # would leak into each other through those layers.
    other = sorted(set(getattr(cfg, "layer_types", None) or ()) - {"full_attention", "sliding_attention"})
    if other:
        return f"layers that carry state along the sequence ({', '.join(other)})"
    if any(getattr(m, "sinks", None) is not None for m in model.modules()):
        return "attention sinks (sdpa has none)"
    params = inspect.signature(model.get_decoder().forward).parameters
    if "position_ids" not in params:
        return f"{type(model.get_decoder()).__name__}.forward takes no position_ids"
    return None


def enable(model: nn.Module) -> None:
    """Switch ``model`` to the packed attention implementation (SDPA for every unpacked call)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    # transformers' registries are dicts keyed by name: registering again rewrites the same entry
    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)
    model.set_attn_implementation(PACKED_ATTENTION)


def setup(model: nn.Module, wanted: bool, max_seq_len: int) -> str:
    """Enable padding-free micro-batches on ``model`` when wanted and possible; the line to log."""
    if not wanted:
        return "padding-free micro-batches: off (train.padding_free: false)"
    why = unsupported_reason(model, max_seq_len)
    if why is None:
        previous = model.config._attn_implementation
        enable(model)
        why = _probe(model)
        if why is not None:
            model.set_attn_implementation(previous)
    if why is not None:
        return f"padding-free micro-batches: off ({why}); micro-batches run right-padded"
    return "padding-free micro-batches: on (no pad tokens; attention within each example)"


def _probe(model: nn.Module) -> str | None:
    """One packed forward of two short rows: every attention layer must get the row boundaries. A
    decoder layer that drops the attention's keyword arguments (Nemotron's) fails here, at set-up, and
    not in the first training step. No probe on the meta device (``trainer estimate``)."""
    weight = model.get_input_embeddings().weight
    if weight.device.type == "meta":
        return None
    ids = torch.arange(1, 7, device=weight.device).reshape(2, 3) % weight.shape[0]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], device=weight.device)
    try:
        with torch.no_grad():
            decoder_hidden(model, {"input_ids": ids, "attention_mask": mask})
    except MissingBoundaries as e:
        return str(e).split(";")[0].removeprefix("padding-free: ")
    return None


def enabled(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == PACKED_ATTENTION


def packable(attention_mask: torch.Tensor) -> bool:
    """Rows are right padded: each row's tokens are a non-empty prefix."""
    m = attention_mask.bool()
    return bool(m[:, 0].all()) and bool((m[:, 1:] <= m[:, :-1]).all())


@contextlib.contextmanager
def packed_forward():
    """Inside: the decoder builds no attention mask (the packed attention needs none)."""
    token = _IN_PACKED_FORWARD.set(True)
    try:
        yield
    finally:
        _IN_PACKED_FORWARD.reset(token)


def pack_rows(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """``[B, T]`` right-padded mask -> (keep ``[B, T]`` bool, position ids ``[1, N]``, row boundaries).

    ``x[keep]`` lists the real tokens row after row; the boundaries are ``0, len0, len0+len1, ..., N``.
    """
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1).tolist()
    positions = torch.cat([torch.arange(n, device=attention_mask.device) for n in lengths])
    return keep, positions[None], tuple(itertools.accumulate(lengths, initial=0))


def decoder_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the decoder on the real tokens of ``batch`` only.

    Returns:
        (hidden states ``[N, d]`` of the real tokens, row after row; ``keep`` ``[B, T]``, the mask that
        selects them).
    """
    keep, positions, bounds = pack_rows(batch["attention_mask"])
    ids = batch["input_ids"][keep][None]
    with packed_forward():
        out = model.get_decoder()(input_ids=ids, position_ids=positions, **{_SEGMENTS_KWARG: bounds})
    return out.last_hidden_state[0], keep
