"""What a run leaves behind: the PEFT-format adapter, or the trainable tensors, in safetensors.

``adapter_config.json`` + ``adapter_model.safetensors`` load with ``peft.PeftModel.from_pretrained``
onto the base model with no missing or unexpected keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import Config

PEFT_PREFIX = "base_model.model."


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules carrying ``lora_A`` / ``lora_B`` Parameters, by qualified name."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(getattr(mod, "lora_A", None), nn.Parameter)
        and isinstance(getattr(mod, "lora_B", None), nn.Parameter)
    }


def _peft_target_modules(model: nn.Module, adapted: list[str]) -> list[str] | str:
    """Leaf names when they pick exactly the adapted layers, else an exact full-match regex."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    chosen = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    if chosen == set(adapted):
        return leaves
    return "^(" + "|".join(n.replace(".", r"\.") for n in sorted(adapted)) + ")$"


def save_peft_adapter(model: nn.Module, cfg: Config, base_model_path: str, out_dir: Path) -> list[str]:
    """Write the LoRA weights and config in PEFT's format under ``out_dir``.

    Returns:
        The adapted module names.
    """
    from peft import LoraConfig

    modules = lora_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in modules.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = mod.lora_A.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = mod.lora_B.detach().contiguous().cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_cfg = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=_peft_target_modules(model, list(modules)),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_path,
    )
    peft_cfg.save_pretrained(str(out_dir))
    return list(modules)


def save_trainable(model: nn.Module, path: Path) -> int:
    """Save every trainable tensor (full / partial runs) to one safetensors file; returns the count."""
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return len(tensors)
