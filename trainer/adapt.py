"""Choose what trains: LoRA / QLoRA adapters, every parameter (full) or parameters chosen by name.

After :func:`apply_method`, exactly the trainable parameters have ``requires_grad=True``; everything
else is frozen and so never receives a ``.grad`` and never enters the optimizer. The returned
:class:`AdaptReport` says which layers took the fused kernel path, and why any did not.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from fusedtune.kernels import LoRALinear
from fusedtune.kernels.lora import MAX_RANK as FUSED_MAX_RANK
from fusedtune.kernels.modules import LoRASiblings
from fusedtune.kernels.qmatmul import DEQUANT_MIN_TOKENS

from . import experts, memory
from .config import Config
from .errors import ConfigError
from .memory import is_bnb_quantized

# A Linear is "in a transformer block" when its name has an integer index component: model.layers.3.mlp
_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
# The fused LoRA kernel's supported dtypes (kernels/lora.py).
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def adapter_dtype(base: torch.dtype) -> torch.dtype:
    """LoRA A and B are at least fp32 whatever the base dtype (as PEFT's autocast_adapter_dtype).

    Their updates are small against their values, and the optimizer's 8-bit state is dequantized to fp32
    anyway. The GEMMs run in the input's dtype; the gradients come back in the adapters' dtype.
    """
    return torch.promote_types(base, torch.float32)


def not_fused_lines(not_fused: dict[str, str], total: int, all_label: str) -> list[str]:
    """``  not fused (reason): names`` once per reason; ``all_label`` when a reason covers all ``total``."""
    by_reason: dict[str, list[str]] = {}
    for name, why in not_fused.items():
        by_reason.setdefault(why, []).append(name)
    return [
        f"  not fused ({why}): {all_label if len(names) == total else ', '.join(names)}"
        for why, names in by_reason.items()
    ]


@dataclass
class AdaptReport:
    """What :func:`apply_method` did, for the run's log and summary."""

    method: str
    backend: str
    backend_reason: str
    adapted: list[str] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)
    not_fused: dict[str, str] = field(default_factory=dict)  # layer name -> why not
    quantized: list[str] = field(default_factory=list)
    # a bnb-quantized checkpoint's Linears, taken over as stored: their format ("nf4, blocksize 64, ...")
    taken_over: dict[str, str] = field(default_factory=dict)
    quant_mismatch: str | None = None  # the config's quant.* settings such a checkpoint overrides
    trainable_names: list[str] = field(default_factory=list)
    siblings: list[str] = field(default_factory=list)  # "parent: q_proj|k_proj|v_proj" per group
    siblings_why_not: str | None = None
    too_narrow: dict[str, str] = field(default_factory=dict)  # default targets left out: name -> "in->out"
    experts_adapted: list[str] = field(default_factory=list)  # "<experts module>.<3-D weight>"
    experts_quantized: list[str] = field(default_factory=list)
    experts_why_not: str | None = None  # why the expert weights were not adapted
    experts_unhandled: list[str] = field(default_factory=list)  # 3-D weights outside an experts module
    tied_trainable: tuple[str, str] | None = None  # (trainable name, the name it is tied to)
    unused: list[str] = field(default_factory=list)  # modules a text-only run never calls (kept frozen)

    def lines(self) -> list[str]:
        """Human-readable lines: what got adapted, fused, and what did not and why."""
        out = [f"method {self.method}: {len(self.trainable_names)} trainable tensors"]
        if self.unused:
            out.append(
                f"frozen, never adapted: {', '.join(self.unused)} (a text-only run never calls them; "
                "the language model's blocks are the ones counted and chosen)"
            )
        if self.tied_trainable:
            out.append(
                f"{self.tied_trainable[0]} is tied to {self.tied_trainable[1]} (one tensor, named once): "
                "it trains as both the output head and the input embedding"
            )
        if self.too_narrow:
            kinds = Counter(
                f"{_BLOCK_INDEX.sub(lambda m: m.group(0).replace(m.group(1), '*'), n)} ({shape})"
                for n, shape in self.too_narrow.items()
            )
            out.append(
                f"not adapted, narrower than lora.rank (name them in lora.target_modules with a smaller rank "
                f"to adapt them): {', '.join(f'{n} x {k}' for k, n in kinds.items())}"
            )
        if self.adapted:
            out.append(
                f"kernels {self.backend} ({self.backend_reason}): {len(self.fused)}/{len(self.adapted)} "
                "adapted layers on the fused Triton path"
            )
            if requantized := len(self.quantized) - len(self.taken_over):
                out.append(f"{requantized} frozen Linear weights quantized")
            if self.taken_over:
                formats = sorted(set(self.taken_over.values()))
                out.append(
                    f"{len(self.taken_over)} frozen Linear weights taken over as the checkpoint stores them "
                    f"({'; '.join(formats)}; not re-quantized)"
                    + (f": {self.quant_mismatch} does not apply to them" if self.quant_mismatch else "")
                )
            if self.method == "qlora" and self.fused:
                out.append(
                    f"  QLoRA matmuls on the Triton path: the fused dequantize-in-GEMM kernel below "
                    f"{DEQUANT_MIN_TOKENS} tokens per micro-batch, dequantize + GEMM from {DEQUANT_MIN_TOKENS} "
                    "(the smallest M measured on an H200, where dequantize + cuBLAS already won)"
                )
            out += not_fused_lines(self.not_fused, len(self.adapted), "all adapted layers")
        out += self._expert_lines()
        if self.siblings:
            kinds = Counter(g.split(": ")[1] for g in self.siblings)
            out.append(
                "LoRA siblings as one node (one input: one GEMM for their A's, one dX): "
                + ", ".join(f"{n} x {k}" for k, n in kinds.items())
            )
        elif self.siblings_why_not:
            out.append(f"LoRA siblings not grouped: {self.siblings_why_not}")
        return out

    def _expert_lines(self) -> list[str]:
        def kinds(names: list[str]) -> str:
            c = Counter(_BLOCK_INDEX.sub(lambda m: m.group(0).replace(m.group(1), "*"), n) for n in names)
            return ", ".join(f"{n} x {k}" for k, n in c.items())

        out = []
        if self.experts_adapted:
            out.append(
                f"MoE experts: per-expert LoRA on {len(self.experts_adapted)} stacked expert weights "
                f"({kinds(self.experts_adapted)}), tokens grouped by expert, one autograd node per projection"
            )
        if self.experts_why_not:
            out.append(f"MoE experts: not adapted ({self.experts_why_not})")
        if self.experts_unhandled:
            left = "not adapted" + (" or quantized" if self.method == "qlora" else "")
            out.append(
                f"MoE experts: {len(self.experts_unhandled)} stacked weights left dense and frozen, {left} "
                f"({kinds(self.experts_unhandled)}): their module does not run through transformers' "
                "experts interface"
            )
        if self.experts_quantized:
            out.append(
                f"MoE experts: {len(self.experts_quantized)} stacked expert weights quantized, each expert on its "
                f"own as a Linear's weight ({kinds(self.experts_quantized)})"
            )
        return out


def choose_backend(kernels: str) -> tuple[str, str]:
    """Resolve ``kernels: auto | triton | torch`` to a backend and the reason for it."""
    cuda = torch.cuda.is_available()
    if kernels == "auto":
        return ("triton", "auto: CUDA device present") if cuda else ("torch", "auto: no CUDA device")
    if kernels == "triton" and not cuda:
        return "triton", "kernels=triton without CUDA: Triton interpreter, correct but slow"
    return kernels, f"kernels={kernels}"


# kernels: auto on CUDA runs plain-LoRA layers as cuBLAS GEMMs plus an in-place low-rank add
# (``lora.lora_linear_torch``), not the fused Triton kernels, because that measured faster on an NVIDIA H200
# (bench/results/lora_linear-h200.md, commit 99b4beb; bf16, K = N = 4096, r = 16, forward + backward, ms
# fused Triton / cuBLAS path / PEFT): M = 512 1.175 / 0.674 / 0.903, M = 2048 1.298 / 0.872 / 0.862,
# M = 8192 1.454 / 0.973 / 1.030, M = 16384 2.119 / 1.863 / 2.044 (no dropout). With LoRA dropout the fused
# kernels stay: they regenerate the keep-mask from a seed, where the cuBLAS path saves it (as bits) per
# layer. kernels: triton forces the fused kernels. QLoRA layers keep the Triton path (dequantize + cuBLAS or
# the fused kernel, by qmatmul.use_dequant_gemm).
AUTO_CUDA_LORA = (
    "kernels auto on CUDA: cuBLAS GEMMs + in-place LoRA add, measured faster than fused on an H200"
)


def lora_layer_backend(
    kernels: str, method: str, dropout: float, backend: str, reason: str
) -> tuple[str, str]:
    """The backend (and the reason) for the adapted layers of ``method``, given the run's kernel backend.

    ``kernels == "auto"`` resolves to ``triton`` only on CUDA (:func:`choose_backend`).
    """
    if kernels == "auto" and backend == "triton" and method == "lora" and dropout == 0.0:
        return "torch", AUTO_CUDA_LORA
    return backend, reason


def is_plain_linear(mod: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward is ``nn.Linear``'s (or bitsandbytes' quantized one): what LoRA can
    wrap. A subclass with its own forward is something else in a Linear's clothes, e.g. an MoE router
    returning (logits, weights, indices) (Phi-3.5-MoE's, Llama 4's)."""
    return isinstance(mod, nn.Linear) and (type(mod).forward is nn.Linear.forward or is_bnb_quantized(mod))


def unused_by_text(model: nn.Module) -> list[str]:
    """The modules a text-only forward never calls: on a multimodal checkpoint loaded as a causal LM
    (Gemma 3 4B and up, ...), the vision tower and its projector.

    Only a model whose config has a non-text part (``vision_config``, ``audio_config``, ...) and whose
    language model (``get_decoder()``) holds the input embedding has any: the siblings of the modules on
    the way down to the language model that share no parameter with it or with the output head.
    """
    config = getattr(model, "config", None)
    if not any(getattr(config, f"{kind}_config", None) is not None for kind in _OTHER_MODALITIES):
        return []
    try:
        decoder = model.get_decoder()
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return []
    path = next((n for n, m in model.named_modules() if m is decoder), None)
    if not path or not any(m is embeddings for m in decoder.modules()):
        return []
    used = {id(p) for p in decoder.parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        used |= {id(p) for p in head.parameters()}
    parts = path.split(".")
    unused = []
    for depth, on_path in enumerate(parts):
        prefix = ".".join(parts[:depth])
        parent = model.get_submodule(prefix) if prefix else model
        for name, child in parent.named_children():
            params = {id(p) for p in child.parameters()}
            if name != on_path and params and not params & used:
                unused.append(f"{prefix}.{name}" if prefix else name)
    return unused


_OTHER_MODALITIES = ("vision", "audio", "speech", "image", "video")


def under(name: str, prefixes: list[str]) -> bool:
    """Whether ``name`` is one of the modules ``prefixes`` names or inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every plain ``nn.Linear`` inside the transformer blocks (names with an integer layer index) that a
    text-only forward calls (not a vision tower's: :func:`unused_by_text`)."""
    unused = unused_by_text(model)
    return {
        name: mod
        for name, mod in model.named_modules()
        if is_plain_linear(mod) and _BLOCK_INDEX.search(name) and not under(name, unused)
    }


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def select_targets(model: nn.Module, target_modules: list[str] | None) -> dict[str, nn.Linear]:
    """The Linear layers to adapt: all block Linears, or those whose name ends with a target.

    A target may also name MoE expert weights (``gate_up_proj``, ``experts.down_proj``, ...), which
    :func:`select_expert_targets` picks.

    Raises:
        ConfigError: targets that match no Linear layer and no expert weight.
    """
    if target_modules is None:
        targets = block_linears(model)
        if not targets and not experts.expert_weights(model):
            # the projections LoRA cannot wrap: Linear subclasses with their own forward (Falcon's), or
            # other layer types doing a Linear's job (GPT-2's Conv1D)
            others = Counter(
                type(m).__name__
                for n, m in model.named_modules()
                if _BLOCK_INDEX.search(n) and isinstance(w := getattr(m, "weight", None), torch.Tensor)
                and w.dim() == 2 and not isinstance(m, nn.Embedding) and not is_plain_linear(m)
            )  # fmt: skip
            why = (
                f": its block projections are {', '.join(others)}, not plain nn.Linear (LoRA wraps those only)"
                if others
                else ""
            )
            raise ConfigError(
                f"lora.target_modules: the model has no Linear layers inside indexed blocks{why}"
            )
        return targets
    unused = unused_by_text(model)
    linears = {n: m for n, m in model.named_modules() if is_plain_linear(m)}
    expert_names = list(experts.expert_weights(model))
    targets = {n: m for n, m in linears.items() if _matches(n, target_modules) and not under(n, unused)}
    never_called = [t for t in target_modules if not any(_matches(n, [t]) for n in targets)]
    never_called = [t for t in never_called if any(_matches(n, [t]) for n in linears)]
    if never_called and not any(_matches(n, never_called) for n in expert_names):
        raise ConfigError(
            f"lora.target_modules: {never_called} match only Linears that a text-only run never calls "
            f"(in {', '.join(unused)})"
        )
    special = {
        n: type(m).__name__
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not is_plain_linear(m) and _matches(n, target_modules)
    }
    if special:
        name, cls = next(iter(special.items()))
        raise ConfigError(
            f"lora.target_modules: {name} is a {cls}, an nn.Linear subclass with its own forward "
            f"({len(special)} such layer(s)); LoRA wraps plain Linears only"
        )
    unmatched = [t for t in target_modules if not any(_matches(n, [t]) for n in (*linears, *expert_names))]
    if unmatched:
        leafs = sorted({n.rsplit(".", 1)[-1] for n in linears})
        also = sorted({n.rsplit(".", 1)[-1] for n in expert_names})
        raise ConfigError(
            f"lora.target_modules: {unmatched} match no Linear layer (available: {', '.join(leafs)})"
            + (f" and no expert weight (available: {', '.join(also)})" if also else "")
        )
    return targets


def lora_targets(
    model: nn.Module, target_modules: list[str] | None, rank: int
) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """The Linears LoRA (and QLoRA's quantization) takes, and the default targets left out as narrower
    than ``rank`` (name -> ``"in->out"``: a scalar gate).

    Raises:
        ConfigError: targets that match nothing; a named target narrower than the rank.
    """
    targets = select_targets(model, target_modules)
    too_narrow: dict[str, str] = {}
    shapes = {n: (m.in_features, m.out_features) for n, m in targets.items()}
    for name in _narrower_than_rank(shapes, rank, target_modules is not None, "layer", too_narrow):
        del targets[name]
    if too_narrow and not targets and not experts.expert_weights(model):
        raise ConfigError(f"lora.rank: {rank} is larger than every Linear in the blocks")
    return targets, too_narrow


def _narrower_than_rank(
    shapes: dict[str, tuple[int, int]], rank: int, named: bool, what: str, too_narrow: dict[str, str]
) -> list[str]:
    """The targets (name -> (in, out)) narrower than ``rank``, for the caller to leave out: recorded in
    ``too_narrow`` when they are default targets (a scalar gate), a ConfigError when the user named them.
    """
    narrow = [n for n, (k, m) in shapes.items() if rank > min(k, m)]
    if narrow and named:
        k, m = shapes[narrow[0]]
        raise ConfigError(
            f"lora.rank: {rank} is larger than {what} {narrow[0]} ({k}->{m}); use at most {min(k, m)}"
        )
    too_narrow.update({n: "{}->{}".format(*shapes[n]) for n in narrow})
    return narrow


def select_expert_targets(
    model: nn.Module, target_modules: list[str] | None
) -> dict[str, tuple[nn.Module, str]]:
    """The MoE expert weights to adapt: all of them by default, or those whose name ends with a target."""
    weights = experts.expert_weights(model)
    if target_modules is None:
        return weights
    return {n: w for n, w in weights.items() if _matches(n, target_modules)}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def _why_not_fused(linear: nn.Linear, rank: int, backend: str, reason: str) -> str | None:
    if backend != "triton":
        return reason
    # a bitsandbytes layer's weight is its packed storage (uint8/int8): the Triton path reads it as is
    if not is_bnb_quantized(linear) and linear.weight.dtype not in FUSED_DTYPES:
        return f"weight dtype {linear.weight.dtype} is not fp32/fp16/bf16"
    if rank > FUSED_MAX_RANK:
        return f"rank {rank} > {FUSED_MAX_RANK}, the fused kernel's limit"
    return None


def apply_method(model: nn.Module, cfg: Config, device: torch.device) -> AdaptReport:
    """Freeze, adapt or quantize ``model`` in place according to ``cfg.method``.

    Args:
        model: the loaded causal LM (for qlora still on the CPU: each Linear is quantized and moved
            to ``device`` one at a time, so the whole model never sits unquantized on the GPU).
        cfg: the resolved config.
        device: the training device.

    Returns:
        An :class:`AdaptReport`.

    Raises:
        ConfigError: targets or patterns that match nothing, a rank larger than a layer.
    """
    backend, reason = choose_backend(cfg.kernels)
    report = AdaptReport(method=cfg.method, backend=backend, backend_reason=reason)
    report.unused = unused_by_text(model)
    for p in model.parameters():
        p.requires_grad_(False)

    if cfg.method in ("lora", "qlora"):
        lc = cfg.lora
        targets, report.too_narrow = lora_targets(model, lc.target_modules, lc.rank)
        expert_targets = _expert_targets(model, cfg, report)
        report.experts_unhandled = experts.unhandled_stacked_weights(model)
        method_backend, method_reason = lora_layer_backend(
            cfg.kernels, cfg.method, lc.dropout, backend, reason
        )
        for name in list(targets):
            # Popped, so that no reference outlives the swap: for qlora the layer was moved to the device
            # to be packed, and the dict would keep every full-precision weight there until the end.
            linear = targets.pop(name)
            why = _why_not_fused(linear, lc.rank, method_backend, method_reason)
            layer_backend = "triton" if why is None else "torch"
            if cfg.method == "lora" and is_bnb_quantized(linear):
                raise ConfigError(lora_on_quantized_error(name))
            if cfg.method == "lora":
                new = LoRALinear.from_linear(
                    linear,
                    lc.rank,
                    lc.alpha,
                    lc.dropout,
                    backend=layer_backend,
                    lora_dtype=adapter_dtype(linear.weight.dtype),
                )
            else:
                prequantized = is_bnb_quantized(linear)
                new = _quantize_linear(linear, cfg, layer_backend, device)
                report.quantized.append(name)
                if prequantized:
                    report.taken_over[name] = _format_of(new)
                    report.quant_mismatch = report.quant_mismatch or _quant_mismatch(new, cfg)
            _set_module(model, name, new)
            del linear, new
            report.adapted.append(name)
            if why is None:
                report.fused.append(name)
            else:
                report.not_fused[name] = why
        _adapt_experts(
            model, cfg, expert_targets, backend if cfg.method == "qlora" else "torch", device, report
        )
        if cfg.method == "qlora":
            model.to(device)  # the rest (embeddings, norms, head) after the Linears are packed
            if device.type == "cpu":
                memory.release_host_memory(model)  # the unquantized weights' pages and heap
            report.siblings_why_not = "qlora layers run one by one"
        elif lc.dropout > 0.0:
            report.siblings_why_not = "lora.dropout > 0 (each projection draws its own mask)"
        else:
            report.siblings = group_siblings(model)
            if not report.siblings:
                report.siblings_why_not = (
                    "the fused Triton kernels run each projection on its own"
                    if report.fused
                    else "no q|k|v or gate|up that the parent calls on one input"
                )
    elif cfg.method == "full":
        for name, p in model.named_parameters():
            if not under(name, report.unused):
                _require_trainable(name, p, cfg)
                p.requires_grad_(True)
    elif cfg.method == "partial":
        _select_partial(model, cfg, report.unused)
    _keep_bnb_differentiable(model)
    report.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    report.tied_trainable = _tied_trainable(model)
    if not report.trainable_names:
        raise ConfigError(f"method {cfg.method}: no parameter is left trainable")
    return report


def _tied_trainable(model: nn.Module) -> tuple[str, str] | None:
    """``(name, other)`` when a trainable tensor is the input embedding and the output head at once."""
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w_in, w_out = getattr(inp, "weight", None), getattr(out, "weight", None)
    if w_in is None or w_in is not w_out or not w_in.requires_grad:
        return None
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is w_in]
    return (names[0], names[-1]) if len(names) > 1 else None


def _expert_targets(model: nn.Module, cfg: Config, report: AdaptReport) -> dict[str, tuple[nn.Module, str]]:
    """The MoE expert weights to adapt (checked), recording in ``report`` why any are left out."""
    lc = cfg.lora
    all_weights = experts.expert_weights(model)
    if not all_weights:
        return {}
    chosen = select_expert_targets(model, lc.target_modules)
    if not chosen:
        report.experts_why_not = "no expert weight in lora.target_modules"
        return {}
    if lc.dropout > 0.0:
        if lc.target_modules is None:
            report.experts_why_not = (
                "lora.dropout > 0: expert LoRA has no dropout, as in PEFT; set lora.dropout: 0 to adapt them"
            )
            return {}
        raise ConfigError(
            f"lora.dropout: expert weights ({', '.join(sorted({n.rsplit('.', 1)[-1] for n in chosen}))}) "
            "take no LoRA dropout (as in PEFT); set lora.dropout: 0 or leave them out of lora.target_modules"
        )
    shapes = {name: experts.shape(module, weight)[1:] for name, (module, weight) in chosen.items()}
    named = lc.target_modules is not None
    for name in _narrower_than_rank(shapes, lc.rank, named, "expert weight", report.too_narrow):
        del chosen[name]
    return chosen


def _adapt_experts(
    model: nn.Module,
    cfg: Config,
    targets: dict[str, tuple[nn.Module, str]],
    backend: str,
    device: torch.device,
    report: AdaptReport,
) -> None:
    """Per-expert LoRA on ``targets``; under QLoRA every expert weight is quantized first (adapted or not:
    they are most of an MoE model's weights)."""
    lc, qc = cfg.lora, cfg.quant
    for name, (module, weight) in experts.expert_weights(model).items():
        dense = module._parameters.get(weight)
        dtype = dense.dtype if dense is not None else experts.frozen_dtype(module, weight)
        if cfg.method == "qlora" and dense is not None:
            experts.quantize(module, weight, qc.quant_type, qc.blocksize, qc.double_quant, device)
            report.experts_quantized.append(name)
        if name in targets:
            experts.add_lora(module, weight, lc.rank, lc.alpha, adapter_dtype(dtype))
            report.experts_adapted.append(name)
        experts.set_backend(module, backend)


# Projections that read one input in the models we know: attention's and the gated MLP's.
SIBLING_SETS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@functools.cache  # per forward and name, not per layer
def _call_arguments(forward, name: str) -> frozenset[str]:
    """The source text of every argument ``self.<name>(...)`` is called with in ``forward``."""
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return frozenset()
    return frozenset(re.findall(rf"self\.{name}\(\s*([^()]*?)\s*\)", source))


def group_siblings(model: nn.Module) -> list[str]:
    """Group each module's torch-path LoRALinear q|k|v (and gate|up) into :class:`LoRASiblings` when its
    forward calls them all on one and the same argument; returns ``"parent: q_proj|k_proj|v_proj"`` per
    group."""
    groups = []
    for parent_name, parent in model.named_modules():
        for names in SIBLING_SETS:
            members = [getattr(parent, n, None) for n in names]
            present = [(n, m) for n, m in zip(names, members, strict=True) if isinstance(m, LoRALinear)]
            if len(present) < 2 or any(m.backend != "torch" or m.siblings is not None for _, m in present):
                continue
            args = [_call_arguments(type(parent).forward, n) for n, _ in present]
            if len(args[0]) != 1 or any(a != args[0] for a in args):
                continue  # not provably one input: each keeps its own forward
            LoRASiblings([m for _, m in present])
            groups.append(f"{parent_name}: {'|'.join(n for n, _ in present)}")
    return groups


def _quantize_linear(linear: nn.Linear, cfg: Config, backend: str, device: torch.device) -> nn.Module:
    """QLoRA: pack one frozen Linear weight on ``device`` and put LoRA on top of it."""
    from fusedtune.kernels import QuantLoRALinear

    lc, qc = cfg.lora, cfg.quant
    if is_bnb_quantized(linear):  # an already bnb-quantized checkpoint: take the packed data over
        return QuantLoRALinear.from_bnb(
            linear.to(device),
            lc.rank,
            lc.alpha,
            dropout=lc.dropout,
            backend=backend,
            lora_dtype=torch.float32,
        )
    linear = linear.to(device)
    return QuantLoRALinear.from_linear(
        linear,
        lc.rank,
        lc.alpha,
        dropout=lc.dropout,
        quant_type=qc.quant_type,
        blocksize=qc.blocksize,
        double_quant=qc.double_quant,
        backend=backend,
        lora_dtype=adapter_dtype(linear.weight.dtype),
    )


def _format_of(layer: nn.Module) -> str:
    """A QuantLoRALinear's storage format in words: ``nf4, blocksize 64, double quant``."""
    if layer.quant_type == "int8":
        return "int8 row-wise"
    return f"{layer.quant_type}, blocksize {layer.blocksize}" + (
        ", double quant" if layer.double_quant else ""
    )


def _quant_mismatch(layer: nn.Module, cfg: Config) -> str | None:
    """The config's ``quant.*`` values a taken-over layer does not have (``quant.quant_type=int8``)."""
    qc = cfg.quant
    wanted = {"quant_type": qc.quant_type}
    if layer.quant_type != "int8" and qc.quant_type != "int8":
        wanted |= {"blocksize": qc.blocksize, "double_quant": qc.double_quant}
    has = {"quant_type": layer.quant_type, "blocksize": layer.blocksize, "double_quant": layer.double_quant}
    diff = [
        f"quant.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in wanted.items() if has[k] != v
    ]
    return ", ".join(diff) or None


def _require_trainable(name: str, p: nn.Parameter, cfg: Config) -> None:
    """A parameter ``full``/``partial`` selected must be one a gradient can update: a bitsandbytes-packed
    weight (a quantized checkpoint's) is integer storage."""
    if not (p.is_floating_point() or p.is_complex()):
        raise ConfigError(quantized_selection_error(cfg.method, name, f"{p.dtype}, bitsandbytes"))


def lora_on_quantized_error(what: str) -> str:
    """The message for method lora on a bitsandbytes-quantized checkpoint (``what``: a layer, or it)."""
    return f"method: {what} is bitsandbytes-quantized; use method: qlora for this checkpoint"


def quantized_selection_error(method: str, name: str, how: str) -> str:
    """The message for a full/partial selection that includes a quantized checkpoint's packed weight."""
    what = "full" if method == "full" else "partial: the selection"
    return (
        f"method {what} includes {name}, which this checkpoint stores quantized ({how}): train it from "
        "the unquantized checkpoint, or use method: qlora"
    )


def _keep_bnb_differentiable(model: nn.Module) -> None:
    """Keep a quantized checkpoint's remaining bitsandbytes 4-bit Linears (partial training, or QLoRA
    targets that leave some out) on bitsandbytes' differentiable path.

    On an AVX512-BF16 CPU, bitsandbytes 0.50 repacks a ``Linear4bit``'s weight in place the first time
    it runs in eval mode on an input that needs no gradient (the held-out evaluation before training),
    and from then on computes it with ``gemv_4bit``, an op without autograd: backward goes through it as
    if it were constant, so every trainable tensor below it silently gets no gradient (measured: after
    one evaluation, partial training of the norms left only the final norm with a gradient). Turning
    off that repacking keeps the training path.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def _select_partial(model: nn.Module, cfg: Config, unused: list[str]) -> None:
    pc = cfg.partial
    try:
        patterns = [re.compile(p) for p in pc.patterns]
    except re.error as e:
        raise ConfigError(f"partial.patterns: invalid regular expression {e.pattern!r} ({e})") from None
    # Every name, tied ones included: with tied embeddings lm_head.weight IS embed_tokens.weight.
    every = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names = [n for n in every if not under(n, unused)]  # a vision tower's never get a gradient
    for pat in patterns:
        if not any(pat.search(n) for n in names):
            where = (
                f" that a text-only run uses (it matches only in {', '.join(unused)})"
                if any(pat.search(n) for n in every)
                else ""
            )
            raise ConfigError(f"partial.patterns: {pat.pattern!r} matches no parameter name{where}")
    last_blocks: set[str] = set()
    if pc.last_n_layers:
        indices = sorted({int(m.group(1)) for n in names if (m := _BLOCK_INDEX.search(n))})
        if not indices:
            raise ConfigError("partial.last_n_layers: the model has no indexed blocks")
        if pc.last_n_layers > len(indices):
            raise ConfigError(
                f"partial.last_n_layers: {pc.last_n_layers} is more than the model's {len(indices)} blocks "
                "(method: full trains everything)"
            )
        last_blocks = {str(i) for i in indices[-pc.last_n_layers :]}
    for name, p in model.named_parameters(remove_duplicate=False):
        if under(name, unused):
            continue
        m = _BLOCK_INDEX.search(name)
        in_last = bool(m and m.group(1) in last_blocks)
        if in_last or any(pat.search(name) for pat in patterns):
            _require_trainable(name, p, cfg)
            p.requires_grad_(True)
