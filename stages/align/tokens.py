"""Exact UTF-8 bytes of every token of a row, checked against the row's text.

Fast tokenizers report offsets in characters, so a token holding part of a multi-byte
character (byte-level BPE, SentencePiece byte fallback) reports the whole character and the
prompt stage stores such widened spans. Alignment needs exact bytes, so lengths here come
from a per-tokenizer table of the bytes each id contributes (`stages.prompts.token_bytes`,
which undoes the "Ġ" and "▁" conventions and byte-fallback tokens), with two corrections
taken from the offsets:

- a special token counts its literal text where the text contains it (a chat template
  writes "<|user|>" into the string) and nothing where a post-processor added it;
- a leading space the tokenizer itself added (SentencePiece's prefix "▁", byte-level
  `add_prefix_space`) is no byte of the text: a token whose bytes start with a space where
  the text at its start has none loses that byte.

Then the concatenated token bytes must equal the text's bytes, compared for all rows at once;
a row the caller flags as a prefix (a truncated row, whose tokens were cut to fit the
context) passes when they equal the text's first bytes, as many as the tokens hold. A row
that fails (a normalizer that rewrites text, an unknown token, a decoder this cannot invert)
is reported by index and never aligned: a silent misalignment would train on the wrong
targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.align.spans import rows_of
from stages.prompts.token_bytes import token_byte_table
from stages.prompts.tokenize import byte_spans, tokenize_batch
from storage.reader import ragged_gather

_SPACE = 0x20


@dataclass(frozen=True)
class TokenTable:
    """The bytes each id of one tokenizer writes into a text, as flat numpy arrays."""

    data: np.ndarray  # uint8: every id's bytes, concatenated in id order
    offsets: np.ndarray  # int64 [V + 1]: id i's bytes are data[offsets[i]:offsets[i + 1]]
    special: np.ndarray  # bool [V]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenTable:
        table = token_byte_table(tokenizer, special_tokens_as_text=True)  # one pass over V
        offsets = np.zeros(len(table) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, table), np.int64, len(table)), out=offsets[1:])
        special = np.zeros(len(table), dtype=bool)
        special[[i for i in tokenizer.all_special_ids if i < len(table)]] = True
        return cls(np.frombuffer(b"".join(table), dtype=np.uint8), offsets, special)

    @property
    def vocab_size(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass(frozen=True)
class TokenBytes:
    """Exact byte length of each token of R rows, and which rows reproduce their text."""

    lengths: np.ndarray  # int64 [T]
    ok: np.ndarray  # bool [R]: the row's token bytes equal its text's bytes (or first bytes)
    covered: np.ndarray  # int64 [R]: bytes the row's tokens hold (the sum of its lengths)


def exact_token_bytes(
    table: TokenTable,
    ids: np.ndarray,
    row_offsets: np.ndarray,
    byte_start: np.ndarray,
    byte_end: np.ndarray,
    texts: list[bytes],
    prefix: np.ndarray | None = None,
) -> TokenBytes:
    """Exact lengths of the tokens ``ids`` (flat, rows delimited by ``row_offsets``).

    ``byte_start`` / ``byte_end`` [T] are the offset-derived (character-widened) spans: they
    decide only whether a special token is written in the text and whether a token's leading
    space is the tokenizer's own. ``texts`` are the rows' UTF-8 bytes. A row where ``prefix``
    (bool [R]) is set is ok when its tokens' bytes are the first ``covered`` bytes of its text,
    compared byte for byte like a whole text (``covered`` may then end inside a character);
    every other row must reproduce its whole text.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= table.vocab_size):
        raise ValueError(f"token ids outside the tokenizer's {table.vocab_size} ids")
    row_offsets = np.asarray(row_offsets, dtype=np.int64)
    counts = np.diff(row_offsets)
    rows = rows_of(row_offsets)
    text_len = np.fromiter(map(len, texts), np.int64, len(texts))
    text_start = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(text_len, out=text_start[1:])
    flat_text = np.frombuffer(b"".join(texts), dtype=np.uint8)

    src = table.offsets[ids]
    length = table.offsets[ids + 1] - src
    width = np.asarray(byte_end, np.int64) - np.asarray(byte_start, np.int64)
    length = np.where(table.special[ids] & (width == 0), 0, length)
    # The text byte where each token starts (one past the end of the row: no byte there).
    start = np.minimum(np.asarray(byte_start, np.int64), text_len[rows])
    at = text_start[rows] + start
    # One spare byte at the end of each buffer keeps the gathers in range for empty texts and
    # empty tokens; np.where then discards what they read there.
    padded_text = np.append(flat_text, np.uint8(0))
    padded_data = np.append(table.data, np.uint8(0))
    text_byte = np.where(start < text_len[rows], padded_text[at], -1)
    first_byte = np.where(length > 0, padded_data[src], -1)
    added_space = (first_byte == _SPACE) & (text_byte != _SPACE) & ~table.special[ids]
    src, length = src + added_space, length - added_space

    # Round trip: the gathered token bytes of each row must be the row's text, byte for byte.
    totals = np.zeros(len(counts), dtype=np.int64)
    np.add.at(totals, rows, length)
    ok = totals == text_len
    if prefix is not None:
        ok |= np.asarray(prefix, dtype=bool) & (totals < text_len)
    token_data = table.data[ragged_gather(src, length)[0]]
    # Compare the rows whose totals fit, each against its own text's first ``totals`` bytes
    # (one gather per side).
    cum = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(totals, out=cum[1:])
    same = np.flatnonzero(ok)
    token_pos, _ = ragged_gather(cum[same], totals[same])
    text_pos, _ = ragged_gather(text_start[same], totals[same])
    differs = token_data[token_pos] != flat_text[text_pos]
    ok[np.repeat(same, totals[same])[differs]] = False
    return TokenBytes(lengths=length, ok=ok, covered=totals)


@dataclass(frozen=True)
class Encoded:
    """Rows tokenized by the student: ids, row offsets and exact token bytes."""

    ids: np.ndarray  # int64 [S]
    row_offsets: np.ndarray  # int64 [R + 1]
    token_bytes: TokenBytes


def encode_texts(tokenizer: Any, table: TokenTable, texts: list[str]) -> Encoded:
    """Tokenize ``texts`` as they are (no special tokens added) with exact token bytes."""
    encoded = tokenize_batch(tokenizer, texts, add_special_tokens=False)
    if any(offs.size == 0 and ids.size for ids, offs in encoded):
        raise ValueError("the student tokenizer returns no offsets: it cannot be aligned")
    counts = np.fromiter((len(ids) for ids, _ in encoded), np.int64, len(encoded))
    row_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(counts, out=row_offsets[1:])
    spans = [byte_spans(text, offs) for text, (_, offs) in zip(texts, encoded, strict=True)]
    ids = np.concatenate([ids for ids, _ in encoded]) if encoded else np.zeros(0, np.int64)

    def flat(i: int) -> np.ndarray:
        return np.concatenate([s[i] for s in spans]) if spans else np.zeros(0, np.int64)

    token_bytes = exact_token_bytes(
        table, ids, row_offsets, flat(0), flat(1), [t.encode("utf-8") for t in texts]
    )
    return Encoded(ids=ids, row_offsets=row_offsets, token_bytes=token_bytes)
