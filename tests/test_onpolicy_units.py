"""On-policy building blocks, unit by unit: no engine, no cluster, expected values by hand.

Rollout rows (alignment of the policy's logprobs), the rollout columns through the logit
table, batches and collation, the batch mixture, the on-policy configs, round prompts, a shard
set as input, and the loss/data check.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from torch.utils.data import IterableDataset

from pipeline.config import DistillConfig, RolloutConfig
from pipeline.distill import check_loss_data
from pipeline.onpolicy import OnPolicyConfig, RoundOptions, write_round_prompts
from stages.prompts.options import InputOptions, PrepareOptions
from stages.prompts.records import SkippedRow
from stages.prompts.shard_input import read_shard_set_rows
from stages.teacher.engine import Generated
from stages.teacher.generated import ByteTable, PromptPart, generated_rows
from stages.train.loader import LogitSource, MixtureDataset, SourceError, collate
from storage.codecs import get_codec
from storage.layout import ShardSetLayout, shard_name
from storage.manifest import (
    DoneRecord,
    Plan,
    ShardPlan,
    remove_done,
    utc_now,
    write_done,
    write_plan,
)
from storage.reader import LogitBatch, decode_logit_table
from storage.schema import (
    PROMPT_SCHEMA,
    ROLLOUT_SCHEMA,
    ShardSetMetadata,
    build_logit_table,
    is_rollout_table,
    logit_schema,
)
from storage.writer import parquet_bytes, write_parquet_atomic

NAN = np.nan


def f32(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def assert_same_floats(got: np.ndarray | list[float], want: list[float]) -> None:
    """Same length, NaN at exactly the same positions, equal float32 values elsewhere."""
    got = np.asarray(got, dtype=np.float32)
    want_arr = f32(want)
    assert got.shape == want_arr.shape
    assert np.isnan(got).tolist() == np.isnan(want_arr).tolist()
    finite = ~np.isnan(want_arr)
    assert got[finite].tolist() == want_arr[finite].tolist()


# ------------------------------------------------------------------ 1-2. rollout rows

# Token id -> bytes: 0 BOS and 1 EOS are special (empty), 4 and 5 are the two bytes of "é".
VOCAB = [b"", b"", b"a", b"b", b"\xc3", b"\xa9", b"="]


def _parts() -> list[PromptPart]:
    return [
        PromptPart(ids=[0, 2, 6], text=b"a=", byte_start=[0, 0, 1], byte_end=[0, 1, 2]),
        PromptPart(ids=[0, 3], text=b"b", byte_start=[0, 0], byte_end=[0, 1]),
    ]


def _generated(with_logprobs: bool = True) -> Generated:
    """2 prompts x n=2 samples.

    s0 (p0#0): "a", "b", EOS                 stop
    s1 (p0#1): "\\xc3", "\\xa9", "a", "b"      length; 3 + 4 > max_len 6: cut to 3 tokens "éa"
    s2 (p1#0): "\\xc3", "b"                   length; b"b\\xc3b" is not UTF-8
    s3 (p1#1): "a", EOS                      stop
    """
    samples = [[2, 3, 1], [4, 5, 2, 3], [4, 3], [2, 1]]
    logprobs = [[-0.1, -0.2, -0.3], [-1.1, -1.2, -1.3, -1.4], [-2.1, -2.2], [-3.1, -3.2]]
    return Generated(
        token_ids=np.array([t for s in samples for t in s], dtype=np.int32),
        offsets=np.array([0, 3, 7, 9, 11], dtype=np.int64),
        finish_reason=["stop", "length", "length", "stop"],
        n=2,
        logprobs=f32([v for s in logprobs for v in s]) if with_logprobs else None,
    )


COUNTS = {"samples": 4, "stop": 2, "length": 2, "truncated": 1, "invalid_utf8": 1}


def test_generated_rows_rollout_aligns_policy_logprobs_by_hand() -> None:
    table, counts = generated_rows(
        ["p0", "p1"], _parts(), _generated(), ByteTable(VOCAB), max_len=6, policy_version="v7"
    )
    assert table.schema == ROLLOUT_SCHEMA
    assert is_rollout_table(table)
    assert counts == COUNTS
    rows = table.to_pylist()
    # A rollout keeps the sample that is not UTF-8 (the teacher must score what the policy
    # did): U+FFFD in its text, completion byte spans -1.
    assert [r["id"] for r in rows] == ["p0#0", "p0#1", "p1#0", "p1#1"]
    assert [r["input_ids"] for r in rows] == [
        [0, 2, 6, 2, 3, 1],
        [0, 2, 6, 4, 5, 2],
        [0, 3, 4, 3],
        [0, 3, 2, 1],
    ]
    assert [r["prompt_len"] for r in rows] == [3, 3, 2, 2]
    assert [r["text"] for r in rows] == ["a=ab", "a=éa", "b\ufffdb", "ba"]
    assert [r["truncated"] for r in rows] == [False, True, False, False]
    assert [r["policy_version"] for r in rows] == ["v7"] * 4
    # Position j holds the logprob of token j + 1: p - 1 prompt NaNs, the completion's
    # logprobs (only the kept ones when truncated), NaN at the last position.
    assert_same_floats(rows[0]["policy_logprob"], [NAN, NAN, -0.1, -0.2, -0.3, NAN])
    assert_same_floats(rows[1]["policy_logprob"], [NAN, NAN, -1.1, -1.2, -1.3, NAN])
    assert_same_floats(rows[2]["policy_logprob"], [NAN, -2.1, -2.2, NAN])
    assert_same_floats(rows[3]["policy_logprob"], [NAN, -3.1, -3.2, NAN])
    for r in rows:
        assert len(r["policy_logprob"]) == len(r["input_ids"])
    # Byte spans: exact token bytes, the two halves of "é" widened to the whole character,
    # EOS an empty span at the end; -1 for the completion that has no text to align.
    assert rows[0]["byte_start"] == [0, 0, 1, 2, 3, 4]
    assert rows[0]["byte_end"] == [0, 1, 2, 3, 4, 4]
    assert rows[1]["byte_start"] == [0, 0, 1, 2, 2, 4]
    assert rows[1]["byte_end"] == [0, 1, 2, 4, 4, 5]
    assert rows[2]["byte_start"] == [0, 0, -1, -1]
    assert rows[2]["byte_end"] == [0, 1, -1, -1]
    assert rows[3]["byte_start"] == [0, 0, 1, 2]
    assert rows[3]["byte_end"] == [0, 1, 2, 2]


def test_generated_rows_teacher_generation_drops_invalid_utf8() -> None:
    table, counts = generated_rows(["p0", "p1"], _parts(), _generated(), ByteTable(VOCAB), 6)
    assert table.schema == PROMPT_SCHEMA
    assert not is_rollout_table(table)
    assert counts == COUNTS
    assert table.column("id").to_pylist() == ["p0#0", "p0#1", "p1#1"]
    assert table.column("text").to_pylist() == ["a=ab", "a=éa", "ba"]


def test_generated_rows_single_sample_ids_and_untruncated() -> None:
    gen = Generated(
        token_ids=np.array([2, 1, 3], dtype=np.int32),
        offsets=np.array([0, 2, 3], dtype=np.int64),
        finish_reason=["stop", "length"],
        n=1,
        logprobs=f32([-0.5, -0.25, -0.75]),
    )
    table, counts = generated_rows(["p0", "p1"], _parts(), gen, ByteTable(VOCAB), 64, "v1")
    assert table.column("id").to_pylist() == ["p0", "p1"]  # n == 1: the row id itself
    assert counts == {
        "samples": 2,
        "stop": 1,
        "length": 1,
        "truncated": 0,
        "invalid_utf8": 0,
    }
    policy = table.column("policy_logprob").to_pylist()
    assert_same_floats(policy[0], [NAN, NAN, -0.5, -0.25, NAN])
    assert_same_floats(policy[1], [NAN, -0.75, NAN])


def test_generated_rows_rollout_needs_logprobs() -> None:
    gen = _generated(with_logprobs=False)
    with pytest.raises(ValueError, match="logprobs"):
        generated_rows(["p0", "p1"], _parts(), gen, ByteTable(VOCAB), 6, policy_version="v7")


@pytest.mark.parametrize("shape", [(2,), (4,), (3, 1)])
def test_generated_rejects_logprobs_of_the_wrong_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="logprobs"):
        Generated(
            token_ids=np.array([2, 3, 1], dtype=np.int32),
            offsets=np.array([0, 3], dtype=np.int64),
            finish_reason=["stop"],
            n=1,
            logprobs=np.zeros(shape, dtype=np.float32),
        )
    ok = Generated(
        token_ids=np.array([2, 3, 1], dtype=np.int32),
        offsets=np.array([0, 3], dtype=np.int64),
        finish_reason=["stop"],
        n=1,
        logprobs=np.zeros(3, dtype=np.float32),
    )
    assert ok.logprobs is not None and ok.logprobs.shape == (3,)


# ------------------------------------------------------------------ 3. logit table

K = 2


def _rollout_prompts(policy: list[list[float]] | None = None) -> pa.Table:
    """Rows of 3 and 2 tokens with the rollout columns (and one extra column to drop)."""
    policy = policy or [[NAN, -0.5, NAN], [-0.25, NAN]]
    return pa.table(
        {
            "id": ["a", "b"],
            "input_ids": [[1, 2, 3], [4, 5]],
            "prompt_len": [2, 1],
            "text": ["xyz", "uv"],
            "byte_start": [[0, 1, 2], [0, 1]],
            "byte_end": [[1, 2, 3], [1, 2]],
            "truncated": [False, True],
            "policy_logprob": policy,
            "policy_version": ["r0001", "r0001"],
            "junk": [1, 2],
        }
    )


def _plain_prompts() -> pa.Table:
    return _rollout_prompts().select(PROMPT_SCHEMA.names).cast(PROMPT_SCHEMA)


def _teacher_outputs(num_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = np.arange(num_tokens, dtype=np.float32)
    topk_ids = np.stack([np.arange(num_tokens) + 10, np.arange(num_tokens) + 20], axis=1)
    topk_lps = np.stack([-t - 0.5, -t - 1.5], axis=1).astype(np.float32)
    next_lp = -t - 0.5
    return topk_ids, topk_lps, next_lp


def _metadata(kind: str, k: int = K, codec: str = "fp32", fingerprint: str = "plan-x"):
    return ShardSetMetadata(
        kind=kind,
        teacher_model="tiny/teacher",
        tokenizer_fingerprint="tok-1",
        k=k,
        codec=codec,
        logprobs_mode="raw_logprobs",
        engine="vllm",
        engine_version="0",
        plan_fingerprint=fingerprint,
    )


def test_build_logit_table_keeps_rollout_columns_and_decodes() -> None:
    codec = get_codec("fp32")
    table = build_logit_table(_rollout_prompts(), *_teacher_outputs(5), codec)
    assert table.schema == logit_schema(codec, K, rollout=True)
    assert "junk" not in table.column_names
    assert table.column("policy_version").to_pylist() == ["r0001", "r0001"]
    # Through Parquet bytes as a shard is written, then decoded.
    meta = _metadata("onpolicy")
    read = pq.read_table(pa.BufferReader(parquet_bytes(table, meta)))
    batch = decode_logit_table(read, meta)
    assert batch.row_offsets.tolist() == [0, 3, 5]
    assert batch.input_ids.tolist() == [1, 2, 3, 4, 5]
    assert batch.policy_logprob is not None
    assert batch.policy_logprob.dtype == np.float32
    assert_same_floats(batch.policy_logprob, [NAN, -0.5, NAN, -0.25, NAN])
    assert batch.policy_logprobs() is batch.policy_logprob
    assert batch.next_logprob.tolist() == [-0.5, -1.5, -2.5, -3.5, -4.5]
    assert batch.topk_ids.tolist() == [[10, 20], [11, 21], [12, 22], [13, 23], [14, 24]]


def test_build_logit_table_refuses_policy_logprob_of_another_length() -> None:
    prompts = _rollout_prompts(policy=[[NAN, -0.5, NAN], [-0.25, NAN, NAN]])  # row b: 3 != 2
    with pytest.raises(ValueError, match="policy_logprob") as info:
        build_logit_table(prompts, *_teacher_outputs(5), get_codec("fp32"))
    assert "row 1" in str(info.value)


def test_build_logit_table_plain_prompts_have_no_policy_logprob() -> None:
    codec = get_codec("fp32")
    table = build_logit_table(_plain_prompts(), *_teacher_outputs(5), codec)
    assert table.schema == logit_schema(codec, K)
    assert not is_rollout_table(table)
    batch = decode_logit_table(table, _metadata("teacher_logits"))
    assert batch.policy_logprob is None
    policy = batch.policy_logprobs()
    assert policy.dtype == np.float32 and policy.shape == (5,)
    assert np.isnan(policy).all()


# ------------------------------------------------------------------ 4. take / concat


def _batch(
    ids: list[str], lengths: list[int], first_id: int, policy: list[float] | None
) -> LogitBatch:
    total = sum(lengths)
    input_ids = np.arange(first_id, first_id + total, dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return LogitBatch(
        ids=ids,
        row_offsets=offsets,
        input_ids=input_ids,
        prompt_len=np.ones(len(ids), dtype=np.int32),
        topk_ids=np.stack([input_ids, input_ids + 1000], axis=1),
        topk_logprobs=np.zeros((total, 2), dtype=np.float32),
        next_logprob=-input_ids.astype(np.float32),
        policy_logprob=None if policy is None else f32(policy),
    )


def test_take_carries_policy_logprob() -> None:
    a = _batch(["a0", "a1"], [3, 2], 10, [NAN, -1.0, NAN, -2.0, NAN])
    t = a.take(np.array([1, 0, 1]))
    assert t.ids == ["a1", "a0", "a1"]
    assert t.row_offsets.tolist() == [0, 2, 5, 7]
    assert t.input_ids.tolist() == [13, 14, 10, 11, 12, 13, 14]
    assert t.policy_logprob is not None
    assert_same_floats(t.policy_logprob, [-2.0, NAN, NAN, -1.0, NAN, -2.0, NAN])
    plain = _batch(["b0"], [2], 50, None)
    assert plain.take(np.array([0, 0])).policy_logprob is None


def test_concat_fills_nan_for_batches_without_policy_logprob() -> None:
    a = _batch(["a0", "a1"], [3, 2], 10, [NAN, -1.0, NAN, -2.0, NAN])
    b = _batch(["b0"], [2], 50, None)
    ab = LogitBatch.concat([a, b])
    assert ab.ids == ["a0", "a1", "b0"]
    assert ab.row_offsets.tolist() == [0, 3, 5, 7]
    assert ab.input_ids.tolist() == [10, 11, 12, 13, 14, 50, 51]
    assert_same_floats(ab.policy_logprob, [NAN, -1.0, NAN, -2.0, NAN, NAN, NAN])
    ba = LogitBatch.concat([b, a])
    assert ba.ids == ["b0", "a0", "a1"]
    assert_same_floats(ba.policy_logprob, [NAN, NAN, NAN, -1.0, NAN, -2.0, NAN])
    assert LogitBatch.concat([b, b]).policy_logprob is None
    aa = LogitBatch.concat([a, a])
    assert_same_floats(aa.policy_logprob, [NAN, -1.0, NAN, -2.0, NAN] * 2)


# ------------------------------------------------------------------ 5. collate


def _collate_rows(policy: bool = True) -> LogitBatch:
    """Row a: 4 tokens, prompt 2; row b: 2 tokens, prompt 1; values tell positions apart."""
    input_ids = np.array([5, 6, 7, 8, 9, 10], dtype=np.int32)
    return LogitBatch(
        ids=["a", "b"],
        row_offsets=np.array([0, 4, 6]),
        input_ids=input_ids,
        prompt_len=np.array([2, 1], dtype=np.int32),
        topk_ids=input_ids[:, None] + 100,
        topk_logprobs=np.full((6, 1), -0.01, dtype=np.float32),
        next_logprob=f32([-0.1, -0.2, -0.3, NAN, -0.4, NAN]),
        policy_logprob=f32([NAN, -1.2, -1.3, NAN, -1.4, NAN]) if policy else None,
    )


def _assert_tensor(got: torch.Tensor, want: list[list[float]]) -> None:
    assert got.dtype == torch.float32
    assert list(got.shape) == [len(want), len(want[0])]
    for got_row, want_row in zip(got.numpy(), want, strict=True):
        assert_same_floats(got_row, want_row)


def test_collate_aligns_next_and_policy_logprob_with_targets() -> None:
    b = collate(_collate_rows(), pad_id=0)
    assert b["target_ids"].tolist() == [[6, 7, 8, -100], [10, -100, -100, -100]]
    assert b["loss_mask"].tolist() == [[False, True, True, False], [True, False, False, False]]
    # (i, j): logprob of target_ids[i, j]; NaN at the last position and on padding.
    _assert_tensor(b["next_logprob"], [[-0.1, -0.2, -0.3, NAN], [-0.4, NAN, NAN, NAN]])
    _assert_tensor(b["policy_logprob"], [[NAN, -1.2, -1.3, NAN], [-1.4, NAN, NAN, NAN]])
    no_target = b["target_ids"] == -100
    assert torch.isnan(b["next_logprob"][no_target]).all()
    assert torch.isnan(b["policy_logprob"][no_target]).all()
    # Every trained position of a rollout has the policy's logprob of its target.
    assert not torch.isnan(b["policy_logprob"][b["loss_mask"]]).any()


def test_collate_select_reorders_rows_and_non_rollouts_get_nan_policy() -> None:
    b = collate(_collate_rows(), pad_id=0, select=np.array([1, 0]))
    assert b["target_ids"].tolist() == [[10, -100, -100, -100], [6, 7, 8, -100]]
    _assert_tensor(b["next_logprob"], [[-0.4, NAN, NAN, NAN], [-0.1, -0.2, -0.3, NAN]])
    _assert_tensor(b["policy_logprob"], [[-1.4, NAN, NAN, NAN], [NAN, -1.2, -1.3, NAN]])
    plain = collate(_collate_rows(policy=False), pad_id=0)
    assert plain["policy_logprob"].shape == (2, 4)
    assert torch.isnan(plain["policy_logprob"]).all()
    _assert_tensor(plain["next_logprob"], [[-0.1, -0.2, -0.3, NAN], [-0.4, NAN, NAN, NAN]])


# ------------------------------------------------------------------ 6. mixture


class Tagged(IterableDataset):
    """An endless stream of {"tag", "i"} dicts (or ``limit`` of them)."""

    def __init__(self, tag: str, limit: int | None = None) -> None:
        super().__init__()
        self.tag = tag
        self.limit = limit
        self.opened = 0

    def __iter__(self) -> Iterator[dict]:
        self.opened += 1
        counter = itertools.count() if self.limit is None else range(self.limit)
        return ({"tag": self.tag, "i": i} for i in counter)


class NeverIterated(IterableDataset):
    def __iter__(self) -> Iterator[dict]:
        raise AssertionError("a zero-weight stream must not be opened")


def _take(dataset: IterableDataset, n: int) -> list[tuple[str, int]]:
    return [(b["tag"], b["i"]) for b in itertools.islice(iter(dataset), n)]


def test_mixture_fractions_follow_the_weights() -> None:
    mix = MixtureDataset([Tagged("on"), Tagged("off")], [3.0, 7.0], seed=5)  # unnormalised
    batches = _take(mix, 4000)
    share = sum(tag == "on" for tag, _ in batches) / len(batches)
    assert abs(share - 0.3) < 0.03
    # Each stream is consumed in order, without skipping or repeating a batch.
    for tag in ("on", "off"):
        seen = [i for t, i in batches if t == tag]
        assert seen == list(range(len(seen)))


def test_mixture_is_deterministic_per_seed() -> None:
    first = _take(MixtureDataset([Tagged("a"), Tagged("b")], [0.5, 0.5], seed=3), 300)
    mix = MixtureDataset([Tagged("a"), Tagged("b")], [0.5, 0.5], seed=3)
    assert _take(mix, 300) == first
    assert _take(mix, 300) == first  # a second iteration of the same object, too
    other = _take(MixtureDataset([Tagged("a"), Tagged("b")], [0.5, 0.5], seed=4), 300)
    assert [t for t, _ in other] != [t for t, _ in first]


def test_mixture_never_opens_a_zero_weight_stream() -> None:
    assert {t for t, _ in _take(MixtureDataset([Tagged("a"), NeverIterated()], [1, 0]), 200)} == {
        "a"
    }
    assert {t for t, _ in _take(MixtureDataset([NeverIterated(), Tagged("b")], [0, 0.2]), 200)} == {
        "b"
    }


def test_mixture_ends_with_a_finite_stream() -> None:
    assert _take(MixtureDataset([Tagged("f", limit=3)], [1.0]), 100) == [
        ("f", 0),
        ("f", 1),
        ("f", 2),
    ]
    batches = _take(MixtureDataset([Tagged("f", limit=3), Tagged("e")], [0.5, 0.5], seed=1), 10**4)
    assert sum(t == "f" for t, _ in batches) == 3
    assert len(batches) < 10**4  # it ended: the 4th pick of "f" found the stream exhausted


@pytest.mark.parametrize(
    ("n", "weights"),
    [(0, []), (2, [1.0]), (2, [-0.5, 1.5]), (2, [0.0, 0.0]), (1, [-1.0])],
)
def test_mixture_rejects_bad_weights(n: int, weights: list[float]) -> None:
    with pytest.raises(ValueError, match="weight"):
        MixtureDataset([Tagged(str(i)) for i in range(n)], weights)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("weights", [[float("nan"), 1.0], [float("inf"), 1.0]])
def test_mixture_rejects_non_finite_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="weight"):
        MixtureDataset([Tagged("a"), Tagged("b")], weights)


# ------------------------------------------------------------------ 7. configs


def _onpolicy(tmp_path: Path, **sections) -> OnPolicyConfig:
    data = {
        "input": {"path": str(tmp_path / "prompts.jsonl")},
        "teacher": {"model": "tiny/teacher"},
        "student": {"model": "tiny/student"},
        "onpolicy": {"rounds": 2, "prompts_per_round": 4},
        "train": {"output_dir": str(tmp_path / "run"), "steps": 1},
    }
    data.update(sections)
    return OnPolicyConfig.model_validate(data)


def test_onpolicy_config_defaults_are_valid(tmp_path: Path) -> None:
    cfg = _onpolicy(tmp_path)
    assert cfg.loss.kind == "sampled_rkl"
    assert (cfg.generation.temperature, cfg.generation.top_p) == (1.0, 1.0)
    assert cfg.onpolicy.onpolicy_fraction == 1.0


@pytest.mark.parametrize(
    ("generation", "match"),
    [
        ({"temperature": 0.7}, "temperature 1"),
        ({"temperature": 1.0, "top_p": 0.9}, "top_p 1"),
        # A partial section falls back to GenerationOptions' own default (greedy, T = 0).
        ({"max_tokens": 8}, "temperature 1"),
    ],
)
def test_sampled_rkl_needs_untempered_sampling(tmp_path: Path, generation, match) -> None:
    with pytest.raises(ValidationError, match=match):
        _onpolicy(tmp_path, generation=generation)
    # A top-k loss does not need the policy's own distribution.
    cfg = _onpolicy(tmp_path, generation=generation, loss={"kind": "jsd"})
    assert cfg.loss.kind == "jsd"


def test_sampled_rkl_refuses_off_policy_mixing(tmp_path: Path) -> None:
    mixed = {"rounds": 1, "prompts_per_round": 4, "onpolicy_fraction": 0.5, "offpolicy": ["c"]}
    with pytest.raises(ValidationError, match="sampled_rkl trains on"):
        _onpolicy(tmp_path, onpolicy=mixed)
    cfg = _onpolicy(tmp_path, onpolicy=mixed, loss={"kind": "jsd"})
    assert cfg.onpolicy.onpolicy_fraction == 0.5 and cfg.onpolicy.offpolicy == ["c"]


def test_round_options_need_offpolicy_sources_to_mix(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="offpolicy"):
        RoundOptions(rounds=1, prompts_per_round=4, onpolicy_fraction=0.5)
    with pytest.raises(ValidationError, match="offpolicy"):
        _onpolicy(
            tmp_path,
            onpolicy={"rounds": 1, "prompts_per_round": 4, "onpolicy_fraction": 0.0},
            loss={"kind": "jsd"},
        )
    assert RoundOptions(rounds=1, prompts_per_round=4, onpolicy_fraction=1.0).offpolicy == []
    with pytest.raises(ValidationError):
        RoundOptions(rounds=1, prompts_per_round=4, onpolicy_fraction=1.5, offpolicy=["c"])


def _rollout(**changes) -> RolloutConfig:
    data = {
        "input": {"path": "prompts.jsonl"},
        "policy": {"model": "/ckpt/run/rounds/r0003/student"},
        "output": {"path": "out"},
    }
    data.update(changes)
    return RolloutConfig.model_validate(data)


def test_rollout_config_version_kind_and_alias() -> None:
    cfg = _rollout()
    assert cfg.version == "student"
    assert _rollout(policy={"model": "/ckpt/r0007/"}).version == "r0007"
    assert _rollout(policy_version="v9").version == "v9"
    assert cfg.kind == "rollout"
    assert cfg.teacher is cfg.policy
    assert cfg.generation.temperature == 1.0
    assert cfg.output_defining()["policy_version"] == "student"


def test_rollout_config_output_defining() -> None:
    base = _rollout().output_defining()
    assert _rollout(generation={"temperature": 1.0, "seed": 1}).output_defining() != base
    assert _rollout(generation={"temperature": 1.0, "seed": 0}).output_defining() == base
    assert _rollout(cluster={"n_workers": 4, "retries": 0}).output_defining() == base
    assert _rollout(policy_version="v9").output_defining() != base
    assert _rollout(policy={"model": "/ckpt/other"}).output_defining() != base


# ------------------------------------------------------------------ 8. round prompts, shard input


def _read_ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_write_round_prompts_windows_wrap_around(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": f"q{i}"} for i in range(5)]
    order = np.array([3, 0, 4, 1, 2])
    expected = {0: ["r3", "r0"], 1: ["r4", "r1"], 2: ["r2", "r3"], 7: ["r2", "r3"]}
    for r, ids in expected.items():
        path = tmp_path / f"r{r}" / "prompts.jsonl"  # the folder does not exist yet
        write_round_prompts(rows, order, r, 2, path)
        assert _read_ids(path) == ids
    one = tmp_path / "r0" / "prompts.jsonl"
    assert json.loads(one.read_text().splitlines()[0]) == {"id": "r3", "prompt": "q3"}
    assert sorted(p.name for p in (tmp_path / "r0").iterdir()) == ["prompts.jsonl"]


def test_write_round_prompts_never_rewrites(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}"} for i in range(5)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("kept\n")
    write_round_prompts(rows, np.arange(5), 0, 2, path)
    assert path.read_text() == "kept\n"
    path.unlink()
    write_round_prompts(rows, np.arange(5), 0, 2, path)
    first = path.read_text()
    write_round_prompts(rows, np.arange(5)[::-1], 1, 3, path)  # another window: ignored
    assert path.read_text() == first
    assert _read_ids(path) == ["r0", "r1"]


def test_onpolicy_refuses_more_prompts_per_round_than_prompts(tmp_path: Path) -> None:
    """A round's window would wrap onto itself (duplicate ids): refused before any engine."""
    from pipeline.onpolicy import run_onpolicy

    rows = [{"id": f"r{i}", "prompt": "1+1="} for i in range(3)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _onpolicy(tmp_path, onpolicy={"rounds": 1, "prompts_per_round": 4})
    with pytest.raises(ValueError, match="prompts_per_round=4 exceeds the 3 prompts"):
        run_onpolicy(cfg, log=lambda _: None)


TOKENIZER_FP = "tok-1"


def _rollout_table(lengths: list[int], prefix: str) -> pa.Table:
    ids = [[100 * r + i for i in range(n)] for r, n in enumerate(lengths)]
    return pa.table(
        {
            "id": [f"{prefix}{r}" for r in range(len(lengths))],
            "input_ids": ids,
            "prompt_len": [1] * len(lengths),
            "text": ["x" * n for n in lengths],
            "byte_start": [list(range(n)) for n in lengths],
            "byte_end": [list(range(1, n + 1)) for n in lengths],
            "truncated": [False] * len(lengths),
            "policy_logprob": [[NAN] * n for n in lengths],
            "policy_version": ["r0000"] * len(lengths),
        },
        schema=ROLLOUT_SCHEMA,
    )


def write_rollout_set(url: str, shard_lengths: list[list[int]], fp: str = "plan-r") -> str:
    """A complete rollout shard set (kind rollout, k = 0) written like the pipeline does."""
    layout = ShardSetLayout.from_url(url)
    layout.ensure_dirs()
    n = len(shard_lengths)
    shards, start = [], 0
    for i, lengths in enumerate(shard_lengths):
        shards.append(
            ShardPlan(
                index=i, name=shard_name(i, n), row_start=start, row_stop=start + len(lengths)
            )
        )
        start += len(lengths)
    plan = Plan(
        fingerprint=fp,
        created_at=utc_now(),
        config={},
        input_fingerprint="in-1",
        num_rows=start,
        num_shards=n,
        shards=shards,
    )
    write_plan(layout, plan)
    meta = _metadata("rollout", k=0, codec="none", fingerprint=fp)
    meta = meta.model_copy(update={"tokenizer_fingerprint": TOKENIZER_FP})
    for i, lengths in enumerate(shard_lengths):
        table = _rollout_table(lengths, prefix=f"s{i}-")
        f = write_parquet_atomic(layout.fs, layout.data_path(i, n), table, meta)
        record = DoneRecord(
            shard=shards[i].name,
            index=i,
            rows=f.rows,
            tokens=sum(lengths),
            bytes=f.bytes,
            sha256=f.sha256,
            plan_fingerprint=fp,
            finished_at=utc_now(),
        )
        write_done(layout, record)
    return url


def _read(url: str, max_length: int, on_too_long: str = "truncate", limit: int | None = None):
    return read_shard_set_rows(
        InputOptions(path=url, limit=limit),
        PrepareOptions(on_too_long=on_too_long),
        TOKENIZER_FP,
        max_length,
    )


def test_read_shard_set_rows_keeps_rollout_columns(tmp_path: Path) -> None:
    url = write_rollout_set(str(tmp_path / "rollouts"), [[3, 5], [2]])
    prepared, meta = _read(url, max_length=5)
    assert meta.kind == "rollout" and meta.k == 0
    assert prepared.table.schema == ROLLOUT_SCHEMA
    assert prepared.table.column("id").to_pylist() == ["s0-0", "s0-1", "s1-0"]
    assert prepared.num_input_rows == 3
    assert prepared.skipped == []


def test_read_shard_set_rows_skips_or_refuses_over_long_rows(tmp_path: Path) -> None:
    url = write_rollout_set(str(tmp_path / "rollouts"), [[3, 5], [2]])
    for mode in ("truncate", "error"):  # tokenized rows are never re-cut
        with pytest.raises(ValueError, match="'s0-1'") as info:
            _read(url, max_length=4, on_too_long=mode)
        assert "on_too_long" in str(info.value) and "5 tokens" in str(info.value)
    prepared, _ = _read(url, max_length=4, on_too_long="skip")
    assert prepared.table.column("id").to_pylist() == ["s0-0", "s1-0"]
    assert prepared.table.column("input_ids").to_pylist() == [[0, 1, 2], [0, 1]]
    assert prepared.skipped == [SkippedRow(1, "s0-1", "too_long")]
    assert prepared.skip_counts() == {"too_long": 1}
    assert prepared.num_input_rows == 3
    # limit applies first: the over-long row is never read.
    limited, _ = _read(url, max_length=4, limit=1)
    assert limited.table.column("id").to_pylist() == ["s0-0"]


def test_read_shard_set_rows_refuses_other_tokenizer_and_incomplete_sets(tmp_path: Path) -> None:
    url = write_rollout_set(str(tmp_path / "rollouts"), [[3, 5], [2]])
    with pytest.raises(ValueError, match="another tokenizer"):
        read_shard_set_rows(InputOptions(path=url), PrepareOptions(), "tok-other", 16)
    remove_done(ShardSetLayout.from_url(url), 1)
    with pytest.raises(ValueError, match="incomplete"):
        _read(url, max_length=16)


def test_training_refuses_an_unscored_rollout_set(tmp_path: Path) -> None:
    url = write_rollout_set(str(tmp_path / "rollouts"), [[3]])
    with pytest.raises(SourceError, match="rollout set"):
        LogitSource.open(url)


# ------------------------------------------------------------------ 9. loss vs data


def _distill(kind: str, tmp_path: Path) -> DistillConfig:
    return DistillConfig.model_validate(
        {
            "student": {"model": "tiny/student"},
            "data": {"sources": ["unused"]},
            "loss": {"kind": kind},
            "train": {"output_dir": str(tmp_path / "out"), "steps": 1},
        }
    )


def _source(url: str, kind: str, codec: str = "fp16") -> SimpleNamespace:
    return SimpleNamespace(url=url, metadata=SimpleNamespace(kind=kind, codec=codec))


def test_check_loss_data(tmp_path: Path) -> None:
    scored = _source("scored", "onpolicy")
    cached = _source("cache", "teacher_logits")
    rkl = _distill("sampled_rkl", tmp_path)
    check_loss_data(rkl, [scored, scored])  # no error
    for bad in (cached, _source("gen", "teacher_generated"), _source("raw", "rollout")):
        with pytest.raises(SourceError, match="sampled_rkl") as info:
            check_loss_data(rkl, [scored, bad])
        assert bad.url in str(info.value) and repr(bad.metadata.kind) in str(info.value)
    for kind in ("jsd", "forward_kl", "ce"):
        check_loss_data(_distill(kind, tmp_path), [cached, scored])


def test_sampled_targets_refuse_a_tempered_soft_loss(tmp_path: Path) -> None:
    sampled = _source("sampled-cache", "teacher_logits", codec="sampled")
    for kind in ("forward_kl", "jsd"):
        cfg = _distill(kind, tmp_path)
        check_loss_data(cfg, [sampled])  # T = 1: fine
        cfg.loss.temperature = 2.0
        with pytest.raises(SourceError, match=r"sampled-cache.*T=1 only.*2\.0"):
            check_loss_data(cfg, [sampled])
        check_loss_data(cfg, [_source("exact", "teacher_logits", codec="fp32")])
    hard = _distill("ce", tmp_path)
    hard.loss.temperature = 2.0
    check_loss_data(hard, [sampled])  # no soft term: the counts are never tempered
