"""Held-out metrics of a student against a cached teacher shard set.

- ``score_student``: perplexity on the completion tokens, mean per-token KL(teacher || student)
  and top-1 agreement with the teacher, from one transformers forward pass per batch over the
  cached rows (the loader's batches, so the positions are exactly the training positions).
  The KL merges the teacher's tail outside its top-k into one bucket ("rest"): exact on that
  coarser support and, by the data-processing inequality, a lower bound on the full KL.
- ``score_against_teacher``: the same with the teacher model itself at hand (a pruned
  student and its teacher are both here): the KL over the full vocabulary, no bucket.
- ``exact_match``: greedy answers decoded by an engine, compared with the reference completion
  up to the first EOS or newline, surrounding white space ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from stages.train.loader import DistillDataset, LogitSource
from stages.train.losses import forward_kl


@dataclass(frozen=True)
class HeldOut:
    """Prompts and reference completions of a held-out shard set."""

    ids: list[str]
    prompts: list[list[int]]  # prompt token ids per row (the cache's tokenizer)
    references: list[str]  # the completion text per row
    max_completion_tokens: int
    prompt_texts: list[str]  # the prompt text per row, for a model with another tokenizer


def held_out_rows(source: LogitSource, limit: int | None = None) -> HeldOut:
    """Prompt token ids and reference completions of every row (or the first ``limit``)."""
    if source.shard_set is None:
        raise ValueError(f"{source.url}: evaluation needs a logitforge shard set")
    table = source.shard_set.read_table(strict=True)
    if limit is not None:
        table = table.slice(0, limit)
    prompt_len = table.column("prompt_len").to_numpy()
    if (prompt_len < 1).any():
        raise ValueError(f"{source.url}: rows without a prompt cannot be evaluated by decoding")
    input_ids = table.column("input_ids").to_pylist()
    starts = table.column("byte_start").to_pylist()
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
    references, prompt_texts = [], []
    for text, start, p in zip(table.column("text").to_pylist(), starts, prompt_len, strict=True):
        raw = text.encode("utf-8")
        cut = start[p] if p < len(start) else len(raw)
        references.append(raw[cut:].decode("utf-8", errors="replace"))
        prompt_texts.append(raw[:cut].decode("utf-8", errors="replace"))
    return HeldOut(
        prompt_texts=prompt_texts,
        ids=table.column("id").to_pylist(),
        prompts=[ids[:p] for ids, p in zip(input_ids, prompt_len, strict=True)],
        references=references,
        max_completion_tokens=int((lengths - prompt_len).max()),
    )


def answer_text(generated: str) -> str:
    """What counts as the answer: up to the first newline, without surrounding white space."""
    return generated.split("\n", 1)[0].strip()


def exact_match(generated: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """bool [R]: each generated answer equals its reference (see :func:`answer_text`)."""
    return np.array(
        [answer_text(g) == answer_text(r) for g, r in zip(generated, references, strict=True)]
    )


def decode_answers(tokenizer: Any, token_ids: np.ndarray, offsets: np.ndarray) -> list[str]:
    """Text of each generated sample, cut at its first EOS, special tokens dropped."""
    samples = np.split(token_ids, offsets[1:-1])
    eos = tokenizer.eos_token_id
    cut = []
    for s in samples:  # one slice per sample, not per token
        hits = np.flatnonzero(s == eos) if eos is not None else np.zeros(0, dtype=np.int64)
        cut.append(s[: hits[0]] if hits.size else s)
    return tokenizer.batch_decode([c.tolist() for c in cut], skip_special_tokens=True)


def held_out_batches(
    source: LogitSource, *, pad_id: int, batch_size: int = 256, include_prompt: bool = False
) -> DistillDataset:
    """One unshuffled pass over ``source`` in training batches (the trained positions)."""
    return DistillDataset(
        [source],
        batch_size=batch_size,
        pad_id=pad_id,
        include_prompt=include_prompt,
        shuffle=False,
    )


@torch.inference_mode()
def score_student(
    model: Any,
    dataset: DistillDataset,
    *,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Perplexity, KL(teacher || student) and top-1 agreement on the cached positions.

    ``dataset`` is one unshuffled pass over the held-out cache (see :func:`held_out_batches`);
    reusing it across checkpoints lets its shard cache read and verify the shards once.
    """
    model.eval()
    nll = kl = agree = 0.0
    tokens = 0
    for batch in dataset:
        mask = batch["loss_mask"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[mask].float()
        targets = batch["target_ids"][mask]
        topk_ids = batch["topk_ids"][mask]
        n = int(mask.sum())
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        kl += float(forward_kl(logits, topk_ids, batch["topk_logprobs"][mask], tail="rest")) * n
        agree += float((logits.argmax(-1) == topk_ids[:, 0]).sum())
        tokens += n
        if progress is not None:
            progress(tokens)
    if tokens == 0:
        raise ValueError(f"{dataset.sources[0].url}: no trained positions to evaluate")
    return {
        "perplexity": math.exp(nll / tokens),
        "nll": nll / tokens,
        "kl_to_teacher": kl / tokens,
        "top1_agreement": agree / tokens,
        "tokens": tokens,
    }


def full_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """[N] KL(teacher || student) per position over the whole vocabulary, in nats.

    The vocabularies may differ in padding (a model's embedding is often rounded up): both
    are cut to the shorter one, whose ids are the tokenizer's.
    """
    v = min(teacher_logits.shape[-1], student_logits.shape[-1])
    lt = torch.log_softmax(teacher_logits[..., :v].double(), -1)
    ls = torch.log_softmax(student_logits[..., :v].double(), -1)
    return (lt.exp() * (lt - ls)).sum(-1)


@torch.inference_mode()
def score_against_teacher(model: Any, teacher: Any, dataset: DistillDataset) -> dict[str, float]:
    """Perplexity, full-vocabulary KL(teacher || student) and top-1 agreement with the
    teacher's argmax on the trained positions of ``dataset`` (the loader's batches)."""
    from stages.train.trainer import logits_at, model_inputs

    model.eval()
    teacher.eval()
    nll = kl = agree = 0.0
    tokens = 0
    for batch in dataset:
        mask = batch["loss_mask"]
        logits = []
        for m in (model, teacher):  # the output layer runs on the trained positions only
            with logits_at(m, mask) as at:
                logits.append(at.select(m(**model_inputs(batch)).logits).float())
        student, reference = logits
        targets = batch["target_ids"][mask]
        nll += float(torch.nn.functional.cross_entropy(student, targets, reduction="sum"))
        kl += float(full_kl(reference, student).sum())
        agree += float((student.argmax(-1) == reference.argmax(-1)).sum())
        tokens += int(mask.sum())
    if tokens == 0:
        raise ValueError(f"{dataset.sources[0].url}: no trained positions to evaluate")
    return {
        "perplexity": math.exp(nll / tokens),
        "nll": nll / tokens,
        "kl_full": kl / tokens,
        "top1_agreement": agree / tokens,
        "tokens": tokens,
    }
