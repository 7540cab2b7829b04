"""Configuration of a cache-teacher run: YAML validated by pydantic, plus CLI overrides.

Each section is owned by the component it configures (the input and teacher sections are the
stages' own option models); this module only composes them, loads YAML, applies
`section.key=value` overrides and says which fields define the output (the plan fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pipeline.cpus import check_spec
from stages.prompts import InputOptions, PrepareOptions
from stages.teacher import GenerationOptions, TeacherOptions
from stages.train.options import DataOptions, LossOptions, StudentOptions, TrainOptions
from storage.manifest import PlanMismatchError


class OutputOptions(BaseModel):
    """Where and how shards are written."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Local folder or fsspec URL of the shard set.")
    rows_per_shard: int = Field(256, ge=1)
    codec: str = Field("fp16", description="Top-k codec: fp32, fp16, q8, compact, sampled.")
    codec_params: dict[str, Any] = Field(default_factory=dict)
    overwrite: bool = Field(False, description="Replace a shard set made from another config.")


class ClusterOptions(BaseModel):
    """Dask execution: an embedded LocalCluster unless `scheduler` names a running one."""

    model_config = ConfigDict(extra="forbid")

    scheduler: str | None = Field(None, description="e.g. tcp://host:8786; None = LocalCluster.")
    n_workers: int = Field(1, ge=1, description="LocalCluster worker processes (one engine each).")
    memory_limit: str = "auto"
    gpus_per_worker: int = Field(
        0, ge=0, description="GPU resources per local worker; >0 makes tasks request GPUs."
    )
    use_gpu_resources: bool = Field(
        False, description="Tasks request {'GPU': tensor_parallel_size} on an external cluster."
    )
    resources: dict[str, float] | None = Field(
        None,
        description="Dask resources every shard task requests, e.g. {POLICY: 1} to run "
        "rollouts only on workers started with --resources POLICY=1; overrides the GPU ones.",
    )
    retries: int = Field(2, ge=0, description="Dask retries per shard task.")
    dashboard: bool = False
    engine_cpus: Annotated[str, AfterValidator(check_spec)] = Field(
        "auto",
        description="Cores each CPU engine binds to: auto (its worker's share of the cores), "
        "vllm (vLLM's default, one core reserved) or a list such as 0-3 or 0-3|4-7 "
        "(one group per LocalCluster worker). See pipeline/cpus.py.",
    )


def task_resources(cluster: ClusterOptions, engine: TeacherOptions) -> dict[str, float] | None:
    """What each shard task requests: explicit resources, else GPUs when the cluster has them."""
    if cluster.resources:
        return dict(cluster.resources)
    if cluster.gpus_per_worker > 0 or cluster.use_gpu_resources:
        return {"GPU": float(engine.tensor_parallel_size)}
    return None


class CacheTeacherConfig(BaseModel):
    """The whole `logitforge cache-teacher` job."""

    model_config = ConfigDict(extra="forbid")

    input: InputOptions
    prompts: PrepareOptions = Field(default_factory=PrepareOptions)
    teacher: TeacherOptions
    output: OutputOptions
    cluster: ClusterOptions = Field(default_factory=ClusterOptions)
    generation: GenerationOptions | None = Field(
        None,
        description="Set: the teacher generates completions of each row's prompt part, "
        "which are then scored like cached rows (generate-teacher).",
    )

    @property
    def kind(self) -> str:
        """What the shard set holds: the teacher's scores of the input, or of its generations."""
        return "teacher_generated" if self.generation is not None else "teacher_logits"

    @property
    def task_resources(self) -> dict[str, float] | None:
        return task_resources(self.cluster, self.teacher)

    def output_defining(self) -> dict[str, Any]:
        """The fields that change what is written; runtime knobs (cluster, cache sizes) don't."""
        teacher = self.teacher.model_dump(
            include={"model", "revision", "tokenizer", "engine", "k", "dtype", "max_model_len"}
        )
        output = self.output.model_dump(include={"rows_per_shard", "codec", "codec_params"})
        defining = {
            "input": self.input.model_dump(),
            "prompts": self.prompts.model_dump(),
            "teacher": teacher,
            "output": output,
        }
        if self.generation is not None:  # absent for plain caches: their fingerprints stand
            defining["generation"] = self.generation.model_dump()
        return defining


class RolloutConfig(BaseModel):
    """The whole `logitforge rollout` job: a student checkpoint samples completions.

    Planning, resume and execution are the cache-teacher job's; the engine is the policy
    (a student checkpoint served by vLLM) and nothing is scored. ``teacher`` is an alias of
    ``policy`` so the planner can read the engine's tokenizer and context from either job.
    """

    model_config = ConfigDict(extra="forbid")

    input: InputOptions
    prompts: PrepareOptions = Field(default_factory=PrepareOptions)
    policy: TeacherOptions = Field(
        description="The student checkpoint that samples (k only sizes vLLM's max_logprobs)."
    )
    generation: GenerationOptions = Field(
        default_factory=lambda: GenerationOptions(temperature=1.0),
        description="How completions are sampled; T = 1 keeps policy_logprob the sampling "
        "distribution's.",
    )
    policy_version: str | None = Field(
        None, description="Recorded in every row; defaults to the checkpoint folder's name."
    )
    output: OutputOptions
    cluster: ClusterOptions = Field(default_factory=ClusterOptions)

    @property
    def kind(self) -> str:
        return "rollout"

    @property
    def teacher(self) -> TeacherOptions:
        return self.policy

    @property
    def version(self) -> str:
        return self.policy_version or Path(self.policy.model).name

    @property
    def task_resources(self) -> dict[str, float] | None:
        return task_resources(self.cluster, self.teacher)

    def output_defining(self) -> dict[str, Any]:
        return {
            "input": self.input.model_dump(),
            "prompts": self.prompts.model_dump(),
            "policy": self.policy.model_dump(
                include={"model", "revision", "tokenizer", "engine", "dtype", "max_model_len"}
            ),
            "generation": self.generation.model_dump(),
            "policy_version": self.version,
            "output": self.output.model_dump(include={"rows_per_shard"}),
        }


ShardJobConfig = CacheTeacherConfig | RolloutConfig
"""A job whose output is a shard set planned from an input (what `pipeline.plan` plans)."""


class DistillConfig(BaseModel):
    """The whole `logitforge distill` job: student, data, loss and recipe."""

    model_config = ConfigDict(extra="forbid")

    student: StudentOptions
    data: DataOptions
    loss: LossOptions = Field(default_factory=LossOptions)
    train: TrainOptions
    overwrite: bool = Field(False, description="Replace a run made with another config.")

    def output_defining(self) -> dict[str, Any]:
        """What changes the trained model; paths, workers and logging do not."""
        return {
            "student": self.student.model_dump(),
            "data": self.data.model_dump(exclude={"num_workers"}),
            "loss": self.loss.model_dump(),
            "train": self.train.model_dump(
                exclude={"output_dir", "save_steps", "save_total_limit", "logging_steps", "threads"}
            ),
        }


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`teacher.k=32` -> (["teacher", "k"], 32); the value is read as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ValueError(f"override {text!r} has an empty key")
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (an empty file is an empty mapping)."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping")
    return data


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    model: type[ConfigT] = CacheTeacherConfig,  # type: ignore[assignment]
) -> ConfigT:
    """Read a YAML config (or start empty), apply overrides, validate as ``model``."""
    data = load_yaml(path) if path is not None else {}
    return model.model_validate(apply_overrides(data, overrides or []))


def fingerprint(payload: Any) -> str:
    """Stable sha256 of JSON-able data (sorted keys), as hex."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def describe_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (for the refusal message)."""
    keys = sorted(set(old) | set(new))
    out: list[str] = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(describe_difference(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def claim_run_folder(
    out: Path, run_file: str, fp: str, config: dict[str, Any], overwrite: bool, log: Any = print
) -> bool:
    """Make ``out`` the folder of the job with fingerprint ``fp``; True if it already was.

    Another job's folder is refused, listing what changed, unless ``overwrite`` (then it is
    removed). The job's config is recorded in ``out/run_file``.
    """
    path = out / run_file
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("fingerprint") == fp:
            return True
        if not overwrite:
            changes = describe_difference(previous.get("config", {}), config)
            raise PlanMismatchError(
                f"{out} holds a run made with a different config:\n  "
                + "\n  ".join(changes or ["(format changed)"])
                + "\nUse another train.output_dir, or set overwrite=true to replace it."
            )
        log(f"overwrite: removing the previous run in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fingerprint": fp, "config": config}, indent=2) + "\n")
    return False
