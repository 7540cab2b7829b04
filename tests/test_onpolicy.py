"""Rollouts, scored rollouts and the on-policy round loop, end to end on real engines.

The policy in these tests is the embedded teacher's checkpoint itself (any causal LM checkpoint
serves as a policy): its samples are well-formed text, and with policy == teacher the
policy's logprob of every sampled token must equal the teacher's score of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from pipeline.config import CacheTeacherConfig, RolloutConfig
from pipeline.demo.task import DEFAULT_TASK, generate
from pipeline.execute import run_cache_teacher
from pipeline.onpolicy import OnPolicyConfig, run_onpolicy
from stages.train.loader import DistillDataset, SourceError, open_sources
from storage.reader import ShardSet
from tests.conftest import REPO_ROOT, TEST_K, cli_env, sigkill_when, write_jsonl

pytestmark = pytest.mark.slow

QUIET = lambda _: None  # noqa: E731


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    rows = generate(DEFAULT_TASK, 48, "heldout", seed=7)
    return write_jsonl(tmp_path_factory.mktemp("onpolicy") / "prompts.jsonl", rows)


def _engine(teacher_dir: Path, k: int = TEST_K) -> dict:
    return {"model": str(teacher_dir), "k": k, "dtype": "float32", "kv_cache_gib": 0.25}


def _rollout_config(prompts: Path, out: Path, teacher_dir: Path, rows_per_shard: int = 16):
    return RolloutConfig.model_validate(
        {
            "input": {"path": str(prompts), "completion_field": None},
            "policy": _engine(teacher_dir, k=1),
            "generation": {"n": 2, "temperature": 1.0, "max_tokens": 12, "seed": 5},
            "output": {"path": str(out), "rows_per_shard": rows_per_shard},
        }
    )


def _table(path: Path):
    table = ShardSet.open(str(path)).read_table(strict=True)
    return table.take(np.argsort(table.column("id").to_pylist(), kind="stable"))


@pytest.fixture(scope="module")
def rollouts(prompts, teacher_dir, dask_client, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rollouts") / "set"
    run_cache_teacher(_rollout_config(prompts, out, teacher_dir), client=dask_client, log=QUIET)
    return out


def test_rollouts_are_deterministic_resumable_and_well_formed(
    rollouts, prompts, teacher_dir, dask_client, tmp_path
) -> None:
    again = run_cache_teacher(
        _rollout_config(prompts, rollouts, teacher_dir), client=dask_client, log=QUIET
    )
    assert again.shards_run == 0 and again.rows == 96 and again.kind == "rollout"

    # Another sharding draws the same samples: each row's seed comes from its id.
    other = tmp_path / "other"
    run_cache_teacher(
        _rollout_config(prompts, other, teacher_dir, rows_per_shard=40),
        client=dask_client,
        log=QUIET,
    )
    a, b = _table(rollouts), _table(other)
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    assert a.column("input_ids").to_pylist() == b.column("input_ids").to_pylist()
    pa_, pb = (np.concatenate(t.column("policy_logprob").to_pylist()) for t in (a, b))
    np.testing.assert_allclose(pa_, pb, atol=1e-5)

    meta = ShardSet.open(str(rollouts)).metadata
    assert (meta.kind, meta.k, meta.teacher_model) == ("rollout", 0, str(teacher_dir))
    assert set(a.column("policy_version").to_pylist()) == {teacher_dir.name}
    assert "rollouts" in (rollouts / "README.md").read_text()
    for ids, p, lps in zip(
        a.column("input_ids").to_pylist(),
        a.column("prompt_len").to_pylist(),
        a.column("policy_logprob").to_pylist(),
        strict=True,
    ):
        lps = np.asarray(lps, dtype=np.float64)
        assert len(lps) == len(ids) and len(ids) > p
        # Defined exactly at the positions that predict a sampled token.
        expected = (np.arange(len(ids)) >= p - 1) & (np.arange(len(ids)) < len(ids) - 1)
        np.testing.assert_array_equal(np.isfinite(lps), expected)
        assert np.all(lps[expected] <= 0)

    # Two samples of a prompt differ somewhere: T = 1 really sampled.
    ids = a.column("input_ids").to_pylist()
    assert any(ids[2 * i] != ids[2 * i + 1] for i in range(48))
    with pytest.raises(SourceError, match="rollout set"):
        open_sources([str(rollouts)])


def test_scored_rollouts_keep_the_policy_columns_and_match_the_reference(
    rollouts, teacher_dir, dask_client, hf_teacher, tmp_path
) -> None:
    cfg = CacheTeacherConfig.model_validate(
        {
            "input": {"path": str(rollouts)},
            "teacher": _engine(teacher_dir),
            "output": {"path": str(tmp_path / "scored"), "rows_per_shard": 32, "codec": "fp32"},
        }
    )
    summary = run_cache_teacher(cfg, client=dask_client, log=QUIET)
    assert summary.kind == "onpolicy" and summary.rows == 96
    scored, rolled = _table(tmp_path / "scored"), _table(rollouts)
    for column in ("id", "input_ids", "prompt_len", "text", "policy_version"):
        assert scored.column(column).to_pylist() == rolled.column(column).to_pylist(), column
    assert ShardSet.open(str(tmp_path / "scored")).metadata.kind == "onpolicy"

    batch = ShardSet.open(str(tmp_path / "scored")).to_batch(strict=True)
    reference = hf_teacher.score(
        [batch.row(i)["input_ids"].tolist() for i in range(batch.num_rows)]
    )
    finite = ~np.isnan(reference.next_logprob)
    np.testing.assert_allclose(
        batch.next_logprob[finite], reference.next_logprob[finite], atol=1e-3, rtol=0
    )
    np.testing.assert_array_equal(batch.topk_ids[:, 0], reference.topk_ids[:, 0])
    # The policy is the teacher: its logprob of each sampled token is the teacher's score of it.
    sampled = np.isfinite(batch.policy_logprob)
    assert sampled.sum() > 96
    np.testing.assert_allclose(
        batch.policy_logprob[sampled], reference.next_logprob[sampled], atol=1e-3, rtol=0
    )

    # The loader hands both to the loss, aligned with the targets of the trained positions.
    (source,) = open_sources([str(tmp_path / "scored")])
    data = DistillDataset([source], batch_size=96, pad_id=0, shuffle=False)
    first = next(iter(data))
    mask = first["loss_mask"]
    assert torch.isfinite(first["policy_logprob"][mask]).all()
    assert torch.isfinite(first["next_logprob"][mask]).all()
    assert not torch.isfinite(first["policy_logprob"][~mask]).any()


def _onpolicy_settings(prompts: Path, teacher_dir: Path, out: Path, **loss) -> dict:
    return {
        "input": {"path": str(prompts)},
        "teacher": _engine(teacher_dir),
        "student": {"model": str(teacher_dir)},
        "policy": {"kv_cache_gib": 0.25},
        "generation": {"temperature": 1.0, "max_tokens": 10, "seed": 1},
        "onpolicy": {"rounds": 2, "prompts_per_round": 24, "batch_size": 8},
        "loss": loss or {"kind": "sampled_rkl"},
        "train": {
            "output_dir": str(out),
            "steps": 3,
            "lr": 1e-4,
            "warmup_steps": 0,
            "min_lr_ratio": 1.0,
            "save_steps": 1,
            "logging_steps": 1,
            "threads": 2,
        },
        "rows_per_shard": 4,
    }


def test_round_loop_runs_end_to_end_and_reruns_as_a_no_op(
    prompts, teacher_dir, dask_client, train_cache, tmp_path
) -> None:
    out = tmp_path / "run"
    cfg = OnPolicyConfig.model_validate(_onpolicy_settings(prompts, teacher_dir, out))
    summary = run_onpolicy(cfg, client=dask_client, log=QUIET)
    rounds = summary["rounds"]
    assert [r["policy_version"] for r in rounds] == ["init", "r0000"]
    assert rounds[1]["policy"] == str(out / "rounds" / "r0000" / "student")
    assert "swap_s" in rounds[1]["policy_switch_s"]  # the warm engine took the new weights
    for r, record in enumerate(rounds):
        rd = out / "rounds" / f"r{r:04d}"
        versions = set(_table(rd / "rollouts").column("policy_version").to_pylist())
        assert versions == {record["policy_version"]}
        assert record["samples"] == 24 and record["train_steps"] == 3
        assert record["teacher_tokens"] == sum(
            json.loads(p.read_text())["tokens"]
            for p in (rd / "scored" / ".logitforge" / "done").glob("*.json")
        )
    assert summary["teacher_tokens"] == sum(r["teacher_tokens"] for r in rounds)
    trained = AutoModelForCausalLM.from_pretrained(summary["final_student"]).state_dict()
    start = AutoModelForCausalLM.from_pretrained(teacher_dir).state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)

    logs: list[str] = []
    again = run_onpolicy(cfg, log=logs.append)  # no client: nothing to run, none started
    assert again["rounds"] == rounds
    assert sum("already done" in line for line in logs) == 2
    assert not any("LocalCluster" in line for line in logs)

    # GKD: half the batches from a cached off-policy set, JSD on the top-k.
    settings = _onpolicy_settings(prompts, teacher_dir, tmp_path / "gkd", kind="jsd", beta=0.5)
    settings["onpolicy"].update(rounds=1, onpolicy_fraction=0.5, offpolicy=[str(train_cache)])
    gkd = run_onpolicy(OnPolicyConfig.model_validate(settings), client=dask_client, log=QUIET)
    run = json.loads(
        (tmp_path / "gkd" / "rounds" / "r0000" / "student" / "distill_config.json").read_text()
    )
    assert run["config"]["data"]["mix"] == {"sources": [str(train_cache)], "fraction": 0.5}
    assert gkd["rounds"][0]["train_steps"] == 3


def _round_tables(root: Path) -> list:
    return [
        _table(root / "rounds" / f"r{r:04d}" / kind)
        for r in range(2)
        for kind in ("rollouts", "scored")
    ]


def test_sigkill_mid_round_then_rerun_gives_the_same_round_data(
    prompts, teacher_dir, dask_client, tmp_path
) -> None:
    reference = tmp_path / "ref"
    cfg = OnPolicyConfig.model_validate(_onpolicy_settings(prompts, teacher_dir, reference))
    run_onpolicy(cfg, client=dask_client, log=QUIET)

    killed = tmp_path / "killed"
    config = tmp_path / "onpolicy.yaml"
    config.write_text(yaml.safe_dump(_onpolicy_settings(prompts, teacher_dir, killed)))
    command = [sys.executable, "-m", "pipeline.cli", "onpolicy", "--config", str(config)]
    # Round 1 has begun: its first rollout shard is done, the rest of the round is not.
    marker = killed / "rounds" / "r0001" / "rollouts" / ".logitforge" / "done" / "train-00000.json"
    sigkill_when(command, marker.exists)
    assert not (killed / "rounds" / "r0001" / "round.json").exists()

    rerun = subprocess.run(
        command, cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[round 0] already done" in rerun.stdout
    for got, want in zip(_round_tables(killed), _round_tables(reference), strict=True):
        assert got.column("id").to_pylist() == want.column("id").to_pylist()
        assert got.column("input_ids").to_pylist() == want.column("input_ids").to_pylist()
        for column in ("policy_logprob", "next_logprob"):
            if column in got.column_names:
                np.testing.assert_allclose(
                    np.concatenate(got.column(column).to_pylist()).astype(float),
                    np.concatenate(want.column(column).to_pylist()).astype(float),
                    atol=1e-5,
                )
