"""The `smollm2` suite: the whole capture pipeline on a real pretrained LM, on real text.

SmolLM2-135M-Instruct (`make smollm2`: 30 layers, GQA 9/3 heads, a 49,152-token vocabulary)
over chunks of the Python standard library's sources, 500-2,000 characters each (a length mix,
the longest truncated at the context). In one run, on the same prompts:

- the `bench.run` suite measurement: pipeline (steady state, warm tasks, cold start, wall),
  the transformers floor, vLLM alone, and vLLM prefill without logprobs, which says what the
  top-k/logprob processing of a 49k vocabulary costs on top of the forward passes;
- the floor split: the transformers forward alone against forward + log_softmax + top-k;
- the codec table (`bench.codecs.codec_table`) on vLLM's exact output for these prompts;
- generate-teacher on held-out chat prompts: generated tokens/s and the share of
  generations that end in ``<|im_end|>`` within the token budget.

    python -m bench.run --suite smollm2 [--k 64]
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[1]
ROWS = 128  # ~45k tokens: 8 shards of 16, so 7 of them run on a warm engine
ROWS_PER_SHARD = 16
MAX_CHARS = 2000  # 160-840 tokens (3.9 characters a token); a third truncated at 519
MAX_MODEL_LEN = 520
GENERATION_PROMPTS = 32
GENERATION_MAX_TOKENS = 192


def teacher_dir() -> Path:
    from pipeline.demo.smollm2 import DEFAULT_SMOLLM2_DIR, build_smollm2

    build_smollm2(DEFAULT_SMOLLM2_DIR)
    return REPO_ROOT / DEFAULT_SMOLLM2_DIR


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def floor_split(model_dir: Path, sequences: list[list[int]], k: int, batch_rows: int = 8):
    """Seconds of the transformers forward alone and of log_softmax + top-k after it, on the
    same length-sorted batches the reference engine uses."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    order = np.argsort([len(s) for s in sequences], kind="stable")
    forward_s = vocab_s = 0.0
    with torch.inference_mode():
        for i in range(0, len(order), batch_rows):
            batch = [sequences[j] for j in order[i : i + batch_rows]]
            lengths = torch.tensor([len(s) for s in batch])
            mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
            ids = torch.zeros(mask.shape, dtype=torch.long)
            ids[mask] = torch.cat([torch.tensor(s) for s in batch])
            t0 = time.perf_counter()
            logits = model(input_ids=ids, attention_mask=mask.long()).logits
            t1 = time.perf_counter()
            torch.topk(torch.log_softmax(logits[mask].float(), -1), k, dim=-1)
            forward_s += t1 - t0
            vocab_s += time.perf_counter() - t1
    del model
    return {"forward_s": forward_s, "log_softmax_topk_s": vocab_s,
            "vocab_share": vocab_s / (forward_s + vocab_s)}  # fmt: skip


def exact_batch(out: Path, scored, sequences: list[list[int]]):
    """The prompt columns of the pipeline's prompt shards and vLLM's exact output for them as
    an fp32-decoded LogitBatch, with the shard set's metadata: a codec table's input."""
    from storage.codecs import get_codec
    from storage.reader import ShardSet, decode_logit_table
    from storage.schema import build_logit_table
    from storage.writer import parquet_bytes

    files = sorted((out / ".logitforge" / "prompts").glob("*.parquet"))
    prompts = pa.concat_tables([pq.read_table(f) for f in files])
    assert prompts.column("input_ids").to_pylist() == sequences
    meta = ShardSet.open(str(out)).metadata.model_copy(update={"codec": "fp32", "codec_params": {}})
    table = build_logit_table(
        prompts, scored.topk_ids, scored.topk_logprobs, scored.next_logprob, get_codec("fp32")
    )
    decoded = pq.read_table(pa.BufferReader(parquet_bytes(table, meta)))
    return prompts, decode_logit_table(decoded, meta), meta


def bench_generation(model_dir: Path, k: int, prompts: int = GENERATION_PROMPTS) -> dict:
    """generate-teacher on held-out chat prompts, greedy, through the pipeline."""
    from bench.run import WORK_DIR
    from pipeline.config import load_config
    from pipeline.demo.stdlib_data import prompt_rows
    from pipeline.execute import run_cache_teacher
    from storage.layout import ShardSetLayout
    from storage.manifest import read_done, read_plan
    from storage.reader import ShardSet

    data = write_rows(WORK_DIR / "smollm2-prompts.jsonl", prompt_rows(prompts))
    out = WORK_DIR / f"smollm2-generated-k{k}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(
        REPO_ROOT / "configs" / "smollm2" / "generate-chat-greedy.yaml",
        [
            f"input.path={data}",
            f"teacher.model={model_dir}",
            f"teacher.k={k}",
            f"generation.max_tokens={GENERATION_MAX_TOKENS}",
            f"output.path={out}",
            f"output.rows_per_shard={max(1, prompts // 2)}",
        ],
    )
    summary = run_cache_teacher(cfg, log=lambda msg: print("  ", msg, flush=True))
    layout = ShardSetLayout.from_url(str(out))
    plan = read_plan(layout)
    records = [read_done(layout, i) for i in range(plan.num_shards)]
    generate_s = sum(r.timings.get("generate_s", 0.0) for r in records if r)
    batch = ShardSet.open(str(out)).to_batch()
    generated = int(np.diff(batch.row_offsets).sum() - batch.prompt_len.sum())
    # The last one is the warm shard: its rate is the steady state.
    last = max((r for r in records if r), key=lambda r: r.finished_at)
    counts = summary.counts
    return {
        "prompts": prompts,
        "max_tokens": GENERATION_MAX_TOKENS,
        "samples": counts.get("samples", 0),
        "generated_tokens": generated,
        "generated_tokens_per_s": generated / generate_s if generate_s else 0.0,
        "generate_s": generate_s,
        "warm_shard_generate_s": last.timings.get("generate_s"),
        "ended_at_eos": counts.get("stop", 0) / max(1, counts.get("samples", 0)),
        "hit_max_tokens": counts.get("length", 0) / max(1, counts.get("samples", 0)),
        "scored_tokens_per_s": summary.engine_tokens_per_s,
    }


def bench_smollm2(
    k: int = 64, rows: int = ROWS, generation_prompts: int = GENERATION_PROMPTS
) -> dict:
    from bench.codecs import codec_table
    from bench.run import WORK_DIR, Suite, measure_suite
    from pipeline.demo.build import read_build
    from pipeline.demo.code_teacher import code_prompts
    from pipeline.demo.smollm2 import DEFAULT_SMOLLM2_DIR

    model = teacher_dir()
    chunks = code_prompts(rows, seed=0, max_chars=MAX_CHARS, split="train")
    data = write_rows(WORK_DIR / "smollm2-text.jsonl", chunks)
    per_shard = max(1, min(ROWS_PER_SHARD, rows // 4))
    suite = Suite("smollm2-135m", model, data, "float32", MAX_MODEL_LEN, per_shard)
    # The one-core engine of before `cluster.engine_cpus` is measured on the other suites;
    # on a 30-layer model it would add minutes and say nothing new.
    run = measure_suite(suite, k, old_binding=False)
    result = run.result
    print("== smollm2: transformers forward vs log_softmax + top-k", flush=True)
    result["floor_split"] = floor_split(model, run.sequences, k)
    print("== smollm2: codec table on vLLM's exact output", flush=True)
    prompts, exact, meta = exact_batch(run.out, run.vllm.scored, run.sequences)
    record = read_build(REPO_ROOT / DEFAULT_SMOLLM2_DIR) or {}
    result["codecs"] = codec_table(
        prompts, exact, meta, int(record.get("model", {}).get("vocab_size", 49152)),
        "smollm2-135m-instruct", {"heldout": record.get("heldout")},
    )  # fmt: skip
    print("== smollm2: generate-teacher on held-out chat prompts", flush=True)
    result["generation"] = bench_generation(model, k, generation_prompts)
    return result


def render(result: dict) -> str:
    from bench.codecs import render as render_codecs
    from bench.run import render_table

    split, gen = result["floor_split"], result["generation"]
    lines = [
        render_table([result]),
        f"rows {result['rows']} ({result['row_tokens']['min']}-{result['row_tokens']['max']} "
        f"tokens, median {result['row_tokens']['median']:.0f}) in {result['shards']} shards; "
        f"cold start {result['cold_start_s']:.1f} s, cluster + engine start "
        f"{result['startup_s']:.1f} s",
        f"vLLM prefill without logprobs {result['vllm_prefill_no_logprobs_tokens_per_s']:,.0f} "
        f"tok/s: scoring with top-{result['k']} runs at "
        f"{result.get('ratio_engine_to_prefill', 0):.2f} of it",
        f"floor split: forward {split['forward_s']:.1f} s, log_softmax + top-k "
        f"{split['log_softmax_topk_s']:.1f} s ({split['vocab_share']:.0%} of the floor)",
        f"generate-teacher: {gen['samples']} answers, {gen['generated_tokens']:,} tokens at "
        f"{gen['generated_tokens_per_s']:,.0f} tok/s; {gen['ended_at_eos']:.0%} end in "
        f"<|im_end|> within {gen['max_tokens']} tokens",
        render_codecs(result["codecs"]),
    ]
    return "\n".join(lines)
