"""`make bench`: capture throughput of the whole pipeline against the compute floor.

Every figure is a ratio to a baseline measured in the same run, on the same model and the
same prompts (absolute times on shared CPU machines are noise):

- floor     transformers forward + log_softmax + top-k (the stages.teacher reference engine)
- engine    the vLLM teacher alone, in-process, on the pipeline's own prompt shards
- pipeline  `cache-teacher` end to end on a LocalCluster: read, tokenize, plan, engine,
            encode, atomic write, completion records. Reported twice: steady state (planning
            plus task time, what scales with data) and wall (including cluster and engine start).

Plus bytes/token on disk for each codec at the same k, encoded from the same teacher output.

Plus the student loader's tokens/s against a training step's consumption (bench/loader.py).

Plus planning (bench/plan.py): rows/s and driver peak RSS of planning on a LocalCluster at
100k and 1M synthetic rows (10M with --slow), against the in-driver planner at the same sizes
(~3 minutes of `make bench`).

Plus the codec table (bench/codecs.py): bytes/token, encode/decode speed and fidelity (KL to
exact, top-1, rest mass) of every codec on one exact cache of the trained 32k-vocabulary
code teacher.

Plus the `smollm2` suite (bench/smollm2.py): the same three measurements on the real
SmolLM2-135M-Instruct over standard-library text with a length mix, the floor's split into
forward and vocabulary work, vLLM prefill without logprobs, the codec table on its exact
output, and generate-teacher on held-out chat prompts (tokens/s, share ending in EOS).

Plus the student step at a 151,936-token vocabulary (bench/student_step.py): forward, loss,
backward and optimizer time per loss kind, the fused path against the previous one.

Plus packed against padded training batches on the real teacher's cache (bench/packing.py):
trained tokens/s of a pruned SmolLM2 student, the same batches both ways.

Plus cross-tokenizer alignment: vectorised `align_spans` against its per-token reference on
the same rows, and `Aligner.align` end to end (bench/align.py; a few seconds, no teacher).

    python -m bench.run [--suite tiny|llama45m|smollm2|student|packing|loader|align|plan|codecs
                         |all] [--rows N] [--seq-len N] [--k 64] [--slow]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cpus import (
    AUTO,
    BIND_ENV,
    THREAD_LIMIT_ENVS,
    allowed_cpus,
    bind_engine_cpus,
    engine_cpus,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
WORK_DIR = REPO_ROOT / "artifacts" / "bench"


@dataclass
class Suite:
    """A model and a prompt set to measure on."""

    name: str
    model_dir: Path
    input_path: Path
    dtype: str
    max_model_len: int
    rows_per_shard: int


def _teacher_dir() -> Path:
    from pipeline.demo.build import DEFAULT_TEACHER_DIR, build_teacher

    path = REPO_ROOT / DEFAULT_TEACHER_DIR
    build_teacher(path)
    return path


def make_llama45m(out: Path, tokenizer_dir: Path) -> Path:
    """A ~45M-parameter Llama (vocab 32000) like DESIGN.md's measurements.

    Random weights are fine for throughput (not for fidelity). It reuses the teacher's
    tokenizer, whose ids are a subset of the 32000-entry vocabulary, so the log_softmax and
    top-k still run over 32000 logits.
    """
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp)
    tmp.rename(out)
    return out


def make_text_rows(path: Path, rows: int, chars: int, seed: int) -> Path:
    """Rows of arithmetic text ~`chars` long (digits tokenize one per token)."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(rows):
        parts, size = [], 0
        while size < chars:
            a, b = (int(x) for x in rng.integers(0, 1000, size=2))
            part = f"{a}+{b}={a + b} "
            parts.append(part)
            size += len(part)
        lines.append(json.dumps({"id": f"bench-{i}", "text": "".join(parts)[:chars]}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _prompt_sequences(out: Path) -> list[list[int]]:
    from stages.teacher.stage import read_sequences

    files = sorted((out / ".logitforge" / "prompts").glob("*.parquet"))
    return [seq for f in files for seq in read_sequences(pq.read_table(f))]


def run_pipeline(suite: Suite, k: int, out: Path) -> dict:
    from pipeline.config import load_config
    from pipeline.execute import run_cache_teacher

    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(
        None,
        [
            f"input.path={suite.input_path}",
            f"teacher.model={suite.model_dir}",
            f"teacher.k={k}",
            f"teacher.dtype={suite.dtype}",
            f"teacher.max_model_len={suite.max_model_len}",
            f"output.path={out}",
            f"output.rows_per_shard={suite.rows_per_shard}",
        ],
    )
    t0 = time.perf_counter()
    summary = run_cache_teacher(cfg, log=lambda msg: print("  ", msg, flush=True))
    wall = time.perf_counter() - t0
    return {"summary": summary, "wall_s": wall}


@dataclass
class EngineRun:
    """One engine's tokens/s on a prompt set, after a warm-up call, and its output."""

    tokens_per_s: float
    scored: object  # stages.teacher.ScoredTokens
    # vLLM only: the same prompts prefilled without any logprobs (one generated token, no
    # prompt_logprobs), so tokens_per_s / prefill_tokens_per_s is what the top-k and
    # logprob processing of the vocabulary costs on top of the forward passes.
    prefill_tokens_per_s: float | None = None


def measure_engine(options, sequences: list[list[int]]) -> EngineRun:
    """Tokens/s of one engine on `sequences`, after a warm-up call; returns the scores too."""
    from stages.teacher import load_engine

    engine = load_engine(options)
    try:
        engine.score(sequences[: max(1, len(sequences) // 16)])
        t0 = time.perf_counter()
        scored = engine.score(sequences)
        seconds = time.perf_counter() - t0
        prefill = None
        if options.engine == "vllm":
            import vllm

            params = vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
            prompts = [{"prompt_token_ids": s} for s in sequences]
            # Scoring just filled the prefix cache with these prompts (requests with
            # prompt_logprobs bypass it, these would not): empty it, or the prefill is free.
            engine.llm.reset_prefix_cache()
            t0 = time.perf_counter()
            engine.llm.generate(prompts, params, use_tqdm=False)
            prefill = scored.num_tokens / (time.perf_counter() - t0)
    finally:
        engine.close()
        gc.collect()
    return EngineRun(scored.num_tokens / seconds, scored, prefill)


def codec_bytes(scored, sequences: list[list[int]], k: int) -> dict[str, float]:
    """Bytes/token of a Parquet shard holding the same teacher output under each codec."""
    from storage.codecs import KNOWN_CODECS, get_codec
    from storage.schema import PROMPT_SCHEMA, build_logit_table
    from storage.writer import parquet_bytes

    lengths = np.array([len(s) for s in sequences])
    prompts = pa.table(
        {
            "id": [str(i) for i in range(len(sequences))],
            "input_ids": pa.array(sequences, pa.list_(pa.int32())),
            "prompt_len": pa.array(np.zeros(len(sequences), np.int32)),
            "text": [""] * len(sequences),
            "byte_start": pa.array([np.zeros(n, np.int32) for n in lengths], pa.list_(pa.int32())),
            "byte_end": pa.array([np.zeros(n, np.int32) for n in lengths], pa.list_(pa.int32())),
            "truncated": [False] * len(sequences),
        },
        schema=PROMPT_SCHEMA,
    )
    out = {}
    for name in KNOWN_CODECS:
        table = build_logit_table(
            prompts, scored.topk_ids, scored.topk_logprobs, scored.next_logprob, get_codec(name)
        )
        out[name] = len(parquet_bytes(table, None, "zstd")) / scored.num_tokens
    return out


@dataclass
class TaskBreakdown:
    """What the completion records of one pipeline run say about its tasks."""

    warm_tokens_per_s: float  # tasks after each worker's first (its engine is warm)
    stage_share: dict[str, float]  # share of task time in read / engine / encode / write
    cold_start_s: float  # first shards' time beyond what the warm rate gives their tokens
    task_s: float  # summed task time


def task_breakdown(out: Path) -> TaskBreakdown:
    """Task tokens/s once each worker's engine is warm, and where task time goes.

    A worker's first shard carries the engine's first forward passes (graph capture, allocator
    growth): on a short benchmark that one-off cost, not the stage, sets the steady-state rate.
    So the warm rate leaves out each worker's first finished shard, and that shard's extra
    time is reported on its own as the cold start.
    """
    from storage.layout import ShardSetLayout
    from storage.manifest import read_done, read_plan

    layout = ShardSetLayout.from_url(str(out))
    plan = read_plan(layout)
    records = sorted(
        (r for i in range(plan.num_shards) if (r := read_done(layout, i)) is not None),
        key=lambda r: r.finished_at,
    )
    seen: set[str] = set()
    warm, first = [], []
    for record in records:
        (warm if record.worker in seen else first).append(record)
        seen.add(record.worker)
    warm_s = sum(r.timings.get("total_s", 0.0) for r in warm)
    warm_tps = sum(r.tokens for r in warm) / warm_s if warm_s else 0.0
    total = sum(r.timings.get("total_s", 0.0) for r in records)
    stages = ("read_s", "engine_s", "encode_s", "write_s")
    share = {s: sum(r.timings.get(s, 0.0) for r in records) / (total or 1.0) for s in stages}
    cold = sum(r.timings.get("total_s", 0.0) - (r.tokens / warm_tps if warm_tps else 0.0)
               for r in first)  # fmt: skip
    return TaskBreakdown(warm_tps, share, cold, total)


@dataclass
class SuiteRun:
    """Everything one suite measured, with the engines' outputs for further tables."""

    result: dict
    out: Path  # the pipeline's shard set
    sequences: list[list[int]]
    vllm: EngineRun


def measure_suite(suite: Suite, k: int, old_binding: bool = True) -> SuiteRun:
    """The pipeline, the transformers floor and vLLM alone on the same prompts, in one run.

    The headline ``pipeline_tokens_per_s`` is the steady state a long job runs at: its
    tasks (read, engine, encode, atomic write, record) once each worker's engine is warm. A
    job of thousands of shards pays the one-off costs once, and a benchmark of a few shards
    would let them set the figure, so each is reported apart: planning (``plan_s``: on a
    benchmark-sized input mostly the workers' tokenizer load; its per-row cost is the plan
    suite's rows/s, thousands of times the engine's rate), the first shard's warm-up
    (``cold_start_s``), the cluster and engine start (``startup_s``), and the rates with
    planning and every task (``pipeline_tasks_tokens_per_s``) and with all of it (wall).
    ``old_binding`` adds vLLM alone as workers ran it before ``cluster.engine_cpus``.
    """
    from stages.teacher import TeacherOptions

    print(f"== {suite.name}: pipeline (LocalCluster + vLLM)", flush=True)
    out = WORK_DIR / f"{suite.name}-k{k}"
    run = run_pipeline(suite, k, out)
    summary = run["summary"]
    sequences = _prompt_sequences(out)
    tokens = sum(map(len, sequences))
    options = TeacherOptions(
        model=str(suite.model_dir), k=k, dtype=suite.dtype, max_model_len=suite.max_model_len
    )
    print(f"== {suite.name}: compute floor (transformers forward + log_softmax + top-{k})")
    floor = measure_engine(
        options.model_copy(update={"engine": "transformers", "batch_rows": 8}), sequences
    )
    print(f"== {suite.name}: vLLM engine alone")
    engine = measure_engine(options, sequences)
    default_tps = None
    if old_binding and not _has_cuda():
        # Part of the same run: the engine as a Dask worker started it before
        # `cluster.engine_cpus`: vLLM's own binding (one core reserved) under the nanny's
        # thread limits of 1.
        print(f"== {suite.name}: vLLM engine alone, as a worker ran it before engine_cpus")
        with _env({BIND_ENV: "auto", **dict.fromkeys(THREAD_LIMIT_ENVS, "1")}):
            default_tps = measure_engine(options, sequences).tokens_per_s
    tasks = task_breakdown(out)
    floor_tps = floor.tokens_per_s
    steady_tps = tasks.warm_tokens_per_s
    # Planning plus every task as timed, the first shard's warm-up included.
    tasks_tps = tokens / (summary.plan_s + summary.engine_s) if summary.engine_s else 0.0
    result = {
        "suite": suite.name,
        "model": str(suite.model_dir.relative_to(REPO_ROOT)),
        "dtype": suite.dtype,
        "k": k,
        "rows": len(sequences),
        "shards": summary.shards,
        "tokens": tokens,
        "row_tokens": {
            "min": min(map(len, sequences)),
            "median": float(np.median([len(s) for s in sequences])),
            "max": max(map(len, sequences)),
        },
        "floor_tokens_per_s": floor_tps,
        "vllm_engine_tokens_per_s": engine.tokens_per_s,
        "vllm_prefill_no_logprobs_tokens_per_s": engine.prefill_tokens_per_s,
        "vllm_engine_default_binding_tokens_per_s": default_tps,
        "engine_cpus": os.environ.get(BIND_ENV),
        "pipeline_tokens_per_s": steady_tps,
        "pipeline_tasks_tokens_per_s": tasks_tps,
        "pipeline_wall_tokens_per_s": tokens / run["wall_s"],
        "pipeline_wall_s": run["wall_s"],
        "plan_s": summary.plan_s,
        "cold_start_s": tasks.cold_start_s,
        "startup_s": run["wall_s"] - summary.plan_s - tasks.task_s,
        "ratio_engine_to_floor": engine.tokens_per_s / floor_tps,
        "ratio_pipeline_to_floor": steady_tps / floor_tps,
        "ratio_pipeline_to_engine": steady_tps / engine.tokens_per_s,
        "ratio_tasks_to_floor": tasks_tps / floor_tps,
        "task_time_share": tasks.stage_share,
        "ratio_pipeline_wall_to_floor": tokens / run["wall_s"] / floor_tps,
        "bytes_per_token_on_disk": summary.bytes_per_token,
        "bytes_per_token_by_codec": codec_bytes(floor.scored, sequences, k),
    }
    if engine.prefill_tokens_per_s:
        result["ratio_engine_to_prefill"] = engine.tokens_per_s / engine.prefill_tokens_per_s
    return SuiteRun(result, out, sequences, engine)


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--suite",
        choices=[
            "tiny",
            "llama45m",
            "smollm2",
            "student",
            "packing",
            "loader",
            "align",
            "plan",
            "codecs",
            "all",
        ],
        default="all",
    )
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--slow", action="store_true", help="plan suite: add 10M rows")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The in-process engines (floor, vLLM alone) get the cores a single pipeline worker gets.
    bind_engine_cpus(engine_cpus(AUTO, None, None, allowed_cpus()))

    no_teacher = ("align", "codecs", "smollm2", "student", "packing")
    teacher = _teacher_dir() if args.suite not in no_teacher else None
    suites = []
    if args.suite in ("tiny", "loader", "all"):
        suites.append(
            Suite(
                "tiny-teacher", teacher, REPO_ROOT / "configs/data/arith.jsonl", "float32", 64, 256
            )
        )
    if args.suite in ("llama45m", "all"):
        model = make_llama45m(WORK_DIR / "llama45m", teacher)
        data = make_text_rows(WORK_DIR / "llama45m-text.jsonl", args.rows, args.seq_len, seed=0)
        # bf16 on a GPU; float32 on CPUs, where bf16 matmuls are emulated without
        # AVX512-BF16/AMX (the floor measured ~3x slower than float32 on an AVX2 machine).
        dtype = "bfloat16" if _has_cuda() else "float32"
        suites.append(Suite(f"llama45m-{dtype}", model, data, dtype, args.seq_len + 8, 16))

    results = [
        measure_suite(s, args.k).result for s in suites if args.suite in ("tiny", "llama45m", "all")
    ]
    report = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "results": results,
    }
    smollm2 = None
    if args.suite in ("smollm2", "all"):
        from bench.smollm2 import bench_smollm2

        smollm2 = report["smollm2"] = bench_smollm2(k=args.k)
    student = None
    if args.suite in ("student", "all"):
        from bench.student_step import bench_student_step

        print("== student step at a 151,936-token vocabulary (old path vs new)", flush=True)
        student = report["student_step"] = bench_student_step()
    packing = None
    if args.suite in ("packing", "all"):
        from bench.packing import bench_packing

        packing = report["packing"] = bench_packing()
    loader = None
    if args.suite in ("loader", "all"):
        from bench.loader import bench_loader

        cache = WORK_DIR / f"tiny-teacher-k{args.k}"
        if not (cache / ".logitforge" / "plan.json").exists():
            run_pipeline(suites[0], args.k, cache)
        loader = report["loader"] = bench_loader(cache)
    align = None
    if args.suite in ("align", "all"):
        from bench.align import bench_align

        align = report["align"] = bench_align()
    planning = None
    if args.suite in ("plan", "all"):
        from bench.plan import bench_plan

        sizes = (100_000, 1_000_000, 10_000_000) if args.slow else (100_000, 1_000_000)
        planning = report["plan"] = bench_plan(sizes)
    codecs = None
    if args.suite in ("codecs", "all"):
        from bench.codecs import bench_codecs

        print("== codecs: exact cache of the code teacher, then every codec", flush=True)
        codecs = report["codecs"] = bench_codecs(k=args.k)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"capture-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS_DIR / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    if results:
        print(render_table(results))
    if smollm2 is not None:
        from bench.smollm2 import render as render_smollm2

        print(render_smollm2(smollm2))
    if student is not None:
        from bench.student_step import render as render_student

        print(render_student(student))
    if packing is not None:
        from bench.packing import render as render_packing

        print(render_packing(packing))
    if loader is not None:
        from bench.loader import render

        print(render(loader))
    if align is not None:
        from bench.align import render as render_align

        print(render_align(align))
    if planning is not None:
        from bench.plan import render as render_plan

        print(render_plan(planning))
    if codecs is not None:
        from bench.codecs import render as render_codecs

        print(render_codecs(codecs))
    print(f"results: {path.relative_to(REPO_ROOT)}")
    return 0


def render_table(results: list[dict]) -> str:
    head = (
        f"{'suite':<16} {'tokens':>8} {'floor tok/s':>12} {'vLLM tok/s':>11} {'(default)':>10} "
        f"{'pipeline tok/s':>15} {'pipe/floor':>10} {'+plan/floor':>11} {'wall/floor':>10} "
        f"{'B/token':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['suite']:<16} {r['tokens']:>8,} {r['floor_tokens_per_s']:>12,.0f} "
            f"{r['vllm_engine_tokens_per_s']:>11,.0f} "
            f"{_or_dash(r.get('vllm_engine_default_binding_tokens_per_s')):>10} "
            f"{r['pipeline_tokens_per_s']:>15,.0f} "
            f"{r['ratio_pipeline_to_floor']:>10.2f} {r['ratio_tasks_to_floor']:>11.2f} "
            f"{r['ratio_pipeline_wall_to_floor']:>10.2f} "
            f"{r['bytes_per_token_on_disk']:>8.1f}"
        )
        codecs = ", ".join(f"{c} {b:.1f}" for c, b in r["bytes_per_token_by_codec"].items())
        lines.append(f"{'':<16} bytes/token by codec at k={r['k']}: {codecs}")
    return "\n".join(lines)


def _or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


if __name__ == "__main__":
    raise SystemExit(main())
