"""Sparse codecs: a variable number of top-k entries per position, for compact logit caches.

A value codec (``fp32``/``fp16``/``q8``) keeps all k entries of every position with int32 ids:
at k = 64 that is at least 256 B/token of ids alone. A trained teacher is peaked: most of
its top-64 entries carry almost no probability, and a few hundred bytes per token buy
nothing a student can learn from. A sparse codec stores only the entries that matter, and
decodes to the same logical ``[T, k]`` arrays as every other codec (ids and raw logprobs,
highest first), with the entries it did not store as padding (id 0, logprob ``-inf``), which
every loss already treats as zero mass. The mass they had is not lost: it is the teacher's
rest mass, ``1 - sum(exp(topk_logprobs))``, which the ``tail="rest"`` losses use.

Physical layout (per row, one inner list per position; see ``storage/README.md``):

- ``topk_ids``: ``list<list<int32>>``, the stored ids of a position in increasing order,
  delta coded: the first id as is, then the gaps to the previous one (small numbers that
  Parquet's zstd packs into about a byte each).
- ``topk_logprobs``: ``list<list<uint8>>``, one code per stored id (same order).
- ``topk_rest`` (``compact`` only): ``list<float16>``, log of the mass outside the stored
  entries.

``compact`` (``drop_mass``, ``min_logprob``): per position, drops the least probable entries
while their summed probability stays <= ``drop_mass`` (and entries below ``min_logprob``),
quantises the kept logprobs to uint8 over ``[min_logprob, 0]``, and stores the rest mass in
float16. The decoder rescales the kept entries so that they sum to ``1 - rest``: quantisation
then moves mass only among the kept entries, and the rest mass stays exact to fp16.

``sampled`` (``samples``, ``seed``): Sparse Logit Sampling (Anshumann et al., 2025). Draws
``samples`` tokens per position from the teacher's distribution over its top-k plus the rest
bucket, and stores the distinct ids with their counts. Decoded, a sampled id has
probability ``count / samples`` and the rest bucket ``rest_count / samples``: an unbiased
estimate of the T = 1 teacher distribution (E[decoded] = exact), not a close one per
position. Its draws are seeded from the codec's ``seed`` and the data itself, so a retried
shard is byte-identical.

Everything is vectorised over positions and entries: no Python loop per token or entry.
"""

from __future__ import annotations

import math
import zlib
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from storage.codecs import Codec


@dataclass(frozen=True)
class SparseEntries:
    """What a sparse codec stores for T positions: ``counts[t]`` entries for position t."""

    counts: np.ndarray  # int32 [T]
    id_deltas: np.ndarray  # int32 [E], E = counts.sum(); first id of a position, then gaps
    values: np.ndarray  # codec value type [E]
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # per-position columns [T]


class SparseCodec(Codec):
    """Stores a variable number of entries per position; decodes to padded ``[T, k]``."""

    sparse = True
    value_type: ClassVar[pa.DataType]
    extra_fields: ClassVar[tuple[pa.Field, ...]] = ()

    def encode_entries(self, topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> SparseEntries:
        """int ``[T, k]`` ids and float32 ``[T, k]`` logprobs -> the entries to store."""
        ids = np.asarray(topk_ids)
        lp = np.asarray(topk_logprobs, dtype=np.float32)
        if ids.shape != lp.shape or ids.ndim != 2:
            raise ValueError(f"topk ids {ids.shape} and logprobs {lp.shape} must both be [T, k]")
        keep, values, extra = self._select(ids, lp)
        # Kept entries of each position in increasing id order; dropped ones sort last.
        sentinel = np.iinfo(np.int64).max
        order = np.argsort(np.where(keep, ids.astype(np.int64), sentinel), axis=1, kind="stable")
        counts = keep.sum(axis=1).astype(np.int32)
        first = np.arange(ids.shape[1]) < counts[:, None]  # the kept prefix after sorting
        flat_ids = np.take_along_axis(ids, order, axis=1)[first].astype(np.int64)
        flat_values = np.take_along_axis(values, order, axis=1)[first]
        deltas = np.diff(flat_ids, prepend=0)
        starts = _starts(counts)
        deltas[starts[counts > 0]] = flat_ids[starts[counts > 0]]
        return SparseEntries(counts, deltas.astype(np.int32), flat_values, extra)

    def decode_entries(self, entries: SparseEntries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored entries -> ids int32 ``[T, k]`` and raw logprobs float32 ``[T, k]``,
        highest logprob first, unstored entries as (0, ``-inf``)."""
        counts = np.asarray(entries.counts, dtype=np.int64)
        if counts.size and (counts.min() < 0 or counts.max() > k):
            raise ValueError(f"a position stores {counts.max()} entries, more than k={k}")
        n = counts.size
        starts = _starts(counts)
        total = int(counts.sum())
        if len(entries.id_deltas) != total or len(entries.values) != total:
            raise ValueError(
                f"{total} entries expected from the counts, got {len(entries.id_deltas)} ids "
                f"and {len(entries.values)} values"
            )
        # Undo the delta coding: a running sum restarted at each position's first entry.
        deltas = np.asarray(entries.id_deltas, dtype=np.int64)
        running = np.cumsum(deltas)
        base = np.zeros(n, dtype=np.int64)
        stored = counts > 0
        base[stored] = running[starts[stored]] - deltas[starts[stored]]
        flat_ids = running - np.repeat(base, counts)
        rows = np.repeat(np.arange(n), counts)
        cols = np.arange(total) - np.repeat(starts, counts)
        ids = np.zeros((n, k), dtype=np.int32)
        lp = np.full((n, k), -np.inf, dtype=np.float32)
        ids[rows, cols] = flat_ids
        lp[rows, cols] = self._logprobs(entries.values)
        lp = self._finish(lp, entries.extra)
        order = np.argsort(-lp, axis=1, kind="stable")
        return np.take_along_axis(ids, order, axis=1), np.take_along_axis(lp, order, axis=1)

    @abstractmethod
    def _select(
        self, ids: np.ndarray, lp: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(keep bool [T, k], stored value per entry [T, k], per-position extras)."""

    @abstractmethod
    def _logprobs(self, values: np.ndarray) -> np.ndarray:
        """Stored values [E] -> float32 logprobs before `_finish`."""

    def _finish(self, lp: np.ndarray, extra: dict[str, np.ndarray]) -> np.ndarray:
        """Per-position adjustment of the decoded ``[T, k]`` logprobs (padding is -inf)."""
        return lp


def _starts(counts: np.ndarray) -> np.ndarray:
    """Offset of each position's first entry in the flat arrays."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _log_rest(p: np.ndarray) -> np.ndarray:
    """log(1 - sum(p)) per row in float64, -inf where the rows cover all the mass."""
    rest = np.clip(1.0 - p.sum(axis=1, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        return np.log(rest)


class CompactCodec(SparseCodec):
    """Drop the entries that carry (almost) no mass, uint8 logprobs, exact rest mass."""

    name = "compact"
    value_type = pa.uint8()
    extra_fields = (pa.field("topk_rest", pa.list_(pa.float16())),)
    levels: ClassVar[int] = 255

    def __init__(self, drop_mass: float = 1e-4, min_logprob: float = -16.0) -> None:
        drop_mass, min_logprob = float(drop_mass), float(min_logprob)
        if not 0.0 <= drop_mass < 1.0:
            raise ValueError(f"compact drop_mass must be in [0, 1), got {drop_mass}")
        if not math.isfinite(min_logprob) or min_logprob >= 0.0:
            raise ValueError(f"compact min_logprob must be finite and < 0, got {min_logprob}")
        self.drop_mass = drop_mass
        self.min_logprob = min_logprob
        self._table = np.linspace(min_logprob, 0.0, self.levels + 1).astype(np.float32)

    @property
    def params(self) -> dict[str, Any]:
        return {"drop_mass": self.drop_mass, "min_logprob": self.min_logprob}

    def _select(self, ids, lp):
        p = np.exp(lp.astype(np.float64))  # -inf and NaN padding -> 0 / NaN
        p = np.nan_to_num(p, nan=0.0)
        # Mass at or below each entry, in decreasing-probability order: an entry is dropped
        # when it and every smaller one together carry at most drop_mass.
        order = np.argsort(-p, axis=1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=1)
        below = np.cumsum(sorted_p[:, ::-1], axis=1)[:, ::-1]
        keep_sorted = below > self.drop_mass
        keep_sorted[:, 0] = sorted_p[:, 0] > 0  # the top entry always stays (if real)
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        keep &= lp >= self.min_logprob
        keep[np.arange(len(p)), order[:, 0]] |= sorted_p[:, 0] > 0
        codes = np.clip(lp, self.min_logprob, 0.0) - np.float32(self.min_logprob)
        codes = np.rint(np.nan_to_num(codes) * (self.levels / -self.min_logprob))
        log_rest = _log_rest(np.where(keep, p, 0.0)).astype(np.float16)
        return keep, codes.astype(np.uint8), {"topk_rest": log_rest}

    def _logprobs(self, values):
        return self._table[np.asarray(values, dtype=np.uint8)]

    def _finish(self, lp, extra):
        # Rescale the kept entries to carry exactly 1 - rest: quantisation error then only
        # moves mass among them, and the rest mass a "rest" loss sees is the stored one.
        log_rest = np.asarray(extra["topk_rest"], dtype=np.float64)
        kept_mass = -np.expm1(log_rest)  # 1 - rest, accurate for tiny rests
        with np.errstate(divide="ignore", invalid="ignore"):
            lse = np.log(np.exp(lp.astype(np.float64)).sum(axis=1))
            shift = np.where((kept_mass > 0) & np.isfinite(lse), np.log(kept_mass) - lse, 0.0)
        return (lp + shift[:, None]).astype(np.float32)


class SampledCodec(SparseCodec):
    """Sparse Logit Sampling: ``samples`` draws per position, stored as ids with counts."""

    name = "sampled"
    value_type = pa.uint8()

    def __init__(self, samples: int = 12, seed: int = 0) -> None:
        if isinstance(samples, bool) or int(samples) != samples or not 1 <= samples <= 255:
            raise ValueError(f"sampled samples must be an integer in [1, 255], got {samples}")
        self.samples = int(samples)
        self.seed = int(seed)

    @property
    def params(self) -> dict[str, Any]:
        return {"samples": self.samples, "seed": self.seed}

    def _rng(self, ids: np.ndarray, lp: np.ndarray) -> np.random.Generator:
        """Seeded by the data too: a retried shard draws the same tokens, byte for byte."""
        data = zlib.crc32(np.ascontiguousarray(lp).tobytes(), zlib.crc32(ids.tobytes()))
        return np.random.default_rng([self.seed, data])

    def _select(self, ids, lp):
        n, k = lp.shape
        p = np.nan_to_num(np.exp(lp.astype(np.float64)), nan=0.0)
        rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
        cdf = np.cumsum(np.concatenate([p, rest[:, None]], axis=1), axis=1)
        cdf /= cdf[:, -1:]
        # Inverse-CDF draws for every position at once: shifting row t's CDF (in [0, 1]) by
        # t makes the concatenation of all rows sorted, so one searchsorted serves them all.
        shift = np.arange(n, dtype=np.float64)[:, None]
        u = self._rng(ids, lp).random((n, self.samples)) + shift
        flat = np.searchsorted((cdf + shift).reshape(-1), u.reshape(-1), side="right")
        bucket = np.minimum(flat - np.repeat(np.arange(n) * (k + 1), self.samples), k)
        counts = np.bincount(
            np.repeat(np.arange(n) * (k + 1), self.samples) + bucket, minlength=n * (k + 1)
        ).reshape(n, k + 1)[:, :k]
        return counts > 0, counts.astype(np.uint8), {}

    def _logprobs(self, values):
        with np.errstate(divide="ignore"):
            return (np.log(np.asarray(values, dtype=np.float64)) - math.log(self.samples)).astype(
                np.float32
            )


SPARSE_CODECS: tuple[type[SparseCodec], ...] = (CompactCodec, SampledCodec)
