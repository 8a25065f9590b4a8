"""Fused pieces swapped into the model's own modules (beside the adapted Linears of ``adapt.py``).

SwiGLU: a gated MLP whose ``forward(self, x)`` is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
with a SiLU ``act_fn`` (Llama, Mistral, Qwen2/3, SmolLM and most of their relatives) is replaced by a
:class:`SwiGLUMLP` holding the same three Linears under the same names (so parameter names, adapters and
checkpoints are unchanged), whose forward calls ``kernels.swiglu.silu_mul``: the same math, one node that
saves G and U only. The check reads the class's forward source, so a model whose MLP differs in any way
keeps its own, and the run says which and why.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

from torch import nn

from fusedtune.kernels.swiglu import silu_mul

from .adapt import not_fused_lines

_SWIGLU_EXPR = re.escape("self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))")
# The whole body, whitespace removed: ``return EXPR`` or ``name = EXPR; return name``.
_SWIGLU_BODY = re.compile(rf"(return{_SWIGLU_EXPR}|(?P<v>\w+)={_SWIGLU_EXPR}return(?P=v))")


@dataclass
class PatchReport:
    swiglu: list[str] = field(default_factory=list)
    not_swiglu: dict[str, str] = field(default_factory=dict)  # module name -> why not

    def lines(self) -> list[str]:
        total = len(self.swiglu) + len(self.not_swiglu)
        if not total:
            return []
        head = f"fused SwiGLU: {len(self.swiglu)}/{total} gated MLPs"
        return [head, *not_fused_lines(self.not_swiglu, total, "all")]


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, a, None), nn.Module) for a in ("gate_proj", "up_proj", "down_proj"))


def _why_not_swiglu(module: nn.Module) -> str | None:
    act = getattr(module, "act_fn", None)
    if not (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):
        return f"activation {type(act).__name__}, not SiLU"
    forward = type(module).forward
    if list(inspect.signature(forward).parameters) != ["self", "x"]:
        return f"{type(module).__name__}.forward takes more than x"
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return f"{type(module).__name__}.forward has no readable source"
    lines = [ln.split("#")[0] for ln in source.splitlines()[1:]]  # the body, comments dropped
    if not _SWIGLU_BODY.fullmatch("".join("".join(lines).split())):
        return f"{type(module).__name__}.forward is not down(act(gate(x)) * up(x))"
    return None


class SwiGLUMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` over an existing MLP's own three Linears."""

    def __init__(self, mlp: nn.Module, backend: str) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.backend = backend
        self.replaces = type(mlp).__name__

    def forward(self, x):
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x), backend=self.backend))

    def extra_repr(self) -> str:
        return f"fused SwiGLU in place of {self.replaces}, backend={self.backend}"


def fuse_swiglu(model: nn.Module, backend: str, report: PatchReport | None = None) -> PatchReport:
    """Give every plain SiLU-gated MLP of ``model`` the fused gate (``backend``: triton or torch)."""
    report = report or PatchReport()
    for name, module in list(model.named_modules()):
        if not _is_gated_mlp(module) or isinstance(module, SwiGLUMLP):
            continue
        why = _why_not_swiglu(module) if name else "the model itself is the MLP"
        if why is not None:
            report.not_swiglu[name] = why
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, SwiGLUMLP(module, backend))
        report.swiglu.append(name)
    return report


def apply_patches(model: nn.Module, padding_free_wanted: bool, max_seq_len: int, backend: str) -> list[str]:
    """Fused SwiGLU and padding-free micro-batches on ``model``; the lines that say what took effect."""
    from . import padding_free

    lines = fuse_swiglu(model, backend).lines()
    lines.append(padding_free.setup(model, padding_free_wanted, max_seq_len))
    return lines
