"""Run a `logitforge distill` job: check the sources, build the student, train, save.

Everything that can be wrong with the inputs (a missing or empty shard set, an unknown codec
or format, a cache made with another tokenizer) is checked before the first step. Running the
same command again resumes from the last checkpoint; a finished run is a no-op; another config
on the same output folder is refused unless `overwrite` is set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import DistillConfig, claim_run_folder, fingerprint
from stages.align.aligner import Aligner
from stages.prompts import tokenizer_fingerprint
from stages.train.loader import (
    DistillDataset,
    LogitSource,
    MixtureDataset,
    SourceError,
    check_tokenizer,
    open_sources,
)
from stages.train.options import CROSS_TOKENIZER_KINDS
from stages.train.student import load_student, load_tokenizer
from stages.train.trainer import read_summary, train_model, write_summary

Log = Callable[[str], None]
RUN_FILE = "distill_config.json"


def check_loss_data(cfg: DistillConfig, sources: list[LogitSource]) -> None:
    """Refuse a loss the data cannot serve, before any step.

    Per-token reverse KL is a score-function estimate over the student's own samples: it is
    only meaningful on scored rollouts (kind ``onpolicy``), which carry the sampling policy's
    logprobs; on off-policy text it would push the student towards tokens it never chose.

    A `sampled` cache (Sparse Logit Sampling) is an unbiased estimate of the T = 1 teacher
    only: tempering its counts (p^(1/T) of an estimate) is biased, so a soft loss at another
    temperature is refused too.
    """
    soft = cfg.loss.kind in ("forward_kl", "reverse_kl", "jsd") and cfg.loss.alpha > 0
    if soft and cfg.loss.temperature != 1.0:
        for source in sources:
            if source.metadata.codec == "sampled":
                raise SourceError(
                    f"{source.url} holds sampled targets (codec 'sampled'), unbiased for the "
                    f"teacher at T=1 only; loss.temperature is {cfg.loss.temperature}. Use "
                    "temperature 1 with it, or a cache stored with another codec"
                )
    if cfg.loss.kind != "sampled_rkl":
        return
    for source in sources:
        if source.metadata.kind != "onpolicy":
            raise SourceError(
                f"loss.kind sampled_rkl needs scored rollouts (kind 'onpolicy'); {source.url} "
                f"holds {source.metadata.kind!r}. Use a top-k loss (jsd, forward_kl) for "
                "off-policy data"
            )


def teacher_aligner(
    sources: list[LogitSource], student_tokenizer: Any, include_prompt: bool = False
) -> Aligner:
    """An aligner from the sources' teacher tokenizer (loaded from the cache's metadata and
    checked against its fingerprint) to ``student_tokenizer``."""
    teachers = {(s.metadata.teacher_model, s.metadata.tokenizer_fingerprint) for s in sources}
    if len({fp for _, fp in teachers}) > 1:
        raise SourceError(
            "cross-tokenizer training needs every source cached with the same teacher "
            f"tokenizer; got {sorted(teachers)}"
        )
    model_id, fp = next(iter(teachers))
    try:
        teacher_tokenizer = load_tokenizer(model_id)
    except (OSError, ValueError) as e:
        raise SourceError(
            f"cannot load the cache's teacher tokenizer {model_id!r} (needed to align the "
            f"student's tokens to the teacher's): {e}"
        ) from e
    if tokenizer_fingerprint(teacher_tokenizer) != fp:
        raise SourceError(
            f"the tokenizer at {model_id} is not the one the cache was made with (fingerprint "
            f"{tokenizer_fingerprint(teacher_tokenizer)}, cache {fp})"
        )
    return Aligner(teacher_tokenizer, student_tokenizer, include_prompt=include_prompt)


def check_alignment(
    aligner: Aligner, sources: list[LogitSource], shards: int | None, log: Log
) -> dict[str, Any]:
    """Align the first ``shards`` shards (None: all) of every source and report, per source;
    a source none of whose rows align is an error."""
    reports = {}
    for source in sources:
        count = source.num_shards if shards is None else min(shards, source.num_shards)
        report = aligner.report([aligner.align(source.read(i)) for i in range(count)])
        if report["rows"] == 0:
            raise SourceError(
                f"{source.url}: no row of its first {count} shard(s) aligns to the student's "
                f"tokenizer (dropped: {report['dropped']})"
            )
        reports[source.url] = report
        mapped = report["mapped_mass"]
        cut = report["truncated"]
        truncated = (
            f"; {cut['rows']:,} truncated rows aligned on their prefix "
            f"({cut['teacher_tokens_cut']:,} teacher tokens after the last common boundary cut)"
            if cut["rows"]
            else ""
        )
        log(
            f"cross-tokenizer: {source.url}, {count} shard(s): {report['rows']:,} rows aligned, "
            f"dropped {report['dropped'] or 'none'}; trained spans {report['spans']}; teacher "
            f"top-k mass on mapped ids {'n/a' if mapped is None else format(mapped, '.1%')}"
            f"{truncated}"
        )
    log(f"cross-tokenizer: vocabulary map {aligner.vocab.coverage()}")
    return {"vocab": aligner.vocab.coverage(), "samples": reports}


def cross_tokenizer(
    cfg: DistillConfig, sources: list[LogitSource], tokenizer: Any, log: Log
) -> tuple[Aligner | None, dict[str, Any] | None]:
    """The aligner when training goes through aligned spans, else None (after checking that
    the cache's token ids are the student's).

    Span losses (uld, hybrid) always align; plain CE aligns when the tokenizers differ (the
    ground-truth text re-cut for the student: the cross-tokenizer SFT baseline). The first
    shard of each source is aligned up front, so a tokenizer that cannot reproduce the text
    fails here, and its report (rows dropped by reason, span shapes, vocabulary coverage,
    mapped teacher mass) is logged and kept in the run summary.
    """
    student_fp = tokenizer_fingerprint(tokenizer)
    differ = any(s.metadata.tokenizer_fingerprint != student_fp for s in sources)
    if cfg.loss.kind not in CROSS_TOKENIZER_KINDS and not (differ and cfg.loss.kind == "ce"):
        check_tokenizer(sources, student_fp)
        return None, None
    aligner = teacher_aligner(sources, tokenizer, cfg.data.include_prompt)
    return aligner, check_alignment(aligner, sources, 1, log)


def run_distill(cfg: DistillConfig, log: Log = print) -> dict[str, Any]:
    """Train the student of ``cfg``; returns the run summary (also in train_summary.json)."""
    started = time.perf_counter()
    out = Path(cfg.train.output_dir)
    fp = fingerprint(cfg.output_defining())
    sources = open_sources(cfg.data.sources, strict=cfg.data.strict)
    mixed = open_sources(cfg.data.mix.sources, strict=cfg.data.strict) if cfg.data.mix else []
    check_loss_data(cfg, sources + mixed)
    model, tokenizer = load_student(
        cfg.student, default_tokenizer=sources[0].metadata.teacher_model, seed=cfg.train.seed
    )
    # A cache made with another tokenizer fails here (unless aligned), before anything is written.
    aligner, alignment = cross_tokenizer(cfg, sources + mixed, tokenizer, log)
    if claim_run_folder(out, RUN_FILE, fp, cfg.output_defining(), cfg.overwrite, log):
        done = read_summary(out)
        if done is not None:
            log(f"{out} already holds this finished run; nothing to do")
            return done

    params = sum(p.numel() for p in model.parameters())
    rows = [s.num_rows for s in sources]
    log(
        f"distill: student {params / 1e6:.2f}M params, loss {cfg.loss.kind} "
        f"(T={cfg.loss.temperature}, alpha={cfg.loss.alpha}, tail={cfg.loss.tail}), "
        f"{cfg.train.steps} steps of {cfg.data.batch_size} rows from {len(sources)} source(s)"
        + (f" ({sum(rows):,} rows)" if None not in rows else "")
    )

    def stream(of: list[LogitSource], seed: int) -> DistillDataset:
        return DistillDataset(
            of,
            batch_size=cfg.data.batch_size,
            pad_id=tokenizer.pad_token_id,
            include_prompt=cfg.data.include_prompt,
            shuffle=cfg.data.shuffle,
            shuffle_shards=cfg.data.shuffle_shards,
            seed=seed,
            repeat=True,
            aligner=aligner,
            pack=cfg.data.pack,
        )

    dataset: DistillDataset | MixtureDataset = stream(sources, cfg.train.seed)
    if cfg.data.mix is not None:
        f = cfg.data.mix.fraction
        log(f"mixing: a batch comes from {cfg.data.mix.sources} with probability {f}")
        dataset = MixtureDataset(
            [dataset, stream(mixed, cfg.train.seed + 1)], [1 - f, f], seed=cfg.train.seed
        )
    result = train_model(
        model,
        dataset,
        cfg.train,
        cfg.loss,
        tokenizer=tokenizer,
        num_workers=cfg.data.num_workers,
        vocab_map=None if aligner is None else aligner.vocab,
        log=log,
    )
    summary = {
        "fingerprint": fp,
        "output_dir": str(out),
        "params": params,
        "sources": [
            {"url": s.url, "kind": s.metadata.kind, "k": s.metadata.k, "codec": s.metadata.codec}
            for s in sources
        ],
        "loss": cfg.loss.model_dump(),
        **({"alignment": alignment} if alignment else {}),
        **result.as_dict(),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    write_summary(out, summary)
    log(
        f"distill summary: {result.steps} steps in {result.train_seconds:.1f} s "
        f"(final loss {result.final_loss}); model saved to {out}"
        + (f"; resumed from {result.resumed_from}" if result.resumed_from else "")
    )
    return summary
