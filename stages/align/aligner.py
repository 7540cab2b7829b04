"""Turn teacher-cache rows into student rows with span-level teacher targets.

For each cached row the student tokenizer cuts the row's text; `align_spans` groups the two
tokenizations into byte-aligned spans. A span whose first teacher token is a completion token
is *trained*: both models predict it from the same text prefix, at the teacher position
before its first teacher token and the student position before its first student token. The
span's teacher target is then the top-k stored at that teacher position plus ``chain``, the
teacher's exact log-probability of the span's remaining teacher tokens (the sum of their
``next_logprob``: the chain rule, exact even where a token is outside the top-k).

Truncated rows (``truncated``: longer than ``prompts.max_length`` with ``on_too_long:
truncate``) keep their whole string in ``text`` while their tokens cover only its first
bytes. Such a row is aligned on that prefix:

- its teacher tokens' exact bytes must equal the text's first bytes, byte for byte, as a
  whole row's must equal its whole text;
- the student cuts the *whole* text, as it would the untruncated row, and both sides are cut
  at the last byte offset inside the prefix where both have a token boundary. The teacher
  tokens after it (the rest of a word the student cuts elsewhere, the first bytes of a
  character the teacher split) and the student tokens after it are not aligned; the teacher
  tokens cut are counted per row (``cut_teacher_tokens``, in `Aligner.report`).

So a truncated row's spans are exactly the first spans of the same row aligned untruncated:
the same student ids, and the same teacher targets, the teacher being causal. All of them
are trained like any other, the last included: it ends on a boundary both tokenizations
have, not at the cut. The student is deliberately not given the prefix alone: it would cut
a string that stops mid-word differently from the text (BPE merges and Unigram pieces are
chosen per word, so not only the last token changes), and spans of those tokens would teach
splits the student never makes in context. The price is tokenizing the full text of a
truncated row, as every row's text is tokenized.

The ``truncated`` flag, not "the tokens cover a prefix", decides which rows may stop short:
tokens of an untruncated row that do not reach the end of its text are an error (a text
changed after tokenization, a normalizer that dropped bytes) and the row drops as
``teacher_round_trip``. A batch without the column (built in memory; every cache has it) has
no truncated row, and a flagged row whose tokens cover its whole text (a generated row cut
with its text) is aligned whole.

A row is dropped, counted under its reason, when it cannot be aligned faithfully: its text
does not round-trip through either tokenizer, it has no byte spans (a rollout with invalid
UTF-8 stores -1), it is truncated and no student token boundary meets a teacher one inside
its prefix, or no completion span lines up (the prompt/completion boundary falls inside a
student token and the completion is one span). Nothing is ever aligned approximately.

BOS and EOS that a post-processor added (no bytes in the text) get one virtual byte on both
sides, so the teacher's EOS aligns 1:1 with the student's EOS and "stop here" is distilled
like any other span.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.align.spans import SpanAlignment, align_spans, rows_of
from stages.align.tokens import TokenTable, encode_texts, exact_token_bytes
from stages.align.vocab import VocabMap
from storage.reader import LogitBatch, ragged_gather

DROP_REASONS = {
    "no_byte_spans": "no byte spans (invalid UTF-8 in a rollout)",
    "empty": "no text",
    "teacher_round_trip": "the teacher tokens do not reproduce the text",
    "student_round_trip": "the student tokenizer does not reproduce the text",
    "no_common_cut": "truncated, and no student token ends where a teacher token does",
    "no_completion_span": "no completion span aligns (the prompt boundary is inside a token)",
}


@dataclass
class AlignedRows:
    """R rows in the student's tokens, with one teacher target per aligned span.

    Student tokens are flat (``row_offsets``), spans are flat (``span_offsets``); a token's
    span is local to its row, so rows can be taken and concatenated without renumbering.
    """

    ids: list[str]
    row_offsets: np.ndarray  # int64 [R + 1]
    input_ids: np.ndarray  # int64 [S] student ids
    token_span: np.ndarray  # int64 [S] local span of each student token
    span_offsets: np.ndarray  # int64 [R + 1]
    span_trained: np.ndarray  # bool [P]
    topk_ids: np.ndarray  # int32 [P, k] teacher top-k before the span's first teacher token
    topk_logprobs: np.ndarray  # float32 [P, k]
    chain: np.ndarray  # float32 [P] teacher logprob of the span's other teacher tokens
    teacher_tokens: np.ndarray  # int32 [P] teacher tokens in the span
    # int32 [R]: a truncated row's teacher tokens after its last common boundary (not
    # aligned); -1 for a row aligned whole.
    cut_teacher_tokens: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.ids)

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    def take(self, rows: np.ndarray) -> AlignedRows:
        rows = np.asarray(rows, dtype=np.int64)
        tok, tok_off = ragged_gather(
            self.row_offsets[rows], self.row_offsets[rows + 1] - self.row_offsets[rows]
        )
        span, span_off = ragged_gather(
            self.span_offsets[rows], self.span_offsets[rows + 1] - self.span_offsets[rows]
        )
        return AlignedRows(
            ids=[self.ids[i] for i in rows.tolist()],
            row_offsets=tok_off,
            input_ids=self.input_ids[tok],
            token_span=self.token_span[tok],
            span_offsets=span_off,
            span_trained=self.span_trained[span],
            topk_ids=self.topk_ids[span],
            topk_logprobs=self.topk_logprobs[span],
            chain=self.chain[span],
            teacher_tokens=self.teacher_tokens[span],
            cut_teacher_tokens=self.cut_teacher_tokens[rows],
        )

    @classmethod
    def concat(cls, parts: list[AlignedRows]) -> AlignedRows:
        if len(parts) == 1:
            return parts[0]

        def offsets(name: str) -> np.ndarray:
            ends = np.cumsum([0] + [int(getattr(p, name)[-1]) for p in parts])
            return np.concatenate(
                [np.zeros(1, np.int64)]
                + [getattr(p, name)[1:] + e for p, e in zip(parts, ends, strict=False)]
            )

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts])

        return cls(
            ids=[i for p in parts for i in p.ids],
            row_offsets=offsets("row_offsets"),
            input_ids=cat("input_ids"),
            token_span=cat("token_span"),
            span_offsets=offsets("span_offsets"),
            span_trained=cat("span_trained"),
            topk_ids=cat("topk_ids"),
            topk_logprobs=cat("topk_logprobs"),
            chain=cat("chain"),
            teacher_tokens=cat("teacher_tokens"),
            cut_teacher_tokens=cat("cut_teacher_tokens"),
        )

    def span_shapes(self) -> dict[str, int]:
        """Trained spans by shape: teacher tokens : student tokens as 1:1, 1:n, n:1 or n:m."""
        rows = rows_of(self.row_offsets)
        student = np.bincount(
            self.span_offsets[rows] + self.token_span, minlength=len(self.span_trained)
        )
        t_multi, s_multi = self.teacher_tokens > 1, student > 1
        return {
            f"{'n' if t else '1'}:{('m' if t else 'n') if s else '1'}": int(
                (self.span_trained & (t_multi == t) & (s_multi == s)).sum()
            )
            for t in (False, True)
            for s in (False, True)
        }


class Aligner:
    """Aligns teacher-cache rows to one student tokenizer (built once, reused per shard)."""

    def __init__(
        self, teacher_tokenizer: Any, student_tokenizer: Any, include_prompt: bool = False
    ):
        for side, tok in (("teacher", teacher_tokenizer), ("student", student_tokenizer)):
            if not getattr(tok, "is_fast", False):
                raise ValueError(
                    f"the {side} tokenizer ({type(tok).__name__}) is not a fast (Rust) "
                    "tokenizer: it gives no offsets and no byte table, so it cannot be aligned"
                )
        self.student_tokenizer = student_tokenizer
        self.teacher_table = TokenTable.from_tokenizer(teacher_tokenizer)
        self.student_table = TokenTable.from_tokenizer(student_tokenizer)
        self.vocab = VocabMap.build(
            teacher_tokenizer, student_tokenizer, self.teacher_table, self.student_table
        )
        self.include_prompt = include_prompt
        self.teacher_eos = teacher_tokenizer.eos_token_id
        self.student_bos = student_tokenizer.bos_token_id
        self.student_eos = student_tokenizer.eos_token_id

    def align(self, batch: LogitBatch) -> tuple[AlignedRows, Counter[str]]:
        """The rows of ``batch`` that align, and the number dropped per reason."""
        if batch.text is None or batch.byte_start is None or batch.byte_end is None:
            raise ValueError("cross-tokenizer training needs the rows' text and byte spans")
        drops: Counter[str] = Counter()
        keep = np.ones(batch.num_rows, dtype=bool)
        rows_t = rows_of(batch.row_offsets)
        no_spans = np.zeros(batch.num_rows, dtype=bool)
        np.logical_or.at(no_spans, rows_t, (batch.byte_start < 0) | (batch.byte_end < 0))
        drops["no_byte_spans"] = int(no_spans.sum())
        keep &= ~no_spans
        batch = batch.take(np.flatnonzero(keep))
        texts = batch.text or []
        raw = [t.encode("utf-8") for t in texts]

        # Teacher side: exact bytes of the cached tokens (a truncated row's: a prefix).
        t_bytes = exact_token_bytes(
            self.teacher_table,
            batch.input_ids.astype(np.int64),
            batch.row_offsets,
            batch.byte_start,
            batch.byte_end,
            raw,
            prefix=batch.truncated_rows(),
        )
        # Student side: the same texts, whole, cut by the student tokenizer.
        enc = encode_texts(self.student_tokenizer, self.student_table, texts)
        drops["teacher_round_trip"] = int((~t_bytes.ok).sum())
        drops["student_round_trip"] = int((t_bytes.ok & ~enc.token_bytes.ok).sum())
        good = t_bytes.ok & enc.token_bytes.ok

        # Truncated rows: both sides end at the last common token boundary of the prefix.
        text_len = np.fromiter(map(len, raw), np.int64, len(raw))
        short = good & (t_bytes.covered < text_len)
        t_count, s_count, cut_at = _common_cut(
            t_bytes.lengths,
            batch.row_offsets,
            enc.token_bytes.lengths,
            enc.row_offsets,
            t_bytes.covered,
            short,
        )
        drops["no_common_cut"] = int((short & (cut_at == 0)).sum())
        good &= ~(short & (cut_at == 0))
        cut_teacher = np.where(short, np.diff(batch.row_offsets) - t_count, -1)
        t_len = t_bytes.lengths[ragged_gather(batch.row_offsets[:-1], t_count)[0]]
        batch = batch.head(t_count)
        s_tok, s_off = ragged_gather(enc.row_offsets[:-1], s_count)
        s_ids, s_len = enc.ids[s_tok], enc.token_bytes.lengths[s_tok]
        t_ids = batch.input_ids.astype(np.int64)

        # Post-processor BOS / EOS: a virtual byte on both sides when the student has one too.
        t_first, t_last = batch.row_offsets[:-1], batch.row_offsets[1:] - 1
        nonempty = t_last >= t_first
        special = self.teacher_table.special[t_ids]
        lead = nonempty & special[t_first] & (t_len[t_first] == 0) & (self.student_bos is not None)
        trail = (
            nonempty
            & (t_ids[t_last] == self.teacher_eos)
            & (t_len[t_last] == 0)
            & (t_last > t_first)
            & (self.student_eos is not None)
        )
        t_len[t_first[lead]] = 1
        t_len[t_last[trail]] = 1
        s_ids, s_off, s_len = _add_specials(
            s_ids,
            s_off,
            s_len,
            lead,
            trail,
            self.student_bos,
            self.student_eos,
        )
        # A row without bytes (only zero-width specials) has no span to train.
        t_total = np.zeros(len(good), dtype=np.int64)
        np.add.at(t_total, rows_of(batch.row_offsets), t_len)
        drops["empty"] = int((good & (t_total == 0)).sum())
        good &= t_total > 0
        sel = np.flatnonzero(good)
        batch = batch.take(sel)
        t_len = t_len[ragged_gather(t_first[sel], t_last[sel] - t_first[sel] + 1)[0]]
        s_tok, s_off = ragged_gather(s_off[sel], s_off[sel + 1] - s_off[sel])
        s_ids, s_len = s_ids[s_tok], s_len[s_tok]

        spans = align_spans(t_len, batch.row_offsets, s_len, s_off)
        rows = self._spans(batch, spans, s_ids, s_off, cut_teacher[sel].astype(np.int32))
        span_rows = rows_of(rows.span_offsets)
        trained_rows = np.zeros(rows.num_rows, dtype=bool)
        trained_rows[span_rows[rows.span_trained]] = True
        drops["no_completion_span"] = int((~trained_rows).sum())
        return rows.take(np.flatnonzero(trained_rows)), +drops

    def report(self, parts: list[tuple[AlignedRows, Counter[str]]]) -> dict[str, Any]:
        """What alignment did to some aligned shards: rows kept and dropped (by reason),
        trained spans by shape, the vocabulary map's coverage and the share of the teacher's
        top-k probability mass (on trained spans) that falls on mapped ids; truncated rows
        aligned on a prefix, and the teacher tokens after their last common boundary."""
        drops: Counter[str] = Counter()
        spans: Counter[str] = Counter()
        mass = mapped_mass = 0.0
        truncated = cut = 0
        for rows, dropped in parts:
            drops.update(dropped)
            spans.update(rows.span_shapes())
            truncated += int((rows.cut_teacher_tokens >= 0).sum())
            cut += int(rows.cut_teacher_tokens[rows.cut_teacher_tokens > 0].sum())
            p = np.exp(rows.topk_logprobs[rows.span_trained].astype(np.float64))
            mapped = self.vocab.teacher_to_student[rows.topk_ids[rows.span_trained]] >= 0
            mass += float(p.sum())
            mapped_mass += float((p * mapped).sum())
        return {
            "rows": sum(rows.num_rows for rows, _ in parts),
            "dropped": {DROP_REASONS[k]: v for k, v in drops.items() if v},
            "spans": {shape: spans[shape] for shape in ("1:1", "1:n", "n:1", "n:m")},
            "truncated": {"rows": truncated, "teacher_tokens_cut": cut},
            "vocab": self.vocab.coverage(),
            "mapped_mass": round(mapped_mass / mass, 4) if mass > 0 else None,
        }

    def _spans(
        self,
        batch: LogitBatch,
        spans: SpanAlignment,
        s_ids: np.ndarray,
        s_off: np.ndarray,
        cut_teacher_tokens: np.ndarray,
    ) -> AlignedRows:
        """Span tables: first tokens, trained flags, teacher top-k and chain."""
        n_rows = batch.num_rows
        num_spans = spans.num_spans
        span_off = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(num_spans, out=span_off[1:])
        t_rows = rows_of(batch.row_offsets)
        s_rows = rows_of(s_off)
        t_glob = span_off[t_rows] + spans.teacher_span
        s_glob = span_off[s_rows] + spans.student_span
        total = int(span_off[-1])
        # First and last teacher token (flat index) and first student token of each span:
        # spans are monotone in token order, so the minimum / maximum index per span.
        t_index = np.arange(len(t_glob))
        first_t = np.full(total, np.iinfo(np.int64).max)
        last_t = np.full(total, -1)
        np.minimum.at(first_t, t_glob, t_index)
        np.maximum.at(last_t, t_glob, t_index)
        first_s = np.full(total, np.iinfo(np.int64).max)
        np.minimum.at(first_s, s_glob, np.arange(len(s_glob)))
        span_rows = rows_of(span_off)
        a = first_t - batch.row_offsets[span_rows]  # local index of the first teacher token
        c = first_s - s_off[span_rows]
        lowest = 1 if self.include_prompt else np.maximum(batch.prompt_len[span_rows], 1)
        trained = (a >= lowest) & (c >= 1)
        predict = np.where(trained, first_t - 1, 0)  # the teacher position before the span
        # chain = sum of next_logprob over positions first_t .. last_t - 1 (float64 cumsum; the
        # row's last position, NaN, is never inside such a range).
        lp = np.nan_to_num(batch.next_logprob.astype(np.float64), nan=0.0)
        cum = np.concatenate([[0.0], np.cumsum(lp)])
        chain = np.where(trained, cum[last_t] - cum[first_t], 0.0).astype(np.float32)
        return AlignedRows(
            ids=list(batch.ids),
            row_offsets=s_off,
            input_ids=s_ids,
            token_span=spans.student_span,
            span_offsets=span_off,
            span_trained=trained,
            topk_ids=batch.topk_ids[predict],
            topk_logprobs=np.where(trained[:, None], batch.topk_logprobs[predict], -np.inf).astype(
                np.float32
            ),
            chain=chain,
            teacher_tokens=(last_t - first_t + 1).astype(np.int32),
            cut_teacher_tokens=cut_teacher_tokens,
        )


def _common_cut(
    t_len: np.ndarray,
    t_off: np.ndarray,
    s_len: np.ndarray,
    s_off: np.ndarray,
    covered: np.ndarray,
    short: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the rows ``short`` (bool [R]) end: the last byte offset in ``(0, covered[r]]`` at
    which a teacher token and a student token of row r both end (0: there is none), and the
    tokens each side keeps per row: those that start before it (every token of other rows,
    and of a short row without a common boundary, which the caller drops).

    A zero-length token at the cut is left out: aligned untruncated, it joins the span that
    starts there. One boolean mark per prefix byte and side, as `align_spans` marks ends.
    """
    n_rows = len(covered)
    t_rows, s_rows = rows_of(t_off), rows_of(s_off)
    t_count, s_count = np.diff(t_off), np.diff(s_off)
    cut_at = np.where(short, 0, covered)
    sel = np.flatnonzero(short)
    if sel.size == 0:
        return t_count, s_count, cut_at
    slot = np.full(n_rows, -1, dtype=np.int64)
    slot[sel] = np.arange(sel.size)
    base = np.zeros(sel.size + 1, dtype=np.int64)  # row sel[i]'s bytes 0..covered: base[i] + x
    np.cumsum(covered[sel] + 1, out=base[1:])

    def ends(lengths: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
        cum = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        return cum[1:] - cum[offsets[rows]]  # local end of each token

    t_end, s_end = ends(t_len, t_off, t_rows), ends(s_len, s_off, s_rows)
    marks = np.zeros((2, int(base[-1])), dtype=bool)
    for side, end, rows in ((0, t_end, t_rows), (1, s_end, s_rows)):
        at = short[rows] & (end <= covered[rows])
        marks[side, base[slot[rows[at]]] + end[at]] = True
    common = marks[0] & marks[1]
    common[base[:-1]] = False  # offset 0: no span ends there
    hit = np.flatnonzero(common)
    owner = np.searchsorted(base, hit, side="right") - 1
    last = np.zeros(sel.size, dtype=np.int64)
    np.maximum.at(last, owner, hit - base[owner])
    cut_at[sel] = last
    cut = short & (cut_at > 0)  # a row without a common boundary keeps all (it is dropped)
    for count, length, end, rows in (
        (t_count, t_len, t_end, t_rows),
        (s_count, s_len, s_end, s_rows),
    ):
        before = cut[rows] & (end - length < cut_at[rows])  # the token starts before the cut
        count[cut] = np.bincount(rows[before], minlength=n_rows)[cut]
    return t_count, s_count, cut_at


def _add_specials(
    ids: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
    lead: np.ndarray,
    trail: np.ndarray,
    bos: int | None,
    eos: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Student rows with BOS put first where ``lead`` and EOS last where ``trail``, each one
    virtual byte long (one vectorised scatter, no per-row insertion)."""
    counts = np.diff(offsets)
    new_counts = counts + lead + trail
    new_off = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(new_counts, out=new_off[1:])
    rows = rows_of(offsets)
    dest = np.arange(len(ids)) - offsets[rows] + new_off[rows] + lead[rows]
    out_ids = np.zeros(int(new_off[-1]), dtype=np.int64)
    out_len = np.ones(int(new_off[-1]), dtype=np.int64)
    out_ids[dest], out_len[dest] = ids, lengths
    out_ids[new_off[:-1][lead]] = -1 if bos is None else bos
    out_ids[new_off[1:][trail] - 1] = -1 if eos is None else eos
    return out_ids, new_off, out_len
