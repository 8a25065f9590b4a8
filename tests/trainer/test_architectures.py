"""Every patch on, against the model's own forward: loss and every gradient, across architectures.

For each architecture a tiny model (2 layers, fp32) runs twice on a right-padded batch of unequal rows:
as transformers builds it, with cross-entropy over its own logits; and after ``apply_patches`` (fused
RMSNorm, SwiGLU and RoPE where the math is theirs, padding-free micro-batches where the model allows,
the LM head at target positions where the logits are its plain output), with the trainer's
``loss_sum``. Whatever each patch decides for a model, the numbers must be the model's. The run's
lines must also say which patches took effect, so that a model nothing fused is not silently slow.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny import MIXTRAL_MOE, QWEN2_MOE, TINY_SHAPE

from fusedtune.trainer.loss import loss_sum
from fusedtune.trainer.patches import apply_patches

BASE = {**TINY_SHAPE, "max_position_embeddings": 128}
ARCHS = {
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "qwen2_moe": ("Qwen2MoeConfig", QWEN2_MOE),
    "mixtral": ("MixtralConfig", {**MIXTRAL_MOE, "sliding_window": None}),
    "mistral_window": ("MistralConfig", {"sliding_window": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "_attn": "eager"}),  # soft-capped attention: no sdpa
    "gemma3": (
        "Gemma3TextConfig",
        {"head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "phi3_partial_rotary": ("Phi3Config", {"pad_token_id": 0, "partial_rotary_factor": 0.5}),
    "olmo2": ("Olmo2Config", {}),
    "cohere": ("CohereConfig", {"logit_scale": 0.5}),
    "granite": (
        "GraniteConfig",
        {
            "logits_scaling": 2.0,
            "embedding_multiplier": 3.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.3,
        },
    ),
    "starcoder2": ("Starcoder2Config", {"sliding_window": None}),
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.5}),
    "llama_bias_tied": (
        "LlamaConfig",
        {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
    ),
}


def _model(config_name: str, overrides: dict) -> torch.nn.Module:
    config_cls = getattr(transformers, config_name, None)
    if config_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    overrides = dict(overrides)
    attention = overrides.pop("_attn", "sdpa")
    cfg = config_cls(**{**BASE, **overrides})
    cfg._attn_implementation = attention
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def _batch(lengths=(20, 13, 7, 17), prompt=3):
    g = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, BASE["vocab_size"], (n,), generator=g)
        labels[i, prompt:n] = ids[i, prompt:n]
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_patched_model_gives_the_models_own_loss_and_gradients(arch):
    config_name, overrides = ARCHS[arch]
    reference, patched = _model(config_name, overrides), _model(config_name, overrides)
    batch = _batch()
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch["labels"][:, 1:].flatten(),
        ignore_index=-100,
        reduction="sum",
    )
    expected.backward()

    lines = apply_patches(patched, True, 64, "torch")
    assert any(line.startswith("LM head + loss:") for line in lines)
    assert any(line.startswith("padding-free micro-batches:") for line in lines)
    got = loss_sum(patched, batch)
    got.backward()

    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, p in patched.named_parameters():
        if ref_grads[name] is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        scale = ref_grads[name].abs().max().clamp(min=1e-6)
        assert p.grad is not None, name
        assert (p.grad - ref_grads[name]).abs().max() <= 2e-4 * scale, name
