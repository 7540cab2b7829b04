"""Which teacher token is which student token: a map by the bytes each writes.

Two vocabularies spell the same piece of text differently: byte-level BPE writes a leading
space as "Ġ", SentencePiece as "▁", and byte-fallback pieces as "<0x41>". Comparing the bytes
each token writes into the text (`stages.prompts.token_bytes`) removes all three conventions
at once, so "Ġthe", "▁the" and " the" are one entry. Special tokens match by role (BOS to
BOS, EOS to EOS, ...) and otherwise by their literal text.

The map is injective, as the hybrid loss compares probabilities entry by entry: where one
side has several ids for the same bytes (a piece and its byte-fallback spelling, say), the one
the tokenizer would produce is kept (not a "<0xNN>" piece; then the lowest id) and the others
stay unmapped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.align.tokens import TokenTable

_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# In priority order: a tokenizer whose pad token is its EOS (GPT-2, Llama-3 style) keeps the
# EOS role for that id, so "end of text" maps to the other side's EOS, never to its padding.
_ROLES = ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id")


def _keys(tokenizer: Any, table: TokenTable) -> dict[Any, int]:
    """Match key -> preferred id, built in one pass over the vocabulary (setup, not hot path)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(table.vocab_size)))
    roles: dict[int, str] = {}
    for role in _ROLES:
        roles.setdefault(getattr(tokenizer, role, None), role)  # type: ignore[arg-type]
    keys: dict[Any, int] = {}
    rank: dict[Any, tuple[bool, int]] = {}
    for i, token in enumerate(tokens):  # once per vocabulary entry
        if table.special[i]:
            key: Any = ("role", roles[i]) if i in roles else ("special", token)
        else:
            raw = table.data[table.offsets[i] : table.offsets[i + 1]].tobytes()
            if not raw:
                continue
            key = raw
        pref = (bool(token and _BYTE_FALLBACK.match(token)), i)
        if key not in keys or pref < rank[key]:
            keys[key], rank[key] = i, pref
    return keys


@dataclass(frozen=True)
class VocabMap:
    """teacher id -> student id (-1: no student token writes the same bytes)."""

    teacher_to_student: np.ndarray  # int64 [V_teacher]
    student_mapped: np.ndarray  # bool [V_student]: the image of the map

    @classmethod
    def build(
        cls,
        teacher_tokenizer: Any,
        student_tokenizer: Any,
        teacher_table: TokenTable,
        student_table: TokenTable,
    ) -> VocabMap:
        t_keys = _keys(teacher_tokenizer, teacher_table)
        s_keys = _keys(student_tokenizer, student_table)
        forward = np.full(teacher_table.vocab_size, -1, dtype=np.int64)
        pairs = np.array(
            [(t, s_keys[key]) for key, t in t_keys.items() if key in s_keys], dtype=np.int64
        ).reshape(-1, 2)
        forward[pairs[:, 0]] = pairs[:, 1]
        image = np.zeros(student_table.vocab_size, dtype=bool)
        image[pairs[:, 1]] = True
        return cls(forward, image)

    def coverage(self) -> dict[str, float | int]:
        """How much of each vocabulary the map reaches (printed and kept in the run summary)."""
        mapped = int((self.teacher_to_student >= 0).sum())
        return {
            "teacher_vocab": len(self.teacher_to_student),
            "student_vocab": len(self.student_mapped),
            "mapped": mapped,
            "teacher_coverage": round(mapped / max(len(self.teacher_to_student), 1), 4),
            "student_coverage": round(mapped / max(len(self.student_mapped), 1), 4),
        }
