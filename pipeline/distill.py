"""Run a `logitforge distill` job: check the sources, build the student, train, save.

Everything that can be wrong with the inputs (a missing or empty shard set, an unknown codec
or format, a cache made with another tokenizer) is checked before the first step. Running the
same command again resumes from the last checkpoint; a finished run is a no-op; another config
on the same output folder is refused unless `overwrite` is set.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import DistillConfig, describe_difference, fingerprint
from stages.prompts import tokenizer_fingerprint
from stages.train.loader import DistillDataset, check_tokenizer, open_sources
from stages.train.student import load_student
from stages.train.trainer import read_summary, train_model, write_summary
from storage.manifest import PlanMismatchError

Log = Callable[[str], None]
RUN_FILE = "distill_config.json"


def _claim_output(cfg: DistillConfig, out: Path, fp: str, log: Log) -> dict[str, Any] | None:
    """The finished run's summary if this exact job is done; refuse another job's folder."""
    run_file = out / RUN_FILE
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous.get("fingerprint") != fp:
            if not cfg.overwrite:
                changes = describe_difference(previous.get("config", {}), cfg.output_defining())
                raise PlanMismatchError(
                    f"{out} holds a run made with a different config:\n  "
                    + "\n  ".join(changes or ["(format changed)"])
                    + "\nUse another train.output_dir, or set overwrite=true to replace it."
                )
            log(f"overwrite: removing the previous run in {out}")
            shutil.rmtree(out)
        else:
            summary = read_summary(out)
            if summary is not None:
                return summary
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(
        json.dumps({"fingerprint": fp, "config": cfg.output_defining()}, indent=2) + "\n"
    )
    return None


def run_distill(cfg: DistillConfig, log: Log = print) -> dict[str, Any]:
    """Train the student of ``cfg``; returns the run summary (also in train_summary.json)."""
    started = time.perf_counter()
    out = Path(cfg.train.output_dir)
    fp = fingerprint(cfg.output_defining())
    sources = open_sources(cfg.data.sources, strict=cfg.data.strict)
    model, tokenizer = load_student(
        cfg.student, default_tokenizer=sources[0].metadata.teacher_model, seed=cfg.train.seed
    )
    # A cache made with another tokenizer fails here, before anything is written.
    check_tokenizer(sources, tokenizer_fingerprint(tokenizer))
    done = _claim_output(cfg, out, fp, log)
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
    dataset = DistillDataset(
        sources,
        batch_size=cfg.data.batch_size,
        pad_id=tokenizer.pad_token_id,
        include_prompt=cfg.data.include_prompt,
        shuffle=cfg.data.shuffle,
        shuffle_shards=cfg.data.shuffle_shards,
        seed=cfg.train.seed,
        repeat=True,
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
