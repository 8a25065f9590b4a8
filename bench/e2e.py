"""End to end on CPU: the same LoRA / QLoRA fine-tuning job run by fusedtune and by HF Trainer + PEFT + bitsandbytes.

    python -P bench/e2e.py --model smollm2 --seq 256 --batch 4 --steps 8        (by hand; minutes)
    python -P bench/e2e.py --model tiny --steps 6                              (seconds; what CI runs)
    python -P bench/e2e.py --model smollm2 --batch 2 --dtype bf16              (both providers in bf16)
    python -P bench/e2e.py --model mixtral --steps 6    (an MoE: LoRA on attention + every expert weight)

Providers (each runs in its own subprocess, so its peak RSS is its own):
    fusedtune  the trainer's own pieces: ``load_model`` -> ``apply_method`` -> ``build_optimizer`` ->
               ``loop.optimizer_step`` (token-normalized loss, LM head at target positions only)
    hf_peft    what a user would otherwise write: ``AutoModelForCausalLM`` (+ ``BitsAndBytesConfig`` NF4
               with double quant for QLoRA), ``peft.LoraConfig`` on the same Linears, ``transformers.Trainer``
               with ``optim="adamw_bnb_8bit"``

The job is identical for both: same model (fp32 on CPU; ``--dtype bf16``: both in bf16), same micro-batches in the same order (synthetic
token ids, lengths 3/4..1 of ``seq``, right padded, loss on the second half of each row: an SFT-like
completion mask), LoRA r=16 alpha=32 on every block Linear with the same initial A (drawn per layer
from a seeded generator; B = 0), 8-bit AdamW (lr 1e-4, no weight decay, constant schedule), grad clip 1.0.

Reported per provider: median step time (the first step is warm-up and excluded), tokens/s over
non-pad tokens, process peak RSS (``ru_maxrss``), the loss at every step and the gradient norms.
Checks (a benchmark that fails them raises): gradient norms non-zero and finite; per-step losses of the
providers agree within ``LOSS_RTOL`` (relative), per-step gradient norms and the trained LoRA B's norm
within ``GRAD_RTOL``. Results go to ``bench/results/e2e-<model>-cpu.{json,md}``
and ``e2e-<model>-cpu.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

PROVIDERS = ["fusedtune", "hf_peft"]
GPU_ONLY_PROVIDERS = ["fusedtune_triton", "hf_peft_liger", "unsloth"]  # bench/gpu_e2e.py (where installable)
OPTIONAL_PROVIDERS = ["torchtune"]  # where installed (pip install -e '.[bench]'); Llama-architecture models
METHODS = ["lora", "qlora"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# An MoE model (--model mixtral): LoRA on the attention Linears and on every expert's stacked weights
# (PEFT: target_parameters; fusedtune: the same names in lora.target_modules)
MOE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_WEIGHTS = ["gate_up_proj", "down_proj"]
# The MoE job's model: Mixtral's layout at a size a CPU trains in a fraction of a second a step (4 layers
# of 8 experts: 15.7M expert parameters)
MIXTRAL_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 640,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}
RANK, ALPHA, LR = 16, 32.0, 1e-4
# Same math, different kernels and summation orders (and 8-bit optimizer state rounding): the per-step
# losses agree to well under this; a real divergence (wrong targets, wrong scaling, wrong labels) is far above.
LOSS_RTOL = 2e-3
# The loss moves little in a few steps at this lr (a provider that never updated passed the loss check
# alone), so the gradient norm of every step and the norm of the trained B's are compared as well:
# the tiny job's providers agree to 1e-7 in both (LoRA and QLoRA); adapting only q_proj gave a step-1
# gradient norm 90x smaller, and a provider that never steps leaves B at zero.
GRAD_RTOL = 1e-2
# bf16 (--dtype bf16): both providers round every activation to 8 bits of mantissa, in different places
# (HF's autocast, fusedtune's bf16 model), and the runs drift apart step by step: on SmolLM2 the step-1
# losses and gradient norms agree to 1e-3 and 2e-3, the fifth step's gradient norms to 2.4e-2
BF16_LOSS_RTOL = 5e-3
BF16_GRAD_RTOL = 5e-2
DTYPES = ["fp32", "bf16"]
COLUMNS = [
    "model",
    "method",
    "provider",
    "steps",
    "step_s_median",
    "tokens_per_s",
    "peak_rss_mib",
    "first_loss",
    "last_loss",
    "min_grad_norm",
    "step_time_ratio",
    "paired_ratio_median",
    "peak_rss_ratio",
    "load_avg_1m",
]


class BenchmarkFailed(RuntimeError):
    """Losses that disagree or gradient norms that vanish: the numbers would mean nothing."""


# ---------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------


def model_path(name: str) -> str:
    """``smollm2`` -> the converted built-in model; ``tiny`` -> the tests' 2-layer Llama (built once)."""
    if name == "smollm2":
        from fusedtune.trainer.config import ModelConfig
        from fusedtune.trainer.model import resolve_model_path

        return resolve_model_path(ModelConfig(name_or_path="smollm2-135m-instruct"))
    if name == "tiny":
        target = Path(tempfile.gettempdir()) / "fusedtune-bench-tiny-llama"
        if not (target / "config.json").is_file():
            sys.path.insert(0, str(ROOT / "tests" / "helpers"))
            from tiny import build_tiny_model

            build_tiny_model(target)
        return str(target)
    if name == "mixtral":
        target = Path(tempfile.gettempdir()) / "fusedtune-bench-mixtral"
        if not (target / "config.json").is_file():
            sys.path.insert(0, str(ROOT / "tests" / "helpers"))
            from tiny import build_tiny_model

            build_tiny_model(target, arch="mixtral", **MIXTRAL_SHAPE)
        return str(target)
    if Path(name).is_dir():
        return name
    raise SystemExit(f"error: --model: expected smollm2, tiny, mixtral or a model directory, got {name!r}")


def is_moe(path: str) -> bool:
    cfg = json.loads((Path(path) / "config.json").read_text())
    return bool(cfg.get("num_local_experts") or cfg.get("num_experts"))


def targets(path: str) -> tuple[list[str], list[str]]:
    """(Linear targets, expert weight targets) of the job's model."""
    return (MOE_TARGETS, EXPERT_WEIGHTS) if is_moe(path) else (TARGETS, [])


def all_targets(path: str) -> list[str]:
    linears, expert_weights = targets(path)
    return [*linears, *expert_weights]


def make_batches(vocab: int, n: int, batch: int, seq: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` micro-batches ``[batch, seq]``: lengths in [3/4·seq, seq], right padded, loss on each row's second half."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        lengths = torch.randint(seq * 3 // 4, seq + 1, (batch,), generator=g)
        lengths[0] = seq  # the widest row sets the width
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids * mask  # pad id 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : seq // 2] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _init_lora_a(layer_name: str, shape: torch.Size) -> torch.Tensor:
    """The same initial A for both providers: kaiming-uniform(a=√5) bounds from a per-layer seed."""
    seed = sum((i + 1) * ord(c) for i, c in enumerate(layer_name)) % (2**31)
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / shape[1] ** 0.5
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def _layer_key(param_name: str) -> str:
    """``...model.layers.3.self_attn.q_proj.lora_A(.default).weight`` -> ``layers.3.self_attn.q_proj``;
    an expert weight's adapter -> ``layers.3.mlp.experts.gate_up_proj`` (fusedtune:
    ``experts.fusedtune_lora.gate_up_proj.lora_A``; PEFT nests one wrapper per weight, the first innermost:
    ``experts.base_layer.lora_A`` is gate_up_proj's, ``experts.lora_A`` down_proj's)."""
    head = param_name.split(".lora_A")[0]
    head = head[head.index("layers.") :]
    if ".experts.fusedtune_lora." in head:
        return head.replace(".fusedtune_lora.", ".")
    if head.endswith(".experts.base_layer"):
        return head.removesuffix(".base_layer") + "." + EXPERT_WEIGHTS[0]
    if head.endswith(".experts"):
        return head + "." + EXPERT_WEIGHTS[1]
    return head


def _set_lora_a(model: torch.nn.Module) -> int:
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:  # experts: PEFT's [E·r, K], fusedtune's [E, r, K] (same rows)
                shape = (p.shape[0] * p.shape[1], p.shape[2]) if p.dim() == 3 else p.shape
                p.copy_(_init_lora_a(_layer_key(name), shape).reshape(p.shape).to(p.dtype))
                n += 1
    return n


# ---------------------------------------------------------------------------------------------------
# Workers (one provider per process)
# ---------------------------------------------------------------------------------------------------


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def fusedtune_setup(job: dict):
    """The trainer's own set-up for ``job``: (cfg, model, trainable params, optimizer, backend, device).

    ``job["kernels"]`` picks the kernels (default: ``auto`` on CUDA, ``torch`` on the CPU).
    """
    from fusedtune.trainer.adapt import apply_method
    from fusedtune.trainer.config import Config
    from fusedtune.trainer.model import load_model
    from fusedtune.trainer.optim import build_optimizer, trainable_parameters
    from fusedtune.trainer.patches import apply_patches

    on_gpu = job.get("device") == "cuda"
    cfg = Config.model_validate(
        {
            "method": job["method"],
            "kernels": job.get("kernels", "auto" if on_gpu else "torch"),
            "model": {"name_or_path": job["model_path"], "dtype": job.get("dtype", "fp32")},
            "lora": {
                "rank": RANK,
                "alpha": ALPHA,
                "dropout": 0.0,
                "target_modules": all_targets(job["model_path"]),
            },
            "quant": {"quant_type": "nf4", "double_quant": True, "blocksize": 64},
            "data": {"task": "dates", "max_seq_len": job["seq"]},
            "optim": {"name": "adamw8bit", "lr": LR, "weight_decay": 0.0, "schedule": "constant"},
            "train": {"micro_batch_size": job["batch"], "grad_accum": job["grad_accum"]},
        }
    )
    device = torch.device(job.get("device", "cpu"))
    load_device = torch.device("cpu") if cfg.method == "qlora" else device
    model, _ = load_model(cfg.model.name_or_path, cfg.model, device, load_device)
    report = apply_method(model, cfg, device)
    lines = report.lines() + apply_patches(
        model, cfg.train.padding_free, cfg.data.max_seq_len, report.backend
    )
    print("\n".join(lines), file=sys.stderr, flush=True)  # what took which path (the worker's stderr)
    model.train()
    _set_lora_a(model)
    params = [p for _, p in trainable_parameters(model)]
    optimizer = build_optimizer(model, cfg.optim)
    return cfg, model, params, optimizer, report.backend, device


def run_fusedtune(job: dict, batches: list[dict]) -> dict:
    """The trainer's own path, one optimizer step per ``grad_accum`` micro-batches."""
    from fusedtune.trainer.loop import optimizer_step

    cfg, model, params, optimizer, backend, device = fusedtune_setup(job)
    load_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    times, losses, norms = [], [], []
    accum = job["grad_accum"]
    for step in range(job["steps"]):
        micro = [{k: v.to(device) for k, v in b.items()} for b in batches[step * accum : (step + 1) * accum]]
        _sync(device)
        t0 = time.perf_counter()
        r = optimizer_step(model, params, micro, optimizer, 1.0, backend)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(r.loss)
        norms.append(r.grad_norm)
    out = {
        "times": times,
        "losses": losses,
        "grad_norms": norms,
        "lora_b_norm": lora_b_norm(model),
        "cuda_load_max_allocated": load_peak,
    }
    if device.type == "cuda":  # `trainer estimate` at the shapes that ran, beside the measured peak
        from fusedtune.trainer import padding_free
        from fusedtune.trainer.estimate import estimate_for_batches, micro_batch_shape

        packed = padding_free.enabled(model)
        shapes = [micro_batch_shape(b, packed) for b in batches[: job["steps"] * accum]]
        est = estimate_for_batches(cfg, shapes, on_gpu=True)
        out.update(estimate_tensor_bytes=est.tensor_bytes, estimate_total_bytes=est.total_bytes)
    return out


def lora_b_norm(model, key: str = "lora_B") -> float:
    """The L2 norm of every LoRA B after training (parameters named with ``key``: torchtune's is
    ``lora_b``): B starts at zero, so it is what the steps did."""
    sq = sum(float(p.detach().float().square().sum()) for n, p in model.named_parameters() if key in n)
    return sq**0.5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_hf_peft(job: dict, batches: list[dict], liger: bool = False, model=None) -> dict:
    """HF Trainer + PEFT + bitsandbytes, configured as their docs show (``liger``: Liger's Llama patches first)."""
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    on_gpu = job.get("device") == "cuda"
    dtype = torch.bfloat16 if job.get("dtype") == "bf16" else torch.float32
    kwargs = {"dtype": dtype}
    if on_gpu:
        kwargs["device_map"] = {"": 0}
    if job["method"] == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(job["model_path"], **kwargs)
        model.config.use_cache = False
        linears, expert_weights = targets(job["model_path"])
        lora = LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            target_modules=linears,
            target_parameters=[f"mlp.experts.{w}" for w in expert_weights] or None,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    load_peak = torch.cuda.max_memory_allocated() if on_gpu else None  # loading (and quantizing) alone
    _set_lora_a(model)

    accum = job["grad_accum"]
    rows = [
        {k: v[i] for k, v in b.items()} for b in batches[: job["steps"] * accum] for i in range(job["batch"])
    ]

    class InOrder(torch.utils.data.IterableDataset):  # no sampler: the rows arrive in this order
        def __iter__(self):
            return iter(rows)

        def __len__(self):
            return len(rows)

    times, losses, norms = [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync(torch.device("cuda" if on_gpu else "cpu"))
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(torch.device("cuda" if on_gpu else "cpu"))
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                norms.append(float(logs.get("grad_norm", float("nan"))))

    out_dir = tempfile.mkdtemp(prefix="hf-bench-")
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=job["batch"],
        gradient_accumulation_steps=accum,
        max_steps=job["steps"],
        learning_rate=LR,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        optim="adamw_bnb_8bit",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not on_gpu,
        bf16=dtype == torch.bfloat16,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=InOrder(), callbacks=[Timer()])
    trainer.train()
    return {
        "times": times,
        "losses": losses,
        "grad_norms": norms,
        "lora_b_norm": lora_b_norm(model),
        "cuda_load_max_allocated": load_peak,
    }


# torchtune's names for the Linears (``layers.3.attn.output_proj``) -> the HF names (``layers.3.self_attn.o_proj``)
_TUNE_TO_HF = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w3": "mlp.up_proj",
    "mlp.w2": "mlp.down_proj",
}


TORCHAO_NF4_MULTIPLE = 64 * 256  # torchao's to_nf4: blocks of 64, their scales double-quantized 256 at a time


def torchtune_skip(path: str, method: str) -> str | None:
    """Why the torchtune provider cannot run ``method`` on the model at ``path`` (None: it can)."""
    import importlib.util

    if importlib.util.find_spec("torchtune") is None:
        return "torchtune not installed (pip install -e '.[bench]')"
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type != "llama":
        return f"this provider builds torchtune's Llama; the model is {cfg.model_type}"
    if (why := _not_plain_llama(cfg)) is not None:
        return f"this provider builds torchtune's Llama with plain RoPE and no biases; {why}"
    if method == "qlora":
        h = cfg.hidden_size
        kv = cfg.num_key_value_heads * h // cfg.num_attention_heads
        outs = {
            "q_proj": h,
            "k_proj": kv,
            "gate_proj": cfg.intermediate_size,
        }  # the other Linears share these
        bad = [(name, rows) for name, rows in outs.items() if rows * h % TORCHAO_NF4_MULTIPLE]
        if bad:
            name, rows = bad[0]
            return (
                f"torchtune's QLoRA (torchao's NF4) takes weights of a multiple of {TORCHAO_NF4_MULTIPLE} elements only; "
                f"{name} is {rows}x{h}"
            )
    return None


def _not_plain_llama(cfg) -> str | None:
    """Why torchtune's Llama builder cannot hold this Llama config (None: it can)."""
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None)}
    if rope.get("rope_type", "default") != "default":
        return f"this one's RoPE is {rope.get('rope_type')!r}"
    if cfg.attention_bias or cfg.mlp_bias:
        return "this one has biases"
    if getattr(cfg, "head_dim", None) not in (None, cfg.hidden_size // cfg.num_attention_heads):
        return f"this one's head_dim {cfg.head_dim} is not hidden_size / heads"
    return None


def build_torchtune_model(path: str, method: str, dtype: torch.dtype, seq: int) -> torch.nn.Module:
    """The checkpoint at ``path`` (a Llama-architecture HF model) as torchtune's LoRA Llama, adapters on every
    block Linear, weights converted by torchtune's own ``hf_to_tune`` (QLoRA: its NF4 base, torchao's format).

    torchtune's Llama 3.2 builder (tied or untied head) with its RoPE replaced by the plain one at the
    checkpoint's theta: the 3.2 builder's is Llama 3.1's frequency-scaled RoPE, which other Llamas
    (SmolLM2) do not use.
    """
    from safetensors.torch import load_file
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.llama3_2._component_builders import lora_llama3_2
    from torchtune.modules import RotaryPositionalEmbeddings
    from torchtune.modules.peft import get_adapter_params, set_trainable_params
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    if (why := torchtune_skip(path, method)) is not None:  # the driver skips these before they get here
        raise BenchmarkFailed(f"torchtune provider: {why}")
    theta = (getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta})["rope_theta"]
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # as torchtune's recipes build it (training.set_default_dtype): the adapters in the model's dtype too
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = lora_llama3_2(
            ["q_proj", "k_proj", "v_proj", "output_proj"],
            apply_lora_to_mlp=True,
            apply_lora_to_output=False,
            vocab_size=cfg.vocab_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            embed_dim=cfg.hidden_size,
            max_seq_len=seq,
            intermediate_dim=cfg.intermediate_size,
            norm_eps=cfg.rms_norm_eps,
            lora_rank=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            quantize_base=method == "qlora",
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
        plain = RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=seq, base=theta)
    finally:
        torch.set_default_dtype(default)
    for layer in model.layers:
        layer.attn.pos_embeddings = plain
    hf_state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        hf_state.update(load_file(str(f)))
    state = hf_to_tune(
        hf_state, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, dim=cfg.hidden_size
    )
    if cfg.tie_word_embeddings:
        state.pop("output.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if ".lora_" not in m]
    if missing or unexpected:
        raise BenchmarkFailed(
            f"torchtune provider: weights missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    del hf_state, state
    set_trainable_params(model, get_adapter_params(model))
    with torch.no_grad():  # the same initial A as the other providers (B starts at zero in all of them)
        for name, p in model.named_parameters():
            if name.endswith("lora_a.weight"):
                _, layer, proj = name.removesuffix(".lora_a.weight").split(".", 2)
                key = f"layers.{layer}.{_TUNE_TO_HF[proj]}"
                p.copy_(_init_lora_a(key, p.shape).to(p.dtype))
    return model


def run_torchtune(job: dict, batches: list[dict]) -> dict:
    """torchtune's single-device LoRA / QLoRA recipe (``lora_finetune_single_device``), its training loop as
    written there: its model and LoRA modules, its chunked-output cross-entropy, the loss normalized over
    the step's target tokens (``scale_grads``), ``clip_grad_norm_``; the same 8-bit AdamW as the others
    (torchtune's configs take any optimizer class)."""
    import bitsandbytes as bnb
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    if job.get("device") == "cuda":
        raise BenchmarkFailed("torchtune provider: CPU only here")
    dtype = torch.bfloat16 if job.get("dtype") == "bf16" else torch.float32
    model = build_torchtune_model(job["model_path"], job["method"], dtype, job["seq"])
    model.train()
    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(params, lr=LR, weight_decay=0.0)
    accum = job["grad_accum"]
    times, losses, norms = [], [], []
    for step in range(job["steps"]):
        micro = batches[step * accum : (step + 1) * accum]
        t0 = time.perf_counter()
        running, n_tokens = 0.0, 0
        for b in micro:
            labels = b["labels"]
            labels = torch.hstack((labels[..., 1:], torch.full_like(labels[..., :1], loss_fn.ignore_index)))
            current = int((labels != loss_fn.ignore_index).sum())
            n_tokens += current
            logits = model(b["input_ids"])  # right padding: causal attention keeps it out of the real tokens
            loss = loss_fn(logits, labels) * current
            del logits
            running += float(loss)
            loss.backward()
        for p in params:  # torchtune.training.scale_grads (that module needs a torchao older than PEFT takes)
            p.grad.mul_(1 / n_tokens)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(running / n_tokens)
        norms.append(float(norm))
    return {
        "times": times,
        "losses": losses,
        "grad_norms": norms,
        "lora_b_norm": lora_b_norm(model, "lora_b"),
    }


def run_unsloth(job: dict, batches: list[dict]) -> dict:
    """Unsloth's FastLanguageModel + its LoRA, trained by the same HF Trainer set-up (GPU only)."""
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        job["model_path"],
        max_seq_length=job["seq"],
        dtype=torch.bfloat16,
        load_in_4bit=job["method"] == "qlora",
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=TARGETS,
        use_gradient_checkpointing=False,
    )
    return run_hf_peft(job, batches, model=model)


def worker(provider: str, job: dict) -> dict:
    """One provider, one method: build the batches, train, measure."""
    torch.manual_seed(0)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(job["model_path"]).vocab_size
    batches = make_batches(vocab, job["steps"] * job["grad_accum"], job["batch"], job["seq"])
    if provider == "fusedtune":
        result = run_fusedtune(job, batches)
    elif provider == "fusedtune_triton":  # kernels: triton, the fused LoRA kernels forced (GPU runs)
        result = run_fusedtune(dict(job, kernels="triton"), batches)
    elif provider == "unsloth":
        result = run_unsloth(job, batches)
    elif provider == "torchtune":
        result = run_torchtune(job, batches)
    else:
        result = run_hf_peft(job, batches, liger=provider == "hf_peft_liger")
    used = batches[: job["steps"] * job["grad_accum"]]
    tokens = [
        sum(int(b["attention_mask"].sum()) for b in used[s * job["grad_accum"] : (s + 1) * job["grad_accum"]])
        for s in range(job["steps"])
    ]
    result.update(peak_rss=_rss_peak(), tokens_per_step=tokens, threads=torch.get_num_threads())
    result["load_avg_1m"] = os.getloadavg()[0]  # other work on the machine while this provider ran
    if job.get("device") == "cuda":
        result.update(
            cuda_max_allocated=torch.cuda.max_memory_allocated(),
            cuda_max_reserved=torch.cuda.max_memory_reserved(),
        )
    return result


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def run_provider(provider: str, job: dict, timeout: float | None = None) -> dict:
    """Run one provider in a fresh Python process and return its measurements."""
    cmd = [
        sys.executable,
        "-P",
        str(Path(__file__).resolve()),
        "--worker",
        provider,
        "--job",
        json.dumps(job),
    ]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
        raise BenchmarkFailed(f"{provider} {job['method']}: worker failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT ") :])


def summarize(model: str, method: str, provider: str, res: dict) -> dict:
    """A results row from one worker's measurements."""
    timed = res["times"][1:] or res["times"]  # step 1 is warm-up
    median = statistics.median(timed)
    tokens = statistics.median(res["tokens_per_step"][1:] or res["tokens_per_step"])
    return {
        "model": model,
        "method": method,
        "provider": provider,
        "steps": len(res["times"]),
        "step_s_median": median,
        "step_s_all": res["times"],
        "tokens_per_s": tokens / median,
        "peak_rss_mib": res["peak_rss"] / 2**20,
        "first_loss": res["losses"][0],
        "last_loss": res["losses"][-1],
        "losses": res["losses"],
        "grad_norms": res["grad_norms"],
        "min_grad_norm": min(res["grad_norms"]),
        "lora_b_norm": res.get("lora_b_norm"),
        "threads": res["threads"],
        "load_avg_1m": res.get("load_avg_1m"),
    }


def check(rows: list[dict], rtol: float = LOSS_RTOL, grad_rtol: float = GRAD_RTOL) -> None:
    """Fail loudly: every gradient norm non-zero and finite; the providers' per-step losses equal within
    ``rtol``, their per-step gradient norms and the norms of their trained LoRA B's within ``grad_rtol``.

    Raises:
        BenchmarkFailed: naming the provider, method and step.
    """
    rows = [r for r in rows if "skipped" not in r]
    for r in rows:
        bad = [g for g in r["grad_norms"] if not (g > 0 and g == g and g != float("inf"))]
        if bad or len(r["grad_norms"]) != r["steps"]:
            raise BenchmarkFailed(
                f"{r['provider']} {r['method']}: gradient norms {r['grad_norms']} (zero or non-finite)"
            )
    by_method: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], {})[r["provider"]] = r
    for method, prov in by_method.items():
        base = prov.get("hf_peft")
        if base is None:
            continue
        for name, r in prov.items():
            if len(r["losses"]) != len(base["losses"]):
                raise BenchmarkFailed(
                    f"{method}: {name} logged {len(r['losses'])} losses, hf_peft {len(base['losses'])}"
                )
            for step, (a, b) in enumerate(zip(r["losses"], base["losses"]), 1):
                if abs(a - b) > rtol * abs(b):
                    raise BenchmarkFailed(
                        f"{method} step {step}: {name} loss {a:.6f} vs hf_peft {b:.6f} "
                        f"(relative difference {abs(a - b) / abs(b):.2e} > {rtol})"
                    )
            for step, (a, b) in enumerate(zip(r["grad_norms"], base["grad_norms"]), 1):
                if abs(a - b) > grad_rtol * abs(b):
                    raise BenchmarkFailed(
                        f"{method} step {step}: {name} gradient norm {a:.6g} vs hf_peft {b:.6g} "
                        f"(relative difference {abs(a - b) / abs(b):.2e} > {grad_rtol})"
                    )
            a, b = r.get("lora_b_norm"), base.get("lora_b_norm")
            if a is not None and b is not None and not (a > 0 and abs(a - b) <= grad_rtol * b):
                raise BenchmarkFailed(
                    f"{method}: {name} trained LoRA B to norm {a:.6g}, hf_peft to {b:.6g} (not within {grad_rtol})"
                )


def add_ratios(rows: list[dict]) -> None:
    """``step_time_ratio`` and ``peak_rss_ratio`` against hf_peft of the same method (target: <= 0.8)."""
    base = {r["method"]: r for r in rows if r["provider"] == "hf_peft"}
    for r in rows:
        b = base.get(r["method"])
        if b and "skipped" not in r:
            r["step_time_ratio"] = r["step_s_median"] / b["step_s_median"]
            r["peak_rss_ratio"] = r["peak_rss_mib"] / b["peak_rss_mib"]
            # Round by round (each round runs the providers back to back): robust to the machine drifting.
            pairs = zip(r.get("round_medians", []), b.get("round_medians", []), strict=False)
            paired = [mine / theirs for mine, theirs in pairs]
            if paired:
                r["paired_ratio_median"] = statistics.median(paired)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Step time and peak RSS per provider, grouped by method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "skipped" not in r]
    methods = sorted({r["method"] for r in rows}, key=METHODS.index)
    provs = [
        p
        for p in PROVIDERS + OPTIONAL_PROVIDERS + GPU_ONLY_PROVIDERS
        if any(r["provider"] == p for r in rows)
    ]
    gpu = all("max_allocated_gib" in r for r in rows)
    memory = ("max_allocated_gib", "CUDA max allocated (GiB)") if gpu else ("peak_rss_mib", "peak RSS (MiB)")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "step_s_median", "median step time (s)"), (axes[1], *memory)):
        width = 0.8 / len(provs)
        for j, p in enumerate(provs):
            vals = [
                next((r[key] for r in rows if r["method"] == m and r["provider"] == p), 0) for m in methods
            ]
            xs = [i + j * width for i in range(len(methods))]
            bars = ax.bar(xs, vals, width, label=p)
            ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks([i + width * (len(provs) - 1) / 2 for i in range(len(methods))], methods)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_benchmark(
    model: str = "tiny",
    methods: list[str] = METHODS,
    seq: int = 64,
    batch: int = 4,
    grad_accum: int = 1,
    steps: int = 5,
    out_dir: Path | str | None = None,
    write: bool = True,
    threads: int | None = None,
    rounds: int = 1,
    log=print,
    dtype: str = "fp32",
) -> list[dict]:
    """Run every provider on every method, check, and (optionally) write results.

    Returns:
        The result rows (one per provider and method).

    Raises:
        BenchmarkFailed: a worker failed, losses disagree, or a gradient norm vanished.
    """
    from report import device_slug, environment, write_results

    path = model_path(model)
    if is_moe(path) and "qlora" in methods:
        # transformers' BitsAndBytesConfig packs the Linears only: the experts' 3-D weights stay dense (checked
        # on this Mixtral: 15.7M fp32 expert parameters after load_in_4bit), where fusedtune packs them, so
        # the two QLoRA jobs are different models (the gradient-norm check fails them at step 2)
        raise SystemExit(
            f"error: --methods qlora: on an MoE model HF + bitsandbytes leaves the expert weights unquantized "
            f"and fusedtune packs them: not the same job; run --methods lora for {model}"
        )
    rows = []
    for method in methods:
        job = {
            "model_path": path,
            "method": method,
            "seq": seq,
            "batch": batch,
            "grad_accum": grad_accum,
            "steps": steps,
            "threads": threads,
            "dtype": dtype,
        }
        best: dict[str, dict] = {}
        skipped = {p: torchtune_skip(path, method) for p in OPTIONAL_PROVIDERS}
        for p, why in skipped.items():
            if why:
                log(f"{model} {method} {p}: skipped ({why})")
        providers = PROVIDERS + [p for p in OPTIONAL_PROVIDERS if not skipped[p]]
        for round_ in range(1, rounds + 1):  # providers interleaved, so a busy spell hits all
            for provider in providers:
                log(
                    f"{model} {method} {provider} (round {round_}/{rounds}): {steps} steps of {grad_accum}x[{batch}x{seq}] ..."
                )
                row = summarize(model, method, provider, run_provider(provider, job))
                row.update(seq=seq, batch=batch, grad_accum=grad_accum, dtype=dtype)
                log(
                    f"  median step {row['step_s_median']:.3f} s, {row['tokens_per_s']:.0f} tok/s, "
                    f"peak RSS {row['peak_rss_mib']:.0f} MiB, loss {row['first_loss']:.4f} -> {row['last_loss']:.4f}"
                )
                medians = [*best.get(provider, {}).get("round_medians", []), row["step_s_median"]]
                if provider not in best or row["step_s_median"] < best[provider]["step_s_median"]:
                    best[provider] = row
                best[provider]["round_medians"] = medians
        rows += [best[p] for p in providers]
        rows += [
            {"model": model, "method": method, "provider": p, "skipped": why}
            for p, why in skipped.items()
            if why
        ]
    add_ratios(rows)
    loss_rtol, grad_rtol = (BF16_LOSS_RTOL, BF16_GRAD_RTOL) if dtype == "bf16" else (LOSS_RTOL, GRAD_RTOL)
    check(rows, loss_rtol, grad_rtol)
    if write:
        if threads:
            torch.set_num_threads(threads)  # so the recorded device names the workers' thread count
        name = f"e2e-{model}" if dtype == "fp32" else f"e2e-{model}-{dtype}"
        columns = COLUMNS + (["skipped"] if any("skipped" in r for r in rows) else [])
        json_path = write_results(name, rows, columns, out_dir)
        env = environment()
        title = (
            f"{name}: LoRA r={RANK} on all block Linears, {grad_accum}x[{batch}x{seq}], {steps} steps, {dtype} — "
            f"{env['device']}"
        )
        plot(rows, json_path.with_suffix(".png"), title)
        md = json_path.with_suffix(".md")
        md.write_text(
            md.read_text()
            + f"\nJob: {model}, LoRA r={RANK} alpha={ALPHA:g} on {', '.join(all_targets(path))}; micro-batch {batch} x seq {seq} "
            f"(rows 3/4..1 of seq, loss on each row's second half), grad_accum {grad_accum}, {steps} optimizer steps, "
            f"{_dtype_words(dtype)}, 8-bit AdamW lr {LR:g}. Median over steps 2..{steps} (with {rounds} interleaved round(s) per provider, the "
            f"round with the lowest median; all round medians are in the JSON); tokens/s counts non-pad tokens; "
            f"peak RSS of each provider's own process. Per-step losses agree within {loss_rtol:g} relative, per-step "
            f"gradient norms and the trained LoRA B's norm within {grad_rtol:g}; grad norms non-zero. Ratios: each provider / hf_peft (fusedtune's target: <= 0.8): step_time_ratio of the best rounds, "
            f"paired_ratio_median the median over rounds of the two providers' ratio within a round. "
            f"torchtune: its single-device LoRA recipe's training loop (its Llama modules with the checkpoint's "
            f"plain RoPE, weights by its hf_to_tune, CEWithChunkedOutputLoss, adapters in the model's dtype) with the "
            f"same 8-bit AdamW. "
            f"Device slug: {device_slug()}.\n"
        )
        log(f"wrote {json_path}, {md}, {json_path.with_suffix('.png')}")
    return rows


def _dtype_words(dtype: str) -> str:
    if dtype == "fp32":
        return "fp32"
    return (
        "bf16 (HF: the model loaded in bf16, TrainingArguments(bf16=True), PEFT's adapters in fp32; "
        "fusedtune: model.dtype bf16, adapters in fp32)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny", help="smollm2, tiny, mixtral (a small MoE), or a model directory"
    )
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seq", type=int, default=None, help="default: 256 for smollm2, 64 for tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--rounds", type=int, default=1, help="interleaved runs per provider; the fastest is kept"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (default: torch's)"
    )
    parser.add_argument(
        "--dtype", default="fp32", choices=DTYPES, help="the model's dtype for both providers (default fp32)"
    )
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument(
        "--worker", choices=[*PROVIDERS, *OPTIONAL_PROVIDERS, *GPU_ONLY_PROVIDERS], help=argparse.SUPPRESS
    )
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        print("RESULT " + json.dumps(worker(args.worker, json.loads(args.job))), flush=True)
        return 0
    seq = args.seq or (256 if args.model == "smollm2" else 64)
    try:
        run_benchmark(
            args.model,
            args.methods,
            seq,
            args.batch,
            args.grad_accum,
            args.steps,
            args.out,
            threads=args.threads,
            rounds=args.rounds,
            dtype=args.dtype,
        )
    except BenchmarkFailed as e:
        print(f"BENCHMARK FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
