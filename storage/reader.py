"""Read logit shard sets back as flat numpy arrays, decoded and checksum-verified.

Arrow stores ``topk_*`` as list<fixed_size_list<V, k>>: one contiguous value buffer plus row
offsets. Decoding is therefore a few zero-copy views and one vectorised codec call per shard;
no Python code touches individual tokens.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.layout import ShardSetLayout
from storage.manifest import DoneRecord, Plan, read_done, read_plan, verify_shard
from storage.schema import FORMAT_VERSION, ShardSetMetadata, read_metadata
from storage.sparse_codecs import SparseCodec, SparseEntries


class IncompleteShardSetError(RuntimeError):
    """``strict=True`` and some planned shard has no valid completion record."""


class ShardCorruptedError(RuntimeError):
    """A shard's bytes or footer disagree with its completion record or the plan."""


def ragged_gather(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ranges ``starts[i] : starts[i] + lengths[i]``, concatenated, and the
    offsets [R+1] of each range in the result: the one vectorised gather behind every row
    selection (no Python loop over rows or tokens)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1]), offsets


@dataclass
class LogitBatch:
    """R rows with T positions in total, flattened in row order."""

    ids: list[str]  # [R]
    row_offsets: np.ndarray  # int64 [R+1]; row i is positions row_offsets[i]:row_offsets[i+1]
    input_ids: np.ndarray  # int32 [T]
    prompt_len: np.ndarray  # int32 [R]
    topk_ids: np.ndarray  # int32 [T, k]
    topk_logprobs: np.ndarray  # float32 [T, k], decoded
    next_logprob: np.ndarray  # float32 [T]; NaN at each row's last position
    # float32 [T]: the sampling policy's logprob of token j+1 at position j (scored rollouts;
    # NaN where there is none); None for sets without rollout columns.
    policy_logprob: np.ndarray | None = None
    # The string each row's tokens were cut from and their UTF-8 byte spans int32 [T] (widened
    # to whole characters, as the prompt stage stores them): what aligning the rows to another
    # tokenizer needs. None where the batch was built without them.
    text: list[str] | None = None
    byte_start: np.ndarray | None = None
    byte_end: np.ndarray | None = None
    # bool [R]: the prompt stage cut the row to fit the context (its tokens then cover only a
    # prefix of ``text``), the shard's ``truncated`` column. None where the batch was built
    # without it: no row is known to be truncated.
    truncated: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
        return int(self.row_offsets[-1])

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    def take(self, rows: np.ndarray) -> LogitBatch:
        """The rows ``rows`` (any order, repeats allowed) as a new contiguous batch.

        One ragged gather (:func:`ragged_gather`), never a loop per token.
        """
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.row_offsets[rows]
        positions, offsets = ragged_gather(starts, self.row_offsets[rows + 1] - starts)
        return LogitBatch(
            ids=[self.ids[i] for i in rows.tolist()],
            row_offsets=offsets,
            input_ids=self.input_ids[positions],
            prompt_len=self.prompt_len[rows],
            topk_ids=self.topk_ids[positions],
            topk_logprobs=self.topk_logprobs[positions],
            next_logprob=self.next_logprob[positions],
            policy_logprob=None if self.policy_logprob is None else self.policy_logprob[positions],
            text=None if self.text is None else [self.text[i] for i in rows.tolist()],
            byte_start=None if self.byte_start is None else self.byte_start[positions],
            byte_end=None if self.byte_end is None else self.byte_end[positions],
            truncated=None if self.truncated is None else self.truncated[rows],
        )

    def head(self, counts: np.ndarray) -> LogitBatch:
        """The first ``counts[i]`` positions of each row i (``counts`` <= the row lengths;
        the batch itself when that is every position).

        Cut rows are marked ``truncated``, and their new last position gets the NaN that
        every row's last position holds (``next_logprob``, ``policy_logprob``): the token it
        scored is gone. ``text`` is kept whole, as the prompt stage keeps a truncated row's.
        """
        counts = np.asarray(counts, dtype=np.int64)
        lengths = np.diff(self.row_offsets)
        if counts.shape != lengths.shape or (counts < 0).any() or (counts > lengths).any():
            raise ValueError("head needs 0 <= counts[i] <= the length of row i, for every row")
        cut = counts < lengths
        if not cut.any():
            return self
        positions, offsets = ragged_gather(self.row_offsets[:-1], counts)
        last = offsets[1:][cut & (counts > 0)] - 1

        def per_position(values: np.ndarray | None) -> np.ndarray | None:
            if values is None:
                return None
            out = values[positions]
            out[last] = np.nan
            return out

        return replace(
            self,
            row_offsets=offsets,
            input_ids=self.input_ids[positions],
            prompt_len=np.minimum(self.prompt_len, counts).astype(self.prompt_len.dtype),
            topk_ids=self.topk_ids[positions],
            topk_logprobs=self.topk_logprobs[positions],
            next_logprob=per_position(self.next_logprob),
            policy_logprob=per_position(self.policy_logprob),
            byte_start=None if self.byte_start is None else self.byte_start[positions],
            byte_end=None if self.byte_end is None else self.byte_end[positions],
            truncated=self.truncated_rows() | cut,
        )

    def truncated_rows(self) -> np.ndarray:
        """``truncated``, or all False for a batch built without it."""
        return np.zeros(self.num_rows, bool) if self.truncated is None else self.truncated

    def policy_logprobs(self) -> np.ndarray:
        """``policy_logprob``, or all NaN for rows without rollout columns."""
        if self.policy_logprob is None:
            return np.full(self.num_tokens, np.nan, dtype=np.float32)
        return self.policy_logprob

    @classmethod
    def concat(cls, batches: list[LogitBatch]) -> LogitBatch:
        """Rows of ``batches`` one after the other (all must have the same k)."""
        if len(batches) == 1:
            return batches[0]
        if len({b.k for b in batches}) > 1:
            raise ValueError(
                f"cannot concatenate batches with different k: {[b.k for b in batches]}"
            )
        ends = np.cumsum([0] + [b.num_tokens for b in batches])
        offsets = np.concatenate(
            [np.zeros(1, np.int64)]
            + [b.row_offsets[1:] + e for b, e in zip(batches, ends, strict=False)]
        )
        return cls(
            ids=[i for b in batches for i in b.ids],
            row_offsets=offsets,
            input_ids=np.concatenate([b.input_ids for b in batches]),
            prompt_len=np.concatenate([b.prompt_len for b in batches]),
            topk_ids=np.concatenate([b.topk_ids for b in batches]),
            topk_logprobs=np.concatenate([b.topk_logprobs for b in batches]),
            next_logprob=np.concatenate([b.next_logprob for b in batches]),
            policy_logprob=np.concatenate([b.policy_logprobs() for b in batches])
            if any(b.policy_logprob is not None for b in batches)
            else None,
            # Text and byte spans survive only when every part has them.
            text=None
            if any(b.text is None for b in batches)
            else [t for b in batches for t in b.text],  # type: ignore[union-attr]
            byte_start=_concat_all([b.byte_start for b in batches]),
            byte_end=_concat_all([b.byte_end for b in batches]),
            # A part without the column has no row known to be truncated.
            truncated=np.concatenate([b.truncated_rows() for b in batches])
            if any(b.truncated is not None for b in batches)
            else None,
        )

    def row(self, i: int) -> dict[str, Any]:
        """Views (not copies) of row ``i``'s slices."""
        a, b = int(self.row_offsets[i]), int(self.row_offsets[i + 1])
        return {
            "id": self.ids[i],
            "input_ids": self.input_ids[a:b],
            "prompt_len": int(self.prompt_len[i]),
            "topk_ids": self.topk_ids[a:b],
            "topk_logprobs": self.topk_logprobs[a:b],
            "next_logprob": self.next_logprob[a:b],
            "policy_logprob": self.policy_logprobs()[a:b],
        }


def _concat_all(parts: list[np.ndarray | None]) -> np.ndarray | None:
    return None if any(p is None for p in parts) else np.concatenate(parts)  # type: ignore[arg-type]


def _array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _offsets(arr: pa.ListArray, name: str) -> np.ndarray:
    if arr.null_count:
        raise ValueError(f"column {name} has null rows")
    offsets = arr.offsets.to_numpy().astype(np.int64)
    if offsets.size == 0:  # Arrow allows an empty offsets buffer for zero rows
        return np.zeros(1, dtype=np.int64)
    return offsets - offsets[0]


def _nested_values(table: pa.Table, name: str, k: int, offsets: np.ndarray) -> np.ndarray:
    """list<fixed_size_list<V, k>> column -> numpy [T, k], checking it matches ``offsets``."""
    arr = _array(table.column(name))
    if not np.array_equal(_offsets(arr, name), offsets):
        raise ValueError(f"column {name} has different row lengths than input_ids")
    inner = arr.flatten()
    if inner.type.list_size != k:
        raise ValueError(f"column {name} has k={inner.type.list_size}, metadata says k={k}")
    if inner.null_count:
        raise ValueError(f"column {name} has null positions")
    values = inner.flatten()
    if values.null_count:
        raise ValueError(f"column {name} has null values")
    return values.to_numpy(zero_copy_only=False).reshape(-1, k)


def _per_position(table: pa.Table, name: str, offsets: np.ndarray) -> pa.Array:
    """A ``list<X>`` column's per-position values, checking it matches ``offsets``."""
    arr = _array(table.column(name))
    if not np.array_equal(_offsets(arr, name), offsets):
        raise ValueError(f"column {name} has different row lengths than input_ids")
    inner = arr.flatten()
    if inner.null_count:
        raise ValueError(f"column {name} has null positions")
    return inner


def _sparse_entries(table: pa.Table, codec: SparseCodec, offsets: np.ndarray) -> SparseEntries:
    """The entries a sparse codec stored: ``list<list<V>>`` columns with equal inner lengths."""
    ids = _per_position(table, "topk_ids", offsets)
    values = _per_position(table, "topk_logprobs", offsets)
    counts = _offsets(ids, "topk_ids")
    if not np.array_equal(counts, _offsets(values, "topk_logprobs")):
        raise ValueError("columns topk_ids and topk_logprobs store different entries")
    extra = {
        f.name: _per_position(table, f.name, offsets).to_numpy(zero_copy_only=False)
        for f in codec.extra_fields
    }
    return SparseEntries(
        counts=np.diff(counts).astype(np.int32),
        id_deltas=_numpy(ids.flatten(), np.int32),
        values=values.flatten().to_numpy(zero_copy_only=False),
        extra=extra,
    )


def _numpy(arr: pa.Array, dtype: type) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def decode_logit_table(table: pa.Table, metadata: ShardSetMetadata) -> LogitBatch:
    """Flatten a logit table into a :class:`LogitBatch`, decoding ``topk_logprobs``."""
    codec = metadata.make_codec()
    input_ids = _array(table.column("input_ids"))
    offsets = _offsets(input_ids, "input_ids")
    next_lp = _array(table.column("next_logprob"))
    if not np.array_equal(_offsets(next_lp, "next_logprob"), offsets):
        raise ValueError("column next_logprob has different row lengths than input_ids")
    if isinstance(codec, SparseCodec):
        topk_ids, topk_logprobs = codec.decode_entries(
            _sparse_entries(table, codec, offsets), metadata.k
        )
    else:
        topk_ids = _nested_values(table, "topk_ids", metadata.k, offsets).astype(np.int32)
        topk_logprobs = codec.decode(_nested_values(table, "topk_logprobs", metadata.k, offsets))
    policy_lp = None
    if "policy_logprob" in table.column_names:
        column = _array(table.column("policy_logprob"))
        if not np.array_equal(_offsets(column, "policy_logprob"), offsets):
            raise ValueError("column policy_logprob has different row lengths than input_ids")
        policy_lp = _numpy(column.flatten(), np.float32)
    spans = {}
    for name in ("byte_start", "byte_end"):
        column = _array(table.column(name))
        if not np.array_equal(_offsets(column, name), offsets):
            raise ValueError(f"column {name} has different row lengths than input_ids")
        spans[name] = _numpy(column.flatten(), np.int32)
    return LogitBatch(
        ids=table.column("id").to_pylist(),
        row_offsets=offsets,
        input_ids=_numpy(input_ids.flatten(), np.int32),
        prompt_len=_numpy(_array(table.column("prompt_len")), np.int32),
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        next_logprob=_numpy(next_lp.flatten(), np.float32),
        policy_logprob=policy_lp,
        text=table.column("text").to_pylist(),
        **spans,
        truncated=_numpy(_array(table.column("truncated")), bool)
        if "truncated" in table.column_names
        else None,
    )


@dataclass
class ShardSet:
    """A shard set opened for reading. Only shards with a valid completion record exist."""

    layout: ShardSetLayout
    plan: Plan
    _metadata: ShardSetMetadata | None = field(default=None, repr=False)

    @classmethod
    def open(cls, url: str, **storage_options: Any) -> ShardSet:
        layout = ShardSetLayout.from_url(url, **storage_options)
        plan = read_plan(layout)
        if plan is None:
            raise FileNotFoundError(
                f"{layout.url} is not a logitforge shard set: no .logitforge/plan.json"
            )
        if plan.format_version > FORMAT_VERSION:
            raise ValueError(
                f"plan format_version {plan.format_version} is newer than this logitforge "
                f"understands ({FORMAT_VERSION})"
            )
        return cls(layout=layout, plan=plan)

    def check(self, check_sha256: bool = True) -> dict[int, str]:
        """Reason per planned shard ("ok" when valid)."""
        return {
            i: verify_shard(self.layout, self.plan, i, check_sha256)[1]
            for i in range(self.plan.num_shards)
        }

    def _valid_indices(self, strict: bool, check_sha256: bool) -> list[int]:
        reasons = self.check(check_sha256)
        bad = {i: r for i, r in reasons.items() if r != "ok"}
        if strict and bad:
            shown = "; ".join(f"{self.plan.shard(i).name}: {r}" for i, r in list(bad.items())[:5])
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise IncompleteShardSetError(
                f"{len(bad)} of {self.plan.num_shards} shards are not complete: {shown}{more}"
            )
        return [i for i in reasons if i not in bad]

    def shard_paths(self, strict: bool = False, check_sha256: bool = True) -> list[str]:
        """Paths (without protocol) of complete, intact shards, in plan order."""
        return [
            self.layout.data_file(self.plan.shard(i).name)
            for i in self._valid_indices(strict, check_sha256)
        ]

    def done_records(self) -> list[DoneRecord]:
        return [r for i in range(self.plan.num_shards) if (r := read_done(self.layout, i))]

    @property
    def metadata(self) -> ShardSetMetadata:
        """Metadata from the footer of the first complete shard."""
        if self._metadata is None:
            for path in self.shard_paths(check_sha256=False):
                try:
                    with self.layout.fs.open(path, "rb") as f:
                        self._metadata = read_metadata(pq.read_schema(f))
                    break
                except (pa.ArrowException, ValueError, OSError):
                    continue  # a damaged footer; reading that shard will report it
            else:
                raise ValueError(f"{self.layout.url} has no readable complete shards")
        return self._metadata

    def _read_shard(self, index: int) -> pa.Table:
        """Read shard bytes once, verify them against the record, then parse them."""
        record = read_done(self.layout, index)
        path = self.layout.data_file(self.plan.shard(index).name)
        data = self.layout.fs.cat_file(path)
        if record is None or hashlib.sha256(data).hexdigest() != record.sha256:
            raise ShardCorruptedError(f"{path}: sha256 mismatch, shard corrupted or replaced")
        table = pq.read_table(pa.BufferReader(data))
        meta = read_metadata(table.schema)
        if meta.plan_fingerprint != self.plan.fingerprint:
            raise ShardCorruptedError(f"{path}: written for another plan")
        if self._metadata is None:
            self._metadata = meta
        expected = self._metadata
        if (meta.codec, meta.codec_params, meta.k) != (
            expected.codec,
            expected.codec_params,
            expected.k,
        ):
            raise ShardCorruptedError(f"{path}: codec or k differ from the first shard")
        return table

    def complete_indices(self, strict: bool = False) -> list[int]:
        """Plan indices of the shards with a valid completion record (sha256 checked on read)."""
        return self._valid_indices(strict, check_sha256=False)

    def read_shard(self, index: int) -> LogitBatch:
        """Shard ``index`` decoded; raises :class:`ShardCorruptedError` if its bytes are bad."""
        return decode_logit_table(self._read_shard(index), self.metadata)

    def iter_tables(self, strict: bool = False) -> Iterator[pa.Table]:
        """One verified Arrow table per complete shard. Corrupt shards raise if ``strict``,
        else are skipped with a warning (never read silently)."""
        for i in self._valid_indices(strict, check_sha256=False):
            try:
                yield self._read_shard(i)
            except ShardCorruptedError as e:
                if strict:
                    raise
                warnings.warn(f"skipping shard: {e}", RuntimeWarning, stacklevel=2)

    def iter_batches(self, strict: bool = False) -> Iterator[LogitBatch]:
        """One decoded :class:`LogitBatch` per complete shard, in plan order."""
        for table in self.iter_tables(strict):
            yield decode_logit_table(table, self.metadata)

    def read_table(self, strict: bool = False) -> pa.Table:
        tables = list(self.iter_tables(strict))
        if not tables:
            raise ValueError(f"{self.layout.url} has no complete shards to read")
        return pa.concat_tables(tables)

    def to_batch(self, strict: bool = False) -> LogitBatch:
        return decode_logit_table(self.read_table(strict), self.metadata)
