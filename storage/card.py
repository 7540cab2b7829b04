"""The dataset card (``README.md``) that makes a shard set a Hugging Face dataset repository.

The YAML front matter tells ``datasets`` / the Hub viewer where the data files are
(``configs`` -> ``data_files``) and carries the shard-set metadata under ``logitforge:`` so the
card alone says what produced the data (the same dict as every Parquet footer; ``logitforge
pull`` checks that they agree). The body is for humans: teacher, tokenizer, k, codec, size,
how the set was made, its columns, and how to load it with logitforge or plain ``datasets``.
"""

from __future__ import annotations

from typing import Any

import yaml

from storage.codecs import get_codec
from storage.layout import ShardSetLayout
from storage.schema import ShardSetMetadata
from storage.writer import write_bytes_atomic

_FENCE = "---"


_SIZE_CATEGORIES = (
    (10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
    (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"),
    (10**11, "10B<n<100B"), (10**12, "100B<n<1T"),
)  # fmt: skip


def _size_category(rows: Any) -> str | None:
    """The Hub's ``size_categories`` bucket for ``rows`` (its dataset search filters on it)."""
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        return None
    return next((name for limit, name in _SIZE_CATEGORIES if rows < limit), "n>1T")


def _front_matter(
    layout: ShardSetLayout, metadata: ShardSetMetadata, title: str, summary: dict[str, Any]
) -> dict:
    size = _size_category(summary.get("rows"))
    return {
        "pretty_name": title,
        **({"size_categories": [size]} if size else {}),
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": layout.split, "path": f"data/{layout.split}-*.parquet"}],
            }
        ],
        "tags": ["logitforge", "distillation", "logits"],
        "logitforge": metadata.model_dump(mode="json"),
    }


def _columns_table(metadata: ShardSetMetadata) -> str:
    k = metadata.k
    try:
        value_type = str(get_codec(metadata.codec, **metadata.codec_params).value_type)
    except ValueError:
        value_type = "?"
    rows = [
        ("id", "string", "", "stable row id from the input"),
        ("input_ids", "list<int32>", "[n]", "teacher token ids (after truncation)"),
        ("prompt_len", "int32", "", "leading prompt tokens; losses train on j >= prompt_len-1"),
        ("text", "string", "", "exactly the string that was tokenized"),
        ("byte_start", "list<int32>", "[n]", "UTF-8 byte offset where each token starts"),
        ("byte_end", "list<int32>", "[n]", "UTF-8 byte offset where each token ends"),
        ("truncated", "bool", "", "the text was cut to fit the context"),
    ]  # fmt: skip
    if metadata.kind in ("rollout", "onpolicy"):
        rows += [
            ("policy_logprob", "list<float32>", "[n]",
             "the sampling policy's log p(t_{j+1} | t_<=j) for completion tokens, else NaN"),
            ("policy_version", "string", "", "the checkpoint that sampled the completion"),
        ]  # fmt: skip
    if k > 0:
        rows += [
            ("topk_ids", f"list<fixed_size_list<int32, {k}>>", f"[n, {k}]",
             "top-k token ids after position j, descending logprob"),
            ("topk_logprobs", f"list<fixed_size_list<{value_type}, {k}>>", f"[n, {k}]",
             f"their log-probabilities, encoded with codec `{metadata.codec}`"),
            ("next_logprob", "list<float32>", "[n]",
             "log p(t_{j+1} | t_<=j) of the actual next token; NaN at j = n-1"),
        ]  # fmt: skip
    lines = ["| column | type | shape | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{c}` | `{t}` | {s} | {m} |" for c, t, s, m in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}"
    return str(value)


def _summary_table(summary: dict[str, Any]) -> str:
    if not summary:
        return "_no summary recorded_"
    lines = ["| | |", "| --- | --- |"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in summary.items()]
    return "\n".join(lines)


def _glance_table(metadata: ShardSetMetadata, summary: dict[str, Any], codec: str) -> str:
    """The facts a user checks first, as one table (values the run did not record show "?")."""
    rows, tokens, size = summary.get("rows"), summary.get("tokens"), summary.get("bytes")
    per_token = summary.get("bytes_per_token")
    if per_token is None and isinstance(size, int) and isinstance(tokens, int) and tokens:
        per_token = size / tokens
    model_role = "policy" if metadata.kind == "rollout" else "teacher"
    facts = [
        ("kind", f"`{metadata.kind}`"),
        (model_role, f"`{metadata.teacher_model}`"),
        (f"{model_role} revision", f"`{metadata.teacher_revision or 'unknown'}`"),
        ("tokenizer fingerprint", f"`{metadata.tokenizer_fingerprint}`"),
        ("k (top-k per position)", _fmt(metadata.k)),
        ("codec of `topk_logprobs`", f"`{codec}`"),
        ("rows", "?" if rows is None else _fmt(rows)),
        ("tokens", "?" if tokens is None else _fmt(tokens)),
        ("Parquet bytes", "?" if size is None else _fmt(size)),
        ("bytes / token", "?" if per_token is None else f"{per_token:.2f}"),
    ]
    lines = ["| | |", "| --- | --- |"] + [f"| {key} | {value} |" for key, value in facts]
    return "\n".join(lines)


def render_dataset_card(
    layout: ShardSetLayout,
    metadata: ShardSetMetadata,
    summary: dict[str, Any],
    title: str | None = None,
) -> str:
    """The card's text: YAML front matter (Hub/``datasets`` configs + ``logitforge:``) and body.

    Deterministic for the same inputs, so rewriting the card of a finished set changes nothing.
    """
    rollout = metadata.kind == "rollout"
    title = title or f"{metadata.teacher_model} " + (
        "rollouts" if rollout else f"top-{metadata.k} logits"
    )
    front = yaml.safe_dump(
        _front_matter(layout, metadata, title, summary), sort_keys=False, allow_unicode=True
    )
    codec = metadata.codec + (f" {metadata.codec_params}" if metadata.codec_params else "")
    about = (
        "Student rollouts for on-policy distillation: each row is a prompt and a completion "
        "sampled\nby the policy named below, with the policy's logprob of every sampled token. "
        "Score it with\nthe teacher (`logitforge cache-teacher` with this folder as input) "
        "before training."
        if rollout
        else "Every row is one sequence of n teacher tokens; position j holds the teacher's "
        f"top-{metadata.k}\ndistribution over the token that follows tokens 0..j."
    )
    split = layout.split
    body = f"""# {title}

Sparse teacher log-probabilities for knowledge distillation, written by
logitforge (shard format version {metadata.format_version}).
{about}

{_glance_table(metadata, summary, codec)}

## How it was made

`logitforge {"rollout" if rollout else "cache-teacher"}` ran the model with
`{metadata.engine} {metadata.engine_version}` (logprobs mode `{metadata.logprobs_mode}`) over
the rows of a frozen plan (fingerprint `{metadata.plan_fingerprint}`), one Parquet shard per
planned slice under `data/`. Each shard's sha256, rows and tokens are recorded in
`.logitforge/done/`, the plan (config, input fingerprint, skipped rows) in
`.logitforge/plan.json`, and the prepared prompt rows in `.logitforge/prompts/`: with them a
downloaded copy can be verified, resumed or extended. The `logitforge:` block of the YAML
header repeats the metadata of every Parquet footer (`format_version`, `kind`, model,
tokenizer fingerprint, k, codec, plan fingerprint): it is what logitforge checks before a
trainer uses this cache.

## Columns

{_columns_table(metadata)}

## Summary

{_summary_table(summary)}

## Loading

With Hugging Face `datasets` (raw, encoded values: `topk_logprobs` is stored with codec
`{metadata.codec}`, so decode it with logitforge for float32 logprobs):

```python
from datasets import load_dataset
ds = load_dataset("path/or/hub-id/of/this/folder", split="{split}")
```

With logitforge (verifies sha256 against the completion records, decodes the codec to float32):

```python
from storage.reader import ShardSet
shards = ShardSet.open("path/or/fsspec/url")  # or "hf://datasets/<owner>/<name>"
for batch in shards.iter_batches():  # one LogitBatch per shard
    batch.topk_ids, batch.topk_logprobs  # [T, k] int32 / float32
```

A local verified copy: `logitforge pull <owner>/<name> <folder>`.
"""
    return f"{_FENCE}\n{front}{_FENCE}\n\n{body}"


def write_dataset_card(
    layout: ShardSetLayout,
    metadata: ShardSetMetadata,
    summary: dict[str, Any],
    title: str | None = None,
) -> None:
    text = render_dataset_card(layout, metadata, summary, title)
    write_bytes_atomic(layout.fs, layout.card_path(), text.encode())


def read_card_front_matter(layout: ShardSetLayout) -> dict | None:
    """The card's YAML front matter as a dict; None without a card or front matter.

    Malformed YAML is an error (``ValueError``), not "no card": a card that the Hub and
    ``datasets`` cannot parse must not pass verification silently.
    """
    try:
        with layout.fs.open(layout.card_path(), "rb") as f:
            text = f.read().decode()
    except FileNotFoundError:
        return None
    lines = text.splitlines()
    if not lines or lines[0].strip() != _FENCE:
        return None
    try:
        end = next(i for i, line in enumerate(lines[1:], 1) if line.strip() == _FENCE)
    except StopIteration:
        return None
    try:
        front = yaml.safe_load("\n".join(lines[1:end])) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{layout.fs.unstrip_protocol(layout.card_path())}: bad YAML: {e}") from e
    return front if isinstance(front, dict) else None


def read_card_metadata(layout: ShardSetLayout) -> dict | None:
    """The card's ``logitforge:`` block, or None without a card or block."""
    front = read_card_front_matter(layout)
    block = front.get("logitforge") if front else None
    return block if isinstance(block, dict) else None
