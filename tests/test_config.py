"""Config loading, overrides, and what defines the plan fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.config import (
    CacheTeacherConfig,
    DistillConfig,
    RolloutConfig,
    apply_overrides,
    fingerprint,
    load_config,
)
from pipeline.demo.stdlib_data import DATA_FILES, DEFAULT_DATA_DIR
from pipeline.onpolicy import OnPolicyConfig
from pipeline.prune import PruneConfig
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))
# Which job each shipped config is for; a new config must be added here to be validated.
KINDS = {
    "cache-teacher.yaml": CacheTeacherConfig,
    "generate-teacher.yaml": CacheTeacherConfig,
    "distill.yaml": DistillConfig,
    "rollout.yaml": RolloutConfig,
    "onpolicy.yaml": OnPolicyConfig,
    "smollm2/cache-text.yaml": CacheTeacherConfig,
    "smollm2/cache-chat.yaml": CacheTeacherConfig,
    "smollm2/generate-chat-greedy.yaml": CacheTeacherConfig,
    "smollm2/generate-chat-sampled.yaml": CacheTeacherConfig,
    "smollm2/prune.yaml": PruneConfig,
    "smollm2/heal.yaml": DistillConfig,
}


def _name(path: Path) -> str:
    return path.relative_to(CONFIGS).as_posix()


@pytest.mark.parametrize("path", SHIPPED, ids=[_name(p) for p in SHIPPED])
def test_every_shipped_config_validates(path: Path):
    cfg = load_config(path, model=KINDS[_name(path)])
    if isinstance(cfg, (CacheTeacherConfig, RolloutConfig, OnPolicyConfig)):
        source = Path(cfg.input.path)
        # The real teacher's rows are built by `make smollm2` (stdlib_data.write_data).
        built = source.parent == DEFAULT_DATA_DIR and source.name in DATA_FILES
        assert (REPO_ROOT / source).exists() or built or "://" in cfg.input.path


def test_shipped_configs_exist():
    assert any(p.name == "cache-teacher.yaml" for p in SHIPPED)


def test_overrides_are_parsed_as_yaml_and_nested():
    cfg = load_config(
        REPO_ROOT / "configs" / "cache-teacher.yaml",
        ["teacher.k=8", "output.codec_params={min_logprob: -10}", "cluster.scheduler=tcp://h:1"],
    )
    assert cfg.teacher.k == 8
    assert cfg.output.codec_params == {"min_logprob": -10}
    assert cfg.cluster.scheduler == "tcp://h:1"


def test_unknown_keys_are_rejected():
    with pytest.raises(ValidationError, match="tk"):
        load_config(REPO_ROOT / "configs" / "cache-teacher.yaml", ["teacher.tk=8"])


def test_override_needs_equals_sign():
    with pytest.raises(ValueError, match=r"section\.key=value"):
        apply_overrides({}, ["teacher.k"])


def test_fingerprint_ignores_runtime_knobs_but_not_outputs():
    base = load_config(REPO_ROOT / "configs" / "cache-teacher.yaml")

    def fp(*overrides: str) -> str:
        cfg = load_config(REPO_ROOT / "configs" / "cache-teacher.yaml", list(overrides))
        return fingerprint(cfg.output_defining())

    same = fingerprint(base.output_defining())
    assert fp("cluster.n_workers=4", "teacher.kv_cache_gib=2", "output.path=/elsewhere") == same
    assert fp("output.overwrite=true", "teacher.tensor_parallel_size=2") == same
    assert fp("teacher.k=32") != same
    assert fp("output.codec=q8") != same
    assert fp("output.rows_per_shard=7") != same
    assert fp("prompts.on_too_long=skip") != same
