"""prepare_prompts: validated rows -> tokenized prompt table, without ever calling the engine."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from storage.schema import PROMPT_SCHEMA

from .loading import InputRows
from .options import InputOptions, PrepareOptions
from .records import (
    DUPLICATE_ID,
    EMPTY_TEXT,
    INVALID_JSON,
    INVALID_UTF8,
    TOO_LONG,
    WRONG_TYPE,
    InputError,
    PreparedPrompts,
    SkippedRow,
    describe_row,
)
from .rows import PendingRow, RowProblem, derive_id, read_content, render_chat, row_id_of
from .tokenize import byte_spans, count_prompt_tokens, tokenize_batch

log = logging.getLogger(__name__)

_BATCH = 1024  # texts per tokenizer call: amortises the call, bounds the Python lists it returns


class _Collector:
    """Turns row problems into InputErrors or SkippedRows according to the options."""

    def __init__(self, rows: InputRows, opts: PrepareOptions) -> None:
        self.rows = rows
        self.opts = opts
        self.skipped: list[SkippedRow] = []

    def where(self, row: int, row_id: str | None = None) -> str:
        return describe_row(
            row, row_id=row_id, line=self.rows.line(row - self.rows.start), source=self.rows.source
        )

    def problem(self, row: int, p: RowProblem, *, skip: bool) -> None:
        if p.reason == EMPTY_TEXT or skip:  # blank text never costs engine time nor a crash
            log.debug("skipping %s: %s", self.where(row, p.row_id), p.detail)
            self.skipped.append(SkippedRow(row, p.row_id, p.reason))
            return
        raise InputError(
            row,
            p.row_id,
            p.reason,
            p.detail,
            line=self.rows.line(row - self.rows.start),
            source=self.rows.source,
        )


def _validate(
    rows: InputRows, tokenizer: Any, input_opts: InputOptions, out: _Collector
) -> list[PendingRow]:
    pending: list[PendingRow] = []
    first_seen: dict[str, int] = {}
    skip = out.opts.on_invalid == "skip"
    has_template = getattr(tokenizer, "chat_template", None) is not None
    for i, row in enumerate(rows.rows):
        g = rows.start + i
        row_id = None
        try:
            if g in rows.bad_json:  # an error, or with on_invalid: skip a counted skip
                raise RowProblem(INVALID_JSON, rows.bad_json[g])
            if not isinstance(row, Mapping):
                raise RowProblem(WRONG_TYPE, f"row is {type(row).__name__}, not a dict")
            try:
                row_id = row_id_of(row, input_opts.id_field)
            except RowProblem:
                if g not in rows.bad_utf8:
                    raise
            if g in rows.bad_utf8:
                raise RowProblem(INVALID_UTF8, rows.bad_utf8[g])
            content = read_content(row, input_opts)
            row_id = row_id or derive_id(content.canonical)
            if row_id in first_seen:
                raise RowProblem(
                    DUPLICATE_ID,
                    f"duplicate id {row_id!r}, first seen at {out.where(first_seen[row_id])}",
                )
            first_seen[row_id] = g
            if content.text is not None:
                text, prompt_bytes = content.text, content.prompt_bytes
            else:
                if not has_template:
                    raise ValueError(
                        f"{out.where(g, row_id)} is a chat row but the tokenizer "
                        "has no chat_template"
                    )
                assert content.prompt_msgs is not None
                text, prompt_bytes = render_chat(
                    tokenizer, content.prompt_msgs, content.completion_msgs
                )
        except RowProblem as p:
            p.row_id = p.row_id or row_id
            out.problem(g, p, skip=skip)
            continue
        pending.append(PendingRow(g, row_id, text, prompt_bytes, content.text is None))
    return pending


def _tokenize(
    pending: list[PendingRow], tokenizer: Any, add_special_tokens: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids and char offsets per pending row, batched by tokenization mode."""
    results: list[Any] = [None] * len(pending)
    for chat in (False, True):
        idx = [i for i, p in enumerate(pending) if p.chat == chat]
        for b in range(0, len(idx), _BATCH):
            chunk = idx[b : b + _BATCH]
            encoded = tokenize_batch(
                tokenizer, [pending[i].text for i in chunk], add_special_tokens and not chat
            )
            for i, enc in zip(chunk, encoded, strict=True):
                results[i] = enc
    return results


def _list_array(parts: list[np.ndarray], type_: pa.DataType) -> pa.Array:
    lengths = np.fromiter((len(p) for p in parts), np.int64, len(parts))
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("prompt table over 2**31 tokens: prepare it in smaller slices")
    values = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int32)), type=type_
    )


def prepare_prompts(
    rows: InputRows | Sequence[Mapping[str, Any]],
    tokenizer: Any,
    opts: PrepareOptions,
    input_opts: InputOptions,
) -> PreparedPrompts:
    """Validate, render and tokenize ``rows`` into a `PROMPT_SCHEMA` table.

    Raises `InputError` for the first invalid row (``on_invalid="error"``) or over-long row
    (``on_too_long="error"``); otherwise such rows are counted in ``skipped``. Blank rows are
    always skipped and counted. ``tokenizer`` must be a transformers fast tokenizer.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("prepare_prompts needs a fast (Rust-backed) tokenizer for offsets")
    src = rows if isinstance(rows, InputRows) else InputRows(list(rows))  # type: ignore[arg-type]
    out = _Collector(src, opts)
    pending = _validate(src, tokenizer, input_opts, out)
    encoded = _tokenize(pending, tokenizer, opts.add_special_tokens)

    eos = tokenizer.eos_token_id
    if opts.append_eos and eos is None:
        raise ValueError("prompts.append_eos is set but the tokenizer has no eos_token")
    cols: dict[str, list[Any]] = {k: [] for k in PROMPT_SCHEMA.names}
    num_truncated = 0
    for p, (ids, offsets) in zip(pending, encoded, strict=True):
        start, end = byte_spans(p.text, offsets)
        if opts.append_eos and not p.chat and p.prompt_bytes is not None:
            n_bytes = len(p.text.encode("utf-8"))
            ids, start, end = (
                np.append(ids, eos),
                np.append(start, n_bytes),
                np.append(end, n_bytes),
            )
        n = len(ids)
        prompt_len = n if p.prompt_bytes is None else count_prompt_tokens(start, p.prompt_bytes)
        truncated = opts.max_length is not None and n > opts.max_length
        if truncated:
            if opts.on_too_long != "truncate":
                detail = f"{n} tokens, more than max_length {opts.max_length}"
                out.problem(
                    p.row, RowProblem(TOO_LONG, detail, p.row_id), skip=opts.on_too_long == "skip"
                )
                continue
            n = opts.max_length
            ids, start, end = ids[:n], start[:n], end[:n]
            prompt_len = min(prompt_len, n)
            num_truncated += 1
        for key, value in (
            ("id", p.row_id),
            ("input_ids", ids),
            ("prompt_len", prompt_len),
            ("text", p.text),
            ("byte_start", start),
            ("byte_end", end),
            ("truncated", truncated),
        ):
            cols[key].append(value)

    arrays = [
        _list_array(cols[f.name], f.type)
        if pa.types.is_list(f.type)
        else pa.array(cols[f.name], type=f.type)
        for f in PROMPT_SCHEMA
    ]
    table = pa.Table.from_arrays(arrays, schema=PROMPT_SCHEMA)
    result = PreparedPrompts(
        table=table,
        skipped=sorted(out.skipped, key=lambda s: s.row),
        num_input_rows=len(src),
        num_truncated=num_truncated,
    )
    if result.skipped or num_truncated:
        log.info(
            "prompts: %d of %d rows kept, %d truncated, skipped %s",
            table.num_rows,
            len(src),
            num_truncated,
            result.skip_counts(),
        )
    return result
