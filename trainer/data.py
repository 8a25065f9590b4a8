"""Rows from a file (or a built-in task) -> token ids and labels, ready for the loop.

Formats (``data.format``; ``auto`` detects from the first row's keys):

- ``text``: ``{"text": ...}``. Loss on every token; EOS appended.
- ``alpaca``: ``{"instruction", "input" (optional), "output"}``. With a chat template, the prompt is one
  user message (``instruction``, plus ``"\\n\\n" + input`` when the input is non-empty) and the output the
  assistant message, then handled as ``messages``. Without one, the classic Alpaca
  ``### Instruction / ### Input / ### Response`` prompt, then the output and EOS.
- ``messages``: ``{"messages": [{"role", "content"}, ...]}`` rendered with the tokenizer's chat template.

Labels are aligned with ``input_ids`` (the loop shifts them): a label is the token id where the token
carries loss and -100 where it does not. With ``data.completion_only`` (the default) only the response
carries loss: the alpaca output (+ EOS), and every assistant turn's content and end tokens. The
assistant spans of a conversation are found by rendering its prefixes with the chat template
(``messages[:i]`` with the generation prompt, then ``messages[:i + 1]``), tokenizing each, and checking
each is a token prefix of the whole conversation: a template that re-renders earlier turns differently
is reported instead of silently mislabelled.

Sources: ``.jsonl`` (and a ``.json`` array) are read here so that every error names its exact
``file:line``; so are ``.csv`` and ``.tsv`` (the csv module, every cell as text; a malformed record names
its line). ``.parquet`` goes through the ``datasets`` library. CSV/TSV rows are named by the line their
record starts on, parquet rows by row (``file.parquet:row 7``). Every mistake in the data raises
:class:`DataError` with one line.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import DataConfig
from .errors import DataError

if TYPE_CHECKING:
    from .tasks import Task

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMATS = ("text", "alpaca", "messages")
ROLES = ("system", "user", "assistant", "tool")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# Tabular files: extension -> field delimiter (CSV/TSV, read by _read_csv with the csv module) or None
# (parquet, read through the `datasets` library).
TABULAR_FORMATS: dict[str, str | None] = {".csv": ",", ".tsv": "\t", ".parquet": None}


@dataclass
class Example:
    """One tokenized training or held-out sequence."""

    input_ids: list[int]
    labels: list[int]  # same length; -100 where no loss (prompt tokens, padding)
    source: str  # "path/to/file.jsonl:17" or "task:dates#12": for error messages and sample ids


@dataclass
class DataStats:
    """What happened to the rows on their way to examples."""

    rows: int = 0
    truncated: int = 0  # longer than max_seq_len, cut (overlength=truncate)
    dropped_overlength: int = 0  # longer than max_seq_len, dropped (overlength=drop)
    dropped_no_targets: int = 0  # no token carries loss (e.g. the response was truncated away)

    def describe(self) -> str:
        """One line for the log, e.g. ``1024 rows, 3 truncated to data.max_seq_len``."""
        parts = [f"{self.rows} rows"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to data.max_seq_len")
        if self.dropped_overlength:
            parts.append(f"{self.dropped_overlength} dropped as longer than data.max_seq_len")
        if self.dropped_no_targets:
            parts.append(f"{self.dropped_no_targets} dropped with no target tokens")
        return ", ".join(parts)


@dataclass
class Datasets:
    """Everything the loop and the evaluation need from the data stage."""

    train: list[Example]
    eval: list[Example]  # may be empty
    eval_rows: list[dict]  # the raw held-out rows (for task accuracy via generation); [] if none
    task: Task | None  # the built-in task object, when data.task is set
    format: str  # the resolved format: text | alpaca | messages
    train_stats: DataStats = field(default_factory=DataStats)
    eval_stats: DataStats = field(default_factory=DataStats)


@dataclass
class Row:
    """A raw row and where it came from."""

    data: dict
    source: str  # "file.jsonl:17"


# ---------------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------------


def _json_error(path: str, e: json.JSONDecodeError, line: int | None = None) -> DataError:
    where = f"{e.msg} column {e.colno}" if e.msg.endswith(" at") else f"{e.msg}, column {e.colno}"
    return DataError(f"{path}:{line or e.lineno}: invalid JSON ({where})")


class _DuplicateKey(Exception):
    pass


def _unique_object(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook``: json keeps the last of two equal keys without a word; refuse them."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _duplicate_error(where: str, e: _DuplicateKey) -> DataError:
    return DataError(f"{where}: duplicate key {e.args[0]!r} in one JSON object (which one is meant?)")


def _read_jsonl(path: str, text: str) -> list[Row]:
    rows = []
    # split on "\n" only: str.splitlines also breaks at U+2028/U+2029/U+0085, which JSON strings may hold
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line, object_pairs_hook=_unique_object)
        except json.JSONDecodeError as e:
            raise _json_error(path, e, number) from None
        except _DuplicateKey as e:
            raise _duplicate_error(f"{path}:{number}", e) from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}")
        rows.append(Row(value, f"{path}:{number}"))
    return rows


def _read_json_array(path: str, text: str) -> list[Row]:
    """A JSON array of objects, each named by the line its object starts on."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise _json_error(path, e) from None
    if not isinstance(values, list):
        raise DataError(f"{path}:1: expected a JSON array of objects, got {type(values).__name__}")
    # Walk the array again with raw_decode to learn where each element starts, refusing duplicate keys.
    decoder = json.JSONDecoder(object_pairs_hook=_unique_object)
    position = text.index("[") + 1
    rows = []
    line, counted = 1, 0  # the line number counted incrementally: a large array is not rescanned per row
    for _ in range(len(values)):
        while text[position] in " \t\r\n,":
            position += 1
        line += text.count("\n", counted, position)
        counted = position
        try:
            value, position = decoder.raw_decode(text, position)
        except _DuplicateKey as e:
            raise _duplicate_error(f"{path}:{line}", e) from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(value).__name__}")
        rows.append(Row(value, f"{path}:{line}"))
    return rows


def _undecodable_line(file: Path) -> int:
    """The line of the first byte of ``file`` that is not UTF-8."""
    raw = file.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return raw[: e.start].count(b"\n") + 1
    return 1


def _read_csv(file: Path, path: str, delimiter: str) -> list[Row]:
    """CSV/TSV with the csv module, every cell as text: a malformed row names its ``file:line``.

    CSV has no types ("0123" stays a string); an empty cell is a missing value (``None``), as
    pandas/datasets read it; blank lines are skipped. Rows and errors are named by the line a record
    starts on (``file.csv:LINE``; a quoted cell may hold line breaks).
    """
    csv.field_size_limit(2**31 - 1)  # the default 128 KiB would refuse a long example
    rows: list[Row] = []
    line = 1
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            header = None
            while True:
                line = reader.line_num + 1  # the line this record starts on
                try:
                    record = next(reader)
                except StopIteration:
                    break
                if not record or record == [""]:  # a blank line
                    continue
                if header is None:
                    header = record
                    dup = next((name for i, name in enumerate(header) if name in header[:i]), None)
                    if dup is not None:
                        raise DataError(f"{path}:{line}: duplicate column {dup!r} in the header")
                    continue
                if len(record) != len(header):
                    raise DataError(
                        f"{path}:{line}: the record has {len(record)} fields, the header has {len(header)}"
                    )
                cells = {name: (value if value != "" else None) for name, value in zip(header, record)}
                rows.append(Row(cells, f"{path}:{line}"))
    except UnicodeDecodeError:
        raise DataError(f"{path}:{_undecodable_line(file)}: not UTF-8 text") from None
    except csv.Error as e:
        raise DataError(f"{path}:{line}: malformed {file.suffix.lower()} ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return rows


def _innermost_message(e: BaseException) -> str:
    """The first line of the deepest cause: datasets wraps the reader's error in a generic one."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _json_object_file(path: str, text: str) -> None:
    """Refuse a .json file that is one JSON object (``{"data": [...]}``) rather than rows.

    JSON Lines holding one row (an object with a row's keys, on one line) passes; so does anything that
    is not one whole JSON value (JSON Lines proper, or invalid JSON, whose errors then name the line).
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return
    if not isinstance(value, dict):
        return
    if len(text.strip().split("\n")) == 1 and {"text", "instruction", "messages"} & set(value):
        return
    got = f"an object with keys {', '.join(repr(k) for k in list(value)[:5])}" if value else "an empty object"
    lists = [k for k, v in value.items() if isinstance(v, list)]
    hint = f"; are the rows the list under {lists[0]!r}?" if lists else ""
    raise DataError(
        f"{path}:1: expected a JSON array of objects (or JSON Lines, one object per line), got {got}{hint}"
    )


def _parquet_rows(file: Path) -> int | None:
    """The row count in a parquet file's footer, or None when it cannot be read (datasets then says why)."""
    try:
        import pyarrow.parquet as pq

        return pq.read_metadata(file).num_rows
    except Exception:  # not parquet, or no pyarrow: the reader below reports it
        return None


def _read_tabular(file: Path, path: str, suffix: str) -> list[Row]:
    delimiter = TABULAR_FORMATS[suffix]
    if delimiter is not None:
        return _read_csv(file, path, delimiter)
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path}: reading {suffix} files needs the datasets package (pip install datasets)"
        ) from None
    if _parquet_rows(file) == 0:  # datasets fails on it ("BatchSize must be > 0")
        return []
    try:
        table = datasets.load_dataset("parquet", data_files=str(file), split="train")
    except Exception as e:  # the parquet builder raises many types (pyarrow, ValueError...)
        raise DataError(f"{path}: cannot read as {suffix} ({_innermost_message(e)})") from None
    return [Row(dict(row), f"{path}:row {i + 1}") for i, row in enumerate(table)]


def read_rows(path: str, field_name: str) -> list[Row]:
    """Read every row of a local data file.

    Args:
        path: the file, as written in the config.
        field_name: the config field that named it (``data.train``), for errors.

    Returns:
        The rows in file order, each with its ``file:line`` (``file:row N`` for parquet).

    Raises:
        DataError: missing or unreadable file, unsupported type, invalid JSON, a row that is not an
            object, or no rows at all.
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"{field_name}: file not found: {path}")
    if file.is_dir():
        raise DataError(f"{field_name}: {path} is a directory, expected a data file")
    suffix = file.suffix.lower()
    if suffix in TABULAR_FORMATS:
        rows = _read_tabular(file, path, suffix)
    elif suffix in (".jsonl", ".json"):
        try:
            text = file.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not data
        except UnicodeDecodeError:
            raise DataError(f"{path}:{_undecodable_line(file)}: not UTF-8 text") from None
        except OSError as e:
            raise DataError(f"{field_name}: cannot read {path} ({e.strerror})") from None
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = _read_json_array(path, text)
        elif suffix == ".json" and text.lstrip().startswith("{"):
            _json_object_file(path, text)
            rows = _read_jsonl(path, text)
        else:
            rows = _read_jsonl(path, text)
    else:
        known = ", ".join([".jsonl", ".json", *TABULAR_FORMATS])
        raise DataError(
            f"{field_name}: unsupported file type {suffix or '(none)'!r} for {path} (use {known})"
        )
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


# ---------------------------------------------------------------------------------------------------
# Formats: row -> (input_ids, labels)
# ---------------------------------------------------------------------------------------------------


def detect_format(row: Row) -> str:
    """The format a row's keys say (``data.format: auto`` asks the first row).

    Args:
        row: a raw row.

    Returns:
        ``messages`` (has ``messages``), ``alpaca`` (has ``instruction``) or ``text`` (has ``text``).

    Raises:
        DataError: keys that match no format.
    """
    keys = set(row.data)
    if "messages" in keys:
        return "messages"
    if "instruction" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{row.source}: cannot tell the data format from the keys {sorted(keys)}: expected 'text', "
        "'instruction'/'output' (alpaca) or 'messages' (or set data.format)"
    )


def _string_field(row: Row, key: str, fmt: str, required: bool = True) -> str:
    value = row.data.get(key)
    if value is None:
        if required:
            raise _absent(row, key, fmt)
        return ""
    if not isinstance(value, str):
        raise DataError(f"{row.source}: {fmt} field {key!r} must be a string, got {type(value).__name__}")
    _check_unicode(value, row.source, f"field {key!r}")
    return value


def _absent(row: Row, key: str, fmt: str) -> DataError:
    """A required field that is missing, or null (an empty CSV/parquet cell)."""
    what = "is empty" if key in row.data else "is missing"
    near = [k for k in row.data if isinstance(k, str) and k != key and k.strip().lower() == key]
    hint = f" (there is a column {near[0]!r}: mind the spaces or case in the header)" if near else ""
    return DataError(f"{row.source}: {fmt} row's {key!r} field {what}{hint}")


def _check_unicode(text: str, source: str, what: str) -> None:
    """JSON can escape a lone surrogate (``"\ud800"``), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{source}: {what} holds an unpaired surrogate (invalid Unicode)") from None


def _messages_of(row: Row) -> list[dict]:
    messages = row.data.get("messages")
    if messages is None:
        raise _absent(row, "messages", "messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{row.source}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{row.source}: messages[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(
                f"{row.source}: messages[{i}] has unknown role {message['role']!r} (known: {', '.join(ROLES)})"
            )
        if not isinstance(message["content"], str):
            raise DataError(
                f"{row.source}: messages[{i}] content must be a string, got {type(message['content']).__name__}"
            )
        _check_unicode(message["content"], row.source, f"messages[{i}] content")
    return messages


def _alpaca_messages(row: Row) -> list[dict]:
    instruction = _string_field(row, "instruction", "alpaca")
    extra = _string_field(row, "input", "alpaca", required=False)
    output = _string_field(row, "output", "alpaca")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _tokenize(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


_SPECIAL_TAILS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its tail


def _special_tail(tokenizer) -> list[int]:
    """The special tokens the tokenizer itself appends to a text (``add_special_tokens=True``): none for
    most, EOS for those whose post-processor adds it (Llama's ``add_eos_token``, some T5-style ones)."""
    if tokenizer not in _SPECIAL_TAILS:  # held weakly: an id() key could be reused by another tokenizer
        plain, full = _tokenize(tokenizer, "a", False), _tokenize(tokenizer, "a", True)
        starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
        _SPECIAL_TAILS[tokenizer] = full[starts[-1] + len(plain) :] if plain and starts else []
    return _SPECIAL_TAILS[tokenizer]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, source: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raises its own errors (e.g. the template's raise_exception)
        raise DataError(f"{source}: the chat template cannot render this conversation ({e})") from None


def encode_messages(
    tokenizer, messages: list[dict], completion_only: bool, source: str
) -> tuple[list[int], list[int]]:
    """Render a conversation with the chat template; labels on the assistant turns.

    Args:
        tokenizer: a tokenizer with a chat template.
        messages: ``[{"role", "content"}, ...]``, already validated.
        completion_only: loss only on assistant turns (their content and end tokens); else on all.
        source: ``file:line`` for errors.

    Returns:
        (input_ids, labels).

    Raises:
        DataError: the template fails, or renders a prefix of the conversation inconsistently with
            the whole, so the assistant tokens cannot be located.
    """
    text = _render(tokenizer, messages, False, source)
    if not completion_only:
        ids = _tokenize(tokenizer, text, add_special_tokens=False)
        return ids, list(ids)
    if not getattr(tokenizer, "is_fast", False):
        return _encode_messages_by_token_prefix(tokenizer, messages, text, source)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in _assistant_spans(tokenizer, messages, text, source):
        # a token that straddles the reply's first character (the generation prompt's "\n" merged with the
        # reply's leading spaces, as BPE tokenizers do for indented code) is the reply's first token
        for j, (a, b) in enumerate(offsets):
            if b > start and a < end:
                labels[j] = ids[j]
    return ids, labels


def _opening_turn_start(tokenizer, message: dict, through: str, source: str) -> int:
    """Where an assistant turn that opens the conversation starts its content in ``through``: found by
    rendering a placeholder in its place (searching for the content itself matched inside the template's
    own markup when the reply was, say, ``end``: ``<|im_end|>``)."""
    mark = "\ufff0fusedtune\ufff0"
    probe = _render(tokenizer, [{**message, "content": mark}], False, source)
    at = probe.find(mark)
    if at >= 0 and through.startswith(probe[:at]) and through[at:].startswith(message["content"]):
        return at
    return max(through.rfind(message["content"]), 0)


def _not_a_prefix(source: str, n: int, unit: str) -> DataError:
    return DataError(
        f"{source}: the chat template does not render messages[:{n}] as a {unit}prefix of the whole "
        "conversation, so the assistant tokens cannot be located (set data.completion_only=false to train "
        "on every token)"
    )


def _assistant_spans(tokenizer, messages: list[dict], text: str, source: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the assistant turns in the rendered ``text``: from the end of
    the conversation before the turn with its generation prompt, to the end of the conversation through
    the turn (its end-of-turn tokens included). A turn that opens the conversation starts at its content."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = _render(tokenizer, messages[: i + 1], False, source)
        before = _render(tokenizer, messages[:i], True, source) if i else None
        for prefix in (before, through):
            if prefix is not None and not text.startswith(prefix):
                raise _not_a_prefix(source, i + (prefix is through), "")
        start = (
            len(before) if before is not None else _opening_turn_start(tokenizer, message, through, source)
        )
        spans.append((start, len(through)))
    return spans


def _encode_messages_by_token_prefix(tokenizer, messages, text, source) -> tuple[list[int], list[int]]:
    """A slow tokenizer (no character offsets): each prefix's tokens must be a prefix of the whole's."""
    ids = _tokenize(tokenizer, text, add_special_tokens=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(
                f"{source}: a conversation that opens with an assistant turn needs a fast tokenizer to locate "
                "it (set data.completion_only=false to train on every token)"
            )
        bounds = []
        for prefix, generation_prompt in ((messages[:i], True), (messages[: i + 1], False)):
            prefix_ids = _tokenize(
                tokenizer, _render(tokenizer, prefix, generation_prompt, source), add_special_tokens=False
            )
            if ids[: len(prefix_ids)] != prefix_ids:
                raise _not_a_prefix(source, len(prefix), "token ")
            bounds.append(len(prefix_ids))
        start, end = bounds
        labels[start:end] = ids[start:end]
    return ids, labels


def encode_row(row: Row, fmt: str, tokenizer, completion_only: bool) -> tuple[list[int], list[int]]:
    """One row -> (input_ids, labels) in the given format.

    Args:
        row: the raw row.
        fmt: ``text``, ``alpaca`` or ``messages``.
        tokenizer: the model's tokenizer.
        completion_only: loss on the response only (alpaca, messages); ``text`` always has loss on all.

    Returns:
        (input_ids, labels), labels -100 where there is no loss.

    Raises:
        DataError: missing or mistyped fields, unknown roles, chat-template problems.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    tail = _special_tail(tokenizer)  # what the tokenizer appends itself (EOS, for some)
    if fmt == "text":
        ids = _tokenize(tokenizer, _string_field(row, "text", "text"), add_special_tokens=True)
        ids += [] if eos and tail[-1:] == eos else eos  # one EOS, the tokenizer's or ours
        return ids, list(ids)
    if fmt == "messages":
        if not tokenizer.chat_template:
            raise DataError(
                f"{row.source}: a messages dataset needs a tokenizer with a chat template, and this one "
                "has none (use the text or alpaca format, or a model with a chat template)"
            )
        return encode_messages(tokenizer, _messages_of(row), completion_only, row.source)
    # alpaca
    messages = _alpaca_messages(row)
    if tokenizer.chat_template:
        return encode_messages(tokenizer, messages, completion_only, row.source)
    instruction = _string_field(row, "instruction", "alpaca")
    extra = _string_field(row, "input", "alpaca", required=False)
    template = ALPACA_PROMPT_WITH_INPUT if extra.strip() else ALPACA_PROMPT
    prompt_ids = _tokenize(tokenizer, template.format(instruction=instruction, input=extra), True)
    if tail and prompt_ids[-len(tail) :] == tail:  # the prompt keeps its BOS, not an EOS before the response
        prompt_ids = prompt_ids[: -len(tail)]
    response_ids = _tokenize(tokenizer, messages[1]["content"], add_special_tokens=False) + eos
    ids = prompt_ids + response_ids
    if not completion_only:
        return ids, list(ids)
    return ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


# ---------------------------------------------------------------------------------------------------
# Rows -> examples
# ---------------------------------------------------------------------------------------------------


def encode_rows(
    rows: list[Row], fmt: str, tokenizer, cfg: DataConfig, vocab_size: int, name: str
) -> tuple[list[Example], DataStats]:
    """Tokenize rows, apply the overlength policy, drop examples without targets, bound the ids.

    Args:
        rows: the raw rows.
        fmt: the resolved format.
        tokenizer: the model's tokenizer.
        cfg: the data section of the config.
        vocab_size: the model's embedding rows.
        name: the file (or task) the rows come from, for errors that are about all of them.

    Returns:
        (examples, stats).

    Raises:
        DataError: a bad row, an overlength row under ``overlength=error``, an id beyond the
            embedding, no examples left, or every label masked.
    """
    stats = DataStats(rows=len(rows))
    examples = []
    for row in rows:
        ids, labels = encode_row(row, fmt, tokenizer, cfg.completion_only)
        too_big = max(ids, default=0)
        if too_big >= vocab_size:
            raise DataError(
                f"{row.source}: tokenizer produces id {too_big} but the model's embedding has {vocab_size} "
                "rows (tokenizer and model do not match)"
            )
        if len(ids) > cfg.max_seq_len:
            if cfg.overlength == "error":
                raise DataError(
                    f"{row.source}: example is {len(ids)} tokens > data.max_seq_len={cfg.max_seq_len} "
                    "(data.overlength=error)"
                )
            if cfg.overlength == "drop":
                stats.dropped_overlength += 1
                continue
            ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
            stats.truncated += 1
        # labels[0] never carries loss: the loop predicts token t from the tokens before it.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            stats.dropped_no_targets += 1
            continue
        examples.append(Example(ids, labels, row.source))
    if not examples:
        if stats.dropped_overlength == stats.rows:
            raise DataError(
                f"{name}: no examples left: all {stats.rows} are longer than "
                f"data.max_seq_len={cfg.max_seq_len} (data.overlength=drop)"
            )
        raise DataError(
            f"{name}: every label is masked in all {stats.rows} rows, nothing to learn from "
            "(no response tokens; check the format, data.completion_only and data.max_seq_len)"
        )
    return examples, stats


def split_rows(rows: list[Row], fraction: float, seed: int, name: str) -> tuple[list[Row], list[Row]]:
    """Split off ``fraction`` of the rows as held-out, deterministically for ``seed``.

    Args:
        rows: all rows.
        fraction: the held-out share, in (0, 1).
        seed: ``data.seed``.
        name: the file, for errors.

    Returns:
        (train_rows, eval_rows), each in file order.

    Raises:
        DataError: too few rows to leave at least one on each side.
    """
    if len(rows) < 2:
        raise DataError(
            f"{name}: data.eval_fraction needs at least 2 rows to split, the file has {len(rows)}"
        )
    n_eval = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    held_out = set(random.Random(f"eval_split:{seed}").sample(range(len(rows)), n_eval))
    train = [r for i, r in enumerate(rows) if i not in held_out]
    held = [r for i, r in enumerate(rows) if i in held_out]
    return train, held


def _check_pad_id(tokenizer, vocab_size: int) -> None:
    pad = tokenizer.pad_token_id
    if pad is not None and pad >= vocab_size:
        raise DataError(
            f"tokenizer: its pad token id {pad} is beyond the model's embedding of {vocab_size} rows "
            "(tokenizer and model do not match)"
        )


def build_datasets(cfg: DataConfig, tokenizer, vocab_size: int) -> Datasets:
    """Read (or generate), format, tokenize and split the data as the config says.

    Args:
        cfg: the data section of the config.
        tokenizer: the model's tokenizer (with a pad token).
        vocab_size: the model's embedding rows; every produced id must be below it.

    Returns:
        The training and held-out examples, the raw held-out rows, the task and the resolved format.

    Raises:
        DataError: any problem with the data, named by ``file:line`` or the config field.
    """
    from .tasks import get_task

    _check_pad_id(tokenizer, vocab_size)
    task = None
    if cfg.task is not None:
        task = get_task(cfg.task)
        train_dicts, eval_dicts = task.split(cfg.num_train, cfg.num_eval, cfg.seed)
        train_rows = [Row(d, f"task:{task.name}#{i}") for i, d in enumerate(train_dicts)]
        eval_rows = [Row(d, f"task:{task.name}:eval#{i}") for i, d in enumerate(eval_dicts)]
        train_name, eval_name = f"task:{task.name}", f"task:{task.name}:eval"
    else:
        assert cfg.train is not None  # DataConfig guarantees one source
        if cfg.eval is not None and cfg.eval_fraction > 0:
            raise DataError(
                "data.eval_fraction: set either data.eval (a file) or data.eval_fraction, not both"
            )
        train_name = eval_name = cfg.train
        train_rows = read_rows(cfg.train, "data.train")
        eval_rows = []
        if cfg.eval is not None:
            eval_name = cfg.eval
            eval_rows = read_rows(cfg.eval, "data.eval")
        elif cfg.eval_fraction > 0:
            train_rows, eval_rows = split_rows(train_rows, cfg.eval_fraction, cfg.seed, cfg.train)
            train_name = f"{cfg.train} (its training split)"
            eval_name = f"{cfg.train} (its held-out split, data.eval_fraction={cfg.eval_fraction:g})"

    fmt = "messages" if task is not None else cfg.format
    if fmt == "auto":
        fmt = detect_format(train_rows[0])
    train, train_stats = encode_rows(train_rows, fmt, tokenizer, cfg, vocab_size, train_name)
    evaluation, eval_stats = [], DataStats()
    if eval_rows:
        evaluation, eval_stats = encode_rows(eval_rows, fmt, tokenizer, cfg, vocab_size, eval_name)
    for split, stats in (("train", train_stats), ("eval", eval_stats)):
        if stats.rows:  # info only: the caller reports rows cut or dropped (trainer run does, once)
            log.info("data: %s: %s", split, stats.describe())
    return Datasets(
        train=train,
        eval=evaluation,
        eval_rows=[r.data for r in eval_rows],
        task=task,
        format=fmt,
        train_stats=train_stats,
        eval_stats=eval_stats,
    )


# ---------------------------------------------------------------------------------------------------
# Batching, order, packing
# ---------------------------------------------------------------------------------------------------


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into one batch.

    Args:
        examples: at least one example.
        pad_id: the id padded positions get in ``input_ids`` (they are masked out anyway).

    Returns:
        ``input_ids`` and ``labels`` (-100 on padding) as int64 ``[B, T]``, and ``attention_mask``
        (1 on real tokens, 0 on padding), with ``T`` the longest example.
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch ``epoch`` visits ``n`` examples: a permutation fixed by (seed, epoch).

    A Fisher-Yates shuffle over ``random.Random.random()``, whose sequence Python guarantees across
    versions (``random.shuffle`` itself carries no such promise), so a resumed run sees the same order.

    Args:
        n: number of examples.
        seed: ``train.seed``.
        epoch: 0-based epoch.

    Returns:
        A permutation of ``range(n)``.
    """
    rng = random.Random(f"epoch_order:{seed}:{epoch}")
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = math.floor(rng.random() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def pack(examples: list[Example], max_seq_len: int, eos_id: int) -> list[Example]:
    """Concatenate whole examples, in the given order, into sequences of at most ``max_seq_len`` tokens.

    An example is never cut across two sequences: a sequence closes before the example that would not
    fit (each example is at most ``max_seq_len`` already: :func:`build_datasets` truncates or drops
    longer ones). Cutting the stream at fixed lengths instead put answers at the start of a sequence
    whose question was in the previous one, trained to be produced from nothing.

    Examples from :func:`build_datasets` end with their end tokens (EOS, or the chat template's end of
    turn); between one that does not end with ``eos_id`` (a chat turn ending in a newline, a truncated
    one) and the next, ``eos_id`` is inserted as a separator without loss. The first token of every
    later example in a sequence carries no loss either: it would be predicted from the previous,
    unrelated example. Labels travel with their tokens. Sequences in which no token after the first
    carries loss are left out.

    This is simple packing: within a sequence, attention and position ids run on across the examples
    (the run says so). ``train.padding_free`` alone already skips padding, with attention within each
    example.

    Args:
        examples: tokenized examples.
        max_seq_len: the most tokens of a packed sequence.
        eos_id: the end-of-sequence id that separates examples (None: no separator).

    Returns:
        Packed examples, with a ``source`` like ``packed#3 [a.jsonl:7 .. a.jsonl:12]``.
    """
    packed: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    members: list[Example] = []

    def close() -> None:
        if members and any(label != IGNORE_INDEX for label in labels[1:]):
            first, last = members[0].source, members[-1].source
            span = first if len(members) == 1 else f"{first} .. {last}"
            packed.append(Example(list(ids), list(labels), f"packed#{len(packed)} [{span}]"))
        ids.clear()
        labels.clear()
        members.clear()

    for example in examples:
        if not example.input_ids:
            continue
        sep = bool(ids) and eos_id is not None and ids[-1] != eos_id
        if ids and len(ids) + sep + len(example.input_ids) > max_seq_len:
            close()
            sep = False
        if sep:
            ids.append(eos_id)
            labels.append(IGNORE_INDEX)
        ids.extend(example.input_ids)
        labels.extend([IGNORE_INDEX, *example.labels[1:]] if members else example.labels)
        members.append(example)
    close()
    return packed
