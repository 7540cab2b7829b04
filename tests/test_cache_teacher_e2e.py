"""cache-teacher end to end: real vLLM in Dask worker processes, real shard sets on disk.

The uninterrupted run is the reference for everything else: a run killed with SIGKILL and
rerun, and a run that finds corrupted shards, must both end with the same rows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml

from pipeline.config import CacheTeacherConfig
from pipeline.execute import run_cache_teacher
from storage.reader import LogitBatch, ShardCorruptedError, ShardSet
from tests.conftest import (
    BUNDLED_PROMPTS,
    REPO_ROOT,
    TEST_K,
    cli_env,
    read_jsonl,
    sigkill_when,
    write_jsonl,
)

pytestmark = pytest.mark.slow

NUM_GOOD = 400
BAD_ROWS = [
    {"id": "bad-empty", "prompt": "1+2=", "completion": "  "},
    {"id": "bad-type", "prompt": ["1+2="], "completion": "3"},
    {"id": "bad-missing", "question": "1+2="},
    {"id": "bad-long", "text": "12+34=46 " * 40},
]
# The fp16 codec keeps ~11 significant bits; two engines differ by float32 kernel order.
FP16_ATOL, FP16_RTOL = 3e-3, 2e-3


def _settings(input_path: Path, out: Path, teacher_dir: Path, rows_per_shard: int) -> dict:
    return {
        "input": {"path": str(input_path)},
        "prompts": {"on_invalid": "skip", "on_too_long": "skip"},
        "teacher": {
            "model": str(teacher_dir),
            "k": TEST_K,
            "dtype": "float32",
            "kv_cache_gib": 0.25,
        },
        "output": {"path": str(out), "rows_per_shard": rows_per_shard, "codec": "fp16"},
        "cluster": {"n_workers": 1},
    }


@pytest.fixture(scope="module")
def input_path(tmp_path_factory) -> Path:
    rows = read_jsonl(BUNDLED_PROMPTS)[:NUM_GOOD]
    rows[10:10] = BAD_ROWS  # bad rows in the middle of a shard, not at the edges
    return write_jsonl(tmp_path_factory.mktemp("input") / "rows.jsonl", rows)


@pytest.fixture(scope="module")
def reference_run(input_path, teacher_dir, dask_client, tmp_path_factory):
    """The uninterrupted run every other test compares against."""
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    settings = _settings(input_path, out, teacher_dir, rows_per_shard=64)
    summary = run_cache_teacher(CacheTeacherConfig.model_validate(settings), client=dask_client)
    return out, summary, settings


def _assert_same_rows(a: LogitBatch, b: LogitBatch) -> None:
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.row_offsets, b.row_offsets)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.prompt_len, b.prompt_len)
    differ = a.topk_ids != b.topk_ids
    # Ids may swap only where the two logprobs tie within the codec's precision.
    assert np.all(np.abs(a.topk_logprobs - b.topk_logprobs)[differ] <= FP16_ATOL * 4)
    assert differ.mean() < 0.01
    np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=FP16_ATOL, rtol=FP16_RTOL)
    np.testing.assert_allclose(a.next_logprob, b.next_logprob, atol=FP16_ATOL, rtol=FP16_RTOL)


def test_every_row_present_once_or_reported_skipped(reference_run, input_path, tmp_path):
    out, summary, _ = reference_run
    # A private cache: `datasets` keys a local folder's cache by its name and card, not its
    # absolute path or contents, so another folder named "uninterrupted" could be served.
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    input_ids = [r["id"] for r in read_jsonl(input_path)]
    assert len(ds) == NUM_GOOD == summary.rows
    assert len(set(ds["id"])) == len(ds)
    assert ds["id"] == [i for i in input_ids if not i.startswith("bad-")]
    assert summary.skipped == {"empty_text": 1, "wrong_type": 1, "missing_field": 1, "too_long": 1}
    assert summary.input_rows == NUM_GOOD + len(BAD_ROWS)
    assert summary.shards == summary.shards_run == 7
    row = ds[0]
    assert len(row["topk_ids"]) == len(row["input_ids"]) == len(row["next_logprob"])
    assert len(row["topk_ids"][0]) == TEST_K


def test_cached_logits_match_the_reference_engine(reference_run, hf_teacher):
    out, _, _ = reference_run
    batch = ShardSet.open(str(out)).to_batch(strict=True)
    sequences = np.split(batch.input_ids, batch.row_offsets[1:-1])
    expected = hf_teacher.score([s.tolist() for s in sequences])
    differ = batch.topk_ids != expected.topk_ids
    assert differ.mean() < 0.01
    np.testing.assert_allclose(batch.topk_logprobs, expected.topk_logprobs, atol=5e-3, rtol=2e-3)
    np.testing.assert_allclose(batch.next_logprob, expected.next_logprob, atol=5e-3, rtol=2e-3)
    # The card describes the set for the Hub.
    card = (out / "README.md").read_text()
    assert "data/train-*.parquet" in card and "logitforge" in card


def test_rerun_of_a_finished_run_does_nothing(reference_run, dask_client):
    out, first, settings = reference_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    summary = run_cache_teacher(CacheTeacherConfig.model_validate(settings), client=dask_client)
    assert summary.shards_run == 0 and summary.rows == first.rows
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == before


def test_damaged_shards_are_redone_bit_flips_by_verify_and_caught_by_the_reader(
    reference_run, dask_client, tmp_path
):
    """A rerun checks records and sizes only (no shard is read back): a truncated shard and a
    missing record are redone. A flipped bit, same size, is caught by the reader, and redone
    by a rerun with ``verify`` (sha256 as Dask tasks)."""
    out, _, settings = reference_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard0 = copy / "data" / "train-00000-of-00007.parquet"
    data = bytearray(shard0.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit in the middle: same size, wrong bytes
    shard0.write_bytes(bytes(data))
    shard3 = copy / "data" / "train-00003-of-00007.parquet"
    shard3.write_bytes(shard3.read_bytes()[:1000])
    (copy / ".logitforge" / "done" / "train-00005.json").unlink()  # died before its record

    cfg = CacheTeacherConfig.model_validate(
        {**settings, "output": {**settings["output"], "path": str(copy)}}
    )
    summary = run_cache_teacher(cfg, client=dask_client, log=lambda _: None)
    assert summary.shards_run == 2
    assert "truncated" in summary.redone["train-00003-of-00007.parquet"]
    assert "train-00005-of-00007.parquet" not in summary.redone  # simply not done yet
    assert "train-00000-of-00007.parquet" not in summary.redone  # not read back by default
    with pytest.raises(ShardCorruptedError, match="sha256 mismatch"):
        ShardSet.open(str(copy)).to_batch(strict=True)

    logs: list[str] = []
    summary = run_cache_teacher(cfg, client=dask_client, log=logs.append, verify=True)
    assert summary.shards_run == 1
    assert summary.redone == {
        "train-00000-of-00007.parquet": "sha256 mismatch: shard corrupted or truncated"
    }
    assert any(
        "verified 7 done shard(s) by sha256" in line and "1 damaged" in line for line in logs
    )
    _assert_same_rows(
        ShardSet.open(str(copy)).to_batch(strict=True), ShardSet.open(str(out)).to_batch()
    )


def _cli(config: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "cache-teacher", "--config", str(config)]


def test_sigkill_mid_run_then_rerun_equals_uninterrupted(reference_run, tmp_path):
    out_ref, _, settings = reference_run
    out = tmp_path / "killed"
    # Small shards: many completion points, so the kill lands between first and last.
    settings = _settings(
        Path(settings["input"]["path"]), out, Path(settings["teacher"]["model"]), rows_per_shard=16
    )
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(settings))
    done_dir = out / ".logitforge" / "done"
    sigkill_when(
        _cli(config),
        lambda: done_dir.exists() and any(done_dir.glob("*.json")),
        timeout_s=600,
    )
    finished_before = len(list(done_dir.glob("*.json")))
    assert 0 < finished_before < 25  # 400 rows / 16 = 25 shards: killed mid-run

    rerun = subprocess.run(
        _cli(config), cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=900
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout
    # A default run shows logitforge's progress and summary, not its dependencies' notices
    # (vLLM's CPU warnings, deprecations, torch's NUMA note, the weight-loading bar).
    markers = (" WARNING ", "FutureWarning", "DeprecationWarning", "NUMA binding", "Loading safe")
    noise = [
        line
        for line in (rerun.stdout + rerun.stderr).splitlines()
        if any(m in line for m in markers)
    ]
    assert not noise, noise[:5]
    assert f"{25 - finished_before} run now" in rerun.stdout or finished_before == 25
    # No temporary files survive; every planned shard is complete and verified.
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        f"train-{i:05d}-of-00025.parquet" for i in range(25)
    ]
    _assert_same_rows(
        ShardSet.open(str(out)).to_batch(strict=True), ShardSet.open(str(out_ref)).to_batch()
    )


def test_verbose_keeps_every_dependency_log(monkeypatch) -> None:
    from pipeline import cli

    for key in (*cli._QUIET_ENV, cli.VERBOSE_ENV):
        monkeypatch.delenv(key, raising=False)
    cli.quiet_engines(verbose=True)
    assert os.environ[cli.VERBOSE_ENV] == "1"
    assert not any(key in os.environ for key in cli._QUIET_ENV)
    monkeypatch.delenv(cli.VERBOSE_ENV)
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # what the user set wins
    cli.quiet_engines()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR" and cli.VERBOSE_ENV not in os.environ
