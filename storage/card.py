"""The dataset card (``README.md``) that makes a shard set a Hugging Face dataset repository.

The YAML front matter tells ``datasets`` / the Hub where the data files are (``configs``) and
carries the shard-set metadata under ``logitforge:`` so the card alone says what produced the
data. The body is for humans: columns with shapes, the run summary, how to load it.
"""

from __future__ import annotations

from typing import Any

import yaml

from storage.codecs import get_codec
from storage.layout import ShardSetLayout
from storage.schema import ShardSetMetadata
from storage.writer import write_bytes_atomic

_FENCE = "---"


def _front_matter(layout: ShardSetLayout, metadata: ShardSetMetadata, title: str) -> dict:
    return {
        "pretty_name": title,
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


def render_dataset_card(
    layout: ShardSetLayout,
    metadata: ShardSetMetadata,
    summary: dict[str, Any],
    title: str | None = None,
) -> str:
    rollout = metadata.kind == "rollout"
    title = title or f"{metadata.teacher_model} " + (
        "rollouts" if rollout else f"top-{metadata.k} logits"
    )
    front = yaml.safe_dump(
        _front_matter(layout, metadata, title), sort_keys=False, allow_unicode=True
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
    model_role = "policy" if rollout else "teacher"
    body = f"""# {title}

Sparse teacher log-probabilities for knowledge distillation, written by
logitforge (shard format version {metadata.format_version}).
{about}

- {model_role}: `{metadata.teacher_model}` (revision `{metadata.teacher_revision}`)
- engine: `{metadata.engine} {metadata.engine_version}`, logprobs mode `{metadata.logprobs_mode}`
- tokenizer fingerprint: `{metadata.tokenizer_fingerprint}`
- codec: `{codec}`; plan fingerprint `{metadata.plan_fingerprint}`

## Columns

{_columns_table(metadata)}

## Summary

{_summary_table(summary)}

## Loading

With Hugging Face `datasets` (raw, encoded values):

```python
from datasets import load_dataset
ds = load_dataset("path/or/hub-id/of/this/folder", split="{layout.split}")
```

With logitforge (verifies checksums, decodes the codec to float32 arrays):

```python
from storage.reader import ShardSet
shards = ShardSet.open("path/or/fsspec/url")
for batch in shards.iter_batches():  # one LogitBatch per shard
    batch.topk_ids, batch.topk_logprobs  # [T, k] int32 / float32
```
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


def read_card_metadata(layout: ShardSetLayout) -> dict | None:
    """The card's ``logitforge:`` block, or None without a card or block."""
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
    front = yaml.safe_load("\n".join(lines[1:end])) or {}
    block = front.get("logitforge") if isinstance(front, dict) else None
    return block if isinstance(block, dict) else None
