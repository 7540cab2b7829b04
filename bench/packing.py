"""Training tokens/s with packed batches against padded ones, on the real teacher's caches.

Real rows have mixed lengths, so a padded batch spends part of every step on padding: how
much depends on the data. Two caches of the real teacher show both ends: stdlib text (160 to
512 SmolLM2 tokens, a third truncated at 512: little padding) and stdlib chat (median 196
tokens, 5% above 450: much). The suite trains the same student (SmolLM2 cut to 6 evenly
spaced layers by `logitforge prune`, 49.6M parameters) on the same batches of each cache both
ways, through the trainer's own call (`model_inputs`, `logits_at`, its loss method), and
reports trained tokens per second and the ratio.

Each cache is its config's output when it is there (`make cache-teacher
CONFIG=configs/smollm2/cache-text.yaml`, `.../cache-chat.yaml`); otherwise the config's first
``rows`` rows are cached here once (minutes: one engine start) and reused by later runs.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

from pipeline.demo.build import REPO_ROOT

CACHE_CONFIGS = {
    name: REPO_ROOT / "configs" / "smollm2" / f"cache-{name}.yaml" for name in ("text", "chat")
}
ROWS = 256
BATCH_ROWS = 8
STEPS = 6
WARMUP = 1


def _cache(config: Path, work: Path, rows: int) -> Path:
    from pipeline.config import CacheTeacherConfig, load_config
    from pipeline.execute import run_cache_teacher

    cfg = load_config(config, model=CacheTeacherConfig)
    full = REPO_ROOT / cfg.output.path
    if (full / ".logitforge" / "plan.json").exists():
        return full
    out = work / f"{full.name}-{rows}"
    cfg = load_config(config, [f"input.limit={rows}", f"output.path={out}"], CacheTeacherConfig)
    run_cache_teacher(cfg, log=lambda msg: print(f"   {msg}", flush=True))
    return out


def _student(work: Path) -> Path:
    from bench.smollm2 import teacher_dir
    from pipeline.prune import PruneConfig, run_prune

    out = work / "smollm2-pruned-6-even"
    run_prune(
        PruneConfig(model=str(teacher_dir()), output=str(out), layers=6, method="even"),
        log=lambda msg: print(f"   {msg}", flush=True),
    )
    return out


def _steps(model, batches: list[dict], steps: int, warmup: int) -> list[float]:
    """Seconds of each timed step: forward, loss, backward, AdamW, as the trainer does them."""
    import torch

    from bench.student_step import _loss_host
    from stages.train.trainer import logits_at, model_inputs

    host = _loss_host({"kind": "forward_kl"}, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    times = []
    for i, batch in enumerate(batches[: warmup + steps]):
        gc.collect()
        t = time.perf_counter()
        mask = batch["loss_mask"]
        with logits_at(model, mask) as at:
            out = model(**model_inputs(batch))
        loss, _ = host._token_loss(at.select(out.logits), batch, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)


def _measure(student: Path, cache: Path, batch_rows: int, steps: int) -> dict:
    """Padded, then packed: the same first batches of ``cache`` (same seed), a fresh copy
    of ``student`` each time."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.train.loader import DistillDataset, LogitSource

    source = LogitSource.open(str(cache))
    result: dict = {"cache": _relative(cache)}
    for mode in ("padded", "packed"):
        print(f"== packing: {cache.name}, {mode} batches of {batch_rows} rows", flush=True)
        data = DistillDataset(
            [source], batch_size=batch_rows, pad_id=2, seed=0, pack=mode == "packed"
        )
        stream = iter(data)
        batches = [next(stream) for _ in range(WARMUP + steps)]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(student)
        times = _steps(model, batches, steps, WARMUP)
        timed = batches[WARMUP:]
        trained = sum(int(b["loss_mask"].sum()) for b in timed)
        cells = sum(b["input_ids"].numel() for b in timed)
        real = sum(int(b["attention_mask"].sum()) for b in timed)
        result[mode] = {
            "sequences_per_batch": statistics.mean(b["input_ids"].shape[0] for b in timed),
            "padding_share": 1 - real / cells,
            "trained_tokens": trained,
            "step_s_median": statistics.median(times),
            "trained_tokens_per_s": trained / sum(times),
        }
        print(
            f"   {result[mode]['sequences_per_batch']:.2f} sequences a batch, "
            f"{result[mode]['padding_share']:.1%} padding, "
            f"{result[mode]['trained_tokens_per_s']:,.0f} trained tokens/s",
            flush=True,
        )
        del model
    result["packed_over_padded"] = (
        result["packed"]["trained_tokens_per_s"] / result["padded"]["trained_tokens_per_s"]
    )
    return result


def bench_packing(
    rows: int = ROWS, batch_rows: int = BATCH_ROWS, steps: int = STEPS, threads: int = 2
) -> dict:
    import torch

    from bench.run import WORK_DIR

    caches = {name: _cache(config, WORK_DIR, rows) for name, config in CACHE_CONFIGS.items()}
    student = _student(WORK_DIR)
    torch.set_num_threads(threads)
    return {
        "student": _relative(student),
        "batch_rows": batch_rows,
        "steps": steps,
        "threads": threads,
        "data": {
            name: _measure(student, cache, batch_rows, steps) for name, cache in caches.items()
        },
    }


def render(result: dict) -> str:
    lines = [
        f"packing ({result['student']}, batches of {result['batch_rows']} rows, "
        f"{result['threads']} threads):",
        "  data   mode     sequences  padding  trained tok/s",
    ]
    for name, data in result["data"].items():
        for mode in ("padded", "packed"):
            r = data[mode]
            lines.append(
                f"  {name:<6} {mode:<8} {r['sequences_per_batch']:>9.2f}  "
                f"{r['padding_share']:>6.1%}  {r['trained_tokens_per_s']:>13,.0f}"
            )
        lines.append(f"  {name:<6} packed / padded: {data['packed_over_padded']:.2f}x")
    return "\n".join(lines)
