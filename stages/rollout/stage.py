"""Rollout stage on one shard: prompt shard in, rollout shard + completion record out.

The policy continues each row's prompt part (`n` samples per prompt, a seed per row id, so a
row's samples do not depend on sharding or batching) and reports each sampled token's raw
logprob. Nothing is scored here: the teacher stage scores a rollout set like any other input
and keeps these columns, which is what per-token reverse KL needs.
"""

from __future__ import annotations

import time

import pyarrow.compute as pc

from stages.shard_task import ShardTask, finished_earlier, read_prompt_shard, write_shard
from stages.teacher.engine import LOGPROBS_MODE, GenerationOptions, TeacherEngine
from stages.teacher.stage import generate_completions
from storage.manifest import DoneRecord
from storage.schema import ShardSetMetadata

ROLLOUT_CODEC = "none"  # a rollout shard has no top-k columns to encode


class RolloutShardTask(ShardTask):
    """One rollout shard: which policy checkpoint samples, how, and as which version."""

    policy_model: str  # checkpoint path the worker's policy engine must serve
    policy_version: str
    generation: GenerationOptions


def run_rollout_shard(
    task: RolloutShardTask, engine: TeacherEngine, switch: dict[str, float] | None = None
) -> DoneRecord:
    """Sample the shard's completions with ``engine`` (serving ``task.policy_model``).

    ``switch``: how long it took to make the engine serve this checkpoint (``load_s``,
    ``swap_s`` or ``reload_s``), recorded as ``policy_<how>`` in the shard's timings.
    """
    if engine.options.model != task.policy_model:
        raise RuntimeError(
            f"the policy engine serves {engine.options.model}, the task needs {task.policy_model}"
        )
    if (record := finished_earlier(task)) is not None:
        return record
    t0 = time.perf_counter()
    prompts = read_prompt_shard(task)
    timings = {"read_s": time.perf_counter() - t0}
    timings.update({f"policy_{k}": v for k, v in (switch or {}).items()})
    t = time.perf_counter()
    rows, counts = generate_completions(
        prompts, engine, task.generation, policy_version=task.policy_version
    )
    timings["generate_s"] = time.perf_counter() - t
    tokens = int(pc.sum(pc.list_value_length(rows.column("input_ids"))).as_py() or 0)
    counts["completion_tokens"] = tokens - int(pc.sum(rows.column("prompt_len")).as_py() or 0)
    metadata = ShardSetMetadata(
        **task.metadata,
        k=0,
        codec=ROLLOUT_CODEC,
        logprobs_mode=LOGPROBS_MODE,
        engine=engine.name,
        engine_version=engine.version,
        plan_fingerprint=task.plan_fingerprint,
    )
    return write_shard(
        task, rows, metadata, tokens=tokens, timings=timings, counts=counts, started=t0
    )
