"""The boundary every teacher engine implements.

An engine scores whole token sequences teacher-forced: for a row of n tokens it returns n
distributions, position j predicting token j+1 (the last one predicts the token after the
row). Outputs are concatenated over rows in input order so the storage layer can build
Arrow list arrays from one flat buffer without a Python loop over tokens.

An engine also generates (rollouts): `generate` continues each prompt and returns the sampled
tokens in the same flat layout (`Generated`), samples of one prompt adjacent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vLLM's share of GPU memory (default 0.9); lower it when a teacher and "
        "a policy engine share a GPU.",
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


class GenerationOptions(BaseModel):
    """How completions are sampled; the same for every prompt of a call."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(1, ge=1, description="Completions per prompt.")
    temperature: float = Field(0.0, ge=0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(32, ge=1, description="Most tokens generated per completion.")
    seed: int = Field(0, description="Base seed; with the per-prompt seeds it fixes every sample.")
    stop_at_eos: bool = Field(
        True, description="Stop a completion at EOS (included); False generates max_tokens."
    )

    @property
    def greedy(self) -> bool:
        # vLLM's threshold (sampling_params._SAMPLING_EPS): below it a request is greedy.
        return self.temperature < 1e-5

    @model_validator(mode="after")
    def _n_needs_sampling(self) -> GenerationOptions:
        if self.n > 1 and self.greedy:
            # Greedy samples would be n copies; vLLM rejects the request outright.
            raise ValueError(f"n={self.n} completions per prompt need temperature > 0")
        return self


@dataclass(frozen=True)
class Generated:
    """Completions of a batch of prompts, flattened: prompt i owns samples i*n .. i*n+n-1.

    G is the number of generated tokens of all samples, S = num_prompts * n the number of
    samples; sample s is token_ids[offsets[s]:offsets[s+1]].
    """

    token_ids: np.ndarray  # [G] int32, EOS included as the last token when generated
    offsets: np.ndarray  # [S + 1] int64, offsets[0] == 0, offsets[-1] == G
    finish_reason: list[str]  # [S] "stop" (EOS or a stop token) | "length" (max_tokens/context)
    n: int
    # [G] float32: the generating model's raw (T = 1) logprob of each generated token, when
    # asked for (rollouts: the behaviour policy's logprobs); None otherwise.
    logprobs: np.ndarray | None = None

    def __post_init__(self) -> None:
        s = len(self.finish_reason)
        if self.n < 1 or s % self.n:
            raise ValueError(f"{s} samples is not a multiple of n={self.n}")
        if self.offsets.shape != (s + 1,) or self.token_ids.ndim != 1:
            raise ValueError(
                f"inconsistent Generated shapes: offsets {self.offsets.shape} for {s} samples, "
                f"token_ids {self.token_ids.shape}"
            )
        if s and (self.offsets[0] != 0 or self.offsets[-1] != self.token_ids.size):
            raise ValueError("offsets must run from 0 to len(token_ids)")
        if self.logprobs is not None and self.logprobs.shape != self.token_ids.shape:
            raise ValueError(
                f"logprobs {self.logprobs.shape} do not match token_ids {self.token_ids.shape}"
            )

    @property
    def num_samples(self) -> int:
        return len(self.finish_reason)

    @property
    def num_prompts(self) -> int:
        return self.num_samples // self.n

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sample [S] int64."""
        return np.diff(self.offsets)

    def sample(self, s: int) -> np.ndarray:
        return self.token_ids[self.offsets[s] : self.offsets[s + 1]]


def generation_offsets(lengths: np.ndarray) -> np.ndarray:
    """[S + 1] int64 offsets from per-sample lengths [S]."""
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def prompt_seeds(
    options: GenerationOptions, num_prompts: int, seeds: list[int] | None
) -> list[int]:
    """Per-prompt base seeds, each in [0, 2**62): sample j of prompt i uses seed_i + j.

    ``seeds`` (one per prompt) should come from something stable about the prompt, e.g. its
    global row index or a hash of its id, so a prompt draws the same samples whichever shard
    or batch it lands in; without it prompt i of this call gets ``options.seed + i``, which is
    only stable for the same call. Either way the value is mixed with ``options.seed``
    (splitmix64), so two prompts' sample streams overlap only if their mixed seeds fall within
    n of each other (vLLM seeds sample j of a request with seed + j): probability ~n/2**62.
    """
    if seeds is None:
        seeds = [options.seed + i for i in range(num_prompts)]
    elif len(seeds) != num_prompts:
        raise ValueError(f"got {len(seeds)} seeds for {num_prompts} prompts")
    mask = (1 << 64) - 1
    out = []
    for s in seeds:  # one per prompt, not per token
        z = ((options.seed * 0x9E3779B97F4A7C15) ^ (s & mask)) & mask
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append((z ^ (z >> 31)) >> 2)  # 62 bits: seed + j stays a valid torch seed
    return out


class TeacherEngine(Protocol):
    """A loaded teacher. Loaded once per worker process and reused by every task."""

    name: str
    version: str
    options: TeacherOptions
    max_model_len: int  # longest sequence the engine serves (prompt + one predicted token)

    def score(self, sequences: list[list[int]]) -> ScoredTokens:
        """Score each sequence teacher-forced, every position including the last."""
        ...

    def generate(
        self,
        sequences: list[list[int]],
        options: GenerationOptions,
        seeds: list[int] | None = None,
        logprobs: bool = False,
    ) -> Generated:
        """Continue each token sequence with `options.n` completions (see `prompt_seeds`).

        With ``logprobs`` the result also holds each generated token's raw logprob.
        """
        ...

    def close(self) -> None:
        """Release the engine's processes and memory."""
        ...


class EngineLimitError(ValueError):
    """A request the engine cannot serve (e.g. k above the vocabulary); fatal, not retried."""
