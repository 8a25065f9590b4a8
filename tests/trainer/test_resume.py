"""Checkpoints, exact resume and faults on the tiny model.

A run of N optimizer steps straight and one stopped after k steps then resumed end with bit-identical
trainable tensors and optimizer state, the same logged losses and the same data order. The stops are
chosen against the data layout: 20 examples, micro-batch 3, grad_accum 2, so an epoch is 7 micro-batches
(the last one of 2 examples) and an accumulation group (6 examples) straddles each epoch boundary:
stop 3 saves at (epoch 0, offset 18), mid-epoch; stop 4 saves at (epoch 1, offset 3), just after a group
that spanned two epochs, at an offset that is not a multiple of the group size. Checkpoints are written
only at optimizer-step boundaries (a signal lets the current step finish), so no checkpoint holds
half-accumulated gradients.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import write_alpaca, write_config

from fusedtune.trainer import checkpoint, loop
from fusedtune.trainer.checkpoint import (
    FAULT_ENV,
    CheckpointError,
    latest_checkpoint,
    read_checkpoint,
    save_checkpoint,
    valid_checkpoints,
)
from fusedtune.trainer.cli import main
from fusedtune.trainer.config import load_config

STEPS = 6


def _config(tmp: Path, model_dir: Path, method: str, optim: str, **train) -> Path:
    """``method`` may carry a dtype: ``full-bf16`` (bf16 weights, updated through fp32 master copies)."""
    tmp.mkdir(parents=True, exist_ok=True)
    method, _, dtype = method.partition("-")
    extra: dict = {"model": {"dtype": dtype or "fp32"}}
    if method == "partial":
        extra["partial"] = {"patterns": ["norm"]}
    return write_config(
        tmp,
        model_dir,
        method=method,
        lora={"rank": 4, "alpha": 8, "dropout": 0.1},  # dropout: the RNG state must come back too
        data={"train": str(write_alpaca(tmp / "train20.jsonl", 20, seed=3)), "eval": None},  # no eval: faster
        optim={"name": optim, "lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.01},
        train={"max_steps": STEPS, "micro_batch_size": 3, "grad_accum": 2, "save_every": None, **train},
        **extra,
    )


def _run(
    cfg_path: Path, monkeypatch, stop_at: int | None = None, overrides=()
) -> tuple[loop.RunResult, list]:
    """One in-process run; returns its result and the sample ids of every training micro-batch."""
    seen: list[list[str]] = []
    real = loop.collate

    def recording_collate(chunk, pad_id):
        seen.append([e.source.rsplit("/", 1)[-1] for e in chunk])  # file:line
        return real(chunk, pad_id)

    monkeypatch.setattr(loop, "collate", recording_collate)
    result = loop.run(
        load_config(cfg_path, list(overrides)), log=lambda *_: None, should_stop=lambda s: s == stop_at
    )
    monkeypatch.setattr(loop, "collate", real)
    return result, seen


def _train_records(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    for name in ("trainable", "optimizer", "rng"):
        ta, tb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert ta.keys() == tb.keys(), name
        for key in ta:
            assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), f"{name}: {key} differs"
    assert json.loads((a / "optimizer.json").read_text()) == json.loads((b / "optimizer.json").read_text())
    sa, sb = json.loads((a / "state.json").read_text()), json.loads((b / "state.json").read_text())
    for key in ("step", "data", "scheduler", "rng", "skipped_steps", "first_loss", "last_loss"):
        assert sa[key] == sb[key], key


_STRAIGHT: dict[tuple[str, str], tuple[Path, list]] = {}


def _straight(tmp_path_factory, model_dir, method, optim, monkeypatch) -> tuple[Path, list]:
    """The uninterrupted run of a (method, optimizer), once per session."""
    if (method, optim) not in _STRAIGHT:
        tmp = tmp_path_factory.mktemp(f"straight-{method}-{optim}")
        result, seen = _run(_config(tmp, model_dir, method, optim), monkeypatch)
        assert not result.stopped and result.steps == STEPS
        _STRAIGHT[method, optim] = (Path(result.output_dir), seen)
    return _STRAIGHT[method, optim]


EXACT_CASES = [
    ("lora", "adamw8bit", 3),
    ("lora", "adamw8bit", 4),
    ("lora", "paged_adamw8bit", 3),
    ("lora", "adamw32bit", 4),
    ("lora", "adamw_torch", 3),
    ("qlora", "adamw8bit", 4),
    ("full", "adamw8bit", 3),
    ("partial", "adamw_torch", 4),
    ("full-bf16", "adamw8bit", 3),  # the fp32 master copies come back from the checkpoint, not rounded
    ("partial-bf16", "adamw_torch", 4),
]


@pytest.mark.parametrize(("method", "optim", "stop"), EXACT_CASES)
def test_stop_and_resume_is_bit_identical(
    tiny_model_dir, tmp_path, tmp_path_factory, monkeypatch, method, optim, stop
):
    straight_dir, straight_seen = _straight(tmp_path_factory, tiny_model_dir, method, optim, monkeypatch)
    cfg = _config(tmp_path, tiny_model_dir, method, optim)
    first, seen1 = _run(cfg, monkeypatch, stop_at=stop)
    assert first.stopped and first.steps == stop
    saved = read_checkpoint(tmp_path / "run" / "checkpoints" / f"step-{stop}")
    # the position the stop left: mid-epoch (stop 3) or just past a group that spanned two epochs (stop 4)
    assert saved.state["data"] == {3: {"epoch": 0, "offset": 18}, 4: {"epoch": 1, "offset": 3}}[stop] | {
        "examples": 20
    }
    second, seen2 = _run(cfg, monkeypatch, overrides=["resume=auto"])
    assert second.resumed_from == str(saved.path) and not second.stopped

    assert seen1 + seen2 == straight_seen, "the resumed run saw the data in another order"
    assert _train_records(tmp_path / "run") == _train_records(straight_dir)
    _assert_same_checkpoint(
        tmp_path / "run" / "checkpoints" / f"step-{STEPS}", straight_dir / "checkpoints" / f"step-{STEPS}"
    )
    if method.endswith("-bf16"):  # the checkpoint holds the fp32 copies, the output the bf16 weights
        ckpt = load_file(straight_dir / "checkpoints" / f"step-{STEPS}" / "trainable.safetensors")
        final = load_file(straight_dir / "trainable.safetensors")
        assert {t.dtype for t in ckpt.values()} == {torch.float32}
        assert {t.dtype for t in final.values()} == {torch.bfloat16}
        assert all(torch.equal(final[k], ckpt[k].to(torch.bfloat16)) for k in final)
        assert any(not torch.equal(final[k].float(), ckpt[k]) for k in final)  # the copies hold more
    out = "adapter_model" if method in ("lora", "qlora") else "trainable"
    a, b = load_file(tmp_path / "run" / f"{out}.safetensors"), load_file(straight_dir / f"{out}.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b) and a.keys() == b.keys()


def test_resume_differs_without_the_saved_rng(tiny_model_dir, tmp_path, tmp_path_factory, monkeypatch):
    """The comparison above can fail: resuming with a wrong dropout RNG gives other weights."""
    straight_dir, _ = _straight(tmp_path_factory, tiny_model_dir, "lora", "adamw8bit", monkeypatch)
    cfg = _config(tmp_path, tiny_model_dir, "lora", "adamw8bit")
    _run(cfg, monkeypatch, stop_at=3)
    monkeypatch.setattr(loop, "set_rng_state", lambda *a: None)
    _run(cfg, monkeypatch, overrides=["resume=auto"])
    with pytest.raises(AssertionError, match="differs"):
        _assert_same_checkpoint(
            tmp_path / "run" / "checkpoints" / "step-6", straight_dir / "checkpoints" / "step-6"
        )


# ---------------------------------------------------------------------------------------------------
# The checkpoint directory: atomic write, manifest, rotation, disk full
# ---------------------------------------------------------------------------------------------------


def _small_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def _step(model, opt, sched, width: int = 8):
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def test_manifest_rotation_and_skipping_broken_checkpoints(tmp_path, monkeypatch):
    model, opt, sched = _small_state()
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _step(model, opt, sched)
        save_checkpoint(root, step, model, opt, sched, {"config": {}}, keep_last=2)
    assert [p.name for p in valid_checkpoints(root)] == ["step-2", "step-3"]  # rotated; newest kept
    (root / ".tmp-step-4-99").mkdir()  # an interrupted write elsewhere: never a candidate
    assert latest_checkpoint(root) == root / "step-3"

    blob = bytearray((root / "step-3" / "trainable.safetensors").read_bytes())
    blob[-1] ^= 1  # same size, one bit flipped
    (root / "step-3" / "trainable.safetensors").write_bytes(bytes(blob))
    messages: list[str] = []
    assert latest_checkpoint(root, messages.append) == root / "step-2"
    assert "step-3" in messages[0] and "sha256" in messages[0]
    (root / "step-2" / "manifest.json").unlink()
    messages.clear()
    assert latest_checkpoint(root, messages.append) is None
    assert "no manifest.json" in messages[1]

    # disk full in the middle of a write: one clear error, the earlier checkpoint untouched
    model, opt, sched = _small_state()
    root = tmp_path / "again"
    save_checkpoint(root, 1, model, opt, sched, {"config": {}}, keep_last=1)
    monkeypatch.setenv(FAULT_ENV, "2:optimizer.json:enospc")
    with pytest.raises(CheckpointError, match=r"No space left on device.*step-1 is intact"):
        save_checkpoint(root, 2, model, opt, sched, {"config": {}}, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]
    assert latest_checkpoint(root) == root / "step-1"


def test_optimizer_state_round_trip_through_json_and_safetensors(tmp_path):
    """bitsandbytes 8-bit state (uint8 moments, qmaps, absmax) comes back exactly, no pickle."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.LayerNorm(64))
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    for _ in range(2):
        _step(model, opt, sched, width=128)
    path = save_checkpoint(tmp_path, 2, model, opt, sched, {"config": {}}, keep_last=1)
    restored = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    restored.load_state_dict(read_checkpoint(path).optimizer_state())
    before, after = opt.state_dict(), restored.state_dict()
    key = "__bnb_optimizer_quant_state__"
    assert set(before["state"][0][key]) >= {"state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"}
    for i, st in before["state"].items():
        for name, t in st[key].items():
            assert torch.equal(after["state"][i][key][name], t), name
        assert after["state"][i]["step"] == st["step"]
    assert after["param_groups"] == before["param_groups"]


# ---------------------------------------------------------------------------------------------------
# Faults through the CLI
# ---------------------------------------------------------------------------------------------------


def _cli(cfg: Path, *overrides: str, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if fault:
        env[FAULT_ENV] = fault
    code = "import sys; from fusedtune.trainer.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-P", "-c", code, "run", str(cfg), *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_9_before_the_manifest_keeps_the_previous_checkpoint(
    tiny_model_dir, tmp_path, tmp_path_factory, monkeypatch, capsys
):
    straight_dir, _ = _straight(tmp_path_factory, tiny_model_dir, "lora", "adamw8bit", monkeypatch)
    cfg = _config(tmp_path, tiny_model_dir, "lora", "adamw8bit", save_every=2)
    proc = _cli(cfg, fault="4:renamed:kill")  # step-4 renamed into place, its manifest not yet written
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    root = tmp_path / "run" / "checkpoints"
    assert (root / "step-4").is_dir() and not (root / "step-4" / "manifest.json").exists()
    assert main(["run", str(cfg), "resume=auto"]) == 0
    out = capsys.readouterr().out
    assert f"skipping {root / 'step-4'}: no manifest.json" in out
    assert f"continuing from {root / 'step-2'} at step 2" in out
    _assert_same_checkpoint(root / f"step-{STEPS}", straight_dir / "checkpoints" / f"step-{STEPS}")


def test_second_signal_inside_the_first_handler_still_exits(monkeypatch):
    """A second signal whose handler runs nested inside the first one (Python may run it between any two
    bytecodes of the first) must count as the second. A check-then-set on the request would see both as
    the first, and the run would sleep on through a double Ctrl-C (as CI once saw)."""

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    request = loop.StopRequest()
    nested = []
    real_signals = signal.Signals

    def signals_with_a_nested_signal(signum):
        if not nested:  # the first handler's first lookup: the second signal lands right here
            nested.append(True)
            with pytest.raises(Exited) as exited:
                request.handle(signal.SIGINT, None)
            nested.append(exited.value.args[0])
        return real_signals(signum)

    monkeypatch.setattr(loop.os, "_exit", fake_exit)
    monkeypatch.setattr(loop.signal, "Signals", signals_with_a_nested_signal)
    request.handle(signal.SIGTERM, None)
    assert nested == [True, 128 + signal.SIGINT]
    assert request.signum == signal.SIGTERM and request()


def test_second_signal_exits_at_once_mid_write(
    tiny_model_dir, tmp_path, tmp_path_factory, monkeypatch, capsys
):
    straight_dir, _ = _straight(tmp_path_factory, tiny_model_dir, "lora", "adamw8bit", monkeypatch)
    cfg = _config(tmp_path, tiny_model_dir, "lora", "adamw8bit", save_every=2)
    proc = _cli(cfg, fault="4:trainable.safetensors:sleep")  # hangs inside the step-4 write
    root = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(root.glob(".tmp-step-4-*/trainable.safetensors")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # The first signal asks for a stop after the step (the write goes on); the second exits at once.
    # Python runs pending handlers in signal-number order, so either may count as the first; and when
    # the kernel hands one of them to another thread, its handler can run inside the first one's,
    # before that has printed its line (test_sigterm_finishes_the_step... checks that line alone).
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM), err
    assert "again: exiting now; checkpoints already written are kept" in err and "Traceback" not in err
    assert [p.name for p in valid_checkpoints(root)] == ["step-2"]  # the half-written step-4 is no checkpoint
    assert main(["run", str(cfg), "resume=auto"]) == 0
    assert f"continuing from {root / 'step-2'}" in capsys.readouterr().out
    _assert_same_checkpoint(root / f"step-{STEPS}", straight_dir / "checkpoints" / f"step-{STEPS}")
    assert not list(root.glob(".tmp-*")), "the stale temp dir was not cleaned up"


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tiny_model_dir, tmp_path):
    cfg = _config(tmp_path, tiny_model_dir, "lora", "adamw8bit", save_every=2)
    proc = _cli(cfg, "train.log_every=1", fault="2:state.json:sigterm")  # a real SIGTERM, sent at step 2
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: finishing the current optimizer step" in err and "Traceback" not in err
    assert f"to continue: trainer run {cfg} train.log_every=1 resume=auto" in err
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in valid_checkpoints(root, verify=True)] == ["step-2", "step-3"]
    assert [s for s, _ in _train_records(tmp_path / "run")] == [1, 2, 3]


def test_non_finite_abort_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path, capsys):
    # lr 1e30: step 1 is finite and blows the weights up; every later step is non-finite and skipped
    cfg = _config(tmp_path, tiny_model_dir, "lora", "adamw_torch", save_every=1, keep_last=1)
    code = main(
        ["run", str(cfg), "optim.lr=1e30", "optim.warmup_steps=0", "train.max_consecutive_nonfinite=2"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 3 and err.startswith("error: train.max_consecutive_nonfinite") and "\n" not in err, err
    root = tmp_path / "run" / "checkpoints"
    assert f"the last good checkpoint is {root / 'step-2'}" in err
    ckpt = read_checkpoint(latest_checkpoint(root))
    assert ckpt.step == 2 and ckpt.state["skipped_steps"] == 1  # step 3 (the abort) wrote nothing


def test_out_of_memory_names_the_breakdown_and_the_fix(tiny_model_dir, tmp_path, monkeypatch, capsys):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "optimizer_step", oom)
    cfg = _config(tmp_path, tiny_model_dir, "lora", "adamw_torch")
    assert main(["run", str(cfg)]) == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: out of memory") and "\n" not in err, err
    for fragment in (
        "trainable",
        "frozen",
        "optimizer state",
        "train.micro_batch_size=1 with train.grad_accum=4",
    ):
        assert fragment in err, fragment
    assert "master weights" not in err


@pytest.mark.parametrize("where", ["step", "copies", "measure"])
def test_out_of_memory_with_master_weights_names_them_and_the_fix(
    tiny_model_dir, tmp_path, monkeypatch, capsys, where
):
    """bf16 full: out of memory in a step, while the fp32 copies are made (they double the trainable
    bytes), or in `trainer estimate --measure`: one line naming the copies and optim.master_weights=false."""
    from fusedtune.trainer import optim

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    target = {"step": (loop, "optimizer_step"), "copies": (optim.MasterWeights, "__init__")}
    target["measure"] = (loop, "accumulate_gradients")
    monkeypatch.setattr(*target[where], oom)
    cfg = _config(tmp_path, tiny_model_dir, "full-bf16", "adamw8bit")
    command = ["estimate", str(cfg), "--measure"] if where == "measure" else ["run", str(cfg)]
    assert main(command) == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: out of memory") and "\n" not in err, err
    assert "fp32 master weights 489.2 KiB" in err and "optim.master_weights=false" in err, err


def test_resume_refuses_a_changed_config_unless_allowed(tiny_model_dir, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_model_dir, "lora", "adamw8bit", max_steps=2)
    assert main(["run", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["run", str(cfg), "resume=auto", "optim.lr=0.5", "train.log_every=2"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.01 -> 0.5" in err and "log_every" not in err and "resume_allow_config_changes" in err
    assert main(["run", str(cfg), "resume=auto", "optim.lr=0.5", "resume_allow_config_changes=true"]) == 0
    assert "config differs from the checkpoint's (allowed): optim.lr" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# Config changes on resume, timelines, finished runs, other directories
# ---------------------------------------------------------------------------------------------------


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (what "left as it was" compares)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _train_lrs(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if r["kind"] == "train"}


def test_resume_takes_the_changed_optimizer_hyperparameters(tiny_model_dir, tmp_path, monkeypatch):
    """An allowed change of optim.lr / weight_decay / betas acts from the first resumed step (the saved
    param groups and scheduler must not bring the old values back); the moments are kept."""
    new = ["optim.lr=0.001", "optim.weight_decay=0.1", "optim.betas=[0.8, 0.9]"]
    cfg = _config(tmp_path / "a", tiny_model_dir, "lora", "adamw_torch")
    _run(cfg, monkeypatch, stop_at=3)
    resumed, _ = _run(cfg, monkeypatch, overrides=["resume=auto", "resume_allow_config_changes=true", *new])
    assert resumed.resumed_from.endswith("step-3")
    # the same schedule as a run that had the new lr from the start
    reference, _ = _run(
        _config(tmp_path / "b", tiny_model_dir, "lora", "adamw_torch"), monkeypatch, overrides=new
    )
    lrs, expected = _train_lrs(tmp_path / "a" / "run"), _train_lrs(Path(reference.output_dir))
    assert [lrs[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]
    assert lrs[4] < 0.001 + 1e-12 and lrs[3] > 0.001  # not the old run's lr
    opt = json.loads((tmp_path / "a" / "run" / "checkpoints" / "step-6" / "optimizer.json").read_text())
    (group,) = opt["param_groups"]  # LoRA: matrices only, one decayed group
    assert group["initial_lr"] == 0.001 and group["weight_decay"] == 0.1
    assert group["betas"] == {"__tuple__": [0.8, 0.9]}
    state = read_checkpoint(tmp_path / "a" / "run" / "checkpoints" / "step-6").state
    assert state["scheduler"]["base_lrs"] == [0.001]


def test_restore_optimizer_applies_the_new_weight_decay_to_the_update():
    """The update itself follows the new value: with zero gradients AdamW only decays the weights."""
    from fusedtune.trainer.checkpoint import Checkpoint
    from fusedtune.trainer.optim import lr_lambda

    def build(wd: float):
        from fusedtune.trainer.config import load_config

        cfg = load_config(None, [f"optim.weight_decay={wd}", "optim.lr=0.1", "optim.name=adamw_torch"]).optim
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4, bias=False)
        opt = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps
        )
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, 10))

    model, opt, sched = build(0.0)
    _step(model, opt, sched, width=4)
    saved = {"scheduler": sched.state_dict()}
    ckpt = Checkpoint(path=Path("."), state=saved)
    monkey_state = opt.state_dict()
    ckpt.optimizer_state = lambda: monkey_state  # type: ignore[method-assign]
    ckpt.scheduler_state = lambda: saved["scheduler"]  # type: ignore[method-assign]
    model2, opt2, sched2 = build(0.5)
    with torch.no_grad():
        model2.weight.copy_(model.weight)
    assert loop.restore_optimizer(opt2, sched2, ckpt) == ["weight_decay"]
    before = model2.weight.detach().clone()
    state = opt2.state[model2.weight]
    exp_avg, exp_avg_sq, step = (
        state["exp_avg"].clone(),
        state["exp_avg_sq"].clone(),
        float(state["step"]) + 1,
    )
    model2.weight.grad = torch.zeros_like(model2.weight)
    opt2.step()
    lr = opt2.param_groups[0]["lr"]
    # AdamW: decay by lr * wd, then the (gradient-free) moment update
    decayed = before * (1 - lr * 0.5)
    m, v = exp_avg * 0.9, exp_avg_sq * 0.999
    expected = decayed - lr * (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8)
    torch.testing.assert_close(model2.weight.detach(), expected)


@pytest.mark.parametrize(("saved", "now"), [("adamw8bit", "adamw_torch"), ("adamw_torch", "adamw8bit")])
def test_resume_refuses_a_change_of_optimizer_up_front(tiny_model_dir, tmp_path, capsys, saved, now):
    cfg = _config(tmp_path, tiny_model_dir, "lora", saved, max_steps=2)
    assert main(["run", str(cfg)]) == 0
    before = _tree(tmp_path / "run")
    capsys.readouterr()
    code = main(
        [
            "run",
            str(cfg),
            "resume=auto",
            "resume_allow_config_changes=true",
            f"optim.name={now}",
            "train.max_steps=4",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: optim.name:") and "\n" not in err, err
    assert f"holds {saved} optimizer state" in err and f"optim.name={saved}" in err
    assert _tree(tmp_path / "run") == before  # config.yaml, metrics.jsonl, checkpoints: as they were


def test_resume_from_an_earlier_checkpoint_beside_later_ones_is_refused(tiny_model_dir, tmp_path, capsys):
    """Resuming step-2 in a directory that still holds step-3.. of a run that went on would mix two
    timelines: rotation (by step number) would delete the new run's checkpoints and resume=auto would
    continue the abandoned one. Refused up front; with the later ones moved away it runs."""
    cfg = _config(tmp_path, tiny_model_dir, "lora", "adamw_torch", max_steps=4, save_every=1, keep_last=10)
    assert main(["run", str(cfg)]) == 0
    root = tmp_path / "run" / "checkpoints"
    before = _tree(tmp_path / "run")
    capsys.readouterr()
    again = ["run", str(cfg), f"resume={root / 'step-2'}", "train.keep_last=2", "train.max_steps=5"]
    assert main([*again, "resume_allow_config_changes=true", "optim.lr=0.001"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: resume: {root} also holds checkpoints after step-2: step-3, step-4")
    assert "\n" not in err and "resume=auto" in err and "new output_dir" in err
    assert _tree(tmp_path / "run") == before

    (tmp_path / "abandoned").mkdir()
    for name in ("step-3", "step-4"):
        (root / name).rename(tmp_path / "abandoned" / name)
    assert main([*again, "resume_allow_config_changes=true", "optim.lr=0.001"]) == 0
    assert "metrics.jsonl: dropped the 3 records logged after step-2" in capsys.readouterr().out
    assert [s for s, _ in _train_records(tmp_path / "run")] == [1, 2, 3, 4, 5]
    assert [p.name for p in valid_checkpoints(root)] == ["step-4", "step-5"]
    assert read_checkpoint(root / "step-5").state["config"]["optim"]["lr"] == 0.001


def test_rotation_never_deletes_checkpoints_of_later_steps(tmp_path):
    """Step numbers order one run's checkpoints; one at a later step than the one just written is not
    older, whatever its number says."""
    model, opt, sched = _small_state()
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 5, model, opt, sched, {"config": {}}, keep_last=2)
    for step in (1, 2, 3):
        _step(model, opt, sched)
        save_checkpoint(root, step, model, opt, sched, {"config": {}}, keep_last=2)
    assert [p.name for p in valid_checkpoints(root)] == ["step-2", "step-3", "step-5"]


def test_resume_auto_on_a_finished_run_leaves_it_as_it_is(tiny_model_dir, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_model_dir, "lora", "adamw_torch", max_steps=2)
    assert main(["run", str(cfg)]) == 0
    run_dir = tmp_path / "run"
    before = _tree(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    capsys.readouterr()
    assert main(["run", str(cfg), "resume=auto"]) == 0
    out = capsys.readouterr().out
    assert "is this run's last step (2 of 2): the run is already finished" in out
    assert f"done: 2 steps in {summary['accounting']['train_seconds']:.1f} s" in out
    assert _tree(run_dir) == before  # summary.json keeps its measured numbers

    # killed after its last checkpoint, before the summary: the outputs are written then
    (run_dir / "summary.json").unlink()
    assert main(["run", str(cfg), "resume=auto"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2

    # a summary that matches but no adapter (an identical overwrite run killed in its final eval, which
    # now also deletes summary.json; or files removed by hand): not finished, the outputs are written
    (run_dir / "adapter_model.safetensors").unlink()
    assert main(["run", str(cfg), "resume=auto"]) == 0
    assert (run_dir / "adapter_model.safetensors").is_file()


def test_resume_from_another_directorys_checkpoint_over_an_unrelated_run(tiny_model_dir, tmp_path, capsys):
    """overwrite=true into a directory of another run: its log is not cut at the checkpoint's byte count
    (it is not that log); the run finishes with summary.json and loss.png, and its log is the
    checkpoint's run's up to the checkpoint, then the new steps."""
    cfg = _config(tmp_path / "src", tiny_model_dir, "lora", "adamw_torch", max_steps=4, save_every=2)
    assert main(["run", str(cfg)]) == 0
    src = tmp_path / "src" / "run"
    source = _tree(src)
    other = tmp_path / "other"
    (other / "checkpoints" / "step-9").mkdir(parents=True)
    lines = [
        json.dumps({"kind": "train", "step": i, "loss": 1.0 + i, "lr": 0.1, "note": "x" * 40})
        for i in range(50)
    ]
    (other / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    args = [
        "run",
        str(cfg),
        f"output_dir={other}",
        "overwrite=true",
        f"resume={src / 'checkpoints' / 'step-2'}",
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert (other / "summary.json").is_file() and (other / "loss.png").is_file()
    assert _train_records(other) == _train_records(src)  # the source's steps 1-2, then 3-4 the same
    assert [p.name for p in (other / "checkpoints").iterdir()] == ["step-4"]  # the old run's are gone
    assert _tree(src) == source


def test_resume_refuses_another_base_model_unless_allowed(tiny_model_dir, tmp_path, capsys):
    """The model at name_or_path changed between the run and its resume (another snapshot in the cache,
    a copied-over folder): the adapter would go on training half on one base and half on another, in
    silence. Refused like changed data, in this directory and from another one; allowed, the run says
    so and its base record follows the new base, so that export takes it."""
    import shutil

    from tiny import build_tiny_model

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    cfg = _config(tmp_path, base, "lora", "adamw_torch", max_steps=4, save_every=2)
    assert main(["run", str(cfg)]) == 0
    run = tmp_path / "run"
    other = build_tiny_model(tmp_path / "other-weights", seed=5)
    shutil.copy(other / "model.safetensors", base / "model.safetensors")
    shutil.rmtree(run / "checkpoints" / "step-4")
    capsys.readouterr()
    for extra in (
        ["resume=auto"],
        [f"output_dir={tmp_path / 'elsewhere'}", f"resume={run / 'checkpoints' / 'step-2'}"],
    ):
        assert main(["run", str(cfg), *extra]) == 2
        err = capsys.readouterr().err
        assert "is not the base model" in err and "its weights" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "elsewhere").exists()
    assert main(["run", str(cfg), "resume=auto", "resume_allow_config_changes=true"]) == 0
    assert "the base model differs from the one" in capsys.readouterr().out
    assert main(["export", str(run), str(tmp_path / "merged")]) == 0


def test_resuming_a_final_checkpoint_elsewhere_runs_no_step_and_says_so(tiny_model_dir, tmp_path, capsys):
    """The last checkpoint resumed into a new directory: no step runs there, and the summary says the
    saved activations were not measured (it printed a micro-batch of 0 tokens)."""
    cfg = _config(tmp_path / "src", tiny_model_dir, "lora", "adamw_torch", max_steps=2, save_every=2)
    assert main(["run", str(cfg)]) == 0
    capsys.readouterr()
    final = tmp_path / "src" / "run" / "checkpoints" / "step-2"
    assert main(["run", str(cfg), f"output_dir={tmp_path / 'new'}", f"resume={final}"]) == 0
    out = capsys.readouterr().out
    assert "(0 tokens)" not in out
    assert "saved activations not measured (no training step ran in this process)" in out
    assert (tmp_path / "new" / "summary.json").is_file()


def test_resuming_a_checkpoint_from_the_old_schedule_says_so(tiny_model_dir, tmp_path, monkeypatch):
    """A checkpoint written under another lr-schedule version (its floor at the last step) resumes, and
    the run says the remaining steps follow today's schedule; the same version says nothing."""
    cfg = _config(tmp_path, tiny_model_dir, "lora", "adamw_torch", max_steps=4, save_every=2)
    _run(cfg, monkeypatch, stop_at=2)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["lr_schedule"] == checkpoint.LR_SCHEDULE_VERSION
    lines: list[str] = []
    monkeypatch.setattr(loop, "LR_SCHEDULE_VERSION", checkpoint.LR_SCHEDULE_VERSION + 1)
    loop.run(load_config(cfg, ["resume=auto"]), log=lines.append)
    assert any("was written by an earlier fusedtune, whose cosine schedule" in x for x in lines), lines


def test_read_metrics_skips_a_torn_last_line_and_names_a_bad_one(tmp_path):
    from fusedtune.trainer.metrics import MetricsError, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "st')
    assert read_metrics(path) == [{"kind": "train", "step": 1}]
    path.write_text('{"kind": "train", "st\n{"kind": "train", "step": 1}\n')
    with pytest.raises(MetricsError, match=r"metrics.jsonl:1: not a JSON record"):
        read_metrics(path)


def test_resume_auto_with_only_unusable_checkpoints_says_so(tiny_model_dir, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_model_dir, "lora", "adamw_torch")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-3").mkdir(parents=True)  # an interrupted write: no manifest
    (run_dir / "metrics.jsonl").write_text("")
    assert main(["run", str(cfg), "resume=auto"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"error: resume: auto: no usable checkpoint in {run_dir / 'checkpoints'}"), err
    assert "step-3: no manifest.json" in err and "overwrite=true" in err and "\n" not in err
    assert "resume=auto to continue" not in err and "starting fresh" not in captured.out
    assert (run_dir / "checkpoints" / "step-3").is_dir()

    (run_dir / "checkpoints" / "step-3").rmdir()
    (run_dir / "checkpoints").rmdir()
    assert main(["run", str(cfg), "resume=auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: resume: auto: {run_dir} is not empty and holds no checkpoint"), err


def test_output_dir_and_resume_expand_the_home_directory(tiny_model_dir, tmp_path, monkeypatch, capsys):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    cfg = _config(tmp_path, tiny_model_dir, "lora", "adamw_torch", max_steps=2, save_every=1)
    assert main(["run", str(cfg), "output_dir=~/run"]) == 0
    assert (home / "run" / "summary.json").is_file() and not (cwd / "~").exists()
    assert load_config(home / "run" / "config.yaml").output_dir == str(home / "run")
    capsys.readouterr()
    again = ["output_dir=~/run", "resume=~/run/checkpoints/step-2", "train.max_steps=3"]
    assert main(["run", str(cfg), *again, "resume_allow_config_changes=true"]) == 0
    assert f"continuing from {home / 'run' / 'checkpoints' / 'step-2'}" in capsys.readouterr().out
    assert not (cwd / "~").exists()


def test_fp16_loss_scale_comes_back_with_the_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """Started at 2^20, an fp16 run's first steps overflow and halve the scale; a run stopped among them
    and resumed continues at the checkpoint's scale (not 2^24 again), bit-identically."""
    from fusedtune.trainer import optim

    real_init = optim.LossScaler.__init__
    monkeypatch.setattr(optim.LossScaler, "__init__", lambda self, scale=2.0**20, **_: real_init(self, scale))
    straight, _ = _run(_config(tmp_path / "a", tiny_model_dir, "full-fp16", "adamw8bit"), monkeypatch)
    assert 0 < straight.skipped_steps < STEPS
    cfg = _config(tmp_path / "b", tiny_model_dir, "full-fp16", "adamw8bit")
    _run(cfg, monkeypatch, stop_at=2)
    saved = read_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "step-2")
    records = [json.loads(x) for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    scales = {r["step"]: r["loss_scale"] for r in records if r["kind"] == "train"}
    assert scales[1] == 2.0**20 and saved.state["loss_scale"]["scale"] == scales[3] < 2.0**20
    _run(cfg, monkeypatch, overrides=["resume=auto"])
    assert _train_records(tmp_path / "b" / "run") == _train_records(tmp_path / "a" / "run")
    _assert_same_checkpoint(
        tmp_path / "b" / "run" / "checkpoints" / f"step-{STEPS}",
        tmp_path / "a" / "run" / "checkpoints" / f"step-{STEPS}",
    )
