"""Where a student training step's time goes at a large vocabulary, and what the fused loss
path saves, measured on the same batches in the same run.

The student is the demo code teacher's shape (Llama, hidden 256, 2 layers, 4 heads,
intermediate 688, tied embeddings) over a ``vocab_size`` vocabulary (default 151,936, a
Qwen-size one). Batches go through the real code path: synthetic `AlignedRows` (spans of 1-3
student tokens, 25% prompt, teacher top-k over a ``teacher_vocab`` vocabulary and a vocabulary
map covering 85% of it) collated by `collate_aligned`, or synthetic `LogitBatch` rows collated
by `collate` for the same-tokenizer loss, and the trainer's own `DistillTrainer._span_loss` /
`_token_loss`. Each step is timed in four phases: forward (the model up to the [N, V] logits of
the trained positions), loss, backward, optimizer (gradient clipping and fused AdamW, as
`Trainer` does). Minor page faults and user / system CPU time per step come from getrusage.

"new" is the code as it is: `logits_at` (the output layer runs on the trained positions only)
and `logit_stats` (every loss reads its few numbers per position from the logits in one
chunked pass and writes their gradient once). "old" is the path before that change, kept
reachable here only: the full [B, L, V] logits then ``logits[mask]``, and the losses composed
as they were (`reference_xtok_loss`, `reference_distill_loss`; tests/test_fused_losses.py
checks they give the same values and gradients as the new path).

    python -m bench.student_step [--vocab-size 151936] [--steps 3] [--kinds hybrid,uld]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import resource
import statistics
import time
import types
from collections.abc import Iterator
from typing import Any
from unittest import mock

import numpy as np

# Cross-tokenizer kinds (xtok_losses.XTOK_KINDS) and the same-tokenizer soft KD, each with the
# demo's options (pipeline/demo/run.py).
KINDS: dict[str, dict[str, Any]] = {
    "hybrid": {"kind": "hybrid", "alpha": 0.5, "beta": 0.0},
    "uld": {"kind": "uld", "alpha": 0.5},
    "ce (xtok)": {"kind": "ce"},
    "forward_kl (same tok)": {"kind": "forward_kl", "alpha": 1.0},
}
PHASES = ("forward", "loss", "backward", "optimizer")
ARCH = {"hidden_size": 256, "num_layers": 2, "num_heads": 4, "intermediate_size": 688}


# --------------------------------------------------------------------------------------------
# the path before the fused losses, kept for comparison (and checked by the tests)
# --------------------------------------------------------------------------------------------


def reference_xtok_loss(
    student_logits,
    labels,
    span_start,
    span_index,
    num_spans,
    teacher_topk_ids,
    teacher_topk_logprobs,
    teacher_chain,
    *,
    kind: str,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    vocab_map=None,
    student_mapped=None,
):
    """`xtok_loss` as it was: `span_distributions` ([S, V] log-softmax of the span starts),
    then `uld_loss` / `hybrid_loss` on it, and the hard CE by ``F.cross_entropy``."""
    import torch.nn.functional as F

    from stages.train.losses import _weighted_mean, mix_with_ce
    from stages.train.xtok_losses import hybrid_loss, span_distributions, uld_loss

    def ce_fn():
        per_row = F.cross_entropy(_compute(student_logits), labels, reduction="none")
        return _weighted_mean(per_row, None)

    if kind == "ce":
        ce = ce_fn()
        return ce, {"soft": 0.0, "ce": float(ce.detach())}
    parts: dict[str, float] = {}

    def soft_fn():
        log_q_first, student_chain = span_distributions(
            student_logits, labels, span_start, span_index, num_spans, temperature
        )
        if kind == "uld":
            return uld_loss(
                teacher_topk_logprobs,
                teacher_chain,
                log_q_first,
                student_chain,
                temperature=temperature,
            )
        loss, extra = hybrid_loss(
            teacher_topk_ids,
            teacher_topk_logprobs,
            teacher_chain,
            log_q_first,
            student_chain,
            vocab_map,
            student_mapped,
            beta=beta,
            matched_weight=matched_weight,
            unmatched_weight=unmatched_weight,
            temperature=temperature,
        )
        parts.update({name: float(value) for name, value in extra.items()})
        return loss

    loss, mixed = mix_with_ce(soft_fn, ce_fn, alpha)
    return loss, mixed | parts


def _compute(x):
    import torch

    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def reference_sparse_pair(student_logits, topk_ids, topk_logprobs, temperature, tail):
    """`losses._sparse_pair` as it was: `student_sparse` over the full [N, V] logits (its
    [N, V + 1] support mask, masked copy and two logsumexps)."""
    import torch

    from stages.train.losses import _teacher_log_target, student_sparse

    valid = ~torch.isneginf(topk_logprobs)
    log_q, log_q_rest = student_sparse(
        student_logits, topk_ids, temperature, tail, support_mask=valid
    )
    tail_exists = log_q_rest > float("-inf") if tail == "rest" else None
    log_p, log_p_rest = _teacher_log_target(
        topk_logprobs,
        temperature,
        tail,
        dtype=_compute(student_logits).dtype,
        tail_exists=tail_exists,
    )
    if tail == "renorm":
        return log_p, log_q
    return (
        torch.cat([log_p, log_p_rest.unsqueeze(-1)], dim=-1),
        torch.cat([log_q, log_q_rest.unsqueeze(-1)], dim=-1),
    )


def reference_distill_loss(
    student_logits,
    labels,
    topk_ids,
    topk_logprobs,
    *,
    kind: str,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    tail: str = "rest",
    weights=None,
    next_logprob=None,
    policy_logprob=None,
):
    """`distill_loss` as it was for the top-k kinds and "ce": `reference_sparse_pair`, and the
    hard CE by ``F.cross_entropy`` (each term its own pass over the logits)."""
    import torch.nn.functional as F

    from stages.train.losses import _gjsd_rows, _kl_rows, _weighted_mean, mix_with_ce

    def ce_fn():
        per_row = F.cross_entropy(_compute(student_logits), labels, reduction="none")
        return _weighted_mean(per_row, weights)

    if kind == "ce":
        ce = ce_fn()
        return ce, {"soft": 0.0, "ce": float(ce.detach())}

    def soft_fn():
        log_p, log_q = reference_sparse_pair(
            student_logits, topk_ids, topk_logprobs, temperature, tail
        )
        if kind == "forward_kl":
            per_row = _kl_rows(log_p, log_q)
        elif kind == "reverse_kl":
            per_row = _kl_rows(log_q, log_p)
        else:
            per_row = _gjsd_rows(log_p, log_q, beta)
        return _weighted_mean(per_row * temperature**2, weights)

    return mix_with_ce(soft_fn, ce_fn, alpha)


# --------------------------------------------------------------------------------------------
# synthetic rows, collated by the loader
# --------------------------------------------------------------------------------------------


def _distinct_ids(rng: np.random.Generator, rows: int, k: int, vocab: int) -> np.ndarray:
    """[rows, k] ids, distinct within each row (random start, random gaps, modulo vocab)."""
    gaps = rng.integers(1, max(vocab // k, 2), (rows, k))
    return ((rng.integers(0, vocab, (rows, 1)) + np.cumsum(gaps, axis=1)) % vocab).astype(np.int32)


def _topk_logprobs(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Peaked, descending top-k log-probabilities holding 90-99% of the mass."""
    z = -np.sort(-rng.standard_normal((rows, k)) * 2.5, axis=1)
    z -= np.log(np.exp(z - z[:, :1]).sum(axis=1, keepdims=True)) + z[:, :1]  # log-softmax
    return (z + np.log(rng.uniform(0.90, 0.99, (rows, 1)))).astype(np.float32)


def _lengths(rng: np.random.Generator, rows: int, max_len: int) -> np.ndarray:
    lengths = rng.integers(max_len * 3 // 4, max_len + 1, rows)
    lengths[0] = max_len
    return lengths


def synthetic_aligned_rows(
    rows: int,
    max_len: int,
    k: int,
    vocab_size: int,
    teacher_vocab: int,
    prompt_share: float = 0.25,
    seed: int = 0,
):
    """`AlignedRows` as `Aligner.align` leaves them: student spans of 1 (70%), 2 (20%) or 3
    (10%) tokens covering 1 or 2 teacher tokens, trained from the first completion span on,
    teacher top-k and chain per trained span (-inf top-k elsewhere)."""
    from stages.align.aligner import AlignedRows

    rng = np.random.default_rng(seed)
    lengths = _lengths(rng, rows, max_len)
    row_offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=row_offsets[1:])
    # Span sizes per row: draw plenty, cut at the row's length (one vectorised pass per row
    # of setup, not of training).
    token_span, trained, span_counts = [], [], []
    for n in lengths.tolist():
        sizes = rng.choice([1, 2, 3], size=n, p=[0.7, 0.2, 0.1])
        ends = np.cumsum(sizes)
        count = int(np.searchsorted(ends, n)) + 1
        sizes = sizes[:count]
        sizes[-1] -= int(ends[count - 1]) - n
        token_span.append(np.repeat(np.arange(count), sizes))
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        trained.append(first >= max(1, int(prompt_share * n)))
        span_counts.append(count)
    span_offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(span_counts, out=span_offsets[1:])
    span_trained = np.concatenate(trained)
    p = int(span_offsets[-1])
    teacher_tokens = rng.choice([1, 2], size=p, p=[0.8, 0.2]).astype(np.int32)
    chain = np.where(teacher_tokens > 1, -rng.exponential(0.5, p), 0.0).astype(np.float32)
    lps = np.where(span_trained[:, None], _topk_logprobs(rng, p, k), -np.inf)
    return AlignedRows(
        ids=[f"row-{i}" for i in range(rows)],
        row_offsets=row_offsets,
        input_ids=rng.integers(0, vocab_size, int(row_offsets[-1])),
        token_span=np.concatenate(token_span),
        span_offsets=span_offsets,
        span_trained=span_trained,
        topk_ids=_distinct_ids(rng, p, k, teacher_vocab),
        topk_logprobs=lps.astype(np.float32),
        chain=np.where(span_trained, chain, 0.0).astype(np.float32),
        teacher_tokens=teacher_tokens,
        cut_teacher_tokens=np.full(rows, -1, np.int64),  # every row aligned whole
    )


def synthetic_vocab_map(vocab_size: int, teacher_vocab: int, mapped: float = 0.85, seed: int = 1):
    """A `VocabMap` sending ``mapped`` of the teacher ids to distinct student ids."""
    from stages.align.vocab import VocabMap

    rng = np.random.default_rng(seed)
    forward = np.full(teacher_vocab, -1, dtype=np.int64)
    chosen = rng.random(teacher_vocab) < mapped
    chosen &= np.cumsum(chosen) <= vocab_size  # no more images than student ids
    forward[chosen] = rng.permutation(vocab_size)[: int(chosen.sum())]
    image = np.zeros(vocab_size, dtype=bool)
    image[forward[chosen]] = True
    return VocabMap(forward, image)


def synthetic_logit_rows(
    rows: int, max_len: int, k: int, vocab_size: int, prompt_share: float = 0.25, seed: int = 0
):
    """Same-tokenizer cache rows (`LogitBatch`) of the same lengths and prompt share."""
    from storage.reader import LogitBatch

    rng = np.random.default_rng(seed)
    lengths = _lengths(rng, rows, max_len)
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    next_lp = -rng.random(total).astype(np.float32)
    next_lp[offsets[1:] - 1] = np.nan
    return LogitBatch(
        ids=[f"row-{i}" for i in range(rows)],
        row_offsets=offsets,
        input_ids=rng.integers(0, vocab_size, total).astype(np.int32),
        prompt_len=(lengths * prompt_share).astype(np.int32),
        topk_ids=_distinct_ids(rng, total, k, vocab_size),
        topk_logprobs=_topk_logprobs(rng, total, k),
        next_logprob=next_lp,
    )


class _Tokenizer:
    """What `build_llama` reads from a tokenizer: a vocabulary size and special ids."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 1, 2, 2
        self.model_max_length = 1024

    def __len__(self) -> int:
        return self.vocab_size


# --------------------------------------------------------------------------------------------
# one step, in phases
# --------------------------------------------------------------------------------------------


def _loss_host(loss_options: dict, vocab_map) -> Any:
    """An object the trainer's own loss methods run on (no `Trainer` around them)."""
    from stages.train.options import LossOptions
    from stages.train.trainer import DistillTrainer

    host = types.SimpleNamespace(
        loss_options=LossOptions(**loss_options), vocab_map=vocab_map, _map_tensors=None
    )
    host._span_loss = types.MethodType(DistillTrainer._span_loss, host)
    host._token_loss = types.MethodType(DistillTrainer._token_loss, host)
    return host


@contextlib.contextmanager
def _old_path() -> Iterator[None]:
    """The trainer's loss methods with the losses as they were."""
    import stages.train.trainer as trainer

    with (
        mock.patch.object(trainer, "xtok_loss", reference_xtok_loss),
        mock.patch.object(trainer, "distill_loss", reference_distill_loss),
    ):
        yield


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def run_steps(
    vocab_size: int,
    batch: dict,
    loss_options: dict,
    vocab_map,
    *,
    old: bool,
    steps: int,
    warmup: int,
    seed: int = 0,
) -> dict:
    """Median seconds per phase over ``steps`` steps (after ``warmup``) of a fresh student,
    the first step's loss, and page faults / CPU time per step."""
    import torch

    from stages.train.options import StudentArch, TrainOptions
    from stages.train.student import build_llama
    from stages.train.trainer import logits_at, training_arguments

    model = build_llama(StudentArch(**ARCH), _Tokenizer(vocab_size), seed=seed)
    model.train()
    args = training_arguments(TrainOptions(output_dir="unused", steps=1, seed=seed))
    from transformers import Trainer

    opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    optimizer = opt_cls(model.parameters(), **opt_kwargs)
    host = _loss_host(loss_options, vocab_map)
    mask = batch["loss_mask"]
    spans = "span_start" in batch

    def step() -> tuple[dict[str, float], float]:
        t0 = time.perf_counter()
        if old:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = out.logits[mask]
        else:
            with logits_at(model, mask) as at:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = at.select(out.logits)
        t1 = time.perf_counter()
        with _old_path() if old else contextlib.nullcontext():
            fn = host._span_loss if spans else host._token_loss
            loss, _ = fn(logits, batch, mask)
        t2 = time.perf_counter()
        del out, logits
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        t4 = time.perf_counter()
        seconds = dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True))
        return seconds, float(loss.detach())

    first_loss = math.nan
    timed: list[dict[str, float]] = []
    usage0 = None
    for i in range(warmup + steps):
        if i == warmup:
            gc.collect()
            usage0 = _usage()
        seconds, value = step()
        if i == 0:
            first_loss = value
        if i >= warmup:
            timed.append(seconds)
    user, sys_, faults = (b - a for a, b in zip(usage0, _usage(), strict=True))
    phases = {p: statistics.median(s[p] for s in timed) for p in PHASES}
    total = sum(phases.values())
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": phases,
        "total_s": total,
        "share": {p: phases[p] / total for p in PHASES},
        "first_loss": first_loss,
        "user_s_per_step": user / steps,
        "sys_s_per_step": sys_ / steps,
        "minor_faults_per_step": faults / steps,
    }


def bench_student_step(
    vocab_size: int = 151_936,
    *,
    teacher_vocab: int = 49_152,
    k: int = 64,
    rows: int = 4,
    max_len: int = 384,
    steps: int = 3,
    warmup: int = 1,
    threads: int = 2,
    kinds: list[str] | None = None,
    compare: bool = True,
    seed: int = 0,
) -> dict:
    """The student step's time split per loss kind at ``vocab_size``, new path and (with
    ``compare``) the old one on the same batch, with old / new ratios."""
    import torch

    from stages.train.loader import collate, collate_aligned

    names = list(KINDS) if kinds is None else kinds
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; expected some of {list(KINDS)}")
    print(
        f"== student step: vocab {vocab_size:,}, {rows} rows x <= {max_len} tokens, "
        f"{threads} threads",
        flush=True,
    )
    aligned = collate_aligned(
        synthetic_aligned_rows(rows, max_len, k, vocab_size, teacher_vocab, seed=seed), pad_id=2
    )
    same = collate(synthetic_logit_rows(rows, max_len, k, vocab_size, seed=seed), pad_id=2)
    vocab_map = synthetic_vocab_map(vocab_size, teacher_vocab, seed=seed + 1)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    cases: dict[str, dict] = {}
    try:
        for name in names:
            options = KINDS[name]
            batch = same if options["kind"] in ("forward_kl", "reverse_kl", "jsd") else aligned
            runs = {}
            for label in ("new", "old") if compare else ("new",):
                print(f"   {name}: {label} path", flush=True)
                gc.collect()
                runs[label] = run_steps(
                    vocab_size,
                    batch,
                    options,
                    vocab_map,
                    old=label == "old",
                    steps=steps,
                    warmup=warmup,
                    seed=seed,
                )
            case: dict[str, Any] = {
                "options": options,
                "trained_positions": int(batch["loss_mask"].sum()),
                "positions": int(batch["attention_mask"].numel()),
                **runs,
            }
            if compare:
                new, old = runs["new"], runs["old"]
                case["speedup"] = old["total_s"] / new["total_s"]
                case["phase_speedup"] = {p: old["seconds"][p] / new["seconds"][p] for p in PHASES}
                case["first_loss_rel_diff"] = abs(new["first_loss"] - old["first_loss"]) / max(
                    abs(old["first_loss"]), 1e-12
                )
            cases[name] = case
    finally:
        torch.set_num_threads(threads_before)
    return {
        "vocab_size": vocab_size,
        "teacher_vocab": teacher_vocab,
        "k": k,
        "rows": rows,
        "max_len": max_len,
        "spans": int(aligned["span_start"].sum()),
        "params": next(iter(cases.values()))["new"]["params"] if cases else None,
        "embedding_params": vocab_size * ARCH["hidden_size"],  # tied with the output layer
        "threads": threads,
        "steps": steps,
        "cases": cases,
    }


def render(result: dict) -> str:
    compare = any("old" in c for c in result["cases"].values())
    lines = [
        f"student step at vocab {result['vocab_size']:,} (teacher vocab "
        f"{result['teacher_vocab']:,}, k {result['k']}, {result['params'] / 1e6:.1f}M params of "
        f"which {result['embedding_params'] / 1e6:.1f}M embedding, {result['rows']} rows x <= "
        f"{result['max_len']} tokens, {result['spans']} trained spans, {result['threads']} "
        f"threads, median of {result['steps']} steps), seconds per step (share):"
    ]
    head = (
        f"{'loss':<22} {'path':<4} {'N':>5} "
        + " ".join(f"{p:>15}" for p in PHASES)
        + f" {'total':>7} {'sys s':>6} {'faults':>8}"
    )
    lines += [head, "-" * len(head)]
    for name, case in result["cases"].items():
        for label in ("new", "old") if compare else ("new",):
            run = case[label]
            cells = " ".join(f"{run['seconds'][p]:>7.2f} ({run['share'][p]:>4.0%})" for p in PHASES)
            lines.append(
                f"{name:<22} {label:<4} {case['trained_positions']:>5} {cells} "
                f"{run['total_s']:>7.2f} {run['sys_s_per_step']:>6.2f} "
                f"{run['minor_faults_per_step'] / 1e3:>7.0f}k"
            )
        if compare:
            ratios = " ".join(f"{case['phase_speedup'][p]:>14.1f}x" for p in PHASES)
            lines.append(
                f"{'':<22} {'old/new':<10} {ratios} {case['speedup']:>6.1f}x"
                f"   (first-step loss rel. diff {case['first_loss_rel_diff']:.1e})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=151_936)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", type=str, default=",".join(KINDS))
    parser.add_argument("--no-compare", action="store_true", help="time the new path only")
    args = parser.parse_args(argv)
    result = bench_student_step(
        args.vocab_size,
        steps=args.steps,
        threads=args.threads,
        kinds=[k.strip() for k in args.kinds.split(",") if k.strip()],
        compare=not args.no_compare,
    )
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
