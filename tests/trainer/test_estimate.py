"""``trainer estimate``: the exact parts equal the live tensors after a real step; the formulas land
within 15% of the measured peak (6% asserted on the tiny model); the CLI prints the breakdown and answers bad input with one line."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tiny import write_config

from fusedtune.kernels import quant
from fusedtune.trainer import estimate as est_mod
from fusedtune.trainer import memory
from fusedtune.trainer.adapt import apply_method
from fusedtune.trainer.cli import main
from fusedtune.trainer.config import load_config
from fusedtune.trainer.errors import UserError
from fusedtune.trainer.loop import accumulate_gradients, micro_batch_stream
from fusedtune.trainer.model import load_model, load_tokenizer
from fusedtune.trainer.optim import build_optimizer, clip_and_step, master_weights_of

METHODS = {
    "lora": [],
    "qlora-nf4-dq": ["method=qlora"],
    "qlora-nf4": ["method=qlora", "quant.double_quant=false", "quant.blocksize=128"],
    "qlora-int8": ["method=qlora", "quant.quant_type=int8"],
    "qlora-rank-above-kv": ["method=qlora", "lora.rank=48"],  # k/v (64->32) stay dense and unadapted
    "full-adamw32": ["method=full", "optim.name=adamw32bit"],
    "partial-torch-adamw": ["method=partial", "partial.patterns=[norm]", "optim.name=adamw_torch"],
    # bf16 weights, updated through fp32 copies (optim.master_weights): the copies and their fp32 state
    "full-bf16-masters": ["method=full", "model.dtype=bf16"],
    "partial-bf16-masters-torch-adamw": [
        "method=partial",
        "partial.patterns=[norm, lm_head]",
        "model.dtype=bf16",
        "optim.name=adamw_torch",
    ],
    "partial-bf16-no-masters": [
        "method=partial",
        "partial.patterns=[norm]",
        "model.dtype=bf16",
        "optim.master_weights=false",
    ],
}


def _one_real_step(cfg):
    """Load, adapt, take one optimizer step; return (model, optimizer, gradient bytes before zeroing)."""
    device = torch.device("cpu")
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model)
    from fusedtune.trainer.data import build_datasets

    data = build_datasets(cfg.data, tokenizer, len(tokenizer))
    model, _ = load_model(cfg.model.name_or_path, cfg.model, device)
    apply_method(model, cfg, device)
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    stream = micro_batch_stream(data.train, cfg.train.micro_batch_size, 0, tokenizer.pad_token_id, device)
    accumulate_gradients(model, [next(stream)])
    grads = memory.gradient_bytes(model)
    assert grads > 0
    clip_and_step(optimizer, [p for p in model.parameters() if p.requires_grad], cfg.optim.max_grad_norm)
    return model, optimizer, grads


@pytest.mark.parametrize("overrides", list(METHODS.values()), ids=list(METHODS))
def test_exact_parts_equal_live_tensors(tmp_path, tiny_model_dir, overrides):
    cfg = load_config(write_config(tmp_path, tiny_model_dir), overrides)
    est = est_mod.estimate(cfg, on_gpu=False)
    model, optimizer, grads = _one_real_step(cfg)

    assert est.frozen_by_format == memory.frozen_bytes_by_format(model)
    acc = memory.param_accounting(model)
    assert est.frozen_bytes == acc.frozen_bytes  # an independent count of the same tensors
    assert est.trainable_params == acc.trainable_params
    # the parameter count is of weights, as PEFT's: a packed weight counts its N·K (it counted bytes of
    # storage and scales), buffers none; base + adapters whatever the method and format
    base = load_model(cfg.model.name_or_path, cfg.model, torch.device("cpu"))[0]
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert acc.frozen_params + acc.trainable_params == sum(p.numel() for p in base.parameters()) + adapters
    assert est.trainable_bytes == acc.trainable_bytes
    assert est.gradient_bytes == grads
    assert est.optimizer_state_bytes == memory.optimizer_state_bytes(optimizer)
    masters = master_weights_of(optimizer)
    assert est.master_weight_bytes == (0 if masters is None else masters.nbytes)
    assert (masters is not None) == (
        "model.dtype=bf16" in overrides and "optim.master_weights=false" not in overrides
    )
    if masters is not None:
        assert est.master_weight_bytes == 4 * acc.trainable_params
    if "method=qlora" in overrides:
        assert len(est.frozen_by_format) == 2, est.frozen_by_format  # dense rest + the packed format


@pytest.mark.parametrize(
    ("shape", "qtype", "blocksize", "dq"),
    [
        ((5, 123), "nf4", 64, True),
        ((64, 200), "fp4", 128, False),
        ((48, 96), "nf4", 64, False),
        ((7, 33), "int8", 64, False),
    ],
)
def test_packed_weight_bytes_formula(shape, qtype, blocksize, dq):
    packed = quant.quantize(torch.randn(*shape), qtype, blocksize, dq)
    assert est_mod.packed_weight_bytes(*shape, qtype, blocksize, dq) == packed.nbytes()


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["method=qlora"],
        ["model.gradient_checkpointing=true"],
        ["lora.dropout=0.1"],
        ["method=qlora", "lora.dropout=0.1"],
        ["method=full"],
        ["train.padding_free=false"],
        ["method=partial", "partial.patterns=[layers.1.]", "model.gradient_checkpointing=true"],
        ["method=partial", "partial.patterns=[lm_head]"],  # no block trains: the peak is in a forward
        # torch's AdamW: the peak is its step's temporaries (-10.6% without them)
        [
            "method=full",
            "optim.name=adamw_torch",
            "data.max_seq_len=16",
            "data.completion_only=false",
            "train.micro_batch_size=1",
        ],
        ["lora.target_modules=[lm_head]", "train.micro_batch_size=32"],  # HF's head, its input saved
        ["method=full", "model.dtype=bf16"],  # fp32 master copies and their fp32 state
        # the peak is the step: every bf16 gradient, one copy's fp32 gradient and its AdamW temporaries
        [
            "method=full",
            "model.dtype=bf16",
            "optim.name=adamw_torch",
            "data.max_seq_len=16",
            "data.completion_only=false",
            "train.micro_batch_size=1",
        ],
    ],
    ids=[
        "lora",
        "qlora",
        "ckpt",
        "lora-dropout",
        "qlora-dropout",
        "full",
        "padded",
        "ckpt-last-layer",
        "head",
        "full-adamw-torch-step",
        "lora-on-lm-head",
        "full-bf16-masters",
        "full-bf16-masters-adamw-torch-step",
    ],
)
def test_estimate_within_15_percent_of_measured_peak(tmp_path, tiny_model_dir, overrides):
    cfg = load_config(write_config(tmp_path, tiny_model_dir), overrides)
    m = est_mod.measure(cfg, steps=3, log=lambda *_: None)
    here = est_mod.estimate_for_batches(cfg, m.batches, on_gpu=False)
    assert m.peak_tensor_bytes > here.frozen_bytes + here.trainable_bytes + here.optimizer_state_bytes
    assert m.master_weight_bytes == here.master_weight_bytes  # exact: 4 bytes a bf16 trainable parameter
    # the target is 15%; these tiny configs land within 3% (backward's dG/dU transient included), so a
    # formula that drifts is caught well before it misses the target
    assert abs(here.tensor_bytes - m.peak_tensor_bytes) <= 0.06 * m.peak_tensor_bytes, (
        here.tensor_bytes,
        m.peak_tensor_bytes,
    )


def test_checkpointing_and_padding_move_the_estimate_the_right_way(tmp_path, tiny_model_dir):
    cfg = load_config(write_config(tmp_path, tiny_model_dir))
    e = est_mod.estimate(cfg, on_gpu=False)  # padding-free micro-batches: no mask, no repeated KV heads
    assert e.activation_bytes_checkpointed < e.activation_bytes
    padded = est_mod.estimate(cfg, on_gpu=False, padded=True)
    assert padded.activation_bytes > e.activation_bytes
    no_pf = cfg.model_copy(update={"train": cfg.train.model_copy(update={"padding_free": False})})
    assert est_mod.estimate(no_pf, on_gpu=False).activation_bytes == padded.activation_bytes
    bf16 = est_mod.estimate(
        cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "bf16"})}), on_gpu=True
    )
    assert bf16.frozen_by_format == {"bf16": e.frozen_bytes // 2}
    assert bf16.overhead_bytes >= est_mod.CUDA_CONTEXT_BYTES


def test_cli_prints_breakdown_and_fit(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir)
    assert main(["estimate", str(config), "method=qlora", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    for part in (
        "frozen weights, nf4 + double quant",
        "frozen weights, fp32",
        "trainable parameters",
        "gradients (trainable only)",
        "optimizer state, adamw8bit (used)",
        "optimizer state, adamw32bit",
        "activations saved for backward, no checkpointing (used)",
        "activations saved for backward, checkpointing",
        "backward transient (an MLP-wide and two residual gradients)",
        "loss: saved gradient of the hidden states",
        "loss: logits chunk + hidden states (transient)",
        "the peak of tensors is reached ",
        "framework overhead",
        "= total",
        "fits:",
    ):
        assert part in out, part
    assert not (tmp_path / "run").exists(), "estimate wrote a run directory"


def test_cli_does_not_fit_names_the_changes(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, train={"micro_batch_size": 64}, data={"max_seq_len": 512})
    cfg = load_config(config, ["model.dtype=bf16"])
    need = est_mod.estimate(cfg, on_gpu=True).total_bytes
    ckpt = est_mod.estimate(
        load_config(config, ["model.dtype=bf16", "model.gradient_checkpointing=true"]), on_gpu=True
    )
    budget = (need + ckpt.total_bytes) // 2  # between the two: checkpointing alone fits
    assert (
        main(["estimate", str(config), "model.dtype=bf16", "--gpu-memory", f"{budget / 1024**2:.3f}MiB"])
        == est_mod.NO_FIT_EXIT
        == 3
    )
    out = capsys.readouterr().out
    assert "does NOT fit" in out
    assert "model.gradient_checkpointing=true" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--gpu-memory", "lots"], "--gpu-memory: cannot read 'lots'"),
        (["--gpu-memory", "0GB"], "--gpu-memory: must be positive"),
        (["lora.rnak=4"], "unknown key 'lora.rnak'"),
        (["model.name_or_path=/nonexistent/model"], "no such model directory"),
        (["lora.target_modules=[nope]"], "lora.target_modules"),
    ],
)
def test_cli_bad_input_one_line(tmp_path, tiny_model_dir, capsys, args, expected):
    config = write_config(tmp_path, tiny_model_dir)
    assert main(["estimate", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def test_parse_size():
    assert est_mod.parse_size("24GB") == 24 * 1024**3
    assert est_mod.parse_size("80GiB") == 80 * 1024**3
    assert est_mod.parse_size("512m") == 512 * 1024**2
    assert est_mod.parse_size("1.5T") == int(1.5 * 1024**4)
    with pytest.raises(UserError):
        est_mod.parse_size("24 apples")


def test_missing_config_file_one_line(tmp_path, capsys):
    assert main(["estimate", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_run_summary_prints_the_measured_breakdown(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, method="qlora", train={"max_steps": 2})
    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "memory (measured): frozen weights" in out and "nf4 + double quant" in out
    assert "optimizer state" in out and "peak" in out
    assert "saved for backward by the largest micro-batch" in out
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())["accounting"]["saved_for_backward"]
    assert saved["activations"] > 0 and saved["loss"] > 0 and saved["tokens"] > 0


def test_run_summary_with_checkpointing_says_why_no_saved_count(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, train={"max_steps": 1})
    assert main(["run", str(config), "model.gradient_checkpointing=true"]) == 0
    assert "saved activations not counted (gradient checkpointing" in capsys.readouterr().out


@pytest.mark.parametrize("name,alt", [("adamw8bit", "adamw32bit"), ("adamw32bit", "adamw8bit")])
def test_optimizer_state_both_precisions(tiny_model_dir, name, alt):
    """The breakdown sets the configured optimizer's state beside the other precision's, both exact."""
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"optim.name={name}"])
    e = est_mod.estimate(cfg, on_gpu=False)
    model, _ = load_model(cfg.model.name_or_path, cfg.model, torch.device("cpu"))
    apply_method(model, cfg, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    assert e.optimizer_alternative == (alt, memory.expected_optimizer_state_bytes(params, alt))
    # and against the alternative optimizer's live state after a real step
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = build_optimizer(model, cfg.optim.model_copy(update={"name": alt}))
    optimizer.step()
    assert memory.optimizer_state_bytes(optimizer) == e.optimizer_alternative[1]
    full = e.optimizer_state_bytes if name == "adamw32bit" else e.optimizer_alternative[1]
    assert full == 8 * e.trainable_params  # two fp32 moments
    lines = "\n".join(est_mod.breakdown_lines(e))
    assert f"optimizer state, {name} (used)" in lines and f"optimizer state, {alt} " in lines


def test_qlora_dequant_temporary_follows_the_path(tiny_model_dir, monkeypatch):
    """The widest weight's dense temporary counts where a GEMM decodes it: the torch path always, the
    Triton path from DEQUANT_MIN_TOKENS tokens per micro-batch; the fused kernel below that never has one."""
    from fusedtune.kernels.qmatmul import DEQUANT_MIN_TOKENS

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "method=qlora", "model.dtype=bf16"])
    widest = 128 * 64 * 2  # the tiny Llama's gate/up/down: intermediate 128 x hidden 64, bf16
    cpu = est_mod.estimate(cfg, on_gpu=False, batch=1, seq=64)
    assert cpu.dequant_temporary_bytes == widest
    small = est_mod.estimate(cfg, on_gpu=True, batch=1, seq=64)
    assert small.dequant_temporary_bytes == 0
    big = est_mod.estimate(cfg, on_gpu=True, batch=DEQUANT_MIN_TOKENS // 64, seq=64)
    assert big.dequant_temporary_bytes == widest
    assert "dequantized weight temporary" in "\n".join(est_mod.breakdown_lines(big))
    lora = est_mod.estimate(cfg.model_copy(update={"method": "lora"}), on_gpu=False, batch=1, seq=64)
    assert lora.dequant_temporary_bytes == 0
    # a rank above the fused kernels' limit sends the layers to the torch path at any M (adapt); the
    # tiny model's layers are too narrow for rank 257, so the limit comes down to the rank instead
    monkeypatch.setattr(est_mod, "FUSED_MAX_RANK", cfg.lora.rank - 1)
    assert est_mod.estimate(cfg, on_gpu=True, batch=1, seq=64).dequant_temporary_bytes == widest


SAVED_CASES = {
    "lora": [],
    "qlora-dropout": ["method=qlora", "lora.dropout=0.1"],
    "lora-mlp-only": ["lora.target_modules=[gate_proj,up_proj,down_proj]"],
    "lora-padded": ["train.padding_free=false"],
    "full": ["method=full"],
    "full-padded": ["method=full", "train.padding_free=false"],
    "partial-norms": ["method=partial", "partial.patterns=[norm]"],
    "partial-last-layer": ["method=partial", "partial.patterns=[layers.1.]"],
    "partial-last-mlp": ["method=partial", "partial.patterns=[layers.1.mlp]"],  # no q/k grad: no RoPE saved
    # bf16: the fused norms keep their input in bf16 (HF's keep the fp32 upcast)
    "lora-bf16": ["model.dtype=bf16"],
    "full-bf16-padded": ["model.dtype=bf16", "method=full", "train.padding_free=false"],
}


@pytest.mark.parametrize("overrides", list(SAVED_CASES.values()), ids=list(SAVED_CASES))
def test_saved_activation_and_loss_formulas_are_byte_exact(tmp_path, tiny_model_dir, overrides):
    """What autograd saves for backward, measured by the saved-tensor meter over three real steps,
    equals the estimate's formula at that micro-batch's shape, byte for byte: which tensors a block
    saves depends on what trains below and in it, and the walk in ``block_saved_bytes_per_token`` has
    to follow it exactly."""
    cfg = load_config(write_config(tmp_path, tiny_model_dir), overrides)
    m = est_mod.measure(cfg, steps=3, log=lambda *_: None)
    assert m.saved is not None and m.saved.activations > 0 and m.saved.loss > 0
    batch, seq, targets, padded = m.batches[m.saved.index]
    e = est_mod.estimate(cfg, on_gpu=False, batch=batch, seq=seq, target_tokens=targets, padded=padded)
    assert (e.activation_bytes, e.loss_saved_bytes) == (m.saved.activations, m.saved.loss)
    table = "\n".join(est_mod.breakdown_lines(e, m))
    assert "activations saved for backward, no checkpointing (used)" in table and "+0.0%" in table


def test_partial_bias_only_saves_no_linear_inputs(tmp_path, tiny_model_dir_bias):
    """Biases alone train: gradients flow through every block but no Linear keeps its input."""
    cfg = load_config(
        write_config(tmp_path, tiny_model_dir_bias), ["method=partial", "partial.patterns=[bias]"]
    )
    m = est_mod.measure(cfg, steps=1, log=lambda *_: None)
    batch, seq, targets, padded = m.batches[m.saved.index]
    e = est_mod.estimate(cfg, on_gpu=False, batch=batch, seq=seq, target_tokens=targets, padded=padded)
    assert e.activation_bytes == m.saved.activations
    lora = est_mod.estimate(
        cfg.model_copy(update={"method": "lora"}), on_gpu=False, batch=batch, seq=seq, target_tokens=targets
    )
    assert e.activation_bytes < lora.activation_bytes


def test_meter_counts_what_the_forward_leaves_alive(tmp_path, tiny_model_dir):
    """Two independent measurements of one forward: the saved-tensor meter's total equals the growth of
    live CPU storages (op-by-op tracker) from before the forward to after it, less the loss scalar."""
    import gc

    from fusedtune.trainer.loss import loss_sum

    cfg = load_config(write_config(tmp_path, tiny_model_dir))
    device = torch.device("cpu")
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model)
    from fusedtune.trainer.data import build_datasets
    from fusedtune.trainer.patches import apply_patches

    data = build_datasets(cfg.data, tokenizer, len(tokenizer))
    model, _ = load_model(cfg.model.name_or_path, cfg.model, device)
    report = apply_method(model, cfg, device)
    apply_patches(model, cfg.train.padding_free, cfg.data.max_seq_len, report.backend)
    model.train()
    stream = micro_batch_stream(data.train, cfg.train.micro_batch_size, 0, tokenizer.pad_token_id, device)
    loss_sum(model, next(stream), report.backend).backward()  # first-call caches
    batch = next(stream)
    meter = memory.SavedTensorMeter.for_model(model)
    tracker = est_mod.LiveTensorTracker()
    for t in [*model.parameters(), *model.buffers(), *batch.values()]:  # held already: views of them
        tracker.add(t)  # are no allocation
    with tracker:
        before = tracker.current
        with meter.micro_batch(batch) as got:
            loss = loss_sum(model, batch, report.backend)
        gc.collect()
        grown = tracker.current - before
    assert got.total == grown - loss.untyped_storage().nbytes() > 0
    assert meter.largest is got and got.tokens == int(batch["attention_mask"].sum())


def test_meter_keeps_no_graph_alive(tiny_model_dir):
    """The pack hook hands autograd a detached alias: handing back the saved tensor itself would tie a
    saved output to its own graph in a cycle that not even the garbage collector frees."""
    import gc
    import weakref

    lin = torch.nn.Linear(16, 16)
    meter = memory.SavedTensorMeter.for_model(lin)
    x = torch.randn(4, 16, requires_grad=True)
    with meter.micro_batch({"attention_mask": torch.ones(4)}) as got:
        y = torch.sigmoid(lin(x)).exp()  # sigmoid and exp save their outputs
    alive = weakref.ref(y)
    y.sum().backward()
    del y
    gc.collect()
    assert alive() is None
    assert got.activations == 3 * 4 * 16 * 4  # x (the weight is the model's: not counted), two outputs


@pytest.mark.parametrize(
    ("arch", "tie"),
    [
        ("qwen2", False),
        ("qwen3", False),
        ("mistral", False),
        ("llama", True),
        ("gemma", True),
        ("gemma2", True),
        ("gemma3", True),
    ],
)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_saved_formulas_byte_exact_across_architectures(tmp_path, arch, tie, method):
    """Qwen2's q/k/v biases, Qwen3's per-head q/k norms, Mistral, a tied LM head (whose gradient the
    fused loss keeps in fp32 when it trains), Gemma's GELU MLP, Gemma 2's eager soft-capped attention and
    soft-capped logits (HF's head over every position, then F.cross_entropy) and Gemma 3's sandwich norms
    are walked exactly too."""
    from tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / arch, arch=arch, tie=tie)
    cfg = load_config(write_config(tmp_path, model_dir), [f"method={method}"])
    m = est_mod.measure(cfg, steps=2, log=lambda *_: None)  # from step 2 the optimizer state is there
    batch, seq, targets, padded = m.batches[m.saved.index]
    e = est_mod.estimate(cfg, on_gpu=False, batch=batch, seq=seq, target_tokens=targets, padded=padded)
    assert (e.activation_bytes, e.loss_saved_bytes) == (m.saved.activations, m.saved.loss)
    here = est_mod.estimate_for_batches(cfg, m.batches, on_gpu=False)
    assert abs(here.tensor_bytes - m.peak_tensor_bytes) <= 0.06 * m.peak_tensor_bytes


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_partly_fused_norms_are_walked_norm_by_norm(tmp_path, tiny_model_dir, monkeypatch, dtype):
    """Norms the patch leaves to HF (named in its report) save HF's tensors, the rest the fused kernel's:
    byte-exact against the meter with one block's post-attention norm and the final norm left unfused
    (a copy of LlamaRMSNorm whose source differs, so the patch refuses it; it saves what HF's saves)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from fusedtune.trainer import patches

    class OtherRMSNorm(LlamaRMSNorm):
        def forward(self, hidden_states):
            return LlamaRMSNorm.forward(self, hidden_states)

    original = patches.fuse_rmsnorm
    left = re.compile(r"layers\.1\.post_attention_layernorm$|^model\.norm$")

    def fuse_some(model, backend, report=None):
        for name, module in model.named_modules():
            if left.search(name) and type(module) is LlamaRMSNorm:
                module.__class__ = OtherRMSNorm
        return original(model, backend, report)

    monkeypatch.setattr(patches, "fuse_rmsnorm", fuse_some)
    overrides = ["method=partial", "partial.patterns=[norm]", f"model.dtype={dtype}"]
    cfg = load_config(write_config(tmp_path, tiny_model_dir), overrides)
    m = est_mod.measure(cfg, steps=2, log=lambda *_: None)
    batch, seq, targets, padded = m.batches[m.saved.index]
    e = est_mod.estimate(cfg, on_gpu=False, batch=batch, seq=seq, target_tokens=targets, padded=padded)
    assert e.activation_bytes == m.saved.activations
    monkeypatch.setattr(patches, "fuse_rmsnorm", original)  # all fused: the walk sees the difference
    assert (
        est_mod.estimate(
            cfg, on_gpu=False, batch=batch, seq=seq, target_tokens=targets, padded=padded
        ).activation_bytes
        < e.activation_bytes
    )


@pytest.mark.parametrize(("accum", "micro", "seq"), [(1, 4, 64), (2, 4, 64), (1, 1, 16), (2, 1, 16)])
def test_tied_trainable_head_with_accumulation(tmp_path, accum, micro, seq):
    """A tied head's new gradient waits through the blocks' backward for the embedding's; with gradient
    accumulation it sits beside the earlier micro-batches' .grad (the walk missed it: -3.2% at accum 2).
    With small micro-batches the peak is the embedding's backward itself, where autograd sums the two
    gradients out of place (three vocab x hidden tensors at once; missing that phase: -16%)."""
    from tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tied", tie=True)
    overrides = [
        "method=full",
        f"train.grad_accum={accum}",
        f"train.micro_batch_size={micro}",
        f"data.max_seq_len={seq}",
        f"data.completion_only={'true' if seq > 16 else 'false'}",  # 16 tokens cut the responses off
    ]
    cfg = load_config(write_config(tmp_path, model_dir), overrides)
    m = est_mod.measure(cfg, steps=2, log=lambda *_: None)
    here = est_mod.estimate_for_batches(cfg, m.batches, on_gpu=False)
    assert abs(here.tensor_bytes - m.peak_tensor_bytes) <= 0.02 * m.peak_tensor_bytes, (
        here.tensor_bytes / m.peak_tensor_bytes - 1
    )


def test_head_alone_saves_no_hidden_gradient(tmp_path, tiny_model_dir):
    """Only the (untied) LM head trains: the fused loss keeps its fp32 dW and no dH (nothing below
    needs one), byte-exact against the meter."""
    cfg = load_config(
        write_config(tmp_path, tiny_model_dir), ["method=partial", "partial.patterns=[lm_head]"]
    )
    m = est_mod.measure(cfg, steps=1, log=lambda *_: None)
    batch, seq, targets, padded = m.batches[m.saved.index]
    e = est_mod.estimate(cfg, on_gpu=False, batch=batch, seq=seq, target_tokens=targets, padded=padded)
    assert (e.activation_bytes, e.loss_saved_bytes) == (m.saved.activations, m.saved.loss)


def test_smaller_micro_batches_keep_the_examples_per_step(tmp_path, tiny_model_dir):
    """Only divisors of micro_batch_size are offered, each with the accumulation that keeps exactly the
    examples per optimizer step (micro-batch 5 used to be offered as 2 x 2 = 4)."""
    cfg = load_config(write_config(tmp_path, tiny_model_dir, train={"micro_batch_size": 6, "grad_accum": 2}))
    est = est_mod.estimate(cfg, on_gpu=False)
    offered = [s.split(" (")[0] for s in est_mod.suggestions(cfg, est, budget=2**50) if "micro_batch" in s]
    assert offered == [
        "train.micro_batch_size=3 train.grad_accum=4",
        "train.micro_batch_size=2 train.grad_accum=6",
        "train.micro_batch_size=1 train.grad_accum=12",
    ]


def test_lora_on_the_lm_head_counts_its_saved_input(tmp_path, tiny_model_dir):
    """An adapted lm_head keeps its input (and X Aᵀ) for backward: the estimate said 0 B saved."""
    cfg = load_config(write_config(tmp_path, tiny_model_dir), ["lora.target_modules=[lm_head]"])
    m = est_mod.measure(cfg, steps=1, log=lambda *_: None)
    batch, seq, targets, padded = m.batches[m.saved.index]
    e = est_mod.estimate(cfg, on_gpu=False, batch=batch, seq=seq, target_tokens=targets, padded=padded)
    assert abs(e.activation_bytes - m.saved.activations) <= 0.03 * m.saved.activations
