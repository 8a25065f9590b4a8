"""Fused pieces swapped into the model's own modules (beside the adapted Linears of ``adapt.py``).

RMSNorm: a norm whose ``forward`` is exactly ``LlamaRMSNorm``'s (Llama, Qwen2/3 including their q/k
norms, Mistral, SmolLM: every "Copied from" twin) or ``GemmaRMSNorm``'s (``1 + w`` in fp32, rounded once:
Gemma 1/2/3, their q/k norms included) is replaced by a :class:`FusedRMSNorm` holding the same ``weight``
Parameter (same names), whose forward calls ``kernels.rmsnorm.rms_norm``: the same math and rounding, one
node that saves the input in its own dtype and one fp32 scalar per row instead of the fp32 upcast. A norm
with other math, or a Llama-style one whose weight is in another dtype than the model's, keeps its own,
and the run says which and why.

SwiGLU: a gated MLP whose ``forward(self, x)`` is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
with a SiLU ``act_fn`` (Llama, Mistral, Qwen2/3, SmolLM and most of their relatives) is replaced by a
:class:`SwiGLUMLP` holding the same three Linears under the same names (so parameter names, adapters and
checkpoints are unchanged), whose forward calls ``kernels.swiglu.silu_mul``: the same math, one node that
saves G and U only. The check reads the class's forward source, so a model whose MLP differs in any way
keeps its own, and the run says which and why.

RoPE: an attention module whose forward calls ``apply_rotary_pos_emb(query_states, key_states, cos, sin)``
where its modeling file's ``apply_rotary_pos_emb`` and ``rotate_half`` are Llama's (compared as syntax
trees, docstrings aside: Llama, Mistral, Qwen2/3, Gemma 1/2/3, SmolLM, ...) runs that call through
``kernels.rope.apply_rope``: the same math, one node for q and k, no zero-filled gradient buffers. The
call is a module-level function, so the modeling file's global is replaced once by a dispatcher that takes
the fused path only inside the forward of an attention module patched here (a context variable set by
that module's forward): another model of the same class in the process, and every other caller, get
the original function. Partial-rotary or interleaved variants keep their own, and the run says which.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import functools
import inspect
import logging
import re
import textwrap
from dataclasses import dataclass, field

import torch
from torch import nn

from fusedtune.kernels.rmsnorm import rms_norm
from fusedtune.kernels.rope import apply_rope
from fusedtune.kernels.swiglu import silu_mul

from .adapt import not_fused_lines

log = logging.getLogger(__name__)

_SWIGLU_EXPR = re.escape("self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))")
# The whole body, whitespace removed: ``return EXPR`` or ``name = EXPR; return name``.
_SWIGLU_BODY = re.compile(rf"(return{_SWIGLU_EXPR}|(?P<v>\w+)={_SWIGLU_EXPR}return(?P=v))")


@dataclass
class PatchReport:
    swiglu: list[str] = field(default_factory=list)
    not_swiglu: dict[str, str] = field(default_factory=dict)  # gated MLP name -> why not
    other_mlps: dict[str, str] = field(default_factory=dict)  # MLPs of another shape (Phi-3's, GPT-2's)
    rmsnorm: list[str] = field(default_factory=list)
    not_rmsnorm: dict[str, str] = field(default_factory=dict)
    rope: list[str] = field(default_factory=list)
    not_rope: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = []
        for what, unit, done, why_not in (
            ("SwiGLU", "MLPs", self.swiglu, {**self.not_swiglu, **self.other_mlps}),
            ("RMSNorm", "norms", self.rmsnorm, self.not_rmsnorm),
            ("RoPE", "attention layers", self.rope, self.not_rope),
        ):
            total = len(done) + len(why_not)
            if total:
                out += [f"fused {what}: {len(done)}/{total} {unit}", *not_fused_lines(why_not, total, "all")]
        return out


@functools.cache  # one read per function, not per module of every layer
def _body(forward) -> str | None:
    """A forward's body, comments and whitespace removed (None when its source cannot be read)."""
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return None
    return "".join("".join(ln.split("#")[0] for ln in source.splitlines()[1:]).split())


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, a, None), nn.Module) for a in ("gate_proj", "up_proj", "down_proj"))


def _why_not_swiglu(module: nn.Module) -> str | None:
    act = getattr(module, "act_fn", None)
    if not (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):
        return f"activation {type(act).__name__}, not SiLU"
    forward = type(module).forward
    if list(inspect.signature(forward).parameters) != ["self", "x"]:
        return f"{type(module).__name__}.forward takes more than x"
    body = _body(forward)
    if body is None:
        return f"{type(module).__name__}.forward has no readable source"
    if not _SWIGLU_BODY.fullmatch(body):
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
        if isinstance(module, SwiGLUMLP):
            continue
        if not _is_gated_mlp(module):
            if name and type(module).__name__.endswith("MLP"):  # Phi-3's gate_up_proj, GPT-2's c_fc: named
                report.other_mlps[name] = (
                    f"{type(module).__name__} has no gate_proj/up_proj/down_proj Linears"
                )
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


@functools.cache  # read once, not for every norm of every model
def _llama_rmsnorm_body() -> str:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _body(LlamaRMSNorm.forward)


@functools.cache
def _gemma_rmsnorm_bodies() -> tuple[str, str]:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    return _body(GemmaRMSNorm.forward), _body(GemmaRMSNorm._norm)


def _rmsnorm_style(module: nn.Module, model_dtype) -> tuple[str | None, str | None]:
    """``(style, None)`` when ``module`` computes LlamaRMSNorm's or GemmaRMSNorm's math, else
    ``(None, why not)``."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.ndim != 1:
        return None, f"{name} has no 1-D weight"
    body = _body(type(module).forward)
    if body is None:
        return None, f"{name}.forward has no readable source"
    if body == _llama_rmsnorm_body():
        if not isinstance(getattr(module, "variance_epsilon", None), float):
            return None, f"{name} has no float variance_epsilon"
        if model_dtype is not None and weight.dtype != model_dtype:
            return None, f"weight dtype {weight.dtype} differs from the model's {model_dtype}"
        return "llama", None
    norm = getattr(type(module), "_norm", None)
    if (body, norm and _body(norm)) == _gemma_rmsnorm_bodies():
        if not isinstance(getattr(module, "eps", None), float):
            return None, f"{name} has no float eps"
        return "gemma", None  # its output is in the input's dtype whatever the weight's
    return None, f"{name}.forward is neither LlamaRMSNorm's nor GemmaRMSNorm's (other math)"


class FusedRMSNorm(nn.Module):
    """``LlamaRMSNorm``'s (or ``GemmaRMSNorm``'s: ``style="gemma"``) math through ``kernels.rmsnorm`` over
    an existing norm's own weight."""

    def __init__(self, norm: nn.Module, backend: str, name: str = "", style: str = "llama") -> None:
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.eps if style == "gemma" else norm.variance_epsilon
        self.style = style
        self.backend = backend
        self.replaces = type(norm).__name__
        self.name = name
        self._said_unfused = False

    def forward(self, hidden_states):
        backend = self.backend
        if (
            backend == "triton"
            and self.style == "llama"  # Gemma's output is in the input's dtype whatever the weight's
            and hidden_states.dtype != self.weight.dtype
            and hidden_states.dtype != torch.float64
        ):
            # the triton kernels take one dtype; HF's module promotes, which the torch path does too
            backend = "torch"
            if not self._said_unfused:
                self._said_unfused = True
                log.warning(
                    "RMSNorm %s: input is %s but its weight is %s; such inputs take the torch path "
                    "(same math, promoted as HF does)",
                    self.name or self.replaces, hidden_states.dtype, self.weight.dtype,
                )  # fmt: skip
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=backend, style=self.style)

    def extra_repr(self) -> str:
        return (
            f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, {self.style} style, "
            f"fused in place of {self.replaces}, backend={self.backend}"
        )


def fuse_rmsnorm(model: nn.Module, backend: str, report: PatchReport | None = None) -> PatchReport:
    """Give every ``LlamaRMSNorm``-equivalent norm of ``model`` the fused kernels (``backend``: triton or
    torch)."""
    report = report or PatchReport()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    model_dtype = emb.weight.dtype if emb is not None else None
    for name, module in list(model.named_modules()):
        cls = type(module).__name__
        if name and (isinstance(module, nn.LayerNorm) or cls.endswith("LayerNorm")):
            report.not_rmsnorm[name] = (  # a class of its own may be an RMS norm (CPM-Ant's): no claim
                f"{cls} subtracts the mean: not an RMSNorm"
                if isinstance(module, nn.LayerNorm)
                else f"{cls}: not a norm class fusedtune knows"
            )
            continue
        if not type(module).__name__.endswith("RMSNorm") or isinstance(module, FusedRMSNorm) or not name:
            continue
        style, why = _rmsnorm_style(module, model_dtype)
        if why is not None:
            report.not_rmsnorm[name] = why
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, FusedRMSNorm(module, backend, name, style))
        report.rmsnorm.append(name)
    return report


# -- RoPE --------------------------------------------------------------------------------------------

_ROPE_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("fusedtune_rope", default=None)
_ROPE_CALL = "apply_rotary_pos_emb(query_states,key_states,cos,sin)"


@functools.cache
def _tree(fn) -> str | None:
    """A function's signature and body as a syntax tree dump, docstring and decorators aside (None when
    its source cannot be read)."""
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not isinstance(node, ast.FunctionDef):
        return None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return ast.dump(node.args) + "".join(ast.dump(stmt) for stmt in body)


@functools.cache
def _llama_rope_trees() -> tuple[str | None, str | None]:
    from transformers.models.llama import modeling_llama

    return _tree(modeling_llama.apply_rotary_pos_emb), _tree(modeling_llama.rotate_half)


class _RoPEDispatch:
    """Stands in for a modeling file's ``apply_rotary_pos_emb``: the fused rotation inside a patched
    attention module's forward, the original everywhere else."""

    def __init__(self, original) -> None:
        self.original = original
        functools.update_wrapper(self, original)

    def __call__(self, q, k, cos, sin, *args, **kwargs):
        backend = _ROPE_BACKEND.get()
        if backend is None or args or kwargs:
            return self.original(q, k, cos, sin, *args, **kwargs)
        return apply_rope(q, k, cos, sin, backend=backend)


class _FusedRoPEForward:
    """An attention module's own forward, run with the fused rotation switched on."""

    def __init__(self, forward, backend: str) -> None:
        self.forward, self.backend = forward, backend

    def __call__(self, *args, **kwargs):
        token = _ROPE_BACKEND.set(self.backend)
        try:
            return self.forward(*args, **kwargs)
        finally:
            _ROPE_BACKEND.reset(token)


def _rope_namespace(module: nn.Module) -> dict:
    """The globals the attention's forward looks ``apply_rotary_pos_emb`` up in (its defining module's,
    which for an inherited forward is not the subclass's module)."""
    return getattr(inspect.unwrap(type(module).forward), "__globals__", {})


def _why_not_rope(module: nn.Module, body: str) -> str | None:
    name = type(module).__name__
    if _ROPE_CALL not in body:
        return f"{name}.forward calls apply_rotary_pos_emb with other arguments"
    namespace = _rope_namespace(module)
    fn = namespace.get("apply_rotary_pos_emb")
    fn = fn.original if isinstance(fn, _RoPEDispatch) else fn
    rotate = getattr(inspect.unwrap(fn), "__globals__", {}).get("rotate_half") if callable(fn) else None
    if fn is None or rotate is None:
        return f"{name}.forward's module has no apply_rotary_pos_emb with a rotate_half"
    if (_tree(fn), _tree(rotate)) != _llama_rope_trees() or None in _llama_rope_trees():
        file = str(namespace.get("__name__", "?")).rsplit(".", 1)[-1]
        return f"{file}.apply_rotary_pos_emb is not Llama's (other math or rounding)"
    return None


def fuse_rope(model: nn.Module, backend: str, report: PatchReport | None = None) -> PatchReport:
    """Run every Llama-style ``apply_rotary_pos_emb`` call of ``model``'s attention modules through
    ``kernels.rope`` (``backend``: triton or torch)."""
    report = report or PatchReport()
    for name, module in model.named_modules():
        if isinstance(module.__dict__.get("forward"), _FusedRoPEForward):
            continue
        body = _body(type(module).forward)
        if not body or "apply_rotary_pos_emb(" not in body:
            continue
        why = _why_not_rope(module, body)
        if why is not None:
            report.not_rope[name] = why
            continue
        namespace = _rope_namespace(module)  # where the forward will look the function up
        if not isinstance(namespace["apply_rotary_pos_emb"], _RoPEDispatch):
            namespace["apply_rotary_pos_emb"] = _RoPEDispatch(namespace["apply_rotary_pos_emb"])
        module.forward = _FusedRoPEForward(module.forward, backend)
        report.rope.append(name)
    return report


def apply_patches(model: nn.Module, padding_free_wanted: bool, max_seq_len: int, backend: str) -> list[str]:
    """Fused SwiGLU, RMSNorm and RoPE, and padding-free micro-batches, on ``model``; the lines that say
    what took effect."""
    from . import loss, padding_free

    # The two set-up probes (one short forward each) run first, with the model's own norms, MLPs and
    # rotations and the adapters on their torch path, under a forked RNG: under Triton's interpreter the
    # fused kernels made them take two minutes for SmolLM2, and dropout masks drawn in them would move a
    # fresh run's random stream. What they check (row boundaries reaching attention, what follows the
    # LM head) is the same with or without the fused kernels.
    with _probe_mode(model):
        probed = [padding_free.setup(model, padding_free_wanted, max_seq_len), loss.head_report(model)]
    report = fuse_swiglu(model, backend)
    fuse_rmsnorm(model, backend, report)
    return fuse_rope(model, backend, report).lines() + probed


@contextlib.contextmanager
def _probe_mode(model: nn.Module):
    from fusedtune.kernels.modules import LoRALinear, QuantLoRALinear

    fused = [
        m for m in model.modules() if isinstance(m, LoRALinear | QuantLoRALinear) and m.backend != "torch"
    ]
    before = [m.backend for m in fused]
    for m in fused:
        m.backend = "torch"
    try:
        with torch.random.fork_rng(
            devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []
        ):
            yield
    finally:
        for m, b in zip(fused, before, strict=True):
            m.backend = b
