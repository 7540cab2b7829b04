"""What every shard-producing stage shares: read the frozen prompt shard, write shard + record.

A shard task is a pure function of its shard: it reads the prompt shard the plan froze
(checking its sha256), computes a table, writes it atomically and only then its completion
record. A shard without a record does not exist: the driver removes the records of the
shards it submits, so a record of the task's own plan that a task finds when it starts was
written by an earlier attempt of that same task (its worker was lost before the driver
collected the result, and the scheduler recomputed it); the task returns that record instead of
redoing the shard. The teacher stage (scoring, generate-teacher) and the rollout stage differ
only in the middle step.
"""

from __future__ import annotations

import hashlib
import socket
import time
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from storage.layout import ShardSetLayout
from storage.manifest import DoneRecord, read_done, write_done
from storage.schema import ShardSetMetadata
from storage.writer import write_parquet_atomic


def worker_label() -> str:
    """Which process wrote a shard: the host, plus the Dask worker's name inside one."""
    host = socket.gethostname()
    try:
        from distributed import get_worker

        return f"{host}/{get_worker().name}"
    except (ImportError, ValueError):  # not inside a Dask worker (tests, a direct call)
        return host


class ShardTask(BaseModel):
    """The part of a task every stage needs (plain data, cheap to ship to a worker)."""

    model_config = ConfigDict(extra="forbid")

    output_url: str
    index: int
    num_shards: int
    plan_fingerprint: str
    prompts_sha256: str | None
    metadata: dict  # ShardSetMetadata fields the driver knows; engine fields are filled here


class CorruptPromptShardError(RuntimeError):
    """The frozen prompt shard does not match the plan; rerun planning, do not retry."""


def read_prompt_shard(task: ShardTask) -> pa.Table:
    """The task's frozen prompt rows, verified against the plan's sha256.

    A damaged prompt shard is removed before the error: a rerun's plan check looks at sizes
    only, so a same-size corruption left in place would fail every rerun instead of being
    rebuilt from the input.
    """
    layout = ShardSetLayout.from_url(task.output_url)
    path = layout.prompts_path(task.index)
    try:
        with layout.fs.open(path, "rb") as f:
            data = f.read()  # one read serves both the checksum and the parse
    except FileNotFoundError:
        raise CorruptPromptShardError(
            f"prompt shard {path} is missing; rerun the same command to rebuild it"
        ) from None
    if task.prompts_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != task.prompts_sha256:
            layout.fs.rm(path)
            raise CorruptPromptShardError(
                f"prompt shard {path} does not match the plan (sha256 {actual[:12]}…) and was "
                "removed; rerun the same command to rebuild it"
            )
    return pq.read_table(pa.BufferReader(data))


def finished_earlier(task: ShardTask) -> DoneRecord | None:
    """The record an earlier attempt of this task wrote, if its shard is on storage whole.

    Size only, like the driver's own check: the reader hashes every shard it reads.
    """
    layout = ShardSetLayout.from_url(task.output_url)
    record = read_done(layout, task.index)
    if record is None or record.plan_fingerprint != task.plan_fingerprint:
        return None
    path = layout.data_path(task.index, task.num_shards)
    try:
        return record if layout.fs.size(path) == record.bytes else None
    except FileNotFoundError:
        return None


def write_shard(
    task: ShardTask,
    table: pa.Table,
    metadata: ShardSetMetadata,
    *,
    tokens: int,
    timings: dict[str, float],
    counts: dict[str, int],
    started: float,
) -> DoneRecord:
    """Write the shard atomically, then its completion record; return the record."""
    layout = ShardSetLayout.from_url(task.output_url)
    path = layout.data_path(task.index, task.num_shards)
    t = time.perf_counter()
    shard = write_parquet_atomic(layout.fs, path, table, metadata)
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    record = DoneRecord(
        shard=path.rsplit("/", 1)[-1],
        index=task.index,
        rows=table.num_rows,
        tokens=tokens,
        bytes=shard.bytes,
        sha256=shard.sha256,
        plan_fingerprint=task.plan_fingerprint,
        timings=timings,
        counts=counts,
        finished_at=datetime.now(timezone.utc).isoformat(),
        worker=worker_label(),
    )
    write_done(layout, record)
    return record
