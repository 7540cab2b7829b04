"""Stream cached teacher logits into training batches.

A *source* is a logitforge shard set (checksums verified on every read) or plain Parquet
logit files, e.g. a dataset pulled from the Hub without its `.logitforge/` bookkeeping. The
dataset reads whole shards into a small shuffle buffer (``shuffle_shards``) and keeps decoded
shards in an LRU cache of ``cache_mb``, so memory stays bounded whatever the dataset size, and
yields ready-made batches:

    input_ids       int64 [B, L]   right-padded with ``pad_id``
    attention_mask  int64 [B, L]
    loss_mask       bool  [B, L]   positions trained on (they predict the next token)
    target_ids      int64 [B, L]   the next token at each position (-100 where there is none)
    topk_ids        int64 [B, L, k]  the teacher's top-k ids (k padded to the sources' max)
    topk_logprobs   float [B, L, k]  their raw logprobs (padding: -inf)
    next_logprob    float [B, L]   the teacher's logprob of the target token (NaN: none)
    policy_logprob  float [B, L]   the rollout policy's logprob of it (NaN: not a rollout)

With an `Aligner` (a student whose tokenizer differs from the cache's, or a span loss), each
shard is re-cut into the student's tokens once, when it is read, and batches carry one
teacher target per aligned span instead (`collate_aligned`): the alignment is cheap enough
to run in the loader (see README, "Cross-tokenizer distillation"), so no aligned copy of the
cache is written.

Every tensor has the batch dimension first, so accelerate can split or dispatch batches
across processes; the trainer gathers ``x[loss_mask]`` from logits and targets alike. Every
step is a vectorised scatter over flat arrays; nothing loops over tokens. Under a
multi-worker ``DataLoader`` each worker takes every n-th shard of the epoch's shuffled order.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stages.align.aligner import AlignedRows, Aligner
from storage.reader import LogitBatch, ShardSet, decode_logit_table, ragged_gather
from storage.schema import ShardSetMetadata, read_metadata

Rows = LogitBatch | AlignedRows


class SourceError(ValueError):
    """A training source cannot be used: named with the reason, raised before training."""


@dataclass
class LogitSource:
    """One dataset of logit shards, opened and checked, readable shard by shard."""

    url: str
    metadata: ShardSetMetadata
    num_shards: int
    _shard_set: ShardSet | None = field(default=None, repr=False)
    _files: list[str] = field(default_factory=list, repr=False)
    _fs: Any = field(default=None, repr=False)
    _indices: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def open(cls, url: str, strict: bool = True) -> LogitSource:
        """Open ``url``: a shard set folder, a folder of Parquet files, or one Parquet file."""
        fs, root = fsspec.core.url_to_fs(str(url))
        if fs.exists(f"{root.rstrip('/')}/.logitforge/plan.json"):
            shard_set = ShardSet.open(url)
            try:
                indices = shard_set.complete_indices(strict=strict)
            except RuntimeError as e:
                raise SourceError(f"{url}: {e}") from e
            if not indices:
                raise SourceError(f"{url}: the shard set has no complete shards")
            try:
                meta = shard_set.metadata
            except ValueError as e:
                raise SourceError(f"{url}: {e}") from e
            source = cls(url, meta, len(indices), _shard_set=shard_set, _indices=indices)
        else:
            if fs.isfile(root):
                files = [root]
            else:
                files = sorted(fs.glob(f"{root.rstrip('/')}/data/*.parquet")) or sorted(
                    fs.glob(f"{root.rstrip('/')}/*.parquet")
                )
            if not files:
                raise SourceError(
                    f"{url}: no shard set (.logitforge/plan.json) and no Parquet files"
                )
            try:
                with fs.open(files[0], "rb") as f:
                    meta = read_metadata(pq.read_schema(f))
            except ValueError as e:
                raise SourceError(f"{url}: {e}") from e
            source = cls(url, meta, len(files), _files=files, _fs=fs)
        if meta.kind == "rollout":
            raise SourceError(
                f"{url} is a rollout set: it has no teacher scores yet. Score it with "
                "`logitforge cache-teacher` (input.path set to it) and train on the result"
            )
        try:
            meta.make_codec()
        except ValueError as e:
            raise SourceError(f"{url}: {e}") from e
        return source

    def read(self, i: int) -> LogitBatch:
        """The i-th readable shard, decoded to float32."""
        if self._shard_set is not None:
            return self._shard_set.read_shard(self._indices[i])
        with self._fs.open(self._files[i], "rb") as f:
            table = pq.read_table(f)
        meta = read_metadata(table.schema)
        if (meta.codec, meta.codec_params, meta.k) != (
            self.metadata.codec,
            self.metadata.codec_params,
            self.metadata.k,
        ):
            raise SourceError(f"{self._files[i]}: codec or k differ from {self._files[0]}")
        return decode_logit_table(table, meta)

    @property
    def shard_set(self) -> ShardSet | None:
        """The shard set behind this source (None for plain Parquet files)."""
        return self._shard_set

    @property
    def num_rows(self) -> int | None:
        if self._shard_set is not None:
            return sum(self._shard_set.plan.shard(i).num_rows for i in self._indices)
        return None


def open_sources(
    urls: list[str], *, tokenizer_fingerprint: str | None = None, strict: bool = True
) -> list[LogitSource]:
    """Open and check every source before any training step runs.

    Refuses (with the source named): a missing or empty source, an unknown codec or format
    version, and, given ``tokenizer_fingerprint``, a cache made with another tokenizer than
    the student's.
    """
    if not urls:
        raise SourceError("no training sources given (data.sources is empty)")
    sources: list[LogitSource] = []
    for url in urls:
        try:
            sources.append(LogitSource.open(url, strict=strict))
        except (FileNotFoundError, ValueError) as e:
            raise SourceError(f"cannot use training source {url}: {e}") from e
    if tokenizer_fingerprint is not None:
        check_tokenizer(sources, tokenizer_fingerprint)
    return sources


def check_tokenizer(sources: list[LogitSource], tokenizer_fingerprint: str) -> None:
    """Refuse a source made with another tokenizer than the student's (ids would not match)."""
    for source in sources:
        fp = source.metadata.tokenizer_fingerprint
        if fp != tokenizer_fingerprint:
            raise SourceError(
                f"{source.url} was made with another tokenizer (fingerprint {fp}) than the "
                f"student's ({tokenizer_fingerprint}): its token ids are not the student's. "
                "Train across tokenizers with loss.kind uld or hybrid (or ce on the text)"
            )


def token_rows(ids: np.ndarray, lengths: np.ndarray, prompt_len: np.ndarray) -> LogitBatch:
    """Rows without teacher targets (k = 0) from a right-padded matrix [R, L] and lengths [R].

    What hard-label training on in-memory data (the embedded teacher's build) feeds `collate`.
    """
    mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    return LogitBatch(
        ids=[""] * len(lengths),
        row_offsets=offsets,
        input_ids=ids[mask],
        prompt_len=np.asarray(prompt_len),
        topk_ids=np.zeros((total, 0), dtype=np.int32),
        topk_logprobs=np.zeros((total, 0), dtype=np.float32),
        next_logprob=np.full(total, np.nan, dtype=np.float32),
    )


@dataclass(frozen=True)
class _Padded:
    """Selected rows' tokens as a right-padded matrix, and where each token came from.

    Unpacked, batch row b is selected row b. Packed, several rows share one sequence, each
    starting where the previous one ended, and ``position_ids`` restart at 0 for every row
    (and for the padding tail, which thereby is a segment of its own).
    """

    input_ids: np.ndarray  # int64 [S, L]
    attention_mask: np.ndarray  # int64 [S, L]
    position_ids: np.ndarray | None  # int64 [S, L], packed batches only
    src: np.ndarray  # [T] each token's index in the flat arrays
    row: np.ndarray  # [T] its selected row
    pos: np.ndarray  # [T] its position within that row
    seq: np.ndarray  # [T] the batch sequence it was placed in
    col: np.ndarray  # [T] its column there
    lengths: np.ndarray  # [R] the selected rows' lengths


def pack_rows(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """First-fit decreasing: (sequence, start column) per row, no sequence longer than width.

    The loop is over rows (a batch's worth), never over tokens. Rows are placed longest first,
    each in the first sequence with room, so a batch of mixed lengths needs about
    sum(lengths) / width sequences instead of one per row.
    """
    if len(lengths) and int(lengths.max()) > width:
        raise ValueError(f"a row of {int(lengths.max())} tokens does not fit {width}")
    seq = np.zeros(len(lengths), dtype=np.int64)
    start = np.zeros(len(lengths), dtype=np.int64)
    used = np.zeros(len(lengths), dtype=np.int64)  # at most one sequence per row
    count = 0
    for i in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero(used[:count] + lengths[i] <= width)
        s = int(fits[0]) if len(fits) else count
        count = max(count, s + 1)
        seq[i], start[i] = s, used[s]
        used[s] += lengths[i]
    return seq, start


def _pad_tokens(
    row_offsets: np.ndarray,
    flat_ids: np.ndarray,
    select: np.ndarray,
    pad_id: int,
    pack: bool = False,
) -> _Padded:
    """One gather and one scatter: the token matrix both collates start from."""
    starts = row_offsets[select]
    lengths = row_offsets[select + 1] - starts
    num_rows, width = len(select), int(lengths.max())
    src, offsets = ragged_gather(starts, lengths)
    row = np.repeat(np.arange(num_rows), lengths)
    pos = np.arange(offsets[-1]) - offsets[row]
    if pack:
        row_seq, row_start = pack_rows(lengths, width)
        seq, col = row_seq[row], row_start[row] + pos
        num_seqs = int(row_seq.max()) + 1
    else:
        seq, col, num_seqs = row, pos, num_rows
    input_ids = np.full((num_seqs, width), pad_id, dtype=np.int64)
    input_ids[seq, col] = flat_ids[src]
    attention_mask = np.zeros((num_seqs, width), dtype=np.int64)
    attention_mask[seq, col] = 1
    position_ids = None
    if pack:
        used = attention_mask.sum(axis=1)
        position_ids = np.maximum(np.arange(width)[None, :] - used[:, None], 0)
        position_ids[seq, col] = pos
    return _Padded(input_ids, attention_mask, position_ids, src, row, pos, seq, col, lengths)


def _token_tensors(
    tokens: _Padded, loss_mask: np.ndarray, targets: np.ndarray
) -> dict[str, torch.Tensor]:
    """The keys every batch has (and ``position_ids`` when packed)."""
    batch = {
        "input_ids": torch.from_numpy(tokens.input_ids),
        "attention_mask": torch.from_numpy(tokens.attention_mask),
        "loss_mask": torch.from_numpy(loss_mask),
        "target_ids": torch.from_numpy(targets),
    }
    if tokens.position_ids is not None:
        batch["position_ids"] = torch.from_numpy(tokens.position_ids)
    return batch


def collate(
    rows: LogitBatch,
    *,
    pad_id: int,
    include_prompt: bool = False,
    select: np.ndarray | None = None,
    pack: bool = False,
) -> dict[str, torch.Tensor]:
    """One training batch from the rows ``select`` of ``rows`` (default: all of them).

    Position j of a row of n tokens is trained when it has a next token (j < n - 1) and,
    unless ``include_prompt``, that token is a completion token (j >= prompt_len - 1). The
    selected rows are gathered straight into the padded tensors: one gather, one scatter.
    ``pack`` places several rows in one sequence (`pack_rows`) and adds ``position_ids``.
    """
    select = np.arange(rows.num_rows) if select is None else np.asarray(select, dtype=np.int64)
    tokens = _pad_tokens(rows.row_offsets, rows.input_ids, select, pad_id, pack)
    src, row, pos, lengths = tokens.src, tokens.row, tokens.pos, tokens.lengths
    seq, col = tokens.seq, tokens.col
    shape = tokens.input_ids.shape

    has_next = pos < lengths[row] - 1
    prompt_len = rows.prompt_len[select].astype(np.int64)
    first = np.zeros(len(select), dtype=np.int64) if include_prompt else prompt_len - 1
    trained = has_next & (pos >= first[row])
    loss_mask = np.zeros(shape, dtype=bool)
    loss_mask[seq[trained], col[trained]] = True
    # Position j's target is token j + 1 of the same row; positions without one keep -100.
    targets = np.full(shape, -100, dtype=np.int64)
    targets[seq[has_next], col[has_next]] = rows.input_ids[src[has_next] + 1]
    batch = _token_tensors(tokens, loss_mask, targets)
    # Logprobs of each position's target token: the teacher's (stored for every row) and the
    # sampling policy's (rollouts only); the on-policy loss reads both.
    for name, values in (
        ("next_logprob", rows.next_logprob),
        ("policy_logprob", rows.policy_logprobs()),
    ):
        padded = np.full(shape, np.nan, dtype=np.float32)
        padded[seq, col] = values[src]
        batch[name] = torch.from_numpy(padded)
    if rows.k > 0:
        topk_ids = np.zeros((*shape, rows.k), dtype=np.int64)
        topk_lps = np.full((*shape, rows.k), -np.inf, dtype=np.float32)
        topk_ids[seq, col] = rows.topk_ids[src]
        topk_lps[seq, col] = rows.topk_logprobs[src]
        batch["topk_ids"] = torch.from_numpy(topk_ids)
        batch["topk_logprobs"] = torch.from_numpy(topk_lps)
    return batch


def collate_aligned(
    rows: AlignedRows, *, pad_id: int, select: np.ndarray | None = None, pack: bool = False
) -> dict[str, torch.Tensor]:
    """A cross-tokenizer batch: student tokens, with teacher targets per aligned span.

    ``input_ids``, ``attention_mask``, ``target_ids`` and ``loss_mask`` are as in `collate`,
    in the student's tokens; a position is trained when the token it predicts lies in a
    trained span. ``span_start`` marks the position before each span's first student token;
    there, ``span_topk_ids`` / ``span_topk_logprobs`` [B, L, k] hold the teacher's top-k for
    the span's first teacher token and ``span_chain`` [B, L] the teacher's logprob of the
    span's other teacher tokens. Within ``x[loss_mask]`` (row-major), each span's positions
    are contiguous and its start comes first, so ``cumsum(span_start) - 1`` numbers the spans
    (packed or not: a row is contiguous within its sequence).
    """
    select = np.arange(rows.num_rows) if select is None else np.asarray(select, dtype=np.int64)
    tokens = _pad_tokens(rows.row_offsets, rows.input_ids, select, pad_id, pack)
    src, row, pos, lengths = tokens.src, tokens.row, tokens.pos, tokens.lengths
    shape = tokens.input_ids.shape

    has_next = pos < lengths[row] - 1
    here, r, c = src[has_next], tokens.seq[has_next], tokens.col[has_next]
    span = rows.span_offsets[select][row[has_next]] + rows.token_span[here + 1]  # predicted's
    trained = rows.span_trained[span]
    first = trained & (rows.token_span[here + 1] != rows.token_span[here])
    targets = np.full(shape, -100, dtype=np.int64)
    targets[r, c] = rows.input_ids[here + 1]
    loss_mask = np.zeros(shape, dtype=bool)
    loss_mask[r[trained], c[trained]] = True
    span_start = np.zeros(shape, dtype=bool)
    span_start[r[first], c[first]] = True
    topk_ids = np.zeros((*shape, rows.k), dtype=np.int64)
    topk_lps = np.full((*shape, rows.k), -np.inf, dtype=np.float32)
    chain = np.zeros(shape, dtype=np.float32)
    topk_ids[r[first], c[first]] = rows.topk_ids[span[first]]
    topk_lps[r[first], c[first]] = rows.topk_logprobs[span[first]]
    chain[r[first], c[first]] = rows.chain[span[first]]
    return {
        **_token_tensors(tokens, loss_mask, targets),
        "span_start": torch.from_numpy(span_start),
        "span_topk_ids": torch.from_numpy(topk_ids),
        "span_topk_logprobs": torch.from_numpy(topk_lps),
        "span_chain": torch.from_numpy(chain),
    }


class DistillDataset(IterableDataset):
    """Shuffled batches from logit sources: one epoch per iteration, or endless epochs.

    Decoded shards stay in an LRU cache of ``cache_mb`` (per worker process), so a dataset
    that fits is read and checksummed once, not once per epoch; larger ones stream.

    With ``repeat`` the stream never ends and epoch e + 1 follows epoch e (each shuffled with
    its own seed), so a trainer that counts steps, not epochs, resumes exactly by skipping the
    batches it already consumed: the stream is a pure function of (seed, position).
    """

    def __init__(
        self,
        sources: list[LogitSource],
        *,
        batch_size: int,
        pad_id: int,
        include_prompt: bool = False,
        shuffle: bool = True,
        shuffle_shards: int = 4,
        seed: int = 0,
        drop_last: bool = False,
        repeat: bool = False,
        cache_mb: int = 1024,
        aligner: Aligner | None = None,
        pack: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1 or shuffle_shards < 1:
            raise ValueError("batch_size and shuffle_shards must be >= 1")
        self.sources = sources
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.include_prompt = include_prompt
        self.shuffle = shuffle
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.drop_last = drop_last
        self.repeat = repeat
        self.pack = pack
        self.cache_bytes = cache_mb << 20
        # With an aligner, rows are re-cut by the student's tokenizer once per shard read;
        # rows that cannot be aligned are counted per shard (and reason) in align_drops.
        self.aligner = aligner
        self.align_drops: dict[tuple[int, int], Counter[str]] = {}
        self._cache: OrderedDict[tuple[int, int], Rows] = OrderedDict()
        self._cached = 0
        self.epoch = 0
        self.k = max(s.metadata.k for s in sources)
        self.shards = [(s, i) for s, source in enumerate(sources) for i in range(source.num_shards)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard_order(self, epoch: int) -> list[tuple[int, int]]:
        order = list(self.shards)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = [order[i] for i in rng.permutation(len(order))]
        info = get_worker_info()
        if info is not None:
            order = order[info.id :: info.num_workers]
        return order

    def _read(self, source: int, shard: int) -> Rows:
        """A decoded (and aligned) shard, from the in-memory cache when it fits the budget."""
        key = (source, shard)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        batch: Rows = _pad_k(self.sources[source].read(shard), self.k)
        if self.aligner is not None:
            batch, self.align_drops[key] = self.aligner.align(batch)
        size = _nbytes(batch)
        if size <= self.cache_bytes:
            self._cache[key] = batch
            self._cached += size
            while self._cached > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= _nbytes(old)
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id + 1
        epoch = self.epoch
        leftover: Rows | None = None
        concat = AlignedRows.concat if self.aligner is not None else LogitBatch.concat
        while True:
            rng = np.random.default_rng([self.seed, epoch, worker])
            order = self._shard_order(epoch)
            for start in range(0, len(order), self.shuffle_shards):
                group = [self._read(s, i) for s, i in order[start : start + self.shuffle_shards]]
                pool = concat(([leftover] if leftover is not None else []) + group)
                perm = rng.permutation(pool.num_rows) if self.shuffle else np.arange(pool.num_rows)
                full = pool.num_rows - pool.num_rows % self.batch_size
                for b in range(0, full, self.batch_size):
                    yield self._collate(pool, perm[b : b + self.batch_size])
                leftover = pool.take(perm[full:]) if full < pool.num_rows else None
            if not self.repeat:
                break
            epoch += 1  # the leftover rows open the next epoch's first batch
        if leftover is not None and not self.drop_last:
            yield self._collate(leftover, None)

    def _collate(self, pool: Rows, select: np.ndarray | None) -> dict[str, torch.Tensor]:
        if isinstance(pool, AlignedRows):
            return collate_aligned(pool, pad_id=self.pad_id, select=select, pack=self.pack)
        return collate(
            pool,
            pad_id=self.pad_id,
            include_prompt=self.include_prompt,
            select=select,
            pack=self.pack,
        )


class MixtureDataset(IterableDataset):
    """Each batch from one of several endless batch streams, chosen with given probabilities.

    GKD's lambda is this with two streams (on-policy rounds with probability lambda, a cached
    off-policy set otherwise). The choice for batch b is a pure function of (seed, worker, b),
    so the mixture resumes exactly like its streams do.
    """

    def __init__(self, datasets: list[IterableDataset], weights: list[float], seed: int = 0):
        super().__init__()
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("need one weight per dataset, and at least one dataset")
        w = np.asarray(weights, dtype=np.float64)
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {weights}")
        self.datasets = datasets
        self.probs = w / w.sum()
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        rng = np.random.default_rng([self.seed, 0 if info is None else info.id + 1, 7])
        # Streams that can never be chosen are not opened (no shard is read for them).
        streams = [
            iter(d) if p > 0 else None for d, p in zip(self.datasets, self.probs, strict=True)
        ]
        while True:
            choice = int(rng.choice(len(streams), p=self.probs))
            batch = next(streams[choice], None)  # type: ignore[arg-type]
            if batch is None:  # a finite stream ran out: the mixture ends with it
                return
            yield batch


def _nbytes(batch: Rows) -> int:
    return sum(v.nbytes for v in vars(batch).values() if isinstance(v, np.ndarray))


def _pad_k(batch: LogitBatch, k: int) -> LogitBatch:
    """Widen top-k to ``k`` with zero-mass entries (id 0, logprob -inf): sources may differ."""
    if batch.k == k:
        return batch
    pad = ((0, 0), (0, k - batch.k))
    return replace(
        batch,
        topk_ids=np.pad(batch.topk_ids, pad),
        topk_logprobs=np.pad(batch.topk_logprobs, pad, constant_values=-np.inf),
    )


class RowsDataset(IterableDataset):
    """Batches from in-memory rows, e.g. `token_rows` for the embedded teacher's build."""

    def __init__(
        self,
        rows: LogitBatch,
        *,
        batch_size: int,
        pad_id: int,
        include_prompt: bool = False,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.rows = rows
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.include_prompt = include_prompt
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = self.rows.num_rows
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(n)
            if self.shuffle
            else np.arange(n)
        )
        for b in range(0, n, self.batch_size):
            yield collate(
                self.rows,
                pad_id=self.pad_id,
                include_prompt=self.include_prompt,
                select=order[b : b + self.batch_size],
            )
