"""A training step keeps the GPU fed: no tensor is built from host data inside it (on a GPU each would be
a host-to-device copy that waits for the stream) and the host reads device values only a fixed few times.

Counted op by op with a ``TorchDispatchMode`` on the CPU, where the same Python runs. The step's host reads
are: the packable check (2), the target count, transformers' packed-sequence check, the loss, the
gradient norm and the token count.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoTokenizer

from fusedtune.trainer.adapt import apply_method
from fusedtune.trainer.config import load_config
from fusedtune.trainer.data import build_datasets
from fusedtune.trainer.loop import micro_batch_stream, optimizer_step
from fusedtune.trainer.model import load_model
from fusedtune.trainer.optim import build_optimizer, trainable_parameters
from fusedtune.trainer.patches import apply_patches

HOST_READS = ("_local_scalar_dense", "is_nonzero", "nonzero")
MAX_HOST_READS = 8


class _Counter(TorchDispatchMode):
    """Ops by name; ``.item()`` of a tensor that ``randint`` just drew on the host (the fused kernels'
    dropout seed, from torch's CPU generator) is a host value on a GPU too and is not counted."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self._host_draws: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        out = func(*args, **(kwargs or {}))
        if name == "randint":
            self._host_draws.add(id(out))
        elif not (name == "_local_scalar_dense" and id(args[0]) in self._host_draws):
            self.ops[name] += 1
        return out


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_step_builds_no_host_tensors_and_reads_back_little(tiny_model_dir, tmp_path, method, kernels):
    from tiny import write_config

    cfg = load_config(
        write_config(tmp_path, tiny_model_dir, method=method, kernels=kernels), ["lora.dropout=0.1"]
    )
    device = torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = build_datasets(cfg.data, tokenizer, len(tokenizer))
    model, _ = load_model(cfg.model.name_or_path, cfg.model, device)
    report = apply_method(model, cfg, device)
    apply_patches(model, cfg.train.padding_free, cfg.data.max_seq_len, report.backend)
    model.train()
    params = [p for _, p in trainable_parameters(model)]
    optimizer = build_optimizer(model, cfg.optim)
    stream = micro_batch_stream(data.train, 4, 0, tokenizer.pad_token_id, device)
    optimizer_step(model, params, [next(stream)], optimizer, 1.0, report.backend)  # first-call caches
    batch = next(stream)
    counter = _Counter()
    with counter:
        optimizer_step(model, params, [batch], optimizer, 1.0, report.backend)
    assert counter.ops["lift_fresh"] == 0, "a tensor was built from host data inside the step"
    reads = sum(counter.ops[name] for name in HOST_READS)
    assert 0 < reads <= MAX_HOST_READS, dict(counter.ops)
