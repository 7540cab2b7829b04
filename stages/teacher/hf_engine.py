"""Transformers reference teacher: a plain forward pass, log_softmax, top-k.

This is the oracle the vLLM engine is tested against and the compute floor the benchmark
compares the pipeline with. It is exact (float32 log_softmax) but does no continuous batching.
"""

from __future__ import annotations

import numpy as np
import torch

from stages.teacher.engine import EngineLimitError, ScoredTokens, TeacherOptions

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFTeacher:
    """`AutoModelForCausalLM` scoring right-padded batches of rows."""

    name = "transformers"

    def __init__(self, options: TeacherOptions, device: str | None = None) -> None:
        import transformers
        from transformers import AutoModelForCausalLM

        self.options = options
        self.version = transformers.__version__
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _DTYPES.get(options.dtype, "auto")
        self.model = AutoModelForCausalLM.from_pretrained(
            options.model,
            revision=options.revision,
            dtype=dtype,
            trust_remote_code=options.trust_remote_code,
        ).to(self.device)
        self.model.eval()
        vocab = self.model.config.vocab_size
        if options.k > vocab:
            raise EngineLimitError(f"k={options.k} exceeds the teacher vocabulary ({vocab})")
        self.max_model_len = options.max_model_len or self.model.config.max_position_embeddings

    @torch.inference_mode()
    def score(self, sequences: list[list[int]]) -> ScoredTokens:
        k = self.options.k
        parts = [
            self._score_batch(sequences[i : i + self.options.batch_rows], k)
            for i in range(0, len(sequences), self.options.batch_rows)
        ]
        if not parts:
            return ScoredTokens(
                np.empty((0, k), np.int32), np.empty((0, k), np.float32), np.empty(0, np.float32)
            )
        return ScoredTokens(*(np.concatenate(arrays) for arrays in zip(*parts, strict=True)))

    def _score_batch(self, batch: list[list[int]], k: int) -> tuple[np.ndarray, ...]:
        lengths = torch.tensor([len(s) for s in batch])
        width = int(lengths.max())
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.arange(width)[None, :] < lengths[:, None]  # [B, L]
        ids[mask] = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in batch])
        logits = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device).long()
        ).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)[mask.to(self.device)]  # [T, V]
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

    def close(self) -> None:
        del self.model
