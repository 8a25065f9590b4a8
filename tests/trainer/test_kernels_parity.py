"""Training parity: ``kernels: triton`` (the fused kernels; under Triton's interpreter on CPU) and
``kernels: torch`` (the pure-torch reference path) give the same losses over 20 steps."""

from __future__ import annotations

import json

import pytest
from tiny import write_config

from fusedtune.trainer.cli import main


def _losses(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


# 20 steps for LoRA, as the issue asks; QLoRA's interpreted decode is slower, so fewer steps.
STEPS = {"lora": 20, "qlora": 8}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_triton_and_torch_paths_train_identically(tiny_model_dir, tmp_path, capsys, method):
    losses = {}
    for kernels in ("torch", "triton"):
        (tmp_path / kernels).mkdir()
        cfg = write_config(
            tmp_path / kernels,
            tiny_model_dir,
            method=method,
            kernels=kernels,
            train={"max_steps": STEPS[method], "micro_batch_size": 4, "log_every": 1, "progress": False},
            optim={"name": "adamw_torch", "lr": 5e-3},
        )
        assert main(["run", str(cfg)]) == 0
        out = capsys.readouterr().out
        if kernels == "triton":
            assert "14/14 adapted layers on the fused Triton path" in out
        else:
            assert "0/14 adapted layers on the fused Triton path" in out
        losses[kernels] = _losses(tmp_path / kernels / "run")
    assert len(losses["torch"]) == STEPS[method]
    assert losses["torch"][-1] < losses["torch"][0]
    # fp32 tolerance, step by step: the two paths differ only in summation order
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-4, abs=1e-5)
