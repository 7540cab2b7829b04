"""Per-row validation: decide the row kind, check types and UTF-8, derive the id, render chats.

Row kinds, decided per row in this order (a field holding ``None`` counts as absent):

- ``messages``: a list of ``{"role", "content"}`` dicts. If the last message is the assistant's,
  it is the completion: the prompt is the render of the earlier messages with
  ``add_generation_prompt=True`` and the text is the render of the whole conversation, so losses
  train on the final assistant turn only (its header belongs to the prompt). Otherwise the row is
  a generation prompt: text = render with ``add_generation_prompt=True``, all tokens are prompt.
- ``prompt`` (+ ``completion``): text = prompt + completion. Without a completion the row is a
  generation prompt. TRL's conversational form (prompt and completion as message lists) is
  rendered like ``messages`` with the completion messages as the trained part.
- ``text``: plain text, no prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np

from .options import InputOptions
from .records import (
    EMPTY_TEXT,
    INVALID_UTF8,
    MISSING_FIELD,
    TEMPLATE_ERROR,
    WRONG_TYPE,
)

log = logging.getLogger(__name__)

Message = dict[str, Any]


class RowProblem(Exception):
    """Why one row cannot be used; the caller turns it into an InputError or a SkippedRow."""

    def __init__(self, reason: str, detail: str, row_id: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.row_id = row_id


@dataclass
class Content:
    """The validated content of one row, before rendering."""

    canonical: dict[str, Any]  # what the derived id hashes
    text: str | None = None  # text and prompt+completion rows
    prompt_bytes: int | None = None  # None: the whole text is prompt
    prompt_msgs: list[Message] | None = None  # chat rows
    completion_msgs: list[Message] | None = None


@dataclass
class PendingRow:
    """A valid row waiting for batched tokenization."""

    row: int
    row_id: str
    text: str
    prompt_bytes: int | None  # UTF-8 bytes of `text` that are prompt; None: all of it
    chat: bool  # rendered by the chat template: tokenize without adding special tokens


def _check_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RowProblem(WRONG_TYPE, f"field {name!r} is {type(value).__name__}, not str")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowProblem(
            INVALID_UTF8, f"field {name!r} is not valid UTF-8 (lone surrogate at char {e.start})"
        ) from None
    return value


def _check_messages(value: Any, name: str) -> list[Message]:
    if not isinstance(value, list | tuple):
        raise RowProblem(WRONG_TYPE, f"field {name!r} is {type(value).__name__}, not a list")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise RowProblem(WRONG_TYPE, f"{name}[{i}] is not a {{'role', 'content'}} dict")
        _check_str(msg["role"], f"{name}[{i}].role")
        _check_str(msg["content"], f"{name}[{i}].content")
        # Parquet/Arrow structs fill absent keys with None; drop them so the same conversation
        # gives the same id and render whatever format it came from.
        out.append({k: v for k, v in msg.items() if v is not None})
    return out


def _blank(msgs: list[Message]) -> bool:
    return all(not m["content"].strip() for m in msgs)


def row_id_of(row: Mapping[str, Any], id_field: str) -> str | None:
    """The given id as str (str or int ids), None when the row has none."""
    value = row.get(id_field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | Integral):
        raise RowProblem(WRONG_TYPE, f"field {id_field!r} is {type(value).__name__}, not str/int")
    if isinstance(value, str):
        _check_str(value, id_field)
        if not value:
            raise RowProblem(WRONG_TYPE, f"field {id_field!r} is an empty string")
        return value
    return str(int(value))


def derive_id(canonical: Mapping[str, Any]) -> str:
    """First 16 hex chars of sha256 over canonical JSON: identical content -> identical id."""
    blob = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def read_content(row: Mapping[str, Any], opts: InputOptions) -> Content:
    """Validate the content fields of one row; raises RowProblem."""
    mf, pf, cf, tf = opts.messages_field, opts.prompt_field, opts.completion_field, opts.text_field
    if row.get(mf) is not None:
        msgs = _check_messages(row[mf], mf)
        if msgs and msgs[-1]["role"] == "assistant":
            prompt_msgs, completion = msgs[:-1], msgs[-1:]
        else:
            prompt_msgs, completion = msgs, None
        if _blank(completion if completion is not None else msgs):
            raise RowProblem(EMPTY_TEXT, f"field {mf!r} has no non-blank content to train on")
        return Content({"messages": msgs}, prompt_msgs=prompt_msgs, completion_msgs=completion)

    if row.get(pf) is not None:
        prompt, completion = row[pf], (row.get(cf) if cf is not None else None)
        if isinstance(prompt, list | tuple):
            prompt_msgs = _check_messages(prompt, pf)
            completion_msgs = None if completion is None else _check_messages(completion, cf)
            if _blank(completion_msgs if completion_msgs is not None else prompt_msgs):
                raise RowProblem(EMPTY_TEXT, f"field {cf!r} is empty or blank")
            return Content(
                {"prompt": prompt_msgs, "completion": completion_msgs},
                prompt_msgs=prompt_msgs,
                completion_msgs=completion_msgs,
            )
        _check_str(prompt, pf)
        if completion is None:
            if not prompt.strip():
                raise RowProblem(EMPTY_TEXT, f"field {pf!r} is empty or blank")
            return Content({"prompt": prompt}, text=prompt, prompt_bytes=None)
        _check_str(completion, cf)
        if not completion.strip():
            raise RowProblem(EMPTY_TEXT, f"field {cf!r} is empty or blank")
        return Content(
            {"prompt": prompt, "completion": completion},
            text=prompt + completion,
            prompt_bytes=len(prompt.encode("utf-8")),
        )

    if row.get(tf) is not None:
        text = _check_str(row[tf], tf)
        if not text.strip():
            raise RowProblem(EMPTY_TEXT, f"field {tf!r} is empty or blank")
        return Content({"text": text}, text=text, prompt_bytes=0)

    raise RowProblem(
        MISSING_FIELD,
        f"row has none of the fields {mf!r}, {pf!r} (+ {cf!r}) or {tf!r}"
        f" (it has {sorted(map(str, row))})",
    )


def _common_prefix_bytes(a: str, b: str) -> int:
    x = np.frombuffer(a.encode("utf-8"), np.uint8)
    y = np.frombuffer(b.encode("utf-8"), np.uint8)
    n = min(len(x), len(y))
    diff = np.flatnonzero(x[:n] != y[:n])
    return int(diff[0]) if diff.size else n


_warned_prefix = False


def render_chat(
    tokenizer: Any, prompt_msgs: list[Message], completion_msgs: list[Message] | None
) -> tuple[str, int | None]:
    """(text, prompt bytes) of a chat row; prompt bytes None means all of it is prompt."""
    global _warned_prefix

    def render(msgs: list[Message], gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # the template is user code: any error is this row's problem
            raise RowProblem(TEMPLATE_ERROR, f"chat template failed: {e}") from None

    if completion_msgs is None:
        return render(prompt_msgs, True), None
    full = render(prompt_msgs + completion_msgs, False)
    if not prompt_msgs:  # a lone assistant turn: nothing to condition on, train on all of it
        return full, 0
    head = render(prompt_msgs, True)
    cut = _common_prefix_bytes(head, full)
    if cut < len(head.encode("utf-8")) and not _warned_prefix:
        # Some templates render history differently once an answer follows (e.g. they drop
        # reasoning); the shared prefix is then the safe prompt boundary.
        log.warning(
            "chat template: prompt render is not a prefix of the full render; "
            "using the common prefix (%d bytes) as the prompt",
            cut,
        )
        _warned_prefix = True
    return full, cut
