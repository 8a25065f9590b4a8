"""A tiny Llama (2 layers, hidden 64) and a small byte-level BPE tokenizer with a ChatML template.

Built from a config in a few seconds, offline, for trainer tests: nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
import yaml

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

_CORPUS = [
    "Write the date March 5, 2024 in YYYY-MM-DD format. 2024-03-05",
    "January February March April May June July August September October November December",
    "The quick brown fox jumps over the lazy dog. 0123456789 +-*/=.,:;!?()[]{}'\"",
    "### Instruction:\n### Input:\n### Response:\nuser assistant system",
    "Below is an instruction that describes a task. Write a response that completes the request.",
]


def build_tokenizer(path: Path, corpus: list[str] | None = None):
    """Train a ~400-token byte-level BPE tokenizer (on ``corpus``, default a small fixed one) and save it
    as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or _CORPUS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(path)
    return fast


# The tiny MoE layers (4 experts, 2 per token): the saved tiny models' and the in-memory MoE tests'
MIXTRAL_MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}
QWEN2_MOE = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
}

# Architectures build_tiny_model can save besides Llama: (config class, model class, extra config fields).
_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),  # per-head q/k norms
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),  # (1 + w) norms, GELU-tanh MLP
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),  # soft-capped attention and logits
    # sandwich norms, per-head q/k norms normalized after the transpose, a sliding-window layer and a
    # full one, each with its own RoPE table
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 16, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    # MoE: experts as stacked 3-D weights (gate_up_proj [E, 2I, H], down_proj [E, H, I])
    # learned absolute position embeddings (offset by 2), LayerNorm, an ungated ReLU MLP
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", MIXTRAL_MOE),
    # routed experts plus a dense shared expert (nn.Linear) and its scalar gate
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", QWEN2_MOE),
}


def build_tiny_model(
    path: Path, seed: int = 0, with_bias: bool = False, arch: str = "llama", tie: bool = False, **overrides
) -> Path:
    """Save a 2-layer, hidden-64 decoder (Llama unless ``arch``; ``overrides`` change config fields) with
    the tiny tokenizer under ``path``."""
    import transformers

    config_cls, model_cls, extra = (
        getattr(transformers, n) if isinstance(n, str) else n for n in _ARCHS[arch]
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    bias = {"attention_bias": with_bias, "mlp_bias": with_bias} if arch == "llama" else {}
    fields = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tie,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": None,
    }
    cfg = config_cls(**{**fields, **bias, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg)
    model.save_pretrained(path)
    return path


# The in-memory tiny decoder's shape (tiny_llama; test_architectures.py builds other architectures at it).
TINY_SHAPE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def broken_model_dir(src: Path, dst: Path, kind: str) -> Path:
    """A copy of a saved tiny model spoiled one way, as a user's model directory can be (test_model.py
    tests each at ``load_model``, test_cli.py through the whole CLI)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    if kind == "remote code":
        config["model_type"] = "mymodel"
        config["auto_map"] = {
            "AutoConfig": "configuration_my.MyConfig",
            "AutoModelForCausalLM": "modeling_my.M",
        }
    elif kind == "unknown model_type":
        config["model_type"] = "qwen9"
    elif kind == "no model_type":
        del config["model_type"]
    elif kind == "wrong architecture":  # a Llama checkpoint under a BERT config: every weight missing
        config["model_type"] = "bert"
        config["architectures"] = ["BertModel"]
    elif kind == "truncated weights":  # an interrupted download
        weights = dst / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides):
    """An in-memory 2-layer Llama (vocab 97, hidden 64, GQA 4/2 heads), no tokenizer; ``overrides`` the config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_SHAPE, **overrides})).to(dtype)
    model.config.use_cache = False
    return model


MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def write_alpaca(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` alpaca rows of the date-formatting task (1990s dates) as jsonl."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            y, m, d = rng.randint(1990, 1999), rng.randint(1, 12), rng.randint(1, 28)
            row = {
                "instruction": f"Write the date {MONTHS[m - 1]} {d}, {y} in YYYY-MM-DD format.",
                "input": "",
                "output": f"{y}-{m:02d}-{d:02d}",
            }
            f.write(json.dumps(row) + "\n")
    return path


def write_config(tmp_path: Path, model_dir: Path, **sections) -> Path:
    """A small run config on the tiny model (12 steps, alpaca data in ``tmp_path``); sections override."""
    cfg = {
        "kernels": "torch",
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "lora": {"rank": 4, "alpha": 8},
        "data": {
            "train": str(write_alpaca(tmp_path / "train.jsonl", 48)),
            "eval": str(write_alpaca(tmp_path / "eval.jsonl", 8, seed=1)),
            "max_seq_len": 64,
        },
        "optim": {"name": "adamw8bit", "lr": 1e-2, "warmup_steps": 1},
        "train": {"max_steps": 12, "micro_batch_size": 8, "log_every": 1, "progress": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
