"""The codec table: bytes/token on disk, fidelity and speed of every codec on one real cache.

The cache is made the way users make one: `cache-teacher` with the exact codec (fp32) on the
trained 32k-vocabulary code teacher (`pipeline.demo.code_teacher`: a byte-level BPE Llama
trained on Python standard-library files), over chunks of the files it was trained on, where
its distributions are peaked and heavy-tailed like a real model's on familiar text (the build
record gives its statistics there and on unseen files). Every codec then re-encodes the
same shards:

- bytes/token: the whole Parquet shard (every column, prompt text and byte spans included,
  zstd) divided by its tokens, as the pipeline writes it;
- encode / decode tokens/s: `build_logit_table` + Parquet serialisation, and Parquet read +
  `decode_logit_table`, against fp32's in the same run;
- KL to exact (`storage.fidelity.kl_to_exact`, nats per token over the full vocabulary),
  top-1 agreement, and mean |rest mass error|.

For `sampled`, whose point is an unbiased target rather than a close one per position, the
table also gives the KL of the average of `AVERAGED_DRAWS` independent encodings: it falls
towards 0 as draws are averaged, which a biased codec's would not.

    python -m bench.run --suite codecs [--k 64] [--rows 96]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.codecs import Codec, get_codec

REPO_ROOT = Path(__file__).resolve().parents[1]

AVERAGED_DRAWS = 16
TARGET_BYTES_PER_TOKEN = 60.0  # issue 7: at most 60 B/token at k=64 ...
TARGET_KL = 1e-3  # ... with mean KL(exact || decoded) <= 1e-3 nats per token
# (label, codec, params): the value codecs, compact at its default and around it, sampled.
CODECS: tuple[tuple[str, str, dict], ...] = (
    ("fp32 (exact)", "fp32", {}),
    ("fp16", "fp16", {}),
    ("q8", "q8", {}),
    ("compact", "compact", {}),
    ("compact drop 0", "compact", {"drop_mass": 0.0}),
    ("compact drop 3e-5", "compact", {"drop_mass": 3e-5}),
    ("compact drop 3e-4", "compact", {"drop_mass": 3e-4}),
    # Fewer entries where the mass allows: how far the KL moves when 10-30 entries go.
    ("compact drop 1e-3", "compact", {"drop_mass": 1e-3}),
    ("compact drop 1e-2", "compact", {"drop_mass": 1e-2}),
    ("sampled 12", "sampled", {"samples": 12}),
    ("sampled 32", "sampled", {"samples": 32}),
)


def make_cache(out: Path, k: int, rows: int, max_len: int) -> tuple[Path, int]:
    """An exact (fp32) cache of the code teacher on held-out code; (cache, vocab size)."""
    import json

    from pipeline.config import load_config
    from pipeline.demo.code_teacher import (
        DEFAULT_CODE_TEACHER_DIR,
        build_code_teacher,
        code_prompts,
    )
    from pipeline.execute import run_cache_teacher

    build_code_teacher(DEFAULT_CODE_TEACHER_DIR)
    model_dir = REPO_ROOT / DEFAULT_CODE_TEACHER_DIR
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = out.parent / f"{out.name}-prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    chunks = code_prompts(rows, seed=0, split="familiar")
    prompts.write_text("".join(json.dumps(r) + "\n" for r in chunks))
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(
        None,
        [
            f"input.path={prompts}",
            f"teacher.model={model_dir}",
            f"teacher.k={k}",
            "teacher.dtype=float32",
            f"teacher.max_model_len={max_len}",
            "prompts.on_too_long=truncate",
            f"output.path={out}",
            f"output.rows_per_shard={rows}",
            "output.codec=fp32",
        ],
    )
    run_cache_teacher(cfg, log=lambda msg: print("  ", msg, flush=True))
    return out, int(vocab)


def _encode(table: pa.Table, batch, codec: Codec, meta) -> tuple[pa.Buffer, float]:
    from storage.schema import build_logit_table
    from storage.writer import parquet_bytes

    t0 = time.perf_counter()
    logits = build_logit_table(
        table, batch.topk_ids, batch.topk_logprobs, batch.next_logprob, codec
    )
    described = meta.model_copy(update={"codec": codec.name, "codec_params": codec.params})
    buf = parquet_bytes(logits, described)
    return buf, time.perf_counter() - t0


def _decode(buf: pa.Buffer):
    from storage.reader import decode_logit_table
    from storage.schema import read_metadata

    t0 = time.perf_counter()
    table = pq.read_table(pa.BufferReader(buf))
    batch = decode_logit_table(table, read_metadata(table.schema))
    return batch, time.perf_counter() - t0


def _averaged(codec_name: str, params: dict, table, batch, meta, draws: int):
    """The exact top-k with the mean of ``draws`` independently seeded decodings on it."""
    from storage.fidelity import mass_on_exact

    q = np.zeros(batch.topk_logprobs.shape, dtype=np.float64)
    for seed in range(draws):
        codec = get_codec(codec_name, **{**params, "seed": seed})
        decoded, _ = _decode(_encode(table, batch, codec, meta)[0])
        q += mass_on_exact(batch.topk_ids, batch.topk_logprobs, decoded.topk_ids,
                           decoded.topk_logprobs)  # fmt: skip
    with np.errstate(divide="ignore"):
        return np.log(q / draws)


def bench_codecs(k: int = 64, rows: int = 96, max_len: int = 512) -> dict:
    """Every codec in `CODECS` on one exact cache of the code teacher; the table as a dict."""
    from bench.run import WORK_DIR
    from pipeline.demo.build import read_build
    from pipeline.demo.code_teacher import DEFAULT_CODE_TEACHER_DIR
    from storage.reader import ShardSet

    cache, vocab = make_cache(WORK_DIR / f"code-teacher-k{k}", k, rows, max_len)
    shard_set = ShardSet.open(str(cache))
    index = shard_set.plan.shards[0].index
    table = pq.read_table(shard_set.layout.data_path(index, shard_set.plan.num_shards))
    prompt_cols = table.select([n for n in table.column_names if not n.startswith("topk")
                                and n != "next_logprob"])  # fmt: skip
    record = read_build(REPO_ROOT / DEFAULT_CODE_TEACHER_DIR) or {}
    stats = {"familiar": record.get("familiar"), "heldout": record.get("heldout")}
    return codec_table(
        prompt_cols, shard_set.read_shard(index), shard_set.metadata, vocab,
        "code-teacher-32k", stats,
    )  # fmt: skip


def codec_table(prompt_cols: pa.Table, exact, meta, vocab: int, teacher: str, stats) -> dict:
    """Every codec in `CODECS` re-encoding one exact batch (``exact``: a LogitBatch decoded
    from fp32, ``prompt_cols``: its shard's prompt columns, ``meta``: its ShardMetadata)."""
    from storage.fidelity import kl_to_exact, rest_mass_error, top1_agreement

    tokens = exact.num_tokens
    top_mass = np.exp(exact.topk_logprobs.astype(np.float64)).sum(axis=1)
    out: dict = {
        "teacher": teacher,
        "teacher_stats": stats,
        "vocab_size": vocab,
        "k": exact.k,
        "rows": exact.num_rows,
        "tokens": tokens,
        "exact_top1_prob_mean": float(np.exp(exact.topk_logprobs[:, 0]).mean()),
        "exact_topk_mass_mean": float(top_mass.mean()),
        "target": {"bytes_per_token": TARGET_BYTES_PER_TOKEN, "kl": TARGET_KL},
        "id_coding_bits_per_token": id_coding_bits(exact.topk_ids, vocab),
        "codecs": [],
    }
    fp32_speed = None
    for label, name, params in CODECS:
        codec = get_codec(name, **params)
        buf, enc_s = _encode(prompt_cols, exact, codec, meta)
        decoded, dec_s = _decode(buf)
        kl = kl_to_exact(exact.topk_ids, exact.topk_logprobs, decoded.topk_ids,
                         decoded.topk_logprobs, vocab)  # fmt: skip
        stored = np.isfinite(decoded.topk_logprobs).sum(axis=1)
        row = {
            "codec": label,
            "name": name,
            "params": codec.params,
            "bytes_per_token": buf.size / tokens,
            "column_bytes_per_token": column_bytes(buf, tokens),
            "entries_per_token": float(stored.mean()),
            "encode_tokens_per_s": tokens / enc_s,
            "decode_tokens_per_s": tokens / dec_s,
            "kl_mean": float(kl.mean()),
            "kl_p99": float(np.quantile(kl, 0.99)),
            "top1_agreement": top1_agreement(exact.topk_ids, decoded.topk_ids),
            "rest_mass_error": rest_mass_error(exact.topk_logprobs, decoded.topk_logprobs),
        }
        if fp32_speed is None:
            fp32_speed = (row["encode_tokens_per_s"], row["decode_tokens_per_s"])
        row["encode_vs_fp32"] = row["encode_tokens_per_s"] / fp32_speed[0]
        row["decode_vs_fp32"] = row["decode_tokens_per_s"] / fp32_speed[1]
        if name == "sampled":
            avg = _averaged(name, params, prompt_cols, exact, meta, AVERAGED_DRAWS)
            row[f"kl_mean_of_{AVERAGED_DRAWS}_draws"] = float(
                kl_to_exact(exact.topk_ids, exact.topk_logprobs, exact.topk_ids, avg, vocab).mean()
            )
        row["meets_target"] = (
            row["bytes_per_token"] <= TARGET_BYTES_PER_TOKEN and row["kl_mean"] <= TARGET_KL
        )
        out["codecs"].append(row)
        print(f"   {render_row(row)}", flush=True)
    return out


def column_bytes(buf: pa.Buffer, tokens: int) -> dict[str, float]:
    """Compressed bytes/token of each top-level column of a Parquet buffer (from its footer):
    where a codec's bytes go (ids, values, rest, or the prompt columns beside them)."""
    meta = pq.ParquetFile(pa.BufferReader(buf)).metadata
    sizes: dict[str, float] = {}
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            name = column.path_in_schema.split(".")[0]
            sizes[name] = sizes.get(name, 0.0) + column.total_compressed_size / tokens
    return sizes


def id_coding_bits(topk_ids: np.ndarray, vocab: int) -> dict[str, float]:
    """What coding the top-k ids with a prior could buy, before anyone builds it: the ideal
    code length (bits per token) of each position's k ids, in rank order, under

    - ``uniform``: every id equally likely (k log2 V; today's codecs pay about this);
    - ``unigram``: each id's frequency in the top-k sets, fitted on the even positions and
      measured on the odd ones (add-one smoothed), as a static table a reader would ship;
    - ``previous_set``: an id of the previous position's set costs a flag plus its index
      there (1 + log2 k), any other id a flag plus its unigram code;
    - ``set_order``: the log2 k! bits that rank order costs over an unordered set (an upper
      bound on what coding the set apart from the values could save).

    Vectorised over positions and entries (bincount, sort and searchsorted, no loop).
    """
    ids = np.asarray(topk_ids, dtype=np.int64)
    t, k = ids.shape
    fit, test = ids[0::2], ids[1::2]
    counts = np.bincount(fit.ravel(), minlength=vocab).astype(np.float64) + 1.0
    bits_of = -np.log2(counts / counts.sum())
    unigram = bits_of[test]  # [T/2, k]
    # Is test[i, j] in the set of the position before it (ids[2i])? One sorted row each.
    prev = np.sort(ids[0::2][: len(test)], axis=1)
    rows = np.arange(len(test))[:, None]
    at = _row_searchsorted(prev, test)
    member = prev[rows, np.minimum(at, k - 1)] == test
    cost_prev = np.where(member, 1.0 + np.log2(k), 1.0 + unigram)
    log2_fact = float(np.sum(np.log2(np.arange(1, k + 1))))
    return {
        "uniform": float(k * np.log2(vocab)),
        "unigram": float(unigram.sum(axis=1).mean()),
        "previous_set": float(cost_prev.sum(axis=1).mean()),
        "previous_set_hit_rate": float(member.mean()),
        "set_order": log2_fact,
        "positions": int(t),
    }


def _row_searchsorted(sorted_rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``np.searchsorted`` of each row of ``values`` in the same row of ``sorted_rows``, for
    all rows at once: offsetting row r by r * span keeps rows apart in one flat search."""
    span = int(max(sorted_rows.max(initial=0), values.max(initial=0))) + 1
    row = np.arange(len(sorted_rows), dtype=np.int64)[:, None]
    flat = np.searchsorted((sorted_rows + row * span).ravel(), (values + row * span).ravel())
    return flat.reshape(values.shape) - row * sorted_rows.shape[1]


def render_row(r: dict) -> str:
    avg = r.get(f"kl_mean_of_{AVERAGED_DRAWS}_draws")
    return (
        f"{r['codec']:<18} {r['bytes_per_token']:>7.1f} {r['entries_per_token']:>6.1f} "
        f"{r['encode_tokens_per_s']:>10,.0f} {r['decode_tokens_per_s']:>10,.0f} "
        f"{r['kl_mean']:>9.2e} {r['top1_agreement']:>6.3f} {r['rest_mass_error']:>9.2e}"
        + (f"  (KL of {AVERAGED_DRAWS} draws averaged: {avg:.2e})" if avg is not None else "")
    )


def render(result: dict) -> str:
    head = (
        f"codecs on {result['teacher']} ({result['vocab_size']:,} tokens), k={result['k']}, "
        f"{result['tokens']:,} tokens (mean top-1 p {result['exact_top1_prob_mean']:.2f}, "
        f"top-k mass {result['exact_topk_mass_mean']:.4f})\n"
        f"{'codec':<18} {'B/tok':>7} {'ent/t':>6} {'enc tok/s':>10} {'dec tok/s':>10} "
        f"{'KL':>9} {'top-1':>6} {'rest err':>9}"
    )
    bits = result.get("id_coding_bits_per_token")
    lines = [head, *(render_row(r) for r in result["codecs"])]
    if bits:
        lines.append(
            f"top-{result['k']} ids, ideal bytes/token: uniform {bits['uniform'] / 8:.1f}, "
            f"unigram prior {bits['unigram'] / 8:.1f}, previous position's set "
            f"{bits['previous_set'] / 8:.1f} (hit rate {bits['previous_set_hit_rate']:.2f}); "
            f"rank order costs {bits['set_order'] / 8:.1f} of them"
        )
    return "\n".join(lines)
