"""Mixture-of-experts layers: per-expert LoRA on their stacked weights, and QLoRA quantization of them.

transformers keeps an MoE layer's experts as one module with 3-D Parameters (``gate_up_proj``
``[E, 2I, H]``, or ``up_proj`` without a gate, and ``down_proj`` ``[E, H, I]``; ``[E, in, out]`` when the
class says ``is_transposed``), not as Linears, and picks their forward by
``config._experts_implementation``. Such a module is adapted in place:

- ``experts.fusedtune_lora[name]`` (:class:`~fusedtune.kernels.experts.ExpertsLoRA`): A ``[E, r, in]``
  and B ``[E, out, r]`` for the 3-D weight ``name``;
- under QLoRA, ``experts.fusedtune_quant[name]`` (:class:`~fusedtune.kernels.experts.QuantExperts`)
  replaces the dense weight, each expert packed as a Linear's weight would be;
- the experts implementation becomes ``fusedtune_experts`` (registered here): tokens sorted by expert,
  each projection one :func:`~fusedtune.kernels.experts.grouped_lora` node, the model's own gate
  (``_apply_gate``), activation, biases and post-expert norm in between.

The adapters are PEFT's ``target_parameters`` LoRA (``lora.ParamWrapper``): :func:`peft_tensors` writes
them in its layout, and PEFT computes the same function by adding ``s B_e A_e`` to every expert weight.
"""

from __future__ import annotations

import torch
from torch import nn

from fusedtune.kernels.experts import DenseExperts, ExpertsLoRA, QuantExperts, grouped_lora

EXPERTS_IMPLEMENTATION = "fusedtune_experts"
_LORA, _QUANT = "fusedtune_lora", "fusedtune_quant"


def weight_names(module: nn.Module) -> list[str]:
    first = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    return [first, "down_proj"]


def is_experts(module: nn.Module) -> bool:
    """A transformers experts module (``use_experts_implementation``) with 3-D expert weights."""
    if not all(hasattr(module, a) for a in ("has_gate", "is_transposed", "num_experts", "config")):
        return False
    return all(_stored(module, n) is not None for n in weight_names(module))


def _stored(module: nn.Module, name: str):
    """The dense 3-D Parameter or the QuantExperts that holds ``name``, else None."""
    quant = getattr(module, _QUANT, None)
    if quant is not None and name in quant:
        return quant[name]
    p = module._parameters.get(name)
    return p if p is not None and p.dim() == 3 else None


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every experts module of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if is_experts(m)}


def expert_weights(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``"<module>.<weight>" -> (experts module, weight name)`` for every 3-D expert weight."""
    return {f"{n}.{w}": (m, w) for n, m in expert_modules(model).items() for w in weight_names(m)}


def unhandled_stacked_weights(model: nn.Module) -> list[str]:
    """Stacked parameters (three or more dimensions, more than one along the first) of an expert or MoE
    module (by its class or parameter name) outside :func:`is_experts` and convolutions: the expert weights
    of an MoE layer that does not run through transformers' experts
    interface (Llama 4's ``Llama4TextExperts``, DBRX's). LoRA and QLoRA leave them dense and frozen."""
    out = []
    for mname, m in model.named_modules():
        if is_experts(m) or isinstance(m, nn.modules.conv._ConvNd):
            continue
        moe = any(w in type(m).__name__.lower() for w in ("expert", "moe"))  # not RWKV's [1, 1, H] mixes
        out += [
            f"{mname}.{n}" if mname else n
            for n, p in m.named_parameters(recurse=False)
            if p.dim() >= 3 and p.shape[0] > 1 and (moe or "expert" in n.lower())
        ]
    return out


def shape(module: nn.Module, name: str) -> tuple[int, int, int]:
    """``(experts, in_features, out_features)`` of weight ``name``."""
    stored = _stored(module, name)
    if isinstance(stored, QuantExperts):
        n, k = stored.shape
        return stored.num_experts, k, n
    e, a, b = stored.shape
    return (e, a, b) if module.is_transposed else (e, b, a)


def frozen_dtype(module: nn.Module, name: str) -> torch.dtype:
    """The dtype of weight ``name`` (before quantization, for a quantized one)."""
    stored = _stored(module, name)
    return stored.weight_dtype if isinstance(stored, QuantExperts) else stored.dtype


def _frozen(module: nn.Module, name: str) -> DenseExperts | QuantExperts:
    stored = _stored(module, name)
    return stored if isinstance(stored, QuantExperts) else DenseExperts(stored, module.is_transposed)


def add_lora(module: nn.Module, name: str, rank: int, alpha: float, dtype: torch.dtype) -> ExpertsLoRA:
    """Attach a trainable per-expert LoRA to weight ``name`` (A ``[E, r, in]``, B ``[E, out, r]``)."""
    e, k, n = shape(module, name)
    stored = _stored(module, name)
    device = stored.qweight.device if isinstance(stored, QuantExperts) else stored.device
    if getattr(module, _LORA, None) is None:
        setattr(module, _LORA, nn.ModuleDict())
    lora = ExpertsLoRA(e, k, n, rank, alpha, device=device, dtype=dtype)
    getattr(module, _LORA)[name] = lora
    _use_fusedtune_forward(module)
    return lora


def quantize(module: nn.Module, name: str, quant_type: str, blocksize: int, double_quant: bool,
             device: torch.device) -> QuantExperts:  # fmt: skip
    """Replace the dense 3-D weight ``name`` by its experts quantized one by one on ``device``."""
    dense = module._parameters[name]
    q = QuantExperts.from_dense(dense.data, module.is_transposed, quant_type, blocksize, double_quant, device)
    if getattr(module, _QUANT, None) is None:
        setattr(module, _QUANT, nn.ModuleDict())
    getattr(module, _QUANT)[name] = q
    del module._parameters[name]
    _use_fusedtune_forward(module)
    return q


def lora_of(module: nn.Module, name: str) -> ExpertsLoRA | None:
    loras = getattr(module, _LORA, None)
    return loras[name] if loras is not None and name in loras else None


def set_backend(module: nn.Module, backend: str) -> None:
    module.fusedtune_backend = backend


def _project(module: nn.Module, name: str, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    bias = getattr(module, f"{name}_bias", None) if getattr(module, "has_bias", False) else None
    stored = _stored(module, name)
    if torch.is_grad_enabled() and isinstance(stored, nn.Parameter) and stored.requires_grad:
        raise RuntimeError(
            f"{type(module).__name__}.{name} requires grad: the fusedtune experts forward trains adapters only "
            "(it computes no gradient for the frozen expert weights)"
        )
    backend = getattr(module, "fusedtune_backend", "torch")
    return grouped_lora(x, counts, _frozen(module, name), lora_of(module, name), bias, backend)


def experts_forward(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts' forward with tokens grouped by expert: transformers' ``grouped_mm`` algorithm, each
    projection a :func:`grouped_lora` node (LoRA and quantized weights included)."""
    num_tokens, top_k = top_k_index.shape
    ids = top_k_index.reshape(-1)
    ids_sorted, perm = torch.sort(ids, stable=True)
    counts = torch.bincount(ids_sorted, minlength=module.num_experts).tolist()  # one sync per layer
    if len(counts) != module.num_experts:
        raise ValueError(f"expert index out of range [0, {module.num_experts}) in {type(module).__name__}")
    x = hidden_states[perm // top_k]
    first, down = weight_names(module)
    h = _project(module, first, x, counts)
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    h = _project(module, down, h, counts)
    if getattr(module, "has_post_expert_norm", False):
        h = module.post_expert_norm(h)
    h = h * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    out = torch.empty_like(h)
    out[perm] = h
    return out.view(num_tokens, top_k, h.shape[-1]).sum(dim=1).to(hidden_states.dtype)  # 0 tokens too


def _use_fusedtune_forward(module: nn.Module) -> None:
    """Route ``module``'s forward (and every experts module sharing its config) through
    :func:`experts_forward`, which also runs the plain experts exactly."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, experts_forward)
    module.config._experts_implementation = EXPERTS_IMPLEMENTATION


def peft_tensors(model: nn.Module, prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The experts' adapters as PEFT saves them, and their ``target_parameters``.

    PEFT wraps a module once per targeted weight, in the module's parameter order, the first innermost:
    the last targeted weight's factors sit at ``<module>.lora_A.weight``, the one before at
    ``<module>.base_layer.lora_A.weight``, and so on.
    """
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    for mod_name, module in expert_modules(model).items():
        names = [w for w in weight_names(module) if lora_of(module, w) is not None]
        for i, w in enumerate(names):
            a, b = lora_of(module, w).peft_factors()
            where = f"{prefix}{mod_name}." + "base_layer." * (len(names) - 1 - i)
            tensors[f"{where}lora_A.weight"] = a.cpu()
            tensors[f"{where}lora_B.weight"] = b.cpu()
            targets.append(f"{mod_name}.{w}")
    return tensors, targets
