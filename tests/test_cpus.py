"""`cluster.engine_cpus`: which cores each engine binds to, and that vLLM really binds there."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
from pydantic import ValidationError

from pipeline.config import ClusterOptions
from pipeline.cpus import engine_cpus, parse_cpu_list, physical_cores


def _fake_sys(root: Path, topology: dict[int, tuple[int, int]]) -> Path:
    """A /sys/devices/system/cpu tree: cpu -> (package, core)."""
    for cpu, (package, core) in topology.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return root


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", [0]), ("0-3", [0, 1, 2, 3]), ("5,2-4", [5, 2, 3, 4]), (" 1 , 3 ", [1, 3])],
)
def test_parse_cpu_list(text: str, cpus: list[int]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["", "a", "3-1", "1-", "0,0", "0-2,1", "-1"])
def test_parse_cpu_list_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_list(text)


def test_config_validates_engine_cpus() -> None:
    assert ClusterOptions().engine_cpus == "auto"
    assert ClusterOptions(engine_cpus="0-3|4-7").engine_cpus == "0-3|4-7"
    with pytest.raises(ValidationError, match="bad CPU"):
        ClusterOptions(engine_cpus="0-3|x")


def test_physical_cores_drops_hyperthread_siblings(tmp_path: Path) -> None:
    # 2 packages x 2 cores x 2 threads, Linux numbering: siblings are n and n+4.
    topo = {cpu: (cpu // 2 % 2, cpu % 2) for cpu in range(8)}
    sys_cpu = _fake_sys(tmp_path, topo)
    assert physical_cores(range(8), sys_cpu) == [0, 1, 2, 3]
    assert physical_cores([1, 5, 6], sys_cpu) == [1, 6]
    # No topology readable (a container hiding /sys): every allowed CPU counts.
    assert physical_cores([3, 1], tmp_path / "missing") == [1, 3]


def test_auto_gives_one_worker_every_core_and_several_disjoint_shares(tmp_path: Path) -> None:
    sys_cpu = _fake_sys(tmp_path, {cpu: (0, cpu) for cpu in range(6)})
    allowed = list(range(6))
    assert engine_cpus("auto", 0, 1, allowed, sys_cpu) == allowed
    assert engine_cpus("auto", None, None, allowed, sys_cpu) == allowed  # external worker
    shares = [engine_cpus("auto", i, 4, allowed, sys_cpu) for i in range(4)]
    assert shares == [[0, 1], [2, 3], [4], [5]]
    # More workers than cores: each gets one, shared round robin.
    assert [engine_cpus("auto", i, 8, [0, 1], sys_cpu) for i in range(3)] == [[0], [1], [0]]


def test_explicit_lists_and_vllm_default() -> None:
    allowed = list(range(8))
    assert engine_cpus("vllm", 0, 2, allowed) is None
    assert engine_cpus("2-3", 1, 2, allowed) == [2, 3]
    assert engine_cpus("0-3|4-7", 1, 2, allowed) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="not a LocalCluster worker"):
        engine_cpus("0-3|4-7", None, None, allowed)
    with pytest.raises(ValueError, match="worker 2"):
        engine_cpus("0-3|4-7", 2, 3, allowed)
    with pytest.raises(ValueError, match=r"cores \[9\]"):
        engine_cpus("8-9", 0, 1, [0, 8])


def _pinned_cores(root: psutil.Process) -> set[int]:
    """Cores that threads of ``root``'s descendants are pinned to one by one (OpenMP's)."""
    pinned: set[int] = set()
    for proc in root.children(recursive=True):
        try:
            threads = proc.threads()
        except psutil.Error:
            continue
        for thread in threads:
            try:
                affinity = os.sched_getaffinity(thread.id)
            except OSError:
                continue
            if len(affinity) == 1:
                pinned |= affinity
    return pinned


def test_worker_engine_computes_on_every_core(train_cache: Path, dask_client) -> None:
    """After a cache run on the session cluster (one worker), its vLLM engine's OpenMP threads
    are pinned to every physical core the worker may use; vLLM alone would leave one idle."""
    from pipeline.cpus import allowed_cpus

    [(pid, held)] = dask_client.run(
        lambda dask_worker: (os.getpid(), dask_worker.plugins["logitforge-teacher"].cpus)
    ).values()
    expected = physical_cores(allowed_cpus())
    assert held == expected
    assert _pinned_cores(psutil.Process(pid)) == set(expected)
