"""Evaluate checkpoints on a held-out teacher shard set: accuracy, perplexity, KL to teacher.

Accuracy is decoded with vLLM (greedy, the way the model would be served). Checkpoints of the
same architecture share one engine: their weights are swapped in place (tens of milliseconds)
instead of starting an engine per checkpoint (tens of seconds on a CPU). Perplexity, KL and
top-1 agreement come from a transformers forward pass over the cached rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from stages.evaluate.metrics import (
    decode_answers,
    exact_match,
    held_out_batches,
    held_out_rows,
    score_student,
)
from stages.prompts import tokenizer_fingerprint
from stages.teacher.engine import GenerationOptions, TeacherOptions
from stages.train.loader import DistillDataset, open_sources
from stages.train.student import load_tokenizer

Log = Callable[[str], None]


class EvalOptions(BaseModel):
    """What a checkpoint is evaluated on, and how the decoding engine is sized."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="Held-out shard set: prompts, reference completions, teacher.")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Default: the longest reference completion + 2."
    )
    batch_size: int = Field(256, ge=1, description="Rows per forward pass for perplexity/KL.")
    kv_cache_gib: float = Field(0.5, gt=0, description="vLLM KV cache of the decoding engine.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads for the forward.")


def evaluate_checkpoints(
    models: list[str], opts: EvalOptions, log: Log = print
) -> list[dict[str, Any]]:
    """One result dict per checkpoint, in order. Raises before decoding on a foreign cache."""
    from stages.teacher.vllm_engine import VllmTeacher

    (source,) = open_sources([opts.data])
    held = held_out_rows(source)
    max_new = opts.max_new_tokens or held.max_completion_tokens + 2
    generation = GenerationOptions(max_tokens=max_new)
    log(f"evaluate: {len(held.prompts):,} held-out prompts from {opts.data}")
    # Built once, so every checkpoint's forward pass reads the shards from its cache. The pad
    # id only fills positions that are masked out, so any checkpoint's tokenizer serves.
    batches: DistillDataset | None = None
    results: list[dict[str, Any]] = []
    engine = None
    try:
        for path in models:
            tokenizer = load_tokenizer(path)
            # A model with another tokenizer (a cross-tokenizer student) is prompted with the
            # prompt text cut by its own tokenizer; per-token perplexity and KL to the teacher
            # are not comparable across tokenizers and are left out (None).
            same = tokenizer_fingerprint(tokenizer) == source.metadata.tokenizer_fingerprint
            prompts = (
                held.prompts
                if same
                else tokenizer(held.prompt_texts, add_special_tokens=True)["input_ids"]
            )
            t0 = time.perf_counter()
            if engine is not None:
                try:
                    engine.swap_weights(path)
                except ValueError:  # another architecture: a fresh engine
                    engine.close()
                    engine = None
            if engine is None:
                engine = VllmTeacher(
                    TeacherOptions(model=path, k=1, dtype="float32", kv_cache_gib=opts.kv_cache_gib)
                )
            load_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            generated = engine.generate(prompts, generation)
            answers = decode_answers(tokenizer, generated.token_ids, generated.offsets)
            correct = exact_match(answers, held.references)
            decode_s = time.perf_counter() - t1
            metrics: dict[str, float | None] = dict.fromkeys(
                ("perplexity", "kl_to_teacher", "top1_agreement")
            )
            if same:
                if batches is None:
                    batches = held_out_batches(
                        source, pad_id=tokenizer.pad_token_id, batch_size=opts.batch_size
                    )
                metrics = {**metrics, **_forward_metrics(path, batches, opts)}
            result = {
                "model": path,
                "accuracy": float(correct.mean()),
                "n": len(correct),
                **metrics,
                "engine_load_s": round(load_s, 2),
                "decode_s": round(decode_s, 2),
            }
            results.append(result)
            log(
                f"  {path}: accuracy {result['accuracy']:.3f}"
                + (
                    f", perplexity {result['perplexity']:.3f}, KL to teacher "
                    f"{result['kl_to_teacher']:.4f}"
                    if same
                    else " (another tokenizer: no per-token perplexity or KL)"
                )
            )
    finally:
        if engine is not None:
            engine.close()
    return results


def _forward_metrics(path: str, batches: DistillDataset, opts: EvalOptions) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return score_student(model, batches)
    finally:
        torch.set_num_threads(threads)


def render_table(results: list[dict[str, Any]]) -> str:
    """A plain-text table of evaluation results."""
    header = f"{'model':<48} {'accuracy':>9} {'perplexity':>11} {'KL':>8} {'top-1':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        cells = [
            "" if r[key] is None else format(r[key], fmt)
            for key, fmt in (("perplexity", ">11.4f"), ("kl_to_teacher", ">8.4f"))
        ] + ["" if r["top1_agreement"] is None else format(r["top1_agreement"], ">7.3f")]
        lines.append(
            f"{r['model'][-48:]:<48} {r['accuracy']:>9.3f} {cells[0]:>11} {cells[1]:>8} "
            f"{cells[2]:>7}"
        )
    return "\n".join(lines)
