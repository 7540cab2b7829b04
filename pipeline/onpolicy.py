"""On-policy distillation: rounds of rollout -> teacher scoring -> training -> new policy.

Round r, in ``<output_dir>/rounds/r000r/``:

    prompts.jsonl   the round's prompts (a deterministic window of the shuffled input)
    rollouts/       shard set: the current policy's samples and their logprobs (kind rollout)
    scored/         shard set: the teacher's top-k and sampled-token logprobs of the rollouts
                    (kind onpolicy), rollout columns kept
    student/        the policy trained on ``scored`` (+ the off-policy mix): the next policy
    round.json      written last: the round is done (sizes, teacher tokens, wall times)

Every arrow is a shard set or a checkpoint on disk, and every step resumes on its own (shard
sets by completion records, training from its last checkpoint), so killing the job anywhere
and running it again continues from the last completed step of the last round. Rerunning a
finished job is a no-op.

Engines: one Dask cluster holds a teacher engine and a policy engine per worker (both vLLM,
KV caches capped). The policy engine is started once, with the first checkpoint; every later
round swaps the new checkpoint's weights into it (milliseconds; a new vLLM engine costs tens
of seconds on a CPU). Training runs on the driver between the engines' turns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config import (
    CacheTeacherConfig,
    ClusterOptions,
    DistillConfig,
    RolloutConfig,
    claim_run_folder,
    fingerprint,
)
from stages.prompts import InputError, InputOptions, PrepareOptions, load_rows
from stages.prompts.records import INVALID_JSON
from stages.teacher import GenerationOptions, TeacherOptions
from stages.train.options import LossOptions, StudentOptions, TrainOptions
from storage.layout import ShardSetLayout
from storage.manifest import read_done, read_plan

Log = Callable[[str], None]
RUN_FILE = "onpolicy_config.json"
ROUND_FILE = "round.json"


class PolicyEngineOptions(BaseModel):
    """How the policy (student) engine that samples rollouts is run."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["vllm", "transformers"] = "vllm"
    dtype: str = "float32"
    kv_cache_gib: float | None = Field(0.5, gt=0)
    max_model_len: int | None = Field(None, ge=2)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    enforce_eager: bool = False
    resources: dict[str, float] | None = Field(
        None,
        description="Dask resources of rollout tasks (e.g. {POLICY: 1}): where the policy "
        "engine lives. Scoring tasks use cluster.resources.",
    )

    def for_checkpoint(self, path: str) -> TeacherOptions:
        # k only sizes vLLM's max_logprobs: a rollout asks for the sampled token's logprob.
        return TeacherOptions(model=path, k=1, **self.model_dump(exclude={"resources"}))


class RoundOptions(BaseModel):
    """The round loop and GKD's mixing."""

    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(ge=1)
    prompts_per_round: int = Field(ge=1, description="Prompts sampled by the policy per round.")
    batch_size: int = Field(64, ge=1, description="Rows per training batch.")
    onpolicy_fraction: float = Field(
        1.0, ge=0, le=1, description="GKD's lambda: probability that a batch is on-policy."
    )
    offpolicy: list[str] = Field(
        default_factory=list, description="Cached shard sets for the other batches."
    )
    shuffle_seed: int = Field(0, description="Order in which prompts are visited.")

    @model_validator(mode="after")
    def _mix(self) -> RoundOptions:
        if self.onpolicy_fraction < 1 and not self.offpolicy:
            raise ValueError("onpolicy_fraction < 1 needs offpolicy sources to mix in")
        return self


class OnPolicyConfig(BaseModel):
    """The whole `logitforge onpolicy` job."""

    model_config = ConfigDict(extra="forbid")

    input: InputOptions = Field(description="Prompts; their completions are ignored.")
    prompts: PrepareOptions = Field(default_factory=PrepareOptions)
    teacher: TeacherOptions
    student: StudentOptions = Field(description="The first policy (an SFT'd checkpoint, ideally).")
    policy: PolicyEngineOptions = Field(default_factory=PolicyEngineOptions)
    generation: GenerationOptions = Field(
        default_factory=lambda: GenerationOptions(temperature=1.0, max_tokens=32)
    )
    onpolicy: RoundOptions
    loss: LossOptions = Field(default_factory=lambda: LossOptions(kind="sampled_rkl"))
    train: TrainOptions = Field(description="output_dir is the run's root; steps are per round.")
    rows_per_shard: int = Field(256, ge=1)
    codec: str = "fp16"
    cluster: ClusterOptions = Field(default_factory=ClusterOptions)
    overwrite: bool = False

    @model_validator(mode="after")
    def _loss_fits_data(self) -> OnPolicyConfig:
        if self.loss.kind == "sampled_rkl":
            g = self.generation
            if g.temperature != 1.0 or g.top_p != 1.0:
                raise ValueError(
                    "loss sampled_rkl needs rollouts sampled from the policy itself: "
                    f"generation.temperature 1 and top_p 1 (got {g.temperature}, {g.top_p})"
                )
            if self.onpolicy.onpolicy_fraction < 1:
                raise ValueError(
                    "loss sampled_rkl trains on the policy's own samples only; mix off-policy "
                    "data with a top-k loss (kind jsd: GKD)"
                )
        return self

    def output_defining(self) -> dict[str, Any]:
        return self.model_dump(
            exclude={
                "cluster": True,
                "overwrite": True,
                "train": {"save_steps", "save_total_limit", "logging_steps", "threads"},
            }
        )


def round_dir(root: Path, r: int) -> Path:
    return root / "rounds" / f"r{r:04d}"


def initial_policy(cfg: OnPolicyConfig, root: Path) -> str:
    """The first policy's checkpoint: ``student.model``, or the built student saved once."""
    if cfg.student.model is not None:
        return cfg.student.model
    path = root / "init"
    if not (path / "config.json").exists():
        from stages.train.student import load_student

        model, tokenizer = load_student(
            cfg.student, default_tokenizer=cfg.teacher.tokenizer_path, seed=cfg.train.seed
        )
        tmp = root / "init.tmp"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(path)
    return str(path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_round_prompts(rows: list[dict], order: np.ndarray, r: int, per_round: int, path: Path):
    """Round r's prompts: the next window of the shuffled input, wrapping around."""
    if path.exists():
        return
    picked = order[np.arange(r * per_round, (r + 1) * per_round) % len(order)]
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, "".join(json.dumps(rows[i]) + "\n" for i in picked.tolist()))


def _switch_seconds(rollouts: Path) -> dict[str, float]:
    """How the policy engine came to serve this round's checkpoint (load, swap or reload)."""
    layout = ShardSetLayout.from_url(str(rollouts))
    plan = read_plan(layout)
    out: dict[str, float] = {}
    for i in range(plan.num_shards if plan else 0):
        record = read_done(layout, i)
        for key, value in (record.timings if record else {}).items():
            if key.startswith("policy_"):
                how = key.removeprefix("policy_")
                out[how] = out.get(how, 0.0) + value
    return out


def run_round(
    cfg: OnPolicyConfig,
    root: Path,
    r: int,
    policy: str,
    version: str,
    rows: list[dict],
    order: np.ndarray,
    client: Any,
    log: Log,
) -> dict[str, Any]:
    """One round: rollout, scoring, training. Each step resumes; round.json is written last."""
    from pipeline.distill import run_distill
    from pipeline.execute import run_cache_teacher

    rd = round_dir(root, r)
    started = time.perf_counter()
    write_round_prompts(rows, order, r, cfg.onpolicy.prompts_per_round, rd / "prompts.jsonl")
    quiet: Log = lambda _: None  # noqa: E731

    t = time.perf_counter()
    rollout = RolloutConfig(
        input=cfg.input.model_copy(
            update={"path": str(rd / "prompts.jsonl"), "completion_field": None, "limit": None}
        ),
        prompts=cfg.prompts.model_copy(update={"append_eos": False}),
        policy=cfg.policy.for_checkpoint(policy),
        generation=cfg.generation.model_copy(update={"seed": cfg.generation.seed + r}),
        policy_version=version,
        output={"path": str(rd / "rollouts"), "rows_per_shard": cfg.rows_per_shard},
        cluster=cfg.cluster.model_copy(update={"resources": cfg.policy.resources}),
    )
    rolled = run_cache_teacher(rollout, client=client, log=quiet)
    rollout_s = time.perf_counter() - t
    if rolled.rows == 0:
        raise RuntimeError(
            f"round {r}: policy {version} ({policy}) produced no usable sample "
            f"({rolled.counts}); an untrained policy emits byte sequences that are not UTF-8. "
            "Start from a student trained on the task (student.model)"
        )
    log(
        f"[round {r}] rollout by {version}: {rolled.rows:,} samples, "
        f"{rolled.counts.get('completion_tokens', 0):,} completion tokens ({rollout_s:.1f} s)"
    )

    t = time.perf_counter()
    scoring = CacheTeacherConfig(
        input=InputOptions(path=str(rd / "rollouts")),
        teacher=cfg.teacher,
        output={
            "path": str(rd / "scored"),
            "rows_per_shard": cfg.rows_per_shard,
            "codec": cfg.codec,
        },
        cluster=cfg.cluster,
    )
    scored = run_cache_teacher(scoring, client=client, log=quiet)
    score_s = time.perf_counter() - t
    log(f"[round {r}] teacher scored {scored.tokens:,} tokens ({score_s:.1f} s)")

    t = time.perf_counter()
    o = cfg.onpolicy
    mix = None
    if o.onpolicy_fraction < 1:
        mix = {"sources": o.offpolicy, "fraction": 1 - o.onpolicy_fraction}
    train = cfg.train.model_copy(
        update={"output_dir": str(rd / "student"), "seed": cfg.train.seed + r}
    )
    distill = DistillConfig(
        student=StudentOptions(model=policy, dtype=cfg.student.dtype),
        data={"sources": [str(rd / "scored")], "batch_size": o.batch_size, "mix": mix},
        loss=cfg.loss,
        train=train,
    )
    summary = run_distill(distill, log=quiet)
    train_s = time.perf_counter() - t
    log(
        f"[round {r}] trained {summary['steps']} steps, final loss {summary['final_loss']} "
        f"({train_s:.1f} s)"
    )
    record = {
        "round": r,
        "policy": policy,
        "policy_version": version,
        "student": str(rd / "student"),
        "prompts": cfg.onpolicy.prompts_per_round,
        "samples": rolled.rows,
        "completion_tokens": rolled.counts.get("completion_tokens", 0),
        "finish": {k: rolled.counts.get(k, 0) for k in ("stop", "length", "truncated")},
        "teacher_tokens": scored.tokens,
        "train_steps": summary["steps"],
        "final_loss": summary["final_loss"],
        "policy_switch_s": _switch_seconds(rd / "rollouts"),
        # Wall times of this invocation's work (a resumed step reports only what it redid).
        "timings_s": {
            "rollout": round(rollout_s, 2),
            "score": round(score_s, 2),
            "train": round(train_s, 2),
            "round": round(time.perf_counter() - started, 2),
        },
    }
    _write_atomic(rd / ROUND_FILE, json.dumps(record, indent=2) + "\n")
    return record


def read_round(root: Path, r: int) -> dict[str, Any] | None:
    try:
        return json.loads((round_dir(root, r) / ROUND_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _prompt_rows(cfg: OnPolicyConfig, log: Log) -> list[dict]:
    """The input rows the rounds draw from; a JSONL line that is not JSON follows on_invalid."""
    loaded = load_rows(cfg.input)
    if loaded.bad_json:
        g = min(loaded.bad_json)
        if cfg.prompts.on_invalid == "error":
            raise InputError(
                g,
                None,
                INVALID_JSON,
                loaded.bad_json[g],
                line=loaded.line(g - loaded.start),
                source=loaded.source,
            )
        log(f"skipping {len(loaded.bad_json)} input line(s) that are not JSON objects")
    return [r for i, r in enumerate(loaded.rows) if loaded.start + i not in loaded.bad_json]


def run_onpolicy(cfg: OnPolicyConfig, *, client: Any = None, log: Log = print) -> dict[str, Any]:
    """Run (or continue) every round; returns the summary (also in onpolicy_summary.json)."""
    import contextlib

    from pipeline.execute import dask_client

    started = time.perf_counter()
    root = Path(cfg.train.output_dir)
    fp = fingerprint(cfg.output_defining())
    claim_run_folder(root, RUN_FILE, fp, cfg.output_defining(), cfg.overwrite, log)
    policy, version = initial_policy(cfg, root), "init"
    rows = _prompt_rows(cfg, log)
    if len(rows) < cfg.onpolicy.prompts_per_round:
        # A round's window would wrap onto itself: the same prompt (and id) twice.
        raise ValueError(
            f"onpolicy.prompts_per_round={cfg.onpolicy.prompts_per_round} exceeds the "
            f"{len(rows)} prompts in {cfg.input.path}"
        )
    order = np.random.default_rng(cfg.onpolicy.shuffle_seed).permutation(len(rows))
    rounds: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        for r in range(cfg.onpolicy.rounds):
            done = read_round(root, r)
            if done is None:
                if client is None:  # started only when a round has work left
                    client = stack.enter_context(dask_client(cfg.cluster, log))
                done = run_round(cfg, root, r, policy, version, rows, order, client, log)
            else:
                log(f"[round {r}] already done")
            rounds.append(done)
            policy, version = done["student"], f"r{r:04d}"
    summary = {
        "output_dir": str(root),
        "final_student": policy,
        "rounds": rounds,
        "teacher_tokens": sum(x["teacher_tokens"] for x in rounds),
        "completion_tokens": sum(x["completion_tokens"] for x in rounds),
        "train_steps": sum(x["train_steps"] for x in rounds),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    _write_atomic(root / "onpolicy_summary.json", json.dumps(summary, indent=2) + "\n")
    log(render_rounds(summary))
    return summary


def render_rounds(summary: dict[str, Any]) -> str:
    lines = [
        "onpolicy summary",
        "  round  policy  samples  completion tok  teacher tok  steps  final loss  "
        "rollout s  score s  train s  switch",
    ]
    for x in summary["rounds"]:
        t = x["timings_s"]
        switch = ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in x["policy_switch_s"].items())
        loss = "" if x["final_loss"] is None else f"{x['final_loss']:.4f}"
        lines.append(
            f"  {x['round']:>5}  {x['policy_version']:>6}  {x['samples']:>7,}  "
            f"{x['completion_tokens']:>14,}  {x['teacher_tokens']:>11,}  {x['train_steps']:>5}  "
            f"{loss:>10}  {t['rollout']:>9.1f}  {t['score']:>7.1f}  {t['train']:>7.1f}  {switch}"
        )
    lines.append(
        f"  total: {summary['teacher_tokens']:,} teacher tokens, "
        f"{summary['train_steps']:,} steps, wall {summary['wall_s']:.0f} s; "
        f"final student {summary['final_student']}"
    )
    return "\n".join(lines)
