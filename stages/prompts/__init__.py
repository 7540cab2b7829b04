"""Input stage: input dataset -> validated, tokenized prompt tables (`PROMPT_SCHEMA`).

Bad input must never cost teacher-engine time and never crash without naming the row and why:
every row is validated and tokenized here, before any engine sees it.
"""

from storage.schema import PROMPT_SCHEMA

from .loading import InputRows, input_fingerprint, load_rows, resolve_format
from .options import InputOptions, PrepareOptions
from .prepare import prepare_prompts
from .records import InputError, PreparedPrompts, SkippedRow
from .token_bytes import (
    byte_spans_of_ids,
    token_byte_lengths,
    token_byte_table,
    widen_to_characters,
)
from .tokenize import char_to_byte_offsets, tokenizer_fingerprint

__all__ = [
    "PROMPT_SCHEMA",
    "InputError",
    "InputOptions",
    "InputRows",
    "PrepareOptions",
    "PreparedPrompts",
    "SkippedRow",
    "byte_spans_of_ids",
    "char_to_byte_offsets",
    "input_fingerprint",
    "load_rows",
    "prepare_prompts",
    "resolve_format",
    "token_byte_lengths",
    "token_byte_table",
    "tokenizer_fingerprint",
    "widen_to_characters",
]
