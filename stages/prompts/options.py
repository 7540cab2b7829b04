"""User-facing options of the input stage (they cross into pipeline configs, hence pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class InputOptions(BaseModel):
    """Where the input rows come from and which fields hold what.

    ``format="auto"`` decides by the path: ``.jsonl``/``.json`` -> JSONL, ``.parquet`` (a file, or
    a directory so named) or a directory holding only ``*.parquet`` files -> Parquet, anything else
    -> Hugging Face ``datasets`` (``load_from_disk`` for a ``save_to_disk`` folder, else
    ``load_dataset(path, split=split)``, which also understands Hub ids and dataset repo folders).
    """

    model_config = ConfigDict(extra="forbid")

    path: str
    format: Literal["auto", "jsonl", "parquet", "datasets"] = "auto"
    split: str = "train"
    id_field: str = "id"
    text_field: str = "text"
    prompt_field: str = "prompt"
    # None ignores completions: every prompt row becomes a generation prompt (generate-teacher).
    completion_field: str | None = "completion"
    messages_field: str = "messages"
    limit: int | None = Field(default=None, ge=0)


class PrepareOptions(BaseModel):
    """How rows are validated and fitted to the teacher's context."""

    model_config = ConfigDict(extra="forbid")

    # Max tokens per row; None means no limit of its own. The pipeline always caps it at the
    # teacher's max_model_len - 1 so that the prediction after the last token still fits.
    max_length: int | None = Field(default=None, gt=0)
    on_too_long: Literal["truncate", "skip", "error"] = "truncate"
    on_invalid: Literal["error", "skip"] = "error"
    # Applies to text and prompt+completion rows only: a rendered chat template carries its own
    # special tokens, so chat rows are always tokenized without adding more.
    add_special_tokens: bool = True
    # Append the tokenizer's EOS to text and prompt + completion rows (chat templates bring their
    # own), so a student trained on the row learns where an answer ends. Generation prompts
    # never get one. The EOS has an empty byte span at the end of the text.
    append_eos: bool = False
