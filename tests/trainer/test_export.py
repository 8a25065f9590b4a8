"""``trainer export``: a run as a standalone model directory, checked against PEFT and transformers.

The reference for lora/qlora is PEFT's own unmerged model (the base in the run's dtype, unquantized,
with the saved adapter); for full/partial it is the base with the trained tensors copied in. The
exported directory must load with plain ``AutoModelForCausalLM`` and give the reference's logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import write_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusedtune.trainer.cli import main

IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with lm_head tied to embed_tokens (as SmolLM2's)."""
    from tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tied") / "model"
    build_tiny_model(path, tie=True)
    return path


def _train(tmp_path: Path, model_dir: Path, *overrides: str) -> Path:
    cfg = write_config(tmp_path, model_dir, train={"max_steps": 3, "micro_batch_size": 4})
    assert main(["run", str(cfg), *overrides]) == 0
    return tmp_path / "run"


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=lora"],
        ["method=qlora"],
        # a head tied to embed_tokens: the head's adapter must not change the embeddings
        ["method=lora", "lora.target_modules=[q_proj, lm_head]", "tied"],
        ["method=qlora", "tied"],
    ],
    ids=["lora", "qlora", "lora-on-tied-head", "qlora-tied"],
)
def test_adapter_runs_export_merged_with_peft_unmerged_logits(
    tiny_model_dir, tied_model_dir, tmp_path, overrides, capsys
):
    from peft import PeftModel

    model_dir = tied_model_dir if "tied" in overrides else tiny_model_dir
    run = _train(tmp_path, model_dir, *(o for o in overrides if o != "tied"))
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    assert "merged into the" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert exported.config.use_cache and not hasattr(exported, "peft_config")
    assert AutoTokenizer.from_pretrained(tmp_path / "out").pad_token is not None

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = _logits(base)
    reference = _logits(PeftModel.from_pretrained(base, str(run)))
    torch.testing.assert_close(_logits(exported), reference, rtol=1e-5, atol=1e-5)
    assert (reference - before).abs().max() > 1e-3  # the adapter moved the logits: the check can fail
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert torch.equal(exported.get_input_embeddings().weight, original.get_input_embeddings().weight)


@pytest.mark.parametrize(("patterns", "tied"), [("[norm]", False), ("[norm, lm_head]", True)])
def test_partial_runs_export_the_trained_tensors_into_the_base(
    tiny_model_dir, tied_model_dir, tmp_path, patterns, tied
):
    """Only the trained tensors change, exactly (with lm_head tied to the embeddings, the one saved
    tensor is both, and stays both)."""
    model_dir = tied_model_dir if tied else tiny_model_dir
    run = _train(tmp_path, model_dir, "method=partial", f"partial.patterns={patterns}")
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trained = load_file(run / "trainable.safetensors")
    assert trained
    got, orig = dict(exported.named_parameters()), dict(base.named_parameters())
    for name, p in got.items():
        expected = trained.get(name, orig[name])
        assert torch.equal(p.detach(), expected), name
    assert any(not torch.equal(trained[n], orig[n]) for n in trained)
    assert exported.config.tie_word_embeddings == base.config.tie_word_embeddings == tied
    assert (exported.lm_head.weight is exported.get_input_embeddings().weight) == tied


def test_export_dtype_option(tiny_model_dir, tmp_path):
    run = _train(tmp_path, tiny_model_dir)
    assert main(["export", str(run), str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert {p.dtype for p in exported.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("out_exists", [False, True])
def test_a_failed_write_leaves_no_half_written_model(tiny_model_dir, tmp_path, monkeypatch, out_exists):
    """save_pretrained failing halfway (an error of any kind, not only OSError): the output folder is
    as it was, absent or empty, so the same command can run again."""
    from transformers import PreTrainedModel

    run = _train(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    real = PreTrainedModel.save_pretrained

    def half(self, path, *args, **kwargs):
        self.config.save_pretrained(path)  # config.json written, then the weights fail
        raise NotImplementedError("weights cannot be written")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half)
    with pytest.raises(NotImplementedError):
        main(["export", str(run), str(out)])
    assert (out.is_dir() and not any(out.iterdir())) if out_exists else not out.exists()
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    assert main(["export", str(run), str(out)]) == 0


def test_bad_export_arguments_get_one_line(tiny_model_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: export: {tmp_path / 'nowhere'} does not exist (a `trainer run` output directory)"
    )
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: export: {tmp_path / 'empty'} holds no config.yaml: not a trainer run directory"
    )
    run = _train(tmp_path, tiny_model_dir)
    capsys.readouterr()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["export", str(run), str(busy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: export: {busy} exists and is not an empty directory; choose a new one"
    assert (busy / "keep.txt").read_text() == "x"
    (tmp_path / "train.jsonl").unlink()  # the run's data are not needed
    blocked = tmp_path / "file"
    blocked.write_text("x")
    assert main(["export", str(run), str(blocked / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: export: cannot write {blocked / 'out'}: "), err
    (run / "adapter_model.safetensors").unlink()
    assert main(["export", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: export: {run} has no adapter_model.safetensors: the run has not finished")
    assert not (tmp_path / "out").exists()


def test_export_finds_a_moved_base_with_the_base_option(tmp_path, capsys):
    """The run names its base by path: once that moved, export says so in one line and --base finds it."""
    from tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "base")
    run = _train(tmp_path, base)
    moved = base.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(base) in err, err
    assert err.endswith("if the base model moved, pass its new place with --base PATH"), err
    assert not (tmp_path / "out").exists()
    assert main(["export", str(run), str(tmp_path / "out"), "--base", str(moved)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    reference = AutoModelForCausalLM.from_pretrained(moved)
    from peft import PeftModel

    reference = PeftModel.from_pretrained(reference, str(run))
    torch.testing.assert_close(_logits(exported), _logits(reference), rtol=1e-5, atol=1e-5)
    assert main(["export", str(run), str(tmp_path / "out2"), "--base", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path / "nowhere") in err and "--base" not in err, err


@pytest.mark.parametrize("method", ["lora", "partial"])
def test_export_refuses_a_base_that_is_not_the_runs(tmp_path, capsys, method):
    """--base pointing at another model (here one block more) is refused in one line, nothing written:
    the run recorded its base's parameters (base_model.json), and export compares. Before that record,
    an adapter checks itself against the base: every tensor it holds must find its layer, and every layer
    PEFT adapts must find its tensors."""
    from tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "base")
    other = build_tiny_model(tmp_path / "other", num_hidden_layers=3)
    extra = ["method=partial", "partial.patterns=[norm]"] if method == "partial" else []
    run = _train(tmp_path, base, *extra)
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "out"), "--base", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: export: {other} is not the base model the run trained on (its parameters: 9 extra "
        "(model.layers.2.self_attn.q_proj.weight and 8 more); the run's base_model.json)"
    )
    assert not (tmp_path / "out").exists()
    # the same architecture, other weights (another seed: as a base model is to its instruct version)
    twin = build_tiny_model(tmp_path / "twin", seed=1)
    assert main(["export", str(run), str(tmp_path / "out"), "--base", str(twin)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"error: export: {twin} is not the base model the run trained on (its weights: "
        "model.embed_tokens.weight starts ["
    ), err
    assert not (tmp_path / "out").exists()
    if method == "lora":
        (run / "base_model.json").unlink()  # a run from before the record
        assert main(["export", str(run), str(tmp_path / "out"), "--base", str(other)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"error: export: {run / 'adapter_model.safetensors'} does not fit the base model: 14 adapted base "
            "tensors have nothing in it (base_model.model.model.layers.2.mlp.down_proj.lora_A.weight)"
        )
    assert main(["export", str(run), str(tmp_path / "out"), "--base", str(base)]) == 0  # its own base: fine
