"""The student training stage end to end: real caches, the real Trainer, a real kill."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import DistillConfig
from pipeline.distill import run_distill
from stages.train.loader import SourceError
from storage.manifest import PlanMismatchError
from tests.conftest import REPO_ROOT, cli_env, sigkill_when

pytestmark = pytest.mark.slow


def _settings(source: Path, out: Path, **loss) -> dict:
    return {
        "student": {
            "build": {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128}
        },
        "data": {"sources": [str(source)], "batch_size": 32},
        "loss": {"kind": "forward_kl", **loss},
        "train": {
            "output_dir": str(out),
            "steps": 40,
            "warmup_steps": 5,
            "lr": 3e-3,
            "save_steps": 20,
            "logging_steps": 10,
            "threads": 2,
        },
    }


def _run(settings: dict) -> tuple[dict, list[str]]:
    lines: list[str] = []
    return run_distill(DistillConfig.model_validate(settings), log=lines.append), lines


def test_distill_trains_saves_and_is_idempotent(train_cache: Path, tmp_path: Path) -> None:
    settings = _settings(train_cache, tmp_path / "student")
    summary, lines = _run(settings)
    assert summary["steps"] == 40
    steps = [line for line in lines if line.startswith("  step ")]
    losses = [float(line.split(" loss ")[1].split()[0]) for line in steps]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]
    # A checkpoint transformers (and so vLLM) loads, with the teacher's tokenizer beside it.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    assert model.config.num_hidden_layers == 1
    assert len(tokenizer) == model.config.vocab_size

    again, lines = _run(settings)
    assert again == summary and any("nothing to do" in line for line in lines)

    changed = {**settings, "loss": {"kind": "reverse_kl"}}
    with pytest.raises(PlanMismatchError, match=r"loss.kind: 'forward_kl' -> 'reverse_kl'"):
        _run(changed)
    summary, _ = _run({**changed, "overwrite": True})
    assert summary["loss"]["kind"] == "reverse_kl"


def test_bad_configs_fail_before_training(train_cache: Path, tmp_path: Path) -> None:
    settings = _settings(train_cache, tmp_path / "s")
    with pytest.raises(ValueError, match="nonsense"):
        DistillConfig.model_validate({**settings, "loss": {"nonsense": 1}})
    with pytest.raises(ValueError, match="exactly one"):
        DistillConfig.model_validate({**settings, "student": {}})
    foreign = {**settings, "student": {**settings["student"], "tokenizer": str(tmp_path / "tok")}}
    from pipeline.demo.build import BuildSpec, train_tokenizer

    other = train_tokenizer(BuildSpec(vocab_size=300))
    other.save_pretrained(tmp_path / "tok")
    with pytest.raises(SourceError, match="another tokenizer"):
        _run(foreign)
    assert not (tmp_path / "s").exists()  # refused before anything was written


def _cli(config: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "distill", "--config", str(config)]


def test_sigkill_mid_training_then_rerun_resumes_to_the_same_model(
    train_cache: Path, tmp_path: Path
) -> None:
    reference, _ = _run(
        {
            **_settings(train_cache, tmp_path / "ref"),
            "train": {
                **_settings(train_cache, tmp_path / "ref")["train"],
                "steps": 60,
                "save_steps": 10,
            },
        }
    )
    settings = _settings(train_cache, tmp_path / "killed")
    settings["train"].update(steps=60, save_steps=10)
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump(settings))
    marker = tmp_path / "killed" / "checkpoint-20" / "trainer_state.json"
    sigkill_when(_cli(config), marker.exists, timeout_s=300)
    assert not (tmp_path / "killed" / "train_summary.json").exists()
    assert not (tmp_path / "killed" / "checkpoint-60").exists()

    rerun = subprocess.run(
        _cli(config), cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout and "checkpoint-" in rerun.stdout
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "killed").state_dict()
    uninterrupted = AutoModelForCausalLM.from_pretrained(tmp_path / "ref").state_dict()
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert reference["steps"] == 60
