"""The boundary every teacher engine implements.

An engine scores whole token sequences teacher-forced: for a row of n tokens it returns n
distributions, position j predicting token j+1 (the last one predicts the token after the
row). Outputs are concatenated over rows in input order so the storage layer can build
Arrow list arrays from one flat buffer without a Python loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

LOGPROBS_MODE = "raw_logprobs"
"""Logprobs are log_softmax of the raw logits: no temperature, penalties or top-p applied.

Temperature is a training-time choice (the student stage re-softens the cached logprobs),
so the cache stores the untempered distribution.
"""


class TeacherOptions(BaseModel):
    """What model scores the prompts and how the engine is sized."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="Hub id or local path of the teacher model.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer: str | None = Field(None, description="Tokenizer id/path; defaults to `model`.")
    engine: Literal["vllm", "transformers"] = Field(
        "vllm", description="vllm in production; transformers is the reference path."
    )
    k: int = Field(64, ge=1, description="Top-k logprobs stored per position.")
    dtype: str = Field("auto", description="Model dtype: auto, float32, bfloat16, float16.")
    max_model_len: int | None = Field(
        None, ge=2, description="Context length; defaults to the model's max positions."
    )
    tensor_parallel_size: int = Field(1, ge=1)
    kv_cache_gib: float | None = Field(
        None, gt=0, description="vLLM KV cache; None: 1 GiB on CPU, vLLM's own sizing on GPU."
    )
    max_num_batched_tokens: int | None = Field(
        None, ge=16, description="vLLM scheduler token budget per step."
    )
    batch_rows: int = Field(
        64, ge=1, description="Rows per forward pass of the transformers engine."
    )
    seed: int = 0
    trust_remote_code: bool = False
    enforce_eager: bool = False

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model


@dataclass(frozen=True)
class ScoredTokens:
    """Teacher-forced scores of a batch of rows, concatenated over rows in input order.

    T is the total number of tokens of all rows; row i owns positions
    offsets[i]:offsets[i+1] of every array.
    """

    topk_ids: np.ndarray  # [T, k] int32, descending logprob
    topk_logprobs: np.ndarray  # [T, k] float32
    next_logprob: np.ndarray  # [T] float32, NaN at each row's last position

    def __post_init__(self) -> None:
        t, k = self.topk_ids.shape
        if self.topk_logprobs.shape != (t, k) or self.next_logprob.shape != (t,):
            raise ValueError(
                "inconsistent ScoredTokens shapes: "
                f"topk_ids {self.topk_ids.shape}, topk_logprobs {self.topk_logprobs.shape}, "
                f"next_logprob {self.next_logprob.shape}"
            )

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])


class TeacherEngine(Protocol):
    """A loaded teacher. Loaded once per worker process and reused by every task."""

    name: str
    version: str
    options: TeacherOptions

    def score(self, sequences: list[list[int]]) -> ScoredTokens:
        """Score each sequence teacher-forced, every position including the last."""
        ...

    def close(self) -> None:
        """Release the engine's processes and memory."""
        ...


class EngineLimitError(ValueError):
    """A request the engine cannot serve (e.g. k above the vocabulary); fatal, not retried."""


def load_engine(options: TeacherOptions) -> TeacherEngine:
    """Build the engine named by `options.engine` (imports are lazy: vLLM is heavy)."""
    if options.engine == "vllm":
        from stages.teacher.vllm_engine import VllmTeacher

        return VllmTeacher(options)
    from stages.teacher.hf_engine import HFTeacher

    return HFTeacher(options)
