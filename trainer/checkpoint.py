"""What a run leaves behind: the PEFT-format adapter, or the trainable tensors, in safetensors; and
the training checkpoints a run resumes from (atomic, verified by a manifest, no pickle).

``adapter_config.json`` + ``adapter_model.safetensors`` load with ``peft.PeftModel.from_pretrained``
onto the base model with no missing or unexpected keys.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fusedtune.kernels.experts import ExpertsLoRA

from . import experts
from .config import Config
from .errors import UserError

PEFT_PREFIX = "base_model.model."


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers carrying ``lora_A`` / ``lora_B`` Parameters, by qualified name (the experts' stacked
    adapters are ``experts.peft_tensors``')."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(getattr(mod, "lora_A", None), nn.Parameter)
        and isinstance(getattr(mod, "lora_B", None), nn.Parameter)
        and not isinstance(mod, ExpertsLoRA)
    }


def _peft_target_modules(model: nn.Module, adapted: list[str]) -> list[str] | str:
    """Leaf names when they pick exactly the adapted layers, else an exact full-match regex."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    chosen = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    if chosen == set(adapted):
        return leaves
    return "^(" + "|".join(n.replace(".", r"\.") for n in sorted(adapted)) + ")$"


def _peft_renames(model: nn.Module) -> set[str]:
    """Leaf names PEFT would take for transformers 4's expert Linears in this model and re-target.

    Loading an adapter under transformers 5, PEFT rewrites the config of MoE model types whose experts were
    fused (``transformers_weight_conversion``): ``gate_proj``/``up_proj``/``down_proj`` in
    ``target_modules`` become the fused expert weights (at twice the rank), wherever they are, so a shared
    expert's Linears (DeepSeek-V3, GLM-4-MoE, Qwen3-Next...) would load wrong. Those Linears are exported
    as ``target_parameters`` (``<linear>.weight``: the same tensors), which the rewrite leaves alone.
    """
    try:
        from peft.utils.transformers_weight_conversion import (
            _MODEL_TO_CONVERSION_PATTERN,
            _MOE_TARGET_MODULE_MAPPING,
        )
    except ImportError:  # a PEFT without the rewrite
        return set()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    pattern = _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    return set(_MOE_TARGET_MODULE_MAPPING.get(pattern, {})) if pattern else set()


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
    expert_tensors, expert_targets = experts.peft_tensors(model, PEFT_PREFIX)
    tensors.update(expert_tensors)
    renamed = _peft_renames(model)
    as_params = [n for n in modules if n.rsplit(".", 1)[-1] in renamed]
    linears = [n for n in modules if n not in as_params]
    dropout = cfg.lora.dropout
    if as_params and dropout > 0:
        # PEFT's parameter LoRA takes no dropout; it changes nothing at inference
        dropout = 0.0
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_file(tensors, out_dir / "adapter_model.safetensors")
    peft_cfg = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=dropout,
        target_modules=_peft_target_modules(model, linears) if linears else None,
        target_parameters=[*expert_targets, *(f"{n}.weight" for n in as_params)] or None,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_path,
    )
    peft_cfg.save_pretrained(str(out_dir))
    return [*modules, *expert_targets]


def save_trainable(model: nn.Module, path: Path) -> int:
    """Save every trainable tensor (full / partial runs) to one safetensors file; returns the count."""
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    _save_file(tensors, path)
    return len(tensors)


# ---------------------------------------------------------------------------------------------------
# Training checkpoints: everything a run needs to continue bit-exactly, written atomically
# ---------------------------------------------------------------------------------------------------
#
# <output_dir>/checkpoints/step-N/
#   trainable.safetensors   every trainable tensor, by parameter name (its fp32 copy where the optimizer
#                           updates one: optim.master_weights)
#   optimizer.safetensors   every tensor of the optimizer state (bitsandbytes state1/state2, qmaps, absmax)
#   optimizer.json          the rest of the optimizer state (param groups, steps), tensors by reference
#   rng.safetensors         torch CPU (and CUDA) generator states
#   state.json              step, data position, scheduler, python/numpy RNG, counters, the resolved
#                           config and its hash, library versions
#   manifest.json           written last: sha256 and size of each file above
#
# The directory is assembled under checkpoints/.tmp-step-N-<pid>, every file fsynced, renamed into
# place, and only then is the manifest written (itself via a temp file and rename). A directory without
# a manifest whose hashes match is an interrupted write: resume skips it. Nothing is pickled.

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
CHECKPOINT_FORMAT = 1
# 2: a decaying schedule reaches its floor one step after the last (1, before 4941d0d: at the last step,
# which then ran at lr * min_lr_ratio); a checkpoint without it was written under 1
LR_SCHEDULE_VERSION = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Test-only fault injection: "STEP:STAGE:ACTION" (action kill | enospc | sleep | sigterm) at a named point of the
# write of the checkpoint at STEP. Stages: each file name after it is written, "renamed" (after the
# rename, before the manifest).
FAULT_ENV = "FUSEDTUNE_TEST_CHECKPOINT_FAULT"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.save_file`` with the file mode any other output gets (its writer makes 0600 files,
    whatever the umask: an adapter another user could not read)."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())


class CheckpointError(UserError):
    """A checkpoint that cannot be written, found, verified or used for this run."""


@dataclass
class Checkpoint:
    """A verified checkpoint directory and its ``state.json``; tensors load on demand."""

    path: Path
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Load one of the checkpoint's safetensors files (``trainable``, ``optimizer``, ``rng``)."""
        return load_file(str(self.path / f"{name}.safetensors"))

    def scheduler_state(self) -> dict:
        """The LR scheduler's ``state_dict``."""
        return _from_plain(self.state["scheduler"], {})

    def optimizer_state(self) -> dict:
        """The optimizer's ``state_dict``, rebuilt from JSON + safetensors."""
        structure = json.loads((self.path / "optimizer.json").read_text())
        return _from_plain(structure, self.tensors("optimizer"))


def checkpoint_root(output_dir: str | Path) -> Path:
    """``<output_dir>/checkpoints``."""
    return Path(output_dir) / CHECKPOINTS


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers (recorded in every checkpoint)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for dist in ("torch", "bitsandbytes", "transformers", "safetensors", "numpy", "fusedtune", "triton"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


# -- JSON encoding of nested state with tensors kept aside (no pickle) -----------------------------


def _to_plain(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON-able structure; tensors go to ``tensors`` under their dotted path and are referenced."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()  # copy: shared qmaps stay apart
        return {"__tensor__": path}
    if isinstance(obj, dict):
        items = [[k, _to_plain(v, tensors, f"{path}.{k}")] for k, v in obj.items()]
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return dict(items)
        return {"__items__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_plain(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_to_plain(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {path}")


def _from_plain(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _from_plain(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_from_plain(v, tensors) for v in obj["__tuple__"])
        return {k: _from_plain(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_plain(v, tensors) for v in obj]
    return obj


# -- RNG -------------------------------------------------------------------------------------------


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(python and numpy generator states as JSON, torch CPU/CUDA generator states as tensors)."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": _to_plain(random.getstate(), {}, "python"),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` captured."""
    import numpy as np

    random.setstate(_from_plain(plain["python"], {}))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=_cuda_index)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _cuda_index(key: str) -> int:
    return int(key.split(".", 1)[1])


# -- Writing ----------------------------------------------------------------------------------------


def _fault(step: int, stage: str) -> None:
    """Test-only: act on ``$FUSEDTUNE_TEST_CHECKPOINT_FAULT`` at this point of a checkpoint write."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at_step, at_stage, action = spec.split(":")
    if int(at_step) != step or at_stage != stage:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif action == "sleep":
        # Short sleeps: a signal the kernel hands to another thread (torch's pool) trips Python's
        # handler but cannot interrupt the main thread's sleep, which would then block for the whole
        # time. A real write is many short calls into C, each a point where handlers run.
        for _ in range(1200):
            time.sleep(0.1)
    elif action == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    keep_last: int,
    masters: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``root/step-<step>`` atomically, then drop old checkpoints beyond ``keep_last``.

    Args:
        root: ``<output_dir>/checkpoints``.
        step: optimizer steps done.
        model: its trainable parameters are saved by name.
        optimizer: its whole ``state_dict`` (bitsandbytes 8-bit state included).
        scheduler: the LR scheduler (``state_dict`` as JSON).
        state: the loop's JSON-able state: data position, counters, config, ...
        keep_last: how many valid checkpoints to keep (the new one always stays).
        masters: fp32 copies the optimizer updates (``optim.master_weights``), saved by name in place
            of their rounded weights.

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: the write failed (disk full, unwritable); the previous checkpoints are intact.
    """
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_plain = _to_plain(optimizer.state_dict(), opt_tensors, "optimizer")
        rng_plain, rng_tensors = rng_state()
        masters = masters or {}
        trainable = {
            n: masters.get(n, p).detach().to("cpu", copy=True).contiguous()
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        full_state = {
            **state,
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "scheduler": _to_plain(scheduler.state_dict(), {}, "scheduler"),
            "rng": rng_plain,
            "trainable": {n: list(t.shape) for n, t in trainable.items()},
            "versions": library_versions(),
            "lr_schedule": LR_SCHEDULE_VERSION,
        }
        writers = {
            "trainable.safetensors": lambda p: _save_file(trainable, p),
            "optimizer.safetensors": lambda p: _save_file(opt_tensors, p),
            "optimizer.json": lambda p: p.write_text(json.dumps(opt_plain)),
            "rng.safetensors": lambda p: _save_file(rng_tensors, p),
            "state.json": lambda p: p.write_text(json.dumps(full_state, indent=1)),
        }
        for name, write in writers.items():
            write(tmp / name)
            _fsync_file(tmp / name)
            _fault(step, name)
        _fsync_dir(tmp)
        if final.exists():  # a leftover of an interrupted write, or a step redone after a resume
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _fault(step, "renamed")
        files = {
            name: {"sha256": _sha256(final / name), "bytes": (final / name).stat().st_size}
            for name in writers
        }
        manifest = {"format": CHECKPOINT_FORMAT, "step": step, "files": files}
        (final / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1))
        _fsync_file(final / (MANIFEST + ".tmp"))
        os.rename(final / (MANIFEST + ".tmp"), final / MANIFEST)
        _fsync_dir(final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in valid_checkpoints(root) if p != final]
        kept = (
            f"the previous checkpoint {root / previous[-1]} is intact"
            if previous
            else "no earlier checkpoint"
        )
        raise CheckpointError(
            f"checkpoint: cannot write {final}: {e.strerror or e} ({kept}; free space or choose another output_dir)"
        ) from None
    rotate_checkpoints(root, keep_last, newest=final)
    return final


def rotate_checkpoints(root: Path, keep_last: int, newest: Path) -> list[Path]:
    """Delete valid checkpoints beyond the ``keep_last`` newest, and interrupted writes older than ``newest``.

    ``newest`` (the checkpoint just written) is never deleted, and neither is anything at a later step:
    that is not this run's past (a run resumed from an earlier step refuses to start beside later
    checkpoints, see :func:`checkpoints_after`), so the step numbers say nothing about its age. Returns
    what was deleted.
    """
    newest_step = _step_of(newest)
    valid = [p for p in valid_checkpoints(root, verify=False) if _step_of(p) < newest_step]
    keep = set(valid[-(keep_last - 1) :]) if keep_last > 1 else set()
    doomed = [p for p in valid if p not in keep]
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p != newest and p not in valid and int(m.group(1)) < newest_step:
            doomed.append(p)  # a step directory without a valid manifest: an interrupted write
        elif p.name.startswith(".tmp-step-") and p.name != f".tmp-step-{newest_step}-{os.getpid()}":
            doomed.append(p)
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# -- Finding and reading ----------------------------------------------------------------------------


def _step_of(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def check_manifest(path: Path, verify: bool = True) -> str | None:
    """Why ``path`` is not a complete checkpoint (``None`` when it is).

    Args:
        path: a ``step-N`` directory.
        verify: also hash every file (else sizes only).
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (an interrupted write)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        listed = {str(name): (int(meta["bytes"]), str(meta["sha256"])) for name, meta in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "unreadable manifest.json"
    for name, (size, sha256) in listed.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
        if verify and _sha256(f) != sha256:
            return f"{name} does not match its sha256 in the manifest"
    return None


# What save_checkpoint writes into state.json itself, with its type: a checkpoint whose manifest checks
# out but whose state lacks one of these (edited by hand, written by something else) is refused in one
# line. The caller names the fields of its own state it reads (read_checkpoint's ``required``).
_STATE_FIELDS = {"step": int, "rng": dict, "scheduler": dict, "trainable": dict}


def _state_problem(state: object, required: dict[str, type] | None = None) -> str | None:
    if not isinstance(state, dict):
        return f"state.json holds a {type(state).__name__}, not an object"
    for key, kind in {**_STATE_FIELDS, **(required or {})}.items():
        if key not in state:
            return f"state.json has no {key!r}"
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            return (
                f"state.json's {key!r} is {value!r:.40}, not {'an integer' if kind is int else 'an object'}"
            )
    if state["step"] < 1:
        return f"state.json's step is {state['step']}, not a step number (1 or more)"
    if state.get("metrics_bytes", 0) < 0:
        return f"state.json's metrics_bytes is {state['metrics_bytes']}, a negative size"
    return None


def remove_checkpoints(root: Path) -> None:
    """Delete the checkpoints fusedtune writes under ``root`` (``step-N``, interrupted ``.tmp-step-*``)
    and ``root`` itself if that leaves it empty; anything else there is the user's and stays."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if not (_STEP_DIR.match(p.name) or p.name.startswith(".tmp-step-")):
            continue
        if p.is_symlink():
            p.unlink()  # the link, not what it points to
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    with contextlib.suppress(OSError):
        root.rmdir()  # only when empty


def valid_checkpoints(root: Path, verify: bool = False) -> list[Path]:
    """The complete ``step-N`` checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    steps = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=_step_of)
    return [p for p in steps if check_manifest(p, verify=verify) is None]


def latest_checkpoint(root: Path, log=print, skipped: list[tuple[Path, str]] | None = None) -> Path | None:
    """The newest checkpoint under ``root`` whose manifest and hashes check out; others are skipped
    with a message (and appended to ``skipped`` as ``(path, why)`` when given)."""
    if not root.is_dir():
        return None
    steps = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=_step_of)
    for p in reversed(steps):
        why = check_manifest(p)
        if why is None:
            return p
        log(f"resume: skipping {p}: {why}")
        if skipped is not None:
            skipped.append((p, why))
    return None


def checkpoints_after(root: Path, step: int) -> list[Path]:
    """The complete checkpoints under ``root`` (sizes checked, not hashes) at a step above ``step``."""
    return [p for p in valid_checkpoints(root, verify=False) if _step_of(p) > step]


def read_checkpoint(path: Path, required: dict[str, type] | None = None) -> Checkpoint:
    """Verify a checkpoint directory against its manifest and read its ``state.json``, which must hold
    what :func:`save_checkpoint` writes and the caller's ``required`` fields (name -> type).

    Raises:
        CheckpointError: not a checkpoint, incomplete, or corrupted.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"resume: no such checkpoint: {path} (resume takes auto, or a run's checkpoints/step-N directory)"
        )
    if not path.is_dir():
        raise CheckpointError(f"resume: {path} is a file, not a checkpoint directory")
    if not (path / MANIFEST).exists() and not _STEP_DIR.match(path.name):
        hint = ""
        if (path / CHECKPOINTS).is_dir():
            hint = f"; it looks like a run directory: set output_dir={path} and resume=auto"
        raise CheckpointError(
            f"resume: {path} is not a checkpoint (no manifest.json; checkpoints are "
            f"<output_dir>/{CHECKPOINTS}/step-N){hint}"
        )
    why = check_manifest(path)
    if why is not None:
        hint = ""
        if (path / CHECKPOINTS).is_dir() or any(_STEP_DIR.match(p.name) for p in path.iterdir()):
            hint = "; to resume a run's newest checkpoint set resume=auto with its output_dir"
        raise CheckpointError(f"resume: {path} is not a usable checkpoint: {why}{hint}")
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"resume: {path}/state.json is unreadable ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"resume: {path} is not a usable checkpoint: {_state_problem(state)}")
    found = state.get("format")
    if found != CHECKPOINT_FORMAT or isinstance(found, bool):
        raise CheckpointError(
            f"resume: {path} has checkpoint format {found!r}, this trainer reads {CHECKPOINT_FORMAT!r}"
        )
    if (why := _state_problem(state, required)) is not None:
        raise CheckpointError(f"resume: {path} is not a usable checkpoint: {why}")
    return Checkpoint(path=path, state=state)


# -- Comparing configs ------------------------------------------------------------------------------

# Keys that do not change the math of the remaining steps: a resume may change them freely.
RESUME_FREE_KEYS = (
    "output_dir",
    "overwrite",
    "resume",
    "resume_allow_config_changes",
    "kernels",
    "model.allow_download",
    "model.gradient_checkpointing",
    "data.eval",
    "train.log_every",
    "train.padding_free",  # the same math, to rounding
    "train.eval_every",
    "train.progress",
    "train.save_every",
    "train.keep_last",
    "train.max_consecutive_nonfinite",
)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Keys added after checkpoints were first written, with the value that reproduces how runs behaved
# before: a checkpoint without one was written under that value.
ADDED_KEYS = {"optim.master_weights": False, "optim.loss_scale": "none"}


def _inert_keys(flat: dict[str, Any]) -> set[str]:
    """Keys that cannot change a config's math: the fp32 master copies act only on the bf16/fp16 weights a
    full/partial run trains (adapters are fp32), the loss scale only on an fp16 model (``auto`` is never
    fp16)."""
    dtype, method = flat.get("model.dtype"), flat.get("method")
    inert = set()
    if method in ("lora", "qlora") or dtype == "fp32":
        inert.add("optim.master_weights")
    if dtype != "fp16":
        inert.add("optim.loss_scale")
    return inert


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every config key that differs and changes the math."""
    a, b = ADDED_KEYS | _flatten(saved), _flatten(current)
    inert = _inert_keys(a) & _inert_keys(b)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_FREE_KEYS or key in inert or a.get(key) == b.get(key):
            continue
        diffs.append(f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return diffs


def restore_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy saved trainable tensors into the model's trainable parameters (same names and shapes).

    Raises:
        CheckpointError: the checkpoint's tensors belong to a different model or method.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    shapes = [
        f"{n} {list(tensors[n].shape)} vs {list(p.shape)}"
        for n, p in params.items()
        if n in tensors and tensors[n].shape != p.shape
    ]
    if unexpected and not missing and not shapes:
        from .adapt import under, unused_by_text

        towers = unused_by_text(model)
        if all(under(n, towers) for n in unexpected):
            raise CheckpointError(
                f"resume: {where} trained {len(unexpected)} tensors in {', '.join(towers)}, which this version "
                "leaves frozen (a text-only run never calls them); finish that run with the version that "
                "started it, or start afresh"
            )
    if missing or unexpected or shapes:
        detail = (
            f"missing {missing[:2]}"
            if missing
            else f"unexpected {unexpected[:2]}"
            if unexpected
            else f"shape {shapes[0]}"
        )
        raise CheckpointError(
            f"resume: {where} was written for a different model or method (trainable tensors differ: {detail})"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
