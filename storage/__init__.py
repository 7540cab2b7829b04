"""Shard sets on storage: schema and codecs, atomic writer, plan/completion records, card, reader.

A shard set is a folder (local or any fsspec URL) that is also a Hugging Face dataset
repository. See storage/README.md for the format. This package depends only on numpy,
pyarrow, fsspec, pydantic and yaml, so it can be used without the pipeline or any engine.
"""

from storage.card import read_card_metadata, write_dataset_card
from storage.codecs import DEFAULT_CODEC, KNOWN_CODECS, Codec, get_codec
from storage.layout import ShardSetLayout, shard_name
from storage.manifest import (
    DoneRecord,
    Plan,
    PlanMismatchError,
    ShardPlan,
    read_done,
    read_plan,
    remove_done,
    verify_shard,
    write_done,
    write_plan,
)
from storage.reader import (
    IncompleteShardSetError,
    LogitBatch,
    ShardCorruptedError,
    ShardSet,
    decode_logit_table,
)
from storage.schema import (
    FORMAT_VERSION,
    METADATA_KEY,
    PROMPT_SCHEMA,
    ROLLOUT_SCHEMA,
    ShardSetMetadata,
    build_logit_table,
    logit_schema,
    read_metadata,
)
from storage.writer import ShardFile, sha256_file, write_parquet_atomic

__all__ = [
    "DEFAULT_CODEC",
    "FORMAT_VERSION",
    "KNOWN_CODECS",
    "METADATA_KEY",
    "PROMPT_SCHEMA",
    "ROLLOUT_SCHEMA",
    "Codec",
    "DoneRecord",
    "IncompleteShardSetError",
    "LogitBatch",
    "Plan",
    "PlanMismatchError",
    "ShardCorruptedError",
    "ShardFile",
    "ShardPlan",
    "ShardSet",
    "ShardSetLayout",
    "ShardSetMetadata",
    "build_logit_table",
    "decode_logit_table",
    "get_codec",
    "logit_schema",
    "read_card_metadata",
    "read_done",
    "read_metadata",
    "read_plan",
    "remove_done",
    "sha256_file",
    "shard_name",
    "verify_shard",
    "write_dataset_card",
    "write_done",
    "write_parquet_atomic",
    "write_plan",
]
