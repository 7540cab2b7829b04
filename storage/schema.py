"""Arrow schemas of prompt and logit shards, shard-set metadata, and the logit table builder.

Position convention (shared with every stage): a row has n teacher tokens t_0..t_{n-1};
position j holds the teacher distribution over the token that follows t_0..t_j, so every
per-position column has length n and ``next_logprob[n-1]`` is NaN.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, field_validator

from storage.codecs import Codec, get_codec
from storage.sparse_codecs import SparseCodec, SparseEntries

FORMAT_VERSION = 1
METADATA_KEY = b"logitforge"

PROMPT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # stable row id
        ("input_ids", pa.list_(pa.int32())),  # [n] teacher token ids after truncation
        ("prompt_len", pa.int32()),  # leading prompt tokens (0 for plain text rows)
        ("text", pa.string()),  # exactly the string that was tokenized
        ("byte_start", pa.list_(pa.int32())),  # [n] UTF-8 byte offset where each token starts
        ("byte_end", pa.list_(pa.int32())),  # [n] UTF-8 byte offset where each token ends
        ("truncated", pa.bool_()),
    ]
)

# What a rollout adds to a row: who sampled the completion and how likely it found each token.
ROLLOUT_FIELDS = [
    # [n] the sampling policy's raw (T = 1) logprob of token j+1 at position j for completion
    # tokens; NaN at prompt positions and at the last position (same convention as next_logprob).
    ("policy_logprob", pa.list_(pa.float32())),
    ("policy_version", pa.string()),  # the checkpoint that sampled the completion
]
ROLLOUT_SCHEMA = pa.schema([*PROMPT_SCHEMA, *ROLLOUT_FIELDS])
ROLLOUT_COLUMNS = tuple(name for name, _ in ROLLOUT_FIELDS)

LOGIT_COLUMNS = ("topk_ids", "topk_logprobs", "next_logprob")


def logit_schema(codec: Codec, k: int, rollout: bool = False) -> pa.Schema:
    """Prompt columns, the rollout columns of scored rollouts, the teacher's outputs."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if isinstance(codec, SparseCodec):  # [n][<= k] each, increasing ids, delta coded
        topk = [
            ("topk_ids", pa.list_(pa.list_(pa.int32()))),
            ("topk_logprobs", pa.list_(pa.list_(codec.value_type))),
            *codec.extra_fields,
        ]
    else:
        topk = [
            ("topk_ids", pa.list_(pa.list_(pa.int32(), k))),  # [n][k], descending logprob
            ("topk_logprobs", pa.list_(pa.list_(codec.value_type, k))),  # [n][k] encoded
        ]
    return pa.schema(
        [
            *PROMPT_SCHEMA,
            *(ROLLOUT_FIELDS if rollout else []),
            *topk,
            ("next_logprob", pa.list_(pa.float32())),  # [n], last element NaN
        ]
    )


class ShardSetMetadata(BaseModel):
    """What a reader needs to interpret a shard set; stored in every Parquet footer and the card.

    Serialised with sorted keys so identical metadata always gives identical bytes (a retried
    shard must be byte-identical to its first attempt).
    """

    format_version: int = FORMAT_VERSION
    # teacher_logits | teacher_generated | rollout (no teacher columns, k = 0) | onpolicy
    # (a rollout scored by the teacher). For a rollout, teacher_model is the sampling policy.
    kind: str = "teacher_logits"
    teacher_model: str
    teacher_revision: str | None = None
    tokenizer_fingerprint: str
    k: int = Field(ge=0)
    codec: str
    codec_params: dict[str, Any] = Field(default_factory=dict)
    logprobs_mode: str
    engine: str
    engine_version: str
    plan_fingerprint: str
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > FORMAT_VERSION:
            raise ValueError(
                f"shard format_version {v} is newer than this logitforge understands "
                f"({FORMAT_VERSION}); upgrade logitforge"
            )
        return v

    def make_codec(self) -> Codec:
        return get_codec(self.codec, **self.codec_params)

    def to_json_bytes(self) -> bytes:
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
        ).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes | str) -> ShardSetMetadata:
        return cls.model_validate_json(data)


def read_metadata(
    schema_or_file_metadata: pa.Schema | pq.FileMetaData | Mapping[bytes, bytes] | None,
) -> ShardSetMetadata:
    """Extract :class:`ShardSetMetadata` from an Arrow schema, a Parquet footer or a kv dict."""
    src = schema_or_file_metadata
    kv = src.metadata if isinstance(src, (pa.Schema, pq.FileMetaData)) else src
    if not kv or METADATA_KEY not in kv:
        raise ValueError(
            f"no {METADATA_KEY.decode()!r} key in Parquet metadata: not a logitforge shard"
        )
    return ShardSetMetadata.from_json_bytes(kv[METADATA_KEY])


def is_rollout_table(table: pa.Table | pa.Schema) -> bool:
    """Whether rows carry the rollout columns (they travel on through teacher scoring)."""
    names = table.names if isinstance(table, pa.Schema) else table.column_names
    return all(name in names for name in ROLLOUT_COLUMNS)


def _prompt_arrays(prompts: pa.Table) -> list[pa.Array]:
    """Prompt (+ rollout) columns in schema order and types, one contiguous array each."""
    schema = ROLLOUT_SCHEMA if is_rollout_table(prompts) else PROMPT_SCHEMA
    missing = [f.name for f in PROMPT_SCHEMA if f.name not in prompts.column_names]
    if missing:
        raise ValueError(f"prompt table lacks columns {missing}; expected {PROMPT_SCHEMA.names}")
    try:
        prompts = prompts.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"prompt table does not cast to {schema.names}: {e}") from e
    return [col.combine_chunks() for col in prompts.columns]


def _row_offsets(input_ids: pa.ListArray) -> np.ndarray:
    """int32 [R+1] offsets from 0, valid for a sliced array too."""
    if input_ids.null_count:
        raise ValueError("prompt table has null input_ids")
    offsets = input_ids.offsets.to_numpy()
    return (offsets - offsets[0]).astype(np.int32, copy=False)


def build_logit_table(
    prompts: pa.Table,
    topk_ids: np.ndarray,
    topk_logprobs: np.ndarray,
    next_logprob: np.ndarray,
    codec: Codec,
) -> pa.Table:
    """Attach the teacher outputs to the prompt rows as nested Arrow columns.

    ``topk_ids`` int [T, k], ``topk_logprobs`` float [T, k] and ``next_logprob`` float [T]
    hold all R rows' positions concatenated in row order, T = sum(len(input_ids)).
    Rollout columns (``policy_logprob``, ``policy_version``) are kept when present; other extra
    columns are dropped: the result has exactly ``logit_schema(codec, k, rollout)``.
    """
    rollout = is_rollout_table(prompts)
    columns = _prompt_arrays(prompts)
    input_ids, byte_start, byte_end = columns[1], columns[4], columns[5]
    offsets = _row_offsets(input_ids)
    num_tokens = int(offsets[-1])
    lengths = np.diff(offsets)
    per_position = [("byte_start", byte_start), ("byte_end", byte_end)]
    if rollout:
        per_position.append(("policy_logprob", columns[len(PROMPT_SCHEMA)]))
    for name, arr in per_position:
        if arr.null_count or not np.array_equal(arr.value_lengths().to_numpy(), lengths):
            bad = _first_mismatch(arr, lengths)
            raise ValueError(f"{name} length differs from input_ids length in row {bad}")

    topk_ids = np.asarray(topk_ids)
    topk_logprobs = np.asarray(topk_logprobs)
    next_logprob = np.asarray(next_logprob)
    if topk_ids.ndim != 2 or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must be [T, k] with k >= 1, got shape {topk_ids.shape}")
    k = topk_ids.shape[1]
    expected = {
        "topk_ids": (topk_ids.shape, (num_tokens, k)),
        "topk_logprobs": (topk_logprobs.shape, (num_tokens, k)),
        "next_logprob": (next_logprob.shape, (num_tokens,)),
    }
    for name, (got, want) in expected.items():
        if got != want:
            raise ValueError(
                f"{name} has shape {got}, expected {want} "
                f"({len(lengths)} rows with {num_tokens} tokens in total, k={k})"
            )
    if not np.issubdtype(topk_ids.dtype, np.integer):
        raise ValueError(f"topk_ids must be an integer array, got {topk_ids.dtype}")

    row_offsets = pa.array(offsets, type=pa.int32())

    def nested(values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
        flat = pa.array(values.reshape(-1), type=value_type)
        return pa.ListArray.from_arrays(row_offsets, pa.FixedSizeListArray.from_arrays(flat, k))

    logprobs = topk_logprobs.astype(np.float32, copy=False)
    if isinstance(codec, SparseCodec):
        topk = _sparse_arrays(codec, codec.encode_entries(topk_ids, logprobs), row_offsets)
    else:
        topk = [
            nested(topk_ids.astype(np.int32, copy=False), pa.int32()),
            nested(codec.encode(logprobs), codec.value_type),
        ]
    next_arr = pa.ListArray.from_arrays(
        row_offsets, pa.array(next_logprob.astype(np.float32, copy=False), type=pa.float32())
    )
    return pa.Table.from_arrays([*columns, *topk, next_arr], schema=logit_schema(codec, k, rollout))


def _sparse_arrays(
    codec: SparseCodec, entries: SparseEntries, row_offsets: pa.Array
) -> list[pa.Array]:
    """``topk_ids``, ``topk_logprobs`` and the codec's extra columns, nested per row."""
    counts = entries.counts.astype(np.int64)
    position_offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]), type=pa.int32())

    def per_position(values: pa.Array) -> pa.ListArray:
        inner = pa.ListArray.from_arrays(position_offsets, values)
        return pa.ListArray.from_arrays(row_offsets, inner)

    arrays = [
        per_position(pa.array(entries.id_deltas, type=pa.int32())),
        per_position(pa.array(entries.values, type=codec.value_type)),
    ]
    for f in codec.extra_fields:
        values = pa.array(entries.extra[f.name], type=f.type.value_type)
        arrays.append(pa.ListArray.from_arrays(row_offsets, values))
    return arrays


def _first_mismatch(arr: pa.ListArray, lengths: np.ndarray) -> int:
    got = arr.value_lengths().to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(np.isnan(got.astype(np.float64)) | (got != lengths))
    return int(bad[0]) if bad.size else -1
