"""The codec table's invariants (`bench.codecs.codec_table`), on peaked synthetic top-k: the
exact row is exact, sizes add up, every sparse codec stays inside what it claims, and the
id-coding bounds are the closed forms they say they are."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.codecs import CODECS, _row_searchsorted, codec_table, id_coding_bits
from storage.codecs import get_codec
from storage.reader import decode_logit_table
from storage.schema import build_logit_table
from storage.writer import parquet_bytes
from tests.test_sparse_codecs import V, _peaked
from tests.test_storage_shards import make_metadata, make_prompts

K = 16


@pytest.fixture(scope="module")
def table() -> dict:
    lengths = [40, 75, 12, 90, 33]
    prompts = make_prompts(lengths)
    n = sum(lengths)
    ids, lp = _peaked(n, K, seed=3)
    next_lp = np.full(n, -1.0, np.float32)
    fp32 = get_codec("fp32")
    meta = make_metadata(fp32).model_copy(update={"k": K})
    logits = build_logit_table(prompts, ids, lp, next_lp, fp32)
    exact = decode_logit_table(pq.read_table(pa.BufferReader(parquet_bytes(logits, meta))), meta)
    return codec_table(prompts, exact, meta, V, "synthetic", {})


def test_every_codec_is_in_the_table_and_fp32_is_exact(table) -> None:
    rows = {r["codec"]: r for r in table["codecs"]}
    assert list(rows) == [label for label, _, _ in CODECS]
    exact = rows["fp32 (exact)"]
    assert abs(exact["kl_mean"]) < 1e-9 and exact["top1_agreement"] == 1.0
    assert exact["rest_mass_error"] == 0.0 and exact["entries_per_token"] == K
    assert table["tokens"] == 250 and table["k"] == K


def test_sizes_add_up_and_fidelity_orders_as_claimed(table) -> None:
    rows = {r["codec"]: r for r in table["codecs"]}
    for r in rows.values():
        # The columns' compressed bytes are the shard's bytes less its footer and magic.
        assert sum(r["column_bytes_per_token"].values()) < r["bytes_per_token"]
        # q8's rounded values need not sum to at most 1 (its decoded rest is floored, not
        # renormalised), so its "KL" can dip below 0; every other codec decodes a
        # distribution (sparse codecs rescale to 1 - rest).
        if r["name"] != "q8":
            assert r["kl_mean"] >= -1e-9 and r["kl_p99"] >= -1e-9
    columns = rows["fp32 (exact)"]["column_bytes_per_token"]
    # fp32 values: 4 bytes per entry before zstd, most of the shard. (The ids compress to
    # almost nothing here: `_peaked` ranks the same permutation of the vocabulary per row.)
    assert columns["topk_logprobs"] > max(v for c, v in columns.items() if c != "topk_logprobs")
    assert rows["fp16"]["bytes_per_token"] < rows["fp32 (exact)"]["bytes_per_token"]
    assert rows["fp16"]["kl_p99"] < rows["q8"]["kl_p99"]
    # Dropping more mass keeps fewer entries and moves the KL further.
    drops = ["compact drop 0", "compact drop 3e-5", "compact drop 3e-4", "compact drop 1e-3",
             "compact drop 1e-2"]  # fmt: skip
    entries = [rows[d]["entries_per_token"] for d in drops]
    kls = [rows[d]["kl_mean"] for d in drops]
    assert entries == sorted(entries, reverse=True) and kls[-1] > kls[0]
    # Sampled: unbiased, so averaging draws brings the KL down.
    s12 = rows["sampled 12"]
    assert s12["kl_mean_of_16_draws"] < s12["kl_mean"]
    for r in rows.values():
        assert r["meets_target"] == (r["bytes_per_token"] <= 60 and r["kl_mean"] <= 1e-3)


def test_id_coding_bits_closed_forms() -> None:
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(V)[:K] for _ in range(400)])
    bits = id_coding_bits(ids, V)
    assert bits["uniform"] == pytest.approx(K * math.log2(V))
    assert bits["set_order"] == pytest.approx(math.log2(math.factorial(K)))
    # Uniformly random ids: a fitted unigram prior cannot beat the uniform code by much, and
    # consecutive sets barely overlap (expected hit rate K / V).
    assert bits["unigram"] > 0.95 * bits["uniform"]
    assert bits["previous_set_hit_rate"] < 0.05
    # A position that repeats the previous set costs 1 + log2 K bits per id.
    same = np.repeat(ids[:1], 400, axis=0)
    repeated = id_coding_bits(same, V)
    assert repeated["previous_set_hit_rate"] == 1.0
    assert repeated["previous_set"] == pytest.approx(K * (1 + math.log2(K)))


def test_row_searchsorted_is_numpys_per_row() -> None:
    rng = np.random.default_rng(1)
    rows = np.sort(rng.integers(0, 50, (7, 9)), axis=1)
    values = rng.integers(0, 60, (7, 9))
    expected = np.stack([np.searchsorted(r, v) for r, v in zip(rows, values, strict=True)])
    np.testing.assert_array_equal(_row_searchsorted(rows, values), expected)
