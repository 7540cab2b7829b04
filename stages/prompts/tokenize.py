"""Batched fast-tokenizer calls and char -> UTF-8 byte offset conversion."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """First 16 hex chars of sha256 over the tokenizer's JSON and its chat template.

    Together these decide every id in a prompt table, so a cache is only reusable by a tokenizer
    with the same fingerprint.
    """
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8"))
    template = getattr(tokenizer, "chat_template", None)
    if template is not None:
        if not isinstance(template, str):  # named templates: {"default": ..., "tool_use": ...}
            template = json.dumps(template, sort_keys=True)
        h.update(b"\0chat_template\0" + template.encode("utf-8"))
    return h.hexdigest()[:16]


def char_to_byte_offsets(text: str, offsets: np.ndarray) -> np.ndarray:
    """Map code-point offsets into ``text`` (any shape) to UTF-8 byte offsets."""
    cp = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    nbytes = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    cum = np.zeros(len(cp) + 1, np.int64)
    np.cumsum(nbytes, out=cum[1:])
    return cum[offsets]


def byte_spans(text: str, char_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(byte_start, byte_end) per token, each [n].

    Tokens without a span (special tokens added by the post-processor report (0, 0)) get an empty
    span where they sit -- a leading BOS at 0, a trailing EOS at the end of the text -- so that
    starts stay non-decreasing and a prompt boundary can be found by binary search. A token that
    covers part of a multi-byte character reports the whole character (spans may then overlap).
    """
    spans = char_to_byte_offsets(text, char_offsets.reshape(-1, 2))
    start, end = spans[:, 0], spans[:, 1]
    empty = start == end
    if empty.any():
        reached = np.concatenate([[0], np.maximum.accumulate(end)[:-1]])
        start = np.where(empty, reached, start)
        end = np.where(empty, reached, end)
    return start, end


def count_prompt_tokens(byte_start: np.ndarray, prompt_bytes: int) -> int:
    """Leading tokens starting before byte ``prompt_bytes`` (a straddling token is prompt)."""
    return int(np.searchsorted(np.maximum.accumulate(byte_start), prompt_bytes, side="left"))


def tokenize_batch(
    tokenizer: Any, texts: Sequence[str], add_special_tokens: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(ids [n], char offsets [n, 2])] for each text, in one fast-tokenizer call."""
    if not texts:
        return []
    enc = tokenizer(
        list(texts),
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
        return_attention_mask=False,
        truncation=False,
        padding=False,
    )
    return [
        (np.asarray(ids, np.int64), np.asarray(offs, np.int64).reshape(-1, 2))
        for ids, offs in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
