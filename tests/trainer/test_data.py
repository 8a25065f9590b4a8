"""Data stage: formats and their labels, overlength policies, sources, the eval split, packing,
batching, epoch order, and a one-line error naming file:line for every bad input."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from fusedtune.trainer.config import DataConfig
from fusedtune.trainer.data import (
    IGNORE_INDEX,
    Example,
    build_datasets,
    collate,
    encode_messages,
    epoch_order,
    pack,
)
from fusedtune.trainer.errors import DataError

VOCAB = 400  # the tiny model's embedding rows
EOS = "<|im_end|>"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(tmp_path, tokenizer, rows, vocab_size=VOCAB, name="train.jsonl", **cfg):
    path = write_jsonl(tmp_path / name, rows)
    return build_datasets(DataConfig(train=str(path), **cfg), tokenizer, vocab_size)


def target_spans(example: Example) -> list[list[int]]:
    """The runs of consecutive target tokens in an example's labels."""
    spans, current = [], []
    for label in example.labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return [*spans, current] if current else spans


@pytest.fixture
def no_template_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    return tok


# ---------------------------------------------------------------------------------------------------
# Formats and labels
# ---------------------------------------------------------------------------------------------------


def test_text_format_has_loss_on_every_token_and_ends_with_eos(tmp_path, tiny_tokenizer):
    data = build(tmp_path, tiny_tokenizer, [{"text": "The quick brown fox"}, {"text": "jumps over"}])
    assert data.format == "text"
    first = data.train[0]
    assert first.labels == first.input_ids
    assert first.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(first.input_ids) == "The quick brown fox" + EOS
    assert first.source.endswith("train.jsonl:1")
    assert data.eval == [] and data.eval_rows == [] and data.task is None


@pytest.mark.parametrize("extra", ["", "a lazy dog"])
def test_alpaca_with_chat_template_masks_the_prompt(tmp_path, tiny_tokenizer, extra):
    row = {"instruction": "Write the date", "input": extra, "output": "2024-03-05"}
    data = build(tmp_path, tiny_tokenizer, [row])
    assert data.format == "alpaca"
    (example,) = data.train
    user = "Write the date" + (f"\n\n{extra}" if extra else "")
    prompt = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    (span,) = target_spans(example)
    assert tiny_tokenizer.decode(span) == "2024-03-05<|im_end|>\n"
    n_prompt = example.labels.index(span[0])
    assert tiny_tokenizer.decode(example.input_ids[:n_prompt]) == prompt
    assert all(label == IGNORE_INDEX for label in example.labels[:n_prompt])


@pytest.mark.parametrize("extra", ["", "the input"])
def test_alpaca_without_chat_template_uses_the_classic_prompt(tmp_path, no_template_tokenizer, extra):
    tok = no_template_tokenizer
    row = {"instruction": "Sort these", "input": extra, "output": "done"}
    (example,) = build(tmp_path, tok, [row]).train
    (span,) = target_spans(example)
    assert tok.decode(span) == "done" + EOS
    prompt = tok.decode(example.input_ids[: len(example.input_ids) - len(span)])
    assert prompt.startswith("Below is an instruction")
    expected_tail = "### Instruction:\nSort these\n\n" + (f"### Input:\n{extra}\n\n" if extra else "")
    assert prompt.endswith(expected_tail + "### Response:\n")
    assert ("### Input:" in prompt) == bool(extra)


def test_multi_turn_messages_have_loss_on_each_assistant_turn_only(tmp_path, tiny_tokenizer):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "March?"},
            {"role": "assistant", "content": "03"},
            {"role": "user", "content": "May?"},
            {"role": "assistant", "content": "05"},
        ]
    }
    data = build(tmp_path, tiny_tokenizer, [row])
    assert data.format == "messages"
    (example,) = data.train
    spans = [tiny_tokenizer.decode(s) for s in target_spans(example)]
    assert spans == ["03<|im_end|>\n", "05<|im_end|>\n"]
    assert tiny_tokenizer.decode(example.input_ids) == tiny_tokenizer.apply_chat_template(
        row["messages"], tokenize=False
    )
    n_targets = sum(label != IGNORE_INDEX for label in example.labels)
    assert n_targets == sum(len(s) for s in target_spans(example))


@pytest.mark.parametrize(
    "row",
    [
        {"instruction": "Sort these", "output": "done"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ],
    ids=["alpaca", "messages"],
)
def test_completion_only_false_has_loss_on_every_token(tmp_path, tiny_tokenizer, row):
    on = build(tmp_path, tiny_tokenizer, [row], completion_only=True).train[0]
    off = build(tmp_path, tiny_tokenizer, [row], completion_only=False).train[0]
    assert off.input_ids == on.input_ids
    assert off.labels == off.input_ids
    assert on.labels != on.input_ids


def test_examples_without_targets_are_dropped_and_counted(tmp_path, tiny_tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ]
    data = build(tmp_path, tiny_tokenizer, rows)
    assert [e.source.rsplit("/", 1)[-1] for e in data.train] == ["train.jsonl:2"]
    assert data.train_stats.dropped_no_targets == 1


def test_builtin_task_builds_messages_examples(tiny_tokenizer):
    data = build_datasets(DataConfig(task="dates", num_train=12, num_eval=5), tiny_tokenizer, VOCAB)
    assert data.format == "messages" and data.task is not None and data.task.name == "dates"
    assert len(data.train) == 12 and len(data.eval) == 5 and len(data.eval_rows) == 5
    assert data.train[3].source == "task:dates#3"
    for example, row in zip(data.eval, data.eval_rows):
        (span,) = target_spans(example)
        assert tiny_tokenizer.decode(span) == row["answer"] + "<|im_end|>\n"


# ---------------------------------------------------------------------------------------------------
# Overlength
# ---------------------------------------------------------------------------------------------------

LONG = {"text": "The quick brown fox jumps over the lazy dog. " * 3}
SHORT = {"text": "fox"}


def test_truncate_cuts_to_max_seq_len(tmp_path, tiny_tokenizer):
    full = build(tmp_path, tiny_tokenizer, [LONG]).train[0]
    data = build(tmp_path, tiny_tokenizer, [LONG, SHORT], max_seq_len=8, overlength="truncate")
    assert len(full.input_ids) > 8
    assert data.train[0].input_ids == full.input_ids[:8]
    assert data.train[0].labels == full.labels[:8]
    assert data.train_stats.truncated == 1 and len(data.train) == 2


def test_drop_removes_counts_and_reports_overlength_examples(tmp_path, tiny_tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="fusedtune.trainer.data"):
        data = build(tmp_path, tiny_tokenizer, [LONG, SHORT, LONG], max_seq_len=8, overlength="drop")
    assert [e.source.rsplit(":", 1)[-1] for e in data.train] == ["2"]
    assert data.train_stats.dropped_overlength == 2
    assert "data: train: 3 rows, 2 dropped as longer than data.max_seq_len" in caplog.text


def test_truncating_away_the_response_drops_the_example(tmp_path, tiny_tokenizer):
    rows = [{"instruction": LONG["text"], "output": "ok"}, {"instruction": "Sort", "output": "ok"}]
    data = build(tmp_path, tiny_tokenizer, rows, max_seq_len=24)
    assert [e.source.rsplit(":", 1)[-1] for e in data.train] == ["2"]
    assert data.train_stats.truncated == 1 and data.train_stats.dropped_no_targets == 1


# ---------------------------------------------------------------------------------------------------
# Sources and the eval split
# ---------------------------------------------------------------------------------------------------


def test_eval_fraction_split_is_disjoint_complete_and_deterministic(tmp_path, tiny_tokenizer):
    rows = [{"text": f"fox {i}"} for i in range(20)]
    a = build(tmp_path, tiny_tokenizer, rows, eval_fraction=0.25, seed=0)
    again = build(tmp_path, tiny_tokenizer, rows, eval_fraction=0.25, seed=0)
    other = build(tmp_path, tiny_tokenizer, rows, eval_fraction=0.25, seed=1)
    train_src = [e.source for e in a.train]
    eval_src = [e.source for e in a.eval]
    assert len(eval_src) == 5 and len(train_src) == 15
    assert set(train_src).isdisjoint(eval_src)
    assert sorted(train_src + eval_src, key=lambda s: int(s.rsplit(":", 1)[1])) == [
        f"{tmp_path / 'train.jsonl'}:{i}" for i in range(1, 21)
    ]
    assert a.eval_rows == [rows[int(s.rsplit(":", 1)[1]) - 1] for s in eval_src]
    assert eval_src == [e.source for e in again.eval]
    assert eval_src != [e.source for e in other.eval]


def test_eval_file(tmp_path, tiny_tokenizer):
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"text": "lazy dog"}])
    data = build(tmp_path, tiny_tokenizer, [{"text": "fox"}], eval=str(eval_path))
    assert [e.source for e in data.eval] == [f"{eval_path}:1"]
    assert data.eval_rows == [{"text": "lazy dog"}]


def test_jsonl_blank_lines_keep_line_numbers(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    data = build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB)
    assert [e.source for e in data.train] == [f"{path}:1", f"{path}:4"]


def test_json_array_rows_are_named_by_their_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a"},\n\n  {"text":\n    "b"},\n  {"text": "c"}\n]\n')
    data = build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB)
    assert [e.source for e in data.train] == [f"{path}:2", f"{path}:4", f"{path}:6"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tabular_files_through_datasets(tmp_path, tiny_tokenizer, suffix):
    pandas = pytest.importorskip("pandas")
    pytest.importorskip("datasets")
    frame = pandas.DataFrame(
        {"instruction": ["Sort these", "Write the date"], "input": ["", "x"], "output": ["done", "2024"]}
    )
    path = tmp_path / f"train{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    data = build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB)
    assert data.format == "alpaca"
    # csv: the line a record starts on; parquet has no lines, its rows are counted
    expected = [f"{path}:2", f"{path}:3"] if suffix == ".csv" else [f"{path}:row 1", f"{path}:row 2"]
    assert [e.source for e in data.train] == expected
    assert [tiny_tokenizer.decode(target_spans(e)[0]) for e in data.train] == [
        "done<|im_end|>\n",
        "2024<|im_end|>\n",
    ]


def test_csv_columns_are_read_as_text(tmp_path, tiny_tokenizer):
    # CSV has no types: numeric-looking answers stay strings, leading zeros included.
    pytest.importorskip("datasets")
    path = tmp_path / "train.csv"
    path.write_text("instruction,input,output\nZip code?,,01234\nWhat is 3+3?,,6\n")
    data = build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB)
    assert [tiny_tokenizer.decode(target_spans(e)[0]) for e in data.train] == [
        "01234<|im_end|>\n",
        "6<|im_end|>\n",
    ]


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, naming file:line or the field
# ---------------------------------------------------------------------------------------------------

GOOD = '{"text": "fox"}'
ALPACA = '{"instruction": "Sort", "output": "done"}'
CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
LONG_LINE = json.dumps(LONG)

BAD_INPUTS = {
    # id: (lines of train.jsonl, config overrides, vocab size, expected message (with {dir} for tmp_path))
    "invalid json": ([GOOD] * 6 + ['{"text": "a" "b"}'], {}, VOCAB, "train.jsonl:7: invalid JSON (Expecting ',' delimiter, column 14)"),
    "control character": ([GOOD, '{"text": "a\x00b"}'], {}, VOCAB, "train.jsonl:2: invalid JSON (Invalid control character at column 12)"),
    "not an object": ([GOOD, "[1, 2]"], {}, VOCAB, "train.jsonl:2: expected a JSON object per line, got list"),
    "alpaca no output": ([ALPACA, ALPACA, '{"instruction": "x"}'], {}, VOCAB, "train.jsonl:3: alpaca row's 'output' field is missing"),
    "alpaca output not str": ([ALPACA, '{"instruction": "x", "output": 5}'], {}, VOCAB, "train.jsonl:2: alpaca field 'output' must be a string, got int"),
    "messages null": (['{"messages": null}'], {}, VOCAB, "train.jsonl:1: messages row's 'messages' field is empty"),
    "text null": (['{"text": null}'], {}, VOCAB, "train.jsonl:1: text row's 'text' field is empty"),
    "text missing": (['{"txt": "a"}'], {"format": "text"}, VOCAB, "train.jsonl:1: text row's 'text' field is missing"),
    "unknown keys": (['{"prompt": "a", "completion": "b"}'], {}, VOCAB, "train.jsonl:1: cannot tell the data format from the keys ['completion', 'prompt']"),
    "empty file": ([], {}, VOCAB, "{dir}/train.jsonl: no examples"),
    "blank file": (["", "  "], {}, VOCAB, "{dir}/train.jsonl: no examples"),
    "all masked": (['{"messages": [{"role": "user", "content": "hi"}]}'] * 2, {}, VOCAB, "{dir}/train.jsonl: every label is masked in all 2 rows"),
    "overlength error": ([GOOD] * 4 + [LONG_LINE], {"max_seq_len": 8, "overlength": "error"}, VOCAB, "train.jsonl:5: example is {long} tokens > data.max_seq_len=8 (data.overlength=error)"),
    "all dropped": ([LONG_LINE], {"max_seq_len": 8, "overlength": "drop"}, VOCAB, "{dir}/train.jsonl: no examples left: all 1 are longer than data.max_seq_len=8"),
    "unknown role": ([CHAT, '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}'], {}, VOCAB, "train.jsonl:2: messages[1] has unknown role 'bot' (known: system, user, assistant, tool)"),
    "message not object": (['{"messages": ["hi"]}'], {}, VOCAB, "train.jsonl:1: messages[0] must be an object with 'role' and 'content'"),
    "messages empty": (['{"messages": []}'], {}, VOCAB, "train.jsonl:1: 'messages' must be a non-empty list"),
    "duplicate key": ([GOOD, '{"text": "a", "text": "b"}'], {}, VOCAB, "train.jsonl:2: duplicate key 'text' in one JSON object (which one is meant?)"),
    "duplicate key in a message": ([GOOD, '{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}'], {}, VOCAB, "train.jsonl:2: duplicate key 'role' in one JSON object"),
    "lone surrogate": (['{"text": "bad \\ud800 row"}'], {}, VOCAB, "train.jsonl:1: field 'text' holds an unpaired surrogate (invalid Unicode)"),
    "lone surrogate in messages": (['{"messages": [{"role": "user", "content": "\\udfff"}]}'], {}, VOCAB, "train.jsonl:1: messages[0] content holds an unpaired surrogate"),
    "content not str": (['{"messages": [{"role": "user", "content": ["a"]}]}'], {}, VOCAB, "train.jsonl:1: messages[0] content must be a string, got list"),
    "id beyond embedding": ([GOOD], {}, 50, "train.jsonl:1: tokenizer produces id {fox_max} but the model's embedding has 50 rows"),
    "pad beyond embedding": ([GOOD], {}, 3, "tokenizer: its pad token id 3 is beyond the model's embedding of 3 rows"),
    "missing file": (None, {"train": "nope/x.jsonl"}, VOCAB, "data.train: file not found: nope/x.jsonl"),
    "missing eval file": ([GOOD], {"eval": "nope/e.jsonl"}, VOCAB, "data.eval: file not found: nope/e.jsonl"),
    "unsupported type": (None, {"train": "{dir}/train.txt"}, VOCAB, "data.train: unsupported file type '.txt' for {dir}/train.txt"),
    "directory": (None, {"train": "{dir}"}, VOCAB, "data.train: {dir} is a directory, expected a data file"),
    "eval and fraction": ([GOOD], {"eval": "{dir}/train.jsonl", "eval_fraction": 0.5}, VOCAB, "data.eval_fraction: set either data.eval (a file) or data.eval_fraction, not both"),
    "split of one row": ([GOOD], {"eval_fraction": 0.5}, VOCAB, "train.jsonl: data.eval_fraction needs at least 2 rows to split, the file has 1"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_place(tmp_path, tiny_tokenizer, case):
    lines, overrides, vocab_size, expected = BAD_INPUTS[case]
    (tmp_path / "train.txt").write_text("fox\n")
    if lines is not None:
        (tmp_path / "train.jsonl").write_text("".join(line + "\n" for line in lines))
    overrides = {k: v.format(dir=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
    cfg = DataConfig(**{"train": str(tmp_path / "train.jsonl"), **overrides})
    with pytest.raises(DataError) as info:
        build_datasets(cfg, tiny_tokenizer, vocab_size)
    message = str(info.value)
    assert "\n" not in message
    long = len(tiny_tokenizer(LONG["text"]).input_ids) + 1  # + EOS
    fox_max = max(tiny_tokenizer("fox").input_ids)
    assert expected.format(dir=tmp_path, long=long, fox_max=fox_max) in message


FILE_SHAPES = {
    # id: (file name, content, expected message ({path}: the file))
    "csv extra field": ("t.csv", "instruction,output\na,b\nc,d,e\n", "{path}:3: the record has 3 fields, the header has 2"),
    "csv missing field": ("t.csv", "instruction,output\na,b\n\nc\n", "{path}:4: the record has 1 fields, the header has 2"),
    "csv ragged after a quoted newline": ("t.csv", 'text,x\n"a\nb",1\nc,1,2\n', "{path}:4: the record has 3 fields"),
    "tsv extra field": ("t.tsv", "text\thello\nmore\tx\ty\n", "{path}:2: the record has 3 fields, the header has 2"),
    "csv bad quoting": ("t.csv", 'text,x\na,b\n"c"d,e\n', "{path}:3: malformed .csv ("),
    "csv duplicate column": ("t.csv", "text,text\na,b\n", "{path}:1: duplicate column 'text' in the header"),
    "csv header only": ("t.csv", "instruction,output\n", "{path}: no examples"),
    "csv header with a space": ("t.csv", "instruction, output\na,b\n", "{path}:2: alpaca row's 'output' field is missing (there is a column ' output': mind the spaces or case in the header)"),
    "csv empty": ("t.csv", "", "{path}: no examples"),
    "csv not utf-8": ("t.csv", b"text\nok\n\xff\n", "{path}:3: not UTF-8 text"),
    "json object": ("t.json", '{\n  "data": [\n    {"text": "a"}\n  ]\n}\n', "{path}:1: expected a JSON array of objects (or JSON Lines, one object per line), got an object with keys 'data'; are the rows the list under 'data'?"),
    "json object on one line": ("t.json", '{"data": [{"text": "a"}]}', "{path}:1: expected a JSON array of objects"),
    "json empty object": ("t.json", "{}", "{path}:1: expected a JSON array of objects (or JSON Lines, one object per line), got an empty object"),
    "parquet not parquet": ("t.parquet", "not parquet", "{path}: cannot read as .parquet (Parquet magic bytes not found"),
}  # fmt: skip


@pytest.mark.parametrize("case", FILE_SHAPES, ids=list(FILE_SHAPES))
def test_file_shape_errors_are_one_line_naming_the_file(tmp_path, tiny_tokenizer, case):
    name, content, expected = FILE_SHAPES[case]
    if name.endswith(".parquet"):
        pytest.importorskip("datasets")
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as info:
        build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB)
    message = str(info.value)
    assert "\n" not in message
    assert expected.format(path=path) in message, message


def corrupt_parquet(path):
    """A parquet file whose footer reads but whose data pages do not: datasets fails while generating."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["a" * 50] * 100}), path, compression="none", row_group_size=10)
    blob = bytearray(path.read_bytes())
    blob[400:460] = b"\x07" * 60
    path.write_bytes(bytes(blob))
    return path


def test_parquet_error_names_the_readers_reason(tmp_path, tiny_tokenizer):
    # datasets wraps it: "An error occurred while generating the dataset" said nothing
    pytest.importorskip("datasets")
    path = corrupt_parquet(tmp_path / "train.parquet")
    with pytest.raises(
        DataError, match=r"train\.parquet: cannot read as \.parquet \(Couldn't deserialize thrift"
    ):
        build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB)


def test_empty_parquet_has_no_examples(tmp_path, tiny_tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), path)
    with pytest.raises(DataError, match=rf"^{path}: no examples"):
        build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB)


def test_csv_reads_quoted_newlines_blank_lines_and_empty_cells(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.csv"
    path.write_text('instruction,input,output\n"Two\nlines",,"a, b"\n\nWhat?,x,\n')
    with pytest.raises(DataError, match=r"train\.csv:5: alpaca row's 'output' field is empty"):
        build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB)  # an empty cell is missing
    path.write_text('instruction,input,output\n"Two\nlines",,"a, b"\n\nWhat?,x,y\n')
    data = build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB)
    assert [e.source for e in data.train] == [f"{path}:2", f"{path}:5"]  # the lines the records start on
    assert tiny_tokenizer.decode(target_spans(data.train[0])[0]) == "a, b<|im_end|>\n"


def test_json_file_with_one_row_object_on_one_line_is_json_lines(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.json"
    path.write_text('{"text": "fox"}\n')
    assert len(build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB).train) == 1
    path.write_text('{"text": "fox"}\n{"text": "dog"}\n')
    assert len(build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB).train) == 2


def test_json_array_errors_name_the_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a"},\n  "b"\n]\n')
    with pytest.raises(DataError, match=r"train\.json:3: expected a JSON object, got str$"):
        build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB)
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n')
    with pytest.raises(DataError, match=r"train\.json:3: invalid JSON \(Expecting value, column 12\)$"):
        build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB)
    path.write_text('[\n  {"text": "a"},\n\n  {"text": "b",\n   "text": "c"}\n]\n')
    with pytest.raises(DataError, match=r"train\.json:4: duplicate key 'text' in one JSON object"):
        build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB)


def test_messages_need_a_chat_template(tmp_path, no_template_tokenizer):
    with pytest.raises(
        DataError, match=r"train\.jsonl:1: a messages dataset needs a tokenizer with a chat template"
    ):
        build(tmp_path, no_template_tokenizer, [json.loads(CHAT)])


def test_template_that_rerenders_earlier_turns_is_refused(tmp_path, tiny_tokenizer):
    """A template that marks the last message differently makes prefixes inconsistent."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
        "{% if loop.last %}{{ ' (last)' }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    rows = [json.loads(CHAT)]
    with pytest.raises(DataError, match=r"train\.jsonl:1: the chat template does not render messages\[:1\]"):
        build(tmp_path, tok, rows)
    assert build(tmp_path, tok, rows, completion_only=False).train  # all-token loss needs no boundaries


def test_reply_whose_leading_whitespace_merges_with_the_generation_prompt(tmp_path):
    """Indented code as the reply: BPE merges the generation prompt's newline with the reply's leading
    spaces into one token, so the prompt's tokens are not a prefix of the conversation's. The reply is
    still located (by character offsets): its tokens, from the merged one, through the end of turn."""
    from tiny import CHATML_TEMPLATE, build_tokenizer

    tok = build_tokenizer(tmp_path / "tok", ["<|im_start|>assistant\n    return x + 1\n    return y\n"] * 8)
    tok.chat_template = CHATML_TEMPLATE
    messages = [
        {"role": "user", "content": "Complete: def f(x):"},
        {"role": "assistant", "content": "    return x + 1"},
    ]
    prompt = tok(tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True))[
        "input_ids"
    ]
    ids, labels = encode_messages(tok, messages, True, "t.jsonl:1")
    assert ids[: len(prompt)] != prompt  # the merge happened: the old token-prefix check refused this row
    first = next(j for j, label in enumerate(labels) if label != IGNORE_INDEX)
    assert first == len(prompt) - 1 and labels[first:] == ids[first:]
    assert tok.decode(ids[first:]).endswith("return x + 1<|im_end|>\n")
    assert "user" not in tok.decode(ids[first:])


def test_conversation_opening_with_an_assistant_turn(tmp_path, tiny_tokenizer):
    rows = [
        {
            "messages": [
                {"role": "assistant", "content": "Hello there"},
                {"role": "user", "content": "Write March 5, 2024"},
                {"role": "assistant", "content": "2024-03-05"},
            ]
        }
    ]
    (ex,) = build(tmp_path, tiny_tokenizer, rows).train
    spans = [tiny_tokenizer.decode(s) for s in target_spans(ex)]
    assert spans == [f"Hello there{EOS}\n", f"2024-03-05{EOS}\n"]


def test_invalid_utf8_after_a_byte_order_mark_names_its_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n' + b'\xff{"text": "b"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: not UTF-8 text"):
        build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB)


@pytest.mark.parametrize("name", ["train.jsonl", "train.json"])
def test_a_byte_order_mark_is_not_data(tmp_path, tiny_tokenizer, name):
    path = tmp_path / name
    body = '{"text": "a b"}\n' if name.endswith("l") else '[{"text": "a b"}]'
    path.write_text(body, encoding="utf-8-sig")
    assert len(build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB).train) == 1


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path, tiny_tokenizer):
    """json.dumps(ensure_ascii=False) writes U+2028/U+2029/U+0085 raw inside strings: one row each."""
    path = tmp_path / "train.jsonl"
    rows = [{"text": f"a{c}b"} for c in ("\u2028", "\u2029", "\u0085")]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    data = build_datasets(DataConfig(train=str(path)), tiny_tokenizer, VOCAB)
    assert len(data.train) == 3


# ---------------------------------------------------------------------------------------------------
# Batching, order, packing
# ---------------------------------------------------------------------------------------------------


def test_collate_right_pads_and_masks():
    examples = [Example([5, 6, 7], [-100, 6, 7], "a"), Example([8], [8], "b")]
    batch = collate(examples, pad_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert {t.dtype for t in batch.values()} == {__import__("torch").long}


def test_epoch_order_is_a_deterministic_permutation_per_seed_and_epoch():
    order = epoch_order(100, seed=7, epoch=2)
    assert sorted(order) == list(range(100))
    assert order == epoch_order(100, seed=7, epoch=2)
    assert order != list(range(100))
    assert order != epoch_order(100, seed=7, epoch=3)
    assert order != epoch_order(100, seed=8, epoch=2)
    assert epoch_order(0, 0, 0) == [] and epoch_order(1, 0, 0) == [0]


def _members(packed, examples, eos):
    """Each packed sequence split back into the examples it holds (separators dropped)."""
    out, it = [], iter(examples)
    for p in packed:
        ids, members = list(p.input_ids), []
        while ids:
            e = next(it)
            if ids[: len(e.input_ids)] != e.input_ids:
                raise AssertionError(f"{p.source}: {e.source} is not whole at its place")
            members.append(e)
            ids = ids[len(e.input_ids) :]
            if ids and ids[0] == eos and e.input_ids[-1] != eos:
                ids = ids[1:]
        out.append(members)
    return out


def test_pack_keeps_examples_whole_in_order(tmp_path, tiny_tokenizer):
    """Whole examples, never cut across sequences (an answer used to start a sequence whose question
    was in the previous one); every token kept, in order; labels travel with their tokens, except the
    first token of a later example, which would be predicted from the one before it."""
    rows = [{"text": "fox " * (i % 4 + 1)} for i in range(9)]  # text examples end with EOS
    examples = build(tmp_path, tiny_tokenizer, rows).train
    eos = tiny_tokenizer.eos_token_id
    packed = pack(examples, max_seq_len=16, eos_id=eos)
    assert all(len(p.input_ids) <= 16 for p in packed) and len(packed) > 1
    groups = _members(packed, examples, eos)
    assert [e for g in groups for e in g] == examples
    for p, group in zip(packed, groups, strict=True):
        assert p.labels == [
            t for i, e in enumerate(group) for t in ([-100, *e.labels[1:]] if i else e.labels)
        ]
        nxt = (
            len(p.input_ids) + len(examples[examples.index(group[-1]) + 1].input_ids)
            if group[-1] is not examples[-1]
            else 0
        )
        assert nxt == 0 or nxt > 16, "a sequence closes only before an example that does not fit"
    assert packed[0].source.startswith("packed#0 [") and "train.jsonl:1 .. " in packed[0].source


def test_pack_separates_examples_not_ending_in_eos_without_loss(tmp_path, tiny_tokenizer):
    rows = [{"instruction": f"Sort {i}", "output": "done"} for i in range(5)]
    examples = build(tmp_path, tiny_tokenizer, rows).train  # chat turns end "<|im_end|>\n"
    eos = tiny_tokenizer.eos_token_id
    assert max(len(e.input_ids) for e in examples) < 40
    packed = pack(examples, max_seq_len=48, eos_id=eos)
    assert len(packed) > 1
    for p, group in zip(packed, _members(packed, examples, eos), strict=True):
        expected_ids = [t for i, e in enumerate(group) for t in ([eos] if i else []) + e.input_ids]
        expected_labels = [
            t for i, e in enumerate(group) for t in ([-100, -100] if i else e.labels[:1]) + e.labels[1:]
        ]
        assert p.input_ids == expected_ids and p.labels == expected_labels


def test_pack_leaves_out_sequences_without_targets():
    prompt_only = Example([10] * 6, [-100] * 6, "prompt only")
    answered = Example([10, 10, 11, 2], [-100, -100, 11, 2], "answered")
    packed = pack([prompt_only, prompt_only, answered], max_seq_len=8, eos_id=2)
    # none fits beside another (6 + separator + 6, 6 + 1 + 4): the two prompt-only sequences carry no loss
    assert [(p.input_ids, p.labels) for p in packed] == [([10, 10, 11, 2], [-100, -100, 11, 2])]
    assert packed[0].source == "packed#0 [answered]"


def test_a_tokenizer_that_appends_eos_itself_gets_one_eos_at_the_end(tmp_path, tiny_tokenizer):
    """A post-processor that appends EOS (Llama's add_eos_token): text rows got two EOS (the second with
    loss) and alpaca prompts without a chat template an EOS before the response."""
    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer)
    eos = tok.eos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {tok.eos_token}", special_tokens=[(tok.eos_token, eos)]
    )
    assert tok("hi")["input_ids"][-1] == eos
    text = build(tmp_path, tok, [{"text": "hello world"}]).train[0]
    assert text.input_ids.count(eos) == 1 and text.input_ids[-1] == eos
    tok.chat_template = None
    rows = [{"instruction": "Say hi", "output": "hi there"}]
    alpaca = build(tmp_path, tok, rows, name="alpaca.jsonl").train[0]
    assert alpaca.input_ids.count(eos) == 1 and alpaca.input_ids[-1] == eos
    assert tok.decode([t for t, label in zip(alpaca.input_ids, alpaca.labels) if label != IGNORE_INDEX]) == (
        f"hi there{tok.eos_token}"
    )


def test_an_opening_assistant_turn_is_found_by_position_not_by_its_text(tiny_tokenizer):
    """A reply that also occurs in the template's markup ("end" in <|im_end|>) was located at the markup."""
    from fusedtune.trainer.data import encode_messages

    messages = [{"role": "assistant", "content": "end"}, {"role": "user", "content": "q"}]
    ids, labels = encode_messages(tiny_tokenizer, messages, True, "x")
    trained = tiny_tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert trained == "end<|im_end|>\n"


def test_an_emptied_held_out_split_is_named_as_such(tmp_path, tiny_tokenizer):
    """It said "train.jsonl: no examples left" about the held-out half of a split file."""
    rows = [{"text": "a b c"}, {"text": "fox " * 40}]
    messages = set()
    for seed in range(8):  # the long row lands in one half or the other
        with pytest.raises(DataError) as e:
            build(
                tmp_path,
                tiny_tokenizer,
                rows,
                eval_fraction=0.5,
                max_seq_len=12,
                overlength="drop",
                seed=seed,
            )
        messages.add(str(e.value).split(": no examples left")[0].split("train.jsonl ")[1])
    assert messages == {"(its training split)", "(its held-out split, data.eval_fraction=0.5)"}
