"""A real external cluster: `dask scheduler` and two `dask worker` processes (the README's
recipe, on CPU), `logitforge cache-teacher --scheduler` against them, and one worker lost
with SIGKILL (nanny, worker and vLLM engine together) while shards are running.

The job must finish on the remaining worker with every row exactly once and the same rows as
an uninterrupted run, and the lost worker must leave no engine process behind. One killed run
(a module fixture) serves every assertion: it costs two engine starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from bench.cluster import ExternalCluster, WorkerSpec
from pipeline.config import CacheTeacherConfig
from pipeline.execute import run_cache_teacher
from storage.layout import ShardSetLayout
from storage.reader import ShardSet
from tests.conftest import BUNDLED_PROMPTS, REPO_ROOT, cache_settings, cli_env
from tests.test_cache_teacher_e2e import _assert_same_rows

pytestmark = pytest.mark.slow

ROWS_PER_SHARD = 256  # 2,048 bundled rows: 8 shards of ~0.4 s each once an engine is warm
NUM_SHARDS = 8
POLL_S = 0.02
SHARD_KEY = "teacher-"  # the key prefix of shard tasks (planning runs on the cluster too)


def _settings(out: Path, teacher_dir: Path) -> dict:
    settings = cache_settings(BUNDLED_PROMPTS, out, teacher_dir)
    settings["output"]["rows_per_shard"] = ROWS_PER_SHARD
    return settings


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, dask_client) -> Path:
    """The uninterrupted run, on the session's LocalCluster."""
    out = tmp_path_factory.mktemp("external") / "uninterrupted"
    cfg = CacheTeacherConfig.model_validate(_settings(out, teacher_dir))
    summary = run_cache_teacher(cfg, client=dask_client, log=lambda _: None)
    assert summary.shards == NUM_SHARDS
    return out


@dataclass
class KilledRun:
    """What the monitor saw of a cache-teacher run that lost a worker."""

    out: Path
    returncode: int
    stdout: str
    victim: str
    survivor: str
    done_at_kill: int
    killed: list[str]  # process names in the victim's group at the kill
    orphans: list[int]  # pids of the victim's group still alive after it
    workers_after: list[str]
    rewritten: list[str] = field(default_factory=list)  # completion records written twice
    logs: str = ""


def _done_mtimes(done_dir: Path, seen: dict[str, set[int]]) -> None:
    for path in done_dir.glob("*.json") if done_dir.exists() else ():
        with contextlib.suppress(FileNotFoundError):  # replaced between glob and stat
            seen.setdefault(path.name, set()).add(path.stat().st_mtime_ns)


def _shards_executing(dask_worker) -> tuple[str, list[str]]:
    """(name, keys of the shard tasks it is executing now); run with `Client.run`."""
    keys = [str(ts.key) for ts in dask_worker.state.executing]
    return str(dask_worker.name), [k for k in keys if k.startswith(SHARD_KEY)]


def _shard_results_held(dask_scheduler) -> list[str]:
    """Names of the workers holding a finished shard's result the driver has not released."""
    return sorted(
        {
            str(ws.name)
            for key, ts in dask_scheduler.tasks.items()
            if str(key).startswith(SHARD_KEY) and ts.state == "memory"
            for ws in ts.who_has
        }
    )


def _done_by_worker(done_dir: Path) -> dict[str, int]:
    """Completion records per writing worker (a record names its host and Dask worker)."""
    counts: dict[str, int] = {}
    for path in done_dir.glob("*.json") if done_dir.exists() else ():
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            name = json.loads(path.read_text())["worker"].rsplit("/", 1)[-1]
            counts[name] = counts.get(name, 0) + 1
    return counts


def _pick_victim(
    executing: dict[str, list[str]], started: dict[str, float], held: list[str], done: dict
) -> str | None:
    """A worker to lose now: its engine is warm (it wrote a shard), the driver has released
    every result it finished (else the scheduler would rightly recompute that one), and the
    shard it is inside started within the last few polls, so the kill lands mid-shard."""
    now = time.monotonic()
    for name, keys in sorted(executing.items()):
        fresh = any(now - started[k] < 6 * POLL_S for k in keys)
        if done.get(name, 0) >= 1 and fresh and name not in held:
            return name
    return None


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, teacher_dir) -> KilledRun:
    from distributed import Client

    root = tmp_path_factory.mktemp("external-killed")
    out = root / "out"
    config = root / "job.yaml"
    config.write_text(yaml.safe_dump(_settings(out, teacher_dir)))
    done_dir = out / ".logitforge" / "done"
    specs = [WorkerSpec("w0"), WorkerSpec("w1")]
    with ExternalCluster(root / "cluster", specs) as cluster, Client(cluster.address) as client:
        command = [sys.executable, "-m", "pipeline.cli", "cache-teacher", "--config"]
        command += [str(config), "--scheduler", cluster.address]
        with (root / "driver.log").open("wb") as driver_log:
            driver = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=cli_env(),
                stdout=driver_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            seen: dict[str, set[int]] = {}
            started: dict[str, float] = {}  # shard key -> when a poll first saw it executing
            victim = None
            deadline = time.monotonic() + 300
            while victim is None and driver.poll() is None and time.monotonic() < deadline:
                executing = dict(client.run(_shards_executing).values())
                for key in (k for keys in executing.values() for k in keys):
                    started.setdefault(key, time.monotonic())
                held = client.run_on_scheduler(_shard_results_held)
                victim = _pick_victim(executing, started, held, _done_by_worker(done_dir))
                _done_mtimes(done_dir, seen)
                if victim is None:
                    time.sleep(POLL_S)
            assert victim is not None, "the run ended (or stalled) before a worker could be lost"
            done_at_kill = len(list(done_dir.glob("*.json")))
            killed, orphans = cluster.kill_worker(victim)
            while driver.poll() is None and time.monotonic() < deadline:
                _done_mtimes(done_dir, seen)
                time.sleep(POLL_S)
            returncode = driver.wait(timeout=max(deadline - time.monotonic(), 1))
            # A result lost with the worker may still be recomputed after the driver left.
            idle_by = time.monotonic() + 60
            while time.monotonic() < idle_by and any(
                keys for _, keys in client.run(_shards_executing).values()
            ):
                time.sleep(POLL_S)
            _done_mtimes(done_dir, seen)
            workers_after = sorted(
                str(w["name"]) for w in client.scheduler_info()["workers"].values()
            )
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait(timeout=30)
        logs = "\n".join(cluster.log_tail(s.name) for s in specs)
    stdout = (root / "driver.log").read_text(errors="replace")
    return KilledRun(
        out=out,
        returncode=returncode,
        stdout=stdout,
        victim=victim,
        survivor=next(s.name for s in specs if s.name != victim),
        done_at_kill=done_at_kill,
        killed=killed,
        orphans=orphans,
        workers_after=workers_after,
        rewritten=sorted(name for name, times in seen.items() if len(times) > 1),
        logs=logs,
    )


def test_the_job_finishes_on_the_remaining_worker(killed_run: KilledRun) -> None:
    run = killed_run
    assert run.returncode == 0, run.stdout[-3000:] + run.logs
    assert 0 < run.done_at_kill < NUM_SHARDS - 2, "the kill did not land mid-run"
    # Gone for good: its nanny died with it, so nothing came back under its name.
    assert run.workers_after == [run.survivor]
    assert f"{NUM_SHARDS} run now" in run.stdout


def test_the_lost_worker_leaves_no_engine_processes(killed_run: KilledRun) -> None:
    assert any(name.startswith("VLLM") for name in killed_run.killed), killed_run.killed
    assert killed_run.orphans == []


def test_every_row_once_and_equal_to_an_uninterrupted_run(
    killed_run: KilledRun, reference: Path
) -> None:
    out = killed_run.out
    layout = ShardSetLayout.from_url(str(out))
    got, want = ShardSet.open(str(out)), ShardSet.open(str(reference))
    assert got.plan.fingerprint == want.plan.fingerprint
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        f"train-{i:05d}-of-{NUM_SHARDS:05d}.parquet" for i in range(NUM_SHARDS)
    ]
    all_ids: list[str] = []
    for shard in got.plan.shards:
        planned = pq.read_table(layout.prompts_path(shard.index)).column("id").to_pylist()
        batch = got.read_shard(shard.index)
        assert batch.ids == planned, shard.name
        _assert_same_rows(batch, want.read_shard(shard.index))
        all_ids += batch.ids
    bundled = [json.loads(line)["id"] for line in BUNDLED_PROMPTS.read_text().splitlines()]
    assert len(all_ids) == len(set(all_ids)) == got.plan.num_rows == len(bundled)
    assert set(all_ids) == set(bundled)


def test_shards_the_lost_worker_finished_are_not_redone(killed_run: KilledRun) -> None:
    assert killed_run.rewritten == []
