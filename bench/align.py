"""Cross-tokenizer alignment throughput: vectorised `align_spans` against its per-token
reference on the same rows, in the same run, and the whole `Aligner.align` path.

Rows are random multilingual text (mostly Latin prose with accents, some Cyrillic, Greek,
CJK, Arabic, emoji and digits), cut by a GPT-2 style ByteLevel BPE (the teacher) and a
SentencePiece-style Unigram with byte fallback (the student), both trained here on text from
the same generator. Rates are teacher tokens per second; the student's token count is
reported next to it.

- vectorised  `align_spans` over all rows at once (exact byte lengths precomputed)
- reference   `align_spans_reference` looped over the same rows (lists precomputed)
- aligner     `Aligner.align` on a LogitBatch of those rows: teacher exact bytes, student
              tokenization and exact bytes, span alignment and the span tables

    python -m bench.align [--rows 2048]
"""

from __future__ import annotations

import argparse
import os
import random
import time

import numpy as np


def _words(text: str) -> list[str]:
    return text.split()


WORDS = {
    "latin": _words(
        "the of and to in is that for it with as was on be at by this had not are but from "
        "or have an they which one you were her all she there would their we him been has "
        "when who will more no if out so said what up its about into than them can only "
        "café naïve über façade jalapeño résumé Zürich Ångström señor déjà coöperate"
    ),
    "cyrillic": _words("привет мир Москва ёжик щука Україна съешь в на и не что"),
    "greek": _words("αλφα Ελλάδα λόγος ψυχή Ωμέγα και το"),
    "rtl": _words("שלום עולם مرحبا العالم سلام كتاب"),
    "cjk": _words("你好 世界 東京 日本語 한국어 漢字 ひらがな カタカナ"),
    "emoji": ["😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "❤️", "🇫🇷", "✨"],
    "digits": ["0", "42", "3.14", "2024", "1,000", "-7", "12:30"],
}
WEIGHTS = {"latin": 70, "cyrillic": 6, "greek": 4, "rtl": 4, "cjk": 6, "emoji": 4, "digits": 6}
SEPARATORS = [" "] * 12 + [", ", ". ", "\n", "  ", "\t", "! ", "? "]


def make_texts(rows: int, words_per_row: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    cats, weights = list(WEIGHTS), list(WEIGHTS.values())
    out = []
    for _ in range(rows):
        n = rng.randint(words_per_row // 2, words_per_row * 3 // 2)
        picks = rng.choices(cats, weights, k=n)
        out.append("".join(rng.choice(WORDS[c]) + rng.choice(SEPARATORS) for c in picks))
    return out


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _logit_batch(tokenizer, texts: list[str], k: int, seed: int):
    """Teacher-cache rows as the prompt stage writes them: BOS, text tokens, appended EOS;
    the first half of each text's bytes is the prompt."""
    from stages.prompts.tokenize import byte_spans, count_prompt_tokens, tokenize_batch
    from storage.reader import LogitBatch

    rng = np.random.default_rng(seed)
    ids, starts, ends, prompt_len = [], [], [], []
    for text, (row, offsets) in zip(
        texts, tokenize_batch(tokenizer, texts, add_special_tokens=True), strict=True
    ):
        n = len(text.encode("utf-8"))
        start, end = byte_spans(text, offsets)
        ids.append(np.append(row, tokenizer.eos_token_id))
        starts.append(np.append(start, n))
        ends.append(np.append(end, n))
        prompt_len.append(count_prompt_tokens(starts[-1], n // 2))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in ids], out=offsets[1:])
    total = int(offsets[-1])
    next_lp = -rng.random(total, dtype=np.float32)
    next_lp[offsets[1:] - 1] = np.nan
    return LogitBatch(
        ids=[f"row-{i}" for i in range(len(texts))],
        row_offsets=offsets,
        input_ids=np.concatenate(ids).astype(np.int32),
        prompt_len=np.asarray(prompt_len, np.int32),
        topk_ids=rng.integers(0, len(tokenizer), (total, k)).astype(np.int32),
        topk_logprobs=-np.sort(rng.random((total, k), dtype=np.float32), axis=1),
        next_logprob=next_lp,
        text=list(texts),
        byte_start=np.concatenate(starts).astype(np.int32),
        byte_end=np.concatenate(ends).astype(np.int32),
    )


def bench_align(rows: int = 2048, words_per_row: int = 40, k: int = 16, seed: int = 0) -> dict:
    from pipeline.demo.tokenizers import byte_level_bpe, unigram_metaspace
    from stages.align.aligner import Aligner
    from stages.align.spans import align_spans, align_spans_reference
    from stages.align.tokens import TokenTable, encode_texts

    print(f"== alignment: {rows} rows, ByteLevel BPE teacher vs Unigram student", flush=True)
    t0 = time.perf_counter()
    corpus = make_texts(1000, words_per_row, seed=seed + 1)
    teacher = byte_level_bpe(corpus, 1000, model_max_length=1 << 20)
    student = unigram_metaspace(corpus, 1000, model_max_length=1 << 20)
    texts = make_texts(rows, words_per_row, seed=seed)
    t_enc = encode_texts(teacher, TokenTable.from_tokenizer(teacher), texts)
    s_enc = encode_texts(student, TokenTable.from_tokenizer(student), texts)
    ok = t_enc.token_bytes.ok & s_enc.token_bytes.ok
    assert ok.all(), f"{int((~ok).sum())} rows do not round-trip"
    setup_s = time.perf_counter() - t0

    t_len, t_off = t_enc.token_bytes.lengths, t_enc.row_offsets
    s_len, s_off = s_enc.token_bytes.lengths, s_enc.row_offsets
    teacher_tokens, student_tokens = int(t_off[-1]), int(s_off[-1])
    vec_s = _best(lambda: align_spans(t_len, t_off, s_len, s_off), repeats=5)

    t_rows = [t_len[t_off[r] : t_off[r + 1]].tolist() for r in range(rows)]
    s_rows = [s_len[s_off[r] : s_off[r + 1]].tolist() for r in range(rows)]
    ref_s = _best(
        lambda: [align_spans_reference(t, s) for t, s in zip(t_rows, s_rows, strict=True)], 1
    )
    # Same answer, or the comparison means nothing.
    got = align_spans(t_len, t_off, s_len, s_off)
    for r in range(0, rows, max(1, rows // 64)):
        ref_t, ref_st = align_spans_reference(t_rows[r], s_rows[r])
        assert got.teacher_span[t_off[r] : t_off[r + 1]].tolist() == ref_t
        assert got.student_span[s_off[r] : s_off[r + 1]].tolist() == ref_st

    batch = _logit_batch(teacher, texts, k, seed)
    aligner = Aligner(teacher, student)
    aligned, drops = aligner.align(batch)
    aligner_s = _best(lambda: aligner.align(batch), repeats=2)
    return {
        "rows": rows,
        "teacher_tokens": teacher_tokens,
        "student_tokens": student_tokens,
        "bytes": int(t_len.sum()),
        "setup_s": setup_s,
        "vectorised_s": vec_s,
        "reference_s": ref_s,
        "vectorised_tokens_per_s": teacher_tokens / vec_s,
        "reference_tokens_per_s": teacher_tokens / ref_s,
        "speedup_vs_reference": ref_s / vec_s,
        "aligner_rows": batch.num_rows,
        "aligner_tokens": batch.num_tokens,
        "aligner_s": aligner_s,
        "aligner_tokens_per_s": batch.num_tokens / aligner_s,
        "aligner_kept_rows": aligned.num_rows,
        "aligner_dropped": dict(drops),
        "aligner_spans": aligned.span_shapes(),
    }


def render(result: dict) -> str:
    return (
        f"alignment ({result['rows']} rows, {result['teacher_tokens']:,} teacher / "
        f"{result['student_tokens']:,} student tokens): align_spans "
        f"{result['vectorised_tokens_per_s']:,.0f} tokens/s, reference "
        f"{result['reference_tokens_per_s']:,.0f} tokens/s "
        f"({result['speedup_vs_reference']:.0f}x); Aligner.align with student tokenization "
        f"{result['aligner_tokens_per_s']:,.0f} tokens/s "
        f"({result['aligner_kept_rows']}/{result['aligner_rows']} rows kept)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--words-per-row", type=int, default=40)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(render(bench_align(args.rows, args.words_per_row)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
