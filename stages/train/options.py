"""User-facing options of the training stage (they cross into pipeline configs, hence pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LossKind = Literal["ce", "forward_kl", "reverse_kl", "jsd", "sampled_rkl", "uld", "hybrid"]
# Losses over aligned spans: they work whatever the student's tokenizer (see stages.align).
CROSS_TOKENIZER_KINDS = ("uld", "hybrid")


class LossOptions(BaseModel):
    """The distillation objective: alpha * T^2 * soft(teacher, student) + (1 - alpha) * CE."""

    model_config = ConfigDict(extra="forbid")

    kind: LossKind = Field(
        "forward_kl",
        description="ce (hard labels only), forward_kl, reverse_kl, jsd (GKD, with beta) or "
        "sampled_rkl (on-policy per-token reverse KL on the sampled tokens; needs rollout data), "
        "or, for a student with another tokenizer, uld (sorted-probability L1 per aligned span) "
        "or hybrid (GOLD: JSD on the mapped vocabulary, ULD on the rest).",
    )
    temperature: float = Field(1.0, gt=0, description="Applied to teacher and student alike.")
    alpha: float = Field(1.0, ge=0, le=1, description="Weight of the soft term; 1 - alpha on CE.")
    beta: float = Field(0.5, ge=0, le=1, description="Generalized JSD interpolation (jsd only).")
    matched_weight: float | None = Field(
        None,
        ge=0,
        description="hybrid: weight of the mapped-vocabulary JSD; None: the teacher's mapped "
        "probability share, per span.",
    )
    unmatched_weight: float | None = Field(
        None, ge=0, description="hybrid: weight of the unmapped ULD; None: 1 - matched weight."
    )
    tail: Literal["renorm", "rest"] = Field(
        "rest",
        description="Top-k tail: one 'rest' bucket of 1 - sum(p) against the student's mass "
        "outside the top-k, or renormalise both over the top-k (leaves the student's tail free).",
    )


class StudentArch(BaseModel):
    """A small Llama built locally (head size hidden/heads must be 32 or 64 for vLLM on CPU)."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(192, ge=8)
    max_position_embeddings: int | None = Field(
        None, ge=2, description="Defaults to the tokenizer's model_max_length (at most 4096)."
    )
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> StudentArch:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        return self


class StudentOptions(BaseModel):
    """Which student: an existing causal LM (`model`), or one built from `build`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="Hub id or local path of the student.")
    build: StudentArch | None = Field(None, description="Build a small Llama instead.")
    tokenizer: str | None = Field(
        None, description="Defaults to `model`, or to the cache's teacher model when building."
    )
    dtype: Literal["float32", "bfloat16"] = "float32"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> StudentOptions:
        if (self.model is None) == (self.build is None):
            raise ValueError("student: set exactly one of `model` (a path or id) or `build`")
        return self


class MixOptions(BaseModel):
    """Batches drawn from other sources with a given probability (GKD's lambda mixing)."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(min_length=1, description="Shard sets mixed in.")
    fraction: float = Field(
        ge=0, le=1, description="Probability that a batch comes from these sources."
    )


class DataOptions(BaseModel):
    """Which shard sets feed the student, and how they are batched."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(
        min_length=1, description="Shard sets or folders of Parquet logit files (local or URL)."
    )
    include_prompt: bool = Field(False, description="Also train on prompt positions.")
    batch_size: int = Field(128, ge=1, description="Rows per batch (per device).")
    shuffle: bool = True
    shuffle_shards: int = Field(4, ge=1, description="Whole shards mixed in the shuffle buffer.")
    pack: bool = Field(
        False,
        description="Pack a batch's rows into as few sequences as its longest row allows "
        "(attention stays within each row; losses unchanged), instead of one padded row each.",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    strict: bool = Field(True, description="Refuse a source with incomplete shards.")
    mix: MixOptions | None = Field(
        None, description="Whole batches from other sources with probability mix.fraction."
    )


class TrainOptions(BaseModel):
    """The optimisation recipe: AdamW, linear warm-up, cosine decay to min_lr_ratio * lr."""

    model_config = ConfigDict(extra="forbid")

    output_dir: str = Field(description="Checkpoints and the final model go here.")
    steps: int = Field(ge=1, description="Optimizer steps.")
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    adam_beta2: float = Field(0.98, gt=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    save_steps: int | None = Field(
        200, ge=1, description="Checkpoint every N steps (resume points); None: no checkpoints."
    )
    save_total_limit: int = Field(2, ge=1)
    logging_steps: int = Field(50, ge=1)
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None: all cores.")
