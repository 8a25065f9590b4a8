"""Fused SwiGLU and RMSNorm in the model's modules (trainer/patches.py): same outputs and gradients, and a
say on which."""

from __future__ import annotations

import pickle

import pytest
import torch
from tiny import TINY_SHAPE, tiny_llama
from torch import nn
from transformers import GemmaConfig, GemmaForCausalLM

from fusedtune.trainer import patches
from fusedtune.trainer.model import enable_checkpointing
from fusedtune.trainer.patches import (
    FusedRMSNorm,
    SwiGLUMLP,
    apply_patches,
    fuse_rmsnorm,
    fuse_rope,
    fuse_swiglu,
)

EPS_TINY = 1e-6


def _llama(seed=0):
    return tiny_llama(seed, vocab_size=61, hidden_size=32, intermediate_size=48, num_attention_heads=2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_mlp_gives_the_same_loss_and_gradients(backend):
    ids = torch.randint(0, 61, (2, 9))
    results = []
    for fuse in (False, True):
        model = _llama()
        if fuse:
            report = fuse_swiglu(model, backend)
            assert report.lines() == ["fused SwiGLU: 2/2 MLPs"]
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-9, atol=1e-12, msg=name)


def test_other_mlps_keep_their_forward_and_are_named():
    report = fuse_swiglu(_gemma(), "torch")
    assert report.swiglu == []
    assert report.lines()[1].startswith("  not fused (activation GELUTanh, not SiLU): all")

    class Extra(nn.Module):  # SiLU-gated, but its forward does more than the fused gate would
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 4)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * 2

    class Keyword(Extra):  # the fused gate's body, but a forward that takes more than x
        def forward(self, x, scale=None):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    mixed = nn.Sequential(Extra(), Keyword())
    report = fuse_swiglu(mixed, "torch")
    assert report.not_swiglu == {
        "0": "Extra.forward is not down(act(gate(x)) * up(x))",
        "1": "Keyword.forward takes more than x",
    }
    assert type(mixed[0]) is Extra and type(mixed[1]) is Keyword


def test_fused_mlp_keeps_names_and_pickles():
    model = _llama()
    names = [n for n, _ in model.named_parameters()]
    fuse_swiglu(model, "torch")
    assert all(isinstance(layer.mlp, SwiGLUMLP) for layer in model.model.layers)
    assert [n for n, _ in model.named_parameters()] == names  # adapters and checkpoints see the same keys
    again = pickle.loads(pickle.dumps(model))
    ids = torch.randint(0, 61, (1, 5))
    torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert fuse_swiglu(model, "torch").swiglu == []  # already fused: nothing to do twice


def test_apply_patches_says_what_took_effect():
    lines = apply_patches(_llama(), True, 64, "torch")
    assert lines == [
        "fused SwiGLU: 2/2 MLPs",
        "fused RMSNorm: 5/5 norms",
        "fused RoPE: 2/2 attention layers",
        "padding-free micro-batches: on (no pad tokens; attention within each example)",
        "LM head + loss: fused, at the target positions only",
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_norms_give_the_same_loss_and_gradients(backend):
    """Every parameter trains (the norms' weights included): loss and every gradient as HF's own norms.
    In fp32: HF's norm computes in fp32 whatever the model's dtype, so an fp64 model is no oracle here."""

    def check(report, model):
        assert report.lines() == ["fused RMSNorm: 5/5 norms"]
        assert isinstance(model.model.norm, FusedRMSNorm)

    def make():
        return tiny_llama(
            0, torch.float32, vocab_size=61, hidden_size=32, intermediate_size=48, num_attention_heads=2
        )

    _assert_fused_norms_train_as_hf(make, backend, check)


def _assert_fused_norms_train_as_hf(make, backend, check):
    """``make()`` twice, the second with its norms fused (``check(report, model)`` on the patch): the same
    loss and every gradient (every parameter trains, the norms' weights included)."""
    ids = torch.randint(0, 61, (2, 9))
    results = []
    for fuse in (False, True):
        model = make()
        if fuse:
            check(fuse_rmsnorm(model, backend), model)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    tol = {"rtol": 1e-4, "atol": 1e-5}  # the analytic backward and autograd's chain sum in other orders
    torch.testing.assert_close(l1, l0, **tol)
    assert g1.keys() == g0.keys()  # the same parameter names
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], **tol, msg=name)


def test_fused_norm_given_another_dtype_says_so_once_and_promotes_as_hf(caplog):
    """An fp32 input into an fp16 norm (autocast regions, custom code): HF's promotion through the torch
    path, and one warning naming the norm, not a TypeError mid-run."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(24, eps=EPS_TINY).half()
    hf.weight.data = 1 + 0.1 * torch.randn(24).half()
    parent = nn.Sequential(hf)
    report = fuse_rmsnorm(parent, "triton")
    assert report.rmsnorm == ["0"]
    x = torch.randn(3, 24)
    with caplog.at_level("WARNING", logger="fusedtune.trainer.patches"):
        y1, y2 = parent(x), parent(x)
    expected = hf(x)
    assert y1.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(y1, expected, rtol=0, atol=0)
    torch.testing.assert_close(y2, expected, rtol=0, atol=0)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and warned[0].startswith(
        "RMSNorm 0: input is torch.float32 but its weight is torch.float16"
    )


def _gemma(cls="gemma"):
    """A 2-layer Gemma (or Gemma 3) in fp32, its norm weights drawn around 0."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    shape = dict(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    if cls == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**shape, sliding_window=8))
    else:
        model = GemmaForCausalLM(GemmaConfig(**shape))
    for name, p in model.named_parameters():
        if "norm" in name:  # HF initializes Gemma's norm weights to 0 (a scale of 1): make them count
            p.data.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("cls", ["gemma", "gemma3"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gemma_norms_fuse_with_the_same_loss_and_gradients(backend, cls):
    """Gemma's ``1 + w`` norms (Gemma 3's q/k norms and its four norms a block included): fused, with
    the loss and every gradient of HF's own norms, the norms' weights training too."""

    def check(report, model):
        assert report.not_rmsnorm == {} and len(report.rmsnorm) == (13 if cls == "gemma3" else 5)
        assert all(m.style == "gemma" for m in model.modules() if isinstance(m, FusedRMSNorm))

    _assert_fused_norms_train_as_hf(lambda: _gemma(cls), backend, check)


def test_norms_with_other_math_keep_their_forward_and_are_named():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    class ScaledRMSNorm(nn.Module):  # RMSNorm-like, but not either known math
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.ones(4)), 1e-6

        def forward(self, x):
            return 2 * self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    report = fuse_rmsnorm(nn.Sequential(ScaledRMSNorm()), "torch")
    assert report.rmsnorm == []
    assert report.lines()[1] == (
        "  not fused (ScaledRMSNorm.forward is neither LlamaRMSNorm's nor GemmaRMSNorm's (other math)): all"
    )
    qwen3 = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=61,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
    )
    report = fuse_rmsnorm(qwen3, "torch")
    assert "model.layers.1.self_attn.k_norm" in report.rmsnorm and len(report.rmsnorm) == 9  # 4 a block, +1
    llama = _llama()
    llama.model.norm.weight.data = llama.model.norm.weight.data.float()  # fp32 norm in an fp64 model
    report = fuse_rmsnorm(llama, "triton")
    assert report.not_rmsnorm == {
        "model.norm": "weight dtype torch.float32 differs from the model's torch.float64"
    }


def _rope_model(arch: str):
    """A 2-layer fp32 model of ``arch`` (fp32: the triton path takes no fp64)."""
    if arch == "llama":
        return tiny_llama(
            0, torch.float32, vocab_size=61, hidden_size=32, intermediate_size=48, num_attention_heads=2
        )
    return _gemma(
        "gemma3"
    )  # sliding and full layers, each with its own table; q/k normed after the transpose


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_rope_gives_the_same_loss_and_gradients(backend, arch, monkeypatch):
    calls = []
    real = patches.apply_rope
    monkeypatch.setattr(patches, "apply_rope", lambda *a, **k: calls.append(k) or real(*a, **k))
    ids = torch.randint(0, 61, (2, 9))
    results = []
    for fuse in (False, True):
        model = _rope_model(arch)
        if fuse:
            assert fuse_rope(model, backend).lines() == ["fused RoPE: 2/2 attention layers"]
            assert fuse_rope(model, backend).lines() == []  # already fused: nothing to do twice
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        assert len(calls) == (2 if fuse else 0), "the fused rotation ran where it was not asked for"
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5, msg=name)
    other = _rope_model(arch)  # an unpatched model of the same class, after the patch: HF's own rotation
    other(input_ids=ids).logits.sum().backward()
    assert len(calls) == 2 and calls[0] == {"backend": backend}


def test_other_rotations_keep_their_function_and_are_named():
    from transformers import CohereConfig, CohereForCausalLM, PhiConfig, PhiForCausalLM

    shape = dict(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2
    )
    shape.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cohere = CohereForCausalLM(CohereConfig(**shape))  # interleaved halves
    phi = PhiForCausalLM(PhiConfig(**shape))  # partial rotary: the call takes the rotated slices
    assert fuse_rope(cohere, "torch").lines()[1] == (
        "  not fused (modeling_cohere.apply_rotary_pos_emb is not Llama's (other math or rounding)): all"
    )
    assert fuse_rope(phi, "torch").not_rope == {
        f"model.layers.{i}.self_attn": "PhiAttention.forward calls apply_rotary_pos_emb with other arguments"
        for i in range(2)
    }
    assert "forward" not in cohere.model.layers[0].self_attn.__dict__


def test_fused_rope_survives_pickling_and_checkpoint_recompute(monkeypatch):
    calls = []
    real = patches.apply_rope
    monkeypatch.setattr(patches, "apply_rope", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 61, (2, 7))
    plain = _rope_model("llama")
    plain(input_ids=ids, labels=ids).loss.backward()
    model = _rope_model("llama")
    fuse_rope(model, "torch")
    model = pickle.loads(pickle.dumps(model))
    enable_checkpointing(model)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 4  # 2 layers, each forward and its recompute in backward
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_rope_of_an_inherited_forward_is_patched_where_the_forward_looks(monkeypatch):
    """Remote code often subclasses Llama's attention in its own module: the forward still looks the
    function up in modeling_llama's globals, so that is where the fused path must be installed."""
    import sys
    import types

    from transformers.models.llama import modeling_llama

    monkeypatch.setitem(sys.modules, "remote_llama", types.ModuleType("remote_llama"))
    remote = type("RemoteAttention", (modeling_llama.LlamaAttention,), {"__module__": "remote_llama"})
    calls = []
    real = patches.apply_rope
    monkeypatch.setattr(patches, "apply_rope", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _rope_model("llama")
    for layer in model.model.layers:
        layer.self_attn.__class__ = remote
    assert fuse_rope(model, "torch").lines() == ["fused RoPE: 2/2 attention layers"]
    ids = torch.randint(0, 61, (1, 5))
    model(input_ids=ids)
    assert len(calls) == 2


def test_set_up_probes_leave_the_random_stream_and_the_adapters_backend_alone():
    """The probe forwards run with the adapters on their torch path and under a forked RNG: a fresh
    run's dropout masks are the ones it would draw without them, and triton layers stay triton."""
    from fusedtune.kernels import LoRALinear

    model = _llama()
    model.model.layers[0].self_attn.q_proj = LoRALinear.from_linear(
        model.model.layers[0].self_attn.q_proj, 4, 8, dropout=0.5, backend="triton"
    )
    model.train()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    apply_patches(model, True, 64, "torch")
    assert torch.equal(torch.rand(3), expected)
    assert model.model.layers[0].self_attn.q_proj.backend == "triton"


def test_mlps_and_norms_of_other_shapes_are_named():
    """Phi-3's fused gate_up_proj MLP and GPT-2's ungated one keep their forward and are named, as are
    LayerNorms (which subtract the mean): no model's MLPs or norms go unmentioned."""
    import transformers

    for config, mlp in (
        (transformers.Phi3Config(**TINY_SHAPE, pad_token_id=0, eos_token_id=1), "Phi3MLP"),
        (transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97), "GPT2MLP"),
    ):
        model = transformers.AutoModelForCausalLM.from_config(config)
        lines = apply_patches(model, False, 64, "torch")
        assert "fused SwiGLU: 0/2 MLPs" in lines
        assert f"  not fused ({mlp} has no gate_proj/up_proj/down_proj Linears): all" in lines
        if mlp == "GPT2MLP":
            assert "fused RMSNorm: 0/5 norms" in lines
            assert "  not fused (LayerNorm subtracts the mean: not an RMSNorm): all" in lines
        else:
            assert "fused RMSNorm: 5/5 norms" in lines
