"""evaluate: vLLM-decoded accuracy, perplexity and KL on a held-out cache; weight swapping."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from stages.evaluate import EvalOptions, evaluate_checkpoints, exact_match
from stages.evaluate.metrics import answer_text
from stages.teacher.vllm_engine import check_swappable
from stages.train.loader import DistillDataset, open_sources
from storage.reader import ShardSet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def noisy_teacher(teacher_dir: Path, tmp_path_factory) -> Path:
    """The teacher's architecture with perturbed weights: same shapes, other answers."""
    out = tmp_path_factory.mktemp("noisy") / "model"
    shutil.copytree(teacher_dir, out)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def test_answer_matching_rules() -> None:
    assert answer_text("  153591\nmore") == "153591"
    assert exact_match(["153591", "15359", "153591 "], ["153591", "153591", "153591"]).tolist() == [
        True,
        False,
        True,
    ]


def test_teacher_scores_itself_and_a_swapped_checkpoint_matches_a_fresh_engine(
    teacher_dir: Path, noisy_teacher: Path, heldout_cache: Path
) -> None:
    opts = EvalOptions(data=str(heldout_cache))
    teacher, swapped = evaluate_checkpoints([str(teacher_dir), str(noisy_teacher)], opts)
    assert teacher["n"] == 128 and teacher["accuracy"] >= 0.9
    # The cache is the teacher's own distribution (fp16): KL to itself is ~0, top-1 agrees.
    assert teacher["kl_to_teacher"] < 1e-3 and teacher["top1_agreement"] > 0.999
    # Perplexity by hand from the cached logprob of each actual completion token.
    batch = next(iter(DistillDataset(open_sources([str(heldout_cache)]), batch_size=128, pad_id=0)))
    whole = ShardSet.open(str(heldout_cache)).to_batch(strict=True)
    starts = whole.row_offsets[:-1]
    cols = np.arange(whole.num_tokens) - np.repeat(starts, np.diff(whole.row_offsets))
    row = np.repeat(np.arange(whole.num_rows), np.diff(whole.row_offsets))
    trained = (cols >= whole.prompt_len[row] - 1) & ~np.isnan(whole.next_logprob)
    assert trained.sum() == int(batch["loss_mask"].sum())
    nll = -whole.next_logprob[trained].astype(np.float64).mean()
    assert teacher["perplexity"] == pytest.approx(math.exp(nll), rel=2e-3)

    # The perturbed weights answer differently, and the swapped engine gives exactly what a
    # fresh engine on those weights gives.
    assert swapped["accuracy"] < teacher["accuracy"]
    assert swapped["kl_to_teacher"] > 10 * teacher["kl_to_teacher"]
    (fresh,) = evaluate_checkpoints([str(noisy_teacher)], opts)
    assert fresh["accuracy"] == swapped["accuracy"]
    assert fresh["perplexity"] == pytest.approx(swapped["perplexity"], rel=1e-6)


def test_swapping_refuses_another_architecture(teacher_dir: Path, tmp_path: Path) -> None:
    from pipeline.demo.build import BASELINE_SPEC, _make_model, train_tokenizer

    tok = train_tokenizer(BASELINE_SPEC)
    _make_model(BASELINE_SPEC, tok).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="another architecture"):
        check_swappable(str(teacher_dir), str(tmp_path / "small"))
