"""Methods: exactly the right parameters train; frozen ones get no grad and no optimizer state."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fusedtune.kernels import LoRALinear
from fusedtune.trainer import adapt, memory
from fusedtune.trainer.adapt import apply_method, block_linears
from fusedtune.trainer.config import load_config
from fusedtune.trainer.errors import ConfigError
from fusedtune.trainer.optim import build_optimizer, trainable_parameters

CPU = torch.device("cpu")


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _cfg(*overrides):
    return load_config(None, ["kernels=torch", *overrides])


def _lora_params(model, rank):
    return sum(rank * (lin.in_features + lin.out_features) for lin in block_linears(model).values())


def test_lora_trains_exactly_the_adapters(tiny_model_dir):
    model = _model(tiny_model_dir)
    expected = _lora_params(model, 8)
    n_block_linears = len(block_linears(model))
    report = apply_method(model, _cfg("lora.rank=8"), CPU)
    trainable = trainable_parameters(model)
    assert sum(p.numel() for _, p in trainable) == expected
    assert all(n.endswith(("lora_A", "lora_B")) for n, _ in trainable)
    assert len(report.adapted) == n_block_linears == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert report.fused == [] and len(report.not_fused) == n_block_linears
    assert all("kernels=torch" in why for why in report.not_fused.values())
    assert not isinstance(model.lm_head, LoRALinear)


@pytest.mark.parametrize(
    ("kernels", "method", "dropout", "lora_backend"),
    [
        ("auto", "lora", 0.0, "torch"),
        ("auto", "lora", 0.1, "triton"),
        ("triton", "lora", 0.0, "triton"),
        ("auto", "qlora", 0.0, "triton"),
    ],
)
def test_cuda_layer_backend_follows_the_measured_rule(
    tiny_model_dir, monkeypatch, kernels, method, dropout, lora_backend
):
    """With CUDA, kernels=auto gives plain-LoRA layers without dropout the cuBLAS path (faster on the H200)
    and says so in the report; with dropout the fused kernels (the mask is regenerated, never stored);
    kernels=triton forces the fused kernels; QLoRA layers keep the Triton path. The layers are built on the
    CPU (only the availability check is patched), and nothing runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = _model(tiny_model_dir)
    cfg = load_config(
        None, [f"kernels={kernels}", f"method={method}", "lora.rank=4", f"lora.dropout={dropout}"]
    )
    report = apply_method(model, cfg, CPU)
    layers = [model.get_submodule(n) for n in report.adapted]
    assert len(layers) == 14 and {layer.backend for layer in layers} == {lora_backend}
    if lora_backend == "torch":
        assert report.fused == [] and set(report.not_fused.values()) == {adapt.AUTO_CUDA_LORA}
        assert any("measured faster than fused" in line for line in report.lines())
    else:
        assert len(report.fused) == 14 and not report.not_fused


def test_lora_target_modules_subset(tiny_model_dir):
    model = _model(tiny_model_dir)
    report = apply_method(model, _cfg("lora.rank=4", "lora.target_modules=[q_proj, v_proj]"), CPU)
    assert sorted(n.rsplit(".", 1)[-1] for n in report.adapted) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    # q: 64->64, v: 64->32 (2 kv heads of 16): r * (in + out) each, two layers
    assert sum(p.numel() for _, p in trainable_parameters(model)) == 2 * 4 * ((64 + 64) + (64 + 32))


def test_full_trains_everything(tiny_model_dir):
    model = _model(tiny_model_dir)
    total = sum(p.numel() for p in model.parameters())
    apply_method(model, _cfg("method=full"), CPU)
    assert sum(p.numel() for _, p in trainable_parameters(model)) == total


def test_partial_patterns_and_last_layers(tiny_model_dir):
    model = _model(tiny_model_dir)
    apply_method(model, _cfg("method=partial", "partial.patterns=[norm]"), CPU)
    names = [n for n, _ in trainable_parameters(model)]
    assert names and all("norm" in n for n in names)
    assert len(names) == 2 * 2 + 1  # input/post-attention norm per layer + final norm

    model = _model(tiny_model_dir)
    apply_method(model, _cfg("method=partial", "partial.last_n_layers=1"), CPU)
    names = [n for n, _ in trainable_parameters(model)]
    assert names and all(n.startswith("model.layers.1.") for n in names)
    assert sum(p.numel() for _, p in trainable_parameters(model)) == sum(
        p.numel() for p in model.model.layers[1].parameters()
    )


def test_partial_pattern_on_a_tied_head(tiny_model_dir):
    # SmolLM2 ties lm_head.weight to embed_tokens.weight: a pattern naming the head trains the shared one.
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_method(model, _cfg("method=partial", "partial.patterns=[lm_head]"), CPU)
    trainable = trainable_parameters(model)
    assert [p for _, p in trainable] == [model.lm_head.weight]


def test_partial_bias_only(tiny_model_dir_bias):
    model = _model(tiny_model_dir_bias)
    apply_method(model, _cfg("method=partial", "partial.patterns=['\\.bias$']"), CPU)
    trainable = trainable_parameters(model)
    assert trainable and all(n.endswith(".bias") for n, _ in trainable)
    assert sum(p.numel() for _, p in trainable) == sum(m.bias.numel() for m in block_linears(model).values())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.target_modules=[nope_proj]"], "lora.target_modules: ['nope_proj'] match no Linear layer"),
        (["lora.rank=33", "lora.target_modules=[v_proj]"], "lora.rank: 33 is larger than layer"),
        (["method=partial", "partial.patterns=[zzz]"], "partial.patterns: 'zzz' matches no parameter"),
        (["method=partial", "partial.patterns=['(']"], "partial.patterns: invalid regular expression"),
        (
            ["method=partial", "partial.last_n_layers=3"],
            "partial.last_n_layers: 3 is more than the model's 2",
        ),
    ],
)
def test_bad_targets(tiny_model_dir, overrides, message):
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
    ):
        apply_method(_model(tiny_model_dir), _cfg(*overrides), CPU)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit", "adamw32bit", "adamw_torch"])
@pytest.mark.parametrize("method", ["lora", "full", "partial"])
def test_only_trainable_parameters_carry_grad_and_state(tiny_model_dir, optimizer, method):
    """Bytes of optimizer state == the bytes expected for the trainable parameters alone."""
    model = _model(tiny_model_dir)
    extra = ["partial.patterns=[embed_tokens, norm]"] if method == "partial" else []
    cfg = _cfg(f"method={method}", f"optim.name={optimizer}", "lora.rank=8", *extra)
    apply_method(model, cfg, CPU)
    opt = build_optimizer(model, cfg.optim)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen or method == "full"
    assert all(p.grad is None for _, p in frozen), "a frozen parameter received a gradient"
    trainable = [p for _, p in trainable_parameters(model)]
    assert all(p.grad is not None for p in trainable)
    opt.step()
    opt.zero_grad(set_to_none=True)

    state_params = set(map(id, opt.state.keys()))
    assert state_params == set(map(id, trainable))
    assert memory.optimizer_state_bytes(opt) == memory.expected_optimizer_state_bytes(trainable, optimizer)
    assert all(p.grad is None for _, p in frozen)
    if method == "full" and optimizer in ("adamw8bit", "paged_adamw8bit"):
        # the embedding (400 x 64) is over bitsandbytes' 4096-element threshold: 8-bit state
        emb = model.get_input_embeddings().weight
        assert opt.state[emb]["state1"].dtype == torch.uint8


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapters_are_fp32_over_a_bf16_base(tiny_model_dir, method):
    """As PEFT's autocast_adapter_dtype: A and B (and their gradients) in fp32, the base in bf16."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    apply_method(model, _cfg(f"method={method}"), CPU)
    trainable = trainable_parameters(model)
    assert trainable and all(p.dtype == torch.float32 for _, p in trainable)
    ids = torch.randint(0, 100, (2, 7))
    out = model(input_ids=ids)
    assert out.logits.dtype == torch.bfloat16
    out.logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in trainable)
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)


def test_lora_siblings_train_as_single_layers(tiny_model_dir, monkeypatch):
    ids = torch.randint(0, 50, (2, 9))
    results = []
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(adapt, "group_siblings", lambda model: [])
        model = _model(tiny_model_dir)
        report = apply_method(model, _cfg("lora.dropout=0.0"), CPU)
        torch.manual_seed(1)
        for _, p in trainable_parameters(model):
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would hide a wrong dA
        if grouped:
            assert report.siblings == [
                f"model.layers.{i}.{part}"
                for i in range(2)
                for part in ("self_attn: q_proj|k_proj|v_proj", "mlp: gate_proj|up_proj")
            ]
            assert report.lines()[-1] == (
                "LoRA siblings as one node (one input: one GEMM for their A's, one dX): "
                "2 x q_proj|k_proj|v_proj, 2 x gate_proj|up_proj"
            )
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in trainable_parameters(model)}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=1e-6, atol=1e-7)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (["lora.dropout=0.1"], "lora.dropout > 0 (each projection draws its own mask)"),
        (["method=qlora", "lora.dropout=0.0"], "qlora layers run one by one"),
        (["kernels=triton", "lora.dropout=0.0"], "the fused Triton kernels run each projection on its own"),
        (
            ["lora.dropout=0.0", "lora.target_modules=[q_proj, o_proj]"],
            "no q|k|v or gate|up that the parent calls on one input",
        ),
    ],
)
def test_lora_siblings_say_why_not(tiny_model_dir, overrides, why):
    report = apply_method(_model(tiny_model_dir), _cfg(*overrides), CPU)
    assert report.siblings == [] and report.lines()[-1] == f"LoRA siblings not grouped: {why}"


def test_default_targets_leave_out_layers_narrower_than_the_rank(tiny_model_dir):
    """Default targets (every block Linear) skip and name a layer narrower than the rank, as Qwen2-MoE's
    shared_expert_gate (hidden -> 1) would be at any rank; named targets still refuse it."""
    model = _model(tiny_model_dir)
    narrow = {n for n, m in block_linears(model).items() if min(m.in_features, m.out_features) < 33}
    assert narrow and len(narrow) < len(block_linears(model))
    report = apply_method(model, _cfg("lora.rank=33"), CPU)
    assert set(report.too_narrow) == narrow
    assert not narrow & set(report.adapted)
    assert len(report.adapted) == len(block_linears(_model(tiny_model_dir))) - len(narrow)
    line = next(x for x in report.lines() if x.startswith("not adapted, narrower than lora.rank"))
    assert "2 x model.layers.*.self_attn.k_proj (64->32)" in line
    with pytest.raises(ConfigError, match="larger than every Linear"):
        apply_method(_model(tiny_model_dir), _cfg("lora.rank=1000"), CPU)


def test_a_trainable_tied_embedding_is_named_as_both():
    """Training a tied lm_head trains the input embedding too (one tensor): the report says so."""
    from tiny import tiny_llama

    cfg = load_config(None, ["method=partial", "partial.patterns=[lm_head]", "kernels=torch"])
    tied = tiny_llama(0, tie_word_embeddings=True)
    lines = apply_method(tied, cfg, torch.device("cpu")).lines()
    assert lines[1] == (
        "model.embed_tokens.weight is tied to lm_head.weight (one tensor, named once): it trains as both "
        "the output head and the input embedding"
    )
    untied = tiny_llama(0, tie_word_embeddings=False)
    assert not any("is tied to" in line for line in apply_method(untied, cfg, torch.device("cpu")).lines())


def test_no_plain_linears_names_the_layer_types_found():
    """GPT-2's projections are Conv1D: the error says what the blocks hold instead."""
    import transformers

    model = AutoModelForCausalLM.from_config(
        transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97)
    )
    with pytest.raises(
        ConfigError,
        match=r"^lora\.target_modules: the model has no Linear layers inside indexed blocks: its block "
        r"projections are Conv1D, not plain nn\.Linear \(LoRA wraps those only\)$",
    ):
        apply_method(model, load_config(None, ["kernels=torch"]), torch.device("cpu"))


def _multimodal_gemma3():
    """Gemma 3 as its real checkpoints load as a causal LM: a vision tower (4 blocks) beside the language
    model (2 blocks), both with indexed blocks and q/k/v/o Linears."""
    import transformers

    text = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=16,
                layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize(
    "overrides",
    [["method=lora"], ["method=lora", "lora.target_modules=[q_proj, down_proj]"], ["method=full"],
     ["method=partial", "partial.last_n_layers=1"], ["method=partial", "partial.patterns=[norm]"],
     ["method=qlora"]],
)  # fmt: skip
def test_a_vision_tower_is_never_trained(overrides):
    """On a multimodal checkpoint a text-only run never calls the vision tower: whatever the method, nothing
    there is adapted or trainable, the last N blocks are the language model's, and every trainable tensor
    gets a gradient from a text batch."""
    model = _multimodal_gemma3()
    assert adapt.unused_by_text(model) == ["model.vision_tower", "model.multi_modal_projector"]
    report = apply_method(model, _cfg(*overrides), CPU)
    assert report.lines()[1].startswith(
        "frozen, never adapted: model.vision_tower, model.multi_modal_projector"
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not [n for n in trainable if "vision" in n or "multi_modal" in n]
    assert not [n for n in report.adapted if "vision" in n]
    if "partial.last_n_layers=1" in overrides:
        assert {n.split(".layers.")[1].split(".")[0] for n in trainable} == {"1"}
        assert all(n.startswith("model.language_model.layers.1.") for n in trainable)
    ids = torch.randint(0, 400, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=lora", "lora.target_modules=[out_proj]"],  # SigLIP's attention output: vision only
         "lora.target_modules: ['out_proj'] match only Linears that a text-only run never calls (in "
         "model.vision_tower, model.multi_modal_projector)"),
        (["method=partial", "partial.patterns=[patch_embedding]"],
         "partial.patterns: 'patch_embedding' matches no parameter name that a text-only run uses (it matches "
         "only in model.vision_tower, model.multi_modal_projector)"),
        (["method=partial", "partial.last_n_layers=3"],
         "partial.last_n_layers: 3 is more than the model's 2 blocks"),
    ],
)  # fmt: skip
def test_vision_only_selections_are_errors(overrides, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        apply_method(_multimodal_gemma3(), _cfg(*overrides), CPU)


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2_moe"])
def test_text_only_models_have_nothing_unused(tmp_path, arch):
    from tiny import build_tiny_model

    build_tiny_model(tmp_path, arch=arch, tie=arch == "llama")
    assert adapt.unused_by_text(_model(tmp_path)) == []


@pytest.mark.parametrize(
    "config",
    [
        ("GPT2Config", dict(n_embd=32, n_layer=1, n_head=2, vocab_size=64)),
        # its get_decoder() is the output Linear (named `decoder`), its head a dense + norm beside it
        ("ModernBertDecoderConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64, pad_token_id=0)),
        ("ElectraConfig", dict(embedding_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, vocab_size=64, is_decoder=True)),
    ],
)  # fmt: skip
def test_text_only_models_with_odd_decoders_have_nothing_unused(config):
    """No vision part in the config: nothing is frozen as unused, whatever get_decoder() returns."""
    import transformers

    name, kwargs = config
    model = AutoModelForCausalLM.from_config(getattr(transformers, name)(**kwargs))
    assert adapt.unused_by_text(model) == []
    apply_method(model, _cfg("method=full"), CPU)
    assert all(p.requires_grad for p in model.parameters())


def test_resuming_a_run_that_trained_the_vision_tower_says_why_it_cannot():
    """Runs from before the vision tower was left frozen trained some of it: their checkpoints name it."""
    from fusedtune.trainer.checkpoint import CheckpointError, restore_trainable

    model = _multimodal_gemma3()
    apply_method(model, _cfg("method=lora"), CPU)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    saved["model.vision_tower.vision_model.encoder.layers.3.self_attn.q_proj.lora_A"] = torch.zeros(16, 32)
    with pytest.raises(
        CheckpointError, match=r"trained 1 tensors in model\.vision_tower, model\.multi_modal_"
    ):
        restore_trainable(model, saved, "ckpt")
    del saved["model.vision_tower.vision_model.encoder.layers.3.self_attn.q_proj.lora_A"]
    restore_trainable(model, saved, "ckpt")  # the text tensors alone: fine
