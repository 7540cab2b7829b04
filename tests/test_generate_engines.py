"""Generation on both teacher engines, and token byte tables for generated ids.

Greedy vLLM generation must equal the transformers reference token for token on the trained
teacher; seeded sampling must not depend on the call or on the other prompts of the batch;
and the byte table must rebuild each row's text and the prompt stage's byte spans.
"""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline.demo.task import is_correct
from stages.prompts import (
    byte_spans_of_ids,
    token_byte_lengths,
    token_byte_table,
    widen_to_characters,
)
from stages.prompts.tokenize import byte_spans, tokenize_batch
from stages.teacher.engine import Generated, GenerationOptions
from tests.conftest import BUNDLED_PROMPTS, read_jsonl

NUM_PROMPTS = 32
GREEDY = GenerationOptions(max_tokens=10)  # 6 answer digits + EOS, with room to spare
SAMPLED = GenerationOptions(n=3, temperature=1.0, max_tokens=12, seed=11)
OFF_TASK = ["hello", "the cat", "x", "1", "héllo wörld", "abc def", "🙂", "12+"]
NON_ASCII = [
    "héllo wörld 🙂 日本",
    "naïve café — déjà vu",
    "🙂🙂 61998+91593=",
    "Ωmega ∑ 12×3 = 36",
    "日本語のテキスト, 12+7=19",
    "tab\tand\nnewline ünïcödé",
]


@pytest.fixture(scope="module")
def tokenizer(teacher_dir):
    return AutoTokenizer.from_pretrained(str(teacher_dir))


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [r["prompt"] for r in read_jsonl(BUNDLED_PROMPTS)[:NUM_PROMPTS]]


@pytest.fixture(scope="module")
def prompt_ids(tokenizer, prompts) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in prompts]


@pytest.fixture(scope="module")
def vllm_greedy(vllm_teacher, prompt_ids) -> Generated:
    return vllm_teacher.generate(prompt_ids, GREEDY)


@pytest.fixture(scope="module")
def table(tokenizer) -> list[bytes]:
    return token_byte_table(tokenizer)


def _samples(gen: Generated) -> list[list[int]]:
    return [gen.sample(s).tolist() for s in range(gen.num_samples)]


def _check_layout(gen: Generated, options: GenerationOptions, num_prompts: int, eos: int):
    assert gen.n == options.n and gen.num_samples == num_prompts * options.n
    assert gen.token_ids.dtype == np.int32 and gen.offsets.dtype == np.int64
    assert gen.offsets[0] == 0 and gen.offsets[-1] == gen.token_ids.size
    lengths = gen.lengths
    assert np.all(lengths >= 1) and np.all(lengths <= options.max_tokens)
    assert set(gen.finish_reason) <= {"stop", "length"}
    for s, reason in enumerate(gen.finish_reason):
        tokens = gen.sample(s)
        ends_in_eos = bool(tokens[-1] == eos)
        if options.stop_at_eos:
            # EOS ends the sample iff it stopped; no EOS anywhere before the end.
            assert ends_in_eos == (reason == "stop"), (s, tokens, reason)
            assert not np.any(tokens[:-1] == eos)
        else:
            assert reason == "length"
        if reason == "length":
            assert lengths[s] == options.max_tokens


def test_vllm_greedy_matches_reference(vllm_greedy, hf_teacher, prompt_ids, tokenizer):
    reference = hf_teacher.generate(prompt_ids, GREEDY)
    assert _samples(vllm_greedy) == _samples(reference)
    assert vllm_greedy.finish_reason == reference.finish_reason
    np.testing.assert_array_equal(vllm_greedy.offsets, reference.offsets)


def test_greedy_answers_are_mostly_correct(vllm_greedy, prompts, tokenizer):
    texts = [tokenizer.decode(s) for s in _samples(vllm_greedy)]
    correct = sum(
        is_correct(p, t, eos=tokenizer.eos_token) for p, t in zip(prompts, texts, strict=True)
    )
    assert correct >= 0.8 * len(prompts), f"{correct}/{len(prompts)} correct: {texts[:4]}"
    assert vllm_greedy.finish_reason.count("stop") >= 0.9 * len(prompts)


def test_generated_layout(vllm_greedy, vllm_teacher, prompt_ids, tokenizer):
    eos = tokenizer.eos_token_id
    _check_layout(vllm_greedy, GREEDY, len(prompt_ids), eos)
    short = GenerationOptions(max_tokens=3)
    _check_layout(vllm_teacher.generate(prompt_ids[:4], short), short, 4, eos)
    no_eos = GenerationOptions(max_tokens=9, stop_at_eos=False)
    _check_layout(vllm_teacher.generate(prompt_ids[:4], no_eos), no_eos, 4, eos)


@pytest.fixture(scope="module")
def sample_ids(tokenizer, prompt_ids) -> list[list[int]]:
    """Two task prompts and off-task ones: on its task the trained teacher is nearly certain
    even at temperature 1, off it its distribution is flat enough for samples to differ."""
    return prompt_ids[:2] + [tokenizer(t)["input_ids"] for t in OFF_TASK]


def test_vllm_sampling_is_seeded_per_prompt(vllm_teacher, sample_ids, tokenizer, table):
    ids = sample_ids
    seeds = [1000 + 17 * i for i in range(len(ids))]
    first = vllm_teacher.generate(ids, SAMPLED, seeds=seeds)
    _check_layout(first, SAMPLED, len(ids), tokenizer.eos_token_id)
    rows = _samples(first)
    assert _samples(vllm_teacher.generate(ids, SAMPLED, seeds=seeds)) == rows
    n = SAMPLED.n
    # The same prompt and seed alone, or at another place in another batch: the same samples.
    alone = vllm_teacher.generate([ids[5]], SAMPLED, seeds=[seeds[5]])
    assert _samples(alone) == rows[5 * n : 6 * n]
    shuffled = vllm_teacher.generate([ids[3], ids[0]], SAMPLED, seeds=[seeds[3], seeds[0]])
    assert _samples(shuffled) == rows[3 * n : 4 * n] + rows[0:n]
    off_task = range(2, len(ids))
    differ = sum(len({tuple(r) for r in rows[i * n : (i + 1) * n]}) > 1 for i in off_task)
    assert differ >= 0.75 * len(off_task), f"only {differ}/{len(off_task)} prompts' samples differ"
    reseeded = vllm_teacher.generate(ids, SAMPLED.model_copy(update={"seed": 12}), seeds=seeds)
    assert _samples(reseeded) != rows
    # Off-task samples hold arbitrary tokens, partial UTF-8 characters included: the byte
    # table still gives what the tokenizer decodes.
    for row in rows:
        data = b"".join(table[t] for t in row)
        assert data.decode("utf-8", "replace") == tokenizer.decode(row, skip_special_tokens=True)


def test_reference_sampling_is_seeded_per_prompt(hf_teacher, sample_ids, tokenizer):
    ids = sample_ids[:4]
    options = SAMPLED.model_copy(update={"top_p": 0.9})
    first = hf_teacher.generate(ids, options)
    _check_layout(first, options, len(ids), tokenizer.eos_token_id)
    assert _samples(hf_teacher.generate(ids, options)) == _samples(first)
    alone = hf_teacher.generate([ids[3]], options, seeds=[options.seed + 3])
    assert _samples(alone) == _samples(first)[3 * options.n :]


def test_generation_options_validate():
    with pytest.raises(ValueError):
        GenerationOptions(n=0)
    with pytest.raises(ValueError):
        GenerationOptions(top_p=0)
    with pytest.raises(ValueError):
        GenerationOptions(temperature=0.5, beam_width=2)
    with pytest.raises(ValueError, match="temperature"):
        GenerationOptions(n=2)  # greedy samples would all be equal; vLLM refuses them


# --------------------------------------------------------------------------- byte tables


def test_byte_table_rebuilds_prompt_and_answer(vllm_greedy, prompts, prompt_ids, tokenizer, table):
    assert len(table) == len(tokenizer)
    assert all(table[i] == b"" for i in tokenizer.all_special_ids)
    lengths = token_byte_lengths(table)
    for i, (prompt, ids) in enumerate(zip(prompts, prompt_ids, strict=True)):
        generated = vllm_greedy.sample(i).tolist()
        row = ids + generated
        text = prompt + tokenizer.decode(generated, skip_special_tokens=True)
        data = text.encode("utf-8")
        assert b"".join(table[t] for t in row) == data
        start, end = byte_spans_of_ids(lengths, row)
        assert end[-1] == len(data)
        assert [data[a:b] for a, b in zip(start, end, strict=True)] == [table[t] for t in row]
        # The generated part alone, placed after the prompt's bytes.
        g_start, g_end = byte_spans_of_ids(lengths, generated, start=len(prompt.encode()))
        np.testing.assert_array_equal(g_start, start[len(ids) :])
        np.testing.assert_array_equal(g_end, end[len(ids) :])


def _span_texts(prompts: list[str]) -> list[str]:
    return [p + "123456" for p in prompts[:12]] + NON_ASCII + ["x", "  two  spaces  "]


def test_byte_spans_match_prompt_stage(tokenizer, table, prompts):
    lengths = token_byte_lengths(table)
    texts = _span_texts(prompts)
    assert len(texts) >= 20
    split_chars = 0
    for text, (ids, offsets) in zip(texts, tokenize_batch(tokenizer, texts, True), strict=True):
        data = text.encode("utf-8")
        expected = byte_spans(text, offsets)
        start, end = byte_spans_of_ids(lengths, ids)
        assert b"".join(table[t] for t in ids) == data
        # Exact bytes per token; the prompt stage widens a token holding part of a character
        # to the whole character, and so does widen_to_characters.
        assert [data[a:b] for a, b in zip(start, end, strict=True)] == [table[t] for t in ids]
        widened = widen_to_characters(data, start, end)
        np.testing.assert_array_equal(widened[0], expected[0], err_msg=text)
        np.testing.assert_array_equal(widened[1], expected[1], err_msg=text)
        whole = (widened[0] == start) & (widened[1] == end)
        split_chars += int((~whole).sum())
        if text.isascii():
            np.testing.assert_array_equal(start, expected[0])
            np.testing.assert_array_equal(end, expected[1])
    assert split_chars > 0  # the non-ASCII texts did exercise partial-character tokens


def test_byte_spans_of_chat_text(tokenizer):
    """Specials rendered into the text by a chat template: count them as their text."""
    messages = [{"role": "user", "content": "héllo 61998+91593="}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ((ids, offsets),) = tokenize_batch(tokenizer, [text], add_special_tokens=False)
    assert tokenizer.bos_token_id in ids.tolist()
    lengths = token_byte_lengths(token_byte_table(tokenizer, special_tokens_as_text=True))
    data = text.encode("utf-8")
    spans = widen_to_characters(data, *byte_spans_of_ids(lengths, ids))
    expected = byte_spans(text, offsets)
    np.testing.assert_array_equal(spans[0], expected[0])
    np.testing.assert_array_equal(spans[1], expected[1])


# ------------------------------------------------------------- SentencePiece-style tables

_BYTES = [f"<0x{b:02X}>" for b in range(256)]
_WORDS = ["▁", "▁hello", "▁world", "▁the", "▁wor", "ld", "he", "llo"]
_PIECES = [*_WORDS, *"abcdefghijklmnopqrstuvwxyz0123456789+=.,"]


def _sentencepiece_like(style: str, prepend_scheme: str = "first") -> PreTrainedTokenizerFast:
    """A Unigram model with byte fallback, as SentencePiece converts (no download needed)."""
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(b, 0.0) for b in _BYTES]
    vocab += [(p, -1.0 - 0.1 * len(p) if len(p) == 1 else -0.5 * len(p)) for p in _PIECES]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    if style.startswith("metaspace"):
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
        tok.decoder = decoders.Metaspace(prepend_scheme=prepend_scheme)
        if style == "metaspace":
            tok.decoder = decoders.Sequence([decoders.ByteFallback(), tok.decoder])
        # "metaspace-bare" decodes "<0xC3>" literally, but the text holds the byte all the same.
    else:  # the Llama (legacy) layout: normalizer does the spaces, decoder strips one
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.mark.parametrize(
    ("style", "prepend_scheme"),
    [
        ("metaspace", "first"),
        ("metaspace", "never"),
        ("metaspace-bare", "first"),
        ("llama", "always"),
    ],
)
def test_sentencepiece_byte_table(style, prepend_scheme):
    tok = _sentencepiece_like(style, prepend_scheme)
    table = token_byte_table(tok)
    assert table[tok.convert_tokens_to_ids("<0xC3>")] == b"\xc3"
    assert table[tok.convert_tokens_to_ids("▁hello")] == b" hello"
    assert table[tok.bos_token_id] == b"" and table[tok.unk_token_id] == b""
    lengths = token_byte_lengths(table)
    for text in ["hello world", "the wörld 🙂 12+3=15", "日本 héllo"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        joined = b"".join(table[t] for t in ids)
        # Documented limitation: a prefix "▁" the tokenizer added is a space the text lacks.
        prefix = b"" if prepend_scheme == "never" else b" "
        assert joined == prefix + text.encode("utf-8"), (ids, joined)
        if style != "metaspace-bare":
            assert joined[len(prefix) :].decode("utf-8") == tok.decode(ids)
        _, end = byte_spans_of_ids(lengths, ids, start=-len(prefix))
        assert end[-1] == len(text.encode("utf-8"))


def test_plain_and_unsupported_decoders():
    plain = Tokenizer(models.WordLevel({"[UNK]": 0, "ab": 1, "ü": 2}, unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    wrapped = PreTrainedTokenizerFast(tokenizer_object=plain, unk_token="[UNK]")
    assert token_byte_table(wrapped) == [b"", b"ab", "ü".encode()]

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match="WordPiece"):
        token_byte_table(PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]"))


def test_truncated_generation_prompt_continues_the_text_its_tokens_hold(tokenizer, table):
    """A prompt longer than max_length keeps its whole text in the prompt shard; the part a
    completion is appended to is only what its tokens cover (else the generated row's text
    would hold text the model never saw)."""
    from stages.prompts import InputOptions, PrepareOptions, prepare_prompts
    from stages.teacher.generated import prompt_parts

    rows = [{"id": "long", "prompt": "12345+67890=80235 " * 6}, {"id": "short", "prompt": "1+1="}]
    opts = PrepareOptions(max_length=12, on_too_long="truncate")
    shard = prepare_prompts(rows, tokenizer, opts, InputOptions(path="p.jsonl")).table
    assert shard.column("truncated").to_pylist() == [True, False]
    for part, row in zip(prompt_parts(shard), shard.to_pylist(), strict=True):
        assert part.ids == row["input_ids"]
        assert part.text == b"".join(table[t] for t in row["input_ids"])
    assert prompt_parts(shard)[1].text == b"1+1="
