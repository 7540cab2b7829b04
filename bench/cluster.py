"""An external Dask cluster on this machine, and what its shape costs a cache-teacher job.

`ExternalCluster` is the README's "Running on a GPU cluster" recipe as processes, for CPUs:
one `dask scheduler`, and one `dask worker ADDR --nworkers 1 --nthreads 1` per engine, with
non-daemonic worker processes (vLLM starts its engine as child processes). Each `dask worker`
runs in a process session of its own, so one signal to its group reaches the nanny, the
worker and the worker's vLLM engine processes together: that is how the tests lose a worker
for good (a nanny left alive would restart it), and how teardown leaves nothing behind.

Run as a script, it measures the same cache-teacher job (the embedded teacher, the shipped
config, a few thousand rows per engine) on two shapes of one machine's cores:

- one worker with every core (its engine's OpenMP threads on all of them)
- one worker per core, each pinned with `taskset -c N` (its engine on that core)

and reports wall time (a user's number: engine start included) and steady-state tokens/s
(every worker's tokens after its first shard, over the time from its first shard's end to its
last), each configuration repeated, with the load average before each run: the machine is
shared, so the spread between repeats says how much to trust a difference.

    python -m bench.cluster [--rows 16384] [--repeats 2] [--configs one-worker,per-core]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

import psutil
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
WORK_DIR = REPO_ROOT / "artifacts" / "bench" / "cluster"
DASK = str(Path(sys.executable).with_name("dask"))


@dataclass
class WorkerSpec:
    """One `dask worker` process (one engine): its name, CPUs and extra environment."""

    name: str
    cpus: str | None = None  # a `taskset -c` list such as "0" or "0-1"; None = no pinning
    env: dict[str, str] = field(default_factory=dict)


class ExternalCluster:
    """`dask scheduler` plus `dask worker` processes, each in its own session; see module doc.

    Use as a context manager: on exit (failure included) every worker group and the scheduler
    are stopped, gracefully first (the nanny closes the worker, whose plugin closes its
    engine), then with SIGKILL, and any process of theirs still alive is killed by pid.
    """

    def __init__(
        self,
        workdir: Path,
        workers: list[WorkerSpec],
        env: dict[str, str] | None = None,
        start_timeout_s: float = 120,
    ) -> None:
        self.workdir = Path(workdir)
        self.specs = {spec.name: spec for spec in workers}
        self.env = {
            **os.environ,
            # The workers import the task functions: from this checkout, like the driver.
            "PYTHONPATH": str(REPO_ROOT),
            # vLLM starts child processes, which daemonic worker processes may not have.
            "DASK_DISTRIBUTED__WORKER__DAEMON": "False",
            **(env or {}),
        }
        self.start_timeout_s = start_timeout_s
        self.address = ""
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self._seen: dict[int, psutil.Process] = {}  # every process of ours, for teardown

    def __enter__(self) -> ExternalCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (the child owns it)
        try:
            return subprocess.Popen(
                command,
                cwd=REPO_ROOT,  # relative paths in a config resolve as they do for the driver
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def start(self) -> None:
        """Start the scheduler on a free port and every worker; wait until all registered."""
        from distributed import Client

        self.workdir.mkdir(parents=True, exist_ok=True)
        scheduler_file = self.workdir / "scheduler.json"
        scheduler_file.unlink(missing_ok=True)
        # Free ports: this machine is shared, 8786/8787 may be someone else's.
        self.scheduler = self._spawn(
            "scheduler",
            [DASK, "scheduler", "--port", "0", "--dashboard-address", ":0"]
            + ["--scheduler-file", str(scheduler_file)],
            self.env,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while not scheduler_file.exists():
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start:\n{self.log_tail('scheduler')}")
            time.sleep(0.1)
        while not self.address:
            try:
                self.address = json.loads(scheduler_file.read_text())["address"]
            except (ValueError, KeyError):  # written but not yet complete
                time.sleep(0.1)
        for spec in self.specs.values():
            command = [DASK, "worker", self.address, "--nworkers", "1", "--nthreads", "1"]
            command += ["--name", spec.name]
            if spec.cpus is not None:
                command = ["taskset", "-c", spec.cpus, *command]
            self.workers[spec.name] = self._spawn(spec.name, command, {**self.env, **spec.env})
        with Client(self.address, timeout="30s") as client:
            try:
                client.wait_for_workers(len(self.specs), timeout=self.start_timeout_s)
            except TimeoutError as exc:
                tails = "\n".join(self.log_tail(name) for name in self.specs)
                raise RuntimeError(f"dask workers did not register:\n{tails}") from exc
        self._remember()

    def _remember(self) -> None:
        for proc in [self.scheduler, *self.workers.values()]:
            if proc is None or proc.poll() is not None:
                continue
            try:
                root = psutil.Process(proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    self._seen.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                pass

    def processes(self, name: str) -> list[psutil.Process]:
        """Worker ``name``'s process tree now: nanny, worker, vLLM engine processes."""
        try:
            root = psutil.Process(self.workers[name].pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in tree:
            self._seen.setdefault(p.pid, p)
        return tree

    def kill_worker(self, name: str, timeout_s: float = 30) -> tuple[list[str], list[int]]:
        """SIGKILL worker ``name``'s whole group at once, as a crash or the OOM killer would.

        Returns the names of the processes it had and the pids still alive after
        ``timeout_s`` (orphans: an engine that escaped the group would be one).
        """
        tree = self.processes(name)
        names = []
        for p in tree:
            try:
                names.append(p.name())
            except psutil.NoSuchProcess:
                pass
        proc = self.workers[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
        _, alive = psutil.wait_procs(tree, timeout=timeout_s)
        return names, [p.pid for p in alive if _running(p)]

    def close(self, grace_s: float = 20) -> None:
        """Stop every worker group, then the scheduler; SIGKILL whatever is left, by pid."""
        self._remember()
        groups = [p for p in self.workers.values() if p.poll() is None]
        if self.scheduler is not None and self.scheduler.poll() is None:
            groups.append(self.scheduler)
        for proc in groups:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in groups:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        _, alive = psutil.wait_procs(list(self._seen.values()), timeout=5)
        for p in alive:  # a child that left the group: ours all the same
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"--- {name} log ---\n{text[-chars:]}"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def worker_progress(dask_worker) -> tuple[str, int, int]:
    """(name, tasks executed, tasks executing) of one worker; run with `Client.run`."""
    state = dask_worker.state
    return str(dask_worker.name), state.executed_count, state.executing_count
