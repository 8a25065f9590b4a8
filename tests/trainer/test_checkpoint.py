"""Run outputs: the PEFT-format adapter loads into PEFT with no missing/unexpected keys, same logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fusedtune.trainer.adapt import apply_method
from fusedtune.trainer.checkpoint import lora_modules, save_peft_adapter, save_trainable
from fusedtune.trainer.config import load_config

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "method,kernels,targets",
    [
        ("lora", "torch", None),
        ("lora", "torch", "[q_proj, down_proj]"),
        ("lora", "triton", None),  # the fused kernels (Triton interpreter on the CPU)
        ("qlora", "torch", None),
        ("qlora", "triton", None),
    ],
)
def test_peft_round_trip_same_logits(tiny_model_dir, tmp_path, method, kernels, targets):
    """What a run saves loads into PEFT as the same adapter, whatever path trained it.

    For qlora PEFT's base gets the weights the run trained against: our packed weights, dequantized.
    """
    overrides = [f"method={method}", f"kernels={kernels}", "lora.rank=4", "lora.alpha=8"]
    if targets:
        overrides.append(f"lora.target_modules={targets}")
    cfg = load_config(None, overrides)
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    report = apply_method(ours, cfg, CPU)
    assert len(report.fused) == (len(report.adapted) if kernels == "triton" else 0)
    torch.manual_seed(1)
    for mod in lora_modules(ours).values():  # B starts at zero: make the adapter do something
        torch.nn.init.normal_(mod.lora_B, std=0.2)
    adapted = save_peft_adapter(ours, cfg, str(tiny_model_dir), tmp_path / "adapter")

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if method == "qlora":
        with torch.no_grad():
            for name, mod in lora_modules(ours).items():
                base.get_submodule(name).weight.copy_(mod.dequantized_weight(torch.float32))
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    peft_names = {
        n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters() if "lora_" in n
    }
    expected = {f"{m}.lora_{ab}.default.weight" for m in adapted for ab in "AB"}
    assert peft_names == expected, "PEFT built a different set of LoRA layers than we saved"
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == 2 * len(adapted)
    for name, tensor in saved.items():  # every saved tensor is exactly what PEFT now holds
        peft_name = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        torch.testing.assert_close(peft_model.get_parameter(peft_name), tensor, rtol=0, atol=0)

    ids = torch.randint(0, base.config.vocab_size, (2, 9))
    ours.eval()
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"


def test_save_trainable_partial(tiny_model_dir, tmp_path):
    cfg = load_config(None, ["method=partial", "partial.patterns=[norm]"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    apply_method(model, cfg, CPU)
    n = save_trainable(model, tmp_path / "trainable.safetensors")
    saved = load_file(tmp_path / "trainable.safetensors")
    assert n == len(saved) == 5
    for name, tensor in saved.items():
        torch.testing.assert_close(model.get_parameter(name), tensor, rtol=0, atol=0)
    # the umask's mode, as every other output (safetensors' writer alone makes 0600 files)
    import os

    mask = os.umask(0o027)
    try:
        save_trainable(model, tmp_path / "t2.safetensors")
    finally:
        os.umask(mask)
    assert (tmp_path / "t2.safetensors").stat().st_mode & 0o777 == 0o640


def test_checkpoints_from_before_padding_free_still_resume():
    """A config saved before train.padding_free existed differs only by that key: the same math."""
    from fusedtune.trainer.checkpoint import config_differences
    from fusedtune.trainer.config import load_config

    current = load_config().model_dump(mode="json")
    saved = load_config().model_dump(mode="json")
    del saved["train"]["padding_free"]
    assert config_differences(saved, current) == []
    saved["train"]["micro_batch_size"] = 3
    assert config_differences(saved, current) == ["train.micro_batch_size: 3 -> 16"]


@pytest.mark.parametrize(
    ("overrides", "saved_optim", "expected"),
    [
        # written before the options existed (neither key saved): runs they do not act on resume as they are
        ([], {}, []),  # LoRA (fp32 adapters), dtype auto (never fp16)
        (["method=full", "model.dtype=fp32"], {}, []),
        (["model.dtype=fp16"], {}, ["optim.loss_scale: 'none' -> 'dynamic'"]),  # it ran unscaled
        (["method=full", "model.dtype=bf16"], {}, ["optim.master_weights: False -> True"]),  # in place
        (["method=full", "model.dtype=bf16", "optim.master_weights=false"], {}, []),
        # a change of either matters only where it acts
        (["optim.master_weights=true"], {"master_weights": False}, []),
        (["method=partial"], {"master_weights": False}, ["optim.master_weights: False -> True"]),
        (["model.dtype=bf16", "optim.loss_scale=none"], {"loss_scale": "dynamic"}, []),
    ],
)
def test_new_options_compare_as_their_old_behaviour_and_only_where_they_act(overrides, saved_optim, expected):
    from fusedtune.trainer.checkpoint import config_differences
    from fusedtune.trainer.config import load_config

    current = load_config(None, ["partial.patterns=[norm]", *overrides]).model_dump(mode="json")
    saved = load_config(None, ["partial.patterns=[norm]", *overrides]).model_dump(mode="json")
    del saved["optim"]["master_weights"], saved["optim"]["loss_scale"]
    saved["optim"].update(saved_optim)
    assert config_differences(saved, current) == expected


def test_remove_checkpoints_unlinks_a_symlinked_step_and_keeps_other_files(tmp_path):
    from fusedtune.trainer.checkpoint import remove_checkpoints

    root, elsewhere = tmp_path / "checkpoints", tmp_path / "elsewhere" / "step-9"
    elsewhere.mkdir(parents=True)
    (elsewhere / "state.json").write_text("{}")
    (root / "step-3").mkdir(parents=True)
    (root / "step-9").symlink_to(elsewhere)
    (root / "notes.txt").write_text("mine")
    remove_checkpoints(root)
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]
    assert (elsewhere / "state.json").is_file()  # the link went, not its target
    (root / "notes.txt").unlink()
    remove_checkpoints(root)  # nothing of ours left, and now empty: the folder goes too
    assert not root.exists()
