"""The real teacher's offline rows (`pipeline.demo.stdlib_data`): deterministic, held out by
file, and each reference answer really is the source's."""

from __future__ import annotations

import ast
import json

import pytest

from pipeline.demo.code_teacher import is_heldout
from pipeline.demo.stdlib_data import (
    DATA_FILES,
    DataSpec,
    chat_row,
    chat_rows,
    functions,
    prompt_rows,
    write_data,
)


def _path(row_id: str) -> str:
    return row_id.split(":")[0]


def test_chat_rows_are_deterministic_and_split_by_file():
    train = chat_rows(40, "train", seed=0)
    assert train == chat_rows(40, "train", seed=0) and train != chat_rows(40, "train", seed=1)
    held = chat_rows(40, "heldout", seed=0)
    assert all(is_heldout(_path(r["id"]), 10) for r in held)
    assert not any(is_heldout(_path(r["id"]), 10) for r in train)
    assert len({r["id"] for r in train}) == 40
    # Tasks in turn; both answered tasks end with the assistant's reference answer.
    assert [r["id"].rsplit(":", 1)[1] for r in train[:4]] == ["document", "complete"] * 2
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in train)


def test_answers_are_the_functions_own_docstring_and_source():
    fn = next(f for f in functions("heldout") if f.source.count("\n") > 4)
    document = chat_row(fn, "document")
    code = document["messages"][0]["content"]
    assert fn.docstring not in code and document["messages"][1]["content"] == fn.docstring
    body = code.split("```python\n", 1)[1].rsplit("\n```", 1)[0]
    parsed = ast.parse(body).body[0]  # the undocumented function still parses ...
    assert ast.get_docstring(parsed) is None  # ... without its docstring
    complete = chat_row(fn, "complete")
    assert complete["messages"][1]["content"] == f"```python\n{fn.source.rstrip()}\n```"
    assert ast.get_docstring(ast.parse(fn.header + "    pass\n").body[0]) == fn.docstring
    explain = prompt_rows(3, "heldout")
    assert all(len(r["messages"]) == 1 for r in explain)
    with pytest.raises(ValueError, match="task must be one of"):
        chat_row(fn, "translate")
    with pytest.raises(ValueError, match="functions"):
        chat_rows(10**6, "heldout")


def test_write_data_writes_every_file(tmp_path):
    spec = DataSpec(text_train=8, text_heldout=4, chat_train=8, chat_heldout=4, prompts_heldout=4)
    counts = write_data(tmp_path, spec)
    assert tuple(counts) == DATA_FILES
    for name, n in counts.items():
        rows = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        assert len(rows) == n and len({r["id"] for r in rows}) == n
    assert not list(tmp_path.glob(".*.tmp"))
