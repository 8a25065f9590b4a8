"""Smoke tests through the real CLI on the tiny model: every method trains, writes its outputs, and
counts its trainable parameters exactly; bad input exits 2 with one line and overwrites nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import broken_model_dir, build_tiny_model, write_config

from fusedtune.trainer.cli import main


def _train_losses(run: Path) -> list[float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def _expected_trainable(model_dir: Path, method: str, rank: int = 4) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    if method in ("lora", "qlora"):
        return sum(rank * (m.in_features + m.out_features) for m in linears)
    if method == "full":
        return sum(p.numel() for p in model.parameters())
    return sum(p.numel() for n, p in model.named_parameters() if "norm" in n)


@pytest.mark.parametrize("method", ["lora", "full", "partial", "qlora"])
def test_cli_trains_each_method(tiny_model_dir, tmp_path, capsys, method):
    if method == "qlora":
        pytest.importorskip("fusedtune.kernels.modules").QuantLoRALinear  # noqa: B018
    extra = {"partial": {"patterns": ["norm"]}} if method == "partial" else {}
    if method == "partial":
        extra["optim"] = {"lr": 5e-2}
    cfg = write_config(tmp_path, tiny_model_dir, method=method, **extra)
    assert main(["run", str(cfg)]) == 0
    run = tmp_path / "run"
    losses = _train_losses(run)
    assert len(losses) == 12 and all(map(lambda x: x == x and abs(x) != float("inf"), losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"loss did not fall: {losses}"
    for name in ("metrics.jsonl", "loss.png", "config.yaml", "summary.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["accounting"]["trainable_params"] == _expected_trainable(tiny_model_dir, method)
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    if method in ("lora", "qlora"):
        assert (run / "adapter_config.json").is_file() and (run / "adapter_model.safetensors").is_file()
    else:
        tensors = load_file(run / "trainable.safetensors")
        assert sum(t.numel() for t in tensors.values()) == summary["accounting"]["trainable_params"]
    out = capsys.readouterr().out
    assert "parameters:" in out and "optimizer state" in out


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_cli_trains_other_architectures(tmp_path, capsys, arch):
    """Gemma 3 (its four (1 + w) norms a block and its q/k norms fused, sliding-window attention on
    right-padded micro-batches) and Qwen3 (per-head q/k norms) train through the CLI: the report says
    what took which path, the loss falls, and the summary's accounting is the live tensors'."""
    from tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / arch, arch=arch)
    cfg = write_config(tmp_path, model_dir, train={"max_steps": 6})
    assert main(["run", str(cfg), "optim.lr=5e-3"]) == 0
    out = capsys.readouterr().out
    norms = {"gemma3": "fused RMSNorm: 13/13 norms", "qwen3": "fused RMSNorm: 9/9 norms"}[arch]
    assert norms in out
    if arch == "gemma3":
        assert "not fused (activation GELUTanh, not SiLU): all" in out
        assert "padding-free micro-batches: off (sliding-window attention" in out
    losses = _train_losses(tmp_path / "run")
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses


def test_print_config_and_overrides(tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_model_dir)
    assert main(["run", str(cfg), "lora.rank=2", "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["lora"]["rank"] == 2 and resolved["method"] == "lora"
    assert not (tmp_path / "run").exists()


def test_overrides_after_a_flag(tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_model_dir)
    assert main(["run", str(cfg), "--print-config", "lora.rank=2", "train.max_steps=3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["lora"]["rank"] == 2 and resolved["train"]["max_steps"] == 3
    with pytest.raises(SystemExit) as stop:
        main(["run", str(cfg), "--print-config", "--no-such-flag"])
    assert stop.value.code == 2 and "--no-such-flag" in capsys.readouterr().err


def test_tokenizer_without_pad_or_eos_token(tiny_model_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    for key in ("pad_token", "eos_token"):
        tokenizer_config.pop(key, None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    cfg = write_config(tmp_path, model_dir, train={"max_steps": 2})
    assert main(["run", str(cfg)]) == 0, capsys.readouterr().err


def test_console_script_help_and_error_exit_code(tmp_path):
    exe = Path(sys.executable).with_name("trainer")
    help_text = subprocess.run([exe, "run", "--help"], capture_output=True, text=True, check=True).stdout
    assert "key=value" in help_text and "--print-config" in help_text
    proc = subprocess.run([exe, "run", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "config file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["bad parquet", "unknown model_type"])
def test_console_script_library_errors_are_one_line(tiny_model_dir, tmp_path, case):
    """The libraries' own output (datasets' progress bars and error log, transformers' warnings) stays
    off the terminal: the error line is all. A subprocess, since their log handlers hold the real stderr."""
    cfg = write_config(tmp_path, tiny_model_dir)
    if case == "bad parquet":
        pytest.importorskip("datasets")
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        data = tmp_path / "train.parquet"  # the footer reads, the data pages do not (as in test_data.py)
        pq.write_table(pa.table({"text": ["a" * 50] * 100}), data, compression="none", row_group_size=10)
        blob = bytearray(data.read_bytes())
        blob[400:460] = b"\x07" * 60
        data.write_bytes(bytes(blob))
        override, expected = f"data.train={data}", "cannot read as .parquet (Couldn't deserialize thrift"
    else:  # transformers warns "You are using a model of type `qwen9` to instantiate..." on the way
        model = broken_model_dir(tiny_model_dir, tmp_path / "m", "unknown model_type")
        override, expected = f"model.name_or_path={model}", "model type `qwen9`"
    exe = Path(sys.executable).with_name("trainer")
    proc = subprocess.run(
        [exe, "run", str(cfg), override],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert expected in proc.stderr


def _copy_model_with_vocab(src: Path, dst: Path, vocab_size: int) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] = vocab_size
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _copy_model_without(src: Path, dst: Path, *names: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    for name in names:
        (dst / name).unlink()
    return dst


@pytest.fixture(scope="module")
def other_model_checkpoint(tmp_path_factory, tiny_model_dir_bias) -> Path:
    """A valid checkpoint of a full fine-tune of another model (the tiny Llama with biases)."""
    tmp = tmp_path_factory.mktemp("other-model")
    cfg = write_config(tmp, tiny_model_dir_bias, method="full", train={"max_steps": 1})
    assert main(["run", str(cfg)]) == 0
    return tmp / "run" / "checkpoints" / "step-1"


def _bad_inputs(tmp_path: Path, model_dir: Path, checkpoint: Path) -> dict[str, tuple]:
    """name -> (extra overrides, expected fragment of the one-line error[, text appended to the config])."""
    import shutil

    (tmp_path / "malformed.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n')
    (tmp_path / "missing.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "chat.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        + "\n"
    )
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "not-a-model").mkdir()
    small_vocab = _copy_model_with_vocab(model_dir, tmp_path / "small-vocab", 300)
    no_template = _copy_model_without(model_dir, tmp_path / "no-template", "chat_template.jinja")
    no_tokenizer = _copy_model_without(model_dir, tmp_path / "no-tokenizer", "tokenizer.json")
    from transformers import AutoTokenizer

    n_tokens = len(AutoTokenizer.from_pretrained(model_dir))
    short_vocab = _copy_model_with_vocab(model_dir, tmp_path / "short-vocab", n_tokens - 1)
    spoiled = {
        kind: broken_model_dir(model_dir, tmp_path / kind.replace(" ", "-"), kind)
        for kind in (
            "remote code",
            "unknown model_type",
            "no model_type",
            "truncated weights",
            "wrong architecture",
        )
    }
    (tmp_path / "ragged.csv").write_text("instruction,output\na,b\nc,d,e\n")
    (tmp_path / "header-only.csv").write_text("instruction,output\n")
    (tmp_path / "object.json").write_text(json.dumps({"data": [{"text": "a"}]}, indent=2))
    (tmp_path / "not.parquet").write_text("not parquet")
    corrupt = tmp_path / "corrupt-checkpoint"
    shutil.copytree(checkpoint, corrupt)
    blob = bytearray((corrupt / "optimizer.safetensors").read_bytes())
    blob[-1] ^= 1
    (corrupt / "optimizer.safetensors").write_bytes(bytes(blob))
    forged = {}  # checkpoints whose manifest checks out but whose state.json was edited, re-signed
    for name, edit in {
        "no data_fingerprint": lambda st: {k: v for k, v in st.items() if k != "data_fingerprint"},
        "a string for a state": lambda st: "state",
        "a negative step": lambda st: {**st, "step": -3},
        "a string format": lambda st: {**st, "format": str(st["format"])},
    }.items():
        forged[name] = tmp_path / f"forged-{name.replace(' ', '-')}"
        shutil.copytree(checkpoint, forged[name])
        state = json.loads((forged[name] / "state.json").read_text())
        (forged[name] / "state.json").write_text(json.dumps(edit(state)))
        _resign_manifest(forged[name])
    long = "a" * 300  # over the file system's 255 bytes a name
    return {
        "unknown key": (["optim.learning_rate=1e-3"], "unknown key 'optim.learning_rate' (did you mean"),
        "wrong type": (["train.max_steps=many"], "train.max_steps: Input should be a valid integer"),
        "out of range": (["lora.dropout=1.5"], "lora.dropout: Input should be less than 1"),
        "zero batch": (["train.micro_batch_size=0"], "train.micro_batch_size"),
        "missing model path": ([f"model.name_or_path={tmp_path}/no-such-model"], "no such model directory"),
        "unavailable hub id": (
            ["model.name_or_path=someorg/some-model-not-cached"],
            "nor in the local Hugging Face cache",
        ),
        "malformed jsonl": ([f"data.train={tmp_path}/malformed.jsonl"], "malformed.jsonl:2:"),
        "row missing field": ([f"data.train={tmp_path}/missing.jsonl"], "missing.jsonl:2:"),
        "empty dataset": ([f"data.train={tmp_path}/empty.jsonl"], "empty.jsonl"),
        "missing data file": ([f"data.train={tmp_path}/nope.jsonl"], "nope.jsonl"),
        "all labels masked": (["data.max_seq_len=8", "data.overlength=truncate"], "masked"),
        "ids beyond embeddings": ([f"model.name_or_path={small_vocab}"], "300"),
        "target matches nothing": (["lora.target_modules=[qkv]"], "lora.target_modules"),
        "rank larger than layer": (["lora.rank=100"], "lora.rank"),
        # config
        "duplicate yaml key": ([], "config.yaml:", "train:\n  seed: 1\n"),
        "zero lr": (["optim.lr=0"], "optim.lr: Input should be greater than 0"),
        "negative lr": (["optim.lr=-1e-4"], "optim.lr: Input should be greater than 0"),
        "negative batch": (["train.micro_batch_size=-4"], "train.micro_batch_size"),
        "zero grad accum": (["train.grad_accum=0"], "train.grad_accum"),
        "beta of one": (["optim.betas=[0.9, 1.0]"], "optim.betas"),
        "unknown optimizer": (["optim.name=sgd"], "optim.name"),
        "seq len too small": (["data.max_seq_len=4"], "data.max_seq_len"),
        "zero save_every": (["train.save_every=0"], "train.save_every"),
        "zero keep_last": (["train.keep_last=0"], "train.keep_last"),
        "partial without patterns": (["method=partial"], "partial.patterns"),
        "partial bad regex": (["method=partial", "partial.patterns=['(']"], "partial.patterns"),
        "eval file and eval fraction": (["data.eval_fraction=0.2"], "data.eval_fraction"),
        "negative seed": (["train.seed=-1"], "train.seed: Input should be greater than or equal to 0"),
        "seed of 2**32": (["train.seed=4294967296"], "train.seed: Input should be less than 4294967296"),
        "infinite eps": (["optim.eps=.inf"], "optim.eps: Input should be a finite number"),
        "infinite epochs": (
            ["train.max_steps=null", "train.epochs=.inf"],
            "train.epochs: Input should be a finite",
        ),
        "boolean rank": (["lora.rank=true"], "lora.rank: Input should be a number, not a boolean"),
        "boolean max_steps": (
            ["train.max_steps=true"],
            "train.max_steps: Input should be a number, not a boolean",
        ),
        "bad override named": (
            ["train.max_steps=3=4"],
            "error: override 'train.max_steps=3=4': train.max_steps:",
        ),
        "yaml control character": ([], "config.yaml:", "extra: \x1b[D\n"),
        "yaml unhashable key": ([], "invalid YAML: found unhashable key", "? [a, b]\n: 1\n"),
        "ragged csv": (
            [f"data.train={tmp_path}/ragged.csv"],
            "ragged.csv:3: the record has 3 fields, the header has 2",
        ),
        "header-only csv": ([f"data.train={tmp_path}/header-only.csv"], "header-only.csv: no examples"),
        "json object file": (
            [f"data.train={tmp_path}/object.json"],
            "object.json:1: expected a JSON array of objects",
        ),
        "not parquet": (
            [f"data.train={tmp_path}/not.parquet"],
            "not.parquet: cannot read as .parquet (Parquet magic",
        ),
        # data
        "missing eval file": ([f"data.eval={tmp_path}/nope-eval.jsonl"], "nope-eval.jsonl"),
        "data path is a directory": ([f"data.train={tmp_path}/not-a-model"], "not-a-model"),
        "overlength error": (["data.overlength=error", "data.max_seq_len=16"], "train.jsonl:1"),
        # model and tokenizer
        "model dir without config.json": ([f"model.name_or_path={tmp_path}/not-a-model"], "no config.json"),
        "chat template missing for messages": (
            [f"model.name_or_path={no_template}", f"data.train={tmp_path}/chat.jsonl", "data.eval=null"],
            "chat template",
        ),
        "no tokenizer in model dir": ([f"model.name_or_path={no_tokenizer}"], "cannot load a tokenizer"),
        "model needs remote code": (
            [f"model.name_or_path={spoiled['remote code']}"],
            "set model.trust_remote_code=true",
        ),
        "unknown model_type": ([f"model.name_or_path={spoiled['unknown model_type']}"], "model type `qwen9`"),
        "no model_type": (
            [f"model.name_or_path={spoiled['no model_type']}"],
            "Should have a `model_type` key",
        ),
        "truncated weights": (
            [f"model.name_or_path={spoiled['truncated weights']}"],
            "model.safetensors is truncated or damaged",
        ),
        "weights of another architecture": (
            [f"model.name_or_path={spoiled['wrong architecture']}"],
            "weights do not fit its architecture",
        ),
        "tokenizer larger than embeddings": (
            [f"model.name_or_path={short_vocab}"],
            f"{n_tokens} tokens but the model's embedding has {n_tokens - 1} rows",
        ),
        # filesystem
        "output_dir is a file": ([f"output_dir={tmp_path}/a-file"], "output_dir"),
        "output_dir under a file": ([f"output_dir={tmp_path}/a-file/run"], "a-file is not a directory"),
        # resume
        "resume path missing": ([f"resume={tmp_path}/no-checkpoint"], "resume: no such checkpoint"),
        "resume path not a checkpoint": (
            [f"resume={tmp_path}"],
            "is not a checkpoint (no manifest.json",
        ),
        "resume path is a file": ([f"resume={tmp_path}/a-file"], "is a file, not a checkpoint directory"),
        "checkpoint of a different config": ([f"resume={checkpoint}"], "model.name_or_path"),
        "checkpoint of a different model": (
            [f"resume={checkpoint}", "method=full", "resume_allow_config_changes=true"],
            "was written for a different model or method",
        ),
        "corrupted checkpoint": ([f"resume={corrupt}"], "optimizer.safetensors does not match its sha256"),
        "checkpoint state without a key": (
            [f"resume={forged['no data_fingerprint']}"],
            "is not a usable checkpoint: state.json has no 'data_fingerprint'",
        ),
        "checkpoint state not an object": (
            [f"resume={forged['a string for a state']}"],
            "is not a usable checkpoint: state.json holds a str, not an object",
        ),
        "checkpoint state with a negative step": (
            [f"resume={forged['a negative step']}"],
            "state.json's step is -3, not a step number (1 or more)",
        ),
        "checkpoint format as a string": (
            [f"resume={forged['a string format']}"],
            "has checkpoint format '1', this trainer reads 1",
        ),
        # names the system refuses: one line naming the path, not an OSError's traceback
        "output_dir name too long": ([f"output_dir={tmp_path}/{long}"], "File name too long"),
        "data file name too long": ([f"data.train={tmp_path}/{long}.jsonl"], "File name too long"),
        "model path too long": ([f"model.name_or_path={tmp_path}/{long}"], "File name too long"),
        # os.access says yes to root there; only trying to create it says no
        "output_dir that cannot be created": (["output_dir=/proc/fusedtune-run"], "is not writable"),
    }


def _resign_manifest(checkpoint: Path) -> None:
    import hashlib

    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name, meta in manifest["files"].items():
        blob = (checkpoint / name).read_bytes()
        meta.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


BAD_INPUT_NAMES = [
    "unknown key",
    "wrong type",
    "out of range",
    "zero batch",
    "missing model path",
    "unavailable hub id",
    "malformed jsonl",
    "row missing field",
    "empty dataset",
    "missing data file",
    "all labels masked",
    "ids beyond embeddings",
    "target matches nothing",
    "rank larger than layer",
    "duplicate yaml key",
    "zero lr",
    "negative lr",
    "negative batch",
    "zero grad accum",
    "beta of one",
    "unknown optimizer",
    "seq len too small",
    "zero save_every",
    "zero keep_last",
    "partial without patterns",
    "partial bad regex",
    "eval file and eval fraction",
    "negative seed",
    "seed of 2**32",
    "infinite eps",
    "infinite epochs",
    "boolean rank",
    "boolean max_steps",
    "bad override named",
    "yaml control character",
    "yaml unhashable key",
    "ragged csv",
    "header-only csv",
    "json object file",
    "not parquet",
    "missing eval file",
    "data path is a directory",
    "overlength error",
    "model dir without config.json",
    "chat template missing for messages",
    "no tokenizer in model dir",
    "model needs remote code",
    "unknown model_type",
    "no model_type",
    "truncated weights",
    "weights of another architecture",
    "tokenizer larger than embeddings",
    "output_dir is a file",
    "output_dir under a file",
    "resume path missing",
    "resume path not a checkpoint",
    "resume path is a file",
    "checkpoint of a different config",
    "checkpoint of a different model",
    "corrupted checkpoint",
    "checkpoint state without a key",
    "checkpoint state not an object",
    "checkpoint state with a negative step",
    "checkpoint format as a string",
    "output_dir name too long",
    "data file name too long",
    "model path too long",
    "output_dir that cannot be created",
]


@pytest.mark.parametrize("case", BAD_INPUT_NAMES)
def test_bad_input_one_line_exit_2_nothing_overwritten(
    tiny_model_dir, other_model_checkpoint, tmp_path, capsys, case
):
    cfg = write_config(tmp_path, tiny_model_dir, overwrite=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("earlier run\n")
    overrides, fragment, *append = _bad_inputs(tmp_path, tiny_model_dir, other_model_checkpoint)[case]
    if append:
        cfg.write_text(cfg.read_text() + append[0])
    code = main(["run", str(cfg), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert fragment in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    assert (run / "metrics.jsonl").read_text() == "earlier run\n"


def test_non_empty_output_dir_without_overwrite(tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, overwrite=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    assert main(["run", str(cfg)]) == 2
    assert "output_dir" in capsys.readouterr().err
    assert (tmp_path / "run" / "keep.txt").read_text() == "x"


def test_overwrite_refuses_a_folder_that_holds_no_run(tiny_model_dir, tmp_path, capsys):
    """overwrite=true replaces an earlier run, not a folder of other files (`output_dir=~`, which the
    shell expands to $HOME, with the embedded default's overwrite: true)."""
    cfg = write_config(tmp_path, tiny_model_dir, overwrite=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not empty and holds no earlier run (none of config.yaml, metrics.jsonl, checkpoints)" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["keep.txt"]


def test_version(capsys):
    from fusedtune.trainer import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"trainer (fusedtune) {__version__}"


def test_unknown_flag_shows_the_commands_usage(tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_model_dir)
    for command in ("run", "estimate"):
        with pytest.raises(SystemExit) as stop:
            main([command, str(cfg), "--bogus"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"usage: trainer {command} " in err, err
        assert f"trainer {command}: error: unrecognized arguments: --bogus" in err


def test_config_file_may_follow_the_overrides(tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_model_dir)
    assert main(["run", "lora.rank=2", str(cfg), "train.max_steps=3", "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (resolved["lora"]["rank"], resolved["train"]["max_steps"]) == (2, 3)
    assert resolved["model"]["name_or_path"] == str(tiny_model_dir)  # the file's, not the default's
    assert main(["run", "--print-config", "lora.rank=2", str(cfg)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["name_or_path"] == str(tiny_model_dir)
    assert main(["run", str(cfg), "lora.rank=2", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: one config file at most") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("24", "--gpu-memory: '24' has no unit; write e.g. 24GB"),
        ("0.5", "--gpu-memory: '0.5' has no unit"),
        ("0.0000000001GB", "--gpu-memory: must be positive, got '0.0000000001GB' (less than one byte)"),
        ("", "--gpu-memory: empty"),
    ],
)
def test_estimate_gpu_memory_needs_a_unit_and_a_byte(tiny_model_dir, tmp_path, capsys, size, expected):
    cfg = write_config(tmp_path, tiny_model_dir)
    assert main(["estimate", str(cfg), "--gpu-memory", size]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


def test_estimate_measure_on_truncated_weights_is_one_line(tiny_model_dir, tmp_path, capsys):
    model = broken_model_dir(tiny_model_dir, tmp_path / "m", "truncated weights")
    cfg = write_config(tmp_path, model)
    assert main(["estimate", str(cfg), "--measure"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.name_or_path: ") and err.count("\n") == 1, err
    assert "model.safetensors is truncated or damaged" in err


def test_examples_past_learned_positions_are_refused_before_any_write(tmp_path, capsys):
    """OPT's learned position table has max_position_embeddings rows: longer examples would index past
    it (an IndexError deep in the forward, after the run directory was written). Refused up front."""
    model_dir = build_tiny_model(tmp_path / "opt", arch="opt", max_position_embeddings=8)
    cfg = write_config(tmp_path, model_dir, overwrite=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("earlier run\n")
    capsys.readouterr()  # (saving the model printed progress)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.max_seq_len: examples of up to ") and "\n" not in err, err
    assert "learned position embeddings (model.decoder.embed_positions) cover 8 positions" in err, err
    assert "set data.max_seq_len <= 8" in err
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    assert main(["estimate", str(cfg), "--measure"]) == 2  # its real steps would crash the same way
    err = capsys.readouterr().err.strip()
    assert "error: data.max_seq_len: examples of up to " in err and "Traceback" not in err, err


def test_examples_past_a_rotary_context_are_noted(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from fusedtune.trainer.loop import check_context_length

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_pos = model.config.max_position_embeddings
    assert check_context_length(model, n_pos) is None
    note = check_context_length(model, n_pos + 1)
    assert note == (
        f"data: examples of up to {n_pos + 1} tokens are longer than the model's context "
        f"(max_position_embeddings {n_pos}): positions past it are extrapolated"
    )


def test_overwrite_removes_only_the_runs_own_checkpoints(tiny_model_dir, tmp_path):
    """overwrite=true deletes an earlier run's step-N checkpoints, not other files under checkpoints/."""
    cfg = write_config(tmp_path, tiny_model_dir, overwrite=True)
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step-4").mkdir(parents=True)
    (ckpts / "step-4" / "state.json").write_text("{}")
    (ckpts / ".tmp-step-5-123").mkdir()
    (ckpts / "my-other-model").mkdir()
    (ckpts / "my-other-model" / "weights.bin").write_text("x")
    assert main(["run", str(cfg), "train.max_steps=1"]) == 0
    assert not (ckpts / "step-4").exists() and not (ckpts / ".tmp-step-5-123").exists()
    assert (ckpts / "my-other-model" / "weights.bin").read_text() == "x"


@pytest.mark.parametrize(
    ("method", "masters", "line"),
    [
        ("full", True, "optim.master_weights: the optimizer updates fp32 copies of the {n} bf16 trainable"),
        (
            "partial",
            True,
            "optim.master_weights: the optimizer updates fp32 copies of the {n} bf16 trainable",
        ),
        (
            "partial",
            False,
            "optim.master_weights false: {n} trainable tensors are bf16 and are updated in bf16",
        ),
        ("lora", True, None),
        ("lora", False, None),
    ],
)
def test_half_precision_updates_of_the_weights_are_stated(tiny_model_dir, method, masters, line):
    """full/partial in bf16: the run says the optimizer updates fp32 copies, or (master_weights false)
    that updates below half a bf16 step round away; LoRA (fp32 adapters) says nothing."""
    from transformers import AutoModelForCausalLM

    from fusedtune.trainer.adapt import apply_method
    from fusedtune.trainer.config import load_config
    from fusedtune.trainer.loop import half_precision_lines
    from fusedtune.trainer.optim import build_optimizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    overrides = [f"method={method}", "partial.patterns=[norm]", "kernels=torch", "optim.name=adamw_torch"]
    cfg = load_config(None, [*overrides, f"optim.master_weights={str(masters).lower()}"])
    apply_method(model, cfg, torch.device("cpu"))
    lines = half_precision_lines(model, build_optimizer(model, cfg.optim))
    if line is None:
        assert lines == []
    else:
        n = sum(p.requires_grad for p in model.parameters())
        assert len(lines) == 1 and lines[0].startswith(line.format(n=n)), lines
    model.float()
    assert half_precision_lines(model, build_optimizer(model, cfg.optim)) == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["method=lora", "quant.quant_type=int8", "partial.patterns=[norm]"],
            "config: quant.quant_type, partial.patterns set, but method lora does not use them (ignored)",
        ),
        (["method=qlora", "quant.quant_type=int8"], None),
        (["method=partial", "partial.patterns=[norm]"], None),  # the default's lora.* are the schema's
        (
            ["method=full", "lora.rank=8"],
            "config: lora.rank set, but method full does not use them (ignored)",
        ),
    ],
)
def test_keys_of_sections_the_method_never_reads_are_named(overrides, expected, tmp_path):
    from fusedtune.trainer.config import load_config
    from fusedtune.trainer.loop import unused_sections_note

    cfg = load_config(None, overrides)
    assert unused_sections_note(cfg) == expected
    resolved = tmp_path / "config.yaml"  # a run's own resolved config (every key written) says the same
    resolved.write_text(cfg.to_yaml())
    assert unused_sections_note(load_config(resolved)) == expected


def test_learned_positions_after_a_padding_index_count_two_fewer():
    """RoBERTa's position ids start after padding_idx: a table of n rows holds n - padding_idx - 1."""
    import transformers

    from fusedtune.trainer.errors import ConfigError
    from fusedtune.trainer.loop import check_context_length

    config = transformers.RobertaConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=18, pad_token_id=1, is_decoder=True,
    )  # fmt: skip
    model = transformers.RobertaForCausalLM(config)
    assert check_context_length(model, 16) is None
    with pytest.raises(ConfigError, match=r"cover 16 positions; set data\.max_seq_len <= 16$"):
        check_context_length(model, 17)


def test_a_key_without_its_value_and_values_that_end_in_yaml(tiny_model_dir, tmp_path, capsys):
    """`trainer run my.yaml lora.rank` (the `=8` forgotten) says so; `output_dir=runs/a.yaml` is an override
    whose value happens to end in .yaml, not a second config file."""
    cfg = write_config(tmp_path, tiny_model_dir)
    for key in ("lora.rank", "overwrite"):
        assert main(["run", str(cfg), key]) == 2
        assert (
            capsys.readouterr().err
            == f"error: {key}: an override needs a value (key=value, e.g. {key}=...)\n"
        )
    weird = tmp_path / "out.yaml"
    assert main(["run", str(cfg), f"output_dir={weird}", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output_dir"] == str(weird)
    named = tmp_path / "lr=1e-4.yaml"  # a config file whose name holds an `=`
    named.write_text(cfg.read_text())
    assert main(["run", str(named), "--print-config"]) == 0
    assert main(["run", str(cfg), 'output_dir=" "']) == 2
    assert "output_dir: ' ' is blank or starts or ends with a space" in capsys.readouterr().err
    assert main(["run", str(cfg), "lora-rank=8"]) == 2  # a mistyped key: named as one, not taken for a file
    err = capsys.readouterr().err
    assert "lora-rank" in err and "config file" not in err, err


def test_output_dir_probe_takes_dot_dot_and_leaves_nothing(tmp_path):
    from fusedtune.trainer.loop import _cannot_write

    assert _cannot_write(tmp_path / "missing" / ".." / "run") is None
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    assert _cannot_write(tmp_path / "file" / "run") == "Not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_estimate_of_a_model_that_is_no_causal_lm_is_one_line(tiny_model_dir, tmp_path, capsys):
    import transformers

    t5 = tmp_path / "t5"
    transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    ).save_pretrained(t5)
    cfg = write_config(tmp_path, tiny_model_dir)
    assert main(["estimate", str(cfg), f"model.name_or_path={t5}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model.name_or_path: {t5} is not a causal LM (") and err.count("\n") == 1, (
        err
    )


def test_notes_for_a_long_warmup_and_task_only_data_keys(tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, train={"max_steps": 3, "micro_batch_size": 4})
    assert main(["run", str(cfg), "optim.warmup_steps=50", "data.num_train=5"]) == 0
    out = capsys.readouterr().out
    assert (
        "optim.warmup_steps: 50 is not fewer than the run's 3 steps: the lr warms up over 2 and reaches its "
        "peak on the last step"
    ) in out
    assert "config: data.num_train set, but with data.train (a file) every row is used (ignored)" in out
