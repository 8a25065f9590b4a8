"""The run's configuration: one YAML file plus dotted ``key=value`` overrides, resolved once.

The schema is strict (pydantic, ``extra="forbid"``): an unknown key is an error with a "did you mean",
a wrong type or an out-of-range value names its dotted field. Every later stage receives the one
resolved :class:`Config` and never re-reads the file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError

DEFAULT_CONFIG = "default.yaml"


def _mentions(annotation: Any, kinds: tuple[type, ...]) -> bool:
    """Whether a field's type is, or contains (``int | None``, ``tuple[float, float]``), one of ``kinds``."""
    if annotation in kinds:
        return True
    return any(_mentions(arg, kinds) for arg in get_args(annotation))


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value)


class _Strict(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` are refused for every float field, naming it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true/false as 1/0: `lora.rank: true` would silently be rank 1.
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _has_bool(value):
            ann = field.annotation
            if _mentions(ann, (int, float)) and not _mentions(ann, (bool,)):
                raise ValueError("Input should be a number, not a boolean")
        return value


class ModelConfig(_Strict):
    """Which causal LM to fine-tune and how to hold it."""

    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="local directory, a hub id in the local cache, or the built-in 'smollm2-135m-instruct'",
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a CUDA card that supports it, else fp32"
    )
    trust_remote_code: bool = Field(
        False, description="run the model repository's own Python code (off by default)"
    )
    allow_download: bool = Field(False, description="let a hub id be downloaded (off: offline only)")
    gradient_checkpointing: bool = Field(False, description="recompute block activations in backward")


class LoRAConfig(_Strict):
    """Low-rank adapter on the target Linear layers (methods lora and qlora)."""

    rank: int = Field(16, ge=1, le=4096, description="r: A is [r, in], B is [out, r]")
    alpha: float = Field(32.0, gt=0, description="scaling = alpha / rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] | None = Field(
        None,
        description=(
            "module-name suffixes (e.g. q_proj, v_proj; MoE expert weights: gate_up_proj, down_proj); "
            "null: every Linear in the transformer blocks and every MoE expert weight, but those narrower "
            "than the rank (the run names them)"
        ),
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # lora.target_modules=q_proj: one target

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("an empty list adapts nothing (null: every block Linear)")
        return v


class QuantConfig(_Strict):
    """How the frozen base Linear weights are stored for method qlora."""

    quant_type: Literal["nf4", "fp4", "int8"] = Field(
        "nf4", description="bitsandbytes-compatible storage format"
    )
    double_quant: bool = Field(
        True, description="quantize the 4-bit absmax scales too (about 0.37 bit/param saved)"
    )
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = 64


class PartialConfig(_Strict):
    """Method partial: only parameters whose names match one of these regular expressions train."""

    patterns: list[str] = Field(default_factory=list, description="e.g. ['bias', 'norm', 'layers\\.23\\.']")
    last_n_layers: int | None = Field(
        None, ge=1, description="also train every parameter of the last N blocks"
    )


class DataConfig(_Strict):
    """Where the examples come from and how they become token ids."""

    task: Literal["dates"] | None = Field(
        None, description="a built-in generated task (train and eval sets, with an accuracy metric)"
    )
    train: str | None = Field(None, description="training file: .jsonl, .json, .csv, .tsv or .parquet")
    eval: str | None = Field(None, description="held-out file, same format")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="split this share of train off as eval")
    num_train: int = Field(1024, ge=1, description="built-in task: training examples")
    num_eval: int = Field(64, ge=1, description="built-in task: held-out examples")
    format: Literal["auto", "text", "alpaca", "messages"] = Field(
        "auto", description="auto: from the first row's keys (text / instruction+output / messages)"
    )
    max_seq_len: int = Field(512, ge=8, description="tokens per example (or per packed sequence)")
    overlength: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="what to do with an example longer than max_seq_len"
    )
    completion_only: bool = Field(True, description="loss on the response tokens only")
    packing: bool = Field(
        False,
        description="concatenate whole examples into sequences of at most max_seq_len tokens (attention "
        "runs across the examples of a sequence; train.padding_free alone already skips padding)",
    )
    seed: int = Field(0, description="seed of the eval split and of built-in task generation")

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.task is None and self.train is None:
            raise ValueError("set data.train (a file) or data.task (a built-in task)")
        if self.task is not None and self.train is not None:
            raise ValueError("set only one of data.train and data.task")
        if self.task is not None and self.format not in ("auto", "messages"):
            raise ValueError(f"data.format: a built-in task's rows are messages, not {self.format!r}")
        if self.task is not None and self.eval is not None:
            raise ValueError("data.eval: a built-in task brings its own held-out set (data.num_eval)")
        if self.task is not None and self.eval_fraction > 0:
            raise ValueError(
                "data.eval_fraction: a built-in task brings its own held-out set; set data.num_eval instead"
            )
        return self


DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5, "partial": 2e-5}


class OptimConfig(_Strict):
    """Optimizer over the trainable parameters only, and its schedule."""

    name: Literal["adamw8bit", "paged_adamw8bit", "adamw32bit", "adamw_torch"] = Field(
        "adamw8bit", description="bitsandbytes 8-bit / paged 8-bit / 32-bit AdamW, or torch.optim.AdamW"
    )
    lr: float | None = Field(
        None, gt=0.0, description="peak learning rate; null: 2e-4 for lora/qlora, 2e-5 for full/partial"
    )
    weight_decay: float = Field(
        0.0, ge=0.0, description="decoupled weight decay on matrices (not on 1-D tensors)"
    )
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    min_lr_ratio: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="the schedule decays toward lr * min_lr_ratio, reached one step after the last",
    )
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="null disables clipping")
    loss_scale: Literal["dynamic", "none"] = Field(
        "dynamic",
        description=(
            "fp16 models: the loss is multiplied by a scale (2^16 at first, halved on a gradient overflow, "
            "whose step is skipped, and doubled after 2000 good steps) so small gradients do not flush to "
            "zero; none: unscaled. Other dtypes never scale"
        ),
    )
    master_weights: bool = Field(
        True,
        description=(
            "the optimizer updates an fp32 copy of each bf16/fp16 trainable weight (4 bytes a parameter) and "
            "the weight is rounded from it; false: updated in its own dtype, where a step below half its "
            "spacing rounds away"
        ),
    )

    @model_validator(mode="after")
    def _betas(self) -> OptimConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must lie in [0, 1), got {list(self.betas)}")
        return self


class TrainConfig(_Strict):
    """The loop: how many steps, how big, how often to log and evaluate."""

    max_steps: int | None = Field(None, ge=1, description="optimizer steps; null: run `epochs` epochs")
    epochs: float = Field(1.0, gt=0.0, description="passes over the training set (when max_steps is null)")
    micro_batch_size: int = Field(4, ge=1, description="examples per forward/backward")
    grad_accum: int = Field(
        1, ge=1, description="micro-batches per optimizer step (loss normalized by their target tokens)"
    )
    padding_free: bool = Field(
        True,
        description="run each micro-batch as its real tokens only (no pad), attention within each example; "
        "the run says when the model cannot",
    )
    seed: int = Field(
        0, ge=0, lt=2**32, description="seed of initialisation, data order and dropout (0 to 2**32 - 1)"
    )
    log_every: int = Field(1, ge=1, description="write metrics.jsonl every N steps")
    eval_every: int | None = Field(
        None, ge=1, description="also evaluate every N steps (always at start/end)"
    )
    max_consecutive_nonfinite: int = Field(
        5,
        ge=1,
        description="abort after this many optimizer steps skipped in a row for a non-finite loss/grad",
    )
    save_every: int | None = Field(
        100,
        ge=1,
        description="write a checkpoint every N optimizer steps (always at the end and on SIGTERM/SIGINT); "
        "null: only then",
    )
    keep_last: int = Field(
        2, ge=1, description="checkpoints kept in output_dir/checkpoints (the newest always)"
    )
    progress: bool = Field(True, description="show the progress bar")


class Config(_Strict):
    """A whole ``trainer run``."""

    method: Literal["lora", "qlora", "full", "partial"] = Field(
        "lora",
        description="lora: adapters; qlora: adapters over quantized frozen Linears; full: all; partial: by name",
    )
    kernels: Literal["auto", "triton", "torch"] = Field(
        "auto",
        description="auto: on CUDA the path measured faster per op (plain LoRA layers: cuBLAS GEMMs + "
        "in-place LoRA add, fused kernels with lora.dropout; QLoRA, SwiGLU, loss: Triton; RMSNorm and RoPE: "
        "Triton, speed not yet measured on a GPU), torch elsewhere; "
        "triton: the fused kernels for every layer that can take them (Triton's interpreter without "
        "CUDA; QLoRA layers still dequantize for one GEMM from 512 tokens a micro-batch, where that "
        "measured faster, and the run says so); torch: torch ops only",
    )
    output_dir: str = Field(
        "runs/default",
        min_length=1,
        description="the run directory (adapter, metrics, plot, checkpoints)",
    )
    overwrite: bool = Field(
        False,
        description="allow writing into a non-empty output_dir that holds an earlier run: its outputs and "
        "step-N checkpoints are replaced, other files are left (a folder with no run is refused)",
    )
    resume: str | None = Field(
        None,
        description="'auto': continue from the newest valid checkpoint in output_dir/checkpoints (start "
        "fresh if none); or the path of a checkpoint directory (output_dir/checkpoints/step-N)",
    )
    resume_allow_config_changes: bool = Field(
        False,
        description="resume even though config keys that change the math differ from the checkpoint's",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    partial: PartialConfig = Field(default_factory=PartialConfig)
    data: DataConfig | None = Field(
        None, description="required: the training data (a file, or a built-in task)"
    )
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("output_dir")
    @classmethod
    def _no_stray_space(cls, v: str) -> str:
        if v != v.strip():  # a blank name, or a space at either end: a typo, never a folder anyone meant
            raise ValueError(f"{v!r} is blank or starts or ends with a space")
        return v

    @model_validator(mode="after")
    def _method_needs(self) -> Config:
        if self.data is None:  # no silent default: a config that forgets its data must not train on a task
            raise ValueError("data: set data.train (a file) or data.task (a built-in task)")
        if self.method == "partial" and not (self.partial.patterns or self.partial.last_n_layers):
            raise ValueError("method 'partial' needs partial.patterns or partial.last_n_layers")
        if (
            self.model.dtype == "fp16"
            and self.method in ("full", "partial")
            and not self.optim.master_weights
        ):
            raise ValueError(
                "optim.master_weights: false with model.dtype fp16 updates the fp16 weights in place, where "
                "gradients below 6e-8 (unscaled from the loss scale) flush to zero and AdamW's eps 1e-8 "
                "rounds to 0; keep optim.master_weights true, or use bf16"
            )
        if self.optim.lr is None:  # adapters take a ~10x larger step than whole weight matrices
            # a copy: an OptimConfig passed in by the caller stays as it was (unresolved)
            self.optim = self.optim.model_copy(update={"lr": DEFAULT_LR[self.method]})
        return self

    def to_yaml(self) -> str:
        """The resolved config as YAML (what ``--print-config`` shows and the run directory keeps)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def digest(self) -> str:
        """A short hash of the resolved config."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Loading: YAML (duplicate keys are errors) + overrides -> validated Config
# ---------------------------------------------------------------------------------------------------


MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys instead of silently keeping the last one.

    Merge keys (``<<: *anchor``) work as in ``yaml.safe_load``: the merged mapping's keys may be
    overridden by the mapping's own keys, which must still be unique among themselves.
    """

    def _check_unique_keys(self, node: yaml.MappingNode, deep: bool) -> None:
        checked = self.__dict__.setdefault("_checked_nodes", set())
        if id(node) in checked:  # an anchored mapping, checked where it was defined and since flattened
            return
        checked.add(id(node))
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for sub in merged:  # an inline `<<: {a: 1, a: 2}` is never constructed on its own
                    if isinstance(sub, yaml.MappingNode):
                        self._check_unique_keys(sub, deep)
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key_node, yaml.ScalarNode) and not isinstance(key, str):  # `on:`, `yes:`, `1:`
                raise ConfigError(
                    f"{key_node.start_mark.name}:{key_node.start_mark.line + 1}: key {key_node.value!r} is "
                    f"read by YAML as {type(key).__name__} {key!r}; every key is a name (quote it if meant)"
                )
            try:
                hash(key)
            except TypeError:
                continue  # SafeLoader's own check names it: "found unhashable key", with its line
            if key in seen:
                raise ConfigError(
                    f"{key_node.start_mark.name}:{key_node.start_mark.line + 1}: duplicate key {key!r} "
                    f"(first at line {seen[key] + 1})"
                )
            seen[key] = key_node.start_mark.line

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self._check_unique_keys(node, deep)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.reader.ReaderError as e:  # a control character: the reader knows only its position
        raise ConfigError(
            f"{path}:{_line_of(path, e.position)}: invalid YAML: character #x{e.character:04x} is not "
            "allowed (a control character?)"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys, got {type(data).__name__}")
    return data


def _line_of(path: Path, position: int) -> int:
    """The 1-based line of character ``position`` of a text file."""
    try:
        with open(path) as f:
            return f.read(position).count("\n") + 1
    except (OSError, UnicodeDecodeError):
        return 1


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or `data:` with every key commented out
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", 1e-4)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.lr=1e-4")
    if not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"override {text!r}: the key has an empty part (expected e.g. lora.rank=8)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    kind = _text_field(key)
    if (
        value is not None
        and not isinstance(value, str)
        and (kind == "str" or (kind == "optional" and not isinstance(value, (dict, list))))
    ):
        value = raw.strip()  # output_dir=0755 is the text as typed, not the YAML number 493
    return key, value


def _text_field(dotted: str) -> str | None:
    """``"str"`` when ``dotted`` names a string field (``output_dir``), ``"optional"`` for ``str | None``
    (``data.train``: null stays null), else None."""
    *sections, name = dotted.split(".")
    model = _section_at(sections)
    field = model.model_fields.get(name) if model is not None else None
    if field is None:
        return None
    if field.annotation is str:
        return "str"
    return "optional" if str in get_args(field.annotation) else None


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds: ``DataConfig`` for ``DataConfig`` and ``DataConfig | None``."""
    for ann in (annotation, *get_args(annotation)):
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return ann
    return None


def _section_at(path: list | tuple) -> type[BaseModel] | None:
    """The section model at a key path (``[]``: the Config itself), or None where it is no section."""
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(str(part))
        section = _section_model(field.annotation) if field is not None else None
        if section is None:
            return None
        model = section
    return model


def _fields_at(loc: tuple) -> list[str]:
    model = _section_at(loc[:-1])
    return list(model.model_fields) if model is not None else []


# Names users bring from HF TrainingArguments / PEFT, mapped to ours for the "did you mean" hint.
COMMON_NAMES = {
    "learning_rate": "lr",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "steps": "max_steps",
    "num_train_epochs": "epochs",
    "warmup": "warmup_steps",
    "r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lr_scheduler_type": "schedule",
    "optimizer": "name",
    "optim": "name",
    "model_name": "name_or_path",
    "model_name_or_path": "name_or_path",
    "model": "name_or_path",
    "torch_dtype": "dtype",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "logging_steps": "log_every",
    "log_steps": "log_every",
    "dataset": "train",
    "path": "train",
    "train_file": "train",
    "eval_file": "eval",
    "max_length": "max_seq_len",
    "seq_len": "max_seq_len",
}
# Names meant for one section's field: (section, name) -> field (model.name is model.name_or_path).
SECTION_FIELD_NAMES = {("model", "name"): "name_or_path", ("model", "path"): "name_or_path"}
# Section names users bring (a key whose value is a mapping is matched against the sections).
SECTION_NAMES = {
    "optimizer": "optim",
    "training": "train",
    "dataset": "data",
    "peft": "lora",
    "quantization": "quant",
}


def _sections() -> list[tuple[str, type[BaseModel]]]:
    out = []
    for name, field in Config.model_fields.items():
        if (section := _section_model(field.annotation)) is not None:
            out.append((name, section))
    return out


def _error_key(first: dict) -> str:
    """The dotted key of a validation error: its location, or the key a section's own check names at
    the start of its message (``optim.betas must lie in...`` at location ``optim``)."""
    dotted = ".".join(str(p) for p in first["loc"])
    text = first["msg"].removeprefix("Value error, ")
    m = re.match(r"([a-z_]+(?:\.[a-z_]+)*)(?::|\b)", text)
    if m and (not dotted or m.group(1).startswith(dotted + ".")):
        return m.group(1)
    return dotted


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    dotted = ".".join(str(p) for p in loc)
    if first["type"] == "extra_forbidden":
        key = str(loc[-1])
        msg = f"unknown key '{dotted}'"
        prefix = "".join(f"{p}." for p in loc[:-1])
        fields = _fields_at(loc)
        low = key.lower()  # every field is lower case: `LR` is `lr`
        names = {low, COMMON_NAMES.get(low, low)}
        sections = dict(_sections())
        if isinstance(first.get("input"), dict):  # a mapping: a section misnamed (`optimizer: {lr: ...}`)
            name = SECTION_NAMES.get(low, low)
            hints = (
                [name] if name in sections and name != key else difflib.get_close_matches(low, sections, n=1)
            )
        else:
            names.add(SECTION_FIELD_NAMES.get((prefix.rstrip("."), low), low))
            # the same name (or its usual alias) here, never a section for a value (`dataset=x.jsonl` is
            # data.train, not the train section), then a top-level field of that name (train.output_dir),
            # then the name in another section (train.eval is data.eval), then one spelled alike here
            hints = [f"{prefix}{n}" for n in fields if n in names and n != key and n not in sections]
            hints = hints or [n for n in Config.model_fields if prefix and n in names and n not in sections]
            hints = hints or [
                f"{s}.{n}" for s, sub in sections.items() for n in sub.model_fields if n in names
            ]
            hints = hints or [f"{prefix}{h}" for h in difflib.get_close_matches(key, fields, n=1)]
        if hints:
            msg += " (did you mean " + " or ".join(f"'{h}'" for h in sorted(hints, key=_hint_order)) + "?)"
    else:
        got = first.get("input")
        text = first["msg"]
        if text.startswith("Value error, "):
            text = text[len("Value error, ") :]
        msg = text if dotted and text.startswith(dotted + ".") else f"{dotted}: {text}" if dotted else text
        if dotted and not isinstance(got, dict) and got is not None:
            msg += f" (got {got!r})"
            if first["type"] == "string_type" and not isinstance(got, list):  # 0755, 2024-06-01, yes
                msg += "; YAML read the value as a number, date or boolean: quote it to keep it as text"
        elif first["type"] == "string_type" and got is None:  # `~`, `null`, nothing, a `#...` comment
            msg += " (got null: YAML reads ~, null, an empty value and a #comment so; quote text meant)"
    more = len(err.errors()) - 1
    if more:
        msg += f" [+{more} more]"
    return f"{source}: {msg}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the embedded default), apply ``key=value`` overrides, validate.

    Args:
        path: the YAML file; ``None`` means the embedded default (``trainer/configs/default.yaml``).
        overrides: dotted ``key=value`` strings, applied in order over the file.

    Returns:
        The resolved :class:`Config`.

    Raises:
        ConfigError: unreadable file, invalid YAML, duplicate key, unknown key, bad type or value.
    """
    if path is None:
        source = f"<default:{DEFAULT_CONFIG}>"
        ref = resources.files("fusedtune.trainer.configs").joinpath(DEFAULT_CONFIG)
        with resources.as_file(ref) as p:
            tree = _read_yaml(Path(p))
    else:
        source = str(path)
        tree = _read_yaml(Path(path))
    applied: list[tuple[str, str]] = []
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        applied.append((key, text))
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, _source_of(e, source, applied))) from None


def _hint_order(hint: str) -> tuple[int, str]:
    """The loop's section first where a name is in two (train.seed before data.seed)."""
    return (0 if hint.startswith("train.") else 1, hint)


def _source_of(err: ValidationError, source: str, applied: list[tuple[str, str]]) -> str:
    """Label the error with the override that set the failing key (or a section above it), else the file."""
    dotted = _error_key(err.errors()[0])
    for key, text in reversed(applied):  # the last override of a key is the one in effect
        if dotted and (dotted == key or dotted.startswith(key + ".")):
            return f"override {text!r}"
    # a section's check that failed on a value set below it (data.train=... against the file's data.task)
    for key, text in reversed(applied):
        if dotted and key.startswith(dotted + "."):
            return f"override {text!r}"
    return source


# ---------------------------------------------------------------------------------------------------
# Reference: the README's config table is generated from the schema (a test keeps them in sync)
# ---------------------------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("NoneType", "null").replace("Literal", "one of ")


def reference_markdown() -> str:
    """Every config key as a Markdown table: dotted key, type, default, description."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if (section := _section_model(ann)) is not None:
                if field.description:  # a section with a note of its own (data: required)
                    rows.append(f"| `{prefix}{name}` | section | | {field.description} |")
                walk(section, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            shown = (
                "null"
                if default is None
                else json.dumps(default)
                if not isinstance(default, str)
                else default
            )
            desc = (field.description or "").replace("|", "\\|")
            kind = _type_name(ann).replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {kind} | `{shown}` | {desc} |")

    walk(Config, "")
    return "\n".join(rows)
