"""Packed batches (`DataOptions.pack`): several rows per sequence, attention kept within each.

A packed batch must train exactly like the padded one: the same per-row losses and the same
gradients, through a real transformers Llama and the trainer's own call (`model_inputs`,
`logits_at`), for same-tokenizer and cross-tokenizer (aligned span) batches.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bench.student_step import _Tokenizer, synthetic_aligned_rows, synthetic_logit_rows
from stages.align.aligner import AlignedRows
from stages.train.loader import collate, collate_aligned, pack_rows
from stages.train.losses import distill_loss
from stages.train.options import StudentArch
from stages.train.student import build_llama
from stages.train.trainer import logits_at, model_inputs
from stages.train.xtok_losses import xtok_loss
from storage.reader import LogitBatch

VOCAB, K = 300, 8


def test_pack_rows_first_fit_decreasing() -> None:
    lengths = np.array([3, 5, 1, 3, 2])
    seq, start = pack_rows(lengths, 5)
    # Longest first: 5 | 3 + 2 | 3 + 1.
    assert seq.tolist() == [1, 0, 2, 2, 1]
    assert start.tolist() == [0, 0, 3, 0, 3]
    for s in range(seq.max() + 1):  # rows of one sequence never overlap, never overflow
        spans = sorted((start[i], start[i] + lengths[i]) for i in np.flatnonzero(seq == s))
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
        assert spans[-1][1] <= 5
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows(np.array([6]), 5)


def _mixed_rows(seed: int = 0) -> LogitBatch:
    """Rows of very different lengths (what packing is for), each first token unique."""
    rows = LogitBatch.concat(
        [
            synthetic_logit_rows(2, 48, K, VOCAB, seed=seed),
            synthetic_logit_rows(5, 16, K, VOCAB, seed=seed + 1),
            synthetic_logit_rows(3, 6, K, VOCAB, seed=seed + 2),
        ]
    )
    rows.input_ids[rows.row_offsets[:-1]] = np.arange(rows.num_rows) + VOCAB - 20
    return rows


def _row_of_each_position(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[S, L] the row each position belongs to, named by the row's unique first token."""
    ids = batch["input_ids"]
    positions = batch.get("position_ids")
    if positions is None:  # padded: one row per sequence, starting at column 0
        positions = torch.arange(ids.shape[1]).expand_as(ids)
    columns = torch.arange(ids.shape[1]).expand_as(ids)
    start = torch.where(positions == 0, columns, 0).cummax(dim=1).values
    return ids.gather(1, start)


def _step(model, batch: dict[str, torch.Tensor], loss) -> tuple[torch.Tensor, dict, dict]:
    model.zero_grad()
    mask = batch["loss_mask"]
    with logits_at(model, mask) as at:
        out = model(**model_inputs(batch))
    logits = at.select(out.logits)
    value = loss(logits, batch, mask)
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # Per-row sums of the target's logprob: the per-row losses, whatever the layout.
    lp = torch.log_softmax(logits.detach(), -1).gather(1, batch["target_ids"][mask][:, None])
    rows = _row_of_each_position(batch)[mask]
    per_row = {int(r): float(lp[rows == r].sum()) for r in rows.unique()}
    return value.detach(), grads, per_row


def _model():
    arch = StudentArch(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    return build_llama(arch, _Tokenizer(VOCAB), seed=0)


def _assert_same_step(model, padded, packed, loss) -> None:
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0], "nothing was packed"
    assert int(packed["loss_mask"].sum()) == int(padded["loss_mask"].sum())
    v1, g1, rows1 = _step(model, padded, loss)
    v2, g2, rows2 = _step(model, packed, loss)
    torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-6)
    assert rows1.keys() == rows2.keys() and len(rows1) > 1
    for r in rows1:
        assert rows2[r] == pytest.approx(rows1[r], rel=1e-4, abs=1e-4)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_batch_trains_like_the_padded_batch() -> None:
    rows = _mixed_rows()
    padded = collate(rows, pad_id=2)
    packed = collate(rows, pad_id=2, pack=True)
    assert "position_ids" in packed and "position_ids" not in padded
    assert packed["attention_mask"].sum() == padded["attention_mask"].sum()

    def loss(logits, batch, mask):
        value, _ = distill_loss(
            logits,
            batch["target_ids"][mask],
            batch["topk_ids"][mask],
            batch["topk_logprobs"][mask],
            kind="forward_kl",
            alpha=0.5,
            next_logprob=batch["next_logprob"][mask],
            policy_logprob=batch["policy_logprob"][mask],
        )
        return value

    _assert_same_step(_model(), padded, packed, loss)


def test_packed_aligned_batch_trains_like_the_padded_batch() -> None:
    rows = AlignedRows.concat(
        [
            synthetic_aligned_rows(2, 48, K, VOCAB, VOCAB, seed=0),
            synthetic_aligned_rows(6, 12, K, VOCAB, VOCAB, seed=1),
        ]
    )
    rows.input_ids[rows.row_offsets[:-1]] = np.arange(rows.num_rows) + VOCAB - 20
    padded = collate_aligned(rows, pad_id=2)
    packed = collate_aligned(rows, pad_id=2, pack=True)

    def loss(logits, batch, mask):
        start = batch["span_start"][mask]
        value, _ = xtok_loss(
            logits,
            batch["target_ids"][mask],
            start,
            torch.cumsum(start.long(), 0) - 1,
            int(start.sum()),
            batch["span_topk_ids"][mask][start],
            batch["span_topk_logprobs"][mask][start],
            batch["span_chain"][mask][start],
            kind="uld",
            alpha=0.5,
        )
        return value

    _assert_same_step(_model(), padded, packed, loss)


def test_a_padding_tail_is_a_segment_of_its_own() -> None:
    rows = _mixed_rows()
    packed = collate(rows, pad_id=2, pack=True)
    pos, real = packed["position_ids"], packed["attention_mask"].bool()
    for p, r in zip(pos.unbind(0), real.unbind(0), strict=True):
        tail = p[~r]
        if len(tail):  # padding restarts at 0 and counts up: never a row's continuation
            assert tail.tolist() == list(range(len(tail)))
    # Every row restarts at 0: as many restarts among real tokens as rows.
    assert int(((pos == 0) & real).sum()) == rows.num_rows
