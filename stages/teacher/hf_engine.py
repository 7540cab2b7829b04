"""Transformers reference teacher: a plain forward pass, log_softmax, top-k.

This is the oracle the vLLM engine is tested against and the compute floor the benchmark
compares the pipeline with. It is exact (float32 log_softmax) but does no continuous batching.

`generate` is the reference for rollouts: one prompt at a time (its n samples as one batch of
equal-length rows, so no padding touches the numbers) with a KV cache. Greedy decoding is the
part meant to match vLLM token for token. Sampling (temperature > 0) draws from a
`torch.Generator` seeded per prompt with the same `prompt_seeds` as vLLM, so it is
deterministic and independent of the other prompts, but it is a different sampler from vLLM's
(Gumbel noise from per-token SplitMix64 on CPU): the same seed does not give the same samples.
"""

from __future__ import annotations

import numpy as np
import torch

from stages.teacher.engine import (
    EngineLimitError,
    Generated,
    GenerationOptions,
    ScoredTokens,
    TeacherOptions,
    generation_offsets,
    prompt_seeds,
)
from storage.reader import ragged_gather

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFTeacher:
    """`AutoModelForCausalLM` scoring right-padded batches of rows."""

    name = "transformers"

    def __init__(self, options: TeacherOptions, device: str | None = None) -> None:
        import transformers

        self.options = options
        self.version = transformers.__version__
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self._load(options)
        vocab = self.model.config.vocab_size
        if options.k > vocab:
            raise EngineLimitError(f"k={options.k} exceeds the teacher vocabulary ({vocab})")
        self.max_model_len = options.max_model_len or self.model.config.max_position_embeddings

    def _load(self, options: TeacherOptions) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            options.model,
            revision=options.revision,
            dtype=_DTYPES.get(options.dtype, "auto"),
            trust_remote_code=options.trust_remote_code,
        ).to(self.device)
        return model.eval()

    @torch.inference_mode()
    def score(self, sequences: list[list[int]]) -> ScoredTokens:
        k = self.options.k
        # Batches of similar lengths waste the least compute on padding (what a careful user
        # of a plain forward pass would do); the rows come back in input order.
        lengths = np.fromiter(map(len, sequences), np.int64, len(sequences))
        order = np.argsort(lengths, kind="stable")
        step = self.options.batch_rows
        parts = [
            self._score_batch([sequences[j] for j in order[i : i + step]], k)
            for i in range(0, len(sequences), step)
        ]
        if not parts:
            return ScoredTokens(
                np.empty((0, k), np.int32), np.empty((0, k), np.float32), np.empty(0, np.float32)
            )
        sorted_starts = np.concatenate([[0], np.cumsum(lengths[order])[:-1]])
        starts = np.empty_like(sorted_starts)
        starts[order] = sorted_starts
        positions, _ = ragged_gather(starts, lengths)
        return ScoredTokens(
            *(np.concatenate(arrays)[positions] for arrays in zip(*parts, strict=True))
        )

    def _score_batch(self, batch: list[list[int]], k: int) -> tuple[np.ndarray, ...]:
        lengths = torch.tensor([len(s) for s in batch])
        width = int(lengths.max())
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.arange(width)[None, :] < lengths[:, None]  # [B, L]
        ids[mask] = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in batch])
        logits = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device).long()
        ).logits
        # Padding positions are dropped before the [T, V] log_softmax, not after.
        logprobs = torch.log_softmax(logits[mask.to(self.device)].float(), dim=-1)  # [T, V]
        top = torch.topk(logprobs, k, dim=-1)
        # The actual next token of position j is token j+1 of the same row; rows end in NaN.
        next_ids = torch.zeros_like(ids)
        next_ids[:, :-1] = ids[:, 1:]
        next_lp = logprobs.gather(1, next_ids[mask].to(self.device)[:, None])[:, 0]
        last = (torch.cumsum(lengths, 0) - 1).to(self.device)
        next_lp[last] = float("nan")
        return (
            top.indices.to(torch.int32).cpu().numpy(),
            top.values.cpu().numpy(),
            next_lp.cpu().numpy(),
        )

    @torch.inference_mode()
    def generate(
        self,
        sequences: list[list[int]],
        options: GenerationOptions,
        seeds: list[int] | None = None,
        logprobs: bool = False,
    ) -> Generated:
        """Greedy or sampled completions, one prompt at a time; see the module docstring.

        With ``logprobs``: each generated token's raw (log_softmax of the logits) logprob.
        """
        eos = self._eos_ids() if options.stop_at_eos else torch.empty(0, dtype=torch.long)
        samples: list[np.ndarray] = []
        sample_lps: list[np.ndarray] = []
        finish: list[str] = []
        for seq, seed in zip(sequences, prompt_seeds(options, len(sequences), seeds), strict=True):
            if not seq:
                raise ValueError("cannot generate from an empty token sequence")
            if len(seq) >= self.max_model_len:
                raise EngineLimitError(
                    f"a row has {len(seq)} tokens; generation needs room below max_model_len "
                    f"= {self.max_model_len}"
                )
            rows, lps, reasons = self._generate_one(seq, options, seed, eos)
            samples.extend(rows)
            sample_lps.extend(lps)
            finish.extend(reasons)
        counts = np.fromiter((len(r) for r in samples), np.int64, count=len(samples))
        token_ids = np.concatenate(samples) if samples else np.empty(0, np.int32)
        token_lps = None
        if logprobs:
            token_lps = np.concatenate(sample_lps) if samples else np.empty(0, np.float32)
        return Generated(token_ids, generation_offsets(counts), finish, options.n, token_lps)

    def _eos_ids(self) -> torch.Tensor:
        ids: set[int] = set()
        for source in (self.model.generation_config, self.model.config):
            value = getattr(source, "eos_token_id", None)
            if value is not None:
                ids.update([value] if isinstance(value, int) else value)
        return torch.tensor(sorted(ids), dtype=torch.long)

    def _generate_one(
        self, seq: list[int], options: GenerationOptions, seed: int, eos: torch.Tensor
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
        n = options.n
        steps = min(options.max_tokens, self.max_model_len - len(seq))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        eos = eos.to(self.device)
        ids = torch.tensor([seq] * n, dtype=torch.long, device=self.device)  # [n, L]
        out = torch.empty((n, steps), dtype=torch.long, device=self.device)
        out_lp = torch.empty((n, steps), dtype=torch.float32, device=self.device)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        stopped = torch.zeros(n, dtype=torch.bool, device=self.device)
        lengths = torch.full((n,), steps, dtype=torch.long, device=self.device)
        past = None
        for t in range(steps):
            result = self.model(input_ids=ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            logits = result.logits[:, -1].float()
            nxt = self._pick(logits, options, generator)  # [n]
            out[:, t] = nxt
            out_lp[:, t] = torch.log_softmax(logits, -1).gather(1, nxt[:, None])[:, 0]
            hit = ~done & torch.isin(nxt, eos)
            lengths = torch.where(hit, t + 1, lengths)
            stopped |= hit
            done |= hit
            if bool(done.all()):
                break
            ids = nxt[:, None]
        out_np, lengths_np = out.cpu().numpy().astype(np.int32), lengths.cpu().numpy()
        lp_np = out_lp.cpu().numpy()
        rows = [out_np[j, : lengths_np[j]] for j in range(n)]
        lps = [lp_np[j, : lengths_np[j]] for j in range(n)]
        return rows, lps, ["stop" if s else "length" for s in stopped.tolist()]

    @staticmethod
    def _pick(
        logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator
    ) -> torch.Tensor:
        """Next token per row [n] from logits [n, V]: argmax, or a temperature/top-p draw."""
        if options.greedy:
            return logits.argmax(-1)
        probs = torch.softmax(logits / options.temperature, dim=-1)
        if options.top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix reaching top_p (the top token always survives).
            drop = sorted_p.cumsum(-1) - sorted_p >= options.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    def swap_weights(self, path: str) -> None:
        """Serve the checkpoint in ``path`` instead (a plain reload: cheap for this engine)."""
        self.options = self.options.model_copy(update={"model": str(path), "revision": None})
        self.model = self._load(self.options)

    def close(self) -> None:
        del self.model
