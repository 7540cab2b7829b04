"""vLLM teacher: teacher-forced top-k scoring with prompt logprobs.

One `generate` call per shard: vLLM batches the rows itself (continuous batching, chunked
prefill). Every row asks for `prompt_logprobs=k` (positions 1..n-1) and one greedy token with
`logprobs=k` (the distribution after the last token). Flat logprobs and no detokenisation keep
vLLM from building a Python object per (position, rank); what is left is converted with numpy.

vLLM lays out each scored position as k + 1 entries: the actual (prompt or sampled) token
first, with its rank, then the top-k by rank. We keep entry 0 as the next-token logprob and
entries 1..k as the top-k.

`generate` (rollouts) is one `generate` call too, with a per-prompt `SamplingParams`. What the
code relies on, read in vLLM 0.32's source:
- EOS is kept: the scheduler appends each sampled token to the request, then `check_stop`
  (v1/core/sched/utils.py) finishes it and trims only the tokens *after* the stop token, and
  the detokenizer puts a skipped stop token back into `token_ids` (only `text` drops it). So a
  completion that stops at EOS ends with EOS and reports finish_reason "stop"; one that runs
  out of max_tokens (or the context) reports "length". With ignore_eos the EOS id is not a stop
  token and may appear mid-completion.
- n > 1 is fanned out into child requests (v1/engine/parallel_sampling.py); with the default
  FINAL_ONLY output the parent gathers them by `CompletionOutput.index`, so `outputs[j]` is
  sample j. Child j gets seed `seed + j`. `LLM.generate` returns requests sorted by request id,
  i.e. in input order.
- A request with a seed gets its own `torch.Generator` in the model runner; the CPU sampler
  (`forward_cpu`) and the native one draw that request's noise from it alone, so its samples do
  not depend on which other requests share the batch (up to logits differing in the last bits
  between batch shapes, which can flip a near-tie).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from stages.teacher.engine import (
    LOGPROBS_MODE,
    EngineLimitError,
    Generated,
    GenerationOptions,
    ScoredTokens,
    TeacherOptions,
    generation_offsets,
    prompt_seeds,
)

_GIB = 1 << 30
_CPU_DEFAULT_KV_CACHE_GIB = 1.0
_TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


def preload_tcmalloc() -> str | None:
    """Put tcmalloc in LD_PRELOAD for the engine processes vLLM is about to spawn.

    vLLM's CPU backend asks for it (it already preloads its libgomp the same way). Measured on
    the 45M-parameter benchmark model: 547 -> 669 engine tokens/s (+22%). Only processes
    started after this call see it, which is exactly the engine core and its workers. Returns
    the library used, or None (already preloaded, or not installed: `make install` installs
    Debian's libtcmalloc-minimal4 where it can).
    """
    preload = os.environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload:
        return None
    lib = next((p for p in _TCMALLOC_CANDIDATES if os.path.exists(p)), None)
    if lib is not None:
        os.environ["LD_PRELOAD"] = f"{lib}:{preload}" if preload else lib
    return lib


class VllmTeacher:
    """A `vllm.LLM` held for the life of a worker process."""

    name = "vllm"

    def __init__(self, options: TeacherOptions) -> None:
        # vLLM configures its loggers only when an engine applies its config: what its modules
        # log while importing (Triton's "doesn't include CPU backend") reaches Python's
        # last-resort handler whatever VLLM_LOGGING_LEVEL says. Apply that level first; forked
        # engine processes inherit it.
        level = os.environ.get("VLLM_LOGGING_LEVEL")
        if level:
            logging.getLogger("vllm").setLevel(level.upper())
        import vllm
        from vllm.platforms import current_platform

        self.options = options
        self.version = vllm.__version__
        kv_gib = options.kv_cache_gib
        if current_platform.is_cpu():
            preload_tcmalloc()
            if kv_gib is None:
                # Left alone, the CPU backend reserves a large share of host memory for KV.
                kv_gib = _CPU_DEFAULT_KV_CACHE_GIB
        kwargs: dict = {
            "model": options.model,
            "tokenizer": options.tokenizer_path,
            "revision": options.revision,
            "dtype": options.dtype,
            "max_model_len": options.max_model_len,
            "tensor_parallel_size": options.tensor_parallel_size,
            "max_logprobs": options.k,
            "logprobs_mode": LOGPROBS_MODE,
            "seed": options.seed,
            "trust_remote_code": options.trust_remote_code,
            "enforce_eager": options.enforce_eager,
            "worker_extension_cls": "stages.teacher.weight_swap.WeightSwap",
            # The weight-loading progress bar only with `logitforge --verbose`.
            "use_tqdm_on_load": os.environ.get("LOGITFORGE_VERBOSE") == "1",
        }
        if kv_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_gib * _GIB)
        if options.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
        if options.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = options.max_num_batched_tokens
        self.llm = vllm.LLM(**kwargs)
        vocab = self.llm.llm_engine.model_config.get_vocab_size()
        if options.k > vocab:
            raise EngineLimitError(f"k={options.k} exceeds the teacher vocabulary ({vocab})")
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._params = vllm.SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=options.k,
            prompt_logprobs=options.k,
            flat_logprobs=True,
            detokenize=False,
        )

    def score(self, sequences: list[list[int]]) -> ScoredTokens:
        k = self.options.k
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        if lengths.size and lengths.min() < 1:
            raise ValueError("cannot score an empty token sequence")
        too_long = np.flatnonzero(lengths + 1 > self.max_model_len)
        if too_long.size:
            raise EngineLimitError(
                f"row {int(too_long[0])} has {int(lengths[too_long[0]])} tokens; the engine "
                f"scores at most max_model_len - 1 = {self.max_model_len - 1}"
            )
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(s)} for s in sequences], self._params, use_tqdm=False
        )
        total = int(lengths.sum())
        topk_ids = np.empty((total, k), dtype=np.int32)
        topk_logprobs = np.empty((total, k), dtype=np.float32)
        next_logprob = np.empty(total, dtype=np.float32)
        start = 0
        for n, out in zip(lengths.tolist(), outputs, strict=True):
            stop = start + n
            if n > 1:
                ids, lps = _entries(out.prompt_logprobs, n - 1, k)
                topk_ids[start : stop - 1] = ids[:, 1:]
                topk_logprobs[start : stop - 1] = lps[:, 1:]
                next_logprob[start : stop - 1] = lps[:, 0]
            ids, lps = _entries(out.outputs[0].logprobs, 1, k)
            topk_ids[stop - 1] = ids[0, 1:]
            topk_logprobs[stop - 1] = lps[0, 1:]
            next_logprob[stop - 1] = np.nan
            start = stop
        return ScoredTokens(topk_ids, topk_logprobs, next_logprob)

    def generate(
        self,
        sequences: list[list[int]],
        options: GenerationOptions,
        seeds: list[int] | None = None,
        logprobs: bool = False,
    ) -> Generated:
        """Sample `options.n` completions per prompt; see `prompt_seeds` for the seeding.

        With ``logprobs`` each sampled token's raw logprob comes back too (``logprobs=0``: vLLM
        then returns exactly one entry per position, the sampled token's).
        """
        import vllm

        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        if lengths.size and lengths.min() < 1:
            raise ValueError("cannot generate from an empty token sequence")
        too_long = np.flatnonzero(lengths >= self.max_model_len)
        if too_long.size:
            raise EngineLimitError(
                f"row {int(too_long[0])} has {int(lengths[too_long[0]])} tokens; generation "
                f"needs room below max_model_len = {self.max_model_len}"
            )
        common = {
            "n": options.n,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "max_tokens": options.max_tokens,
            "ignore_eos": not options.stop_at_eos,
            "detokenize": False,
        }
        if logprobs:
            common.update(logprobs=0, flat_logprobs=True)
        params = [
            vllm.SamplingParams(**common, seed=seed)
            for seed in prompt_seeds(options, len(sequences), seeds)
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False
        )
        samples = [c for out in outputs for c in _ordered(out.outputs, options.n)]
        token_ids = (
            np.concatenate([np.asarray(c.token_ids, dtype=np.int32) for c in samples])
            if samples
            else np.empty(0, np.int32)
        )
        counts = np.fromiter((len(c.token_ids) for c in samples), np.int64, count=len(samples))
        token_logprobs = None
        if logprobs:
            token_logprobs = (
                np.concatenate([np.asarray(c.logprobs.logprobs, np.float32) for c in samples])
                if samples
                else np.empty(0, np.float32)
            )
        return Generated(
            token_ids=token_ids,
            offsets=generation_offsets(counts),
            finish_reason=[str(c.finish_reason) for c in samples],
            n=options.n,
            logprobs=token_logprobs,
        )

    def swap_weights(self, path: str) -> None:
        """Serve the checkpoint in folder ``path`` instead, without restarting the engine.

        The checkpoint must have the loaded model's architecture and config (only tensors are
        re-read), every tensor present, and the same tokenizer: `check_swappable` checks.
        """
        check_swappable(self.options.model, path)
        self.llm.collective_rpc("swap_weights", kwargs={"path": str(Path(path).resolve())})
        # Cached prefixes hold keys and values computed with the old weights.
        self.llm.reset_prefix_cache()
        self.options = self.options.model_copy(update={"model": str(path)})

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(
            getattr(engine, "engine_core", None), "shutdown", None
        )
        if shutdown is not None:
            shutdown()
        del self.llm


def _ordered(completions: list, n: int) -> list:
    """A request's n completions by sample index (vLLM already orders them; this checks it)."""
    if len(completions) != n:
        raise RuntimeError(f"vLLM returned {len(completions)} completions, asked for n={n}")
    if any(c.index != j for j, c in enumerate(completions)):
        completions = sorted(completions, key=lambda c: c.index)
    return completions


def _entries(flat, positions: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reshape a FlatLogprobs block of `positions` scored positions to [positions, k + 1]."""
    ids = np.asarray(flat.token_ids, dtype=np.int32)
    lps = np.asarray(flat.logprobs, dtype=np.float32)
    # Prompt logprobs start with an empty entry for position 0; it holds no values.
    if ids.size != positions * (k + 1):
        raise RuntimeError(
            f"vLLM returned {ids.size} logprob entries for {positions} positions; expected "
            f"{positions * (k + 1)} (k + 1 per position). Is flat_logprobs supported?"
        )
    return ids.reshape(positions, k + 1), lps.reshape(positions, k + 1)


# Config keys that describe a checkpoint's provenance, not the computation.
_PROVENANCE_KEYS = {
    "_name_or_path",
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
}


def check_swappable(loaded: str, candidate: str) -> None:
    """Raise ValueError unless ``candidate`` can replace ``loaded``'s weights in place."""

    def config(path: str) -> dict:
        data = json.loads((Path(path) / "config.json").read_text())
        return {k: v for k, v in data.items() if k not in _PROVENANCE_KEYS}

    a, b = config(loaded), config(candidate)
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ValueError(f"{candidate} has another architecture than {loaded}: differs in {diff}")
    from safetensors import safe_open

    def tensors(path: str) -> set[str]:
        names: set[str] = set()
        for file in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(file), "np") as f:
                names.update(f.keys())
        return names

    missing = tensors(loaded) - tensors(candidate)
    if missing:
        raise ValueError(
            f"{candidate} lacks tensors {sorted(missing)[:5]}: vLLM would keep stale ones"
        )
