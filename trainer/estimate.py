"""``trainer estimate``: what a run will hold in memory, predicted without loading a single weight.

The model is built from its config on the meta device (shapes only) and adapted as the config says;
the exact parts are then counted over those shapes, and the rest follows from formulas.

Exact (the same bytes the live tensors hold after a step, checked by tests):

- frozen weights by format: dense (fp32/bf16/fp16) ``numel · bytes``; NF4/FP4 ``⌈NK/2⌉`` packed bytes plus
  4 bytes of fp32 absmax per block, or with double quant 1 byte per block + a 4-byte offset + 4 bytes
  per 256 blocks + the 1 KiB fp32 nested code table; int8 ``N·K`` bytes + a 4-byte scale per row;
- trainable parameters, and their gradients (trainable only, in the parameter's dtype);
- optimizer state: :func:`memory.expected_optimizer_state_bytes` (bitsandbytes' 8-bit layout).

Formulas (a Llama-style decoder block, per token, with ``h`` hidden, ``i`` intermediate, ``n``/``n_kv``
query/key-value heads of dim ``d``, LoRA rank ``r``; ``T = B·S`` tokens of a micro-batch; ``b`` bytes of
the compute dtype). What autograd saves depends on what trains where, so each block is walked op by op
(:func:`block_saved_bytes_per_token`) with what trains in it read off the adapted meta model
(:class:`Training`), and whether its input needs a gradient (something below it trains):

- each RMSNorm whose input needs a gradient: that input upcast to fp32 and its rsqrt, ``4·h + 4``; with a
  trainable weight also its normalized input, ``b·h``; on the fused kernel (``kernels.rmsnorm``, Llama
  and Gemma math) its input in its own dtype and the rsqrt, ``b·h + 4``, when either needs a gradient.
  Gemma 2/3 have four a block (their attention output and MLP output are normalized too);
- a Linear whose weight trains or that carries an adapter: its input (``b·h`` once for q/k/v, once for
  gate/up; ``b·i`` for down_proj, the product; ``b·n·d`` for o_proj, only from packed rows whose
  outputs are concatenated into a new tensor (per-row SDPA: on a GPU, or with attention dropout), since
  otherwise it reads the attention's saved output itself); per
  adapter ``b·r`` (its ``X·Aᵀ``) and with LoRA dropout ``⌈K/8⌉`` (the keep-mask as bits; nothing on the
  fused Triton LoRA path, which regenerates it). A trainable bias alone saves nothing;
- Qwen3-style per-head q/k norms, once q/k need a gradient: their inputs in fp32 and rsqrt,
  ``4·(n·d + n + n_kv·d + n_kv)``;
- attention, once q/k/v need a gradient: q, k, v and the output, ``b·(2·n·d + 2·kv·d)``, and the
  log-sum-exp ``4·n`` (``kv = n`` when a padding mask makes HF repeat the KV heads, ``n_kv`` otherwise),
  and with a padding mask SDPA's own copy of it, ``b·S``;
- the gated MLP: gate and up ``2·b·i`` (``3·b·i`` with silu(gate) when not on the fused SwiGLU);
- once per micro-batch: the RoPE tables ``2·S·d·b`` (one pair per layer type with RoPE parameters of
  its own: Gemma 3's sliding and full layers), the boolean mask that picks the target positions,
  the final norm's input (and normalized input when it trains), the token ids when the embedding trains.
  Padding-free micro-batches (``train.padding_free``) are one unmasked sequence: ``B = 1``, ``S`` = the
  real tokens;
- with gradient checkpointing: each block from the first that trains keeps only its input (``b·h`` per
  token), and one block is recomputed at a time in backward;
- backward holds one block's widest gradients beside them: one intermediate-wide gradient (at the gated
  MLP) and the residual stream's gradient twice, ``b·(i + 2h)`` per token;
- logits and loss: the LM head runs only at the ``T_t`` target positions, fused with the loss and
  chunked (``kernels.cross_entropy``): it saves the ``T_t·h·b`` gradient of the selected hidden states
  when something below the head trains (and, when the head trains, its fp32 gradient ``V·h·4``);
  transient: one chunk of ``c`` rows of logits ``c·V·b`` (plus its fp32 copy on the torch path when
  ``b < 4``) and the selected hidden states; ``T_t = B·(S−1)`` at worst. Its backward scales the saved
  gradients in place; with ``b < 4`` dH goes through one fp32 copy ``T_t·h·4``, freed before a trainable
  head's gradient is made beside its fp32 sum, ``V·h·b``: the larger of the two. The saved tensors are
  freed before the blocks' backward, except a tied head's gradient with gradient accumulation, which
  waits for the embedding's to be added in. A model whose logits are soft-capped or scaled (Gemma 2)
  runs HF's head over every position instead: the soft-capping's tanh output ``b·V`` and, when the head
  trains, its input ``b·h`` per token, and the loss's fp32 log-probabilities and int64 targets,
  ``(4·V + 8)·B·(S−1)`` (:func:`logits_loss_bytes`);
- eager attention (Gemma 2's soft-capped scores): q, k and v with the KV heads repeated ``3·b·n·d``, the
  scores' tanh ``b·n·S`` when soft-capped, the fp32 softmax ``4·n·S`` and its copy in a 16-bit compute
  dtype ``b·n·S``; o_proj's input is then a copy of the output, ``b·n·d``;
- qlora through dequantize + GEMM (the torch path, and the Triton path from
  ``qmatmul.DEQUANT_MIN_TOKENS`` tokens per micro-batch): the widest quantized weight decoded into a
  dense temporary, ``N·K·b``, beside dG and dU in backward;
- the peak of tensors: the weights, the optimizer state, and the fullest moment of the step
  (:func:`peak_of_phases`): the end of the forward, the loss's backward, backward walking the blocks top
  down (saved tensors freed, gradients made), or the optimizer step;
- framework overhead (not tensors): on a GPU the CUDA context and cuBLAS workspaces (taken as 600 MiB)
  plus the caching allocator's slack (taken as 10% of the tensor peak); on a CPU the resident size of
  torch and its libraries, measured in this process.

``--measure`` then runs three real optimizer steps and reports the measured peak beside the estimate
(CUDA: ``max_memory_allocated``; CPU: the peak of live tensor storages, tracked op by op with a
``TorchDispatchMode``, and the growth of the process' peak RSS, which also counts allocator caching),
and what the largest micro-batch saved for backward, activations and loss apart
(:class:`memory.SavedTensorMeter`), beside the formulas' numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from fusedtune.kernels.lora import MAX_RANK as FUSED_MAX_RANK
from fusedtune.kernels.qmatmul import DEQUANT_MIN_TOKENS

from . import experts, memory, padding_free
from .config import Config, QuantConfig
from .errors import ConfigError, UserError
from .optim import half_precision_trainable

GIB = 1024**3
CUDA_CONTEXT_BYTES = 600 * 1024**2
ALLOCATOR_SLACK = 0.10
NESTED_BLOCKS = 256  # bitsandbytes double quant: one fp32 scale per 256 absmax bytes
NESTED_CODE_BYTES = 256 * 4

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"24GB"`` / ``"24GiB"`` / ``"1.5T"`` / ``"800MB"`` / ``"512B"`` -> bytes (GPU memory is quoted in
    binary units: K, M, G, T are powers of 1024, with or without ``i`` and ``B``).

    A unit is required (``24`` alone is refused, not read as 24 bytes), and the size must be at least
    one byte once rounded down.

    Raises:
        UserError: not a size, no unit, or less than one byte.
    """
    m = _SIZE.match(text)
    if not text.strip():
        raise UserError("--gpu-memory: empty; write the card's memory with a unit, e.g. 24GB or 80GiB")
    if not m or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        raise UserError(f"--gpu-memory: cannot read {text!r} as a size; write e.g. 24GB or 80GiB")
    if not m.group(2) and not m.group(3):
        raise UserError(
            f"--gpu-memory: {text!r} has no unit; write e.g. {m.group(1)}GB (or B, KB, MB, TB: binary units)"
        )
    power = " kmgt".index(m.group(2).lower() or " ")
    value = int(float(m.group(1)) * 1024**power)
    if value < 1:
        raise UserError(f"--gpu-memory: must be positive, got {text!r} (less than one byte)")
    return value


# ---------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------


@dataclass
class DecoderShape:
    """The dimensions the activation formula needs, read from a HF config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_tables: int = 1  # RoPE cos/sin pairs: one per attention type with its own (Gemma 3: 2)

    @classmethod
    def from_hf_config(cls, hf_cfg) -> DecoderShape:
        """Read a (text) decoder config.

        Raises:
            UserError: a config without the Llama-style fields.
        """
        c = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
        try:
            heads = int(c.num_attention_heads)
            return cls(
                hidden=int(c.hidden_size),
                intermediate=int(getattr(c, "intermediate_size", None) or 4 * c.hidden_size),
                layers=int(c.num_hidden_layers),
                heads=heads,
                kv_heads=int(getattr(c, "num_key_value_heads", None) or heads),
                head_dim=int(getattr(c, "head_dim", None) or c.hidden_size // heads),
                vocab=int(c.vocab_size),
                rope_tables=_rope_tables(c),
            )
        except AttributeError as e:
            raise UserError(f"model: cannot estimate activations for this config ({e})") from None


def _rope_tables(c) -> int:
    """How many RoPE tables a forward builds: one per layer type that has its own RoPE parameters."""
    params, types = getattr(c, "rope_parameters", None), getattr(c, "layer_types", None)
    if not isinstance(params, dict) or not types or not all(isinstance(v, dict) for v in params.values()):
        return 1
    return max(1, len(set(types) & params.keys()))


_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)\.")  # the decoder block a parameter or module name is in
_ATTN_IN = ("q_proj", "k_proj", "v_proj")  # Llama/Qwen/Mistral naming: the Linears reading one input
_MLP_IN = ("gate_proj", "up_proj")


@dataclass
class Training:
    """What trains, where: decides what autograd saves for backward.

    A Linear whose weight trains (or that carries a LoRA adapter) saves its input; one with any trainable
    parameter (a bias alone included) hands a gradient downstream; a norm whose weight trains saves its
    normalized input.

    Attributes:
        blocks: per decoder block, ``(weight, any)``: the leaf names (``q_proj``, ``input_layernorm``...)
            whose weight or adapter trains, and those with any trainable parameter.
        adapted: per block, the LoRA-adapted Linears' leaf names and input widths.
        embedding, final_norm, head, head_bias: whether those train.
    """

    blocks: list[tuple[set[str], set[str]]]
    adapted: list[dict[str, int]]
    embedding: bool = False
    final_norm: bool = False
    head: bool = False
    head_bias: bool = False
    head_lora: bool = False
    rank: int = 0
    dropout: float = 0.0
    qk_norm: bool = False  # Qwen3-style RMSNorms over each head of q and k
    # Gemma 2/3's sandwich norms: post_attention_layernorm normalizes the attention output before the
    # residual add, pre_feedforward_layernorm the MLP's input, post_feedforward_layernorm its output
    sandwich: bool = False
    # eager attention (Gemma 2 asks for it: soft-capped scores) saves its score matrices, not SDPA's
    eager_attention: bool = False
    attn_softcap: bool = False
    # packed rows' attention as one node whose output o_proj reads in place (kernels/attention.py: the
    # CPU without attention dropout); else per-row SDPA outputs concatenated into a tensor of their own
    packed_attention_node: bool = False
    # the LM head fused with the loss at the target positions (loss.head_at_targets_supported); else
    # HF's head over every position, its logits soft-capped (Gemma 2) or not, then F.cross_entropy
    head_at_targets: bool = True
    logit_softcap: bool = False
    norms_fused: bool = False  # the norms run kernels.rmsnorm (patches.fuse_rmsnorm) ...
    unfused_norms: set = field(default_factory=set)  # ... but these (block or None, leaf), which it named
    # With dropout, the torch paths and QLoRA save the keep-mask as bits (kernels/dropout.py); the fused
    # Triton LoRA kernels regenerate it from a seed and save nothing.
    mask_saved: bool = True
    # per block: its MoE experts (experts, top_k, intermediate, gated, adapted weights, shared expert's
    # intermediate or 0), or None for a dense MLP
    moe: list[dict | None] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module, layers: int, rank: int = 0, dropout: float = 0.0) -> Training:
        """Read it off a (meta) model as adapted."""
        t = cls(blocks=[(set(), set()) for _ in range(layers)], adapted=[{} for _ in range(layers)])
        t.rank, t.dropout = rank, dropout
        for name, mod in model.named_modules():
            own = dict(mod.named_parameters(recurse=False))
            lora_a = own.get("lora_A")
            weight = own.get("weight")
            weight_trains = (weight is not None and weight.requires_grad) or (
                lora_a is not None and lora_a.requires_grad
            )
            any_trains = any(p.requires_grad for p in own.values())
            m = _BLOCK_INDEX.search(name)
            if m is None or int(m.group(1)) >= layers:
                continue
            block, leaf = int(m.group(1)), name.rsplit(".", 1)[-1]
            t.qk_norm = t.qk_norm or leaf == "q_norm"
            t.sandwich = t.sandwich or leaf == "pre_feedforward_layernorm"
            if weight_trains:
                t.blocks[block][0].add(leaf)
            if any_trains:
                t.blocks[block][1].add(leaf)
            if lora_a is not None:
                t.adapted[block][leaf] = mod.in_features
        t.moe = [None] * layers
        text_cfg = model.config.get_text_config()
        top_k = int(getattr(text_cfg, "num_experts_per_tok", 0) or 1)
        normalized = bool(getattr(text_cfg, "norm_topk_prob", True))  # the router renormalizes the top k
        for name, mod in experts.expert_modules(model).items():
            m = _BLOCK_INDEX.search(name)
            if m is None or int(m.group(1)) >= layers:
                continue
            first = experts.weight_names(mod)[0]
            parent = model.get_submodule(name.rpartition(".")[0])
            shared = getattr(parent, "shared_expert", None) or getattr(parent, "shared_experts", None)
            t.moe[int(m.group(1))] = {
                "experts": mod.num_experts,
                "top_k": top_k,
                "inter": experts.shape(mod, "down_proj")[1],
                "gated": bool(mod.has_gate),
                "lora": {w for w in experts.weight_names(mod) if experts.lora_of(mod, w) is not None},
                "first": first,
                "shared_inter": getattr(getattr(shared, "down_proj", None), "in_features", 0),
                "transformers_forward": mod.config._experts_implementation != experts.EXPERTS_IMPLEMENTATION,
                "normalized": normalized,
            }
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        t.embedding = emb.weight.requires_grad
        head_lora = getattr(head, "lora_A", None)
        t.head_lora = isinstance(head_lora, nn.Parameter) and head_lora.requires_grad  # LoRA on lm_head
        t.head = head is not None and (head.weight.requires_grad or t.head_lora)
        t.head_bias = head is not None and head.bias is not None and head.bias.requires_grad
        norm = getattr(model.get_decoder(), "norm", None)
        t.final_norm = norm is not None and any(p.requires_grad for p in norm.parameters())
        t.eager_attention = getattr(model.config, "_attn_implementation", None) == "eager"
        t.attn_softcap = bool(getattr(model.config, "attn_logit_softcapping", None))
        from .loss import head_at_targets_supported

        t.head_at_targets = head_at_targets_supported(model)
        t.logit_softcap = bool(getattr(model.config, "final_logit_softcapping", None))
        return t

    def set_norms_fused(self, not_fused: dict[str, str]) -> None:
        """The norms run ``kernels.rmsnorm`` but those in ``not_fused`` (``PatchReport.not_rmsnorm``)."""
        self.norms_fused = True
        for name in not_fused:
            m = _BLOCK_INDEX.search(name)
            self.unfused_norms.add((int(m.group(1)) if m else None, name.rsplit(".", 1)[-1]))

    def norm_fused(self, block: int | None, leaf: str) -> bool:
        """Whether the norm ``leaf`` of decoder block ``block`` (None: the final norm) is fused."""
        return self.norms_fused and (block, leaf) not in self.unfused_norms


def norm_saved_bytes(width: int, rows: int, b: int, grad_in: bool, weight_trains: bool, fused: bool) -> int:
    """What an RMSNorm over ``rows`` rows of ``width`` (per token) saves for backward.

    HF's: its input upcast to fp32 and the rsqrt when the input needs a gradient, and the normalized input
    when the weight trains. Fused (``kernels.rmsnorm``): the input in its own dtype and the fp32 rsqrt
    whenever either needs a gradient.
    """
    if fused:
        return b * width + 4 * rows if grad_in or weight_trains else 0
    return (4 * width + 4 * rows if grad_in else 0) + (b * width if weight_trains else 0)


def block_saved_bytes_per_token(
    shape: DecoderShape,
    training: Training,
    block: int,
    dtype_bytes: int,
    seq: int,
    padded: bool,
    packed: bool,
    grad_in: bool,
    swiglu_fused: bool = True,
) -> tuple[float, bool]:
    """Bytes decoder block ``block`` saves for backward per token (module docstring), walked op by op.

    Args:
        seq: the micro-batch's row length (a padding mask is ``seq`` wide per token).
        grad_in: whether the block's input needs a gradient (something below it trains).

    Returns:
        (bytes per token, whether the block's output needs a gradient, whether its attention's q/k do:
        then RoPE keeps its tables).
    """
    h, i, n, d = shape.hidden, shape.intermediate, shape.heads, shape.head_dim
    kv = n if padded else shape.kv_heads  # HF repeats the KV heads when a padding mask is given
    b = dtype_bytes
    weight, any_ = training.blocks[block]
    adapted = training.adapted[block]
    total = 0.0

    def norm(leaf: str, g: bool) -> bool:
        nonlocal total
        total += norm_saved_bytes(h, 1, b, g, leaf in weight, training.norm_fused(block, leaf))
        return g or leaf in any_

    def linears(leaves: tuple[str, ...], width: int, g: bool, x_saved_elsewhere: bool = False) -> bool:
        nonlocal total
        if weight.intersection(leaves) and not x_saved_elsewhere:
            total += b * width  # the shared input, once
        for leaf in adapted.keys() & set(leaves):
            total += b * training.rank  # X Aᵀ
            if training.dropout > 0 and training.mask_saved:
                total += -(-adapted[leaf] // 8)  # the keep-mask as bits
        return g or bool(any_.intersection(leaves))

    x = norm("input_layernorm", grad_in)
    attn = linears(_ATTN_IN, h, x)
    if training.qk_norm:  # per-head norms of q and k
        q_fused, k_fused = training.norm_fused(block, "q_norm"), training.norm_fused(block, "k_norm")
        total += norm_saved_bytes(n * d, n, b, attn, "q_norm" in weight, q_fused)
        total += norm_saved_bytes(shape.kv_heads * d, shape.kv_heads, b, attn, "k_norm" in weight, k_fused)
    attn = attn or bool(any_.intersection(("q_norm", "k_norm")))
    if attn and training.eager_attention:
        # q and k (its heads repeated) for the scores, the scores' tanh when soft-capped, the fp32 softmax
        # (and its copy in the compute dtype, which the product with v keeps), and v (repeated)
        total += b * 3 * n * d + (b * n * seq if training.attn_softcap else 0) + 4 * n * seq
        total += b * n * seq if b < 4 else 0
    elif attn:  # SDPA: q, k, v, its output and the log-sum-exp
        total += b * (n * d + 2 * kv * d + n * d) + 4 * n
        if padded:  # and its own copy of the padding mask, in the compute dtype
            total += b * seq
    # o_proj reads SDPA's output itself, except from packed rows concatenated into a new tensor (per-row
    # SDPA: on a GPU, or with attention dropout) and from eager attention, whose transposed output is copied
    sdpa_out = attn and not training.eager_attention and (not packed or training.packed_attention_node)
    out = linears(("o_proj",), n * d, attn, x_saved_elsewhere=sdpa_out)
    if training.sandwich:  # the attention output's own norm, before the residual add
        out = norm("post_attention_layernorm", out)
    g = grad_in or out
    x = norm("pre_feedforward_layernorm" if training.sandwich else "post_attention_layernorm", g)
    moe = training.moe[block] if training.moe else None
    if moe is not None:
        moe_saved, down = moe_saved_bytes_per_token(moe, h, b, training.rank, x)
        total += moe_saved
        if moe["shared_inter"]:  # a dense shared expert beside the routed ones (Qwen2-MoE)
            shared = linears(_MLP_IN, h, x)
            if shared:
                total += b * (2 if swiglu_fused else 3) * moe["shared_inter"] + b * (h + 1)  # and its gate
            down = linears(("down_proj",), moe["shared_inter"], shared) or down
        return total, g or down, attn
    mlp = linears(_MLP_IN, h, x)
    if mlp:  # gate and up (and act(gate) when the MLP is not on the fused SwiGLU)
        total += b * (2 if swiglu_fused else 3) * i
    down = linears(("down_proj",), i, mlp)  # its input: the product
    if training.sandwich:
        down = norm("post_feedforward_layernorm", down)
    return total, g or down, attn


def moe_saved_bytes_per_token(moe: dict, h: int, b: int, rank: int, grad_in: bool) -> tuple[float, bool]:
    """What an MoE layer's routed experts (``experts.experts_forward``) save per token, and whether its
    output needs a gradient. Per routed token (``top_k`` of them): the gate/up output and the activation
    (3 intermediate-wide; 2 without a gate), the down projection's output and its routing weight (for
    the weighting's gradient), and where adapted, a projection's input and ``X Aᵀ``. Per token: the
    router's fp32 probabilities and the sort's permutation."""
    lora = moe["lora"]
    if not (grad_in or lora):
        return 0.0, False
    k, i = moe["top_k"], moe["inter"]
    per = b * (3 if moe["gated"] else 2) * i + b * h
    if moe["first"] in lora:
        per += b * (h + rank)
    if "down_proj" in lora:
        per += b * (i + rank)
    # the router (Mixtral's, Qwen's): fp32 probabilities, top-k indices, the renormalization's division
    router = 4 * moe["experts"] + 8 * k + (4 + 4 * k if moe["normalized"] else 0)
    # experts_forward: the sort's permutation, the token index of each routed row, the gathered weights;
    # transformers' grouped_mm forward (experts neither adapted nor packed) also its inverse permutation
    return router + k * (8 + 8 + 4 + (8 if moe["transformers_forward"] else 0)) + k * per, True


@dataclass
class Activations:
    """What a micro-batch's forward saves for backward, and what backward holds beside it."""

    blocks: list[int]  # saved per decoder block (with checkpointing: the block input it keeps)
    shared: int  # saved once: RoPE tables, masks, the final norm's input
    transient: int  # beside them in backward: one block's widest gradients (and a recomputed block)
    hidden_grad: bool = True  # the final hidden states need a gradient (the fused loss then saves dH)
    forward_peak: int = 0  # inside the forward of a block that saves nothing (frozen or checkpointed)

    @property
    def saved(self) -> int:
        return sum(self.blocks) + self.shared


def activation_bytes(
    shape: DecoderShape,
    training: Training,
    dtype_bytes: int,
    batch: int,
    seq: int,
    padded: bool,
    packed: bool,
    checkpointing: bool,
    swiglu_fused: bool = True,
) -> Activations:
    """Activations of a micro-batch of ``batch × seq`` tokens (module docstring)."""
    tokens = batch * seq
    b = dtype_bytes
    g, per_block, first, rope = training.embedding, [], None, False
    for block in range(shape.layers):
        nbytes, g_out, attn = block_saved_bytes_per_token(
            shape, training, block, b, seq, padded, packed, g, swiglu_fused
        )
        per_block.append(int(nbytes * tokens))
        if first is None and (g_out or nbytes):
            first = block
        g, rope = g_out, rope or attn
    first = shape.layers if first is None else first
    shared = 2 * seq * shape.head_dim * b * shape.rope_tables if rope else 0  # the RoPE cos and sin
    hidden = g or training.final_norm  # the final norm's output needs a gradient
    if not training.head_at_targets:  # HF's head over every position
        if training.logit_softcap:
            shared += b * shape.vocab * tokens  # the soft-capping's tanh output
        if training.head:
            shared += b * shape.hidden * tokens  # the head's input
        if training.head_lora:
            shared += b * training.rank * tokens  # its LoRA's X Aᵀ
    elif hidden:  # the boolean mask that picks the target positions' hidden states
        shared += batch * (seq - 1) if padded else tokens
    if training.embedding:
        shared += 8 * tokens  # the token ids the embedding's gradient scatters into
    final = norm_saved_bytes(shape.hidden, 1, b, g, training.final_norm, training.norm_fused(None, "norm"))
    shared += final * tokens
    # Backward holds one block's widest gradients beside the saved activations: one intermediate-wide (at
    # the gated MLP) and the residual stream's gradient twice (the one arriving at the block and the one
    # it builds). Calibrated op by op on the tiny models (tests/trainer/test_estimate.py); it was two
    # intermediate-wide ones while the torch path's SwiGLU backward kept a sigmoid buffer.
    transient = b * (shape.intermediate + 2 * shape.hidden) * tokens if first < shape.layers else 0
    # A block whose forward saves nothing for backward (frozen, below the first that trains, or run under
    # checkpointing) still holds its working set at the MLP: gate, up and their product, beside the
    # residual stream and the norm's output. Calibrated with no block training (partial on lm_head or
    # the final norm; Llamas with h 64-512, i 128-2048): -3.7..+0.9% of the measured peak, against
    # -19..-9% without this phase.
    working = b * (3 * shape.intermediate + 4 * shape.hidden) * tokens
    if checkpointing:  # each block from the first that trains keeps only its input, and one is recomputed
        kept = [b * shape.hidden * tokens if j >= first else 0 for j in range(shape.layers)]
        forward_peak = int(shared + sum(kept) + working)
        return Activations(
            kept, int(shared), int(transient + max(per_block, default=0)), hidden, forward_peak
        )
    forward_peak = int(shared + working) if first > 0 else 0
    return Activations(per_block, int(shared), int(transient), hidden, forward_peak)


def peak_of_phases(
    act: Activations,
    loss_saved: int,
    loss_transient: int,
    block_grads: list[int],
    top_grads: int,
    embedding_grads: int,
    accumulating: bool,
    loss_backward: int = 0,
    tied_head_grad: int = 0,
    optimizer_scratch: int = 0,
) -> tuple[int, str]:
    """The largest of what a step holds at once beyond weights and optimizer state, and when.

    - inside the forward of a block that saves nothing (``act.forward_peak``): its MLP's working set;
    - the end of the forward: every block's saved tensors, the loss's, and one chunk of logits;
    - the loss's backward: every block's saved tensors, the loss's, and ``loss_backward`` (its scaling's
      temporaries: :func:`loss_buffer_bytes`);
    - backward, walking the blocks top down (the loss's saved tensors are gone): at block ``l`` the blocks
      up to ``l`` still hold their saved tensors, the gradients of those above (and of the LM head and
      final norm) exist, and one block's widest gradients sit beside them;
    - a tied, trained embedding's backward: its two gradients and their sum;
    - the optimizer step: every gradient, and the optimizer's temporaries (``optimizer_scratch``).

    With gradient accumulation the gradients of earlier micro-batches are there throughout, and a tied
    LM head's new gradient (``tied_head_grad``) waits through the walk for the embedding's, to be added to
    ``.grad`` together (without accumulation it is counted as the head's gradient already).

    Returns:
        (bytes, the phase's name).
    """
    all_grads = sum(block_grads) + top_grads + embedding_grads
    prior = all_grads if accumulating else 0
    phases = {
        "in a block's forward": act.forward_peak + prior,
        "at the end of the forward": act.saved + loss_saved + loss_transient + prior,
        "in the loss's backward": act.saved + loss_saved + loss_backward + prior,
    }
    held = act.shared + act.transient
    backward = 0
    for block in range(len(act.blocks)):
        grads = prior + tied_head_grad if accumulating else sum(block_grads[block + 1 :]) + top_grads
        backward = max(backward, held + sum(act.blocks[: block + 1]) + grads)
    phases["in backward"] = backward
    if tied_head_grad:
        # a tied, trained embedding's backward: autograd adds the head's and the embedding's gradients out of
        # place, so both addends and their sum are there at once (the sum becomes .grad, or is added to it)
        phases["in the tied embedding's backward"] = (
            prior + 3 * tied_head_grad if accumulating else all_grads + 2 * tied_head_grad
        )
    phases["at the optimizer step"] = all_grads + optimizer_scratch
    phase = max(phases, key=phases.__getitem__)
    return phases[phase], phase


def loss_buffer_bytes(
    vocab: int,
    hidden: int,
    target_tokens: int,
    dtype_bytes: int,
    backend: str,
    head: bool = False,
    head_bias: bool = False,
    hidden_grad: bool = True,
) -> tuple[int, int, int]:
    """The fused, chunked LM head + loss over ``target_tokens`` positions (module docstring).

    Args:
        head, head_bias: the LM head's weight / bias train (the loss then also saves their gradients,
            accumulated in fp32 over the chunks).
        hidden_grad: the hidden states need a gradient (something below the head trains).

    Returns:
        (what it saves for backward, its transient peak in forward: one chunk of logits and the selected
        hidden states, and in its backward: scaling the saved gradients in place, a 16-bit dH goes
        through one fp32 copy, freed before a 16-bit head's gradient is made beside its fp32 sum).
    """
    from fusedtune.kernels.cross_entropy import chunk_rows

    rows = chunk_rows(target_tokens, vocab, dtype_bytes)
    chunk = rows * vocab * (dtype_bytes + (4 if dtype_bytes < 4 and backend == "torch" else 0))
    selected = target_tokens * hidden * dtype_bytes
    acc = max(dtype_bytes, 4)
    dh = selected if hidden_grad else 0
    saved = dh + (vocab * hidden * acc if head else 0) + (vocab * acc if head_bias else 0)
    backward = 0
    if dtype_bytes < 4:
        head_grads = (vocab * hidden * dtype_bytes if head else 0) + (vocab * dtype_bytes if head_bias else 0)
        backward = max(target_tokens * hidden * 4 if hidden_grad else 0, head_grads)
    return saved, chunk + selected, backward


def logits_loss_bytes(vocab: int, batch: int, seq: int, dtype_bytes: int) -> tuple[int, int, int]:
    """HF's LM head over every position, then ``F.cross_entropy`` (models whose logits are soft-capped or
    scaled, :func:`loss.head_at_targets_supported`), for a ``batch × seq`` micro-batch.

    Returns:
        (what the loss saves: the fp32 log-probabilities of the ``B·(S−1)`` predicting positions, pad
        included, their int64 targets and a scalar; its transient in forward: the logits beside their
        fp32 copy; in backward: two fp32 gradients of the log-probabilities).
    """
    positions, logits = batch * (seq - 1), vocab * batch * seq * dtype_bytes
    saved = 4 * vocab * positions + 8 * positions + 4
    return saved, logits + 4 * vocab * positions, 8 * vocab * positions


def packed_weight_bytes(n: int, k: int, quant_type: str, blocksize: int, double_quant: bool) -> int:
    """Bytes of one quantized ``[n, k]`` weight with its scales (``kernels/quant.py``'s layout)."""
    numel = n * k
    if quant_type == "int8":
        return numel + 4 * n
    blocks = -(-numel // blocksize)
    packed = (numel + 1) // 2
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 + 4 * (-(-blocks // NESTED_BLOCKS)) + NESTED_CODE_BYTES


# ---------------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """Every part of the predicted peak, in bytes."""

    frozen_by_format: dict[str, int]
    trainable_params: int
    trainable_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int  # saved for backward, without gradient checkpointing
    activation_bytes_checkpointed: int  # saved for backward, with it
    backward_transient_bytes: int  # beside them in backward: one block's widest gradients
    backward_transient_bytes_checkpointed: int  # ... and one recomputed block
    loss_saved_bytes: int  # the fused loss's saved gradient of the target hidden states
    loss_transient_bytes: int  # one chunk of logits and the target hidden states
    loss_backward_bytes: int  # the loss's backward: fp32 temporaries of its in-place scaling
    overhead_bytes: int
    checkpointing: bool
    target: str  # "cuda" or "cpu"
    dtype: str
    batch: int
    seq: int
    target_tokens: int
    optimizer_name: str
    # the state under the other precision (8-bit <-> 32-bit), for the breakdown's comparison row
    optimizer_alternative: tuple[str, int]
    notes: list[str] = field(default_factory=list)
    # qlora through dequantize + GEMM: the dense copy of one weight that each GEMM decodes into
    dequant_temporary_bytes: int = 0
    # optim.master_weights: the fp32 copies of half-precision trainable weights the optimizer updates
    master_weight_bytes: int = 0
    # activations, loss buffers and gradients at the step's fullest moment (peak_of_phases), and when
    step_peak_bytes: int = 0
    step_peak_phase: str = ""

    @property
    def frozen_bytes(self) -> int:
        return sum(self.frozen_by_format.values())

    @property
    def chosen_activation_bytes(self) -> int:
        return self.activation_bytes_checkpointed if self.checkpointing else self.activation_bytes

    @property
    def chosen_backward_transient_bytes(self) -> int:
        return (
            self.backward_transient_bytes_checkpointed
            if self.checkpointing
            else self.backward_transient_bytes
        )

    @property
    def loss_buffer_bytes(self) -> int:
        return self.loss_saved_bytes + self.loss_transient_bytes

    @property
    def tensor_bytes(self) -> int:
        """The predicted peak of live tensors (what ``max_memory_allocated`` measures)."""
        return (
            self.frozen_bytes
            + self.trainable_bytes
            + self.optimizer_state_bytes
            + self.master_weight_bytes
            + self.step_peak_bytes
            + self.dequant_temporary_bytes
        )

    @property
    def total_bytes(self) -> int:
        return self.tensor_bytes + self.overhead_bytes


def _meta_model(cfg: Config, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import resolve_model_path

    path = resolve_model_path(cfg.model)
    try:
        hf_cfg = AutoConfig.from_pretrained(
            path, local_files_only=not cfg.model.allow_download, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"model.name_or_path: cannot read the config of {path} ({str(e).splitlines()[0]})"
        ) from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                hf_cfg, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
            )
    except ValueError as e:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        first = str(e).splitlines()[0].split(" Model type should")[0]  # not the list of every class known
        what = (
            "cannot be built"
            if hf_cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            else "is not a causal LM"
        )
        raise UserError(f"model.name_or_path: {path} {what} ({first})") from None
    return model, hf_cfg


def _bnb_checkpoint_quant(hf_cfg) -> dict | None:
    """The ``quantization_config`` of a bitsandbytes-quantized checkpoint (as a dict), else None."""
    qc = getattr(hf_cfg, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    if not qc or qc.get("quant_method") != "bitsandbytes":
        return None
    return qc if qc.get("load_in_4bit") or qc.get("load_in_8bit") else None


def _stored_format(cfg: Config, stored: dict) -> QuantConfig:
    """The format a bitsandbytes-quantized checkpoint's Linears are stored in (as ``quant.*`` would say it)."""
    if stored.get("load_in_8bit"):
        return cfg.quant.model_copy(update={"quant_type": "int8"})
    return cfg.quant.model_copy(
        update={
            "quant_type": stored.get("bnb_4bit_quant_type", "nf4"),
            "double_quant": bool(stored.get("bnb_4bit_use_double_quant", False)),
            "blocksize": 64,  # bitsandbytes' 4-bit blocksize when transformers quantizes
        }
    )


def estimate(
    cfg: Config,
    on_gpu: bool | None = None,
    batch: int | None = None,
    seq: int | None = None,
    target_tokens: int | None = None,
    padded: bool | None = None,
) -> Estimate:
    """Predict the memory of ``cfg``'s run without loading weights.

    Args:
        cfg: the resolved config.
        on_gpu: predict for a CUDA device (default: whether this machine has one). Decides ``dtype: auto``
            (bf16 on a GPU) and the framework overhead.
        batch, seq, target_tokens, padded: the micro-batch shape; default the worst case:
            ``train.micro_batch_size × data.max_seq_len``, every position a target, padding unless packing.

    Returns:
        An :class:`Estimate`.

    Raises:
        UserError: a model that cannot be found or adapted.
    """
    from .adapt import apply_method, lora_on_quantized_error, lora_targets, quantized_selection_error
    from .model import DTYPES, resolve_dtype
    from .patches import fuse_rmsnorm, fuse_swiglu

    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    dtype = (
        (torch.bfloat16 if on_gpu else torch.float32)
        if cfg.model.dtype == "auto"
        else DTYPES[cfg.model.dtype]
    )
    if cfg.model.dtype == "auto" and on_gpu == torch.cuda.is_available():
        dtype = resolve_dtype("auto")
    model, hf_cfg = _meta_model(cfg, dtype)
    shape = DecoderShape.from_hf_config(hf_cfg)

    # weights packed at load: by the run (qlora targets and expert stacks, in quant.*), or stored so by a
    # bitsandbytes-quantized checkpoint (every Linear but the head and its skip list, whatever the method)
    quantized: dict[str, tuple[int, int]] = {}
    stored_q: dict[str, tuple[int, int]] = {}
    decoded: dict[str, tuple[int, int]] = {}  # what the QLoRA layers decode for a GEMM: packed or taken over
    shared_codes = 0  # an expert stack keeps one double-quant code table for all its experts
    stored = _bnb_checkpoint_quant(hf_cfg)
    stored_fmt = None if stored is None else _stored_format(cfg, stored)
    if stored is not None:
        if cfg.method == "lora":  # as adapt.apply_method refuses it
            raise ConfigError(lora_on_quantized_error("the checkpoint"))
        skip = set(stored.get("llm_int8_skip_modules") or ())
        head = model.get_output_embeddings()
        stored_q = {
            name: (m.out_features, m.in_features)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and name.rsplit(".", 1)[-1] not in skip
        }
    if cfg.method == "qlora":
        targets, _ = lora_targets(model, cfg.lora.target_modules, cfg.lora.rank)
        quantized = {
            n: (lin.out_features, lin.in_features) for n, lin in targets.items() if n not in stored_q
        }
        for name, (module, weight) in experts.expert_weights(model).items():  # adapt packs every expert
            n_experts, k, n = experts.shape(module, weight)
            quantized.update({f"{name}[{e}]": (n, k) for e in range(n_experts)})
            if cfg.quant.double_quant and cfg.quant.quant_type != "int8":
                shared_codes += (n_experts - 1) * NESTED_CODE_BYTES
        decoded = quantized | {n: stored_q[n] for n in targets if n in stored_q}
        lora_cfg = cfg.model_copy(update={"method": "lora"})
        apply_method(model, lora_cfg, torch.device("meta"))
    else:
        apply_method(model, cfg, torch.device("meta"))
        for name, p in model.named_parameters():  # what the run refuses (adapt._require_trainable)
            if p.requires_grad and name.endswith(".weight") and name.removesuffix(".weight") in stored_q:
                raise ConfigError(quantized_selection_error(cfg.method, name, "bitsandbytes"))

    by_format = memory.frozen_bytes_by_format(model)
    dense = memory.dtype_label(dtype)
    for qc, group, codes in ((cfg.quant, quantized, shared_codes), (stored_fmt, stored_q, 0)):
        if not group:
            continue
        label = memory.quant_format_label(qc.quant_type, qc.double_quant)
        for n, k in group.values():
            by_format[dense] -= n * k * (torch.finfo(dtype).bits // 8)
            by_format[label] = by_format.get(label, 0) + packed_weight_bytes(
                n, k, qc.quant_type, qc.blocksize, qc.double_quant
            )
        by_format[label] -= codes
    by_format = {k: v for k, v in by_format.items() if v}
    qc = cfg.quant if quantized or stored_fmt is None else stored_fmt  # the decoded weights' format

    params = [p for p in model.parameters() if p.requires_grad]
    training = Training.of(model, shape.layers, cfg.lora.rank, cfg.lora.dropout)
    backend = "triton" if on_gpu and cfg.kernels != "torch" else "torch"
    # auto keeps the fused LoRA kernels when there is dropout (adapt.lora_layer_backend)
    training.mask_saved = cfg.method == "qlora" or backend == "torch"
    swiglu = fuse_swiglu(model, backend)
    swiglu_fused = bool(swiglu.swiglu) and not swiglu.not_swiglu
    norms = fuse_rmsnorm(model, backend)
    if norms.rmsnorm:
        training.set_norms_fused(norms.not_rmsnorm)
    packed = cfg.train.padding_free and padding_free.unsupported_reason(model, cfg.data.max_seq_len) is None
    training.packed_attention_node = not on_gpu and not getattr(model.config, "attention_dropout", 0.0)
    b = torch.finfo(dtype).bits // 8
    batch = batch or cfg.train.micro_batch_size
    seq = seq or cfg.data.max_seq_len
    padded = (not cfg.data.packing and not packed) if padded is None else padded
    target_tokens = batch * (seq - 1) if target_tokens is None else target_tokens
    act = {
        ckpt: activation_bytes(
            shape, training, b, batch, seq, padded, packed and not padded, ckpt, swiglu_fused
        )
        for ckpt in (False, True)
    }
    if training.head_at_targets:
        loss_saved, loss_transient, loss_backward = loss_buffer_bytes(
            shape.vocab,
            shape.hidden,
            target_tokens,
            b,
            backend,
            training.head,
            training.head_bias,
            act[False].hidden_grad,
        )
    else:
        loss_saved, loss_transient, loss_backward = logits_loss_bytes(shape.vocab, batch, seq, b)
    alt = "adamw32bit" if cfg.optim.name in ("adamw8bit", "paged_adamw8bit") else "adamw8bit"
    # optim.master_weights: the optimizer holds fp32 copies of the half-precision weights (optim.MasterWeights)
    half = [p for _, p in half_precision_trainable(model)] if cfg.optim.master_weights else []
    copied = {id(p) for p in half}
    stepped = [p.to(torch.float32) if id(p) in copied else p for p in params]
    # torch's AdamW off CUDA (optim.build_optimizer): one tensor at a time, sqrt(v) and its denominator as
    # temporaries; on CUDA its fused kernel updates in place
    torch_scratch = 2 if cfg.optim.name == "adamw_torch" and not on_gpu else 0
    scratch = torch_scratch * max((p.nbytes for p in stepped), default=0)
    if half:  # each copy's fp32 gradient, converted from the weight's in turn (then its AdamW temporaries)
        scratch = max(scratch, max(p.numel() * 4 for p in half) * (1 + torch_scratch))
    est = Estimate(
        frozen_by_format=by_format,
        trainable_params=sum(p.numel() for p in params),
        trainable_bytes=sum(p.nbytes for p in params),
        gradient_bytes=sum(p.nbytes for p in params),
        optimizer_state_bytes=memory.expected_optimizer_state_bytes(stepped, cfg.optim.name),
        optimizer_name=cfg.optim.name,
        optimizer_alternative=(alt, memory.expected_optimizer_state_bytes(stepped, alt)),
        master_weight_bytes=sum(p.numel() * 4 for p in half),
        activation_bytes=act[False].saved,
        activation_bytes_checkpointed=act[True].saved,
        backward_transient_bytes=act[False].transient,
        backward_transient_bytes_checkpointed=act[True].transient,
        loss_saved_bytes=loss_saved,
        loss_transient_bytes=loss_transient,
        loss_backward_bytes=loss_backward,
        overhead_bytes=0,
        checkpointing=cfg.model.gradient_checkpointing,
        target="cuda" if on_gpu else "cpu",
        dtype=memory.dtype_label(dtype),
        batch=batch,
        seq=seq,
        target_tokens=target_tokens,
    )
    est.step_peak_bytes, est.step_peak_phase = peak_of_phases(
        act[est.checkpointing],
        loss_saved,
        loss_transient,
        *_gradient_bytes_by_place(model, shape.layers),
        accumulating=cfg.train.grad_accum > 1,
        loss_backward=loss_backward,
        tied_head_grad=_tied_head_grad_bytes(model),
        optimizer_scratch=scratch,
    )
    if not training.head_at_targets:
        est.notes.append(
            "this model's logits are soft-capped or scaled, so its loss runs HF's LM head over every "
            "position and F.cross_entropy: the loss rows count its fp32 log-probabilities"
        )
    layer_torch = backend == "torch" or cfg.lora.rank > FUSED_MAX_RANK  # adapt: such layers run on torch
    if decoded and (layer_torch or batch * seq >= DEQUANT_MIN_TOKENS):
        # The torch path, and the Triton path from DEQUANT_MIN_TOKENS tokens, decode each weight into a
        # dense temporary for one GEMM; in backward the widest one (gate/up's dX) sits beside dG and dU.
        est.dequant_temporary_bytes = max(n * k for n, k in decoded.values()) * b
        if layer_torch and (on_gpu or qc.quant_type == "int8"):
            est.notes.append(
                "qlora dequantize temporary: a lower bound here (the torch reference decodes through fp32 "
                "intermediates; bitsandbytes' CPU 4-bit dequantize and the Triton kernel do not)"
            )
    if on_gpu:  # after every tensor part: the slack scales with their peak
        est.overhead_bytes = CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * est.tensor_bytes)
    else:
        _import_run_libraries(cfg)
        est.overhead_bytes = _process_rss()
    return est


def _import_run_libraries(cfg: Config) -> None:
    """Import what ``trainer run`` loads on its way, so that the process RSS counts their code too: PEFT
    (the adapter's save, LoRA and QLoRA), bitsandbytes (its optimizers) and matplotlib (the loss plot).
    Measured on the tiny test model: the overhead was 433 MiB without them against a run's peak RSS of
    536 MiB (-19%), 507 MiB with them."""
    import importlib

    import matplotlib

    matplotlib.use("Agg")  # as metrics.plot_loss: never a display backend
    names = ["matplotlib.pyplot"]
    if cfg.optim.name != "adamw_torch":
        names.append("bitsandbytes")
    if cfg.method in ("lora", "qlora"):
        names.append("peft")
    for name in names:
        importlib.import_module(name)


def _tied_head_grad_bytes(model: nn.Module) -> int:
    """The gradient a trainable LM head tied to the input embedding hands over (its parameter's size)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    return emb.nbytes if head is not None and head.weight is emb and emb.requires_grad else 0


def _gradient_bytes_by_place(model: nn.Module, layers: int) -> tuple[list[int], int, int]:
    """Gradient bytes of the trainable parameters: (per decoder block, the rest but the input embedding
    (LM head, final norm: their gradients come first in backward), the input embedding (last))."""
    blocks, top, embedding = [0] * layers, 0, 0
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = _BLOCK_INDEX.search(name)
        if m is not None and int(m.group(1)) < layers:
            blocks[int(m.group(1))] += p.nbytes
        elif p is emb and not tied:
            embedding += p.nbytes
        else:
            top += p.nbytes
    return blocks, top, embedding


def _process_rss() -> int:
    """The process' resident memory: torch and the libraries. Freed memory is handed back to the OS
    first (glibc keeps it otherwise: converting the embedded default's GGUF model on first use left
    ~120 MiB that the overhead then counted)."""
    import gc

    import psutil

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    return psutil.Process().memory_info().rss


# ---------------------------------------------------------------------------------------------------
# Suggestions when it does not fit
# ---------------------------------------------------------------------------------------------------


def _with(cfg: Config, **changes) -> Config:
    tree = cfg.model_dump()
    for dotted, value in changes.items():
        *section, key = dotted.split("__")
        (tree[section[0]] if section else tree)[key] = value
    return Config.model_validate(tree)


def suggestions(cfg: Config, est: Estimate, budget: int) -> list[str]:
    """Config changes that bring the estimate under ``budget``, cheapest first (each alone)."""
    on_gpu = est.target == "cuda"
    tried: list[tuple[str, Config]] = []
    if not cfg.model.gradient_checkpointing:
        tried.append(("model.gradient_checkpointing=true", _with(cfg, model__gradient_checkpointing=True)))
    full = cfg.train.micro_batch_size
    for mb in sorted((d for d in range(1, full) if full % d == 0), reverse=True):  # divisors: same examples
        accum = cfg.train.grad_accum * (full // mb)
        tried.append(
            (
                f"train.micro_batch_size={mb} train.grad_accum={accum} (same examples per step)",
                _with(cfg, train__micro_batch_size=mb, train__grad_accum=accum),
            )
        )
    if cfg.optim.name in ("adamw32bit", "adamw_torch"):
        tried.append(("optim.name=adamw8bit", _with(cfg, optim__name="adamw8bit")))
    if est.master_weight_bytes and cfg.model.dtype != "fp16":  # fp16 needs them (config._method_needs)
        tried.append(
            (
                "optim.master_weights=false (updates below half a weight's spacing then round away)",
                _with(cfg, optim__master_weights=False),
            )
        )
    if cfg.method in ("lora", "full"):
        tried.append(("method=qlora", _with(cfg, method="qlora")))
    seq = cfg.data.max_seq_len
    while seq > 256:
        seq //= 2
        tried.append((f"data.max_seq_len={seq} (shorter examples)", _with(cfg, data__max_seq_len=seq)))
    out = []
    for text, c in tried:
        total = estimate(c, on_gpu=on_gpu).total_bytes
        if total <= budget:
            out.append(f"{text}: {memory.fmt_bytes(total)}")
    return out


# ---------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------


class LiveTensorTracker:
    """Peak bytes of live tensor storages on the CPU, counted op by op (a ``TorchDispatchMode``).

    Every storage an op returns is added once and subtracted when it is freed (a weak reference's
    callback), so the peak includes temporaries freed inside the step. Tensors made before the tracker
    started are counted with :meth:`add`. Allocations that bypass the dispatcher (scratch buffers inside
    a kernel, allocator caching) are not seen: that is what the RSS number adds.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_flatten(out)[0]:
                    tracker.add(t)
                return out

        self._mode = _Mode()
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def add(self, t) -> None:
        """Count ``t``'s storage (once; again only if it grew)."""
        if not isinstance(t, torch.Tensor) or t.is_meta or t.device.type != "cpu":
            return
        st = t.untyped_storage()
        key, n = st._cdata, st.nbytes()
        old = self._sizes.get(key)
        if old is None:
            self._refs[key] = weakref.ref(st, lambda _r, k=key: self._free(k))
        elif old >= n:
            return
        self._sizes[key] = n
        self.current += n - (old or 0)
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


@dataclass
class Measurement:
    """What three real steps held."""

    peak_tensor_bytes: int  # CUDA max_memory_allocated, or the tracked peak of live CPU tensors
    kind: str
    rss_growth_bytes: int | None  # CPU: peak RSS minus RSS before loading
    reserved_bytes: int | None  # CUDA: max_memory_reserved
    frozen_by_format: dict[str, int]
    trainable_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    master_weight_bytes: int
    batches: list[tuple[int, int, int, bool]]  # (batch, seq, target tokens, padded) per micro-batch
    losses: list[float]
    # saved for backward by the micro-batch that saved most (memory.SavedTensorMeter); None where the
    # meter cannot see it all (gradient checkpointing keeps its block inputs outside autograd's saves)
    saved: memory.SavedBytes | None = None


def measure(cfg: Config, steps: int = 3, log=print) -> Measurement:
    """Run ``steps`` real optimizer steps of ``cfg`` (nothing written) and measure the peak.

    Raises:
        UserError: bad model or data (as ``trainer run``).
    """
    from .adapt import apply_method
    from .data import build_datasets, pack
    from .loop import (
        OutOfMemory,
        accumulate_gradients,
        check_context_length,
        data_loss_lines,
        micro_batch_stream,
        out_of_memory_message,
        training_device,
    )
    from .model import load_model, load_tokenizer, resolve_model_path, vocab_size_of
    from .optim import (
        build_optimizer,
        clip_and_step,
        loss_scaler_of,
        master_weights_of,
        trainable_parameters,
    )
    from .patches import apply_patches

    torch.manual_seed(cfg.train.seed)
    device = training_device()
    rss_before = _process_rss()
    peak_rss_before = memory.peak_memory_bytes(torch.device("cpu"))
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path, cfg.model)
    data = build_datasets(cfg.data, tokenizer, vocab_size_of(path, cfg.model))
    for line in data_loss_lines(data):
        log(line)
    examples = data.train
    if cfg.data.packing:
        examples = pack(examples, cfg.data.max_seq_len, tokenizer.eos_token_id)
    tracker = LiveTensorTracker() if device.type == "cpu" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    load_device = torch.device("cpu") if cfg.method == "qlora" else device
    model, _ = load_model(path, cfg.model, device, load_device)
    if (note := check_context_length(model, max(len(e.input_ids) for e in examples))) is not None:
        log(note)
    report = apply_method(model, cfg, device)
    apply_patches(model, cfg.train.padding_free, cfg.data.max_seq_len, report.backend)
    packed = padding_free.enabled(model)
    model.train()
    params = [p for _, p in trainable_parameters(model)]
    optimizer = None
    try:
        optimizer = build_optimizer(model, cfg.optim)
    except torch.OutOfMemoryError:
        raise OutOfMemory(out_of_memory_message(model, optimizer, cfg, device)) from None
    masters, scaler = master_weights_of(optimizer), loss_scaler_of(optimizer)
    copies = [] if masters is None else masters.masters
    if tracker is not None:
        for t in [*model.parameters(), *model.buffers(), *copies]:
            tracker.add(t)
    stream = micro_batch_stream(
        examples, cfg.train.micro_batch_size, cfg.train.seed, tokenizer.pad_token_id, device
    )
    meter = memory.SavedTensorMeter.for_model(model)
    shapes, losses, grad_bytes = [], [], 0
    # An fp16 step whose scaled gradients overflow is skipped (the loss scale halves) and allocates no
    # optimizer state: such steps are run but not counted (at most the 16 halvings from 2^16 to 1).
    updated = 0
    while updated < steps:
        micro = [next(stream) for _ in range(cfg.train.grad_accum)]
        shapes.extend(micro_batch_shape(b, packed) for b in micro)
        scale = 1.0 if scaler is None else scaler.scale
        with tracker if tracker is not None else contextlib.nullcontext():
            try:
                loss, _ = accumulate_gradients(model, micro, report.backend, meter, scale)
                grad_bytes = memory.gradient_bytes(model)
                update = clip_and_step(optimizer, params, cfg.optim.max_grad_norm)
            except torch.OutOfMemoryError:
                model.zero_grad(set_to_none=True)
                raise OutOfMemory(out_of_memory_message(model, optimizer, cfg, device)) from None
        if update.overflow:
            log(f"measure: gradients overflowed fp16 at loss scale {update.loss_scale:g}: step not counted")
            continue
        updated += 1
        losses.append(loss)
        log(f"measure: step {updated}/{steps} loss {loss:.4f}")
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
        reserved, rss_growth = torch.cuda.max_memory_reserved(device), None
    else:
        peak, kind, reserved = tracker.peak, "peak of live CPU tensor storages (tracked per op)", None
        rss_growth = memory.peak_memory_bytes(torch.device("cpu")) - max(rss_before, peak_rss_before)
        rss_growth = max(rss_growth, 0)
    return Measurement(
        peak_tensor_bytes=peak,
        kind=kind,
        rss_growth_bytes=rss_growth,
        reserved_bytes=reserved,
        frozen_by_format=memory.frozen_bytes_by_format(model),
        trainable_bytes=memory.param_accounting(model).trainable_bytes,
        gradient_bytes=grad_bytes,
        optimizer_state_bytes=memory.optimizer_state_bytes(optimizer),
        master_weight_bytes=memory.tensor_bytes(copies),
        batches=shapes,
        losses=losses,
        saved=None if cfg.model.gradient_checkpointing else meter.largest,
    )


def micro_batch_shape(batch: dict[str, torch.Tensor], packed: bool) -> tuple[int, int, int, bool]:
    """``(batch, seq, target tokens, padded)`` of one micro-batch as the model runs it, for
    :func:`estimate_for_batches`. ``packed``: padding-free micro-batches are on (one unmasked sequence)."""
    from .loss import target_tokens

    rows, seq = batch["input_ids"].shape
    mask = batch["attention_mask"]
    if packed and padding_free.packable(mask):
        return 1, int(mask.sum()), target_tokens(batch), False
    return int(rows), int(seq), target_tokens(batch), bool((mask == 0).any())


def estimate_for_batches(cfg: Config, batches: list[tuple[int, int, int, bool]], on_gpu: bool) -> Estimate:
    """The estimate at the largest micro-batch that was actually run."""
    best = None
    for batch, seq, targets, padded in batches:
        e = estimate(cfg, on_gpu=on_gpu, batch=batch, seq=seq, target_tokens=targets, padded=padded)
        if best is None or e.tensor_bytes > best.tensor_bytes:
            best = e
    return best


# ---------------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------------


def breakdown_lines(est: Estimate, measured: Measurement | None = None) -> list[str]:
    """The table ``trainer estimate`` prints: one row per part, measured beside it when given."""
    fb = memory.fmt_bytes
    rows: list[tuple[str, int | None, int | None, str]] = []
    m = measured
    for label, n in est.frozen_by_format.items():
        got = m.frozen_by_format.get(label) if m else None
        rows.append((f"frozen weights, {label}", n, got, ""))
    rows.append(
        (
            "trainable parameters",
            est.trainable_bytes,
            m.trainable_bytes if m else None,
            f"{est.trainable_params:,} params",
        )
    )
    rows.append(("gradients (trainable only)", est.gradient_bytes, m.gradient_bytes if m else None, ""))
    rows.append(
        (
            f"optimizer state, {est.optimizer_name} (used)",
            est.optimizer_state_bytes,
            m.optimizer_state_bytes if m else None,
            "",
        )
    )
    alt_name, alt_bytes = est.optimizer_alternative
    rows.append((f"optimizer state, {alt_name}", alt_bytes, None, ""))
    if est.master_weight_bytes:
        rows.append(
            (
                "fp32 master weights (optim.master_weights)",
                est.master_weight_bytes,
                m.master_weight_bytes if m else None,
                "",
            )
        )
    ck = " (used)" if est.checkpointing else ""
    nock = "" if est.checkpointing else " (used)"
    saved = m.saved if m else None
    rows.append(
        (
            f"activations saved for backward, no checkpointing{nock}",
            est.activation_bytes,
            saved.activations if saved else None,
            f"B={est.batch} S={est.seq}",
        )
    )
    rows.append(
        (f"activations saved for backward, checkpointing{ck}", est.activation_bytes_checkpointed, None, "")
    )
    what = "an MLP-wide and two residual gradients" + (", a recomputed block" if est.checkpointing else "")
    rows.append((f"backward transient ({what})", est.chosen_backward_transient_bytes, None, "one block"))
    rows.append(
        (
            "loss: saved gradient of the hidden states",
            est.loss_saved_bytes,
            saved.loss if saved else None,
            f"{est.target_tokens:,} target positions",
        )
    )
    rows.append(("loss: logits chunk + hidden states (transient)", est.loss_transient_bytes, None, ""))
    if est.loss_backward_bytes:
        rows.append(("loss backward: fp32 scaling temporaries", est.loss_backward_bytes, None, ""))
    if est.dequant_temporary_bytes:
        rows.append(
            ("dequantized weight temporary (qlora)", est.dequant_temporary_bytes, None, "widest layer")
        )
    rows.append(
        ("= peak of tensors", est.tensor_bytes, m.peak_tensor_bytes if m else None, m.kind if m else "")
    )
    over = "CUDA context + allocator slack" if est.target == "cuda" else "process RSS of torch + libraries"
    rows.append((f"framework overhead ({over})", est.overhead_bytes, None, ""))
    rows.append(("= total", est.total_bytes, None, ""))
    width = max(len(r[0]) for r in rows)
    head = f"{'':{width}}  {'estimate':>11}" + (f"  {'measured':>11}  {'error':>7}" if m else "")
    out = [f"memory estimate for {est.target} ({est.dtype}):", head]
    for label, e, got, note in rows:
        line = f"{label:{width}}  {fb(e):>11}"
        if m:
            if got is None:
                line += f"  {'':>11}  {'':>7}"
            elif not got:
                line += f"  {fb(got):>11}  {'n/a' if e else '':>7}"
            else:
                line += f"  {fb(got):>11}  {(e - got) / got:+7.1%}"
        out.append(line + (f"  {note}" if note else ""))
    if m and m.rss_growth_bytes is not None:
        out.append(
            f"process peak RSS grew by {fb(m.rss_growth_bytes)} over the start (tensors + allocator caching + library code)"
        )
    if m and m.reserved_bytes is not None:
        out.append(f"cuda max_memory_reserved {fb(m.reserved_bytes)}")
    out.append(
        f"note: the peak of tensors is reached {est.step_peak_phase}: the weights, the optimizer state and "
        "what that moment holds of the rows between (they never all coexist)"
    )
    out += [f"note: {n}" for n in est.notes]
    return out


def fit_lines(cfg: Config, est: Estimate, budget: int) -> list[str]:
    """Does it fit, and what to change if not."""
    fb = memory.fmt_bytes
    if est.total_bytes <= budget:
        return [
            f"fits: {fb(est.total_bytes)} of {fb(budget)} ({est.total_bytes / budget:.0%}), {fb(budget - est.total_bytes)} to spare"
        ]
    out = [
        f"does NOT fit: {fb(est.total_bytes)} needed, {fb(budget)} available ({fb(est.total_bytes - budget)} over)"
    ]
    tips = suggestions(cfg, est, budget)
    if tips:
        out.append("any one of these fits:")
        out += [f"  {t}" for t in tips]
    else:
        out.append(
            "no single change fits; combine gradient checkpointing, micro_batch_size=1 and method=qlora, "
            "or use a card with more memory"
        )
    return out


NO_FIT_EXIT = 3  # `trainer estimate --gpu-memory` when the run does not fit (2 is a user error)


def main(args: argparse.Namespace, cfg: Config, log=print) -> int:
    """``trainer estimate``: print the breakdown, the fit against ``--gpu-memory``, optionally measure."""
    budget = parse_size(args.gpu_memory) if args.gpu_memory is not None else None
    on_gpu = torch.cuda.is_available() or budget is not None
    est = estimate(cfg, on_gpu=on_gpu)
    if args.measure:
        m = measure(cfg, log=log)
        here = estimate_for_batches(cfg, m.batches, on_gpu=torch.cuda.is_available())
        if here.target == est.target:
            here.overhead_bytes = est.overhead_bytes  # measured before loading, not after the steps
        widest = max(m.batches, key=lambda s: s[0] * s[1])
        log(
            f"measured: 3 steps, widest micro-batch {widest[0]}x{widest[1]}, estimate at the measured shapes:"
        )
        for line in breakdown_lines(here, m):
            log(line)
        log("")
        log(f"worst case (B={est.batch}, S={est.seq}, every position a target):")
    for line in breakdown_lines(est):
        log(line)
    if budget is not None:
        for line in fit_lines(cfg, est, budget):
            log(line)
        if est.total_bytes > budget:
            return NO_FIT_EXIT  # scripts can test it; the lines above say what would fit
    return 0
