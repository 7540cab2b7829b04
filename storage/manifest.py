"""The plan and completion records of a shard set (JSON under ``.logitforge/``).

The plan is frozen when a run starts: which input rows go to which shard file. A shard
counts as done only when its completion record exists, names the current plan, and the data
file on storage has exactly the recorded size and sha256. Everything else is redone, so a
crash at any point (mid-write, after the data write but before the record, mid-record)
leaves a folder that the next run completes without duplicating rows.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from storage.layout import ShardSetLayout
from storage.schema import FORMAT_VERSION
from storage.writer import sha256_file, write_bytes_atomic


class PlanMismatchError(RuntimeError):
    """The output folder already holds a plan with a different fingerprint."""


def utc_now() -> str:
    """ISO-8601 UTC timestamp for ``created_at`` / ``finished_at``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ShardPlan(BaseModel):
    index: int = Field(ge=0)
    name: str  # data file name, e.g. train-00003-of-00016.parquet
    row_start: int = Field(ge=0)  # rows [row_start, row_stop) of the prepared prompt table
    row_stop: int = Field(ge=0)
    prompts_sha256: str | None = None
    # Size of the prompt shard, so a resumed run checks its prompt shards from metadata alone
    # (shard tasks verify the sha256 of what they read). None in plans written before it.
    prompts_bytes: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> ShardPlan:
        if self.row_stop < self.row_start:
            raise ValueError(f"shard {self.index}: row_stop {self.row_stop} < {self.row_start}")
        return self

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start


class Plan(BaseModel):
    format_version: int = FORMAT_VERSION
    fingerprint: str
    created_at: str
    config: dict[str, Any]
    input_fingerprint: str
    num_rows: int = Field(ge=0)
    num_shards: int = Field(ge=0)
    shards: list[ShardPlan]
    skipped: dict[str, int] = Field(default_factory=dict)  # reason -> rows skipped
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        if len(self.shards) != self.num_shards:
            raise ValueError(f"plan lists {len(self.shards)} shards, num_shards={self.num_shards}")
        for i, s in enumerate(self.shards):
            if s.index != i:
                raise ValueError(f"plan shard at position {i} has index {s.index}")
        return self

    def shard(self, index: int) -> ShardPlan:
        return self.shards[index]


class DoneRecord(BaseModel):
    shard: str  # data file name
    index: int
    rows: int
    tokens: int
    bytes: int
    sha256: str
    plan_fingerprint: str
    timings: dict[str, float] = Field(default_factory=dict)  # stage -> seconds
    counts: dict[str, int] = Field(default_factory=dict)  # stage-specific, e.g. finish reasons
    finished_at: str
    worker: str | None = None


def _dump(model: BaseModel) -> bytes:
    return json.dumps(model.model_dump(mode="json"), indent=2, sort_keys=True).encode() + b"\n"


def write_plan(layout: ShardSetLayout, plan: Plan) -> None:
    write_bytes_atomic(layout.fs, layout.plan_path(), _dump(plan))


def read_plan(layout: ShardSetLayout) -> Plan | None:
    """The folder's plan, or None if there is none. A corrupt plan is an error, not 'none'."""
    path = layout.plan_path()
    try:
        with layout.fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        return Plan.model_validate_json(data)
    except ValidationError as e:
        raise ValueError(f"unreadable plan {layout.fs.unstrip_protocol(path)}: {e}") from e


def write_done(layout: ShardSetLayout, record: DoneRecord) -> None:
    write_bytes_atomic(layout.fs, layout.done_path(record.index), _dump(record))


def read_done(layout: ShardSetLayout, index: int) -> DoneRecord | None:
    """The shard's completion record; None when missing or unreadable (both mean: redo)."""
    try:
        with layout.fs.open(layout.done_path(index), "rb") as f:
            data = f.read()
        return DoneRecord.model_validate_json(data)
    except (FileNotFoundError, ValidationError, UnicodeDecodeError):
        return None


def remove_done(layout: ShardSetLayout, index: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        layout.fs.rm(layout.done_path(index))


def verify_shard(
    layout: ShardSetLayout, plan: Plan, index: int, check_sha256: bool = True
) -> tuple[bool, str]:
    """Is shard ``index`` complete and intact? Returns (ok, reason); reason is "ok" if ok.

    ``check_sha256=False`` skips reading the file (size is still compared), for callers that
    hash the bytes themselves while reading them anyway.
    """
    if not 0 <= index < plan.num_shards:
        return False, f"shard {index} is not in the plan ({plan.num_shards} shards)"
    fs = layout.fs
    record = read_done(layout, index)
    if record is None:
        if fs.exists(layout.done_path(index)):
            return False, "completion record unreadable"
        return False, "no completion record"
    if record.plan_fingerprint != plan.fingerprint:
        return False, "plan fingerprint differs: record belongs to another plan"
    planned = plan.shard(index)
    if record.shard != planned.name or record.index != index:
        return False, f"record names {record.shard!r} (index {record.index}), plan {planned.name!r}"
    path = layout.data_file(planned.name)
    if not fs.exists(path):
        return False, "data file missing"
    size = fs.size(path)
    if size != record.bytes:
        return False, f"size mismatch ({size} bytes, record says {record.bytes}): shard truncated"
    if check_sha256 and sha256_file(fs, path) != record.sha256:
        return False, "sha256 mismatch: shard corrupted or truncated"
    return True, "ok"
