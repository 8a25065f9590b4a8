"""Held-out loss (token-weighted, against the model's own loss) and task accuracy by generation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from fusedtune.trainer.config import DataConfig
from fusedtune.trainer.data import Example, build_datasets, collate
from fusedtune.trainer.evaluate import heldout_loss, task_accuracy
from fusedtune.trainer.tasks import get_task


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _examples(vocab: int) -> list[Example]:
    """Examples of different lengths and target counts (so a per-example mean would differ)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, (length, prompt) in enumerate([(12, 3), (5, 1), (20, 17), (9, 0), (16, 8)]):
        ids = torch.randint(4, vocab, (length,), generator=gen).tolist()
        out.append(Example(ids, [-100] * prompt + ids[prompt:], f"ex#{i}"))
    return out


def test_heldout_loss_equals_the_models_own_loss_on_one_batch(tiny_model):
    examples = _examples(tiny_model.config.vocab_size)
    batch = collate(examples, pad_id=3)
    with torch.no_grad():
        expected = tiny_model(**batch).loss.item()  # HF: mean over every shifted target token
    assert heldout_loss(tiny_model, examples, micro_batch_size=len(examples), pad_id=3) == pytest.approx(
        expected, rel=1e-5
    )


def test_heldout_loss_is_token_weighted_across_micro_batches(tiny_model):
    examples = _examples(tiny_model.config.vocab_size)
    sums, counts = [], []
    with torch.no_grad():
        for e in examples:  # one at a time, no padding at all
            targets = sum(label != -100 for label in e.labels[1:])
            loss = tiny_model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
            sums.append(loss.item() * targets)
            counts.append(targets)
    expected = sum(sums) / sum(counts)
    per_example_mean = sum(s / c for s, c in zip(sums, counts)) / len(sums)
    assert abs(per_example_mean - expected) > 1e-3  # the weighting matters for this data
    for micro_batch_size in (1, 2, 3):
        got = heldout_loss(tiny_model, examples, micro_batch_size=micro_batch_size, pad_id=3)
        assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_heldout_loss_restores_mode_and_keeps_no_graph(tiny_model, training):
    tiny_model.train(training)
    loss = heldout_loss(tiny_model, _examples(tiny_model.config.vocab_size), 2, pad_id=3)
    assert isinstance(loss, float) and math.isfinite(loss)
    assert tiny_model.training is training
    assert all(p.grad is None for p in tiny_model.parameters())
    assert math.isnan(heldout_loss(tiny_model, [], 2, pad_id=3))


def test_task_accuracy_on_the_tiny_model(tiny_model, tiny_tokenizer):
    _, rows = get_task("dates").split(num_train=1, num_eval=5, seed=0)
    tiny_model.train()
    tiny_tokenizer.padding_side = "right"
    accuracy, samples = task_accuracy(
        tiny_model, tiny_tokenizer, rows, get_task("dates"), batch_size=3, max_new_tokens=6, num_samples=5
    )
    assert 0.0 <= accuracy <= 1.0
    assert len(samples) == 5
    for sample, row in zip(samples, rows):
        assert set(sample) == {"source", "prompt", "completion", "answer", "correct"}
        assert sample["answer"] == row["answer"]
        assert sample["prompt"] == row["messages"][0]["content"]
        assert isinstance(sample["completion"], str)
        assert sample["correct"] == get_task("dates").score(row, sample["completion"])
    assert accuracy == sum(s["correct"] for s in samples) / 5
    assert tiny_model.training and tiny_tokenizer.padding_side == "right"


def test_task_accuracy_counts_forced_answers(tiny_model, tiny_tokenizer, monkeypatch):
    """Generation forced to answer right on even rows: accuracy is exactly the share of even rows."""
    task = get_task("dates")
    _, rows = task.split(num_train=1, num_eval=7, seed=1)
    by_prompt = {
        tiny_tokenizer.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True): (
            i,
            r,
        )
        for i, r in enumerate(rows)
    }
    seen = []

    def fake_generate(input_ids, attention_mask, generation_config, **kwargs):
        assert tiny_tokenizer.padding_side == "left"
        assert bool(attention_mask[:, -1].all()), "prompts must be left-padded"
        assert generation_config.do_sample is False
        outputs = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = tiny_tokenizer.decode(ids[mask.bool()])
            i, row = by_prompt[prompt]
            seen.append(i)
            text = row["answer"] if i % 2 == 0 else "1999-99-99"
            outputs.append(tiny_tokenizer(text + "<|im_end|>", add_special_tokens=False).input_ids)
        width = max(map(len, outputs))
        pad = tiny_tokenizer.pad_token_id
        new = torch.tensor([o + [pad] * (width - len(o)) for o in outputs])
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(tiny_model, "generate", fake_generate)
    accuracy, samples = task_accuracy(tiny_model, tiny_tokenizer, rows, task, batch_size=3, num_samples=7)
    assert sorted(seen) == list(range(7))
    assert accuracy == pytest.approx(4 / 7)
    assert [s["correct"] for s in samples] == [i % 2 == 0 for i in range(7)]
    assert samples[0]["completion"] == rows[0]["answer"]
    assert tiny_tokenizer.padding_side == "right"


def test_task_accuracy_on_built_datasets_rows(tiny_model, tiny_tokenizer):
    """The loop's call: rows straight from build_datasets."""
    data = build_datasets(DataConfig(task="dates", num_train=2, num_eval=5), tiny_tokenizer, 400)
    accuracy, samples = task_accuracy(tiny_model, tiny_tokenizer, data.eval_rows, data.task, max_new_tokens=4)
    assert 0.0 <= accuracy <= 1.0 and len(samples) == 4  # the default num_samples
    assert math.isnan(task_accuracy(tiny_model, tiny_tokenizer, [], data.task)[0])


def test_generation_hands_the_head_a_contiguous_input(tiny_model, tiny_tokenizer, monkeypatch):
    """generate gives the LM head a strided slice of the hidden states, over which torch's CPU bf16 linear
    broadcasts the weight (one copy per prompt): task_accuracy makes it contiguous, and leaves no hook."""
    _, rows = get_task("dates").split(num_train=1, num_eval=4, seed=0)
    head = tiny_model.get_output_embeddings()
    hooks_before = len(head._forward_pre_hooks)
    hf_gives, head_gets = [], []
    spy = head.register_forward_pre_hook(lambda m, a: hf_gives.append(a[0].is_contiguous()))  # runs first
    forward = head.forward
    monkeypatch.setattr(head, "forward", lambda x: head_gets.append(x.is_contiguous()) or forward(x))
    try:
        task_accuracy(tiny_model, tiny_tokenizer, rows, get_task("dates"), batch_size=4, max_new_tokens=3)
    finally:
        spy.remove()
    assert hf_gives and not all(hf_gives)  # what generate hands over (else this test proves nothing)
    assert len(head_gets) == len(hf_gives) and all(head_gets)
    assert len(head._forward_pre_hooks) == hooks_before
