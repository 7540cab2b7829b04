"""Duplicate ids across the whole input, checked bucket by bucket.

Partitions are prepared apart, so no task sees every id. Each partition instead hashes the ids
of its rows that reached the duplicate check (their "claims", `CLAIM_SCHEMA`) into buckets;
equal ids land in the same bucket, so one task per bucket finds every duplicate exactly, and
no process ever holds all ids. The first occurrence in input order wins; later ones are an
error or counted skips, with the same message as the whole-input check.
"""

from __future__ import annotations

import itertools
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .records import DUPLICATE_ID, InputError, describe_row

# The rows of a partition's prompt table that a bucket found to be later duplicates.
DROP_SCHEMA = pa.schema([("partition", pa.int32()), ("pos", pa.int64())])


def bucket_of(ids: pa.Array | pa.ChunkedArray, num_buckets: int) -> np.ndarray:
    """[n] bucket of each id: crc32 of its UTF-8, stable across processes (unlike `hash`)."""
    return np.fromiter(
        (zlib.crc32(i.encode("utf-8", "surrogatepass")) % num_buckets for i in ids.to_pylist()),
        np.int64,
        len(ids),
    )


def split_by_bucket(claims: pa.Table, num_buckets: int) -> list[pa.RecordBatch]:
    """``claims`` as one record batch per bucket (empty ones included), rows in input order."""
    buckets = bucket_of(claims.column("id"), num_buckets)
    order = np.argsort(buckets, kind="stable")
    ordered = claims.take(pa.array(order)).combine_chunks()
    bounds = np.searchsorted(buckets[order], np.arange(num_buckets + 1))
    return [
        pa.record_batch(
            [c.combine_chunks() for c in ordered.slice(lo, hi - lo).columns], schema=claims.schema
        )
        for lo, hi in itertools.pairwise(bounds)
    ]


@dataclass
class DuplicateCheck:
    """What one bucket's check changes in the plan (small, except ``drops``, kept in a file)."""

    error: InputError | None = None  # on_invalid: error, the earliest duplicate in the bucket
    skipped_delta: dict[str, int] = field(default_factory=dict)  # reason -> change in skips
    drops: pa.Table = field(default_factory=DROP_SCHEMA.empty_table)  # kept rows to drop
    dropped: dict[int, int] = field(default_factory=dict)  # partition -> kept rows dropped
    truncated_dropped: int = 0
    tokens_dropped: int = 0


def find_duplicates(claims: pa.Table, on_invalid: str, source: str | None) -> DuplicateCheck:
    """Check one bucket's claims (`CLAIM_SCHEMA` plus ``partition``) for repeated ids.

    A later duplicate the partition had kept is dropped (``drops``); one it had skipped for
    another reason found later in preparation (template error, too long) is re-counted as a
    duplicate, as the whole-input check rejects a duplicate before rendering it.
    """
    n = claims.num_rows
    if n < 2:
        return DuplicateCheck()
    t = claims.sort_by([("id", "ascending"), ("row", "ascending")])
    ids = t.column("id").combine_chunks()
    dup = np.zeros(n, bool)
    dup[1:] = pc.equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    if not dup.any():
        return DuplicateCheck()
    first = np.maximum.accumulate(np.where(dup, 0, np.arange(n)))  # first row of each id's run
    rows = t.column("row").to_numpy()
    later = np.flatnonzero(dup)
    if on_invalid != "skip":
        k = int(later[np.argmin(rows[later])])
        f = int(first[k])
        lines = t.column("line")
        row_id = ids[k].as_py()
        seen = describe_row(int(rows[f]), line=lines[f].as_py(), source=source)
        detail = f"duplicate id {row_id!r}, first seen at {seen}"
        error = InputError(
            int(rows[k]), row_id, DUPLICATE_ID, detail, line=lines[k].as_py(), source=source
        )
        return DuplicateCheck(error=error)
    reasons = t.column("reason").take(pa.array(later)).to_pylist()
    delta = Counter({DUPLICATE_ID: len(later)})
    delta.subtract(r for r in reasons if r is not None)
    pos = t.column("pos").to_numpy()[later]
    kept = later[pos >= 0]
    partition = t.column("partition").to_numpy()[kept].astype(np.int32)
    drop_pos = pos[pos >= 0]
    order = np.lexsort((drop_pos, partition))
    parts, counts = np.unique(partition, return_counts=True)
    return DuplicateCheck(
        skipped_delta=dict(delta),
        drops=pa.table([pa.array(partition[order]), pa.array(drop_pos[order])], schema=DROP_SCHEMA),
        dropped={int(p): int(c) for p, c in zip(parts, counts, strict=True)},
        truncated_dropped=int(t.column("truncated").to_numpy(zero_copy_only=False)[kept].sum()),
        tokens_dropped=int(t.column("tokens").to_numpy()[kept].sum()),
    )
