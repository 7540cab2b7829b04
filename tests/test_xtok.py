"""Cross-tokenizer distillation through the real loader, trainer and evaluation.

Oracle: a student with the teacher's own tokenizer goes through the aligned-span path as
well; there every span is one token on each side, so its batches must equal the plain
loader's and the GOLD hybrid must equal generalized JSD on the same positions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pipeline.config import DistillConfig
from pipeline.demo.build import _tokenizer_corpus
from pipeline.demo.task import DEFAULT_TASK
from pipeline.demo.tokenizers import byte_level_bpe
from pipeline.distill import run_distill
from stages.align.aligner import Aligner
from stages.train.loader import DistillDataset, SourceError, open_sources
from stages.train.losses import generalized_jsd
from stages.train.xtok_losses import xtok_loss
from storage.reader import LogitBatch
from tests.conftest import cache_settings, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_tokenizer(teacher_dir: Path):
    return AutoTokenizer.from_pretrained(teacher_dir)


@pytest.fixture(scope="module")
def merged_digits(tmp_path_factory, teacher_tokenizer) -> Path:
    """A ByteLevel BPE that merges digit pairs: teacher:student spans are n:1."""
    path = tmp_path_factory.mktemp("student-tokenizer")
    tok = byte_level_bpe(
        _tokenizer_corpus(DEFAULT_TASK, 0), 300, chat_template=teacher_tokenizer.chat_template
    )
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def truncated_cache(tmp_path_factory, teacher_dir: Path, dask_client) -> Path:
    """The first 32 rows of `train_cache` cached again with ``prompts.max_length`` 16: each
    keeps its BOS, its 12 prompt tokens ("73659+75591=") and 3 of its 6 answer digits."""
    from pipeline.config import CacheTeacherConfig
    from pipeline.demo.task import generate
    from pipeline.execute import run_cache_teacher

    root = tmp_path_factory.mktemp("truncated-cache")
    rows = write_jsonl(root / "rows.jsonl", generate(DEFAULT_TASK, 512, "train", seed=1)[:32])
    settings = cache_settings(rows, root / "cache", teacher_dir, max_length=16)
    run_cache_teacher(
        CacheTeacherConfig.model_validate(settings), client=dask_client, log=lambda _: None
    )
    return root / "cache"


def _read_all(cache: Path) -> LogitBatch:
    (source,) = open_sources([str(cache)])
    return LogitBatch.concat([source.read(i) for i in range(source.num_shards)])


def _first_batch(source: Path, tokenizer, aligner: Aligner | None) -> dict[str, torch.Tensor]:
    dataset = DistillDataset(
        open_sources([str(source)]),
        batch_size=64,
        pad_id=tokenizer.pad_token_id,
        seed=3,
        aligner=aligner,
    )
    return next(iter(dataset))


def test_same_tokenizer_spans_are_the_plain_batches(train_cache: Path, teacher_tokenizer) -> None:
    aligner = Aligner(teacher_tokenizer, teacher_tokenizer)
    plain = _first_batch(train_cache, teacher_tokenizer, None)
    spans = _first_batch(train_cache, teacher_tokenizer, aligner)
    for key in ("input_ids", "attention_mask", "loss_mask", "target_ids"):
        torch.testing.assert_close(spans[key], plain[key], msg=key)
    mask = plain["loss_mask"]
    # Every trained position starts its own one-token span, with the plain top-k and no chain.
    assert spans["span_start"][mask].all() and not spans["span_start"][~mask].any()
    torch.testing.assert_close(spans["span_topk_ids"][mask], plain["topk_ids"][mask])
    torch.testing.assert_close(spans["span_topk_logprobs"][mask], plain["topk_logprobs"][mask])
    assert (spans["span_chain"][mask] == 0).all()

    # The hybrid with the identity map is generalized JSD with the rest bucket.
    vocab = aligner.vocab
    assert (vocab.teacher_to_student == np.arange(len(teacher_tokenizer))).all()
    logits = torch.randn(int(mask.sum()), len(teacher_tokenizer), dtype=torch.float64)
    start = spans["span_start"][mask]
    for beta in (0.0, 0.5):
        hybrid, _ = xtok_loss(
            logits,
            spans["target_ids"][mask],
            start,
            torch.cumsum(start.long(), 0) - 1,
            int(start.sum()),
            spans["span_topk_ids"][mask],
            spans["span_topk_logprobs"][mask].double(),
            spans["span_chain"][mask].double(),
            kind="hybrid",
            beta=beta,
            vocab_map=torch.from_numpy(vocab.teacher_to_student),
            student_mapped=torch.from_numpy(vocab.student_mapped),
        )
        jsd = generalized_jsd(
            logits,
            plain["topk_ids"][mask],
            plain["topk_logprobs"][mask].double(),
            beta=beta,
            tail="rest",
        )
        torch.testing.assert_close(hybrid, jsd)


def test_merged_digits_align_n_to_1(train_cache: Path, teacher_tokenizer, merged_digits) -> None:
    student = AutoTokenizer.from_pretrained(merged_digits)
    aligner = Aligner(teacher_tokenizer, student)
    (source,) = open_sources([str(train_cache)])
    batch = source.read(0)
    rows, drops = aligner.align(batch)
    assert rows.num_rows == batch.num_rows and sum(drops.values()) == 0
    shapes = rows.span_shapes()
    assert shapes["n:1"] > 0 and shapes["1:1"] > 0 and shapes["1:n"] == shapes["n:m"] == 0
    # Every row's student tokens decode to the row's text (BOS/EOS aside), and the trained
    # spans cover exactly the completion: the teacher's completion tokens (answer + EOS).
    for i in range(4):
        a, b = rows.row_offsets[i], rows.row_offsets[i + 1]
        assert student.decode(rows.input_ids[a:b], skip_special_tokens=True) == batch.text[i]
    trained_teacher_tokens = rows.teacher_tokens[rows.span_trained].sum()
    completion = (np.diff(batch.row_offsets) - batch.prompt_len).sum()
    assert trained_teacher_tokens == completion
    # A span's chain is the teacher's logprob of its later tokens: <= 0, and 0 for 1:1 spans.
    chains = rows.chain[rows.span_trained]
    ones = rows.teacher_tokens[rows.span_trained] == 1
    assert (chains[ones] == 0).all() and (chains[~ones] <= 0).all() and (chains[~ones] < 0).any()


def test_truncated_rows_align_as_a_prefix_of_the_whole_rows(
    train_cache: Path, truncated_cache: Path, teacher_tokenizer, merged_digits, capsys
) -> None:
    """Rows cut by max_length keep their whole text: aligned on the teacher's prefix (all
    were dropped as teacher_round_trip), each is its untruncated alignment's first spans, up
    to the last boundary both tokenizers share (the student merges digits, so the cut after
    the third answer digit often falls inside one of its tokens)."""
    from pipeline.cli import main

    student = AutoTokenizer.from_pretrained(merged_digits)
    aligner = Aligner(teacher_tokenizer, student)
    short = _read_all(truncated_cache)
    assert short.num_rows == 32 and short.truncated.all()
    assert (np.diff(short.row_offsets) == 16).all()
    rows, drops = aligner.align(short)
    assert rows.num_rows == short.num_rows and sum(drops.values()) == 0
    whole = _read_all(train_cache)
    index = {rid: i for i, rid in enumerate(whole.ids)}
    full, _ = aligner.align(whole.take(np.array([index[i] for i in short.ids])))
    assert full.ids == rows.ids == short.ids
    cut_rows = 0
    for r in range(rows.num_rows):
        p0, p1 = rows.span_offsets[r], rows.span_offsets[r + 1]
        f0 = full.span_offsets[r]
        n = p1 - p0
        for name in ("span_trained", "teacher_tokens"):
            np.testing.assert_array_equal(
                getattr(rows, name)[p0:p1], getattr(full, name)[f0 : f0 + n]
            )
        s0, s1 = rows.row_offsets[r], rows.row_offsets[r + 1]
        g0 = full.row_offsets[r]
        np.testing.assert_array_equal(rows.input_ids[s0:s1], full.input_ids[g0 : g0 + s1 - s0])
        kept = int(rows.teacher_tokens[p0:p1].sum())
        assert rows.cut_teacher_tokens[r] == 16 - kept >= 0
        assert int(full.teacher_tokens[f0 : f0 + n + 1].sum()) > 16  # the next span is cut
        cut_rows += rows.cut_teacher_tokens[r] > 0
        # The same teacher forward pass on a shorter sequence: the same top-1 and logprobs
        # up to the engine's batching (fp16 in the cache).
        trained = rows.span_trained[p0:p1]
        assert trained.any()
        a, b = rows.topk_ids[p0:p1][trained], full.topk_ids[f0 : f0 + n][trained]
        assert (a[:, 0] == b[:, 0]).all()
        np.testing.assert_allclose(
            rows.topk_logprobs[p0:p1][trained][:, 0],
            full.topk_logprobs[f0 : f0 + n][trained][:, 0],
            atol=2e-2,
        )
    assert cut_rows > 0
    # The align command reports them.
    argv = ["align", "--cache", str(truncated_cache), "--student-tokenizer", str(merged_digits)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "32 rows aligned, dropped none" in printed
    assert "32 truncated rows aligned on their prefix" in printed


def _settings(source: Path, tokenizer: Path, out: Path, **loss) -> dict:
    return {
        "student": {
            "build": {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128},
            "tokenizer": str(tokenizer),
        },
        "data": {"sources": [str(source)], "batch_size": 32},
        "loss": loss,
        "train": {
            "output_dir": str(out),
            "steps": 30,
            "warmup_steps": 5,
            "lr": 3e-3,
            "save_steps": 30,
            "logging_steps": 10,
            "threads": 2,
        },
    }


@pytest.mark.parametrize("kind", ["uld", "hybrid", "ce"])
def test_distill_across_tokenizers(
    train_cache: Path, merged_digits: Path, tmp_path: Path, kind: str
) -> None:
    lines: list[str] = []
    cfg = DistillConfig.model_validate(
        _settings(train_cache, merged_digits, tmp_path / kind, kind=kind, alpha=0.5)
    )
    summary = run_distill(cfg, log=lines.append)
    assert summary["steps"] == 30
    losses = [float(x.split(" loss ")[1].split()[0]) for x in lines if x.startswith("  step ")]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    report = summary["alignment"]["samples"][str(train_cache)]
    assert report["spans"]["n:1"] > 0 and report["dropped"] == {}
    assert summary["alignment"]["vocab"]["teacher_coverage"] == 1.0
    assert any(line.startswith("cross-tokenizer: ") for line in lines)
    if kind == "hybrid":
        assert any("matched" in line and "unmatched" in line for line in lines)


def test_cross_tokenizer_errors(train_cache: Path, merged_digits: Path, tmp_path: Path) -> None:
    # A per-token loss cannot read another tokenizer's ids: refused with the way out named.
    with pytest.raises(SourceError, match="uld or hybrid"):
        run_distill(
            DistillConfig.model_validate(
                _settings(train_cache, merged_digits, tmp_path / "a", kind="forward_kl")
            ),
            log=lambda _: None,
        )


def test_align_command_reports_before_training(
    train_cache: Path, merged_digits: Path, tmp_path: Path, capsys
) -> None:
    from pipeline.cli import main

    out = tmp_path / "align.json"
    argv = ["align", "--cache", str(train_cache), "--student-tokenizer", str(merged_digits)]
    assert main([*argv, "--shards", "1", "--summary-json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rows aligned, dropped none" in printed and "vocabulary map" in printed
    report = json.loads(out.read_text())["samples"][str(train_cache)]
    (source,) = open_sources([str(train_cache)])
    assert report["rows"] == source.read(0).num_rows
    assert report["spans"]["n:1"] > 0 and report["mapped_mass"] == 1.0
