"""generate-teacher end to end: the teacher's own completions, scored, stored, resumed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipeline.config import CacheTeacherConfig
from pipeline.demo.task import DEFAULT_TASK, generate, is_correct
from pipeline.execute import run_cache_teacher
from stages.teacher.engine import GenerationOptions
from storage.reader import ShardSet
from tests.conftest import cache_settings, write_jsonl

pytestmark = pytest.mark.slow


def _config(rows: Path, out: Path, teacher_dir: Path, **generation) -> CacheTeacherConfig:
    settings = cache_settings(rows, out, teacher_dir)
    settings["output"]["rows_per_shard"] = 16
    settings["generation"] = {"max_tokens": 12, **generation}
    return CacheTeacherConfig.model_validate(settings)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> tuple[Path, list[dict]]:
    rows = generate(DEFAULT_TASK, 64, "heldout", seed=5)
    path = tmp_path_factory.mktemp("gen") / "rows.jsonl"
    return write_jsonl(path, rows), rows


def test_greedy_generations_match_the_reference_and_are_scored(
    prompts, teacher_dir, dask_client, hf_teacher, tmp_path
) -> None:
    path, rows = prompts
    summary = run_cache_teacher(
        _config(path, tmp_path / "out", teacher_dir), client=dask_client, log=lambda _: None
    )
    assert summary.kind == "teacher_generated" and summary.rows == 64
    assert summary.counts["stop"] == 64
    table = ShardSet.open(str(tmp_path / "out")).read_table(strict=True)
    batch = ShardSet.open(str(tmp_path / "out")).to_batch(strict=True)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    assert table.column("id").to_pylist() == [r["id"] for r in rows]  # the reference is ignored

    prompt_ids = [tok(r["prompt"])["input_ids"] for r in rows]
    ref = hf_teacher.generate(prompt_ids, GenerationOptions(max_tokens=12))
    correct = 0
    for i, r in enumerate(rows):
        row = batch.row(i)
        p = row["prompt_len"]
        assert row["input_ids"][:p].tolist() == prompt_ids[i]
        assert row["input_ids"][p:].tolist() == ref.sample(i).tolist()  # same greedy tokens
        assert row["input_ids"][-1] == tok.eos_token_id
        text = table.column("text")[i].as_py()
        completion = tok.decode(row["input_ids"][p:], skip_special_tokens=True)
        assert text == r["prompt"] + completion  # exact bytes of the generated ids
        end = table.column("byte_end")[i].as_py()
        assert end[-2] == len(text.encode()) and end[-1] == end[-2]  # EOS: empty span at the end
        correct += is_correct(r["prompt"], completion)
    assert correct >= 0.9 * len(rows)  # the teacher is good: its answers are mostly right

    # Teacher-forced scores of the generated rows equal the reference engine's.
    scored = hf_teacher.score([batch.row(i)["input_ids"].tolist() for i in range(len(rows))])
    finite = ~np.isnan(scored.next_logprob)
    np.testing.assert_allclose(
        batch.next_logprob[finite], scored.next_logprob[finite], atol=3e-3, rtol=2e-3
    )
    np.testing.assert_array_equal(batch.topk_ids[:, 0], scored.topk_ids[:, 0])


def test_sampled_generation_resumes_to_the_same_rows(
    prompts, teacher_dir, dask_client, tmp_path
) -> None:
    path, _ = prompts
    gen = {"n": 2, "temperature": 1.0, "seed": 3}
    ref_out, out = tmp_path / "ref", tmp_path / "resumed"
    run_cache_teacher(_config(path, ref_out, teacher_dir, **gen), client=dask_client, log=print)
    shutil.copytree(ref_out, out)
    # A crash: one shard lost its record, another was cut short, a third never written.
    (out / ".logitforge" / "done" / "train-00001.json").unlink()
    shard = next((out / "data").glob("train-00002-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:1000])
    next((out / "data").glob("train-00003-*.parquet")).unlink()
    (out / ".logitforge" / "done" / "train-00003.json").unlink()

    summary = run_cache_teacher(
        _config(path, out, teacher_dir, **gen), client=dask_client, log=lambda _: None
    )
    assert summary.shards_run == 3 and summary.rows == 128
    a = ShardSet.open(str(out)).to_batch(strict=True)
    b = ShardSet.open(str(ref_out)).to_batch(strict=True)
    assert a.ids == b.ids and a.ids[:2] == [f"{a.ids[0][:-2]}#0", f"{a.ids[0][:-2]}#1"]
    np.testing.assert_array_equal(a.row_offsets, b.row_offsets)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)  # the same samples, redrawn
    np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=3e-3)
    # Sampling at T=1 really sampled: the two samples of a prompt are not all identical.
    assert (
        a.num_tokens != 2 * (b.num_tokens // 2)
        or not np.array_equal(a.row(0)["input_ids"], a.row(1)["input_ids"])
        or any(
            not np.array_equal(a.row(2 * i)["input_ids"], a.row(2 * i + 1)["input_ids"])
            for i in range(64)
        )
    )


def test_generate_teacher_cli_requires_a_generation_section(tmp_path, capsys) -> None:
    from pipeline.cli import main

    assert main(["generate-teacher", "--config", "configs/cache-teacher.yaml"]) == 2
    assert "no `generation:` section" in capsys.readouterr().err
