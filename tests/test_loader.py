"""The training loader: collation by hand, streaming real caches, bad sources refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from stages.train.loader import (
    DistillDataset,
    SourceError,
    collate,
    open_sources,
    token_rows,
)
from storage.reader import LogitBatch, ShardSet
from tests.conftest import TEST_K

PAD = 0


def _two_rows() -> LogitBatch:
    """Row a: 4 tokens, prompt 2; row b: 2 tokens, prompt 1. k = 2, values tell positions apart."""
    input_ids = np.array([5, 6, 7, 8, 9, 10], dtype=np.int32)
    t = np.arange(6, dtype=np.float32)
    return LogitBatch(
        ids=["a", "b"],
        row_offsets=np.array([0, 4, 6]),
        input_ids=input_ids,
        prompt_len=np.array([2, 1], dtype=np.int32),
        topk_ids=np.stack([input_ids + 100, input_ids + 200], axis=1).astype(np.int32),
        topk_logprobs=np.stack([-t, -t - 1], axis=1),
        next_logprob=np.full(6, -0.5, dtype=np.float32),
    )


def test_collate_pads_masks_and_aligns_targets_by_hand() -> None:
    b = collate(_two_rows(), pad_id=PAD)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, PAD, PAD]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # Row a: positions 1 and 2 predict completion tokens 7 and 8; position 3 has no next token.
    # Row b: position 0 predicts 10.
    assert b["loss_mask"].tolist() == [[False, True, True, False], [True, False, False, False]]
    mask = b["loss_mask"]
    assert b["target_ids"][mask].tolist() == [7, 8, 10]
    assert b["topk_ids"][mask].tolist() == [[106, 206], [107, 207], [109, 209]]
    assert b["topk_logprobs"][mask].tolist() == [[-1, -2], [-2, -3], [-4, -5]]
    assert b["target_ids"][~mask].eq(-100).sum() == 5 - 1  # a3, b1 pads: no target; a0: 6
    assert b["target_ids"][0, 0] == 6  # prompt positions keep their target, masked out


def test_collate_include_prompt_and_no_teacher_targets() -> None:
    b = collate(_two_rows(), pad_id=PAD, include_prompt=True)
    assert b["loss_mask"].tolist() == [[True, True, True, False], [True, False, False, False]]
    ids = np.array([[1, 2, 3, PAD], [4, 5, 6, 7]])
    rows = token_rows(ids, np.array([3, 4]), np.array([1, 2]))
    b = collate(rows, pad_id=PAD)
    assert "topk_ids" not in b
    assert b["loss_mask"].tolist() == [[True, True, False, False], [False, True, True, False]]
    assert b["target_ids"][b["loss_mask"]].tolist() == [2, 3, 6, 7]


def _trained_positions(batches) -> list[tuple[int, ...]]:
    """Each trained position as (input prefix..., target): order-free identity of the data."""
    out = []
    for b in batches:
        rows, cols = torch.nonzero(b["loss_mask"], as_tuple=True)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            out.append((*b["input_ids"][r, : c + 1].tolist(), int(b["target_ids"][r, c])))
    return sorted(out)


def test_one_epoch_is_every_row_once_in_a_seeded_order(train_cache: Path) -> None:
    sources = open_sources([str(train_cache)])
    whole = ShardSet.open(str(train_cache)).to_batch(strict=True)
    expected = collate(whole, pad_id=PAD)
    ds = DistillDataset(sources, batch_size=48, pad_id=PAD, shuffle_shards=2, seed=3)
    first = list(ds)
    assert [b["input_ids"].shape[0] for b in first] == [48] * 10 + [512 - 480]
    assert _trained_positions(first) == _trained_positions([expected])
    assert [b["input_ids"].tolist() for b in first] == [b["input_ids"].tolist() for b in ds]
    ds.set_epoch(1)
    assert first[0]["input_ids"].tolist() != next(iter(ds))["input_ids"].tolist()


def test_teacher_targets_are_the_cached_values(train_cache: Path) -> None:
    whole = ShardSet.open(str(train_cache)).to_batch(strict=True)
    ds = DistillDataset(open_sources([str(train_cache)]), batch_size=512, pad_id=PAD, shuffle=False)
    (b,) = list(ds)
    assert b["topk_ids"].shape[-1] == TEST_K
    full = b["attention_mask"].bool()
    np.testing.assert_array_equal(b["topk_ids"][full].numpy(), whole.topk_ids)
    np.testing.assert_array_equal(b["topk_logprobs"][full].numpy(), whole.topk_logprobs)


def test_multi_worker_dataloader_covers_every_row_once(train_cache: Path) -> None:
    ds = DistillDataset(open_sources([str(train_cache)]), batch_size=50, pad_id=PAD, seed=1)
    single = _trained_positions(ds)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    assert _trained_positions(loader) == single


def test_plain_parquet_files_work_as_a_source(train_cache: Path, tmp_path: Path) -> None:
    """A shard set without its bookkeeping (as pulled from the Hub) still loads."""
    shutil.copytree(train_cache / "data", tmp_path / "hub" / "data")
    (src,) = open_sources([str(tmp_path / "hub")])
    assert src.shard_set is None and src.num_shards == 8
    ds = DistillDataset([src], batch_size=64, pad_id=PAD, seed=0)
    ref = DistillDataset(open_sources([str(train_cache)]), batch_size=64, pad_id=PAD, seed=0)
    assert _trained_positions(ds) == _trained_positions(ref)


def test_bad_sources_are_named_before_training(train_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no training sources"):
        open_sources([])
    with pytest.raises(SourceError, match="nowhere"):
        open_sources([str(tmp_path / "nowhere")])
    with pytest.raises(SourceError, match="another tokenizer"):
        open_sources([str(train_cache)], tokenizer_fingerprint="0123456789abcdef")

    empty = tmp_path / "empty"
    shutil.copytree(train_cache, empty)
    shutil.rmtree(empty / ".logitforge" / "done")
    with pytest.raises(SourceError, match="not complete"):
        open_sources([str(empty)])
    with pytest.raises(SourceError, match="no complete shards"):
        open_sources([str(empty)], strict=False)

    def rewrite_metadata(folder: Path, **changes) -> None:
        for path in sorted((folder / "data").glob("*.parquet")):
            table = pq.read_table(path)
            meta = json.loads(table.schema.metadata[b"logitforge"])
            meta.update(changes)
            table = table.replace_schema_metadata({b"logitforge": json.dumps(meta).encode()})
            pq.write_table(table, path)

    for name, changes, message in [
        ("codec", {"codec": "zstd-magic"}, "unknown codec"),
        ("version", {"format_version": 99}, "newer than this logitforge"),
    ]:
        folder = tmp_path / name
        shutil.copytree(train_cache / "data", folder / "data")
        rewrite_metadata(folder, **changes)
        with pytest.raises(SourceError, match=message):
            open_sources([str(folder)])
