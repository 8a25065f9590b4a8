"""Memory accounting: what the weights, gradients and optimizer state hold, counted exactly.

The live counts (``*_bytes`` over real tensors) and the predicted ones (``expected_*``) are separate
functions so that tests can hold one against the other.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# bitsandbytes' 8-bit optimizers: tensors under this many elements keep 32-bit state,
# the rest keep uint8 moments with one fp32 absmax per block of this many elements.
BNB_MIN_8BIT_SIZE = 4096
BNB_STATE_BLOCKSIZE = 256
BNB_QMAP_BYTES = 256 * 4  # one 256-entry fp32 code table per moment, shared by all parameters


def _unique_tensors(tensors) -> list[torch.Tensor]:
    seen: set[tuple[int, int]] = set()
    out = []
    for t in tensors:
        key = (t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def tensor_bytes(tensors) -> int:
    """Bytes held by ``tensors``, counting a storage shared by several of them once."""
    return sum(t.nbytes for t in _unique_tensors(tensors))


@dataclass
class ParamAccounting:
    """Parameter counts and bytes, trainable vs frozen (frozen bytes include buffers: packed weights; a
    packed weight counts the parameters it stands for)."""

    trainable_params: int
    trainable_bytes: int
    frozen_params: int
    frozen_bytes: int

    @property
    def total_params(self) -> int:
        return self.trainable_params + self.frozen_params


def quant_format_label(quant_type: str, double_quant: bool) -> str:
    """``nf4 + double quant``, ``int8``..."""
    if quant_type == "int8":
        return "int8"
    return f"{quant_type} + double quant" if double_quant else quant_type


def is_bnb_quantized(module: nn.Module) -> bool:
    """True for bitsandbytes' Linear4bit / Linear8bitLt (both subclass nn.Linear)."""
    cls = type(module)
    return cls.__module__.startswith("bitsandbytes") and cls.__name__ in (
        "Linear4bit",
        "Linear8bitLt",
        "LinearNF4",
        "LinearFP4",
    )


def _weight_numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a bitsandbytes 4-bit parameter's logical shape, not its packed bytes."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else p.numel()


def _bnb_packed(model: nn.Module) -> list[tuple[torch.Tensor, str]]:
    """The tensors of a bitsandbytes-quantized checkpoint's Linears with their format label: the packed
    weight (a parameter) and its quantization state, which bitsandbytes keeps as plain attributes, neither
    parameters nor buffers (the same tensors a QuantLoRALinear holds as buffers when it takes one over)."""
    out = []
    for mod in model.modules():
        if not is_bnb_quantized(mod):
            continue
        weight = mod.weight
        qs = getattr(weight, "quant_state", None)
        if qs is not None:  # Linear4bit
            label = quant_format_label(qs.quant_type, qs.nested)
            out += [(weight, label), (qs.absmax, label)]
            if qs.nested:
                out += [(qs.offset, label), (qs.state2.absmax, label), (qs.state2.code, label)]
        elif getattr(weight, "SCB", None) is not None:  # Linear8bitLt
            out += [(weight, "int8"), (weight.SCB, "int8")]
    return out


def param_accounting(model: nn.Module) -> ParamAccounting:
    """Count the model's trainable and frozen tensors (shared tensors once).

    Bytes count every frozen tensor, buffers included (packed weights and their scales, tables).
    Parameter counts are of weights: a packed weight counts the ``N·K`` it stands for, and other
    buffers (scales, RoPE tables, Gemma's ``embed_scale``) count none, as PEFT and transformers count.
    """
    from fusedtune.kernels.modules import PackedBuffers

    trainable = _unique_tensors([p for p in model.parameters() if p.requires_grad])
    frozen_params = _unique_tensors([p for p in model.parameters() if not p.requires_grad])
    frozen = _unique_tensors(
        frozen_params
        + [b for name, b in model.named_buffers() if not name.endswith("inv_freq")]
        + [t for t, _ in _bnb_packed(model)]
    )
    packed = sum(m.weight_numel for m in model.modules() if isinstance(m, PackedBuffers))
    return ParamAccounting(
        trainable_params=sum(p.numel() for p in trainable),
        trainable_bytes=sum(p.nbytes for p in trainable),
        frozen_params=sum(_weight_numel(p) for p in frozen_params) + packed,
        frozen_bytes=sum(p.nbytes for p in frozen),
    )


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of every ``.grad`` currently held by the model's parameters."""
    return tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (bitsandbytes' shared code tables once)."""
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def expected_optimizer_state_bytes(params: list[torch.Tensor], optimizer_name: str) -> int:
    """The state the optimizer will hold for ``params`` once each has taken a step.

    Args:
        params: the trainable parameters handed to the optimizer.
        optimizer_name: ``adamw8bit``, ``paged_adamw8bit``, ``adamw32bit`` or ``adamw_torch``.

    Returns:
        Bytes: two moments per parameter at the optimizer's precision, plus its bookkeeping.
    """
    total = 0
    if optimizer_name == "adamw_torch":
        for p in params:
            total += 2 * p.nbytes + 4  # exp_avg, exp_avg_sq in the param dtype; step: fp32 scalar
        return total
    any_8bit = False
    for p in params:
        n = p.numel()
        if optimizer_name in ("adamw8bit", "paged_adamw8bit") and n >= BNB_MIN_8BIT_SIZE:
            any_8bit = True
            blocks = -(-n // BNB_STATE_BLOCKSIZE)
            total += 2 * n + 2 * blocks * 4  # two uint8 moments + their fp32 absmax per block
        else:
            total += 2 * n * 4  # two fp32 moments
    if any_8bit:
        total += 2 * BNB_QMAP_BYTES
    return total


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA ``max_memory_allocated`` on a GPU, the process' peak RSS otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def checkpoint_mappings(under: Path | None = None) -> list[tuple[int, int]]:
    """Address ranges of the safetensors files this process has mapped (Linux; elsewhere none), those
    under folder ``under`` alone when given."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    folder = None if under is None else Path(under).resolve()
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            if folder is not None and not Path(fields[5]).is_relative_to(folder):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def release_host_memory(model: nn.Module) -> int:
    """Give the host memory a CPU model no longer uses back to the OS (``method: qlora`` once packed).

    transformers maps a safetensors checkpoint and leaves CPU tensors of the file's dtype as views of that
    mapping: every page the quantization read stays resident (fp32 SmolLM2: 425 MiB of Linear weights that
    the packed copies replaced) for as long as any tensor of the checkpoint, the embedding say, is alive.
    The parameters and buffers still inside such a mapping get their own memory here (a plain tensor's
    data only: a bitsandbytes parameter keeps its state beside it, and keeps the mapping), so the mapping
    goes with the last view. Freed heap memory (a checkpoint loaded in another dtype was copied) then goes
    back through glibc's ``malloc_trim`` where there is one.

    Returns:
        The bytes copied out of checkpoint mappings.
    """
    mapped = checkpoint_mappings()
    copied = 0
    if mapped:
        done: dict[int, torch.Tensor] = {}  # a buffer registered twice gets one copy
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for name, t in tensors.items():
                    if t is None or type(t) not in (nn.Parameter, torch.Tensor):
                        continue
                    if id(t) in done:
                        tensors[name] = done[id(t)]
                        continue
                    if t.device.type == "cpu" and any(lo <= t.data_ptr() < hi for lo, hi in mapped):
                        copied += t.nbytes
                        if isinstance(t, nn.Parameter):
                            t.data = t.data.clone()  # the same Parameter: ties and references hold
                        else:
                            tensors[name] = t.clone()
                    done[id(t)] = tensors[name]
    if sys.platform.startswith("linux"):
        import ctypes
        import ctypes.util

        libc = ctypes.util.find_library("c")
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
        if trim is not None:  # glibc; musl has none
            trim(0)
    return copied


def fmt_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _unique_any(tensors) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        key = id(t) if t.is_meta else (t.untyped_storage().data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def dtype_label(dtype: torch.dtype) -> str:
    """``torch.bfloat16 -> 'bf16'`` (the config's names; other dtypes by torch's name)."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


def frozen_bytes_by_format(model: nn.Module) -> dict[str, int]:
    """Frozen parameter and buffer bytes of a live (or meta) model, by storage format.

    Packed weights of ``QuantLoRALinear`` and ``QuantExperts`` modules, and of a bitsandbytes-quantized
    checkpoint's Linears, count under their format (``nf4 + double quant``...);
    every other frozen tensor under its dtype. Shared storage counts once, RoPE tables not at all
    (as :func:`memory.param_accounting`).
    """
    from fusedtune.kernels import QuantLoRALinear
    from fusedtune.kernels.experts import QuantExperts

    fmt_of: dict[int, str] = {}
    for mod in model.modules():
        if isinstance(mod, QuantLoRALinear | QuantExperts):
            label = quant_format_label(mod.quant_type, mod.double_quant)
            for _, buf in mod.named_buffers(recurse=False):
                fmt_of[id(buf)] = label
    bnb = _bnb_packed(model)
    fmt_of |= {id(t): label for t, label in bnb}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    frozen += [b for name, b in model.named_buffers() if not name.endswith("inv_freq")]
    frozen += [t for t, _ in bnb]
    out: dict[str, int] = {}
    for t in _unique_any(frozen):
        label = fmt_of.get(id(t)) or dtype_label(t.dtype)
        out[label] = out.get(label, 0) + t.nbytes
    return out


def measured_breakdown_lines(accounting: dict) -> list[str]:
    """The run summary's memory lines: the parts ``trainer estimate`` predicts, as measured.

    Args:
        accounting: ``loop.run``'s accounting (``frozen_by_format``, ``trainable_bytes``,
            ``gradient_bytes``, ``optimizer_state_bytes``, ``master_weight_bytes`` (optional),
            ``peak_memory_bytes``, ``peak_memory_kind``,
            ``saved_for_backward``: :class:`SavedBytes` as a dict, or None with gradient checkpointing).
    """
    a = accounting
    by_format = a.get("frozen_by_format") or {"all": a["frozen_bytes"]}
    masters = a.get("master_weight_bytes", 0)
    persistent = sum(by_format.values()) + a["trainable_bytes"] + a["optimizer_state_bytes"] + masters
    saved = a.get("saved_for_backward")
    lines = [
        "memory (measured): frozen weights "
        + (", ".join(f"{fmt_bytes(n)} {label}" for label, n in by_format.items() if n) or "none (all train)")
        + f"; trainable {fmt_bytes(a['trainable_bytes'])}; gradients {fmt_bytes(a['gradient_bytes'])}; "
        f"optimizer state {fmt_bytes(a['optimizer_state_bytes'])}"
        + (f"; fp32 master weights {fmt_bytes(masters)}" if masters else "")
    ]
    if saved is not None and not saved["tokens"]:  # resumed at the last step: nothing ran here
        lines.append(
            "memory (measured): saved activations not measured (no training step ran in this process)"
        )
        saved = None
    elif saved is not None:
        lines.append(
            f"memory (measured): saved for backward by the largest micro-batch ({saved['tokens']:,} tokens): "
            f"activations {fmt_bytes(saved['activations'])}, loss {fmt_bytes(saved['loss'])}"
        )
    else:
        lines.append(
            "memory (measured): saved activations not counted (gradient checkpointing holds its block "
            "inputs outside autograd's saved tensors)"
        )
    held = persistent + (saved["activations"] + saved["loss"] if saved else 0)
    what = "gradients, backward and loss transients" + (
        "" if a["peak_memory_kind"].startswith("cuda") else ", torch and library code, allocator caching"
    )
    if saved is None:
        what = "activations, " + what
    lines.append(
        f"memory (measured): peak {fmt_bytes(a['peak_memory_bytes'])} ({a['peak_memory_kind']}), "
        f"of which {fmt_bytes(max(a['peak_memory_bytes'] - held, 0))} beyond weights, optimizer state and "
        f"saved tensors ({what}); "
        "`trainer estimate CONFIG --measure` sets the estimate beside the measurement"
    )
    return lines


# ---------------------------------------------------------------------------------------------------
# What the forward pass keeps for backward, measured
# ---------------------------------------------------------------------------------------------------

_SAVED_PART = contextvars.ContextVar("fusedtune_saved_part", default="activations")


@contextlib.contextmanager
def saved_as(part: str):
    """Inside: tensors autograd saves count under ``part`` in a :class:`SavedTensorMeter` (the loss
    marks its LM head and cross-entropy ``"loss"``; everything else is ``"activations"``)."""
    token = _SAVED_PART.set(part)
    try:
        yield
    finally:
        _SAVED_PART.reset(token)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    st = t.untyped_storage()
    return str(st.device), st.data_ptr()


@dataclass
class SavedBytes:
    """Storages autograd held for backward at the end of one micro-batch's forward, by part."""

    activations: int = 0
    loss: int = 0
    tokens: int = 0  # the micro-batch's non-pad tokens
    index: int = -1  # which micro-batch it was, counting from 0 for this meter

    @property
    def total(self) -> int:
        return self.activations + self.loss


@dataclass
class SavedTensorMeter:
    """Bytes each micro-batch's forward saves for backward, counted as autograd saves them.

    Saved-tensor hooks see every tensor an op or an ``autograd.Function`` keeps for backward. A storage
    counts once, whatever views of it are saved; the model's own parameters and buffers (every Linear
    saves its weight) count not at all: they are the frozen and trainable weights, held anyway. The pack
    hook hands autograd a detached alias of the same storage (no copy; the original would make autograd
    keep its own graph alive in a reference cycle). :attr:`largest` is the micro-batch that saved most.

    Not seen: what gradient checkpointing keeps (its block inputs are held by the checkpoint, not saved
    through autograd), and transients that live only inside an op or between forward and backward.
    """

    exclude: set = field(default_factory=set)
    largest: SavedBytes = field(default_factory=SavedBytes)
    count: int = 0  # micro-batches metered so far

    @classmethod
    def for_model(cls, model: nn.Module) -> SavedTensorMeter:
        tensors = [*model.parameters(), *model.buffers()]
        return cls(exclude={_storage_key(t) for t in tensors if not t.is_meta})

    @contextlib.contextmanager
    def micro_batch(self, batch: dict[str, torch.Tensor]):
        """Count what the forward of ``batch`` inside saves; keep it when it is the largest so far."""
        got = SavedBytes(index=self.count)
        self.count += 1
        seen: set[tuple[str, int]] = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = _storage_key(t)
            if key not in seen and key not in self.exclude:
                seen.add(key)
                part = _SAVED_PART.get()
                setattr(got, part, getattr(got, part) + t.untyped_storage().nbytes())
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield got
        if got.total > self.largest.total:
            got.tokens = int(batch["attention_mask"].sum())
            self.largest = got


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t
