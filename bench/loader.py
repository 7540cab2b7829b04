"""Loader throughput against what a student training step consumes, on the same batches.

The loader must never be what the trainer waits for. Both rates are tokens/s over the same
batch shape, measured in one run: the loader streaming shards from disk (read, checksum,
decode, shuffle, collate) and from its in-memory shard cache (later epochs of a dataset that
fits), and one optimizer step (forward, sparse forward-KL over the cached top-k, backward,
AdamW) of a small and a larger student.

    python -m bench.loader --cache artifacts/bench/tiny-teacher-k64 [--batches 100]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _tokens(batch) -> int:
    return int(batch["attention_mask"].sum())


def cross_tokenizer_aligner(cache: Path):
    """An aligner from the cache's teacher to the cross-tokenizer demo's student tokenizer
    (SentencePiece-style Unigram with byte fallback)."""
    from pipeline.demo.run import build_student_tokenizer
    from stages.align.aligner import Aligner
    from stages.train.loader import open_sources
    from stages.train.student import load_tokenizer

    teacher = load_tokenizer(open_sources([str(cache)])[0].metadata.teacher_model)
    return Aligner(teacher, build_student_tokenizer())


def loader_rate(
    cache: Path, batch_size: int, batches: int, cache_mb: int, aligner: object = None
) -> float:
    """Tokens/s of `DistillDataset` over ``batches`` batches (after one warm-up epoch if
    cached); with ``aligner``, every shard read is also re-cut into the student's tokens."""
    from stages.train.loader import DistillDataset, open_sources

    ds = DistillDataset(
        open_sources([str(cache)]),
        batch_size=batch_size,
        pad_id=0,
        repeat=True,
        cache_mb=cache_mb,
        aligner=aligner,  # type: ignore[arg-type]
    )
    it = iter(ds)
    if cache_mb:
        per_epoch = sum(s.num_rows or 0 for s in ds.sources) // batch_size + 1
        for _ in range(per_epoch):
            next(it)
    tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
        tokens += _tokens(next(it))
    return tokens / (time.perf_counter() - start)


def step_rate(cache: Path, batch_size: int, steps: int, arch: dict, threads: int) -> dict:
    """Tokens/s one training step consumes (batches prepared beforehand, not timed)."""
    import torch

    from stages.train.loader import DistillDataset, open_sources
    from stages.train.losses import distill_loss
    from stages.train.options import StudentArch
    from stages.train.student import build_llama, load_tokenizer

    source = open_sources([str(cache)])
    tokenizer = load_tokenizer(source[0].metadata.teacher_model)
    ds = DistillDataset(source, batch_size=batch_size, pad_id=0, repeat=True)
    it = iter(ds)
    batches = [next(it) for _ in range(steps + 3)]
    torch.set_num_threads(threads)
    model = build_llama(StudentArch(**arch), tokenizer, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(b) -> None:
        mask = b["loss_mask"]
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss, _ = distill_loss(
            logits[mask],
            b["target_ids"][mask],
            b["topk_ids"][mask],
            b["topk_logprobs"][mask],
            kind="forward_kl",
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for b in batches[:3]:  # warm-up
        step(b)
    start = time.perf_counter()
    for b in batches[3:]:
        step(b)
    seconds = time.perf_counter() - start
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_s": sum(_tokens(b) for b in batches[3:]) / seconds,
        "ms_per_step": 1000 * seconds / steps,
    }


STUDENTS = {
    "student-0.1M (demo)": {
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 2,
        "intermediate_size": 192,
    },
    "student-3M": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 768},
}


def bench_loader(cache: Path, batch_size: int = 128, batches: int = 100, threads: int = 2) -> dict:
    print(f"== loader vs training step on {cache} (batch {batch_size} rows)", flush=True)
    streaming = loader_rate(cache, batch_size, batches, cache_mb=0)
    cached = loader_rate(cache, batch_size, batches, cache_mb=1024)
    # Cross-tokenizer training aligns on the fly, once per shard read: what that costs.
    aligned = loader_rate(cache, batch_size, batches, 0, cross_tokenizer_aligner(cache))
    students = {
        name: step_rate(cache, batch_size, max(10, batches // 4), arch, threads)
        for name, arch in STUDENTS.items()
    }
    for s in students.values():
        s["streaming_over_step"] = streaming / s["tokens_per_s"]
        s["cached_over_step"] = cached / s["tokens_per_s"]
        s["aligned_streaming_over_step"] = aligned / s["tokens_per_s"]
    return {
        "cache": str(cache),
        "batch_size": batch_size,
        "loader_streaming_tokens_per_s": streaming,
        "loader_cached_tokens_per_s": cached,
        "loader_streaming_aligned_tokens_per_s": aligned,
        "aligned_over_streaming": aligned / streaming,
        "students": students,
    }


def render(result: dict) -> str:
    head = (
        f"{'student':<22} {'params':>9} {'step tok/s':>11} {'ms/step':>8} "
        f"{'stream/step':>12} {'cached/step':>12}"
    )
    lines = [
        f"loader: streaming {result['loader_streaming_tokens_per_s']:,.0f} tokens/s, "
        f"cached {result['loader_cached_tokens_per_s']:,.0f} tokens/s, streaming with "
        f"cross-tokenizer alignment {result['loader_streaming_aligned_tokens_per_s']:,.0f} "
        f"tokens/s (batch {result['batch_size']} rows)",
        head,
        "-" * len(head),
    ]
    for name, s in result["students"].items():
        lines.append(
            f"{name:<22} {s['params']:>9,} {s['tokens_per_s']:>11,.0f} {s['ms_per_step']:>8.1f} "
            f"{s['streaming_over_step']:>11.1f}x {s['cached_over_step']:>11.1f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args(argv)
    print(render(bench_loader(args.cache, args.batch_size, args.batches)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
