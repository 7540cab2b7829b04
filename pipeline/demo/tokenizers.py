"""Student tokenizers of other families, built locally (nothing can be downloaded here).

The cross-tokenizer demo and tests need a student whose tokenizer differs from the teacher's
(ByteLevel BPE with single digits, `pipeline.demo.build`): here a SentencePiece-style Unigram
with a "▁" Metaspace and byte fallback, the Llama-2 / Gemma family, trained on the same task
text so digits merge into multi-digit pieces and spans become n:1 against the teacher's
single digits. A ByteLevel BPE builder without digit splitting covers the GPT-2 / Llama-3 /
Qwen family for the property tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]


def _wrap(tok: Any, model_max_length: int, chat_template: str | None) -> Any:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK if tok.token_to_id(UNK) is not None else None,
        chat_template=chat_template,
        model_max_length=model_max_length,
    )


def unigram_metaspace(
    corpus: Iterable[str],
    vocab_size: int = 0,
    model_max_length: int = 64,
    chat_template: str | None = None,
    pieces: Sequence[str] | None = None,
) -> Any:
    """SentencePiece-style Unigram: "▁" for spaces (prefixed to the first word), byte
    fallback for any character outside the pieces, no normalizer (text round-trips).

    Trained with `tokenizers`' UnigramTrainer to ``vocab_size`` pieces, or, given
    ``pieces``, built from them plus every character of the corpus, each scored by its log
    relative frequency. The trainer is not reproducible from run to run (its EM sums floats
    in an order that changes between processes: the same text gave scores differing by 1e-3
    and other ids), so a demo whose numbers must repeat builds from ``pieces``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")

    if pieces is None:
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=[PAD, BOS, EOS, UNK],
            unk_token=UNK,
            show_progress=False,
        )
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = metaspace
        tok.train_from_iterator(corpus, trainer=trainer)
        vocab = [(p, s) for p, s in _unigram_vocab(tok) if p not in BYTE_PIECES]
    else:
        vocab = _counted_vocab(list(corpus), pieces)
    # Byte fallback: add the 256 byte pieces and rebuild the model with byte_fallback on, so
    # no character is ever unknown (the trainer itself has no such switch).
    floor = min(s for _, s in vocab) - 10.0
    vocab += [(p, floor) for p in BYTE_PIECES]
    names = [p for p, _ in vocab]
    tok = Tokenizer(models.Unigram(vocab, unk_id=names.index(UNK), byte_fallback=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return _wrap(tok, model_max_length, chat_template)


def _counted_vocab(corpus: list[str], pieces: Sequence[str]) -> list[tuple[str, float]]:
    """Specials, then ``pieces`` and every corpus character (spaces as "▁") in sorted order,
    scored by log relative frequency: a deterministic Unigram vocabulary."""
    import math
    from collections import Counter

    counts: Counter[str] = Counter()
    for text in corpus:  # a vocabulary build, once: not a hot path
        text = "▁" + text.replace(" ", "▁")
        counts.update(text)
        for piece in pieces:
            counts[piece] += text.count(piece)
    total = sum(counts.values())
    found = sorted(p for p, c in counts.items() if c > 0)
    return [(p, 0.0) for p in (PAD, BOS, EOS, UNK)] + [
        (p, round(math.log(counts[p] / total), 6)) for p in found
    ]


def _unigram_vocab(tok: Any) -> list[tuple[str, float]]:
    import json

    return [(p, float(s)) for p, s in json.loads(tok.to_str())["model"]["vocab"]]


def byte_level_bpe(
    corpus: Iterable[str],
    vocab_size: int,
    model_max_length: int = 64,
    chat_template: str | None = None,
) -> Any:
    """GPT-2 style ByteLevel BPE (all 256 bytes in the alphabet), digits NOT split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return _wrap(tok, model_max_length, chat_template)
