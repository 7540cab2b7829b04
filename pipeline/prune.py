"""Run a `logitforge prune` job: cut a student from a teacher checkpoint, save it whole.

Importance is measured on a few rows of a cache the teacher already wrote (their token ids;
the logits are not needed), so pruning needs nothing the distillation that heals the student
will not use anyway. The result is a normal checkpoint with the teacher's tokenizer and
generation config, saved atomically with a `prune.json` record (kept layers, their scores,
parameters before and after); a rerun with the same config is a no-op.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config import fingerprint
from stages.prompts import tokenizer_fingerprint
from stages.prune import (
    choose_layers,
    decoder_layers,
    measure_importance,
    num_parameters,
    prune_layers,
    prune_mlp,
)
from stages.train.loader import open_sources

Log = Callable[[str], None]
RECORD_FILE = "prune.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CalibrationOptions(BaseModel):
    """The rows importance is measured on: the first rows of a cache (shard set or Parquet)."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="A logit cache made with the model's tokenizer.")
    rows: int = Field(32, ge=1, description="How many of its rows.")
    max_len: int = Field(256, ge=2, description="Tokens per row at most (longer ones are cut).")
    batch_size: int = Field(8, ge=1)


class PruneConfig(BaseModel):
    """The whole `logitforge prune` job."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="The checkpoint to prune (a local folder).")
    output: str = Field(description="Where the pruned checkpoint goes.")
    layers: int | list[int] = Field(
        description="How many decoder layers to keep, or exactly which (0-based, ascending)."
    )
    method: Literal["importance", "even"] = Field(
        "importance",
        description="With a count: keep the layers of highest block influence (1 - cosine of "
        "a layer's input and output, measured on `calibration`), or evenly spaced ones.",
    )
    intermediate_size: int | None = Field(
        None, ge=1, description="Also keep only this many MLP channels (by activation size)."
    )
    calibration: CalibrationOptions | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _calibrated(self) -> PruneConfig:
        measured = (self.method == "importance" and isinstance(self.layers, int)) or (
            self.intermediate_size is not None
        )
        if measured and self.calibration is None:
            raise ValueError(
                "importance pruning (method importance, or intermediate_size) measures on real "
                "rows: set calibration.data to a cache made with this model's tokenizer, or "
                "use method: even with no intermediate_size"
            )
        return self


def calibration_batches(
    opts: CalibrationOptions, pad_id: int, tokenizer_fp: str | None = None
) -> list[dict[str, torch.Tensor]]:
    """The first ``opts.rows`` rows of the cache, cut to ``max_len``, right-padded batches.

    Given the model's tokenizer fingerprint ``tokenizer_fp``, a cache of another tokenizer is
    refused: its ids would mean other tokens, and the scores would measure nothing.
    """
    (source,) = open_sources([opts.data], tokenizer_fingerprint=tokenizer_fp)
    rows: list[np.ndarray] = []
    for shard in range(source.num_shards):
        batch = source.read(shard)
        offsets = batch.row_offsets
        for i in range(min(batch.num_rows, opts.rows - len(rows))):
            rows.append(batch.input_ids[offsets[i] : offsets[i] + opts.max_len])
        if len(rows) == opts.rows:
            break
    batches = []
    for b in range(0, len(rows), opts.batch_size):
        group = rows[b : b + opts.batch_size]
        width = max(len(r) for r in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for j, r in enumerate(group):  # a batch's rows, not its tokens
            ids[j, : len(r)] = torch.from_numpy(r.astype(np.int64))
            mask[j, : len(r)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def read_record(output: str | Path) -> dict | None:
    try:
        return json.loads((Path(output) / RECORD_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_prune(cfg: PruneConfig, log: Log = print) -> dict[str, Any]:
    """Prune ``cfg.model`` into ``cfg.output``; return the record (also in prune.json)."""
    from transformers import AutoModelForCausalLM

    from pipeline.demo.build import write_build
    from stages.train.student import load_tokenizer

    key = fingerprint(cfg.model_dump(exclude={"output"}))
    done = read_record(cfg.output)
    if done is not None and done.get("fingerprint") == key:
        log(f"{cfg.output} is already pruned from this config; nothing to do")
        return done
    started = time.perf_counter()
    if not (Path(cfg.model) / "config.json").exists():
        raise FileNotFoundError(f"{cfg.model}: no config.json; `model` must be a local checkpoint")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model, dtype=_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
    )
    num_layers = len(decoder_layers(model))
    before = num_parameters(model)
    importance = None
    if cfg.calibration is not None:
        batches = calibration_batches(
            cfg.calibration, tokenizer.pad_token_id, tokenizer_fingerprint(tokenizer)
        )
        importance = measure_importance(model, batches)
        log(
            f"measured importance on {importance.tokens:,} tokens; block influence per layer: "
            + " ".join(f"{s:.3f}" for s in importance.layers)
        )
    if isinstance(cfg.layers, list):
        keep = cfg.layers
    else:
        scores = importance.layers if cfg.method == "importance" and importance else None
        keep = choose_layers(num_layers, cfg.layers, scores)
    prune_layers(model, keep)
    if cfg.intermediate_size is not None:
        assert importance is not None  # the config requires calibration for it
        prune_mlp(model, cfg.intermediate_size, importance.channels[keep])
    after = num_parameters(model)
    record = {
        "fingerprint": key,
        "source": str(cfg.model),
        "config": cfg.model_dump(mode="json"),
        "kept_layers": keep,
        "layers": [num_layers, len(keep)],
        "intermediate_size": model.config.intermediate_size,
        "parameters": [before, after],
        "block_influence": None if importance is None else importance.layers.round(5).tolist(),
        "calibration_tokens": None if importance is None else importance.tokens,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_build(out, model, tokenizer, record, record_file=RECORD_FILE)
    log(
        f"kept layers {keep} of {num_layers}; {before / 1e6:.1f}M -> {after / 1e6:.1f}M "
        f"parameters; saved {out}"
    )
    return record
