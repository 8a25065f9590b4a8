"""method: qlora on a checkpoint that is already bitsandbytes-quantized: packed data taken over as is."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from tiny import write_config
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from fusedtune.kernels import QuantLoRALinear
from fusedtune.trainer.adapt import apply_method
from fusedtune.trainer.cli import main
from fusedtune.trainer.config import load_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bnb_quantized_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model quantized by transformers (NF4, double quant) and saved."""
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant)
    out = tmp_path_factory.mktemp("tiny-nf4")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_takes_over_bnb_weights_without_requantizing(bnb_quantized_dir):
    model = AutoModelForCausalLM.from_pretrained(bnb_quantized_dir)
    q_proj = model.model.layers[0].self_attn.q_proj
    packed_before = q_proj.weight.data.clone()
    ids = torch.randint(4, model.config.vocab_size, (2, 7))
    # bitsandbytes' training path (dequantize + matmul in fp32); its CPU inference kernel computes in
    # lower precision and, on AVX512-BF16 CPUs, repacks the weight in place.
    model.train()
    logits_bnb = model(input_ids=ids).logits.detach()
    cfg = load_config(None, ["method=qlora", "kernels=torch", "lora.rank=4"])
    report = apply_method(model, cfg, torch.device("cpu"))
    assert len(report.quantized) == 14
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLoRALinear)
    assert torch.equal(layer.packed_weight.packed.view(-1), packed_before.view(-1))
    with torch.no_grad():  # B = 0: the adapted model computes what bitsandbytes computed
        torch.testing.assert_close(model(input_ids=ids).logits, logits_bnb, rtol=1e-4, atol=1e-4)


def test_cli_qlora_on_prequantized_checkpoint_and_its_export(bnb_quantized_dir, tmp_path, capsys):
    """The run trains; export decodes the checkpoint's packed Linears and merges the adapter into them
    (it crashed in save_pretrained and left a half-written folder): a plain model whose logits are the
    quantized base + adapter's through PEFT."""
    from peft import PeftModel

    cfg = write_config(tmp_path, bnb_quantized_dir, method="qlora")
    assert main(["run", str(cfg)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()

    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    assert "14 bitsandbytes-quantized Linears decoded first" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(p.is_floating_point() for p in merged.parameters())
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(bnb_quantized_dir), tmp_path / "run"
    )
    peft.train()  # bitsandbytes' exact (dequantize + matmul) CPU path; no dropout in this config
    ids = torch.randint(4, merged.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    "overrides",
    [["method=partial", "partial.patterns=[norm]"], ["method=qlora", "lora.target_modules=[q_proj]"]],
)
def test_frozen_bnb_linears_stay_differentiable_after_an_evaluation(bnb_quantized_dir, overrides):
    """bitsandbytes' CPU Linear4bit, once run in eval mode without grad (the held-out evaluation before
    training), switched to an op without autograd: every tensor below it got no gradient (only the
    final norm trained). The gradients after an evaluation are those of a model that never ran one."""
    cfg = load_config(None, ["kernels=torch", "lora.rank=4", *overrides])
    ids = torch.randint(4, 300, (2, 9))

    def gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(bnb_quantized_dir)
        torch.manual_seed(0)  # the same LoRA A
        apply_method(model, cfg, CPU)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fresh, after = gradients(False), gradients(True)
    assert len(fresh) >= 4 and all(g is not None for g in fresh.values())
    for name, g in fresh.items():
        assert after[name] is not None, f"{name} lost its gradient"
        torch.testing.assert_close(after[name], g, rtol=0, atol=0)


@pytest.mark.parametrize("overrides", [["method=full"], ["method=partial", "partial.last_n_layers=1"]])
def test_full_and_partial_refuse_quantized_weights(bnb_quantized_dir, tmp_path, capsys, overrides):
    """A traceback ("only Tensors of floating point dtype can require gradients") before; a norm-only
    partial run of the same checkpoint is fine."""
    cfg = write_config(tmp_path, bnb_quantized_dir)
    assert main(["run", str(cfg), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stores quantized" in err and "use method: qlora" in err, err
    assert main(["run", str(cfg), "method=partial", "partial.patterns=[norm]", "train.max_steps=1"]) == 0


def test_lora_on_quantized_checkpoint_is_refused(bnb_quantized_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, bnb_quantized_dir, method="lora")
    assert main(["run", str(cfg)]) == 2
    assert "use method: qlora" in capsys.readouterr().err


def test_prequantized_checkpoint_takes_the_triton_path(bnb_quantized_dir):
    """The packed uint8 storage is not a reason to leave the Triton path (it reads it as is)."""
    model = AutoModelForCausalLM.from_pretrained(bnb_quantized_dir)
    ids = torch.randint(4, model.config.vocab_size, (2, 7))
    model.train()
    logits_bnb = model(input_ids=ids).logits.detach()
    cfg = load_config(None, ["method=qlora", "kernels=triton", "lora.rank=4"])
    report = apply_method(model, cfg, torch.device("cpu"))
    assert len(report.fused) == 14 and not report.not_fused, report.not_fused
    assert any("dequantize + cuBLAS" in line for line in report.lines())
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLoRALinear) and layer.backend == "triton"
    with torch.no_grad():  # B = 0; 14 tokens: the fused kernel (under the interpreter on the CPU)
        torch.testing.assert_close(model(input_ids=ids).logits, logits_bnb, rtol=1e-4, atol=1e-4)


def test_prequantized_checkpoint_gradients_match_the_torch_path(bnb_quantized_dir):
    """Backward through bitsandbytes' packed layout: the fused dX kernel (Triton) against the torch path."""
    from fusedtune.trainer.checkpoint import lora_modules

    ids = torch.randint(4, 90, (2, 7))

    def grads(kernels):
        model = AutoModelForCausalLM.from_pretrained(bnb_quantized_dir)
        model.train()
        torch.manual_seed(0)
        apply_method(model, load_config(None, ["method=qlora", f"kernels={kernels}", "lora.rank=4"]), CPU)
        torch.manual_seed(1)
        for mod in lora_modules(model).values():  # B = 0 would leave dA = 0 and dX without its LoRA term
            torch.nn.init.normal_(mod.lora_B, std=0.2)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fused, torch_path = grads("triton"), grads("torch")
    assert fused.keys() == torch_path.keys() and len(fused) == 28
    for name in fused:
        assert fused[name].abs().sum() > 0, name
        torch.testing.assert_close(fused[name], torch_path[name], rtol=1e-4, atol=1e-5, msg=name)


def test_qlora_releases_each_full_precision_weight_once_packed(tiny_model_dir, monkeypatch):
    """Layer by layer: when a Linear is packed, the weights of those packed before it are gone.

    (On a GPU each layer is moved there to be packed; a lingering reference would keep every
    full-precision target weight on the device until the whole model was done.)
    """
    import gc
    import weakref

    from fusedtune.trainer import adapt

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gc.collect()
    done: list[weakref.ref] = []
    alive_at_each_call = []
    original = adapt._quantize_linear

    def spy(linear, *args, **kwargs):
        alive_at_each_call.append(sum(ref() is not None for ref in done))
        out = original(linear, *args, **kwargs)
        done.append(weakref.ref(linear.weight))
        return out

    monkeypatch.setattr(adapt, "_quantize_linear", spy)
    cfg = load_config(None, ["method=qlora", "kernels=torch", "lora.rank=4"])
    report = apply_method(model, cfg, torch.device("cpu"))
    assert len(report.quantized) == 14 == len(alive_at_each_call)
    assert alive_at_each_call == [0] * 14


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("tie", [False, True])
def test_qlora_on_the_cpu_lets_go_of_the_checkpoint_mapping(tmp_path, tie):
    """transformers leaves fp32 CPU weights as views of the mapped safetensors file: once the Linears are
    packed, nothing may still point into it, or every page quantization read stays resident."""
    import gc

    from tiny import build_tiny_model

    from fusedtune.trainer import memory
    from fusedtune.trainer.model import load_model

    folder = build_tiny_model(tmp_path / "model", tie=tie)  # its own files: no other test's model maps them
    cfg = load_config(None, [f"model.name_or_path={folder}", "method=qlora", "lora.rank=4"])
    model, _ = load_model(str(folder), cfg.model, CPU, CPU)

    def in_checkpoint(t: torch.Tensor) -> bool:
        return any(lo <= t.data_ptr() < hi for lo, hi in memory.checkpoint_mappings(folder))

    embedding = model.get_input_embeddings().weight
    assert in_checkpoint(embedding)  # what the release is for (else this test proves nothing)
    assert (model.get_output_embeddings().weight is embedding) == tie
    before = {n: p.detach().clone() for n, p in model.named_parameters() if in_checkpoint(p)}
    apply_method(model, cfg, CPU)
    gc.collect()
    params = dict(model.named_parameters())
    assert not [n for n, p in params.items() if in_checkpoint(p)]
    assert not memory.checkpoint_mappings(folder)  # the last view gone, the mapping with it
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    for name, value in before.items():  # the copies hold the same values
        if name in params:
            torch.testing.assert_close(params[name].detach(), value, rtol=0, atol=0, msg=name)
    assert memory.release_host_memory(model) == 0  # nothing left to copy


@pytest.mark.parametrize(
    "overrides",
    [["method=qlora", "quant.quant_type=int8"], ["method=partial", "partial.patterns=[norm]"]],
)
def test_estimate_on_a_prequantized_checkpoint_counts_what_loads(bnb_quantized_dir, tmp_path, overrides):
    """The estimate counted such a checkpoint's Linears as dense (or in the config's quant format, which
    the run does not use): now in the stored format, equal to the live tensors bitsandbytes keeps."""
    from fusedtune.trainer import estimate, memory

    cfg = load_config(write_config(tmp_path, bnb_quantized_dir), ["kernels=torch", "lora.rank=4", *overrides])
    est = estimate.estimate(cfg, on_gpu=False)
    model = AutoModelForCausalLM.from_pretrained(bnb_quantized_dir)
    report = apply_method(model, cfg, CPU)
    assert est.frozen_by_format == memory.frozen_bytes_by_format(model)
    assert "nf4 + double quant" in est.frozen_by_format
    acc = memory.param_accounting(model)
    assert est.frozen_bytes == acc.frozen_bytes
    if "method=qlora" in overrides:
        line = next(x for x in report.lines() if "taken over" in x)
        assert (
            "nf4, blocksize 64, double quant" in line
            and "quant.quant_type=int8 does not apply to them" in line
        )


def test_estimate_of_a_bias_only_run_on_a_prequantized_checkpoint(tiny_model_dir_bias, tmp_path):
    """Biases of quantized Linears stay floating point and train (the estimate refused them as packed)."""
    from fusedtune.trainer import estimate, memory

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    AutoModelForCausalLM.from_pretrained(tiny_model_dir_bias, quantization_config=quant).save_pretrained(
        tmp_path / "m"
    )
    AutoTokenizer.from_pretrained(tiny_model_dir_bias).save_pretrained(tmp_path / "m")
    cfg = load_config(
        write_config(tmp_path, tmp_path / "m"), ["method=partial", "partial.patterns=['\\.bias$']"]
    )
    est = estimate.estimate(cfg, on_gpu=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    report = apply_method(model, cfg, CPU)
    assert len(report.trainable_names) == 14 and all(n.endswith(".bias") for n in report.trainable_names)
    assert est.frozen_by_format == memory.frozen_bytes_by_format(model)
    assert est.trainable_params == memory.param_accounting(model).trainable_params


@pytest.mark.parametrize(("method", "match"), [("lora", "use method: qlora"), ("full", "stores quantized")])
def test_estimate_refuses_what_the_run_refuses_on_a_prequantized_checkpoint(
    bnb_quantized_dir, tmp_path, capsys, method, match
):
    cfg = write_config(tmp_path, bnb_quantized_dir)
    assert main(["estimate", str(cfg), f"method={method}"]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err
