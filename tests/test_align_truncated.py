"""Truncated rows across tokenizers: aligned on the prefix their teacher tokens cover.

Rows go through the real prompt stage (`prepare_prompts` with ``max_length``, the EOS
appended), the real logit table and Parquet bytes, and the real reader, so the ``truncated``
column and the byte spans are what a cache holds; only the teacher's outputs are synthetic.
They are drawn once per position of the untruncated rows and the truncated rows take the
same positions (a causal teacher scores a prefix exactly as it scores the prefix of the
whole row), so the oracle is the untruncated row's own alignment: a truncated row must align
to exactly its first spans, those whose teacher tokens all survived the cut.

Tokenizer families as in `tests.test_align`: the embedded teacher's ByteLevel BPE (single
digits), a GPT-2 style ByteLevel BPE, and a SentencePiece-style Unigram (Metaspace "▁", byte
fallback), as teacher and as student.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.demo.build import DEFAULT_SPEC, train_tokenizer
from pipeline.demo.tokenizers import byte_level_bpe, unigram_metaspace
from stages.align.aligner import DROP_REASONS, AlignedRows, Aligner
from stages.align.tokens import exact_token_bytes
from stages.prompts import InputOptions, PrepareOptions, prepare_prompts
from storage.codecs import get_codec
from storage.reader import LogitBatch, decode_logit_table, ragged_gather
from storage.schema import ShardSetMetadata, build_logit_table
from storage.writer import parquet_bytes
from tests.test_align import FAST, METASPACE, TEXT, Named, make_corpus

K = 4
PAIRS = [
    ("teacher", "unigram"),
    ("teacher", "bpe"),
    ("unigram", "bpe"),
    ("bpe", "unigram"),
    ("teacher", "teacher"),
]


@pytest.fixture(scope="module")
def toks() -> dict:
    corpus = make_corpus(400, seed=0)
    return Named(
        {
            "teacher": train_tokenizer(DEFAULT_SPEC),
            "bpe": byte_level_bpe(corpus, 400),
            "unigram": unigram_metaspace(corpus, 500),
        }
    )


@pytest.fixture(scope="module")
def aligners(toks) -> dict:
    return Named({"-".join(pair): Aligner(toks[pair[0]], toks[pair[1]]) for pair in PAIRS})


# --------------------------------------------------------------------------- helpers

META = ShardSetMetadata(
    kind="teacher_logits",
    teacher_model="tiny/teacher",
    tokenizer_fingerprint="tok",
    k=K,
    codec="fp32",
    logprobs_mode="raw_logprobs",
    engine="vllm",
    engine_version="0",
    plan_fingerprint="plan",
)


def prompts(tok, rows: list[dict], max_length: int | None) -> pa.Table:
    opts = PrepareOptions(max_length=max_length, append_eos=True)
    return prepare_prompts(rows, tok, opts, InputOptions(path="unused.jsonl")).table


def shard(table: pa.Table, topk_ids, topk_logprobs, next_logprob) -> LogitBatch:
    """The rows as a cache shard holds them, read back by the reader."""
    logits = build_logit_table(table, topk_ids, topk_logprobs, next_logprob, get_codec("fp32"))
    return decode_logit_table(pq.read_table(pa.BufferReader(parquet_bytes(logits, META))), META)


def cached(tok, rows: list[dict], max_length: int, seed: int = 0) -> tuple[LogitBatch, LogitBatch]:
    """The rows cached whole and cut to ``max_length`` tokens, with the same teacher outputs
    at every position both hold (NaN after a row's last token, as the teacher writes)."""
    whole, cut = prompts(tok, rows, None), prompts(tok, rows, max_length)
    lengths = [len(r) for r in whole.column("input_ids").to_pylist()]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    rng = np.random.default_rng(seed)
    topk_ids = rng.integers(0, len(tok), (total, K)).astype(np.int32)
    topk_lps = -np.sort(rng.random((total, K)), axis=1).astype(np.float32)
    next_lp = (-rng.random(total) - 0.01).astype(np.float32)
    full_next = next_lp.copy()
    full_next[offsets[1:] - 1] = np.nan
    full = shard(whole, topk_ids, topk_lps, full_next)
    counts = np.asarray([len(r) for r in cut.column("input_ids").to_pylist()], np.int64)
    pos, cut_off = ragged_gather(offsets[:-1], counts)
    cut_next = next_lp[pos]
    cut_next[cut_off[1:] - 1] = np.nan
    short = shard(cut, topk_ids[pos], topk_lps[pos], cut_next)
    # The prompt stage keeps the whole text and the first max_length tokens, as the oracle needs.
    assert short.text == full.text and (short.input_ids == full.input_ids[pos]).all()
    assert (short.truncated == (np.diff(offsets) > max_length)).all()
    assert not full.truncated.any()
    return full, short


def row_index(rows: AlignedRows) -> dict[str, int]:
    return {rid: i for i, rid in enumerate(rows.ids)}


def teacher_bytes(aligner: Aligner, batch: LogitBatch, b: int) -> np.ndarray:
    """Exact byte lengths of row b's teacher tokens (as a prefix of its text)."""
    row = batch.take(np.array([b]))
    tb = exact_token_bytes(
        aligner.teacher_table,
        row.input_ids.astype(np.int64),
        row.row_offsets,
        row.byte_start,
        row.byte_end,
        [row.text[0].encode("utf-8")],
        prefix=np.array([True]),
    )
    assert tb.ok.all()
    return tb.lengths


def check_cut_rows(
    aligner: Aligner,
    short: LogitBatch,
    full_rows: AlignedRows,
    short_rows: AlignedRows,
    drops,
) -> int:
    """Every row aligned whole aligns truncated to exactly the first spans of its whole
    alignment whose teacher tokens all survive the cut: the same student ids, span numbers,
    trained flags, teacher top-k, logprobs and chains, and no further span. Returns how
    many rows were aligned on a prefix of their text."""
    assert set(drops) <= set(DROP_REASONS)
    assert short_rows.num_rows + sum(drops.values()) == short.num_rows
    got, want = row_index(short_rows), row_index(full_rows)
    n_teacher = np.diff(short.row_offsets)
    on_prefix = 0
    for b, rid in enumerate(short.ids):
        if rid not in want:
            continue  # dropped whole (e.g. "▁" after the cut): nothing to compare with
        w = want[rid]
        w0, w1 = full_rows.span_offsets[w], full_rows.span_offsets[w + 1]
        # The spans whose teacher tokens lie in the prefix: they end on a common boundary.
        keep = int((np.cumsum(full_rows.teacher_tokens[w0:w1]) <= n_teacher[b]).sum())
        if not full_rows.span_trained[w0 : w0 + keep].any():
            assert rid not in got  # the cut left no completion span (or no common boundary)
            continue
        assert rid in got, (rid, drops)
        r = got[rid]
        p0, p1 = short_rows.span_offsets[r], short_rows.span_offsets[r + 1]
        assert p1 - p0 == keep
        trained = full_rows.span_trained[w0 : w0 + keep]
        for name in ("span_trained", "teacher_tokens", "topk_ids", "topk_logprobs", "chain"):
            got_v, want_v = (
                getattr(short_rows, name)[p0:p1],
                getattr(full_rows, name)[w0 : w0 + keep],
            )
            if name.startswith("topk") or name == "chain":  # untrained spans hold filler
                got_v, want_v = got_v[trained], want_v[trained]
            np.testing.assert_array_equal(got_v, want_v, name)
        s0, s1 = short_rows.row_offsets[r], short_rows.row_offsets[r + 1]
        f0, f1 = full_rows.row_offsets[w], full_rows.row_offsets[w + 1]
        m = s1 - s0
        np.testing.assert_array_equal(short_rows.input_ids[s0:s1], full_rows.input_ids[f0 : f0 + m])
        np.testing.assert_array_equal(
            short_rows.token_span[s0:s1], full_rows.token_span[f0 : f0 + m]
        )
        if f0 + m < f1:  # the whole row's next student token opens the next span
            assert full_rows.token_span[f0 + m] == keep
        # A row whose tokens stop short of its text is aligned on a prefix, and the teacher
        # tokens past its last common boundary are counted; any other row is aligned whole.
        cut = short_rows.cut_teacher_tokens[r]
        if short.truncated[b] and teacher_bytes(aligner, short, b).sum() < len(
            short.text[b].encode()
        ):
            assert cut == n_teacher[b] - int(short_rows.teacher_tokens[p0:p1].sum())
            on_prefix += 1
        else:
            assert cut == -1
    return on_prefix


def long_rows(seed: int, n: int) -> list[dict]:
    """Plain text and prompt + completion rows, six corpus lines each (no "▁")."""
    lines = make_corpus(6 * n, seed=seed)
    out: list[dict] = []
    for i in range(n):
        text = " ".join(lines[6 * i : 6 * i + 6])
        if i % 2:
            out.append({"id": f"r{i}", "text": text})
        else:  # the completion starts a word: its first span cannot straddle the prompt
            out.append({"id": f"r{i}", "prompt": "Q:", "completion": " " + text})
    return out


# --------------------------------------------------------------------------- 1. kept


@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
@pytest.mark.parametrize("max_length", [24, 37, 50])
def test_truncated_rows_are_kept(toks, aligners, pair, max_length) -> None:
    """The bug: every truncated row dropped as teacher_round_trip. Now all are kept, each
    exactly the first spans of its untruncated alignment."""
    rows = long_rows(seed=max_length, n=12)
    full, short = cached(toks[pair[0]], rows, max_length, seed=max_length)
    assert short.truncated.all()  # every row is longer than max_length tokens
    aligner = aligners["-".join(pair)]
    full_rows, full_drops = aligner.align(full)
    short_rows, drops = aligner.align(short)
    assert full_rows.num_rows == len(rows) and not full_drops
    assert short_rows.num_rows == len(rows) and not drops, drops
    assert short_rows.ids == full_rows.ids
    assert check_cut_rows(aligner, short, full_rows, short_rows, drops) == len(rows)
    report = aligner.report([(short_rows, drops)])
    cut = short_rows.cut_teacher_tokens
    assert report["rows"] == len(rows) and report["dropped"] == {}
    assert report["truncated"] == {"rows": len(rows), "teacher_tokens_cut": int(cut.sum())}
    if pair[0] == pair[1]:
        # The teacher's own tokenizer ends where the teacher does: nothing is cut, and the
        # student row is the truncated row itself.
        assert (cut == 0).all()
        np.testing.assert_array_equal(short_rows.input_ids, short.input_ids)
        np.testing.assert_array_equal(short_rows.row_offsets, short.row_offsets)


ROWS = st.lists(
    st.tuples(TEXT, st.lists(TEXT, min_size=1, max_size=4).map(" ".join)),
    min_size=1,
    max_size=4,
)


@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
@FAST
@given(rows=ROWS, max_length=st.integers(2, 30))
def test_truncated_row_is_a_prefix_of_its_whole_alignment(
    toks, aligners, pair, rows, max_length
) -> None:
    """Random multilingual text (emoji, CJK, combining marks, whitespace runs), any cut:
    the oracle of `check_cut_rows` for every row that aligns whole."""
    dicts = []
    for i, (p, c) in enumerate(rows):
        p, c = p.replace(METASPACE, "_"), c.replace(METASPACE, "_")  # "▁": see test_align
        if (p + c).strip():
            row = {"prompt": p, "completion": c} if p.strip() and c.strip() else {"text": p + c}
            dicts.append({"id": f"r{i}", **row})
    if not dicts:
        return
    full, short = cached(toks[pair[0]], dicts, max_length)
    aligner = aligners["-".join(pair)]
    full_rows, _ = aligner.align(full)
    short_rows, drops = aligner.align(short)
    check_cut_rows(aligner, short, full_rows, short_rows, drops)
    assert drops["teacher_round_trip"] == 0  # a truncated row's prefix always round-trips


# --------------------------------------------------------------------------- 2. strict


def test_an_untruncated_row_must_reproduce_its_whole_text(toks, aligners) -> None:
    """Only the ``truncated`` flag lets tokens stop short of the text: the same rows unflagged
    (or from a batch without the column) drop as teacher_round_trip, as before."""
    rows = long_rows(seed=1, n=6)
    _, short = cached(toks["teacher"], rows, 20)
    aligner = aligners["teacher-bpe"]
    for unflagged in (
        LogitBatch(**{**vars(short), "truncated": np.zeros(short.num_rows, bool)}),
        LogitBatch(**{**vars(short), "truncated": None}),
    ):
        out, drops = aligner.align(unflagged)
        assert out.num_rows == 0 and dict(drops) == {"teacher_round_trip": len(rows)}
    # Flagged, the prefix is still checked byte for byte: one changed byte inside it drops
    # the row, one after it does not matter.
    texts = list(short.text)
    data = texts[0].encode()
    inside = int(short.byte_start[short.row_offsets[0] + 3])
    texts[0] = (data[:inside] + b"#" + data[inside + 1 :]).decode()
    data = texts[1].encode()
    texts[1] = (data[:-1] + (b"#" if data[-1:] != b"#" else b"%")).decode()
    changed = LogitBatch(**{**vars(short), "text": texts})
    out, drops = aligner.align(changed)
    assert dict(drops) == {"teacher_round_trip": 1} and "r0" not in out.ids and "r1" in out.ids
    # A text shorter than its tokens is no prefix of it either.
    texts = list(short.text)
    texts[2] = texts[2][:3]
    out, drops = aligner.align(LogitBatch(**{**vars(short), "text": texts}))
    assert dict(drops) == {"teacher_round_trip": 1} and "r2" not in out.ids


def test_a_row_cut_without_a_common_boundary_is_dropped(toks, aligners) -> None:
    """The teacher's prefix ends before the student's first token does: nothing aligns."""
    teacher, student = toks["teacher"], toks["unigram"]
    # The longest ASCII word the student holds as one piece ("▁" + word); the teacher, with
    # few merges and single digits, needs more than two tokens for it.
    word = max(
        (p[1:] for p in student.get_vocab() if p[:1] == METASPACE and p[1:].isascii()),
        key=len,
    )
    assert len(student(word, add_special_tokens=False)["input_ids"]) == 1
    assert len(teacher(word, add_special_tokens=False)["input_ids"]) > 2
    rows = [{"id": "a", "text": word}, {"id": "b", "text": "a b c d e f"}]
    _, short = cached(teacher, rows, 3)  # BOS and the word's first two tokens
    out, drops = aligners["teacher-unigram"].align(short)
    assert out.ids == ["b"] and dict(drops) == {"no_common_cut": 1}


# --------------------------------------------------------------------------- 3. multi-byte

SPLIT = "héllo 👨\u200d👩\u200d👧\u200d👦 and 🧑🏿\u200d💻 with 世界 and ❤️ then 👍🏽 ok"


@pytest.mark.parametrize("pair", [p for p in PAIRS if p[0] != "unigram"], ids="-".join)
def test_cut_inside_a_character(toks, aligners, pair) -> None:
    """A ByteLevel teacher splits characters (an emoji's four bytes over several tokens), so
    max_length can end the prefix inside one. The cut then goes back to the last boundary
    both sides share: before the character where the student holds it whole (the teacher
    tokens of its first bytes counted as cut), inside it where the student splits it at the
    same byte (both sides then hold exactly those bytes)."""
    teacher = toks[pair[0]]
    text = SPLIT
    data = text.encode()
    rows = [{"id": "x", "text": text}]
    whole = prompts(teacher, rows, None).column("input_ids").to_pylist()[0]
    aligner = aligners["-".join(pair)]
    outcomes = []
    for n in range(2, len(whole) - 1):
        full, short = cached(teacher, rows, n)
        lengths = teacher_bytes(aligner, short, 0)
        covered = int(lengths.sum())
        if data[covered] & 0xC0 != 0x80:
            continue  # the prefix ends on a character boundary
        full_rows, _ = aligner.align(full)
        short_rows, drops = aligner.align(short)
        assert check_cut_rows(aligner, short, full_rows, short_rows, drops) == 1
        cut = int(short_rows.cut_teacher_tokens[0])
        kept = int(lengths[: n - cut].sum())  # bytes both sides keep
        if kept < len(data) and data[kept] & 0xC0 == 0x80:
            outcomes.append("inside")  # both tokenizations cut this character there
        else:
            assert cut >= 1 and kept < covered
            data[:kept].decode()  # whole characters
            outcomes.append("before")
    assert outcomes, "the teacher splits no character of the text"
    if pair[1] == pair[0]:
        assert set(outcomes) == {"inside"}  # the same tokens: the same cut
    else:
        assert "before" in outcomes


# --------------------------------------------------------------------------- 4. reader


def test_reader_column_head_and_concat(toks) -> None:
    rows = long_rows(seed=2, n=3)
    full, short = cached(toks["teacher"], rows, 1000)
    assert short.truncated.tolist() == [False] * 3
    full, short = cached(toks["teacher"], rows, 10)
    assert short.truncated.dtype == bool and short.truncated.all()
    # head: the first counts of each row, NaN at a cut row's new last position.
    n = np.diff(full.row_offsets)
    counts = np.array([n[0], 5, 1])
    part = full.head(counts)
    assert np.diff(part.row_offsets).tolist() == counts.tolist()
    assert part.truncated.tolist() == [False, True, True]
    assert np.isnan(part.next_logprob[part.row_offsets[1:] - 1]).all()
    np.testing.assert_array_equal(
        part.input_ids[n[0] :],
        np.concatenate([full.input_ids[n[0] : n[0] + 5], full.input_ids[n[0] + n[1] :][:1]]),
    )
    assert (part.prompt_len <= counts).all() and part.text == full.text
    assert full.head(n) is full
    with pytest.raises(ValueError, match="head needs"):
        full.head(n + 1)
    # A part without the column has no truncated row.
    plain = LogitBatch(**{**vars(short), "truncated": None})
    both = LogitBatch.concat([plain, short])
    assert both.truncated.tolist() == [False] * 3 + [True] * 3
    assert LogitBatch.concat([plain, plain]).truncated is None
    assert short.take(np.array([2, 0])).truncated.tolist() == [True, True]


def test_aligned_rows_keep_the_cut_counts(toks, aligners) -> None:
    rows = long_rows(seed=3, n=4)
    full, short = cached(toks["teacher"], rows, 15)
    aligner = aligners["teacher-unigram"]
    a, _ = aligner.align(full)
    b, _ = aligner.align(short)
    assert (a.cut_teacher_tokens == -1).all() and (b.cut_teacher_tokens >= 0).all()
    both = AlignedRows.concat([a, b])
    np.testing.assert_array_equal(
        both.cut_teacher_tokens, np.concatenate([a.cut_teacher_tokens, b.cut_teacher_tokens])
    )
    picked = both.take(np.array([5, 1]))
    assert picked.cut_teacher_tokens.tolist() == [b.cut_teacher_tokens[1], -1]
