"""Loading the model (trainer/model.py): gradient checkpointing differentiates exactly what trains."""

from __future__ import annotations

import pytest
import torch
from tiny import write_config

from fusedtune.trainer.adapt import apply_method
from fusedtune.trainer.config import load_config
from fusedtune.trainer.model import load_model


def _grads_and_block0_calls(cfg, ids):
    torch.manual_seed(0)
    model, _ = load_model(cfg.model.name_or_path, cfg.model, torch.device("cpu"))
    apply_method(model, cfg, torch.device("cpu"))
    model.train()
    calls, embedded = [], []
    # a submodule (the decoder layer checkpoints inside its own hooks) that the recompute reaches before it
    # stops early, once every saved tensor is back
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    model.model.embed_tokens.register_forward_hook(lambda m, i, out: embedded.append(out.requires_grad))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return grads, len(calls), embedded


@pytest.mark.parametrize(
    ("overrides", "block0_calls"),
    [
        (["method=partial", "partial.patterns=[layers.1.]"], 1),
        (["lora.dropout=0.0"], 2),
        (["lora.dropout=0.1"], 2),  # the recompute draws the same keep-masks
        (["method=full"], 2),  # the embedding trains: its output needs a gradient anyway
    ],
    ids=["last-layer", "lora", "lora-dropout", "full"],
)
def test_checkpointing_gives_the_same_gradients_and_skips_frozen_blocks(
    tmp_path, tiny_model_dir, overrides, block0_calls
):
    """The embedding's output never requires grad (HF's hook for the reentrant variant is off): a block
    below the first that trains runs once, not again in backward; gradients are those of the plain run."""
    config = write_config(tmp_path, tiny_model_dir)
    ids = torch.randint(3, 200, (2, 12))
    plain, calls, _ = _grads_and_block0_calls(load_config(config, overrides), ids)
    assert calls == 1
    ckpt, calls, embedded = _grads_and_block0_calls(
        load_config(config, [*overrides, "model.gradient_checkpointing=true"]), ids
    )
    assert embedded == ["method=full" in overrides]  # only a trainable embedding's output needs one
    assert calls == block0_calls  # recomputed only when it trains
    assert ckpt.keys() == plain.keys() and ckpt
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
