"""One teacher engine per Dask worker process, reused by every shard task on that worker.

The engine is loaded lazily by the first task (so registering is instant and a replacement
worker loads its own), and closed by the plugin's teardown when the worker shuts down.
"""

from __future__ import annotations

from distributed import Client, WorkerPlugin, get_worker

from pipeline.config import fingerprint
from stages.teacher import TeacherEngine, TeacherOptions, load_engine

PLUGIN_NAME = "logitforge-teacher"


class TeacherEnginePlugin(WorkerPlugin):
    """Holds the worker's teacher engine. Options travel as JSON, never as live objects."""

    name = PLUGIN_NAME

    def __init__(self, options: TeacherOptions) -> None:
        self.options_json = options.model_dump_json()
        self.fingerprint = fingerprint(options.model_dump())
        self._engine: TeacherEngine | None = None

    def engine(self) -> TeacherEngine:
        if self._engine is None:
            self._engine = load_engine(TeacherOptions.model_validate_json(self.options_json))
        return self._engine

    def teardown(self, worker) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def worker_engine() -> TeacherEngine:
    """The calling worker's engine (call from inside a task)."""
    plugin = get_worker().plugins.get(PLUGIN_NAME)
    if plugin is None:
        raise RuntimeError("no teacher engine plugin on this worker; register it first")
    return plugin.engine()


def ensure_engine_plugin(client: Client, options: TeacherOptions) -> None:
    """Register the engine plugin unless every worker already holds one for these options.

    Re-registering would tear down and reload a warm engine (tens of seconds), so a cluster
    reused across runs with the same teacher keeps its engines.
    """
    plugin = TeacherEnginePlugin(options)

    def _current(dask_worker) -> str | None:
        held = dask_worker.plugins.get(PLUGIN_NAME)
        return getattr(held, "fingerprint", None)

    current = client.run(_current)
    if current and all(fp == plugin.fingerprint for fp in current.values()):
        return
    client.register_plugin(plugin, name=PLUGIN_NAME)
