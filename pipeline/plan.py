"""Planning: freeze which prompt rows go to which shard, before any engine starts.

Planning reads and validates the whole input, tokenizes it with the teacher tokenizer and
writes one prompt shard per planned data shard, then the plan (written last, so a plan on disk
means its prompt shards are complete). Bad input therefore fails here, naming the row, and
never costs engine time. A rerun with the same fingerprint reuses the plan without reading the
input again (nor starting a cluster); a different fingerprint is refused unless the user asks
to overwrite.

Preparation runs as Dask tasks over input partitions (`stages.prompts.planning`): a counting
pass over JSONL byte ranges, one prepare task per partition, one duplicate-id check per id
bucket, one task per run of prompt shards. The driver only holds per-partition and per-shard
summaries, never rows or ids. Partitions follow the input alone, and a prompt shard's bytes do
not depend on them, so the plan is the same on any cluster size (and in-process, without one).
"""

from __future__ import annotations

import math
import posixpath
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed import Client

from pipeline.config import ShardJobConfig, describe_difference, fingerprint
from stages.prompts import input_fingerprint, tokenizer_fingerprint
from stages.prompts.partition import PARTITION_BYTES, PARTITION_ROWS, assign_rows, split_input
from stages.prompts.planning import (
    CutPart,
    CutSpec,
    PlanContext,
    TokenizerSpec,
    bucket_task,
    count_task,
    cut_task,
    error_from_json,
    prepare_task,
    remember_tokenizer,
    write_rows,
)
from stages.prompts.shard_input import is_shard_set, read_shard_set_rows, shard_set_fingerprint
from stages.teacher.engine import EngineLimitError
from storage.layout import ShardSetLayout
from storage.manifest import Plan, PlanMismatchError, ShardPlan, read_plan, utc_now, write_plan
from storage.schema import FORMAT_VERSION
from storage.writer import sha256_file

# Ids per duplicate-check bucket (the bucket count follows the input's size, never the
# cluster's), and kept rows per prompt-cutting task.
BUCKET_ROWS = 500_000
MAX_BUCKETS = 256
CUT_ROWS = 32_768

# Runs one task function over a list of argument tuples, results in order.
Runner = Callable[[Callable[..., Any], list[tuple]], list[Any]]


class EmptyInputError(ValueError):
    """No row of the input survived validation: nothing to send to the teacher."""


@dataclass(frozen=True)
class PlanOutcome:
    plan: Plan
    reused: bool  # True: an existing plan with the same fingerprint was kept
    tokenizer_fingerprint: str


def load_tokenizer(cfg: ShardJobConfig) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        cfg.teacher.tokenizer_path,
        revision=cfg.teacher.revision,
        trust_remote_code=cfg.teacher.trust_remote_code,
    )


def max_row_tokens(cfg: ShardJobConfig) -> int:
    """Tokens a row may have: the context minus one, as the teacher predicts one token past it.

    Reads the teacher's config only (no weights). It also checks k against the vocabulary, so
    a k the engine cannot serve fails before any cluster starts.
    """
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(
        cfg.teacher.model,
        revision=cfg.teacher.revision,
        trust_remote_code=cfg.teacher.trust_remote_code,
    )
    text_config = model_config.get_text_config()
    vocab_size = int(text_config.vocab_size)
    if cfg.teacher.k > vocab_size:
        raise EngineLimitError(
            f"teacher.k={cfg.teacher.k} exceeds the vocabulary of {cfg.teacher.model} "
            f"({vocab_size} tokens)"
        )
    context = cfg.teacher.max_model_len or int(text_config.max_position_embeddings)
    limit = context - 1
    if cfg.prompts.max_length is not None:
        limit = min(limit, cfg.prompts.max_length)
    return limit


def plan_fingerprint(cfg: ShardJobConfig, input_fp: str, tokenizer_fp: str, max_len: int) -> str:
    return fingerprint(
        {
            "format_version": FORMAT_VERSION,
            "config": cfg.output_defining(),
            "input_fingerprint": input_fp,
            "tokenizer_fingerprint": tokenizer_fp,
            "max_length": max_len,
        }
    )


def clear_shard_set(layout: ShardSetLayout) -> None:
    """Remove what a previous run wrote (data, bookkeeping, card); nothing else in the folder."""
    fs = layout.fs
    for path in (layout.data_dir, layout.meta_dir):
        if fs.exists(path):
            fs.rm(path, recursive=True)
    if fs.exists(layout.card_path()):
        fs.rm(layout.card_path())


def _prompt_shards_intact(layout: ShardSetLayout, plan: Plan) -> bool:
    """Whether every prompt shard is in place with its planned size: one folder listing, no
    reads (shard tasks check the sha256 of what they read). Plans written before sizes were
    recorded fall back to hashing."""
    fs = layout.fs
    if not fs.exists(layout.prompts_dir):
        return not plan.shards
    sizes = {
        posixpath.basename(entry["name"]): entry["size"]
        for entry in fs.ls(layout.prompts_dir, detail=True)
    }
    for shard in plan.shards:
        path = layout.prompts_path(shard.index)
        size = sizes.get(posixpath.basename(path))
        if size is None:
            return False
        if shard.prompts_bytes is None:
            if sha256_file(fs, path) != shard.prompts_sha256:
                return False
        elif size != shard.prompts_bytes:
            return False
    return True


def _in_process(fn: Callable[..., Any], calls: list[tuple]) -> list[Any]:
    """Without a cluster (tests, small jobs): the same task functions, in order."""
    return [fn(*args) for args in calls]


def _on_dask(client: Client) -> Runner:
    def run(fn: Callable[..., Any], calls: list[tuple]) -> list[Any]:
        if not calls:
            return []
        columns = [list(a) for a in zip(*calls, strict=True)]
        return client.gather(client.map(fn, *columns, pure=False))

    return run


@dataclass
class _Prepared:
    """What planning knows after preparation: O(partitions), no rows."""

    input_kind: str
    num_input_rows: int
    num_pre: np.ndarray  # [P] rows in each partition's work file
    kept: np.ndarray  # [P] of those, kept after dropping later duplicates
    drop_buckets: dict[int, list[int]] = field(default_factory=dict)  # partition -> buckets
    skipped: dict[str, int] = field(default_factory=dict)
    num_truncated: int = 0
    num_tokens: int = 0


def _prepare_rows(
    cfg: ShardJobConfig,
    spec: TokenizerSpec,
    max_len: int,
    work_url: str,
    run: Runner,
    partition_bytes: int,
    partition_rows: int,
    log,
) -> _Prepared:
    """Prepare rows input (JSONL, Parquet, `datasets`) partition by partition.

    Raises the `InputError` today's whole-input check raises: the earliest row failing
    validation (duplicate ids included) anywhere, else the earliest over-long row.
    """
    parts, needs_count = split_input(cfg.input, partition_bytes, partition_rows)
    if needs_count:
        counts = np.array(run(count_task, [(p.model_dump_json(),) for p in parts]), np.int64)
        counts = counts.reshape(-1, 2)
        parts = assign_rows(parts, counts[:, 0], counts[:, 1], cfg.input.limit)
    num_input_rows = sum(p.num_rows for p in parts)
    num_buckets = min(MAX_BUCKETS, max(1, math.ceil(num_input_rows / BUCKET_ROWS)))
    log(f"planning: {num_input_rows:,} input rows in {len(parts)} partition(s)")
    ctx = PlanContext(
        input=cfg.input,
        prepare=cfg.prompts.model_copy(update={"max_length": max_len}),
        tokenizer=spec,
        work_url=work_url,
        num_buckets=num_buckets,
        num_partitions=len(parts),
    ).model_dump_json()
    results = run(prepare_task, [(ctx, p.model_dump_json()) for p in parts])
    checks = run(bucket_task, [(ctx, b) for b in range(num_buckets)]) if parts else []

    validation = [r["error"] for r in results if r["error_phase"] == "validate"]
    validation += [c["error"] for c in checks if c["error"] is not None]
    too_long = [r["error"] for r in results if r["error_phase"] == "too_long"]
    if validation or too_long:
        raise error_from_json(min(validation or too_long, key=lambda e: e["row"]))

    skipped: Counter[str] = Counter()
    for r in results:
        skipped.update(r["skipped"])
    kept = np.array([r["num_kept"] for r in results], np.int64)
    num_pre = kept.copy()
    drop_buckets: dict[int, list[int]] = {}
    truncated = sum(r["num_truncated"] for r in results)
    tokens = sum(r["num_tokens"] for r in results)
    for c in checks:  # O(buckets x partitions with duplicates)
        skipped.update(c["skipped_delta"])
        for p, n in c["dropped"]:
            kept[p] -= n
            drop_buckets.setdefault(p, []).append(c["bucket"])
        truncated -= c["truncated_dropped"]
        tokens -= c["tokens_dropped"]
    return _Prepared(
        input_kind="rows",
        num_input_rows=num_input_rows,
        num_pre=num_pre,
        kept=kept,
        drop_buckets=drop_buckets,
        skipped=dict(sorted((k, v) for k, v in skipped.items() if v)),
        num_truncated=truncated,
        num_tokens=tokens,
    )


def _prepare_shard_set(cfg: ShardJobConfig, tok_fp: str, max_len: int, work_url: str) -> _Prepared:
    """A shard set (e.g. rollouts to score) is already tokenized: read on the driver, as one
    partition (its rows are never re-cut; see `read_shard_set_rows`)."""
    prepared, metadata = read_shard_set_rows(cfg.input, cfg.prompts, tok_fp, max_len)
    table = prepared.table
    write_rows(work_url, 0, table)
    lengths = table.column("input_ids").combine_chunks().value_lengths()
    return _Prepared(
        input_kind=metadata.kind,
        num_input_rows=prepared.num_input_rows,
        num_pre=np.array([table.num_rows], np.int64),
        kept=np.array([table.num_rows], np.int64),
        skipped=prepared.skip_counts(),
        num_truncated=prepared.num_truncated,
        num_tokens=int(np.asarray(lengths, np.int64).sum()),
    )


def _cut_specs(
    prepared: _Prepared, layout: ShardSetLayout, work_url: str, rows_per_shard: int
) -> list[CutSpec]:
    """Shard i holds kept rows [i * R, (i + 1) * R); consecutive shards form one task."""
    kept = prepared.kept
    ends = np.cumsum(kept)
    starts = ends - kept
    total = int(ends[-1]) if kept.size else 0
    per_task = max(1, CUT_ROWS // rows_per_shard) * rows_per_shard
    specs = []
    for lo in range(0, total, per_task):  # a loop over tasks, not rows
        hi = min(lo + per_task, total)
        first = int(np.searchsorted(ends, lo, side="right"))
        last = int(np.searchsorted(starts, hi, side="left"))
        parts = [
            CutPart(
                partition=p,
                kept_start=max(lo - int(starts[p]), 0),
                kept_stop=min(hi, int(ends[p])) - int(starts[p]),
                num_kept=int(prepared.num_pre[p]),
                drop_buckets=prepared.drop_buckets.get(p, []),
            )
            for p in range(first, last)
            if kept[p] > 0
        ]
        specs.append(
            CutSpec(
                output_url=layout.url,
                split=layout.split,
                work_url=work_url,
                first_shard=lo // rows_per_shard,
                row_start=lo,
                row_stop=hi,
                rows_per_shard=rows_per_shard,
                parts=parts,
            )
        )
    return specs


def make_plan(
    cfg: ShardJobConfig,
    layout: ShardSetLayout,
    log=print,
    connect: Callable[[], Client] | None = None,
    *,
    partition_bytes: int = PARTITION_BYTES,
    partition_rows: int = PARTITION_ROWS,
) -> PlanOutcome:
    """Return the plan of this run, creating it (and the prompt shards) when needed.

    ``connect`` returns the Dask client to plan on; it is called only when the input must be
    read (a reused plan needs no cluster). Without it the planning tasks run in-process.
    ``partition_bytes`` (JSONL) and ``partition_rows`` (Parquet, `datasets`) size the
    partitions; they change how work is split, never the plan.
    """
    tokenizer = load_tokenizer(cfg)
    tok_fp = tokenizer_fingerprint(tokenizer)
    max_len = max_row_tokens(cfg)
    tokenized = is_shard_set(cfg.input.path)
    input_fp = shard_set_fingerprint(cfg.input.path) if tokenized else input_fingerprint(cfg.input)
    fp = plan_fingerprint(cfg, input_fp, tok_fp, max_len)

    existing = read_plan(layout)
    if existing is not None and existing.fingerprint != fp:
        if not cfg.output.overwrite:
            changes = describe_difference(existing.config, cfg.output_defining())
            if existing.input_fingerprint != input_fp:
                changes.append("input data changed (different file contents)")
            if existing.extra.get("tokenizer_fingerprint") != tok_fp:
                changes.append("teacher tokenizer changed")
            raise PlanMismatchError(
                f"{layout.url} already holds a shard set made with a different plan:\n  "
                + "\n  ".join(changes or ["format or length policy changed"])
                + "\nUse another output path, or pass --overwrite to replace it."
            )
        log(f"overwrite: removing the previous shard set in {layout.url}")
        clear_shard_set(layout)
        existing = None
    elif existing is None and layout.fs.exists(layout.data_dir) and layout.fs.ls(layout.data_dir):
        if not cfg.output.overwrite:
            raise PlanMismatchError(
                f"{layout.url}/data holds files but no logitforge plan; refusing to mix them "
                "with a new shard set. Use another output path or --overwrite."
            )
        clear_shard_set(layout)

    if existing is not None and _prompt_shards_intact(layout, existing):
        return PlanOutcome(existing, reused=True, tokenizer_fingerprint=tok_fp)

    spec = TokenizerSpec(
        path=cfg.teacher.tokenizer_path,
        revision=cfg.teacher.revision,
        trust_remote_code=cfg.teacher.trust_remote_code,
        fingerprint=tok_fp,
    )
    if connect is None:
        remember_tokenizer(spec, tokenizer)
        run: Runner = _in_process
    else:
        run = _on_dask(connect())
    fs = layout.fs
    work_dir = layout.join(".logitforge", "planning")
    work_url = fs.unstrip_protocol(work_dir)
    if fs.exists(work_dir):  # left by a run that died while planning
        fs.rm(work_dir, recursive=True)
    try:
        if tokenized:
            prepared = _prepare_shard_set(cfg, tok_fp, max_len, work_url)
        else:
            prepared = _prepare_rows(
                cfg, spec, max_len, work_url, run, partition_bytes, partition_rows, log
            )
        num_rows = int(prepared.kept.sum())
        if num_rows == 0:
            raise EmptyInputError(
                f"no usable rows in {cfg.input.path}: {prepared.num_input_rows} read, "
                f"skipped {prepared.skipped}"
            )
        layout.ensure_dirs()
        rows_per_shard = cfg.output.rows_per_shard
        specs = _cut_specs(prepared, layout, work_url, rows_per_shard)
        written = [w for ws in run(cut_task, [(s.model_dump_json(),) for s in specs]) for w in ws]
    finally:
        if fs.exists(work_dir):
            fs.rm(work_dir, recursive=True)

    num_shards = math.ceil(num_rows / rows_per_shard)
    assert [w["index"] for w in written] == list(range(num_shards))
    shards = [
        ShardPlan(
            index=w["index"],
            name=layout.data_path(w["index"], num_shards).rsplit("/", 1)[-1],
            row_start=w["index"] * rows_per_shard,
            row_stop=w["index"] * rows_per_shard + w["rows"],
            prompts_sha256=w["sha256"],
            prompts_bytes=w["bytes"],
        )
        for w in written
    ]
    plan = Plan(
        fingerprint=fp,
        created_at=utc_now(),
        config=cfg.output_defining(),
        input_fingerprint=input_fp,
        num_rows=num_rows,
        num_shards=num_shards,
        shards=shards,
        skipped=prepared.skipped,
        extra={
            "tokenizer_fingerprint": tok_fp,
            "max_length": max_len,
            "num_input_rows": prepared.num_input_rows,
            "num_truncated": prepared.num_truncated,
            "input_kind": prepared.input_kind,
            "num_tokens": prepared.num_tokens,
        },
    )
    if existing is not None and _shard_rows(existing) != _shard_rows(plan):
        # Same fingerprint but different prompt bytes would break the rows of done shards.
        raise RuntimeError(
            "re-prepared prompt shards differ from the plan: preparation is not deterministic. "
            "Please report this with your input."
        )
    if existing is None:
        write_plan(layout, plan)
    else:
        log("rebuilt missing or corrupted prompt shards")
    return PlanOutcome(existing or plan, reused=existing is not None, tokenizer_fingerprint=tok_fp)


def _shard_rows(plan: Plan) -> list[dict]:
    """What must not change when prompt shards are rebuilt (sizes are absent in older plans;
    equal sha256s imply equal sizes)."""
    return [s.model_dump(exclude={"prompts_bytes"}) for s in plan.shards]
