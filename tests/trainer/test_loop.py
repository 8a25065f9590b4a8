"""The loop's arithmetic: token-normalized accumulation, non-finite guard, schedule."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from fusedtune.trainer.adapt import apply_method
from fusedtune.trainer.config import load_config
from fusedtune.trainer.loop import accumulate_gradients, micro_batches_in_step, optimizer_step, total_steps
from fusedtune.trainer.optim import build_optimizer, lr_lambda, trainable_parameters

CPU = torch.device("cpu")


def _batch(ids: torch.Tensor, prompt_lens: list[int], lengths: list[int], pad_id: int = 3):
    """Right-padded batch; labels masked on the prompt and the padding."""
    input_ids = ids.clone()
    labels = ids.clone()
    mask = torch.ones_like(ids)
    for i, (p, n) in enumerate(zip(prompt_lens, lengths)):
        labels[i, :p] = -100
        labels[i, n:] = -100
        input_ids[i, n:] = pad_id
        mask[i, n:] = 0
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _grads(model):
    return {n: p.grad.clone() for n, p in trainable_parameters(model)}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_accumulation_matches_one_big_batch(tiny_model_dir, method):
    """k micro-batches with different target counts == one batch k times the size."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    apply_method(model, load_config(None, [f"method={method}", "kernels=torch", "lora.rank=4"]), CPU)
    for p in model.parameters():  # non-zero B so LoRA A also gets a gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(4, model.config.vocab_size, (4, 16))
    prompts, lengths = [3, 9, 1, 5], [16, 12, 16, 7]  # very different target counts per row
    big = _batch(ids, prompts, lengths)
    micro = [_batch(ids[i : i + 1], prompts[i : i + 1], lengths[i : i + 1]) for i in range(4)]

    loss_big, t_big = accumulate_gradients(model, [big])
    g_big = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_micro, t_micro = accumulate_gradients(model, micro)
    g_micro = _grads(model)

    assert t_big == t_micro == sum(n - p for p, n in zip(prompts, lengths))
    assert loss_micro == pytest.approx(loss_big, rel=1e-12)
    for name in g_big:
        torch.testing.assert_close(g_micro[name], g_big[name], rtol=1e-10, atol=1e-12, msg=name)
    # and the plain mean over micro-batch means would have been different (the test can fail)
    naive = sum(accumulate_gradients(model, [m])[0] for m in micro) / len(micro)
    assert abs(naive - loss_big) > 1e-3


def test_all_masked_step_is_an_error(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(4, model.config.vocab_size, (2, 8))
    batch = _batch(ids, [8, 8], [8, 8])
    with pytest.raises(Exception, match="every label in this optimizer step is masked"):
        accumulate_gradients(model, [batch])


def test_non_finite_gradient_skips_the_update(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = load_config(None, ["kernels=torch", "lora.rank=4", "optim.name=adamw_torch"])
    apply_method(model, cfg, CPU)
    params = [p for _, p in trainable_parameters(model)]
    opt = build_optimizer(model, cfg.optim)
    before = [p.detach().clone() for p in params]
    ids = torch.randint(4, model.config.vocab_size, (2, 8))
    batch = _batch(ids, [2, 2], [8, 8])
    # poison one frozen weight with inf: loss and gradients turn non-finite
    model.model.layers[0].mlp.down_proj.weight.data[0, 0] = math.inf
    result = optimizer_step(model, params, [batch], opt, max_grad_norm=1.0)
    assert result.skipped
    assert all(torch.equal(a, b) for a, b in zip(before, params)), "a skipped step changed the weights"
    assert all(p.grad is None for p in params)
    assert not opt.state, "a skipped step created optimizer state"


def test_schedule_warmup_then_cosine_to_floor():
    cfg = load_config(None, ["optim.warmup_steps=4", "optim.schedule=cosine", "optim.min_lr_ratio=0.1"]).optim
    f = lr_lambda(cfg, total_steps=20)
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(4) == pytest.approx(1.0)
    assert f(19) > 0.1 and f(20) == pytest.approx(0.1)  # the last step still updates; the floor is next
    assert all(f(s) > f(s + 1) for s in range(4, 20))
    lin = lr_lambda(
        load_config(None, ["optim.schedule=linear", "optim.warmup_steps=0"]).optim, total_steps=10
    )
    assert [lin(s) for s in (0, 5, 9, 10)] == pytest.approx([1.0, 0.5, 0.1, 0.0])
    # the embedded default's shape: 24 steps, 3 of warmup; its last step used to run at lr 0
    short = lr_lambda(load_config(None, ["optim.warmup_steps=3"]).optim, total_steps=24)
    assert short(23) > 0


def test_head_at_targets_equals_full_logits_loss(tiny_model_dir):
    """The loss that projects only target positions equals cross-entropy over the full logits."""
    from fusedtune.trainer.loop import loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    ids = torch.randint(4, model.config.vocab_size, (3, 10))
    batch = _batch(ids, [2, 6, 0], [10, 8, 5])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )
    torch.testing.assert_close(loss_sum(model, batch), expected, rtol=1e-12, atol=1e-12)


def test_scaled_logits_take_the_full_head_path():
    """Granite divides its logits by config.logits_scaling: the loss must come from the model's own logits."""
    from tiny import tiny_llama

    from fusedtune.trainer.loss import head_at_targets_supported

    model = tiny_llama(vocab_size=50)
    assert head_at_targets_supported(model)
    model.config.logits_scaling = 8.0
    assert not head_at_targets_supported(model)


def _full_logits_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def _scaled_forward(model, factor):
    """A model whose forward scales its logits after the head, under no config name we know."""
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * factor
        return out

    model.forward = scaled
    return model


class _ScaledHead(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 3.0


@pytest.mark.parametrize("case", ["forward", "head_subclass", "head_hook"])
def test_unknown_logit_transform_takes_the_full_head_path(case):
    """Falcon-H1's lm_head_multiplier, Dory's scaled head, a hook: none is a config name the check knows.
    The probe forward finds them, the loss is the model's own, and the run's line says why."""
    from tiny import tiny_llama

    from fusedtune.trainer.loss import head_report, loss_sum

    model = tiny_llama(vocab_size=50)
    if case == "forward":
        _scaled_forward(model, 0.25)
        why = "changes the LM head's output"
    elif case == "head_subclass":
        head = _ScaledHead(model.config.hidden_size, 50, bias=False, dtype=torch.float64)
        head.weight = model.lm_head.weight
        model.lm_head = head
        why = "_ScaledHead, not a plain Linear"
    else:
        model.lm_head.register_forward_hook(lambda m, a, out: out * 2.0)
        why = "forward hooks"
    batch = _batch(torch.randint(4, 50, (2, 9)), [2, 3], [9, 7])
    assert why in head_report(model) and "full logits" in head_report(model)
    torch.testing.assert_close(
        loss_sum(model, batch), _full_logits_loss(model, batch), rtol=1e-12, atol=1e-12
    )
    assert "fused, at the target positions only" in head_report(tiny_llama(vocab_size=50))


def test_head_probe_follows_a_new_head():
    """The probe's answer is kept per head module: a head swapped in later is probed again."""
    from tiny import tiny_llama

    from fusedtune.trainer.loss import head_at_targets_supported

    model = tiny_llama(vocab_size=50)
    assert head_at_targets_supported(model)
    model.lm_head = _ScaledHead(model.config.hidden_size, 50, bias=False, dtype=torch.float64)
    assert not head_at_targets_supported(model)


@pytest.mark.parametrize(
    ("examples", "micro", "accum", "epochs"),
    [(3, 1, 8, 1.0), (10, 4, 4, 1.0), (100, 4, 8, 1.0), (10, 4, 4, 2.5), (7, 2, 3, 2.0)],
)
def test_epochs_see_each_example_as_often_as_configured(examples, micro, accum, epochs):
    """A run by epochs takes exactly epochs x (micro-batches per epoch) micro-batches: the last optimizer
    step takes only those left, instead of wrapping into one more epoch."""
    cfg = load_config(
        None,
        [
            f"train.micro_batch_size={micro}",
            f"train.grad_accum={accum}",
            f"train.epochs={epochs}",
            "train.max_steps=null",
        ],
    )
    steps = total_steps(cfg, examples)
    taken = [micro_batches_in_step(cfg, examples, step) for step in range(1, steps + 1)]
    assert sum(taken) == math.ceil(epochs * math.ceil(examples / micro))
    assert all(n == accum for n in taken[:-1]) and 1 <= taken[-1] <= accum
    fixed = load_config(None, [f"train.grad_accum={accum}", "train.max_steps=5"])
    assert [micro_batches_in_step(fixed, examples, s) for s in range(1, 6)] == [accum] * 5


def test_a_packed_run_says_what_packing_does(tiny_model_dir, tmp_path, capsys):
    import re

    from tiny import write_alpaca, write_config

    from fusedtune.trainer.cli import main

    data = write_alpaca(tmp_path / "rows12.jsonl", 12)
    cfg = write_config(
        tmp_path,
        tiny_model_dir,
        data={"train": str(data), "packing": True, "max_seq_len": 256},
        train={"max_steps": 2},
    )
    assert main(["run", str(cfg)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("data.packing:"))
    sequences = int(re.search(r"12 examples in (\d+) sequences", line).group(1))
    assert 1 < sequences < 12, line  # several whole examples a sequence
    assert "whole examples each" in line and "attention and positions run on" in line
    # the data line counts the packed sequences' tokens and those that carry loss, as the loss does
    from fusedtune.trainer.config import load_config as load
    from fusedtune.trainer.data import build_datasets, pack
    from fusedtune.trainer.loss import target_tokens
    from fusedtune.trainer.model import load_tokenizer

    conf = load(cfg)
    tok = load_tokenizer(str(tiny_model_dir), conf.model)
    seqs = pack(build_datasets(conf.data, tok, 400).train, 256, tok.eos_token_id)
    labels = [torch.tensor([e.labels]) for e in seqs]
    want = f"({sum(len(e.input_ids) for e in seqs):,} tokens, {sum(target_tokens({'labels': x}) for x in labels):,} of"
    assert want in next(x for x in out.splitlines() if x.startswith("data: ")), out


def test_a_tokenizer_without_eos_is_named(tiny_tokenizer):
    import copy

    from fusedtune.trainer.loop import missing_eos_note

    assert missing_eos_note(tiny_tokenizer, "text") is None
    tok = copy.deepcopy(tiny_tokenizer)
    tok.eos_token = None
    assert tok.eos_token_id is None
    assert "no EOS token" in missing_eos_note(tok, "text")
    assert missing_eos_note(tok, "messages") is None  # the chat template's end of turn ends them
    assert missing_eos_note(tok, "alpaca") is None  # rendered with the chat template too
    tok.chat_template = None
    assert "alpaca examples end without one" in missing_eos_note(tok, "alpaca")
