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
from stages.prompts import tokenizer_fingerprint
from stages.train.loader import (
    DistillDataset,
    LogitSource,
    MixtureDataset,
    SourceError,
    check_tokenizer,
    open_sources,
)
from stages.train.student import load_student
from stages.train.trainer import read_summary, train_model, write_summary

Log = Callable[[str], None]
RUN_FILE = "distill_config.json"


def check_loss_data(cfg: DistillConfig, sources: list[LogitSource]) -> None:
    """Refuse a loss the data cannot serve, before any step.

    Per-token reverse KL is a score-function estimate over the student's own samples: it is
    only meaningful on scored rollouts (kind ``onpolicy``), which carry the sampling policy's
    logprobs; on off-policy text it would push the student towards tokens it never chose.
    """
    if cfg.loss.kind != "sampled_rkl":
        return
    for source in sources:
        if source.metadata.kind != "onpolicy":
            raise SourceError(
                f"loss.kind sampled_rkl needs scored rollouts (kind 'onpolicy'); {source.url} "
                f"holds {source.metadata.kind!r}. Use a top-k loss (jsd, forward_kl) for "
                "off-policy data"
            )


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
    # A cache made with another tokenizer fails here, before anything is written.
    check_tokenizer(sources + mixed, tokenizer_fingerprint(tokenizer))
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
