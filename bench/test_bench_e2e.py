"""End to end, CI size: fusedtune against HF Trainer + PEFT + bitsandbytes on the tests' tiny Llama.

``make test`` runs it (``testpaths``), as does ``make bench ARGS="-k e2e"``. The fuller run is by hand:
``python -P bench/e2e.py --model smollm2 --batch 2 --rounds 4 --threads 1``.
The benchmark itself fails loudly (``BenchmarkFailed``) when the providers' losses, gradient norms or
trained adapters disagree, or a gradient norm vanishes; no timing is asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", e2e.METHODS)
def test_bench_e2e_tiny(benchmark, tmp_path, method):
    rows = benchmark.pedantic(
        e2e.run_benchmark,
        kwargs={
            "model": "tiny",
            "methods": [method],
            "seq": 64,
            "batch": 4,
            "grad_accum": 2,
            "steps": 4,
            "out_dir": tmp_path,
            "threads": 1,
            "log": lambda *_: None,
        },
        rounds=1,
        iterations=1,
    )
    benchmark.group = f"e2e-tiny-{method}"
    by = {r["provider"]: r for r in rows}
    assert set(by) == {*e2e.PROVIDERS, "torchtune"}  # torchtune: a dev dependency, so it runs here
    if method == "qlora":  # the tiny model's 64x64 weights are too small for torchao's NF4
        assert "multiple of 16384 elements only; q_proj is 64x64" in by.pop("torchtune")["skipped"]
    rows = list(by.values())
    benchmark.extra_info.update(
        {
            f"{p}_{k}": by[p][k]
            for p in by
            for k in ("step_s_median", "tokens_per_s", "peak_rss_mib", "last_loss")
        }
    )
    assert all(r["min_grad_norm"] > 0 for r in rows)
    assert (tmp_path / "e2e-tiny-cpu.json").is_file() and (tmp_path / "e2e-tiny-cpu.png").is_file()
    from readme_table import table
    from report import device_name

    text = table(tmp_path)  # the README table names the machine of every number
    assert text.count(device_name()) == len(rows) + (method == "qlora") and "HF Trainer + PEFT + bnb" in text


def test_bench_e2e_tiny_bf16(tmp_path):
    """``--dtype bf16``: both providers in bf16 (HF under its CPU autocast), checked with the bf16 tolerances."""
    rows = e2e.run_benchmark(
        model="tiny",
        methods=["lora"],
        seq=64,
        batch=4,
        steps=3,
        out_dir=tmp_path,
        threads=1,
        log=lambda *_: None,
        dtype="bf16",
    )
    assert {r["provider"] for r in rows} == {*e2e.PROVIDERS, "torchtune"} and all(
        r["dtype"] == "bf16" for r in rows
    )
    assert all(r["min_grad_norm"] > 0 for r in rows)
    assert (tmp_path / "e2e-tiny-bf16-cpu.json").is_file()
    assert "bf16 (HF: the model loaded in bf16" in (tmp_path / "e2e-tiny-bf16-cpu.md").read_text()


def test_torchtune_provider_is_the_same_model():
    """The torchtune provider's model (its Llama, RoPE swapped for the checkpoint's plain one, weights through
    its hf_to_tune) gives transformers' logits at every real position: its rows compare like with like."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = e2e.model_path("tiny")
    batch = e2e.make_batches(AutoConfig.from_pretrained(path).vocab_size, 1, 2, 32)[0]
    tune = e2e.build_torchtune_model(path, "lora", torch.float32, 32).eval()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in tune.named_parameters():  # B starts at zero: give the adapters something to do
            if name.endswith("lora_b.weight"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        want = hf(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        got = tune(batch["input_ids"])
    real = batch["attention_mask"].bool()
    assert not torch.equal(got[real], want[real])  # the adapters changed the output...
    tune_b = {n: p for n, p in tune.named_parameters() if n.endswith("lora_b.weight")}
    with torch.no_grad():
        for p in tune_b.values():
            p.zero_()
        got = tune(batch["input_ids"])
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)  # ...and without them, HF's


def test_torchtune_skip_reasons(tmp_path):
    path = e2e.model_path("tiny")
    assert e2e.torchtune_skip(path, "lora") is None
    assert "q_proj is 64x64" in e2e.torchtune_skip(path, "qlora")
    assert "model is mixtral" in e2e.torchtune_skip(e2e.model_path("mixtral"), "lora")
    import transformers  # Llama 3.1's frequency-scaled RoPE: a skip, not a failed benchmark

    scaled = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}  # fmt: skip
    transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, rope_scaling=scaled).save_pretrained(tmp_path)  # fmt: skip
    assert e2e.torchtune_skip(str(tmp_path), "lora").endswith("this one's RoPE is 'llama3'")


def _row(provider, losses, norms):
    return {
        "provider": provider,
        "method": "lora",
        "steps": len(losses),
        "losses": losses,
        "grad_norms": norms,
    }


def test_check_fails_loudly_on_disagreeing_losses():
    ok = [
        _row("hf_peft", [2.0, 1.9], [0.5, 0.4]),
        _row("fusedtune", [2.0, 1.9 * (1 + e2e.LOSS_RTOL / 2)], [0.5, 0.4]),
    ]
    e2e.check(ok)
    bad = [ok[0], _row("fusedtune", [2.0, 1.8], [0.5, 0.4])]
    with pytest.raises(e2e.BenchmarkFailed, match="step 2"):
        e2e.check(bad)


def test_check_fails_loudly_on_disagreeing_grad_norms_or_untrained_adapters():
    base = {**_row("hf_peft", [2.0, 1.9], [0.5, 0.4]), "lora_b_norm": 0.03}
    ok = {**_row("fusedtune", [2.0, 1.9], [0.5, 0.4 * (1 + e2e.GRAD_RTOL / 2)]), "lora_b_norm": 0.0301}
    e2e.check([base, ok])
    other_layers = {**ok, "grad_norms": [0.05, 0.04]}  # adapting fewer Linears: far smaller gradients
    with pytest.raises(e2e.BenchmarkFailed, match="step 1: fusedtune gradient norm"):
        e2e.check([base, other_layers])
    never_stepped = {**ok, "lora_b_norm": 0.0}
    with pytest.raises(e2e.BenchmarkFailed, match="trained LoRA B to norm 0"):
        e2e.check([base, never_stepped])


def test_check_catches_a_run_whose_optimizer_never_steps(monkeypatch):
    """Two real runs of the tiny job, one with a no-op optimizer step: the loss check alone passes them
    (the loss barely moves at this lr), the full check does not."""
    import bitsandbytes as bnb
    from transformers import AutoConfig

    path = e2e.model_path("tiny")
    job = {"model_path": path, "method": "lora", "seq": 32, "batch": 2, "grad_accum": 1, "steps": 3}
    batches = e2e.make_batches(AutoConfig.from_pretrained(path).vocab_size, 3, 2, 32)
    good = {**e2e.run_fusedtune(job, batches), "provider": "hf_peft", "method": "lora", "steps": 3}
    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", lambda self, closure=None: None)
    idle = {**e2e.run_fusedtune(job, batches), "provider": "fusedtune", "method": "lora", "steps": 3}
    losses_only = {k: v for k, v in idle.items() if k != "lora_b_norm"}
    e2e.check([good, losses_only], grad_rtol=float("inf"))  # the losses alone: indistinguishable
    with pytest.raises(e2e.BenchmarkFailed, match="trained LoRA B to norm 0"):
        e2e.check([good, idle])


def test_check_fails_loudly_on_zero_grad_norm():
    with pytest.raises(e2e.BenchmarkFailed, match="gradient norms"):
        e2e.check([_row("fusedtune", [2.0, 1.9], [0.5, 0.0])])


def test_profile_runs_the_training_step(tmp_path):
    """bench/gpu_profile.py's step loop and tables, on the CPU (no kernel events there: host ops only)."""
    import gpu_profile
    from transformers import AutoConfig

    path = e2e.model_path("tiny")
    batches = e2e.make_batches(AutoConfig.from_pretrained(path).vocab_size, 3, 2, 32)
    job = {"model_path": path, "method": "lora", "kernels": "torch", "seq": 32, "batch": 2, "grad_accum": 1}
    res = gpu_profile.profile_one(job, batches, warmup=1, steps=2)
    assert res["kernel_ms_per_step"] == 0 and res["gpu_idle_share"] is None and res["top_kernels"] == []
    assert len(res["warmup_step_s"]) == 1 and res["profiled_step_ms"] > 0
    names = {r["name"] for r in res["top_cpu_ops"]}
    assert "aten::mm" in names or "aten::addmm" in names


def test_profile_layer_runs_both_paths(monkeypatch):
    """bench/gpu_profile.py's one-layer profile on the CPU (the fused path under Triton's interpreter)."""
    import gpu_profile

    rows = gpu_profile.profile_layer(8, k=32, n=16, r=4, iters=2, device="cpu")
    totals = [r for r in rows if r["kind"] == "total"]
    assert [r["kernels"] for r in totals] == ["fused", "cublas"] and all(r["total_ms"] > 0 for r in totals)
    assert any(r["kind"] == "cpu" and r["name"].startswith("aten::") for r in rows)
