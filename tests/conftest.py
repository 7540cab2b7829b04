"""Shared fixtures: the embedded teacher, one vLLM engine and one Dask cluster per session.

vLLM takes tens of seconds to start on the CPU, so every test that needs an engine shares
the session's; pipeline tests share one LocalCluster whose worker keeps its engine warm.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_PROMPTS = REPO_ROOT / "configs" / "data" / "arith.jsonl"
TEST_K = 16

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    """The embedded default teacher (built once and cached by `make teacher`)."""
    from pipeline.demo.build import DEFAULT_TEACHER_DIR, build_teacher

    path = REPO_ROOT / DEFAULT_TEACHER_DIR  # a no-op join when it is already absolute
    build_teacher(path)
    return path


@pytest.fixture(scope="session")
def teacher_options(teacher_dir: Path):
    from stages.teacher import TeacherOptions

    return TeacherOptions(model=str(teacher_dir), k=TEST_K, dtype="float32", kv_cache_gib=0.25)


@pytest.fixture(scope="session")
def vllm_teacher(teacher_options):
    from stages.teacher.vllm_engine import VllmTeacher

    engine = VllmTeacher(teacher_options)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def hf_teacher(teacher_options):
    from stages.teacher.hf_engine import HFTeacher

    return HFTeacher(teacher_options.model_copy(update={"engine": "transformers"}), device="cpu")


@pytest.fixture(scope="session")
def dask_client():
    """One LocalCluster (a non-daemonic worker process) for every pipeline test."""
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        )
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path
