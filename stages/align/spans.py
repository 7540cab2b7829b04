"""Byte-span alignment of two tokenizations of the same text.

Two tokenizers cut the same UTF-8 bytes at different places. An *aligned span* is a maximal
run of teacher tokens and a run of student tokens that cover exactly the same bytes: its ends
are the byte offsets where both tokenizations have a token boundary. So every teacher token
and every student token lies in exactly one span, spans are contiguous and in text order, and
a span can be 1:1, 1:n, n:1 or n:m.

The input is each token's exact byte length (see `stages.align.tokens`), flattened over many
rows with row offsets; both sides must cover the same number of bytes per row. The work is
O(T + S + B) for T teacher tokens, S student tokens and B bytes, with no Python loop over
rows or tokens: mark each side's token ends in a boolean array over all bytes, AND the two,
and a cumulative count of the common ends numbers the spans.

A token of zero bytes (a special token with no text, e.g. a BOS added by a post-processor)
joins the span of the bytes that follow it, or the row's last span when nothing follows. A
row without any bytes has no span: its tokens get span -1.
Callers that want a special token to be a span of its own give it one virtual byte on both
sides (`stages.align.aligner` does so for BOS and EOS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class AlignmentError(ValueError):
    """The two tokenizations do not cover the same bytes (named by row)."""


@dataclass(frozen=True)
class SpanAlignment:
    """Per-token span numbers (local to each row) and the number of spans per row."""

    teacher_span: np.ndarray  # int64 [T]
    student_span: np.ndarray  # int64 [S]
    num_spans: np.ndarray  # int64 [R]


def rows_of(offsets: np.ndarray) -> np.ndarray:
    """The row of each flat element, from row offsets [R + 1]."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def _row_totals(lengths: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    cum = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cum[1:])
    return cum[offsets[1:]] - cum[offsets[:-1]]


def _spans_of(
    lengths: np.ndarray,
    offsets: np.ndarray,
    common_before: np.ndarray,
    row_first: np.ndarray,
    num_spans: np.ndarray,
) -> np.ndarray:
    """Local span number of each token of one side.

    ``common_before[x]`` counts the common boundaries at byte positions <= x (global bytes).
    A token with bytes [s, e) lies in the span numbered by the common boundaries <= s; a
    zero-length token at s therefore joins the span that starts at s.
    """
    end = np.cumsum(lengths, dtype=np.int64)
    start = end - lengths
    rows = rows_of(offsets)
    local = common_before[start] - row_first[rows]
    # A zero-length token after the row's last byte would open a span that does not exist; a
    # row without bytes has no span at all (-1).
    return np.where(num_spans[rows] > 0, np.minimum(local, num_spans[rows] - 1), -1)


def align_spans(
    teacher_lengths: np.ndarray,
    teacher_offsets: np.ndarray,
    student_lengths: np.ndarray,
    student_offsets: np.ndarray,
) -> SpanAlignment:
    """Align teacher and student tokens of R rows by the bytes they cover.

    ``*_lengths`` are each token's byte length (int, >= 0), flattened row after row;
    ``*_offsets`` [R + 1] delimit the rows. Raises :class:`AlignmentError` naming the rows
    whose two sides cover different numbers of bytes.
    """
    t_len = np.asarray(teacher_lengths, dtype=np.int64)
    s_len = np.asarray(student_lengths, dtype=np.int64)
    t_off = np.asarray(teacher_offsets, dtype=np.int64)
    s_off = np.asarray(student_offsets, dtype=np.int64)
    if len(t_off) != len(s_off):
        raise AlignmentError(f"{len(t_off) - 1} teacher rows but {len(s_off) - 1} student rows")
    if (t_len < 0).any() or (s_len < 0).any():
        raise AlignmentError("token byte lengths must be >= 0")
    t_tot, s_tot = _row_totals(t_len, t_off), _row_totals(s_len, s_off)
    bad = np.flatnonzero(t_tot != s_tot)
    if bad.size:
        shown = ", ".join(f"row {r}: {t_tot[r]} vs {s_tot[r]} bytes" for r in bad[:5])
        raise AlignmentError(
            f"teacher and student cover different bytes in {bad.size} rows: {shown}"
        )

    # Global byte coordinates: as every row covers the same bytes on both sides, one running
    # sum over all rows gives each token's end on both sides.
    total = int(t_tot.sum())
    marks = np.zeros((2, total + 1), dtype=bool)
    marks[0, np.cumsum(t_len)] = True
    marks[1, np.cumsum(s_len)] = True
    common = marks[0] & marks[1]
    common[0] = False  # position 0 is where the first row starts, no span ends there
    common_before = np.cumsum(common)  # [B + 1]: common ends at positions <= x
    row_start = np.zeros(len(t_tot) + 1, dtype=np.int64)
    np.cumsum(t_tot, out=row_start[1:])
    row_first = common_before[row_start[:-1]]
    num_spans = common_before[row_start[1:]] - row_first
    return SpanAlignment(
        teacher_span=_spans_of(t_len, t_off, common_before, row_first, num_spans),
        student_span=_spans_of(s_len, s_off, common_before, row_first, num_spans),
        num_spans=num_spans,
    )


def align_spans_reference(
    teacher_lengths: list[int], student_lengths: list[int]
) -> tuple[list[int], list[int]]:
    """One row, token by token in plain Python: the oracle for tests and the bench baseline.

    Two byte cursors walk the two token lists, the one behind moving first; when both meet at
    a byte past the current span's start (and before the end of the text) the span closes.
    """
    total = sum(teacher_lengths)
    if total != sum(student_lengths):
        raise AlignmentError("teacher and student cover different bytes")
    t_spans: list[int] = []
    s_spans: list[int] = []
    i = j = t_pos = s_pos = span = start = 0
    while i < len(teacher_lengths) or j < len(student_lengths):
        if t_pos == s_pos and start < t_pos < total:
            span, start = span + 1, t_pos
        if j >= len(student_lengths) or (i < len(teacher_lengths) and t_pos <= s_pos):
            t_spans.append(span)
            t_pos += teacher_lengths[i]
            i += 1
        else:
            s_spans.append(span)
            s_pos += student_lengths[j]
            j += 1
    return t_spans, s_spans
