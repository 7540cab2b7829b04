"""Shared fixtures: the embedded teacher, one vLLM engine and one Dask cluster per session.

vLLM takes tens of seconds to start on the CPU, so every test that needs an engine shares
the session's; pipeline tests share one LocalCluster whose worker keeps its engine warm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
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
    from pipeline.workers import close_engines

    close_engines(client)  # no vLLM process may outlive the session
    client.close()
    cluster.close()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def cache_settings(input_path: Path, out: Path, teacher_dir: Path, **prompts) -> dict:
    """A cache-teacher config on the session's engine options (the worker's engine is reused)."""
    return {
        "input": {"path": str(input_path)},
        "prompts": {"append_eos": True, **prompts},
        "teacher": {
            "model": str(teacher_dir),
            "k": TEST_K,
            "dtype": "float32",
            "kv_cache_gib": 0.25,
        },
        "output": {"path": str(out), "rows_per_shard": 64, "codec": "fp16"},
        "cluster": {"n_workers": 1},
    }


def _task_cache(tmp_path_factory, teacher_dir: Path, dask_client, split: str, n: int) -> Path:
    from pipeline.config import CacheTeacherConfig
    from pipeline.demo.task import DEFAULT_TASK, generate
    from pipeline.execute import run_cache_teacher

    root = tmp_path_factory.mktemp(f"{split}-cache")
    rows = write_jsonl(root / "rows.jsonl", generate(DEFAULT_TASK, n, split, seed=1))
    settings = cache_settings(rows, root / "cache", teacher_dir)
    run_cache_teacher(
        CacheTeacherConfig.model_validate(settings), client=dask_client, log=lambda _: None
    )
    return root / "cache"


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory, teacher_dir, dask_client) -> Path:
    """A real cache (vLLM, k=16, fp16) of 512 training rows `<s>a+b=answer</s>`."""
    return _task_cache(tmp_path_factory, teacher_dir, dask_client, "train", 512)


@pytest.fixture(scope="session")
def heldout_cache(tmp_path_factory, teacher_dir, dask_client) -> Path:
    """The same for 128 held-out rows: what evaluation scores against."""
    return _task_cache(tmp_path_factory, teacher_dir, dask_client, "heldout", 128)


def plan_config(teacher_dir: Path, input_path: Path, out: Path, rows_per_shard: int, *extra: str):
    """A cache-teacher config for planning tests: the embedded teacher at k=8, ``extra``
    overrides last."""
    from pipeline.config import load_config

    return load_config(
        None,
        [
            f"input.path={input_path}",
            f"teacher.model={teacher_dir}",
            "teacher.k=8",
            f"output.path={out}",
            f"output.rows_per_shard={rows_per_shard}",
            *extra,
        ],
    )


def cli_env() -> dict[str, str]:
    """The environment a CLI subprocess of the tests runs in (this checkout importable)."""
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def sigkill_when(command: list[str], ready: Callable[[], bool], timeout_s: float = 400) -> None:
    """Run ``command`` in a session of its own and SIGKILL the whole group (the driver, its
    Dask workers and their vLLM processes) as soon as ``ready()``; fail if it ends first."""
    proc = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=cli_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
