"""Padding-free micro-batches (trainer/padding_free.py): the same loss and gradients as the padded forward.

The oracle is each row run alone, unpadded (no mask at all), in float64: the padded forward, the packed
forward and that oracle must agree to rounding.
"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama
from transformers import MistralConfig, MistralForCausalLM

from fusedtune.trainer import padding_free
from fusedtune.trainer.loop import loss_sum

VOCAB = 97


def _model(seed=0):
    return tiny_llama(seed, vocab_size=VOCAB)


def _batch(lengths=(20, 13, 17), width=20, prompt=6, left=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    pos = torch.arange(width)[None]
    mask = (pos >= width - lens[:, None]) if left else (pos < lens[:, None])
    mask = mask.long()
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g) * mask
    labels = ids.masked_fill(mask == 0, -100)
    for i, n in enumerate(lengths):  # the first `prompt` real tokens of each row carry no loss
        start = width - n if left else 0
        labels[i, start : start + prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, fn):
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _per_row(model, batch):
    """Each row alone, its pad columns cut off: no mask, no padding."""
    total = 0.0
    for i in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][i].bool()
        row = {k: v[i : i + 1, real] for k, v in batch.items()}
        row["attention_mask"] = torch.ones_like(row["input_ids"])
        total = total + loss_sum(model, row)
    return total


def _assert_same(a, b, rtol=1e-9, atol=1e-11):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("one_node", [True, False], ids=["one-node", "per-row-sdpa"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_matches_padded_and_per_row(checkpointing, one_node, monkeypatch):
    """Both packed attentions: the CPU's one node (kernels/attention.py) and per-row SDPA (a GPU, or
    attention dropout)."""
    calls = []
    real = padding_free._one_node
    monkeypatch.setattr(padding_free, "_one_node", lambda *a: calls.append(real(*a)) or one_node)
    model = _model()
    if checkpointing:  # the row boundaries must reach the recomputed attention in backward
        from fusedtune.trainer.model import enable_checkpointing

        enable_checkpointing(model)  # the trainer's own: non-reentrant, no input-grad hook
    batch = _batch()
    oracle = _loss_and_grads(model, lambda: _per_row(model, batch))
    padded = _loss_and_grads(model, lambda: loss_sum(model, batch))
    assert padding_free.setup(model, True, 64).startswith("padding-free micro-batches: on")
    assert padding_free.enabled(model)
    packed = _loss_and_grads(model, lambda: loss_sum(model, batch))
    _assert_same(padded, oracle)
    _assert_same(packed, oracle)
    assert calls and all(calls)  # the CPU without dropout takes the one node unless told otherwise


def test_packed_forward_builds_no_mask_and_attends_per_row(monkeypatch):
    from fusedtune.trainer.loss import head_at_targets_supported

    model = _model()
    padding_free.enable(model)
    assert head_at_targets_supported(model)  # its probe forward (once per model) before the spy counts
    calls = []
    real = padding_free._packed_attention

    def spy(module, query, key, value, attention_mask, **kw):
        calls.append((attention_mask, kw.get(padding_free._SEGMENTS_KWARG), query.shape))
        return real(module, query, key, value, attention_mask, **kw)

    from transformers import AttentionInterface

    AttentionInterface.register(padding_free.PACKED_ATTENTION, spy)
    try:
        loss_sum(model, _batch())
    finally:
        AttentionInterface.register(padding_free.PACKED_ATTENTION, real)
    assert len(calls) == 2  # one per layer
    for mask, segments, shape in calls:
        assert mask is None
        assert segments == (0, 20, 33, 50)
        assert shape[0] == 1 and shape[2] == 50  # one sequence of the 50 real tokens


def test_unpacked_calls_are_plain_sdpa():
    """Evaluation and generation (padded batches, no row boundaries) see exactly the sdpa model."""
    model = _model()
    batch = _batch()
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        padding_free.enable(model)
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(after[real], before[real], rtol=0, atol=0)


def test_left_padded_batch_takes_the_padded_path():
    model = _model()
    padding_free.enable(model)
    batch = _batch(left=True)
    assert not padding_free.packable(batch["attention_mask"])
    # transformers gives left-padded rows absolute positions from the left edge and computes the RoPE
    # tables in fp32: the same attention up to fp32 rounding of cos/sin, hence the looser tolerance.
    _assert_same(
        _loss_and_grads(model, lambda: loss_sum(model, batch)),
        _loss_and_grads(model, lambda: _per_row(model, batch)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_reasons_it_cannot_run():
    model = _model()
    assert padding_free.unsupported_reason(model, 64) is None
    model.set_attn_implementation("eager")
    assert padding_free.unsupported_reason(model, 64) is None
    torch.manual_seed(0)
    mistral = MistralForCausalLM(
        MistralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            sliding_window=16,
        )
    )
    assert "sliding-window attention (window 16 < max_seq_len 64)" in padding_free.unsupported_reason(
        mistral, 64
    )
    assert padding_free.unsupported_reason(mistral, 16) is None
    line = padding_free.setup(mistral, True, 64)
    assert line.startswith("padding-free micro-batches: off (sliding-window") and "right-padded" in line
    assert not padding_free.enabled(mistral)
    assert (
        padding_free.setup(model, False, 64) == "padding-free micro-batches: off (train.padding_free: false)"
    )
    assert not padding_free.enabled(model)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: setattr(m.config, "layer_types", ["full_attention", "linear_attention"]), "carry state"),
        (lambda m: setattr(m.config, "attention_chunk_size", 8), "chunked attention"),
        (lambda m: setattr(m.config, "is_causal", False), "non-causal attention"),
        (lambda m: setattr(m.config, "use_bidirectional_attention", True), "non-causal attention"),
        (
            lambda m: setattr(m.model.layers[0].self_attn, "sinks", torch.nn.Parameter(torch.zeros(4))),
            "attention sinks",
        ),
    ],
)
def test_models_that_would_mix_rows_are_refused(change, reason):
    """Anything that lets a token see past its own row (or that sdpa cannot express) keeps padded batches."""
    model = _model()
    change(model)
    assert reason in padding_free.unsupported_reason(model, 64)


def test_eager_only_models_are_refused():
    class EagerOnly(type(_model())):
        _supports_sdpa = False

    model = _model()
    model.__class__ = EagerOnly
    assert padding_free.unsupported_reason(model, 64) == "EagerOnly does not support sdpa attention"


def test_a_layer_that_drops_the_boundaries_is_an_error():
    model = _model()
    padding_free.enable(model)
    with padding_free.packed_forward(), pytest.raises(RuntimeError, match="without the row boundaries"):
        model.get_decoder()(input_ids=torch.randint(1, VOCAB, (1, 6)))


def test_set_up_probes_that_every_layer_gets_the_boundaries():
    """A decoder layer that drops the attention's keyword arguments (Nemotron's) passes the static
    checks; set-up's probe forward finds it, switches padding-free off and names the layer, instead of
    the first training step dying with a traceback."""
    model = _model()
    layer = model.model.layers[1]
    forward = layer.forward

    def drops_kwargs(hidden_states, *args, **kwargs):
        kwargs.pop(padding_free._SEGMENTS_KWARG, None)
        return forward(hidden_states, *args, **kwargs)

    layer.forward = drops_kwargs
    previous = model.config._attn_implementation
    line = padding_free.setup(model, True, 64)
    assert line == (
        "padding-free micro-batches: off (LlamaAttention was called without the row boundaries); "
        "micro-batches run right-padded"
    )
    assert not padding_free.enabled(model) and model.config._attn_implementation == previous
    batch = _batch()
    loss_sum(model, batch).backward()  # trains, padded
    assert padding_free.setup(_model(), True, 64).startswith("padding-free micro-batches: on")


def test_one_node_only_where_torchs_cpu_flash_ops_apply():
    q, k, v = torch.zeros(1, 4, 6, 8), torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8)
    assert padding_free._one_node(q, k, v, 0.0, {})
    assert not padding_free._one_node(q, k, v, 0.1, {})  # they take no dropout
    for name in ("position_bias", "softcap", "s_aux", "sinks"):
        assert not padding_free._one_node(q, k, v, 0.0, {name: torch.zeros(1)}), name
    assert not padding_free._one_node(q.to("meta"), k.to("meta"), v.to("meta"), 0.0, {})
    assert not padding_free._one_node(q, k, torch.zeros(1, 2, 6, 4), 0.0, {})  # MLA: a narrower v
    strided = torch.zeros(1, 4, 6, 16)[..., ::2]
    assert not padding_free._one_node(strided, k, v, 0.0, {})
