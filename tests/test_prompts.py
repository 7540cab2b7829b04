"""stages.prompts: loading, validation, row kinds, byte offsets, truncation, fingerprints."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from stages.prompts import (
    PROMPT_SCHEMA,
    InputError,
    InputOptions,
    InputRows,
    PrepareOptions,
    char_to_byte_offsets,
    input_fingerprint,
    load_rows,
    prepare_prompts,
    resolve_format,
    tokenizer_fingerprint,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "héllo",
    "世界",
    "user",
    "assistant",
    "hello",
    "world",
]


def _build_tokenizer() -> Tokenizer:
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=8)) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def _wrap(tok: Tokenizer, chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=chat_template,
    )


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return _wrap(_build_tokenizer())


BOS = 0


def prep(rows, tokenizer, *, input_opts=None, **kw):
    kw.setdefault("max_length", 1000)
    return prepare_prompts(
        rows, tokenizer, PrepareOptions(**kw), input_opts or InputOptions(path="unused.jsonl")
    )


def ids_of(tokenizer, text, special=False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def write_jsonl(path: Path, lines: list[bytes | str | dict]) -> Path:
    out = []
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line, ensure_ascii=False)
        out.append(line if isinstance(line, bytes) else line.encode())
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


# ----------------------------------------------------------------------------- row kinds


def test_text_row_matches_tokenizer_and_schema(tok):
    res = prep([{"id": "a", "text": "the quick brown fox"}], tok)
    assert res.table.schema.equals(PROMPT_SCHEMA)
    row = res.table.to_pylist()[0]
    assert row["input_ids"] == tok("the quick brown fox")["input_ids"]
    assert row["input_ids"][0] == BOS
    assert row["prompt_len"] == 0
    assert row["text"] == "the quick brown fox"
    assert row["truncated"] is False
    assert row["byte_start"][0] == row["byte_end"][0] == 0  # BOS: empty span
    assert row["byte_end"][-1] == len("the quick brown fox")
    assert res.num_input_rows == 1 and res.skipped == [] and res.num_truncated == 0


def test_add_special_tokens_false_drops_bos(tok):
    row = prep([{"text": "hello world"}], tok, add_special_tokens=False).table.to_pylist()[0]
    assert row["input_ids"] == ids_of(tok, "hello world")


def test_prompt_completion_prompt_len_at_word_boundary(tok):
    prompt, completion = "the quick brown fox", " jumps over"
    row = prep([{"prompt": prompt, "completion": completion}], tok).table.to_pylist()[0]
    assert row["text"] == prompt + completion
    # ByteLevel pre-tokenization splits before " jumps", so the prompt tokens are BOS + prompt's.
    assert row["prompt_len"] == 1 + len(ids_of(tok, prompt))
    assert row["input_ids"][row["prompt_len"] :] == ids_of(tok, completion)


def test_prompt_len_counts_straddling_token_as_prompt(tok):
    text = "the quick brown fox"
    full = tok(text, return_offsets_mapping=True)
    # Split the text inside the first token that spans several characters.
    j, (a, _) = next((j, o) for j, o in enumerate(full["offset_mapping"]) if o[1] - o[0] >= 2)
    prompt, completion = text[: a + 1], text[a + 1 :]
    row = prep([{"prompt": prompt, "completion": completion}], tok).table.to_pylist()[0]
    assert row["input_ids"] == full["input_ids"]
    assert row["prompt_len"] == j + 1  # the straddling token is prompt
    assert row["byte_start"][j] < len(prompt.encode()) < row["byte_end"][j]


def test_append_eos_ends_completions_only(tok):
    rows = [
        {"id": "pc", "prompt": "hello", "completion": " world"},
        {"id": "t", "text": "the fox"},
        {"id": "gen", "prompt": "hello"},
    ]
    plain = {r["id"]: r for r in prep(rows, tok).table.to_pylist()}
    got = {r["id"]: r for r in prep(rows, tok, append_eos=True).table.to_pylist()}
    eos = tok.eos_token_id
    for key in ("pc", "t"):  # a completion or text learns where it ends
        assert got[key]["input_ids"] == [*plain[key]["input_ids"], eos]
        assert got[key]["text"] == plain[key]["text"]  # the EOS is no part of the text
        end = len(plain[key]["text"].encode())
        assert got[key]["byte_start"][-1] == got[key]["byte_end"][-1] == end  # empty span
        assert got[key]["prompt_len"] == plain[key]["prompt_len"]
    assert got["gen"] == plain["gen"]  # a generation prompt is continued, not ended


def test_completion_field_none_turns_rows_into_generation_prompts(tok):
    rows = [{"id": "a", "prompt": "hello", "completion": " world"}]
    opts = InputOptions(path="unused.jsonl", completion_field=None)
    row = prep(rows, tok, input_opts=opts).table.to_pylist()[0]
    assert row["text"] == "hello" and row["prompt_len"] == len(row["input_ids"])


def test_prompt_without_completion_is_all_prompt(tok):
    row = prep([{"prompt": "hello world"}], tok).table.to_pylist()[0]
    assert row["prompt_len"] == len(row["input_ids"]) == 1 + len(ids_of(tok, "hello world"))


def test_chat_row_ending_with_assistant_trains_on_last_turn(tok):
    msgs = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "the fox"},
        {"role": "assistant", "content": "lazy dog"},
    ]
    row = prep([{"messages": msgs}], tok).table.to_pylist()[0]
    assert row["text"] == tok.apply_chat_template(msgs, tokenize=False)
    assert row["text"].endswith("<s>assistant\nlazy dog</s>\n")
    # Rendered text is tokenized without extra specials: exactly one leading <s>.
    assert row["input_ids"] == ids_of(tok, row["text"])
    assert row["input_ids"][:2] != [BOS, BOS]
    head = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert row["prompt_len"] == len(ids_of(tok, head))
    assert tok.decode(row["input_ids"][row["prompt_len"] :]) == "lazy dog</s>\n"


def test_chat_row_ending_with_user_is_generation_prompt(tok):
    msgs = [{"role": "user", "content": "hello"}]
    row = prep([{"messages": msgs}], tok).table.to_pylist()[0]
    assert row["text"] == "<s>user\nhello</s>\n<s>assistant\n"
    assert row["prompt_len"] == len(row["input_ids"])


def test_conversational_prompt_completion_like_trl(tok):
    p = [{"role": "user", "content": "hello"}]
    c = [{"role": "assistant", "content": "world"}]
    a = prep([{"prompt": p, "completion": c}], tok).table.to_pylist()[0]
    b = prep([{"messages": p + c}], tok).table.to_pylist()[0]
    assert (a["text"], a["input_ids"], a["prompt_len"]) == (
        b["text"],
        b["input_ids"],
        b["prompt_len"],
    )


def test_chat_parquet_style_none_keys_are_ignored(tok):
    m = [
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": "yo", "name": None},
    ]
    clean = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    a = prep([{"messages": m}], tok).table.to_pylist()[0]
    b = prep([{"messages": clean}], tok).table.to_pylist()[0]
    assert a == b


def test_row_kind_precedence_messages_over_prompt_over_text(tok):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}], "prompt": "x", "text": "y"},
        {"prompt": "hello", "completion": " world", "text": "ignored"},
    ]
    t = prep(rows, tok).table.to_pylist()
    assert t[0]["text"].startswith("<s>user\nhi")
    assert t[1]["text"] == "hello world"


def test_chat_rows_need_a_template(tok):
    bare = _wrap(tok.backend_tokenizer, chat_template=None)
    with pytest.raises(ValueError, match="no chat_template"):
        prep([{"messages": [{"role": "user", "content": "hi"}]}], bare)


def test_template_error_names_row(tok):
    strict = _wrap(
        tok.backend_tokenizer,
        chat_template=(
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
            "{% endif %}" + CHAT_TEMPLATE
        ),
    )
    rows = [
        {"id": "ok", "messages": [{"role": "user", "content": "hi"}]},
        {"id": "sys", "messages": [{"role": "system", "content": "be nice"}]},
    ]
    with pytest.raises(
        InputError,
        match=r"input row 1 \(id 'sys'\): chat template failed.*no "
        r"system role",
    ) as e:
        prep(rows, strict)
    assert e.value.reason == "template_error"
    res = prep(rows, strict, on_invalid="skip")
    assert res.skip_counts() == {"template_error": 1} and res.table["id"].to_pylist() == ["ok"]


# ----------------------------------------------------------------------------- byte offsets


def test_char_to_byte_offsets_widths():
    text = "aé世🙂b"  # 1, 2, 3, 4, 1 bytes
    assert char_to_byte_offsets(text, np.arange(6)).tolist() == [0, 1, 3, 6, 10, 11]


def test_byte_offsets_decode_to_token_text_on_non_ascii(tok):
    text = "héllo 世界 🙂 the fox"
    row = prep([{"text": text}], tok).table.to_pylist()[0]
    data = text.encode()
    ids, start, end = row["input_ids"], np.array(row["byte_start"]), np.array(row["byte_end"])
    assert start[0] == end[0] == 0 and ids[0] == BOS
    assert end[-1] == len(data) and np.all(np.diff(start) >= 0)
    # Tokens that split a character share its span: group overlapping spans, then each group's
    # bytes must decode to exactly the group's tokens.
    groups, cur = [], [1]
    for j in range(2, len(ids)):
        if start[j] < end[cur[-1]]:
            cur.append(j)
        else:
            groups.append(cur)
            cur = [j]
    groups.append(cur)
    assert any(len(g) == 1 for g in groups) and any(len(g) > 1 for g in groups)
    for g in groups:
        chunk = data[start[g[0]] : max(end[g])].decode()
        assert chunk == tok.decode([ids[j] for j in g])
        if len(g) == 1:
            assert chunk == tok.decode([ids[g[0]]])
    assert b"".join(data[start[g[0]] : max(end[g])] for g in groups) == data


def test_trailing_special_token_gets_empty_span_at_end(tok):
    eos_tok = _build_tokenizer()
    eos_tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    text = "héllo world"
    row = prep([{"prompt": "héllo", "completion": " world"}], _wrap(eos_tok)).table.to_pylist()[0]
    assert row["input_ids"][-1] == 1
    assert row["byte_start"][-1] == row["byte_end"][-1] == len(text.encode())
    assert row["prompt_len"] == 1 + len(ids_of(tok, "héllo"))  # EOS is not prompt


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("row", "reason", "message"),
    [
        ({"id": "a", "other": 1}, "missing_field", r"none of the fields"),
        ({"id": "a", "text": 5}, "wrong_type", r"field 'text' is int, not str"),
        ({"id": "a", "prompt": "x", "completion": 3.5}, "wrong_type", r"'completion' is float"),
        ({"id": "a", "messages": "hi"}, "wrong_type", r"'messages' is str, not a list"),
        ({"id": "a", "messages": [{"content": "hi"}]}, "wrong_type", r"messages\[0\] is not"),
        (
            {"id": "a", "messages": [{"role": "user", "content": None}]},
            "wrong_type",
            r"messages\[0\].content' is NoneType",
        ),
        ({"id": 1.5, "text": "x"}, "wrong_type", r"field 'id' is float"),
        ({"id": "a", "text": "bad \ud800 surrogate"}, "invalid_utf8", r"lone surrogate"),
    ],
)
def test_invalid_rows_error_or_skip(tok, row, reason, message):
    good = {"id": "g", "text": "hello"}
    with pytest.raises(InputError, match=r"input row 1\b.*" + message) as e:
        prep([good, row], tok)
    assert (e.value.row, e.value.reason) == (1, reason)
    res = prep([good, row, {"id": "h", "text": "world"}], tok, on_invalid="skip")
    assert res.table["id"].to_pylist() == ["g", "h"]
    assert res.skip_counts() == {reason: 1}
    assert res.skipped[0].row == 1 and res.num_input_rows == 3


@pytest.mark.parametrize(
    "row",
    [
        {"text": ""},
        {"text": " \n\t "},
        {"prompt": "hello", "completion": "  "},
        {"prompt": " "},
        {"messages": []},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
    ],
)
def test_empty_text_is_always_a_counted_skip(tok, row):
    res = prep([{"id": "x", **row}, {"text": "hello"}], tok, on_invalid="error")
    assert res.skip_counts() == {"empty_text": 1}
    assert res.skipped[0].row == 0 and res.skipped[0].row_id == "x"
    assert res.table.num_rows == 1


def test_ids_int_converted_and_duplicates_name_both_rows(tok):
    rows = [{"id": 7, "text": "hello"}, {"id": "b", "text": "world"}, {"id": "7", "text": "fox"}]
    with pytest.raises(
        InputError,
        match=r"input row 2 \(id '7'\): duplicate id '7', first seen "
        r"at input row 0",
    ) as e:
        prep(rows, tok)
    assert e.value.reason == "duplicate_id"
    res = prep(rows, tok, on_invalid="skip")
    assert res.table["id"].to_pylist() == ["7", "b"]  # the first one is kept
    assert res.table["text"].to_pylist() == ["hello", "world"]
    assert res.skip_counts() == {"duplicate_id": 1}


def test_derived_ids_are_stable_and_content_sensitive(tok):
    t = prep(
        [
            {"text": "hello"},
            {"prompt": "hello", "completion": " world"},
            {"prompt": "hello ", "completion": "world"},
        ],
        tok,
    ).table
    ids = t["id"].to_pylist()
    expected = hashlib.sha256(b'{"text":"hello"}').hexdigest()[:16]
    assert ids[0] == expected == "cbbbdcd27692344d"  # pinned: must not change across releases
    assert len(set(ids)) == 3 and all(len(i) == 16 for i in ids)
    assert prep([{"text": "hello", "meta": 1}], tok).table["id"].to_pylist() == [ids[0]]


def test_identical_content_rows_are_duplicates(tok):
    rows = [{"text": "hello"}, {"text": "world"}, {"text": "hello"}]
    with pytest.raises(InputError, match=r"input row 2 .*duplicate id.*first seen at input row 0"):
        prep(rows, tok)
    assert prep(rows, tok, on_invalid="skip").skip_counts() == {"duplicate_id": 1}


def test_slices_report_global_rows(tok):
    rows = InputRows([{"text": "a"}, {"text": "b"}, {"text": 3}, {"text": "d"}], source="x")
    with pytest.raises(InputError, match=r"^input row 2 \(x\)") as e:
        prep(rows.slice(2, 4), tok)
    assert e.value.row == 2


# ----------------------------------------------------------------------------- truncation


def test_too_long_truncate_skip_error(tok):
    long = {"id": "long", "prompt": "the quick brown fox", "completion": " jumps over the lazy dog"}
    short = {"id": "short", "text": "hello"}
    n_full = len(tok(long["prompt"] + long["completion"])["input_ids"])
    n_prompt = 1 + len(ids_of(tok, long["prompt"]))
    assert n_full > 6 and n_prompt > 3

    res = prep([long, short], tok, max_length=6)
    row = res.table.to_pylist()[0]
    assert len(row["input_ids"]) == len(row["byte_start"]) == len(row["byte_end"]) == 6
    assert row["input_ids"] == tok(long["prompt"] + long["completion"])["input_ids"][:6]
    assert row["truncated"] is True and row["prompt_len"] == min(n_prompt, 6)
    assert res.num_truncated == 1 and res.table["truncated"].to_pylist() == [True, False]

    res = prep([long, short], tok, max_length=n_prompt + 1)
    assert res.table.to_pylist()[0]["prompt_len"] == n_prompt

    res = prep([long, short], tok, max_length=6, on_too_long="skip")
    assert res.skip_counts() == {"too_long": 1} and res.table["id"].to_pylist() == ["short"]
    assert res.num_truncated == 0

    with pytest.raises(
        InputError,
        match=rf"input row 0 \(id 'long'\): {n_full} tokens, more "
        r"than max_length 6",
    ) as e:
        prep([long, short], tok, max_length=6, on_too_long="error")
    assert e.value.reason == "too_long"

    fits = prep([long], tok, max_length=n_full)
    assert fits.num_truncated == 0 and fits.table["truncated"].to_pylist() == [False]


# ----------------------------------------------------------------------------- loading


def test_jsonl_loading_blank_lines_limit_and_lines(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"id": "a", "text": "hello"}, "", "  ", {"id": "b", "text": 1}, {"id": "c", "text": "x"}],
    )
    rows = load_rows(InputOptions(path=str(path)))
    assert len(rows) == 3 and rows.lines == [1, 4, 5] and rows.source == "d.jsonl"
    with pytest.raises(InputError) as e:
        prep(rows, tok)
    assert str(e.value) == ("input row 1 (line 4 of d.jsonl, id 'b'): field 'text' is int, not str")
    assert len(load_rows(InputOptions(path=str(path), limit=2))) == 2


def test_jsonl_invalid_json_errors_with_line_or_is_a_counted_skip(tmp_path, tok):
    lines = [{"text": "a"}, "", '{"text": "b"', "[1, 2]", '{"text": "c\u0001 \x01"}', {"text": "d"}]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    rows = load_rows(InputOptions(path=str(path)))
    assert rows.lines == [1, 3, 4, 5, 6] and sorted(rows.bad_json) == [1, 2, 3]
    with pytest.raises(InputError, match=r"^input row 1 \(line 3 of d.jsonl\): invalid JSON") as e:
        prep(rows, tok)
    assert (e.value.row, e.value.line, e.value.reason) == (1, 3, "invalid_json")
    # A raw control character (a user's case: "Invalid control character") is the same.
    assert "Invalid control character" in rows.bad_json[3]
    assert "line holds a JSON list" in rows.bad_json[2]
    skipped = prep(rows, tok, on_invalid="skip")
    assert skipped.table.column("text").to_pylist() == ["a", "d"]
    assert skipped.skip_counts() == {"invalid_json": 3}
    assert [s.row for s in skipped.skipped] == [1, 2, 3]
    # Lines past the limit are never read.
    assert len(load_rows(InputOptions(path=str(path), limit=1))) == 1


def test_jsonl_invalid_utf8_names_line(tmp_path, tok):
    bad = b'{"id": "bad", "text": "caf\xe9 latte"}'
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"id": "ok", "text": "hello"}, bad, '{"text": "lone \\ud800"}']
    )
    rows = load_rows(InputOptions(path=str(path)))
    with pytest.raises(
        InputError,
        match=r"^input row 1 \(line 2 of d.jsonl, id 'bad'\): line is "
        r"not valid UTF-8 \(byte 26: ",
    ) as e:
        prep(rows, tok)
    assert e.value.reason == "invalid_utf8"
    res = prep(rows, tok, on_invalid="skip")
    assert res.skip_counts() == {"invalid_utf8": 2}
    assert [(s.row, s.row_id) for s in res.skipped] == [(1, "bad"), (2, None)]
    assert res.table["id"].to_pylist() == ["ok"]


def test_jsonl_bom_is_ignored(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "hello"}\n')
    assert load_rows(InputOptions(path=str(path))).rows == [{"text": "hello"}]


def test_parquet_file_and_directory(tmp_path, tok):
    a = pa.table({"id": ["a", "b"], "text": ["hello", "world"]})
    b = pa.table({"id": ["c"], "text": ["fox"]})
    (tmp_path / "dir").mkdir()
    pq.write_table(a, tmp_path / "dir" / "part-0.parquet")
    pq.write_table(b, tmp_path / "dir" / "part-1.parquet")
    one = load_rows(InputOptions(path=str(tmp_path / "dir" / "part-0.parquet")))
    assert one.rows == a.to_pylist()
    opts = InputOptions(path=str(tmp_path / "dir"))
    assert resolve_format(opts) == "parquet"
    assert [r["id"] for r in load_rows(opts)] == ["a", "b", "c"]
    assert [r["id"] for r in load_rows(opts.model_copy(update={"limit": 2}))] == ["a", "b"]
    res = prep(load_rows(opts), tok)
    assert res.table["text"].to_pylist() == ["hello", "world", "fox"]


def test_datasets_saved_dir_and_custom_fields(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "uid": [10, 11, 12],
            "conv": [
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                [{"role": "user", "content": "fox"}],
                [{"role": "user", "content": "dog"}, {"role": "assistant", "content": "cat"}],
            ],
        }
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))

    opts = InputOptions(path=str(tmp_path / "saved"), id_field="uid", messages_field="conv")
    assert resolve_format(opts) == "datasets"
    res = prep(load_rows(opts), tok, input_opts=opts)
    t = res.table.to_pylist()
    assert [r["id"] for r in t] == ["10", "11", "12"]
    assert t[1]["prompt_len"] == len(t[1]["input_ids"])
    assert t[0]["text"] == "<s>user\nhi</s>\n<s>assistant\nyo</s>\n"

    dd = opts.model_copy(update={"path": str(tmp_path / "dd"), "split": "test"})
    assert [r["uid"] for r in load_rows(dd)] == [10]
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_rows(dd.model_copy(update={"split": "dev"}))
    assert len(load_rows(opts.model_copy(update={"limit": 2}))) == 2


# ----------------------------------------------------------------------------- fingerprints


def test_input_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}, {"text": "world"}])
    fp = input_fingerprint(InputOptions(path=str(a)))
    assert len(fp) == 64 and fp == input_fingerprint(InputOptions(path=str(a), format="jsonl"))
    copy = tmp_path / "sub" / "b.jsonl"
    copy.parent.mkdir()
    shutil.copy(a, copy)
    assert input_fingerprint(InputOptions(path=str(copy))) == fp  # content-addressed
    assert input_fingerprint(InputOptions(path=str(a), limit=1)) != fp
    assert input_fingerprint(InputOptions(path=str(a), text_field="body")) != fp
    a.write_bytes(a.read_bytes().replace(b"world", b"worle"))
    assert input_fingerprint(InputOptions(path=str(a))) != fp

    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"text": ["x"]}), d / "0.parquet")
    fp_dir = input_fingerprint(InputOptions(path=str(d)))
    assert fp_dir == input_fingerprint(InputOptions(path=str(d)))
    pq.write_table(pa.table({"text": ["y"]}), d / "1.parquet")
    assert input_fingerprint(InputOptions(path=str(d))) != fp_dir


def test_tokenizer_fingerprint(tok):
    fp = tokenizer_fingerprint(tok)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == tokenizer_fingerprint(_wrap(_build_tokenizer()))  # deterministic training
    assert tokenizer_fingerprint(_wrap(tok.backend_tokenizer, chat_template=None)) != fp
    assert tokenizer_fingerprint(_wrap(tok.backend_tokenizer, CHAT_TEMPLATE + " ")) != fp
    raw = tok.backend_tokenizer.to_str() + "\0chat_template\0" + CHAT_TEMPLATE
    assert fp == hashlib.sha256(raw.encode()).hexdigest()[:16]


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast"):
        prep([{"text": "x"}], Slow())


def test_chat_template_not_prefix_stable_uses_common_prefix(tok):
    # This template renders the final answer's header differently from the generation prompt.
    odd = _wrap(
        tok.backend_tokenizer,
        chat_template=(
            "{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}<s>final\n"
            "{% else %}<s>{{ m['role'] }}\n{% endif %}{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
        ),
    )
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    row = prep([{"messages": msgs}], odd).table.to_pylist()[0]
    assert row["text"] == "<s>user\nhi</s>\n<s>final\nyo</s>\n"
    assert row["prompt_len"] == len(ids_of(tok, "<s>user\nhi</s>\n<s>"))
