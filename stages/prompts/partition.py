"""Input partitions: slices of the input that workers read and prepare independently.

Partitions are decided from file metadata only (sizes, Parquet row-group counts, dataset
lengths), never from the number of workers, so the same input always gives the same
partitions, and every row keeps the global row number (and JSONL line) that a whole-file read
gives it. A JSONL partition is a byte range that owns the lines *starting* in it; its row
count (blank lines are not rows) comes from a cheap counting pass, and prefix sums over the
counts give each partition its first global row. Parquet partitions are runs of row groups
(a row group larger than the partition size is split by rows); `datasets` partitions are index
ranges of the memory-mapped table.

JSONL and Parquet inputs may be fsspec URLs (``s3://...``): planning reads only sizes and
Parquet footers, and each partition task reads its own byte range or row groups, so no
process downloads the whole input to split it. A partition's ``file`` is then a URL, opened
by the task with the credentials of its worker's environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from .loading import (
    Format,
    InputRows,
    _open_dataset,
    count_jsonl_range,
    file_url,
    input_fs,
    open_parquet,
    parquet_files,
    read_jsonl_range,
    resolve_format,
)
from .options import InputOptions

# Sizes only decide how work is split, never what is written (prompt shards are byte-identical
# for any partitioning), so they are not part of the plan fingerprint.
PARTITION_BYTES = 8 << 20  # JSONL bytes per partition: ~100k short rows, a few 100 MB in a task
PARTITION_ROWS = 100_000  # Parquet / `datasets` rows per partition


class InputPartition(BaseModel):
    """One slice of the input: rows ``[first_row, first_row + num_rows)`` of the whole input.

    ``start``/``stop`` are a byte range of ``file`` (JSONL) or a row range within ``file``
    (Parquet) or within the dataset (``datasets``, ``file`` is the input path).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    format: str
    file: str
    start: int
    stop: int
    first_row: int = 0
    num_rows: int = 0  # rows this partition reads (after `input.limit`)
    newlines_before: int = 0  # JSONL: newline bytes in [0, start), which number the lines


def split_input(
    opts: InputOptions,
    partition_bytes: int = PARTITION_BYTES,
    partition_rows: int = PARTITION_ROWS,
) -> tuple[list[InputPartition], bool]:
    """The input's partitions from metadata, and whether their rows still need counting.

    Parquet and `datasets` partitions know their rows already (``first_row``/``num_rows``
    are set, the limit applied); JSONL partitions are byte ranges to count with
    `count_partition`, then `assign_rows`.
    """
    fmt: Format = resolve_format(opts)
    if fmt == "jsonl":
        fs, root = input_fs(opts.path)
        size = fs.size(root)
        file = file_url(fs, root)
        parts = [
            InputPartition(
                index=i, format=fmt, file=file, start=lo, stop=min(lo + partition_bytes, size)
            )
            for i, lo in enumerate(range(0, size, partition_bytes))
        ]
        return parts, True
    if fmt == "parquet":
        ranges: list[tuple[str, int, int]] = []
        for file in parquet_files(opts.path):  # a loop over files and row groups, never rows
            with open_parquet(file) as pf:  # the footer only
                md = pf.metadata
            groups = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
            ranges.extend((file, lo, hi) for lo, hi in _group_ranges(groups, partition_rows))
    else:
        n = len(_dataset(opts))
        step = partition_rows
        ranges = [(opts.path, lo, min(lo + step, n)) for lo in range(0, n, step)]
    parts = [
        InputPartition(index=i, format=fmt, file=f, start=lo, stop=hi)
        for i, (f, lo, hi) in enumerate(ranges)
    ]
    counts = np.array([p.stop - p.start for p in parts], np.int64)
    return assign_rows(parts, counts, np.zeros(len(parts), np.int64), opts.limit), False


def _group_ranges(groups: list[int], partition_rows: int) -> list[tuple[int, int]]:
    """Row ranges of one Parquet file: whole row groups up to ``partition_rows`` rows, and a
    larger row group split into pieces (each piece reads its group, but converts only itself)."""
    ranges: list[tuple[int, int]] = []
    lo = pos = 0
    for n in groups:
        if pos > lo and pos - lo + n > partition_rows:
            ranges.append((lo, pos))
            lo = pos
        if n > partition_rows:
            if pos > lo:
                ranges.append((lo, pos))
            ranges.extend(
                (p, min(p + partition_rows, pos + n)) for p in range(pos, pos + n, partition_rows)
            )
            lo = pos + n
        pos += n
    if pos > lo:
        ranges.append((lo, pos))
    return ranges


def count_partition(part: InputPartition) -> tuple[int, int]:
    """(rows, newlines) of a JSONL byte range: the counting pass, one task per partition."""
    return count_jsonl_range(part.file, part.start, part.stop)


def assign_rows(
    parts: list[InputPartition], rows: np.ndarray, newlines: np.ndarray, limit: int | None
) -> list[InputPartition]:
    """Give each partition its first global row (prefix sums of the counts) and the rows it
    reads under ``limit``; partitions left without rows are dropped and the rest re-indexed."""
    first = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    take = rows if limit is None else np.clip(limit - first, 0, rows)
    before = np.concatenate([[0], np.cumsum(newlines)[:-1]]).astype(np.int64)
    kept = np.flatnonzero(take > 0)
    return [
        parts[int(i)].model_copy(
            update={
                "index": j,
                "first_row": int(first[i]),
                "num_rows": int(take[i]),
                "newlines_before": int(before[i]),
            }
        )
        for j, i in enumerate(kept)
    ]


def _dataset(opts: InputOptions) -> Any:
    """The opened dataset: memory-mapped (a Hub dataset from its cache), so cheap per task.
    Not cached across tasks: a long-lived worker would keep serving a replaced dataset."""
    return _open_dataset(opts)


def read_partition(opts: InputOptions, part: InputPartition) -> InputRows:
    """The partition's rows, numbered as in the whole input (same values as `load_rows`)."""
    path = Path(opts.path)
    if part.format == "jsonl":
        return read_jsonl_range(
            part.file,
            part.start,
            part.stop,
            start=part.first_row,
            newlines_before=part.newlines_before,
            limit=part.num_rows,
        )
    if part.format == "parquet":
        with open_parquet(part.file) as pf:
            md = pf.metadata
            ends = np.cumsum([md.row_group(g).num_rows for g in range(md.num_row_groups)])
            lo, hi = part.start, part.start + part.num_rows
            g0 = int(np.searchsorted(ends, lo, side="right"))
            g1 = int(np.searchsorted(ends, hi, side="left"))
            table = pf.read_row_groups(list(range(g0, g1 + 1)))
        offset = lo - (int(ends[g0 - 1]) if g0 > 0 else 0)
        rows = table.slice(offset, hi - lo).to_pylist()
        return InputRows(rows=rows, source=path.name, start=part.first_row)
    ds = _dataset(opts)
    rows = ds.select(range(part.start, part.start + part.num_rows)).to_list()
    return InputRows(rows=rows, source=path.name or opts.path, start=part.first_row)
