"""Which CPU cores an engine on a Dask worker may use (`cluster.engine_cpus`).

Left to itself, vLLM's CPU backend reserves one core per engine for its scheduler process and
binds its OpenMP threads to the rest: on a 2-core machine the engine computes on one core and
the other idles (measured on the 45M bench model: 1,307 tokens/s against 2,436 when bound to
both). The scheduler's share of a core is small next to that: binding the threads to every core
is nearly twice as fast even though the scheduler then shares one with them.

So each engine is bound to its worker's share of the cores the worker process may use (its
affinity, which `taskset` or a container limits):

- ``auto``: one local worker gets every core; ``n`` LocalCluster workers get disjoint, contiguous
  shares (worker ``i`` of ``n``); a worker of an external cluster gets its whole affinity (start
  one worker per machine, or pin workers with `taskset`). One logical CPU per physical core:
  OpenMP GEMM threads on two hyperthreads of a core only contend.
- ``vllm``: vLLM's own default (one reserved core per engine) and the worker's environment as
  it is, e.g. when the machine also runs other work. Under a Dask nanny that environment holds
  ``MKL_NUM_THREADS=1``, which keeps the engine to one core (see `bind_engine_cpus`).
- an explicit list, ``0-3,8`` for every worker, or ``0-3|4-7`` for LocalCluster worker 0, 1, ...

A worker holding both a teacher and a policy engine binds both to the same share: they take
turns (a rollout shard, then a scoring shard), never compute at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

AUTO = "auto"
VLLM_DEFAULT = "vllm"
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
SYS_CPU = Path("/sys/devices/system/cpu")
# What a Dask nanny sets to 1 in its worker (distributed.nanny.pre-spawn-environ).
THREAD_LIMIT_ENVS = ("MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,8"`` -> ``[0, 1, 2, 3, 8]`` (Linux cpulist syntax, as vLLM and taskset read it)."""
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad CPU list {text!r}: expected e.g. '0-3,8'")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"bad CPU range {part!r} in {text!r}")
        cpus.extend(range(first, last + 1))
    if len(set(cpus)) != len(cpus):
        raise ValueError(f"CPU list {text!r} names a core twice")
    return cpus


def check_spec(spec: str) -> str:
    """Validate a `cluster.engine_cpus` value (for the config model): the value, or ValueError."""
    if spec not in (AUTO, VLLM_DEFAULT):
        for group in spec.split("|"):
            parse_cpu_list(group)
    return spec


def physical_cores(cpus: Sequence[int], sys_cpu: Path = SYS_CPU) -> list[int]:
    """The first logical CPU of each physical core among ``cpus`` (all of them if unknown)."""
    seen: set[tuple[str, str]] = set()
    out: list[int] = []
    for cpu in sorted(cpus):
        topo = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            key = ((topo / "physical_package_id").read_text(), (topo / "core_id").read_text())
        except OSError:
            return sorted(cpus)
        if key not in seen:
            seen.add(key)
            out.append(cpu)
    return out


def engine_cpus(
    spec: str,
    worker_index: int | None,
    n_local: int | None,
    allowed: Sequence[int],
    sys_cpu: Path = SYS_CPU,
) -> list[int] | None:
    """The cores the engine of one worker binds to; None leaves vLLM's default.

    ``worker_index`` and ``n_local`` place a LocalCluster worker among its siblings (None for a
    worker of an external cluster); ``allowed`` is the worker process's CPU affinity.
    """
    if spec == VLLM_DEFAULT:
        return None
    allowed_set = set(allowed)
    if spec == AUTO:
        cores = physical_cores(allowed, sys_cpu)
        if worker_index is None or not n_local or n_local <= 1:
            return cores
        if n_local > len(cores):  # more workers than cores: they share, one core each
            return [cores[worker_index % len(cores)]]
        return [int(c) for c in np.array_split(np.asarray(cores), n_local)[worker_index]]
    groups = spec.split("|")
    if len(groups) == 1:
        chosen = parse_cpu_list(groups[0])
    elif worker_index is None or worker_index >= len(groups):
        which = "not a LocalCluster worker" if worker_index is None else f"worker {worker_index}"
        raise ValueError(
            f"cluster.engine_cpus={spec!r} has {len(groups)} groups (one per LocalCluster "
            f"worker) but this worker is {which}"
        )
    else:
        chosen = parse_cpu_list(groups[worker_index])
    outside = sorted(set(chosen) - allowed_set)
    if outside:
        raise ValueError(
            f"cluster.engine_cpus={spec!r} names cores {outside} that this worker may not use "
            f"(its affinity is {sorted(allowed_set)})"
        )
    return chosen


def bind_engine_cpus(cpus: list[int] | None) -> None:
    """Make the next engine started in this process compute on ``cpus``.

    vLLM reads the binding when it starts its engine processes, which inherit this process's
    environment. A Dask nanny starts its worker with ``MKL_NUM_THREADS=1`` (and OpenMP/BLAS
    limits of 1) against oversubscription; torch in vLLM's CPU worker caps its intra-op threads
    by it, so without resetting it the engine computes on one core whatever the binding says
    (measured: one pinned OpenMP thread instead of one per bound core). The transformers engine
    runs in this process, so its intra-op thread count follows the share too.
    """
    if cpus is None:
        return
    os.environ[BIND_ENV] = ",".join(str(c) for c in cpus)
    for var in THREAD_LIMIT_ENVS:
        os.environ[var] = str(len(cpus))
    import torch

    torch.set_num_threads(len(cpus))


def allowed_cpus() -> list[int]:
    """This process's CPU affinity (all online CPUs where affinity is not supported)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))
