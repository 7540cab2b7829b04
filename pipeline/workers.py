"""Engines held by Dask worker processes, reused by every shard task on that worker.

Each worker holds at most one engine per role: the teacher (scoring, generate-teacher) and
the policy (rollouts of a student checkpoint). An engine is loaded lazily by the first task
that needs it (so registering is instant and a replacement worker loads its own) and closed
by the plugin's teardown when the worker shuts down.

A policy engine follows the checkpoint each task names: on-policy rounds produce a new
checkpoint of the same architecture every round, and swapping its weights into the running
engine takes milliseconds where starting a new vLLM engine takes tens of seconds on a CPU.
"""

from __future__ import annotations

import time
from typing import Literal

from distributed import Client, WorkerPlugin, get_worker

from pipeline.config import ClusterOptions, fingerprint
from pipeline.cpus import AUTO, allowed_cpus, bind_engine_cpus, engine_cpus
from stages.teacher import TeacherEngine, TeacherOptions, load_engine

Role = Literal["teacher", "policy"]
PLUGIN_NAMES: dict[str, str] = {"teacher": "logitforge-teacher", "policy": "logitforge-policy"}


class EnginePlugin(WorkerPlugin):
    """Holds the worker's engine of one role. Options travel as JSON, never as live objects.

    ``engine_cpus`` and ``n_local`` decide the cores the engine binds to (`pipeline.cpus`):
    ``n_local`` is the LocalCluster's worker count, None on an external cluster.
    """

    def __init__(
        self,
        options: TeacherOptions,
        role: Role = "teacher",
        engine_cpus: str = AUTO,
        n_local: int | None = None,
    ) -> None:
        self.name = PLUGIN_NAMES[role]
        self.role = role
        self.options_json = options.model_dump_json()
        self.engine_cpus = engine_cpus
        self.n_local = n_local
        # The policy's checkpoint changes every round without making the engine stale.
        exclude = {"model"} if role == "policy" else None
        self.fingerprint = fingerprint(
            {**options.model_dump(exclude=exclude), "cpus": [engine_cpus, n_local]}
        )
        self.cpus: list[int] | None = None  # the cores the engine was bound to
        self._engine: TeacherEngine | None = None
        self.last_switch: dict[str, float] = {}  # {"load_s" | "swap_s" | "reload_s": s}

    def engine(self, model: str | None = None) -> TeacherEngine:
        """The engine, serving checkpoint ``model`` when given (swapped in or reloaded)."""
        options = TeacherOptions.model_validate_json(self.options_json)
        if model is not None:
            options = options.model_copy(update={"model": model})
        self.last_switch = {}
        t = time.perf_counter()
        if self._engine is None:
            self._engine = self._load(options)
            how = "load"
        elif self._engine.options.model != options.model:
            try:
                self._engine.swap_weights(options.model)  # type: ignore[attr-defined]
                how = "swap"
            except (AttributeError, ValueError):  # no swap, or another architecture
                self._engine.close()
                self._engine = self._load(options)
                how = "reload"
        else:
            return self._engine
        self.last_switch = {f"{how}_s": time.perf_counter() - t}
        return self._engine

    def _load(self, options: TeacherOptions) -> TeacherEngine:
        name = get_worker().name
        # LocalCluster names its workers 0..n-1; an external worker's name says nothing.
        index = name if isinstance(name, int) and self.n_local else None
        self.cpus = engine_cpus(self.engine_cpus, index, self.n_local, allowed_cpus())
        bind_engine_cpus(self.cpus)
        return load_engine(options)

    def teardown(self, worker) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def worker_plugin(role: Role = "teacher") -> EnginePlugin:
    """The calling worker's engine plugin of ``role`` (call from inside a task)."""
    plugin = get_worker().plugins.get(PLUGIN_NAMES[role])
    if plugin is None:
        raise RuntimeError(f"no {role} engine plugin on this worker; register it first")
    return plugin


def worker_engine(role: Role = "teacher", model: str | None = None) -> TeacherEngine:
    """The calling worker's engine of ``role`` (serving ``model`` when given)."""
    return worker_plugin(role).engine(model)


def close_engines(client: Client) -> None:
    """Shut down every worker's engines now, while the workers are alive to do it cleanly.

    Left to the cluster's own shutdown, a worker holding two engines (teacher and policy)
    can be stopped before its second plugin's teardown has run, and that engine's vLLM
    processes outlive the job: measured, an orphaned engine kept 1.6 GB and the job's stdout
    open. Call it before closing a cluster the job started (not one it attached to: there the
    warm engines are meant to serve the next job).
    """

    def _close(dask_worker) -> None:
        for name in PLUGIN_NAMES.values():
            plugin = dask_worker.plugins.get(name)
            if plugin is not None:
                plugin.teardown(dask_worker)

    # A worker that fails here is going away anyway; the cluster's shutdown must still run.
    client.run(_close, on_error="ignore")


def ensure_engine_plugin(
    client: Client,
    options: TeacherOptions,
    role: Role = "teacher",
    cluster: ClusterOptions | None = None,
) -> None:
    """Register the engine plugin unless every worker already holds one for these options.

    Re-registering would tear down and reload a warm engine (tens of seconds), so a cluster
    reused across runs (or on-policy rounds) with the same engine keeps its engines.
    ``cluster`` gives the core binding (`ClusterOptions.engine_cpus`; default auto).
    """
    cluster = cluster or ClusterOptions()
    n_local = None if cluster.scheduler else cluster.n_workers
    plugin = EnginePlugin(options, role, cluster.engine_cpus, n_local)
    name = PLUGIN_NAMES[role]

    def _current(dask_worker) -> str | None:
        held = dask_worker.plugins.get(name)
        return getattr(held, "fingerprint", None)

    current = client.run(_current)
    if current and all(fp == plugin.fingerprint for fp in current.values()):
        return
    client.register_plugin(plugin, name=name)
