"""MoE experts: per-expert LoRA and QLoRA on stacked expert weights, against transformers and PEFT."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from tiny import MIXTRAL_MOE, QWEN2_MOE, TINY_SHAPE, build_tiny_model, write_config

from fusedtune.kernels.experts import ExpertsLoRA, QuantExperts
from fusedtune.trainer import experts, memory
from fusedtune.trainer.adapt import apply_method
from fusedtune.trainer.checkpoint import save_peft_adapter
from fusedtune.trainer.config import load_config
from fusedtune.trainer.errors import ConfigError

CPU = torch.device("cpu")
ARCHS = {
    "mixtral": ("MixtralConfig", MIXTRAL_MOE),
    "qwen2_moe": ("Qwen2MoeConfig", QWEN2_MOE),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
    ),
    # [E, in, out] weights, expert biases, a clamped interleaved gate
    "gpt_oss": (
        "GptOssConfig",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "intermediate_size": 32},
    ),
    # a shared expert's Linears named gate_proj/up_proj/down_proj, which PEFT's transformers-5 config rewrite
    # for this model type would re-target to the fused expert weights (so they export as target_parameters)
    "glm4_moe": (
        "Glm4MoeConfig",
        {
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "n_shared_experts": 1,
            "first_k_dense_replace": 0,
            "n_group": 1,
            "topk_group": 1,
            "head_dim": 16,
        },
    ),
    # its router is an nn.Linear subclass returning (logits, weights, indices): never a LoRA target
    "phimoe": ("PhimoeConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def _model(arch: str) -> torch.nn.Module:
    config_name, extra = ARCHS[arch]
    config_cls = getattr(transformers, config_name, None)
    if config_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**{**TINY_SHAPE, **extra})).float()
    model.config.use_cache = False
    with torch.no_grad():  # GPT-OSS initialises the expert biases to zero
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(std=0.02)
            if "router" in name or name.endswith(".gate.weight"):  # zero-init routers route by index order
                p.normal_(std=0.3)
    return model.eval()


def _ids():
    return torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(1))


def _cfg(*overrides):
    return load_config(None, ["kernels=torch", "lora.rank=4", "lora.alpha=8", *overrides])


def _randomize_b(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B") and isinstance(m.lora_B, torch.nn.Parameter):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_grouped_forward_is_transformers_experts_forward(arch):
    """With nothing adapted, the fusedtune experts forward gives the model's own logits and gradients."""
    ref = _model(arch)
    for name, p in ref.named_parameters():
        p.requires_grad_(".experts." not in name)  # frozen, as LoRA and QLoRA keep them
    ours = copy.deepcopy(ref)
    assert experts.expert_modules(ours)
    for module in experts.expert_modules(ours).values():
        experts._use_fusedtune_forward(module)
    ref.config._experts_implementation = "eager"
    assert ours.config._experts_implementation == experts.EXPERTS_IMPLEMENTATION
    ids = _ids()
    lr, lo = ref(ids).logits, ours(ids).logits
    torch.testing.assert_close(lo, lr, rtol=1e-5, atol=1e-5)
    lr.square().mean().backward()
    lo.square().mean().backward()
    for (n, p), q in zip(ref.named_parameters(), ours.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    for p in ours.parameters():
        p.requires_grad_(True)
    with pytest.raises(
        RuntimeError, match="requires grad: the fusedtune experts forward trains adapters only"
    ):
        ours(ids)


def test_experts_forward_takes_zero_tokens():
    """An experts module handed no tokens returns an empty [0, hidden] output, as transformers' does."""
    model = _model("mixtral").requires_grad_(False)
    module = next(iter(experts.expert_modules(model).values()))
    hidden = model.config.hidden_size
    out = experts.experts_forward(
        module,
        torch.empty(0, hidden),
        torch.empty(0, 2, dtype=torch.long),
        torch.empty(0, 2),
    )
    assert out.shape == (0, hidden)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_expert_lora_exports_to_peft_and_matches_it(arch, tmp_path):
    """LoRA on every block Linear and every expert weight: the exported adapter loads into PEFT
    (``target_parameters``) with no unexpected or missing LoRA key, and PEFT's logits and gradients are ours."""
    from peft import PeftModel

    base = _model(arch)
    ours = copy.deepcopy(base)
    report = apply_method(ours, _cfg(), CPU)
    assert report.experts_adapted and len(report.experts_adapted) == 2 * len(experts.expert_modules(base))
    _randomize_b(ours)
    save_peft_adapter(ours, _cfg(), "tiny", tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    expert_targets = [t for t in saved["target_parameters"] if not t.endswith(".weight")]  # not Linears
    assert sorted(expert_targets) == sorted(report.experts_adapted)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    ids = _ids()
    lo, lp = ours(ids).logits, peft_model(ids).logits
    torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-5)
    lo.square().mean().backward()
    lp.square().mean().backward()
    # every expert adapter's gradient, in PEFT's layout
    peft_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for mod_name, module in experts.expert_modules(ours).items():
        names = [w for w in experts.weight_names(module) if experts.lora_of(module, w) is not None]
        for i, w in enumerate(names):
            lora = experts.lora_of(module, w)
            e, r = lora.num_experts, lora.rank
            where = f"base_model.model.{mod_name}." + "base_layer." * (len(names) - 1 - i)
            ga = peft_grads[f"{where}lora_A.default.weight"]
            gb = peft_grads[f"{where}lora_B.default.weight"]
            torch.testing.assert_close(lora.lora_A.grad.reshape(e * r, -1), ga, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(
                lora.lora_B.grad.permute(1, 2, 0).reshape(gb.shape), gb, rtol=1e-4, atol=1e-7
            )


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_qlora_packs_every_expert_and_matches_the_dequantized_model(arch):
    """QLoRA quantizes every expert of every MoE layer (no dense expert weight is left) and trains exactly
    the dense model whose expert weights are the dequantized ones."""
    base = _model(arch)
    ours = copy.deepcopy(base)
    report = apply_method(ours, _cfg("method=qlora"), CPU)
    assert len(report.experts_quantized) == 2 * len(experts.expert_modules(base))
    assert not any(p.dim() == 3 for p in ours.parameters() if not p.requires_grad)  # no dense expert left
    _randomize_b(ours)
    # the reference: LoRA on the dense model, whose expert weights are replaced by deq(W)
    ref = copy.deepcopy(base)
    apply_method(ref, _cfg(), CPU)
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    for name, module in experts.expert_modules(ours).items():
        ref_module = ref.get_submodule(name)
        for w in experts.weight_names(module):
            deq = experts._stored(module, w).dequantized(torch.float32)
            dense = getattr(ref_module, w)
            with torch.no_grad():
                dense.copy_(deq.transpose(1, 2) if module.is_transposed else deq)
    for name, m in ours.named_modules():  # the Linears' packed weights, too
        if hasattr(m, "dequantized_weight"):
            with torch.no_grad():
                ref.get_submodule(name).weight.copy_(m.dequantized_weight(torch.float32))
    ids = _ids()
    lo, lr = ours(ids).logits, ref(ids).logits
    torch.testing.assert_close(lo, lr, rtol=1e-5, atol=1e-5)
    lo.square().mean().backward()
    lr.square().mean().backward()
    grads = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-7, msg=n)


def test_targets_pick_expert_weights_by_name():
    model = _model("qwen2_moe")
    report = apply_method(model, _cfg("lora.target_modules=[gate_up_proj]"), CPU)
    assert report.experts_adapted == [f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)]
    assert report.adapted == []  # the shared expert's Linears are named gate_proj / up_proj / down_proj
    model = _model("qwen2_moe")
    report = apply_method(model, _cfg("lora.target_modules=[down_proj]"), CPU)
    assert report.experts_adapted == [f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)]
    assert report.adapted == [f"model.layers.{i}.mlp.shared_expert.down_proj" for i in range(2)]
    model = _model("qwen2_moe")
    report = apply_method(model, _cfg("lora.target_modules=[q_proj]"), CPU)
    assert report.experts_adapted == []
    assert "MoE experts: not adapted (no expert weight in lora.target_modules)" in report.lines()


def test_trainable_are_exactly_the_adapters():
    model = _model("mixtral")
    report = apply_method(model, _cfg(), CPU)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(report.trainable_names)
    assert all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    stacks = [m for m in model.modules() if isinstance(m, ExpertsLoRA)]
    assert sum(p.numel() for m in stacks for p in m.parameters()) == sum(
        4 * 4 * (64 + 2 * 96) + 4 * 4 * (96 + 64) for _ in range(2)
    )
    model(_ids()).logits.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_dropout_and_rank_errors():
    model = _model("mixtral")
    report = apply_method(model, _cfg("lora.dropout=0.1"), CPU)  # default targets: experts left out, said so
    assert report.experts_adapted == []
    assert any("MoE experts: not adapted (lora.dropout > 0" in line for line in report.lines())
    with pytest.raises(ConfigError, match=r"lora\.dropout: expert weights \(gate_up_proj\)"):
        apply_method(_model("mixtral"), _cfg("lora.dropout=0.1", "lora.target_modules=[gate_up_proj]"), CPU)
    with pytest.raises(ConfigError, match=r"lora\.rank: 80 is larger than expert weight"):
        apply_method(_model("mixtral"), _cfg("lora.rank=80", "lora.target_modules=[down_proj]"), CPU)
    with pytest.raises(ConfigError, match="no expert weight \\(available: down_proj, gate_up_proj\\)"):
        apply_method(_model("mixtral"), _cfg("lora.target_modules=[experts.w1]"), CPU)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_run_end_to_end_and_exact_accounting(tmp_path, capsys, method):
    """`trainer run` on a tiny Mixtral: it trains, says what it did with the experts, writes an adapter
    with their target_parameters, and the estimate's exact parts are the live tensors' (packed experts
    included)."""
    from fusedtune.trainer import estimate
    from fusedtune.trainer.cli import main

    model_dir = build_tiny_model(tmp_path / "mixtral", arch="mixtral")
    cfg_path = write_config(tmp_path, model_dir, method=method, train={"max_steps": 4})
    assert main(["run", str(cfg_path), "optim.lr=5e-3"]) == 0
    out = capsys.readouterr().out
    assert "MoE experts: per-expert LoRA on 4 stacked expert weights" in out
    assert ("MoE experts: 4 stacked expert weights quantized" in out) == (method == "qlora")
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert len(saved["target_parameters"]) == 4
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]

    cfg = load_config(cfg_path)
    est = estimate.estimate(cfg, on_gpu=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    apply_method(model, cfg, CPU)
    assert est.frozen_by_format == memory.frozen_bytes_by_format(model)
    acc = memory.param_accounting(model)
    assert est.frozen_bytes == acc.frozen_bytes
    assert (est.trainable_params, est.trainable_bytes) == (acc.trainable_params, acc.trainable_bytes)
    if method == "qlora":
        packed = sum(
            b.nbytes for m in model.modules() if hasattr(m, "qweight") for b in m.buffers(recurse=False)
        )
        assert est.frozen_by_format["nf4 + double quant"] == packed
        assert sum(isinstance(m, QuantExperts) for m in model.modules()) == 4


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("mixtral", ["method=lora"]),
        ("mixtral", ["method=qlora", "train.padding_free=false"]),
        ("qwen2_moe", ["method=lora"]),
        ("qwen2_moe", ["method=lora", "lora.target_modules=[q_proj,v_proj]"]),
    ],
)
def test_moe_saved_activations_follow_the_formula(tmp_path, arch, overrides):
    """What an MoE block saves for backward (router, routed rows, adapters, the shared expert), measured
    by the saved-tensor meter over a real step, is the estimate's formula at that micro-batch's shape:
    byte for byte with the experts adapted; with transformers' own experts forward, less its [E] offsets."""
    from fusedtune.trainer import estimate as est_mod

    model_dir = build_tiny_model(tmp_path / arch, arch=arch)
    cfg = load_config(write_config(tmp_path, model_dir), overrides)
    m = est_mod.measure(cfg, steps=1, log=lambda *_: None)
    batch, seq, targets, padded = m.batches[m.saved.index]
    e = est_mod.estimate(cfg, on_gpu=False, batch=batch, seq=seq, target_tokens=targets, padded=padded)
    if "lora.target_modules=[q_proj,v_proj]" in overrides:
        assert 0 <= m.saved.activations - e.activation_bytes <= 2 * 4 * 4  # 2 layers x 4 experts x int32
    else:
        assert e.activation_bytes == m.saved.activations


def test_routers_that_subclass_linear_are_not_lora_targets():
    """Phi-3.5-MoE's router is an nn.Linear subclass with its own forward (it returns the routing): the
    default targets leave it alone at any rank, and naming it is a one-line error."""
    model = _model("phimoe")
    report = apply_method(model, _cfg(), CPU)
    assert not any("router" in n for n in report.adapted)
    model(_ids())  # the model still runs
    with pytest.raises(
        ConfigError, match=r"model\.layers\.0\.mlp\.router is a PhimoeTopKRouter, an nn\.Linear subclass"
    ):
        apply_method(_model("phimoe"), _cfg("lora.target_modules=[router]"), CPU)


def test_shared_expert_linears_export_as_target_parameters(tmp_path):
    """GLM-4-MoE: PEFT rewrites target_modules gate_proj/up_proj/down_proj for this model type, so the
    shared expert's adapted Linears go to target_parameters (``<linear>.weight``), the same tensors."""
    model = _model("glm4_moe")
    apply_method(model, _cfg("lora.dropout=0.1"), CPU)  # dropout: experts left out, the shared expert adapted
    save_peft_adapter(model, _cfg("lora.dropout=0.1"), "tiny", tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    shared = [t for t in saved["target_parameters"] if "shared_experts" in t]
    assert len(shared) == 6 and all(t.endswith(".weight") for t in shared)
    assert saved["lora_dropout"] == 0.0  # PEFT's parameter LoRA takes none; nothing changes at inference


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_stacked_weights_outside_an_experts_module_are_named(method):
    """Llama 4's experts keep 3-D weights without transformers' experts interface: LoRA and QLoRA leave
    them dense and frozen, and the run names them instead of saying nothing."""
    if not hasattr(transformers, "Llama4TextConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Llama4TextConfig")
    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(
        **{**TINY_SHAPE, "num_hidden_layers": 2, "head_dim": 16},
        intermediate_size_mlp=64,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
    )
    model = transformers.Llama4ForCausalLM(config)
    stacked = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert len(stacked) == 4
    report = apply_method(model, _cfg(f"method={method}"), CPU)
    assert report.experts_unhandled == stacked
    assert not report.experts_adapted and not report.experts_quantized
    left = "not adapted or quantized" if method == "qlora" else "not adapted)"
    line = next(line for line in report.lines() if "left dense and frozen" in line)
    assert "MoE experts: 4 stacked weights left dense and frozen, " + left.rstrip(")") in line
    assert "feed_forward.experts.gate_up_proj" in line and "experts interface" in line
    params = dict(model.named_parameters())
    assert all(params[n].dim() == 3 and not params[n].requires_grad for n in stacked)
    model(_ids())  # the model still runs


def test_stacked_parameters_of_non_moe_modules_are_not_called_experts():
    """RWKV's [1, 1, H] time-mix vectors are 3-D but no expert weights: not reported as MoE."""
    if not hasattr(transformers, "RwkvConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no RwkvConfig")
    config = transformers.RwkvConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32
    )
    model = transformers.RwkvForCausalLM(config)
    assert any(p.dim() == 3 for p in model.parameters())
    assert experts.unhandled_stacked_weights(model) == []
