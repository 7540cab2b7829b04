"""Typed records that leave the input stage: errors, skipped rows, the prepared table."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

# Stable keys for why a row was not kept; reports and dashboards group by them.
EMPTY_TEXT = "empty_text"
INVALID_UTF8 = "invalid_utf8"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
DUPLICATE_ID = "duplicate_id"
TOO_LONG = "too_long"
TEMPLATE_ERROR = "template_error"  # the chat template raised on this row (e.g. roles order)
INVALID_JSON = "invalid_json"  # JSONL line that is not a JSON object


def describe_row(
    row: int, *, row_id: str | None = None, line: int | None = None, source: str | None = None
) -> str:
    """'input row 17 (line 18 of data.jsonl, id 'abc')' -- the way every message names a row."""
    parts = []
    if line is not None:
        parts.append(f"line {line} of {source}" if source else f"line {line}")
    elif source:
        parts.append(source)
    if row_id is not None:
        parts.append(f"id {row_id!r}")
    return f"input row {row}" + (f" ({', '.join(parts)})" if parts else "")


class InputError(ValueError):
    """An input row that cannot be used, named by row (and JSONL line) and reason.

    ``reason`` is the stable key (``"wrong_type"``, ...); ``detail`` is the human explanation.
    """

    def __init__(
        self,
        row: int,
        row_id: str | None,
        reason: str,
        detail: str,
        *,
        line: int | None = None,
        source: str | None = None,
    ) -> None:
        self.row = row
        self.row_id = row_id
        self.reason = reason
        self.detail = detail
        self.line = line
        self.source = source
        where = describe_row(row, row_id=row_id, line=line, source=source)
        super().__init__(f"{where}: {detail}")


@dataclass(frozen=True)
class SkippedRow:
    row: int  # 0-based input row
    row_id: str | None
    reason: str  # one of the stable keys above


@dataclass
class PreparedPrompts:
    table: pa.Table  # PROMPT_SCHEMA, kept rows in input order
    skipped: list[SkippedRow] = field(default_factory=list)
    num_input_rows: int = 0
    num_truncated: int = 0

    def skip_counts(self) -> dict[str, int]:
        """Rows skipped per reason, e.g. ``{"empty_text": 3, "too_long": 1}``."""
        return dict(sorted(Counter(s.reason for s in self.skipped).items()))
