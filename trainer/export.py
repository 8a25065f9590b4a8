"""``trainer export RUN_DIR OUT_DIR``: a finished run as a standalone model directory.

A run directory holds what trained: a PEFT adapter (lora / qlora) or the trainable tensors (full /
partial), beside the resolved ``config.yaml`` that names the base model. Export loads that base on the
CPU, merges the adapter into it with PEFT's ``merge_and_unload`` (or copies the trained tensors in by
name), and writes ``save_pretrained`` weights, config and tokenizer: ``AutoModelForCausalLM`` and any
tool that reads a Hugging Face model directory load it without fusedtune or PEFT.

QLoRA adapters are merged into the unquantized base, as PEFT and bitsandbytes recommend: the run trained
against the NF4 (or int8) weights, so the merged model differs from what the run computed by the
quantization error of the base weights.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

from .config import ConfigError, load_config
from .errors import UserError
from .memory import dtype_label
from .model import (
    BASE_LAYOUT_FILE,
    ModelError,
    base_difference,
    load_model,
    load_tokenizer,
    resolve_model_path,
)


class ExportError(UserError):
    """A run directory that cannot be exported, or an output directory that cannot take it."""


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    log=print,
    base: str | Path | None = None,
) -> Path:
    """Write the fine-tuned model of ``run_dir`` to ``out_dir`` (which must be new or empty).

    Args:
        run_dir: a ``trainer run`` output directory.
        out_dir: where the model goes.
        dtype: ``fp32`` / ``bf16`` / ``fp16`` for the written weights; None: the run's ``model.dtype``.
        base: the base model where the run's ``model.name_or_path`` no longer finds it (moved or copied
            elsewhere); None: the run's.

    Returns:
        ``out_dir``.

    Raises:
        ExportError: not a run directory, an unfinished run, or an output directory in the way.
    """
    run, out = Path(run_dir).expanduser(), Path(out_dir).expanduser()
    config_file = run / "config.yaml"
    if not run.exists():
        raise ExportError(f"export: {run} does not exist (a `trainer run` output directory)")
    if not config_file.is_file():
        raise ExportError(f"export: {run} holds no config.yaml: not a trainer run directory")
    try:
        cfg = load_config(config_file)
    except ConfigError as e:  # its message names the file and line
        raise ExportError(f"export: {e}") from None
    lora = cfg.method in ("lora", "qlora")
    weights = run / ("adapter_model.safetensors" if lora else "trainable.safetensors")
    if not weights.is_file():
        raise ExportError(
            f"export: {run} has no {weights.name}: the run has not finished (continue it with "
            f"`trainer run {config_file} resume=auto`)"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"export: {out} exists and is not an empty directory; choose a new one")
    model_cfg = cfg.model.model_copy(update={"gradient_checkpointing": False})
    if dtype is not None:
        model_cfg = model_cfg.model_copy(update={"dtype": dtype})
    if base is not None:
        model_cfg = model_cfg.model_copy(update={"name_or_path": str(Path(base).expanduser())})
    try:
        path = resolve_model_path(model_cfg)
        tokenizer = load_tokenizer(path, model_cfg)
        model, loaded_dtype = load_model(path, model_cfg, torch.device("cpu"))
    except ModelError as e:
        hint = "" if base is not None else "; if the base model moved, pass its new place with --base PATH"
        raise ExportError(f"export: {e}{hint}") from None
    _check_base(model, run, path)
    prequantized = _dequantize_bnb(model, loaded_dtype)
    (_merge_peft_adapter if lora else _copy_trainable)(model, run, weights)
    model.config.use_cache = True  # the run turned it off for training; generation wants it
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    except BaseException as e:
        # no half-written model left behind, whatever went wrong: the folder was new or empty
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ExportError(f"export: cannot write {out}: {e.strerror or e}") from None
        raise
    into = {"lora": "LoRA adapter merged into", "qlora": "QLoRA adapter merged into"}.get(
        cfg.method, f"{cfg.method} run's trained tensors in"
    )
    if prequantized:
        what = (
            f"{into} the base, its {prequantized} bitsandbytes-quantized Linears decoded first (the "
            "checkpoint has no unquantized weights)"
        )
    elif cfg.method == "qlora":
        what = f"{into} the unquantized base (the run trained against its {cfg.quant.quant_type} weights)"
    else:
        what = f"{into} the base"
    log(
        f"export: {what}, {dtype_label(loaded_dtype)}, written to {out}/ (load it with AutoModelForCausalLM.from_pretrained)"
    )
    return out


def _check_base(model: torch.nn.Module, run: Path, path: str) -> None:
    """The base model must be the one the run trained on: the same parameters, shapes and first values as
    the run recorded at its start (``base_model.json``; runs from before it get the adapter's own check)."""
    record = run / BASE_LAYOUT_FILE
    if not record.is_file():
        return
    try:
        expected = json.loads(record.read_text())
        diff = base_difference(expected, model)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ExportError(f"export: {record} is damaged ({e!r})") from None
    if diff is not None:
        raise ExportError(
            f"export: {path} is not the base model the run trained on ({diff}; the run's {record.name})"
        )


def _dequantize_bnb(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """A bitsandbytes-quantized checkpoint's Linears replaced by plain ones holding the decoded weights
    (fusedtune's dequantize, bit-exact with bitsandbytes' own, whose CPU kernel misreads rows that are
    not whole blocks), and its quantization config dropped, so that the adapter merges into plain
    weights and ``save_pretrained`` writes an unquantized model. Returns how many were decoded."""
    from fusedtune.kernels import QuantLoRALinear

    from .memory import is_bnb_quantized

    names = [name for name, m in model.named_modules() if is_bnb_quantized(m)]
    for name in names:
        layer = model.get_submodule(name)
        weight = QuantLoRALinear.from_bnb(layer, 1, 1.0).dequantized_weight(dtype)
        linear = torch.nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
        )
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            linear.bias = torch.nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
    quantizer = getattr(model, "hf_quantizer", None)
    if names and quantizer is not None:
        quantizer.remove_quantization_config(model)
    return len(names)


def _first_line(e: BaseException) -> str:
    """An exception's message on one line (load_state_dict lists every mismatch on its own line)."""
    lines = str(e).strip().splitlines()
    return (
        (lines[0].rstrip(":. ") + (f" ... ({len(lines) - 1} more lines)" if len(lines) > 1 else ""))
        if lines
        else type(e).__name__
    )


def _merge_peft_adapter(model: torch.nn.Module, run: Path, weights: Path) -> None:
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import SafetensorError, safe_open

    try:
        with warnings.catch_warnings():  # PEFT warns about missing keys over many lines: checked below
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(model, str(run))
        with safe_open(str(weights), "pt") as f:
            saved = set(f.keys())
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise ExportError(f"export: {weights} does not load onto the base model ({_first_line(e)})") from None
    # the adapter tensors both ways (PEFT's state dict may also carry a tied head's base weight)
    made = {k for k in get_peft_model_state_dict(peft_model) if ".lora_" in k}
    saved = {k for k in saved if ".lora_" in k}
    if made != saved:  # layers the adapter names that the base lacks, or base layers it has no tensors for
        unused, untrained = sorted(saved - made), sorted(made - saved)
        detail = (
            f"{len(unused)} of its tensors have no layer in the base ({unused[0]})"
            if unused
            else f"{len(untrained)} adapted base tensors have nothing in it ({untrained[0]})"
        )
        raise ExportError(f"export: {weights} does not fit the base model: {detail}")
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    head_base = getattr(head, "base_layer", None)  # PEFT wraps an adapted module
    if head_base is not None and embeddings is not None and head_base.weight is embeddings.weight:
        # An adapter on a head tied to the input embeddings: merged into the shared weight it would
        # change the embeddings too. The run adapted the output projection only, so untie it first.
        head_base.weight = torch.nn.Parameter(embeddings.weight.detach().clone(), requires_grad=False)
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    peft_model.merge_and_unload()


def _copy_trainable(model: torch.nn.Module, run: Path, weights: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as e:
        raise ExportError(f"export: cannot read {weights} ({e})") from None
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    shapes = [n for n, t in tensors.items() if n in params and t.shape != params[n].shape]
    if unknown or shapes:
        detail = f"unknown {unknown[:2]}" if unknown else f"shape of {shapes[0]}"
        raise ExportError(f"export: {weights} does not fit the base model ({detail})")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
