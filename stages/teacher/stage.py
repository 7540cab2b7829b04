"""Teacher stage on one shard: prompt shard in, logit shard + completion record out.

With generation options the teacher first writes each row's completion (generate-teacher),
and the generated rows are scored like any other.

A task is a pure function of its shard: it reads the frozen prompt shard, scores it, writes
the logit shard atomically and only then its completion record. A retried or resumed task
rewrites the same file; a shard without a record does not exist.
"""

from __future__ import annotations

import hashlib
import itertools
import socket
import time
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from stages.teacher.engine import GenerationOptions, ScoredTokens, TeacherEngine
from stages.teacher.generated import byte_table_for, generated_rows, prompt_parts, row_seeds
from storage.codecs import get_codec
from storage.layout import ShardSetLayout
from storage.manifest import DoneRecord, write_done
from storage.schema import ShardSetMetadata, build_logit_table
from storage.writer import write_parquet_atomic


class TeacherShardTask(BaseModel):
    """Everything a worker needs to produce one logit shard (plain data, cheap to ship)."""

    model_config = ConfigDict(extra="forbid")

    output_url: str
    index: int
    num_shards: int
    plan_fingerprint: str
    prompts_sha256: str | None
    codec: str
    codec_params: dict
    metadata: dict  # ShardSetMetadata fields the driver knows; engine fields are filled here
    generation: GenerationOptions | None = None  # set: generate completions, then score them


class CorruptPromptShardError(RuntimeError):
    """The frozen prompt shard does not match the plan; rerun planning, do not retry."""


def read_sequences(prompts: pa.Table) -> list[list[int]]:
    """Token ids per row as Python lists (what vLLM takes), split from one flat buffer."""
    column = prompts.column("input_ids").combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy()
    return [values[a:b].tolist() for a, b in itertools.pairwise(offsets)]


def score_prompts(prompts: pa.Table, engine: TeacherEngine) -> ScoredTokens:
    """Score every row of a prompt table and check the result covers every token."""
    sequences = read_sequences(prompts)
    scored = engine.score(sequences)
    expected = sum(len(s) for s in sequences)
    if scored.num_tokens != expected:
        raise RuntimeError(f"engine scored {scored.num_tokens} positions, expected {expected}")
    return scored


def generate_completions(
    prompts: pa.Table, engine: TeacherEngine, options: GenerationOptions
) -> tuple[pa.Table, dict[str, int]]:
    """Sample completions of every row's prompt part; rows to score and counts by outcome."""
    parts = prompt_parts(prompts)
    row_ids = prompts.column("id").to_pylist()
    generated = engine.generate([p.ids for p in parts], options, seeds=row_seeds(row_ids))
    bytes_of = byte_table_for(engine.options.tokenizer_path, engine.options.trust_remote_code)
    # The scored rows need one position past their end: at most max_model_len - 1 tokens.
    return generated_rows(row_ids, parts, generated, bytes_of, engine.max_model_len - 1)


def run_teacher_shard(task: TeacherShardTask, engine: TeacherEngine) -> DoneRecord:
    """Produce logit shard `task.index` and its completion record; return the record."""
    layout = ShardSetLayout.from_url(task.output_url)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prompts_path = layout.prompts_path(task.index)
    with layout.fs.open(prompts_path, "rb") as f:
        data = f.read()  # one read serves both the checksum and the parse
    if task.prompts_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != task.prompts_sha256:
            raise CorruptPromptShardError(
                f"prompt shard {prompts_path} does not match the plan (sha256 {actual[:12]}…); "
                "rerun the same command to rebuild it"
            )
    prompts = pq.read_table(pa.BufferReader(data))
    timings["read_s"] = time.perf_counter() - t0

    counts: dict[str, int] = {}
    if task.generation is not None:
        t = time.perf_counter()
        prompts, counts = generate_completions(prompts, engine, task.generation)
        timings["generate_s"] = time.perf_counter() - t

    t1 = time.perf_counter()
    scored = score_prompts(prompts, engine)
    timings["engine_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    codec = get_codec(task.codec, **task.codec_params)
    table = build_logit_table(
        prompts, scored.topk_ids, scored.topk_logprobs, scored.next_logprob, codec
    )
    metadata = ShardSetMetadata(
        **task.metadata,
        k=engine.options.k,
        codec=codec.name,
        codec_params=codec.params,
        engine=engine.name,
        engine_version=engine.version,
        plan_fingerprint=task.plan_fingerprint,
    )
    timings["encode_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    shard = write_parquet_atomic(
        layout.fs, layout.data_path(task.index, task.num_shards), table, metadata
    )
    timings["write_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0

    record = DoneRecord(
        shard=layout.data_path(task.index, task.num_shards).rsplit("/", 1)[-1],
        index=task.index,
        rows=table.num_rows,
        tokens=int(scored.num_tokens),
        bytes=shard.bytes,
        sha256=shard.sha256,
        plan_fingerprint=task.plan_fingerprint,
        timings=timings,
        counts=counts,
        finished_at=datetime.now(timezone.utc).isoformat(),
        worker=socket.gethostname(),
    )
    write_done(layout, record)
    return record
