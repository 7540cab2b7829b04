"""Input stage: input dataset -> validated, tokenized prompt tables (`PROMPT_SCHEMA`).

Bad input must never cost teacher-engine time and never crash without naming the row and why:
every row is validated and tokenized here, before any engine sees it.
"""

from storage.schema import PROMPT_SCHEMA

from .loading import InputRows, input_fingerprint, load_rows, resolve_format
from .options import InputOptions, PrepareOptions
from .prepare import prepare_prompts
from .records import InputError, PreparedPrompts, SkippedRow
from .tokenize import char_to_byte_offsets, tokenizer_fingerprint

__all__ = [
    "PROMPT_SCHEMA",
    "InputError",
    "InputOptions",
    "InputRows",
    "PrepareOptions",
    "PreparedPrompts",
    "SkippedRow",
    "char_to_byte_offsets",
    "input_fingerprint",
    "load_rows",
    "prepare_prompts",
    "resolve_format",
    "tokenizer_fingerprint",
]
