"""The vLLM teacher agrees with the transformers reference on the trained tiny teacher.

The reference for both is an unbatched forward pass with a full float32 log_softmax, so the
tests can check vLLM's top-k against the exact distribution: every vLLM id must carry the
reference's logprob, the chosen set must be a true top-k, and ids may differ from the
reference's order only where the reference itself ties.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import BUNDLED_PROMPTS, TEST_K, read_jsonl

# float32 on both sides; vLLM's CPU attention and GEMM kernels accumulate in another order.
LOGPROB_ATOL = 2e-3
TIE_ATOL = 2e-3


@pytest.fixture(scope="module")
def sequences(teacher_dir) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    rows = read_jsonl(BUNDLED_PROMPTS)[:40]
    texts = [r["prompt"] + r["completion"] for r in rows]
    # Off-task text gives flatter distributions than the arithmetic the teacher knows.
    texts += ["hello world, 12 apples", "héllo 世界 🙂 99+1=", "1+1=2 and 2+2=4"]
    seqs = [tokenizer(t)["input_ids"] for t in texts]
    seqs.append([tokenizer.bos_token_id])  # a one-token row: only the final prediction
    return seqs


@pytest.fixture(scope="module")
def reference(hf_teacher, sequences) -> list[np.ndarray]:
    """Exact per-row log-probabilities [n, V], one unpadded forward pass per row."""
    out = []
    with torch.inference_mode():
        for seq in sequences:
            logits = hf_teacher.model(input_ids=torch.tensor([seq])).logits[0]
            out.append(torch.log_softmax(logits.float(), -1).numpy())
    return out


def _split(values: np.ndarray, sequences: list[list[int]]) -> list[np.ndarray]:
    bounds = np.cumsum([len(s) for s in sequences])[:-1]
    return np.split(values, bounds)


def _check_against_reference(scored, sequences, reference, atol: float, tie_atol: float):
    k = TEST_K
    assert scored.topk_ids.shape == (sum(map(len, sequences)), k)
    mismatches = 0
    for seq, ref, ids, lps, nxt in zip(
        sequences,
        reference,
        _split(scored.topk_ids, sequences),
        _split(scored.topk_logprobs, sequences),
        _split(scored.next_logprob, sequences),
        strict=True,
    ):
        ref_at_ids = np.take_along_axis(ref, ids.astype(np.int64), axis=1)  # [n, k]
        np.testing.assert_allclose(lps, ref_at_ids, atol=atol, rtol=0)
        assert np.all(np.diff(lps, axis=1) <= 1e-6), "top-k not sorted by descending logprob"
        ref_sorted = -np.sort(-ref, axis=1)[:, :k]
        # A true top-k: nothing chosen falls below the reference's k-th value.
        assert np.all(ref_at_ids[:, -1] >= ref_sorted[:, -1] - atol)
        ref_ids = np.argsort(-ref, axis=1, kind="stable")[:, :k]
        differ = ids != ref_ids
        mismatches += int(differ.sum())
        if differ.any():
            # Allowed only where the reference's own values at both ids tie.
            gap = np.abs(ref_at_ids - np.take_along_axis(ref, ref_ids, axis=1))
            assert np.all(gap[differ] <= tie_atol), f"id mismatch beyond ties: {gap[differ].max()}"
        expected_next = ref[np.arange(len(seq) - 1), seq[1:]]
        np.testing.assert_allclose(nxt[:-1], expected_next, atol=atol, rtol=0)
        assert np.isnan(nxt[-1])
    return mismatches


def test_reference_engine_batches_exactly(hf_teacher, sequences, reference):
    """Right-padded batches of the reference give the unbatched numbers."""
    scored = hf_teacher.score(sequences)
    _check_against_reference(scored, sequences, reference, atol=1e-4, tie_atol=1e-4)


def test_vllm_topk_matches_reference(vllm_teacher, sequences, reference):
    scored = vllm_teacher.score(sequences)
    mismatches = _check_against_reference(
        scored, sequences, reference, atol=LOGPROB_ATOL, tie_atol=TIE_ATOL
    )
    total = scored.topk_ids.size
    assert mismatches <= 0.02 * total, f"{mismatches}/{total} top-k ids differ (all ties)"


def test_trained_teacher_is_peaked(vllm_teacher, sequences):
    """A random-init teacher is near-uniform and would hide codec and alignment errors."""
    scored = vllm_teacher.score(sequences[:40])
    top1 = np.exp(scored.topk_logprobs[:, 0])
    assert np.median(top1) > 0.9


def test_vllm_rejects_rows_beyond_context(vllm_teacher):
    from stages.teacher.engine import EngineLimitError

    with pytest.raises(EngineLimitError, match="max_model_len"):
        vllm_teacher.score([[1] * vllm_teacher.max_model_len])
