"""Sparse codecs (`compact`, `sampled`) and the fidelity measures they are judged by."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.codecs import get_codec
from storage.fidelity import kl_to_exact, rest_mass_error, top1_agreement
from storage.reader import ShardSet, decode_logit_table
from storage.schema import build_logit_table, logit_schema, read_metadata
from storage.sparse_codecs import CompactCodec, SampledCodec
from tests.test_storage_shards import K, make_metadata, make_prompts, write_shard_set

V = 1000


def _peaked(n: int, k: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[n, k] distinct ids and descending logprobs of a peaked, heavy-tailed distribution."""
    rng = np.random.default_rng(seed)
    logits = -1.2 * np.log(np.arange(1, V + 1)) * rng.uniform(2, 5, (n, 1))
    logits = logits[:, rng.permutation(V)]
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ids = np.argsort(-lp, axis=1)[:, :k]
    return ids.astype(np.int32), np.take_along_axis(lp, ids, axis=1).astype(np.float32)


def test_compact_by_hand() -> None:
    codec = CompactCodec(drop_mass=1e-4, min_logprob=-16.0)
    ids = np.array([[7, 3, 100, 42]])
    lp = np.log(np.array([[0.5, 0.3, 0.15, 0.00005]])).astype(np.float32)
    entries = codec.encode_entries(ids, lp)
    # The last entry (5e-5 <= 1e-4) is dropped; the rest are stored by increasing id, as gaps.
    assert entries.counts.tolist() == [3]
    assert entries.id_deltas.tolist() == [3, 4, 93]
    assert float(entries.extra["topk_rest"][0]) == pytest.approx(math.log(0.05005), rel=1e-3)
    dec_ids, dec_lp = codec.decode_entries(entries, 4)
    assert dec_ids.tolist() == [[7, 3, 100, 0]] and dec_lp[0, 3] == -np.inf
    p = np.exp(dec_lp[0, :3].astype(np.float64))
    assert p.sum() == pytest.approx(1 - 0.05005, rel=1e-3)  # rescaled to 1 - stored rest
    np.testing.assert_allclose(p, [0.5, 0.3, 0.15], rtol=0.035)  # half a uint8 step in log


def test_compact_keeps_the_bound_and_order() -> None:
    ids, lp = _peaked(3000)
    codec = CompactCodec(drop_mass=1e-4)
    entries = codec.encode_entries(ids, lp)
    dec_ids, dec_lp = codec.decode_entries(entries, ids.shape[1])
    kept = dec_lp > -np.inf
    assert entries.counts.mean() < 0.75 * ids.shape[1]  # peaked: many entries go
    assert np.all(kept[:, 0]) and np.all(dec_ids[:, 0] == ids[:, 0])  # top-1 always stays
    # Highest first, padding last.
    assert np.all(np.diff(np.where(kept, dec_lp, -1e30), axis=1) <= 0)
    assert np.all(dec_ids[~kept] == 0)
    # What was dropped carries at most drop_mass, and went to the rest mass.
    p = np.exp(lp.astype(np.float64))
    in_decoded = (ids[:, :, None] == np.where(kept, dec_ids, -1)[:, None, :]).any(axis=2)
    dropped = np.where(in_decoded, 0.0, p).sum(axis=1)
    assert dropped.max() <= 1e-4 + 1e-9 and dropped.max() > 0
    rest = 1 - np.exp(dec_lp.astype(np.float64)).sum(axis=1)
    # log(rest) in float16: half a step is <= 2**-8 for |log rest| < 16, so ~0.4% of rest.
    np.testing.assert_allclose(rest, 1 - p.sum(axis=1) + dropped, rtol=4e-3, atol=1e-7)
    # Dropping mass d costs at most d * ln(V) (each dropped p_i <= d <= the decoded rest, and
    # the decoded rest is spread over fewer than V tokens); uint8 steps of 16/255 in log
    # space cost about step^2 / 24 more.
    kl = kl_to_exact(ids, lp, dec_ids, dec_lp, V)
    assert np.all(kl >= -1e-12)
    assert kl.mean() <= 1e-4 * math.log(V) + (16 / 255) ** 2 / 24
    assert kl.mean() > (16 / 255) ** 2 / 24 / 10  # not trivially zero: quantisation shows
    assert top1_agreement(ids, dec_ids) == 1.0
    assert rest_mass_error(lp, dec_lp) <= 1e-3


def test_sampled_is_unbiased_and_deterministic() -> None:
    ids, lp = _peaked(1, k=8)
    n = 20000
    ids, lp = np.repeat(ids, n, axis=0), np.repeat(lp, n, axis=0)
    codec = SampledCodec(samples=12, seed=3)
    entries = codec.encode_entries(ids, lp)
    dec_ids, dec_lp = codec.decode_entries(entries, 8)
    q = np.exp(dec_lp.astype(np.float64))
    # Multiples of 1/12, and the rest bucket takes the draws that fell outside the top-k.
    assert np.allclose(q * 12, np.rint(q * 12), atol=1e-4)
    assert np.all(q.sum(axis=1) <= 1 + 1e-6)
    # Unbiased: the mean decoded probability of each token is its exact one (4 sigma).
    p = np.exp(lp[0].astype(np.float64))
    mean_q = np.array([np.where(dec_ids == t, q, 0).sum() / n for t in ids[0]])
    sigma = np.sqrt(p * (1 - p) / (12 * n))
    assert np.all(np.abs(mean_q - p) <= 4 * sigma + 1e-12), (mean_q, p)
    rest_q = 1 - q.sum(axis=1)
    assert abs(rest_q.mean() - (1 - p.sum())) <= 4 * math.sqrt((1 - p.sum()) / (12 * n)) + 1e-9
    # Same data and seed: the same draws; another seed: other draws.
    again = codec.encode_entries(ids, lp)
    np.testing.assert_array_equal(again.values, entries.values)
    other = SampledCodec(samples=12, seed=4).encode_entries(ids, lp)
    assert not np.array_equal(other.counts, entries.counts)


@pytest.mark.parametrize("name", ["compact", "sampled"])
def test_sparse_round_trip_through_parquet(tmp_path: Path, name: str) -> None:
    codec = get_codec(name)
    lengths = [5, 0, 7, 3]
    prompts = make_prompts(lengths)
    ids, lp = _peaked(sum(lengths), k=K, seed=1)
    lp[4, 2:] = -np.inf  # a position with padding (a vocabulary smaller than k)
    nxt = lp[:, 0].copy()
    table = build_logit_table(prompts, ids, lp, nxt, codec)
    assert table.schema.names == logit_schema(codec, K).names
    path = tmp_path / "s.parquet"
    pq.write_table(table.replace_schema_metadata(
        {b"logitforge": make_metadata(codec).to_json_bytes()}), path)  # fmt: skip
    back = pq.read_table(path)
    batch = decode_logit_table(back, read_metadata(back.schema))
    want_ids, want_lp = codec.decode_entries(codec.encode_entries(ids, lp), K)
    np.testing.assert_array_equal(batch.topk_ids, want_ids)
    np.testing.assert_array_equal(batch.topk_logprobs, want_lp)
    np.testing.assert_array_equal(batch.row_offsets, [0, 5, 5, 12, 15])
    assert batch.topk_logprobs.shape == (15, K) and batch.topk_logprobs.dtype == np.float32
    assert np.all(batch.topk_logprobs[4, 2:] == -np.inf)  # padding never becomes mass
    # A slice of rows decodes the same positions (offsets of a sliced nested column).
    part = decode_logit_table(back.slice(2, 2), read_metadata(back.schema))
    np.testing.assert_array_equal(part.topk_ids, want_ids[5:])


@pytest.mark.parametrize("name", ["compact", "sampled"])
def test_sparse_shard_set_reads_and_loads_with_datasets(tmp_path: Path, monkeypatch, name):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "out"
    codec = get_codec(name)
    write_shard_set(str(out), [[3, 4], [2]], codec=codec)
    batch = ShardSet.open(str(out)).to_batch(strict=True)
    assert batch.num_tokens == 9 and batch.topk_ids.shape == (9, K)
    train = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))["train"]
    assert train.num_rows == 3 and train.column_names == logit_schema(codec, K).names


def test_kl_to_exact_by_hand() -> None:
    # Exact: p = (0.5, 0.3) on tokens (4, 9), rest 0.2 over the other 8 of V = 10 tokens.
    # Decoded: only token 4 at 0.5, rest 0.5 over the other 9 (token 9 gets 0.5 / 9).
    e_ids, e_lp = np.array([[4, 9]]), np.log([[0.5, 0.3]])
    d_ids, d_lp = np.array([[4, 0]]), np.array([[math.log(0.5), -np.inf]])
    want = 0.3 * math.log(0.3 / (0.5 / 9)) + 0.2 * math.log((0.2 / 8) / (0.5 / 9))
    assert kl_to_exact(e_ids, e_lp, d_ids, d_lp, 10)[0] == pytest.approx(want, rel=1e-12)
    assert kl_to_exact(e_ids, e_lp, e_ids, e_lp, 10)[0] == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="names token 7"):
        kl_to_exact(e_ids, e_lp, np.array([[7, 4]]), e_lp, 10)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("compact", {"drop_mass": 1.5}, "drop_mass"),
        ("compact", {"min_logprob": 0.0}, "min_logprob"),
        ("sampled", {"samples": 0}, "samples"),
        ("sampled", {"samples": 300}, "samples"),
        ("sampled", {"draws": 3}, "bad parameters"),
    ],
)
def test_bad_sparse_parameters_are_named(name: str, params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_codec(name, **params)


def test_the_loss_on_a_compact_cache_is_the_loss_on_the_exact_one(tmp_path: Path) -> None:
    """What a student trains on: forward KL (rest bucket) against compact-decoded targets,
    padding included, is finite and close to the loss against the exact targets."""
    import torch

    from stages.train.losses import distill_loss

    ids, lp = _peaked(400, k=K * 4, seed=5)
    exact_ids, exact_lp = ids, lp
    codec = CompactCodec()
    dec_ids, dec_lp = codec.decode_entries(codec.encode_entries(ids, lp), K * 4)
    assert np.isinf(dec_lp).any()  # padding reaches the loss
    student = torch.randn(len(ids), V, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.from_numpy(ids[:, 0].astype(np.int64))

    def loss(i: np.ndarray, p: np.ndarray) -> float:
        value, _ = distill_loss(student, labels, torch.from_numpy(i.astype(np.int64)),
                                torch.from_numpy(p), kind="forward_kl")  # fmt: skip
        assert torch.isfinite(value)
        return float(value)

    exact = loss(exact_ids, exact_lp)
    gap = abs(loss(dec_ids, dec_lp) - exact)
    assert 0 < gap < 1e-3 * exact
