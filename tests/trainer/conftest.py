"""Trainer fixtures: the tiny model directory, built once per session."""

from __future__ import annotations

import pytest
from tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, hidden-64 Llama with a small BPE tokenizer saved to a temp directory."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_dir_bias(tmp_path_factory):
    """The tiny Llama with biases on attention and MLP Linears (for bias-only partial tuning)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-bias"), with_bias=True)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
