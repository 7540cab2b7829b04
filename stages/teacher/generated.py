"""Teacher-generated rows: prompt rows + sampled completions -> prompt-table rows to score.

The generate-teacher stage samples completions with the teacher, then scores the whole
sequences teacher-forced like any cached row, so a generated shard has exactly the columns of a
cache shard (top-k at every position, the actual next token's logprob) and every reader, loss
and later stage treats it like one. Each prompt is the row's prompt part (the whole row when it
has no completion; a reference completion in the input is ignored). Completion text and byte
spans come from the token byte table, so they are exact for every generated id, including ids
that re-tokenizing the text would not reproduce.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from stages.prompts.token_bytes import (
    byte_spans_of_ids,
    token_byte_lengths,
    token_byte_table,
    widen_to_characters,
)
from stages.teacher.engine import Generated
from storage.reader import ragged_gather
from storage.schema import PROMPT_SCHEMA, ROLLOUT_SCHEMA


class ByteTable:
    """A tokenizer's token bytes as one flat buffer, for vectorised gathers of many tokens."""

    def __init__(self, table: list[bytes]) -> None:
        self.lengths = token_byte_lengths(table)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.data = np.frombuffer(b"".join(table), dtype=np.uint8)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Bytes of the token sequence ``ids`` concatenated, uint8 [sum of lengths]."""
        ids = np.asarray(ids, dtype=np.int64)
        positions, _ = ragged_gather(self.offsets[ids], self.lengths[ids])
        return self.data[positions]


@lru_cache(maxsize=4)
def byte_table_for(tokenizer_path: str, trust_remote_code: bool = False) -> ByteTable:
    """Built once per worker process and tokenizer (one pass over the vocabulary)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
    return ByteTable(token_byte_table(tokenizer))


@dataclass(frozen=True)
class PromptPart:
    """The part of a row that generation continues, with its recorded byte spans."""

    ids: list[int]
    text: bytes  # UTF-8
    byte_start: list[int]
    byte_end: list[int]


def prompt_parts(prompts: pa.Table) -> list[PromptPart]:
    """Each row's prompt part: the whole row without a completion (or for plain text).

    A row the prompt stage truncated keeps its whole text, but its tokens cover only the
    first bytes: the part is those bytes (to the last token's end), so a completion is
    appended to the text the tokens hold, not to text the model never saw.
    """
    parts = []
    for row_ids, text, starts, ends, p, truncated in zip(  # one iteration per row
        prompts.column("input_ids").to_pylist(),
        prompts.column("text").to_pylist(),
        prompts.column("byte_start").to_pylist(),
        prompts.column("byte_end").to_pylist(),
        prompts.column("prompt_len").to_pylist(),
        prompts.column("truncated").to_pylist(),
        strict=True,
    ):
        raw = text.encode("utf-8")
        if 0 < p < len(row_ids):
            parts.append(PromptPart(row_ids[:p], raw[: starts[p]], starts[:p], ends[:p]))
        else:  # a generation prompt (p == n) or plain text (p == 0): continue all of it
            end = max(ends, default=0) if truncated else len(raw)
            parts.append(PromptPart(row_ids, raw[:end], starts, ends))
    return parts


def row_seeds(row_ids: list[str]) -> list[int]:
    """A stable sampling seed per row id, whatever shard or batch the row lands in."""
    return [int(hashlib.sha256(i.encode("utf-8")).hexdigest()[:15], 16) for i in row_ids]


def generated_rows(
    row_ids: list[str],
    parts: list[PromptPart],
    gen: Generated,
    bytes_of: ByteTable,
    max_len: int,
    policy_version: str | None = None,
) -> tuple[pa.Table, dict[str, int]]:
    """Prompt + completion rows (PROMPT_SCHEMA) for every sample, and counts by outcome.

    With ``policy_version`` (a rollout; ``gen`` must hold logprobs) the rows are
    ROLLOUT_SCHEMA: ``policy_logprob`` holds each completion token's logprob at the position
    that predicts it (NaN elsewhere), ``policy_version`` the given version.

    Sample j of row ``id`` gets the id ``id`` when n == 1, else ``id#j``. A completion that
    would make the row longer than ``max_len`` tokens is cut (``truncated``). One whose bytes
    are not valid UTF-8 (a multi-byte character cut by max_tokens, or byte tokens that form
    no character) is counted (``invalid_utf8``) and:

    - dropped from teacher generations: the text column must be exactly the tokens' bytes;
    - kept in rollouts, with U+FFFD replacing the bad bytes in ``text`` and completion byte
      spans of -1 (no text to align): the teacher must score what the policy did. Dropping
      them hides the policy's worst samples from the loss; measured on the demo, a policy
      then drifted into byte sequences that are not text within two rounds.
    """
    counts = {"samples": gen.num_samples, "stop": 0, "length": 0, "truncated": 0}
    counts["invalid_utf8"] = 0
    rollout = policy_version is not None
    if rollout and gen.logprobs is None:
        raise ValueError("a rollout needs the generated tokens' logprobs")
    schema = ROLLOUT_SCHEMA if rollout else PROMPT_SCHEMA
    cols: dict[str, list[Any]] = {name: [] for name in schema.names}
    for s in range(gen.num_samples):  # one iteration per sample, vectorised within
        i, j = divmod(s, gen.n)
        part = parts[i]
        completion = gen.sample(s).astype(np.int64)
        truncated = len(part.ids) + len(completion) > max_len
        if truncated:
            completion = completion[: max(0, max_len - len(part.ids))]
            counts["truncated"] += 1
        counts["stop" if gen.finish_reason[s] == "stop" else "length"] += 1
        raw = part.text + bytes_of.gather(completion).tobytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            counts["invalid_utf8"] += 1
            if not rollout:
                continue
            text = raw.decode("utf-8", "replace")
            start = end = np.full(len(completion), -1, np.int64)
        else:
            # Completion spans are exact token bytes after the prompt's, widened to whole
            # characters like the prompt stage reports byte-level pieces of a character.
            start, end = byte_spans_of_ids(bytes_of.lengths, completion, len(part.text))
            start, end = widen_to_characters(raw, start, end)
        for key, value in (
            ("id", row_ids[i] if gen.n == 1 else f"{row_ids[i]}#{j}"),
            ("input_ids", np.concatenate([np.asarray(part.ids, np.int64), completion])),
            ("prompt_len", len(part.ids)),
            ("text", text),
            ("byte_start", np.concatenate([np.asarray(part.byte_start, np.int64), start])),
            ("byte_end", np.concatenate([np.asarray(part.byte_end, np.int64), end])),
            ("truncated", truncated),
        ):
            cols[key].append(value)
        if rollout:
            # Position j predicts token j + 1: completion token c sits at position p - 1 + c.
            logprobs = gen.logprobs[gen.offsets[s] : gen.offsets[s] + len(completion)]
            nan_prompt = np.full(len(part.ids) - 1, np.nan, np.float32)
            cols["policy_logprob"].append(np.concatenate([nan_prompt, logprobs, [np.nan]]))
            cols["policy_version"].append(policy_version)
    return pa.Table.from_pydict(cols, schema=schema), counts
