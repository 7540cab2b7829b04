"""The planning tasks: prompt preparation as functions of one partition, bucket or shard group.

Each task takes and returns plain JSON (nothing but data crosses processes) and returns only
small summaries; rows travel through work files under ``<out>/.logitforge/planning/`` on the
shard set's fsspec filesystem, so the driver's memory stays O(partitions + shards):

- `count_task`: rows and newlines of a JSONL byte range (the counting pass);
- `prepare_task`: read, validate, render and tokenize one partition; write its kept rows
  (``rows/``) and its ids hashed into buckets (``claims/``);
- `bucket_task`: find duplicate ids in one bucket; write the kept rows to drop (``drops/``);
- `cut_task`: assemble a run of prompt shards from the partitions' rows and write them.

The pipeline runs them on Dask; without a cluster the same functions run in-process, in order.
Retried tasks rewrite the same files (atomically), so retries are harmless.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
from pydantic import BaseModel, ConfigDict

from storage.layout import ShardSetLayout
from storage.writer import write_bytes_atomic, write_parquet_atomic

from .dedupe import find_duplicates, split_by_bucket
from .options import InputOptions, PrepareOptions
from .partition import InputPartition, count_partition, read_partition
from .prepare import prepare_partition
from .records import InputError
from .tokenize import tokenizer_fingerprint

WORK_BATCH_ROWS = 4096  # record batch of the rows work files: what a shard group reads at least
_IPC = ipc.IpcWriteOptions(compression="lz4")


class TokenizerSpec(BaseModel):
    """Which tokenizer to load on a worker, and the fingerprint it must have."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    revision: str | None = None
    trust_remote_code: bool = False
    fingerprint: str


class PlanContext(BaseModel):
    """What every prepare and bucket task of one planning run shares."""

    model_config = ConfigDict(extra="forbid")

    input: InputOptions
    prepare: PrepareOptions  # max_length already capped at the teacher's context
    tokenizer: TokenizerSpec
    work_url: str  # fsspec URL of the planning work folder
    num_buckets: int
    num_partitions: int


class CutPart(BaseModel):
    """Kept rows ``[kept_start, kept_stop)`` of a partition, counted after dropping duplicates."""

    model_config = ConfigDict(extra="forbid")

    partition: int
    kept_start: int
    kept_stop: int
    num_kept: int  # rows in its work file, before drops
    drop_buckets: list[int]  # buckets that dropped rows of this partition


class CutSpec(BaseModel):
    """Prompt shards ``first_shard ...`` holding kept rows ``[row_start, row_stop)``."""

    model_config = ConfigDict(extra="forbid")

    output_url: str
    split: str
    work_url: str
    first_shard: int
    row_start: int
    row_stop: int
    rows_per_shard: int
    parts: list[CutPart]


_tokenizers: dict[TokenizerSpec, Any] = {}


def remember_tokenizer(spec: TokenizerSpec, tokenizer: Any) -> None:
    """Let in-process tasks use the driver's tokenizer instead of loading it again."""
    _tokenizers[spec] = tokenizer


def _tokenizer(spec: TokenizerSpec) -> Any:
    """The tokenizer, once per worker process, checked against the driver's fingerprint."""
    if spec not in _tokenizers:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
        if tokenizer_fingerprint(tokenizer) != spec.fingerprint:
            raise RuntimeError(
                f"tokenizer {spec.path} on this worker differs from the driver's "
                f"(fingerprint {tokenizer_fingerprint(tokenizer)} != {spec.fingerprint})"
            )
        _tokenizers[spec] = tokenizer
    return _tokenizers[spec]


def input_source(opts: InputOptions) -> str:
    """How messages name the input (as `load_rows` names it)."""
    return Path(opts.path).name or opts.path


def work_path(work_url: str, kind: str, index: int) -> tuple[Any, str]:
    """(fs, path) of a work file: ``rows``/``claims`` per partition, ``drops`` per bucket."""
    fs, root = fsspec.core.url_to_fs(work_url)
    return fs, posixpath.join(root, kind, f"{index:06d}.arrow")


def _write_ipc(fs: Any, path: str, schema: pa.Schema, batches: list[pa.RecordBatch]) -> None:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, schema, options=_IPC) as writer:
        for batch in batches:
            writer.write_batch(batch)
    write_bytes_atomic(fs, path, sink.getvalue())


def _read_batches(fs: Any, path: str, indices: list[int] | None = None) -> pa.Table:
    """Record batches ``indices`` (all when None) of an IPC work file, as one table."""
    with fs.open(path, "rb") as f:
        reader = ipc.open_file(f)
        wanted = range(reader.num_record_batches) if indices is None else indices
        return pa.Table.from_batches([reader.get_batch(i) for i in wanted], schema=reader.schema)


def error_to_json(error: InputError | None) -> dict | None:
    if error is None:
        return None
    return {
        "row": error.row,
        "row_id": error.row_id,
        "reason": error.reason,
        "detail": error.detail,
        "line": error.line,
        "source": error.source,
    }


def error_from_json(data: dict) -> InputError:
    return InputError(
        data["row"],
        data["row_id"],
        data["reason"],
        data["detail"],
        line=data["line"],
        source=data["source"],
    )


def write_rows(work_url: str, index: int, table: pa.Table) -> None:
    """A partition's kept prompt rows, in batches of exactly `WORK_BATCH_ROWS` (the last one
    shorter), so `cut_task` can find a row's batch by division.

    Chunks are combined first: a table read from several files (a shard-set input) is chunked
    per file, and `to_batches` would otherwise cut a short batch at every chunk boundary.
    """
    fs, path = work_path(work_url, "rows", index)
    batches = table.combine_chunks().to_batches(max_chunksize=WORK_BATCH_ROWS)
    _write_ipc(fs, path, table.schema, batches)


def count_task(part_json: str) -> list[int]:
    """[rows, newlines] of one JSONL partition."""
    rows, newlines = count_partition(InputPartition.model_validate_json(part_json))
    return [rows, newlines]


def prepare_task(context_json: str, part_json: str) -> dict:
    """Prepare one partition; write its kept rows and bucketed claims; return its counts."""
    ctx = PlanContext.model_validate_json(context_json)
    part = InputPartition.model_validate_json(part_json)
    rows = read_partition(ctx.input, part)
    prepared = prepare_partition(rows, _tokenizer(ctx.tokenizer), ctx.prepare, ctx.input)
    del rows
    claims = prepared.claims
    fs, path = work_path(ctx.work_url, "claims", part.index)
    _write_ipc(fs, path, claims.schema, split_by_bucket(claims, ctx.num_buckets))
    num_kept = num_tokens = 0
    if prepared.table is not None:
        table = prepared.table
        num_kept = table.num_rows
        lengths = pc.list_value_length(table.column("input_ids"))
        num_tokens = int(pc.sum(lengths).as_py() or 0)
        write_rows(ctx.work_url, part.index, table)
    return {
        "index": part.index,
        "num_input_rows": prepared.num_input_rows,
        "num_kept": num_kept,
        "num_truncated": prepared.num_truncated,
        "num_tokens": num_tokens,
        "skipped": prepared.skipped,
        "error": error_to_json(prepared.error),
        "error_phase": prepared.error_phase,
    }


def bucket_task(context_json: str, bucket: int) -> dict:
    """Check one bucket of ids across every partition; write the kept rows it drops."""
    ctx = PlanContext.model_validate_json(context_json)
    tables = []
    for p in range(ctx.num_partitions):
        fs, path = work_path(ctx.work_url, "claims", p)
        table = _read_batches(fs, path, [bucket])
        tables.append(table.append_column("partition", pa.array(np.full(table.num_rows, p))))
    claims = pa.concat_tables(tables)
    check = find_duplicates(claims, ctx.prepare.on_invalid, input_source(ctx.input))
    if check.dropped:
        fs, path = work_path(ctx.work_url, "drops", bucket)
        _write_ipc(fs, path, check.drops.schema, check.drops.combine_chunks().to_batches())
    return {
        "bucket": bucket,
        "error": error_to_json(check.error),
        "skipped_delta": check.skipped_delta,
        "dropped": [[p, n] for p, n in sorted(check.dropped.items())],
        "truncated_dropped": check.truncated_dropped,
        "tokens_dropped": check.tokens_dropped,
    }


def _kept_positions(work_url: str, part: CutPart) -> np.ndarray:
    """Positions in the partition's rows file of its kept rows ``[kept_start, kept_stop)``."""
    drops = [np.zeros(0, np.int64)]
    for bucket in part.drop_buckets:
        fs, path = work_path(work_url, "drops", bucket)
        table = _read_batches(fs, path)
        mine = table.column("partition").to_numpy() == part.partition
        drops.append(table.column("pos").to_numpy()[mine])
    kept = np.delete(np.arange(part.num_kept, dtype=np.int64), np.concatenate(drops))
    return kept[part.kept_start : part.kept_stop]


def cut_task(spec_json: str) -> list[dict]:
    """Write the spec's prompt shards; [{index, rows, bytes, sha256}] per shard.

    Reads only the record batches that hold its rows, and combines chunks before writing, so
    a shard's bytes do not depend on how the input was partitioned.
    """
    spec = CutSpec.model_validate_json(spec_json)
    pieces = []
    for part in spec.parts:
        positions = _kept_positions(spec.work_url, part)
        if positions.size == 0:
            continue
        first, last = int(positions[0]) // WORK_BATCH_ROWS, int(positions[-1]) // WORK_BATCH_ROWS
        fs, path = work_path(spec.work_url, "rows", part.partition)
        table = _read_batches(fs, path, list(range(first, last + 1)))
        pieces.append(table.take(pa.array(positions - first * WORK_BATCH_ROWS)))
    rows = pa.concat_tables(pieces)
    layout = ShardSetLayout.from_url(spec.output_url, split=spec.split)
    written = []
    size = spec.rows_per_shard
    for offset in range(0, spec.row_stop - spec.row_start, size):
        index = spec.first_shard + offset // size
        shard = rows.slice(offset, size).combine_chunks()
        out = write_parquet_atomic(layout.fs, layout.prompts_path(index), shard)
        written.append({"index": index, "rows": out.rows, "bytes": out.bytes, "sha256": out.sha256})
    return written
