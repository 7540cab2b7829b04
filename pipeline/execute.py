"""Run a shard job on Dask: plan, submit one task per missing shard, report.

The jobs are cache-teacher (and generate-teacher: the teacher scores, or first generates) and
rollout (a student checkpoint samples). The driver never touches model weights: it plans
(validating input before any engine starts), checks which shards already have valid
completion records, submits the rest to the cluster and prints progress as shards land.
Resume is simply running the same job again.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import dask
from distributed import Client, LocalCluster, as_completed

from pipeline.config import ClusterOptions, RolloutConfig, ShardJobConfig
from pipeline.plan import make_plan
from pipeline.workers import close_engines, ensure_engine_plugin, worker_engine, worker_plugin
from stages.rollout import RolloutShardTask, run_rollout_shard
from stages.teacher.engine import LOGPROBS_MODE
from stages.teacher.stage import TeacherShardTask, run_teacher_shard
from storage.card import write_dataset_card
from storage.layout import ShardSetLayout
from storage.manifest import DoneRecord, Plan, read_done, read_plan, remove_done, verify_shard
from storage.reader import ShardSet

Log = Callable[[str], None]


@dataclass
class RunSummary:
    """What a finished run reports (printed by the CLI, also returned to callers)."""

    output: str
    rows: int
    tokens: int
    shards: int
    shards_run: int
    shards_reused: int
    input_rows: int
    skipped: dict[str, int]
    truncated: int
    wall_s: float
    plan_s: float  # reading, validating and tokenizing the input (0 when the plan is reused)
    engine_s: float
    bytes: int
    tokens_run: int  # tokens of the shards run now (the ones `engine_s` timed)
    redone: dict[str, str] = field(default_factory=dict)  # shard -> why it was redone
    kind: str = "teacher_logits"
    counts: dict[str, int] = field(default_factory=dict)  # summed stage counts of the run

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def engine_tokens_per_s(self) -> float:
        """Tokens over summed task time (read+score+encode+write) of the shards run now."""
        return self.tokens_run / self.engine_s if self.engine_s else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["bytes_per_token"] = self.bytes_per_token
        out["task_tokens_per_s"] = self.engine_tokens_per_s
        return out

    def render(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        title = _TITLES.get(self.kind, "cache-teacher")
        lines = [
            f"{title} summary",
            f"  output         {self.output}",
            f"  shards         {self.shards} ({self.shards_run} run now, "
            f"{self.shards_reused} already done)",
            f"  rows           {self.rows:,} of {self.input_rows:,} input rows",
            f"  skipped rows   {skipped}",
            f"  truncated rows {self.truncated:,}",
            f"  tokens         {self.tokens:,}",
            f"  throughput     {self.engine_tokens_per_s:,.0f} tokens/s in tasks; "
            f"wall {self.wall_s:,.1f} s including cluster and engine start",
            f"  on disk        {self.bytes:,} bytes ({self.bytes_per_token:,.1f} bytes/token)",
            "  load it        datasets.load_dataset"
            f"({self.output!r}) or storage.reader.ShardSet.open({self.output!r})",
        ]
        if self.counts:
            shown = ", ".join(f"{n:,} {what}" for what, n in self.counts.items())
            lines.insert(5, f"  generated      {shown} (in the shards run now)")
        for shard, why in sorted(self.redone.items()):
            lines.append(f"  redone         {shard}: {why}")
        return "\n".join(lines)


_TITLES = {
    "teacher_generated": "generate-teacher",
    "rollout": "rollout",
    "onpolicy": "cache-teacher (scored rollouts)",
}


def _teacher_task(task_json: str) -> dict:
    """The Dask task: one shard. JSON in and out so nothing but plain data crosses processes."""
    task = TeacherShardTask.model_validate_json(task_json)
    return run_teacher_shard(task, worker_engine()).model_dump(mode="json")


def _rollout_task(task_json: str) -> dict:
    """One rollout shard on the worker's policy engine, switched to the task's checkpoint."""
    task = RolloutShardTask.model_validate_json(task_json)
    plugin = worker_plugin("policy")
    engine = plugin.engine(task.policy_model)
    return run_rollout_shard(task, engine, plugin.last_switch).model_dump(mode="json")


@contextlib.contextmanager
def dask_client(cluster_options: ClusterOptions, log: Log) -> Iterator[Client]:
    """Attach to `cluster.scheduler`, or start a LocalCluster of non-daemonic workers."""
    opts = cluster_options
    if opts.scheduler:
        log(f"attaching to Dask scheduler {opts.scheduler}")
        with Client(opts.scheduler) as client:
            yield client
        return
    # vLLM starts its own engine process; daemonic worker processes may not have children.
    with dask.config.set({"distributed.worker.daemon": False}):
        resources = {"GPU": opts.gpus_per_worker} if opts.gpus_per_worker else None
        cluster = LocalCluster(
            n_workers=opts.n_workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=opts.memory_limit,
            resources=resources,
            dashboard_address=":0" if opts.dashboard else None,
        )
        with cluster, Client(cluster) as client:
            log(f"started LocalCluster with {opts.n_workers} worker process(es)")
            try:
                yield client
            finally:
                close_engines(client)


def output_kind(cfg: ShardJobConfig, plan: Plan) -> str:
    """What the shard set holds; the teacher's scores of a rollout set are on-policy data."""
    if cfg.kind == "teacher_logits" and plan.extra.get("input_kind") == "rollout":
        return "onpolicy"
    return cfg.kind


def _task_spec(cfg: ShardJobConfig, plan: Plan, index: int, tok_fp: str) -> str:
    common = {
        "output_url": cfg.output.path,
        "index": index,
        "num_shards": plan.num_shards,
        "plan_fingerprint": plan.fingerprint,
        "prompts_sha256": plan.shard(index).prompts_sha256,
    }
    metadata = {
        "kind": output_kind(cfg, plan),
        "teacher_model": cfg.teacher.model,
        "teacher_revision": cfg.teacher.revision,
        "tokenizer_fingerprint": tok_fp,
    }
    if isinstance(cfg, RolloutConfig):
        return RolloutShardTask(
            **common,
            metadata={**metadata, "extra": {"policy_version": cfg.version}},
            policy_model=cfg.policy.model,
            policy_version=cfg.version,
            generation=cfg.generation,
        ).model_dump_json()
    return TeacherShardTask(
        **common,
        metadata={**metadata, "logprobs_mode": LOGPROBS_MODE},
        codec=cfg.output.codec,
        codec_params=cfg.output.codec_params,
        generation=cfg.generation,
    ).model_dump_json()


def run_cache_teacher(
    cfg: ShardJobConfig, *, client: Client | None = None, log: Log = print, verify: bool = False
) -> RunSummary:
    """Plan, run the missing shards on Dask and write the dataset card. Idempotent.

    Runs every shard job: cache-teacher, generate-teacher and (a `RolloutConfig`) rollout.
    ``verify`` re-hashes the shards already done (Dask tasks) and redoes any that changed.
    """
    started = time.perf_counter()
    layout = ShardSetLayout.from_url(cfg.output.path)
    with contextlib.ExitStack() as stack:
        # The cluster starts on first use: planning a new input runs on it, a resumed run whose
        # shards are all done never starts one.
        def connect() -> Client:
            nonlocal client
            if client is None:
                client = stack.enter_context(dask_client(cfg.cluster, log))
            return client

        outcome = make_plan(cfg, layout, log=log, connect=connect)
        plan_s = time.perf_counter() - started
        plan = outcome.plan
        log(
            f"plan {plan.fingerprint[:12]}: {plan.num_rows:,} rows in {plan.num_shards} shards"
            + (" (resuming)" if outcome.reused else "")
        )

        # Metadata only (record, plan fingerprint, size): O(shards) small reads, whatever the
        # shards weigh. The reader still hashes every shard it reads; --verify hashes them now.
        reasons = {
            i: verify_shard(layout, plan, i, check_sha256=False)[1] for i in range(plan.num_shards)
        }
        if verify:
            intact = [i for i, why in reasons.items() if why == "ok"]
            reasons.update(verify_shards(connect(), cfg.output.path, intact, log))
        todo = [i for i, why in reasons.items() if why != "ok"]
        redone = {plan.shard(i).name: why for i, why in reasons.items() if why not in _NOT_REDONE}
        for name, why in redone.items():
            log(f"redoing {name}: {why}")

        records: dict[int, DoneRecord] = {}
        if todo:
            # A shard without a record does not exist: a stale record of a shard being redone
            # would pass for an earlier attempt's (`stages.shard_task.finished_earlier`).
            for index in todo:
                remove_done(layout, index)
            records = _run_tasks(cfg, plan, todo, outcome.tokenizer_fingerprint, connect(), log)
        else:
            log("every shard is already done; nothing to run")

    all_records = [records.get(i) or read_done(layout, i) for i in range(plan.num_shards)]
    if any(r is None for r in all_records):
        missing = [plan.shard(i).name for i, r in enumerate(all_records) if r is None]
        raise RuntimeError(f"shards still missing after the run: {missing}")
    run_records = list(records.values())
    summary = RunSummary(
        output=cfg.output.path,
        rows=sum(r.rows for r in all_records),
        tokens=sum(r.tokens for r in all_records),
        shards=plan.num_shards,
        shards_run=len(run_records),
        shards_reused=plan.num_shards - len(run_records),
        input_rows=int(plan.extra.get("num_input_rows", plan.num_rows)),
        skipped=dict(plan.skipped),
        truncated=int(plan.extra.get("num_truncated", 0)),
        wall_s=time.perf_counter() - started,
        plan_s=plan_s,
        engine_s=sum(r.timings.get("total_s", 0.0) for r in run_records),
        bytes=sum(r.bytes for r in all_records),
        tokens_run=sum(r.tokens for r in run_records),
        redone=redone,
        kind=output_kind(cfg, plan),
        counts=_sum_counts(run_records),
    )
    metadata = ShardSet.open(layout.url).metadata
    card_summary = {k: v for k, v in summary.as_dict().items() if k not in {"redone", "output"}}
    write_dataset_card(layout, metadata, card_summary)
    return summary


_NOT_REDONE = ("ok", "no completion record")
_VERIFY_CHUNK = 32  # shards per verification task: one plan read amortised over many hashes


def _verify_chunk(url: str, indices: list[int]) -> dict[int, str]:
    """A Dask task: the sha256 check of some shards against their completion records."""
    layout = ShardSetLayout.from_url(url)
    plan = read_plan(layout)
    if plan is None:
        return dict.fromkeys(indices, "plan missing")
    return {i: verify_shard(layout, plan, i, check_sha256=True)[1] for i in indices}


def verify_shards(client: Client, url: str, indices: list[int], log: Log) -> dict[int, str]:
    """Hash shards ``indices`` of the set at ``url`` in parallel on the cluster."""
    if not indices:
        return {}
    t = time.perf_counter()
    chunks = [indices[i : i + _VERIFY_CHUNK] for i in range(0, len(indices), _VERIFY_CHUNK)]
    futures = client.map(_verify_chunk, [url] * len(chunks), chunks, pure=False)
    reasons: dict[int, str] = {}
    for result in client.gather(futures):
        reasons.update(result)
    bad = sum(why != "ok" for why in reasons.values())
    log(
        f"verified {len(indices)} done shard(s) by sha256 in {time.perf_counter() - t:.1f} s "
        f"({len(chunks)} task(s)): {bad} damaged"
    )
    return reasons


def _sum_counts(records: list[DoneRecord]) -> dict[str, int]:
    total: dict[str, int] = {}
    for record in records:
        for key, value in record.counts.items():
            total[key] = total.get(key, 0) + value
    return total


def _run_tasks(
    cfg: ShardJobConfig,
    plan: Plan,
    todo: list[int],
    tok_fp: str,
    client: Client,
    log: Log,
) -> dict[int, DoneRecord]:
    rollout = isinstance(cfg, RolloutConfig)
    role = "policy" if rollout else "teacher"
    ensure_engine_plugin(client, cfg.teacher, role, cfg.cluster)
    # Keys are unique per run: a key still held by the scheduler from an earlier run on the
    # same cluster would hand back that run's result instead of redoing the shard.
    run_id = uuid.uuid4().hex[:8]
    # Only as_completed holds the futures: each is released as soon as its record is read.
    # A finished shard is on storage; if the driver kept its future, the loss of the worker
    # holding the (tiny) result would make the scheduler recompute the whole shard.
    pending = as_completed(
        client.submit(
            _rollout_task if rollout else _teacher_task,
            _task_spec(cfg, plan, index, tok_fp),
            key=f"{role}-{plan.fingerprint[:12]}-{index:05d}-{run_id}",
            retries=cfg.cluster.retries,
            resources=cfg.task_resources,
            pure=False,
        )
        for index in todo
    )
    log(f"submitted {len(todo)} shard task(s); the first waits for the engine to load")
    records: dict[int, DoneRecord] = {}
    rows = tokens = 0
    task_s = 0.0
    for future in pending:
        record = DoneRecord.model_validate(future.result())
        future.release()
        records[record.index] = record
        rows += record.rows
        tokens += record.tokens
        task_s += record.timings.get("total_s", 0.0)
        # Rate over task time: the engine's one-off start would swamp a wall-clock rate.
        log(
            f"[{len(records)}/{len(todo)} shards] {record.shard}: {record.rows} rows, "
            f"{record.tokens:,} tokens in {record.timings.get('total_s', 0):.1f} s | "
            f"total {rows:,} rows, {tokens:,} tokens, {tokens / max(task_s, 1e-9):,.0f} tokens/s"
        )
    return records
