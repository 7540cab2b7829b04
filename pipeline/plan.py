"""Planning: freeze which prompt rows go to which shard, before any engine starts.

The driver reads and validates the whole input, tokenizes it with the teacher tokenizer and
writes one prompt shard per planned data shard, then the plan (written last, so a plan on disk
means its prompt shards are complete). Bad input therefore fails here, naming the row, and
never costs engine time. A rerun with the same fingerprint reuses the plan without reading the
input again; a different fingerprint is refused unless the user asks to overwrite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
from distributed import Client

from pipeline.config import ShardJobConfig, describe_difference, fingerprint
from stages.prompts import (
    PreparedPrompts,
    input_fingerprint,
    load_rows,
    prepare_prompts,
    tokenizer_fingerprint,
)
from stages.prompts.shard_input import is_shard_set, read_shard_set_rows, shard_set_fingerprint
from stages.teacher.engine import EngineLimitError
from storage.layout import ShardSetLayout
from storage.manifest import Plan, PlanMismatchError, ShardPlan, read_plan, utc_now, write_plan
from storage.schema import FORMAT_VERSION
from storage.writer import sha256_file, write_parquet_atomic


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
    fs = layout.fs
    for shard in plan.shards:
        path = layout.prompts_path(shard.index)
        if not fs.exists(path) or sha256_file(fs, path) != shard.prompts_sha256:
            return False
    return True


def _prepare(
    cfg: ShardJobConfig, tokenizer: Any, tok_fp: str, max_len: int, tokenized: bool
) -> tuple[PreparedPrompts, str]:
    """The input's rows as a prompt table, and the kind of input (``rows`` or a set's kind).

    ``tokenized``: the input is a shard set (e.g. rollouts to score), read as it is.
    """
    if tokenized:
        prepared, metadata = read_shard_set_rows(cfg.input, cfg.prompts, tok_fp, max_len)
        return prepared, metadata.kind
    rows = load_rows(cfg.input)
    options = cfg.prompts.model_copy(update={"max_length": max_len})
    return prepare_prompts(rows, tokenizer, options, cfg.input), "rows"


def make_plan(
    cfg: ShardJobConfig,
    layout: ShardSetLayout,
    log=print,
    connect: Callable[[], Client] | None = None,
) -> PlanOutcome:
    """Return the plan of this run, creating it (and the prompt shards) when needed.

    ``connect`` returns the Dask client to plan on; it is called only when the input must be
    read (a reused plan needs no cluster).
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

    prepared, input_kind = _prepare(cfg, tokenizer, tok_fp, max_len, tokenized)
    table = prepared.table
    if table.num_rows == 0:
        raise EmptyInputError(
            f"no usable rows in {cfg.input.path}: {prepared.num_input_rows} read, "
            f"skipped {prepared.skip_counts()}"
        )
    num_shards = math.ceil(table.num_rows / cfg.output.rows_per_shard)
    layout.ensure_dirs()
    shards: list[ShardPlan] = []
    for index in range(num_shards):
        start = index * cfg.output.rows_per_shard
        stop = min(start + cfg.output.rows_per_shard, table.num_rows)
        written = write_parquet_atomic(
            layout.fs, layout.prompts_path(index), table.slice(start, stop - start)
        )
        shards.append(
            ShardPlan(
                index=index,
                name=layout.data_path(index, num_shards).rsplit("/", 1)[-1],
                row_start=start,
                row_stop=stop,
                prompts_sha256=written.sha256,
            )
        )
    skipped = prepared.skip_counts()
    plan = Plan(
        fingerprint=fp,
        created_at=utc_now(),
        config=cfg.output_defining(),
        input_fingerprint=input_fp,
        num_rows=table.num_rows,
        num_shards=num_shards,
        shards=shards,
        skipped=skipped,
        extra={
            "tokenizer_fingerprint": tok_fp,
            "max_length": max_len,
            "num_input_rows": prepared.num_input_rows,
            "num_truncated": prepared.num_truncated,
            "input_kind": input_kind,
            "num_tokens": int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py()),
        },
    )
    if existing is not None and existing.shards != plan.shards:
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
