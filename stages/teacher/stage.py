"""Teacher stage on one shard: prompt shard in, logit shard + completion record out.

With generation options the teacher first writes each row's completion (generate-teacher),
and the generated rows are scored like any other. Rows of a rollout set keep their rollout
columns (the sampling policy's logprobs), so a scored rollout is one table the on-policy loss
reads. Reading the frozen prompt shard and writing shard + record are shared with every
stage (`stages.shard_task`).
"""

from __future__ import annotations

import itertools
import time

import pyarrow as pa

from stages.shard_task import ShardTask, finished_earlier, read_prompt_shard, write_shard
from stages.teacher.engine import GenerationOptions, ScoredTokens, TeacherEngine
from stages.teacher.generated import byte_table_for, generated_rows, prompt_parts, row_seeds
from storage.codecs import get_codec
from storage.manifest import DoneRecord
from storage.schema import ShardSetMetadata, build_logit_table


class TeacherShardTask(ShardTask):
    """Everything a worker needs to produce one logit shard."""

    codec: str
    codec_params: dict
    generation: GenerationOptions | None = None  # set: generate completions, then score them


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
    prompts: pa.Table,
    engine: TeacherEngine,
    options: GenerationOptions,
    *,
    policy_version: str | None = None,
) -> tuple[pa.Table, dict[str, int]]:
    """Sample completions of every row's prompt part; rows and counts by outcome.

    With ``policy_version`` (rollouts) the rows also carry each sampled token's logprob and
    the version (`storage.schema.ROLLOUT_SCHEMA`).
    """
    parts = prompt_parts(prompts)
    row_ids = prompts.column("id").to_pylist()
    generated = engine.generate(
        [p.ids for p in parts],
        options,
        seeds=row_seeds(row_ids),
        logprobs=policy_version is not None,
    )
    bytes_of = byte_table_for(engine.options.tokenizer_path, engine.options.trust_remote_code)
    # The rows are scored later, which needs one position past their end.
    return generated_rows(
        row_ids, parts, generated, bytes_of, engine.max_model_len - 1, policy_version
    )


def run_teacher_shard(task: TeacherShardTask, engine: TeacherEngine) -> DoneRecord:
    """Produce logit shard `task.index` and its completion record; return the record."""
    if (record := finished_earlier(task)) is not None:
        return record
    t0 = time.perf_counter()
    prompts = read_prompt_shard(task)
    timings = {"read_s": time.perf_counter() - t0}

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
    return write_shard(
        task,
        table,
        metadata,
        tokens=scored.num_tokens,
        timings=timings,
        counts=counts,
        started=t0,
    )
