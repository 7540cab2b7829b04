"""prepare_prompts: validated rows -> tokenized prompt table, without ever calling the engine."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
    rows: InputRows,
    tokenizer: Any,
    input_opts: InputOptions,
    out: _Collector,
    claims: list[tuple[int, str]] | None = None,
) -> list[PendingRow]:
    """Valid rows, in order. With ``claims``, duplicate ids are not checked here: every row that
    reaches the check is appended as (global row, id) instead, for a check across partitions."""
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
            if claims is not None:
                claims.append((g, row_id))
            elif row_id in first_seen:
                raise RowProblem(
                    DUPLICATE_ID,
                    f"duplicate id {row_id!r}, first seen at {out.where(first_seen[row_id])}",
                )
            else:
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


def _build_table(
    pending: list[PendingRow], tokenizer: Any, opts: PrepareOptions, out: _Collector
) -> tuple[pa.Table, int, list[int]]:
    """Tokenize ``pending`` into a `PROMPT_SCHEMA` table; (table, truncated, kept global rows).

    Over-long rows are truncated, skipped or raised as `InputError` by ``opts.on_too_long``.
    """
    encoded = _tokenize(pending, tokenizer, opts.add_special_tokens)
    eos = tokenizer.eos_token_id
    if opts.append_eos and eos is None:
        raise ValueError("prompts.append_eos is set but the tokenizer has no eos_token")
    cols: dict[str, list[Any]] = {k: [] for k in PROMPT_SCHEMA.names}
    kept: list[int] = []
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
        kept.append(p.row)
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
    return pa.Table.from_arrays(arrays, schema=PROMPT_SCHEMA), num_truncated, kept


def _check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("prepare_prompts needs a fast (Rust-backed) tokenizer for offsets")


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
    _check_fast(tokenizer)
    src = rows if isinstance(rows, InputRows) else InputRows(list(rows))  # type: ignore[arg-type]
    out = _Collector(src, opts)
    pending = _validate(src, tokenizer, input_opts, out)
    table, num_truncated, _ = _build_table(pending, tokenizer, opts, out)
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


# Every row of a partition that reached the duplicate-id check, with what became of it, so a
# check across partitions can drop a later duplicate from the kept rows or re-count its skip.
CLAIM_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("row", pa.int64()),  # global input row
        ("line", pa.int64()),  # JSONL line, null for other inputs
        ("pos", pa.int64()),  # position in the partition's kept table, -1 when not kept
        ("truncated", pa.bool_()),
        ("tokens", pa.int64()),
        ("reason", pa.string()),  # skip reason when skipped, else null
    ]
)


@dataclass
class PartitionPrepared:
    """One partition prepared without the duplicate-id check, which needs the whole input.

    ``error`` is the partition's first `InputError` when ``on_invalid``/``on_too_long`` is
    ``error``: ``error_phase`` ``"validate"`` (found while validating, like a duplicate id) or
    ``"too_long"`` (found while tokenizing, after every row was validated, so it only counts
    when no row anywhere fails validation). An error stops the partition: ``table`` is then
    None and ``claims`` holds the rows validated before it.
    """

    table: pa.Table | None  # PROMPT_SCHEMA: kept rows in input order
    claims: pa.Table  # CLAIM_SCHEMA
    skipped: dict[str, int] = field(default_factory=dict)
    num_input_rows: int = 0
    num_truncated: int = 0
    error: InputError | None = None
    error_phase: str | None = None


def prepare_partition(
    rows: InputRows, tokenizer: Any, opts: PrepareOptions, input_opts: InputOptions
) -> PartitionPrepared:
    """`prepare_prompts` for one partition of the input, leaving duplicate ids to a later check
    over every partition's ``claims``. Same rows, numbers and messages as a whole-input run."""
    _check_fast(tokenizer)
    out = _Collector(rows, opts)
    claims: list[tuple[int, str]] = []
    try:
        pending = _validate(rows, tokenizer, input_opts, out, claims)
    except InputError as e:
        return _stopped(rows, claims, e, "validate")
    try:
        table, num_truncated, kept = _build_table(pending, tokenizer, opts, out)
    except InputError as e:
        return _stopped(rows, claims, e, "too_long")
    skipped = sorted(out.skipped, key=lambda s: s.row)
    claim_rows = np.fromiter((r for r, _ in claims), np.int64, len(claims))
    kept_rows = np.asarray(kept, np.int64)
    pos = np.searchsorted(kept_rows, claim_rows)
    in_kept = pos < kept_rows.size
    in_kept[in_kept] = kept_rows[pos[in_kept]] == claim_rows[in_kept]
    pos = np.where(in_kept, pos, -1)
    skip_rows = np.fromiter((s.row for s in skipped), np.int64, len(skipped))
    skip_at = np.searchsorted(skip_rows, claim_rows)
    reasons = np.array([s.reason for s in skipped] + [None], dtype=object)
    hit = skip_at < skip_rows.size
    hit[hit] = skip_rows[skip_at[hit]] == claim_rows[hit]
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    flags = table.column("truncated").to_numpy(zero_copy_only=False)
    claims_table = _claims_table(
        rows,
        claims,
        pos=pos,
        truncated=np.where(in_kept, flags[np.maximum(pos, 0)] if flags.size else False, False),
        tokens=np.where(in_kept, lengths[np.maximum(pos, 0)] if lengths.size else 0, 0),
        reason=reasons[np.where(hit, skip_at, len(skipped))],
    )
    return PartitionPrepared(
        table=table,
        claims=claims_table,
        skipped=dict(sorted(Counter(s.reason for s in skipped).items())),
        num_input_rows=len(rows),
        num_truncated=num_truncated,
    )


def _stopped(
    rows: InputRows, claims: list[tuple[int, str]], error: InputError, phase: str
) -> PartitionPrepared:
    n = len(claims)
    table = _claims_table(
        rows,
        claims,
        pos=np.full(n, -1, np.int64),
        truncated=np.zeros(n, bool),
        tokens=np.zeros(n, np.int64),
        reason=np.full(n, None, dtype=object),
    )
    return PartitionPrepared(
        table=None, claims=table, num_input_rows=len(rows), error=error, error_phase=phase
    )


def _claims_table(
    rows: InputRows,
    claims: list[tuple[int, str]],
    *,
    pos: np.ndarray,
    truncated: np.ndarray,
    tokens: np.ndarray,
    reason: np.ndarray,
) -> pa.Table:
    claim_rows = np.fromiter((r for r, _ in claims), np.int64, len(claims))
    if rows.lines is not None:
        lines = pa.array(np.asarray(rows.lines, np.int64)[claim_rows - rows.start], pa.int64())
    else:
        lines = pa.nulls(len(claims), pa.int64())
    return pa.Table.from_arrays(
        [
            pa.array([i for _, i in claims], pa.string()),
            pa.array(claim_rows, pa.int64()),
            lines,
            pa.array(pos, pa.int64()),
            pa.array(np.asarray(truncated, bool), pa.bool_()),
            pa.array(np.asarray(tokens, np.int64), pa.int64()),
            pa.array(list(reason), pa.string()),
        ],
        schema=CLAIM_SCHEMA,
    )
