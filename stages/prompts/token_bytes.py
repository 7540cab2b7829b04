"""Token id -> the UTF-8 bytes it contributes to the text, and byte spans from ids alone.

Generated tokens have no text offsets (the engine never detokenizes), so their byte spans come
from a per-tokenizer table instead: span s of a row is where token s's bytes sit in the
concatenation of all tokens' bytes. The table follows the tokenizer's decoder, read from
`tokenizer.backend_tokenizer`:

- ByteLevel (GPT-2 style): each character of a token stands for one byte through GPT-2's
  `bytes_to_unicode` table ("Ġ" is the space). Exact, including tokens that hold part of a
  multi-byte character. This is what the embedded teacher uses.
- SentencePiece style (Metaspace decoder, or Replace("▁", " ") + ByteFallback + Fuse + Strip):
  "▁" is a space and byte-fallback tokens "<0xNN>" are the byte NN. Limitation: with a prefix
  space (`prepend_scheme` "always"/"first", or a Strip decoder) the first word's leading "▁"
  was added by the tokenizer and is no byte of the text; its table entry still says b" ", so a
  row that starts with such a token has one byte more than the text. Shift or drop that byte
  at the row start if it matters.
- Plain vocabularies (no decoder, or Fuse only): a token's bytes are its string's UTF-8.
  Whitespace a pre-tokenizer drops belongs to no token (decode would join with spaces).

Special tokens (the wrapper's special ids and added tokens marked special) contribute b"",
as the prompt stage gives them empty spans. Other added tokens are matched in the raw text, so
they contribute their content's UTF-8. ByteLevel's `add_prefix_space=True` has the same
first-token limitation as SentencePiece's prefix space.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

import numpy as np

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# Decoders that only join, strip or fuse the decoded string: nothing per token to undo.
_JOINING = {"Fuse", "Strip"}


@lru_cache(maxsize=1)
def _byte_level_decoding() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the character standing for each byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _flatten(component: dict | None) -> list[dict]:
    if component is None:
        return []
    if component.get("type") == "Sequence":
        key = "decoders" if "decoders" in component else "pretokenizers"
        return [step for child in component.get(key, []) for step in _flatten(child)]
    return [component]


def _byte_level(token: str) -> bytes:
    # Mirrors tokenizers' ByteLevel decoder: a token with a character outside the table (an
    # added token with a space, say) passes through as its own UTF-8.
    table = _byte_level_decoding()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _decoder_steps(spec: dict) -> list[tuple[str, Any]]:
    """The per-token transforms of the tokenizer's decoder, in order.

    Each step is (kind, argument): ("bytelevel", None), ("replace", (old, new)),
    ("bytefallback", None). Raises ValueError for a decoder that does not map tokens to bytes
    one by one.
    """
    decoders = _flatten(spec.get("decoder"))
    model = spec.get("model") or {}
    pre = [p.get("type") for p in _flatten(spec.get("pre_tokenizer"))]
    steps: list[tuple[str, Any]] = []
    if model.get("byte_fallback") and not any(d["type"] == "ByteFallback" for d in decoders):
        steps.append(("bytefallback", None))  # "<0x0A>" is a byte in the text, whatever decode says
    for d in decoders:
        kind = d["type"]
        if kind == "ByteLevel":
            steps.append(("bytelevel", None))
        elif kind == "Metaspace":
            steps.append(("replace", (d.get("replacement", "▁"), " ")))
        elif kind == "Replace":
            pattern = d.get("pattern", {})
            if "String" not in pattern:
                raise ValueError(f"cannot build a token byte table for a Replace decoder {d}")
            steps.append(("replace", (pattern["String"], d.get("content", ""))))
        elif kind == "ByteFallback":
            steps.append(("bytefallback", None))
        elif kind not in _JOINING:
            raise ValueError(
                f"cannot build a token byte table for the {kind!r} decoder (supported: "
                "ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, or none)"
            )
    if not decoders and "ByteLevel" in pre:
        steps.append(("bytelevel", None))  # byte-level symbols even without a decoder
    return steps


def _token_bytes(token: str, steps: list[tuple[str, Any]]) -> bytes:
    value: str | bytes = token
    for kind, arg in steps:
        if isinstance(value, bytes):
            break
        if kind == "bytelevel":
            value = _byte_level(value)
        elif kind == "replace":
            value = value.replace(*arg)
        elif kind == "bytefallback":
            m = _BYTE_FALLBACK.match(value)
            if m is not None:
                value = bytes([int(m.group(1), 16)])
    return value if isinstance(value, bytes) else value.encode("utf-8")


def token_byte_table(tokenizer: Any, special_tokens_as_text: bool = False) -> list[bytes]:
    """Bytes each id in range(len(tokenizer)) contributes to the text; b"" for special tokens.

    Special tokens are empty by default: a post-processor's BOS/EOS or a generated EOS is no
    part of the text (decoding skips it). A chat template, though, writes its specials into the
    text, and the prompt stage then gives them the span of their literal text; pass
    `special_tokens_as_text=True` for such text to count a special token as its content's UTF-8.
    One pass over the vocabulary: build it once per tokenizer, not per row.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    steps = _decoder_steps(spec)
    special = set(tokenizer.all_special_ids)
    added: dict[int, str] = {}
    for entry in spec.get("added_tokens", []):
        added[entry["id"]] = entry["content"]
        if entry.get("special"):
            special.add(entry["id"])
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    table = []
    for i, token in enumerate(tokens):  # once per vocabulary entry
        if token is None:
            table.append(b"")
        elif i in special:
            table.append(token.encode("utf-8") if special_tokens_as_text else b"")
        elif i in added:
            table.append(added[i].encode("utf-8"))
        else:
            table.append(_token_bytes(token, steps))
    return table


def token_byte_lengths(table: list[bytes]) -> np.ndarray:
    """Bytes per token id [V] int64."""
    return np.fromiter(map(len, table), dtype=np.int64, count=len(table))


def byte_spans_of_ids(
    table_lengths: np.ndarray, ids: np.ndarray | list[int], start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(byte_start, byte_end) per token, each [n] int64, for ids whose bytes begin at `start`.

    Token s spans start + sum(lengths of tokens before s) onward. A special token's span is
    empty and sits where it is (after the bytes of the tokens before it), as in the prompt
    stage. Spans here are exact bytes: a token holding part of a multi-byte character gets
    only its bytes, where the prompt stage reports the whole character; see
    `widen_to_characters` for the prompt stage's convention.
    """
    lengths = np.asarray(table_lengths)[np.asarray(ids, dtype=np.int64)]
    end = np.cumsum(lengths, dtype=np.int64) + start
    return end - lengths, end


def widen_to_characters(
    data: bytes, byte_start: np.ndarray, byte_end: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Widen byte spans within `data` (UTF-8) to whole characters, as the prompt stage reports.

    A start inside a character moves back to its first byte, an end inside one moves on past
    its last byte; spans on character boundaries are unchanged.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    boundaries = np.append(np.flatnonzero((raw & 0xC0) != 0x80), raw.size)  # char starts + end
    starts = boundaries[np.searchsorted(boundaries, byte_start, side="right") - 1]
    ends = boundaries[np.searchsorted(boundaries, byte_end, side="left")]
    return starts.astype(np.int64), ends.astype(np.int64)
