"""Config loading: strict schema, overrides, one-line errors naming the field or file:line."""

from __future__ import annotations

import pytest

from fusedtune.trainer.config import Config, load_config
from fusedtune.trainer.errors import ConfigError


def test_default_config_resolves():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.method == "lora" and cfg.data.task == "dates"
    assert load_config(None, ["lora.rank=8"]).lora.rank == 8


def test_overrides_parse_yaml_values():
    cfg = load_config(
        None, ["optim.lr=3e-4", "lora.target_modules=[q_proj, v_proj]", "optim.max_grad_norm=null"]
    )
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.optim.max_grad_norm is None
    assert load_config(None, ["lora.target_modules=q_proj"]).lora.target_modules == ["q_proj"]  # one name


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.lrr=1"], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        (["train.lr=1"], "did you mean 'optim.lr'?"),
        (["trian.steps=1"], "did you mean 'train'?"),
        (["optim.lr=-1"], "optim.lr: Input should be greater than 0"),
        (["optim.lr=0"], "optim.lr: Input should be greater than 0"),
        (["train.micro_batch_size=0"], "train.micro_batch_size: Input should be greater than or equal to 1"),
        (["lora.rank=abc"], "lora.rank: Input should be a valid integer"),
        (["method=foo"], "method: Input should be 'lora', 'qlora', 'full' or 'partial'"),
        (["data.task=null"], "set data.train (a file) or data.task"),
        (["method=partial"], "method 'partial' needs partial.patterns"),
        (["optim.betas=[0.9, 1.5]"], "optim.betas must lie in [0, 1)"),
        (["data.eval_fraction=0.1"], "data.eval_fraction: a built-in task brings its own held-out set"),
        (["data.eval=x.jsonl"], "data.eval: a built-in task brings its own held-out set"),
        (["data.format=text"], "data.format: a built-in task's rows are messages, not 'text'"),
        (["lora.dropout=1.0"], "lora.dropout: Input should be less than 1"),
        (["novalue"], "expected key=value"),
        ([".rank=3"], "override '.rank=3': the key has an empty part"),
        (
            ["lora.target_modules=[]"],
            "lora.target_modules: an empty list adapts nothing (null: every block Linear)",
        ),
        (["lora..rank=3"], "override 'lora..rank=3': the key has an empty part"),
        # numpy seeds are 0 .. 2**32 - 1: anything else crashed in the loop
        (["train.seed=-1"], "train.seed: Input should be greater than or equal to 0"),
        (["train.seed=4294967296"], "train.seed: Input should be less than 4294967296"),
        # non-finite floats: eps=inf trained nothing, epochs=inf crashed
        (["optim.eps=.inf"], "optim.eps: Input should be a finite number"),
        (["optim.lr=.inf"], "optim.lr: Input should be a finite number"),
        (["optim.lr=.nan"], "optim.lr: Input should be a finite number"),
        (["lora.alpha=.inf"], "lora.alpha: Input should be a finite number"),
        (["optim.weight_decay=.inf"], "optim.weight_decay: Input should be a finite number"),
        (["train.epochs=.inf"], "train.epochs: Input should be a finite number"),
        # booleans are not numbers: rank=true was rank 1
        (["lora.rank=true"], "lora.rank: Input should be a number, not a boolean"),
        (["train.max_steps=true"], "train.max_steps: Input should be a number, not a boolean"),
        (["optim.lr=false"], "optim.lr: Input should be a number, not a boolean"),
        (["optim.betas=[true, 0.9]"], "optim.betas: Input should be a number, not a boolean"),
    ],
)
def test_bad_values_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert expected in msg
    assert "\n" not in msg


def test_duplicate_yaml_key_names_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: lora\nmodel:\n  dtype: fp32\nmethod: full\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:4: duplicate key 'method' \(first at line 1\)"):
        load_config(path)


def test_numbers_at_their_bounds_and_booleans_where_booleans_belong():
    cfg = load_config(None, ["train.seed=4294967295", "model.trust_remote_code=true", "data.max_seq_len=8.0"])
    assert cfg.train.seed == 2**32 - 1 and cfg.model.trust_remote_code is True and cfg.data.max_seq_len == 8


def test_override_errors_name_the_override_not_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora:\n  rank: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["lora.rank=4", "train.max_steps=3=4"])
    assert str(err.value).startswith("override 'train.max_steps=3=4': train.max_steps: Input should be")
    with pytest.raises(ConfigError, match=r"^override 'optim\.learning_rate=1': unknown key"):
        load_config(path, ["optim.learning_rate=1"])
    path.write_text("lora:\n  rank: x\n")  # the file's own mistake is still the file's
    with pytest.raises(ConfigError, match=r"^.*run\.yaml: lora\.rank: Input should be a valid integer"):
        load_config(path, ["train.max_steps=3"])


def test_yaml_merge_keys_work_and_duplicates_are_still_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "lora: &b\n  rank: 8\n  alpha: 16\n"
        "train:\n  <<: {max_steps: 2, seed: 5}\n  seed: 7\n"  # an explicit key wins over a merged one
        "optim:\n  <<: [{lr: 0.5}]\n"
        "data: {task: dates}\n"
    )
    cfg = load_config(path)
    assert (cfg.lora.rank, cfg.lora.alpha) == (8, 16.0)
    assert (cfg.train.max_steps, cfg.train.seed, cfg.optim.lr) == (2, 7, 0.5)
    path.write_text("train:\n  <<: {max_steps: 2}\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:4: duplicate key 'seed' \(first at line 3\)"):
        load_config(path)
    path.write_text("train:\n  <<: {seed: 1, seed: 2}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:2: duplicate key 'seed'"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lora:\n  rank: 8\x1b[D\n", r"run\.yaml:2: invalid YAML: character #x001b is not allowed"),
        ("method: lora\n? [a, b]\n: 1\n", r"run\.yaml:2: invalid YAML: found unhashable key"),
        (
            "x: !!python/object:os.system ls\n",
            r"run\.yaml:1: invalid YAML: could not determine a constructor",
        ),
        # YAML 1.1 reads `on:` as True and `1:` as 1: the line, and to quote it
        (
            "train:\n  max_steps: 2\non: 1\n",
            r"run\.yaml:3: key 'on' is read by YAML as bool True; .*quote it",
        ),
        ("data:\n  1: x\n", r"run\.yaml:2: key '1' is read by YAML as int 1"),
    ],
    ids=["control character", "unhashable key", "python tag", "boolean key", "number key"],
)
def test_yaml_errors_are_one_line_with_file_and_line(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: lora\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["lora.rank=4", "train.max_steps=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg and again.digest() == cfg.digest()


def test_a_config_without_data_is_refused_not_defaulted(tmp_path):
    """Forgetting the data section must not train on the built-in task (it used to, silently)."""
    path = tmp_path / "run.yaml"
    path.write_text("method: lora\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: data: set data\.train \(a file\) or data\.task"):
        load_config(path)
    assert load_config(path, ["data.task=dates"]).data.task == "dates"


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("rank=8", "'lora.rank'"),
        ("lr=1e-4", "'optim.lr'"),
        ("seed=1", "'train.seed' or 'data.seed'"),
        ("learning_rate=1e-4", "'optim.lr'"),
        ("batch_size=2", "'train.micro_batch_size'"),
        ("optim.learning_rate=1e-4", "'optim.lr'"),
        ("lora.rnk=4", "'lora.rank'"),
        ("optim.LR=1e-4", "'optim.lr'"),
        ("LoRA.rank=4", "'lora'"),
        ("lora.Lora_Alpha=8", "'lora.alpha'"),
        ("model.name=x", "'model.name_or_path'"),
        ("train.name=adamw", "'optim.name'"),
        ("train.save_steps=10", "'train.save_every'"),  # not max_steps: that would change the run's length
        ("train.eval_steps=10", "'train.eval_every'"),
        ("train.logging_steps=1", "'train.log_every'"),
        ("optimizer={lr: 1e-4}", "'optim'"),  # a mapping: the section
        ("optimizer=adamw", "'optim.name'"),
        ("train.output_dir=x", "'output_dir'"),  # a top-level field
        ("model.method=lora", "'method'"),
        ("model_name_or_path=x", "'model.name_or_path'"),
        ("data.path=x.jsonl", "'data.train'"),
        ("data.max_length=64", "'data.max_seq_len'"),
        ("dataset=x.jsonl", "'data.train'"),  # a value: never the train section
        ("model.path=x", "'model.name_or_path'"),
        ("train.eval=x.jsonl", "'data.eval'"),
    ],
)
def test_unknown_keys_suggest_the_key_meant(override, hint):
    """A section's own name or a usual alias beats a name spelled alike (rank=8 suggested 'train');
    keys are matched without case, and a field of the same section that the key begins comes before
    the same name in another section (model.name suggested 'optim.name')."""
    with pytest.raises(ConfigError, match=f"did you mean {hint}\\?"):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data=null"], "override 'data=null': data: set data.train (a file) or data.task"),
        (
            ["data.train=x.jsonl"],
            "override 'data.train=x.jsonl': data: set only one of data.train and data.task",
        ),
        (["data.task=null"], "override 'data.task=null': data: set data.train (a file) or data.task"),
    ],
)
def test_a_sections_check_failing_on_an_override_below_it_names_it(overrides, expected):
    """The embedded default sets data.task: an override that clashes with it, or removes it, is named."""
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(expected)


def test_an_override_fills_a_section_left_empty(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  # task: dates\n")  # every key commented out: data is null
    assert load_config(path, ["data.task=dates"]).data.task == "dates"


def test_a_sections_own_check_names_the_override():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.betas=[0.9, 1.0]"])
    assert (
        str(err.value) == "override 'optim.betas=[0.9, 1.0]': optim.betas must lie in [0, 1), got [0.9, 1.0]"
    )


def test_readme_config_reference_matches_schema():
    """The README's config table is the schema's: regenerate it with reference_markdown() when this fails."""
    from pathlib import Path

    from fusedtune.trainer.config import reference_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("<!-- config-reference")
    start = readme.index("\n", start) + 1
    end = readme.index("<!-- /config-reference -->")
    assert readme[start:end].strip() == reference_markdown().strip()


def test_default_lr_follows_the_method():
    """Whole matrices take a ~10x smaller step than adapters; an explicit lr always wins."""
    lr = lambda **tree: Config.model_validate({"data": {"task": "dates"}, **tree}).optim.lr
    assert lr() == pytest.approx(2e-4)
    assert lr(method="qlora") == pytest.approx(2e-4)
    assert lr(method="full") == pytest.approx(2e-5)
    assert lr(method="partial", partial={"last_n_layers": 1}) == pytest.approx(2e-5)
    assert lr(method="full", optim={"lr": 1e-3}) == pytest.approx(1e-3)


def test_large_lr_for_whole_matrices_is_called_out():
    from fusedtune.trainer.loop import lr_warning

    assert lr_warning(load_config()) is None  # the embedded default: lora at 1e-3
    line = lr_warning(load_config(None, ["method=full"]))  # the same lr on whole matrices
    assert line == (
        "optim.lr 0.001 is large for method full (the model's own weights train, not adapters; 1e-5 to 5e-5 is usual, "
        "the default for full/partial is 2e-05)"
    )
    assert lr_warning(load_config(None, ["method=full", "optim.lr=2e-5"])) is None


def test_chained_yaml_merges_load_as_safe_load_does(tmp_path):
    """A mapping merged into another that is merged in turn: PyYAML flattens the middle one in place,
    which must not read as a duplicate key."""
    import yaml

    from fusedtune.trainer.config import _read_yaml

    text = "a: &a {x: 1, y: 2}\nb: &b {<<: *a, x: 3}\nc: {<<: *b, z: 4}\n"
    (tmp_path / "m.yaml").write_text(text)
    assert _read_yaml(tmp_path / "m.yaml") == yaml.safe_load(text)


def test_text_fields_keep_an_override_as_typed(tmp_path):
    """A string field takes an override's text as typed, not as the YAML scalar it would parse to; in a
    file (where the text is gone) the error says to quote it."""
    cfg = load_config(None, ["output_dir=0755", "data.task=null", "data.train=2024-06-01"])
    assert cfg.output_dir == "0755" and cfg.data.train == "2024-06-01"
    assert load_config(None, ["output_dir=[exp]"]).output_dir == "[exp]"  # a list: the text
    for text in ("~", "#run1", ""):  # null to YAML: refused (`~` would be the home directory), saying why
        with pytest.raises(ConfigError, match=r"output_dir: Input should be a valid string \(got null: YAML"):
            load_config(None, [f"output_dir={text}"])
    with pytest.raises(ConfigError, match=r"output_dir: String should have at least 1 character"):
        load_config(None, ["output_dir=''"])
    assert load_config(None, ["data.task=dates", "data.train=null"]).data.train is None  # optional: null
    assert load_config(None, ["train.max_steps=0755"]).train.max_steps == 493  # elsewhere YAML's scalars
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: 0755\n")
    with pytest.raises(
        ConfigError, match=r"\(got 493\); YAML read the value as a number, date or boolean: quote it"
    ):
        load_config(path)
