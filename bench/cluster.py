"""An external Dask cluster on this machine, and what its shape costs a cache-teacher job.

`ExternalCluster` is the README's "Running on a GPU cluster" recipe as processes, for CPUs:
one `dask scheduler`, and one `dask worker ADDR --nworkers 1 --nthreads 1` per engine, with
non-daemonic worker processes (vLLM starts its engine as child processes). Each `dask worker`
runs in a process session of its own, so one signal to its group reaches the nanny, the
worker and the worker's vLLM engine processes together: that is how the tests lose a worker
for good (a nanny left alive would restart it), and how teardown leaves nothing behind.

Run as a script, it measures the same cache-teacher job (the embedded teacher, the shipped
config, 32,768 rows of its task: ~650k tokens, so the steady state outweighs the engines'
start) on two shapes of one machine's cores:

- one worker with every core (its engine's OpenMP threads on all of them)
- one worker per core, each pinned with `taskset -c N` (its engine on that core)

Both rely on `cluster.engine_cpus: auto` to bind each engine to its worker's affinity (vLLM's
log of the binding is parsed into `bound_cores`, so a result shows what it measured). It reports
wall time (a user's number: engine start included) and steady-state tokens/s (see
`steady_state`), each configuration repeated, interleaved, with the load average and the
machine's busy share before each run: the machine is shared, so the spread between repeats
says how much to trust a difference. JSON goes to bench/results/cluster-<timestamp>.json.

    python -m bench.cluster [--rows 32768] [--repeats 2] [--configs one-worker,per-core]
                            [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
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

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
WORK_DIR = REPO_ROOT / "artifacts" / "bench" / "cluster"  # --work-dir elsewhere
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
            [
                DASK,
                "scheduler",
                "--port",
                "0",
                "--dashboard-address",
                ":0",
                "--scheduler-file",
                str(scheduler_file),
            ],
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
            with contextlib.suppress(psutil.NoSuchProcess):
                names.append(p.name())
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
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        _, alive = psutil.wait_procs(list(self._seen.values()), timeout=5)
        for p in alive:  # a child that left the group: ours all the same
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"--- {name} log ---\n{text[-chars:]}"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------- the measurement


def cluster_shapes(cpus: list[int]) -> dict[str, list[WorkerSpec]]:
    """The configurations compared: every core in one worker, or one pinned worker per core.

    Nothing sets the engine's binding here: `cluster.engine_cpus: auto` (the default) binds
    each engine to its worker's affinity, which `taskset` sets.
    """
    every = ",".join(str(c) for c in cpus)
    return {
        "one-worker": [WorkerSpec("all", cpus=every)],
        "per-core": [WorkerSpec(f"core{c}", cpus=str(c)) for c in cpus],
    }


def _rows_file(rows: int, work_dir: Path) -> Path:
    """``rows`` distinct items of the embedded teacher's task (the bundled set has 2,048)."""
    from pipeline.demo.task import DEFAULT_TASK, generate

    path = work_dir / f"rows-{rows}.jsonl"
    if not path.exists():
        work_dir.mkdir(parents=True, exist_ok=True)
        lines = (json.dumps(r) + "\n" for r in generate(DEFAULT_TASK, rows, "train", seed=7))
        path.write_text("".join(lines))
    return path


def _busy_share(seconds: float = 2.0) -> float:
    """Share of the machine's CPU time in use just before a run (others' work included)."""
    return psutil.cpu_percent(interval=seconds) / 100


_CORE_IDS = re.compile(r"local_rank=0, core ids=\[([^\]]*)\]")


def _bound_cores(log: str) -> list[int] | None:
    """The cores vLLM's log says its engine's OpenMP threads were bound to."""
    found = _CORE_IDS.findall(log)
    return [int(c) for c in found[-1].split(",") if c.strip()] if found else None


def steady_state(records: list[dict]) -> dict:
    """Throughput once engines are warm, from the shards' completion records.

    A shard ran from ``finished_at - total_s`` to ``finished_at`` on ``worker``. Each worker's
    first shard is left out (it pays the first-call warm-up). ``tokens_per_s`` is the
    aggregate: tokens computed while every worker was warm and busy (from the last worker's
    first shard end to the first worker's last shard end; shards straddling the ends count
    pro rata) over that interval. ``warm_task_tokens_per_s`` is each worker's tokens over its
    summed task time, after its first shard.
    """
    by_worker: dict[str, list[tuple[float, float, int]]] = {}
    for r in records:
        end = datetime.fromisoformat(r["finished_at"]).timestamp()
        start = end - r["timings"]["total_s"]
        by_worker.setdefault(str(r["worker"]), []).append((start, end, int(r["tokens"])))
    for spans in by_worker.values():
        spans.sort(key=lambda s: s[1])
    lo = max(spans[0][1] for spans in by_worker.values())
    hi = min(spans[-1][1] for spans in by_worker.values())
    tokens = 0.0
    for spans in by_worker.values():
        for start, end, n in spans[1:]:
            overlap = min(end, hi) - max(start, lo)
            if overlap > 0:
                tokens += n * overlap / max(end - start, 1e-9)
    warm = {
        worker: sum(n for _, _, n in spans[1:]) / max(sum(e - s for s, e, _ in spans[1:]), 1e-9)
        for worker, spans in by_worker.items()
    }
    return {
        "tokens_per_s": tokens / (hi - lo) if hi > lo else None,
        "window_s": max(hi - lo, 0.0),
        "warm_task_tokens_per_s": warm,
        "shards_per_worker": {w: len(s) for w, s in by_worker.items()},
    }


def measure(
    shape: str, specs: list[WorkerSpec], rows_path: Path, rows_per_shard: int, work_dir: Path
) -> dict:
    """One cache-teacher job on a fresh external cluster (engines start cold, as for a user)."""
    run_dir = work_dir / f"{shape}-{datetime.now().strftime('%H%M%S')}"
    shutil.rmtree(run_dir, ignore_errors=True)
    out = run_dir / "out"
    summary_path = run_dir / "summary.json"
    load_before = os.getloadavg()
    busy_before = _busy_share()
    with ExternalCluster(run_dir / "cluster", specs) as cluster:
        command = [sys.executable, "-m", "pipeline.cli", "cache-teacher"]
        command += ["--config", str(REPO_ROOT / "configs" / "cache-teacher.yaml")]
        command += ["--set", f"input.path={rows_path}", "--output", str(out)]
        command += ["--set", f"output.rows_per_shard={rows_per_shard}"]
        command += ["--scheduler", cluster.address, "--summary-json", str(summary_path)]
        started = time.perf_counter()
        done = subprocess.run(
            command, cwd=REPO_ROOT, env=cluster.env, capture_output=True, text=True
        )
        wall_s = time.perf_counter() - started
        if done.returncode != 0:
            tails = "\n".join(cluster.log_tail(s.name) for s in specs)
            raise RuntimeError(f"cache-teacher failed:\n{done.stdout[-2000:]}{done.stderr}{tails}")
        logs = {s.name: cluster.log_tail(s.name, chars=10**9) for s in specs}
    summary = json.loads(summary_path.read_text())
    records = [json.loads(p.read_text()) for p in (out / ".logitforge" / "done").glob("*.json")]
    return {
        "shape": shape,
        "workers": [asdict(s) for s in specs],
        "bound_cores": {name: _bound_cores(log) for name, log in logs.items()},
        "loadavg_before": load_before,
        "busy_share_before": busy_before,
        "loadavg_after": os.getloadavg(),
        "wall_s": wall_s,
        "tokens": summary["tokens"],
        "rows": summary["rows"],
        "shards": summary["shards"],
        "task_tokens_per_s": summary["task_tokens_per_s"],
        "steady": steady_state(records),
    }


def _cpu_model() -> str:
    """The CPU's model name (results differ across machines: compare ratios within one run)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def render(runs: list[dict]) -> str:
    lines = [
        f"{'shape':<11} {'load1':>5} {'busy':>5} {'wall s':>7} {'steady tok/s':>12} "
        f"{'warm task tok/s per worker':<30} cores",
    ]
    for r in runs:
        warm = ", ".join(f"{v:,.0f}" for v in r["steady"]["warm_task_tokens_per_s"].values())
        steady = r["steady"]["tokens_per_s"]
        cores = " ".join(str(c) for c in r["bound_cores"].values())
        lines.append(
            f"{r['shape']:<11} {r['loadavg_before'][0]:>5.2f} {r['busy_share_before']:>5.0%} "
            f"{r['wall_s']:>7.1f} {steady or 0:>12,.0f} {warm:<30} {cores}"
        )
    return "\n".join(lines)


def compare(runs: list[dict], shapes: list[str]) -> dict:
    """Medians per shape and the ratio of the second shape to the first."""
    out: dict = {}
    for shape in shapes:
        mine = [r for r in runs if r["shape"] == shape]
        out[shape] = {
            "wall_s": _median([r["wall_s"] for r in mine]),
            "steady_tokens_per_s": _median([r["steady"]["tokens_per_s"] or 0 for r in mine]),
            "repeats": len(mine),
        }
    if len(shapes) == 2:
        a, b = (out[s] for s in shapes)
        out[f"{shapes[1]}/{shapes[0]}"] = {
            "steady_tokens_per_s": b["steady_tokens_per_s"] / max(a["steady_tokens_per_s"], 1e-9),
            "wall_s": b["wall_s"] / a["wall_s"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--rows-per-shard", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", default="one-worker,per-core")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="input and shard sets")
    args = parser.parse_args(argv)

    from pipeline.cpus import allowed_cpus, physical_cores

    cpus = physical_cores(allowed_cpus())
    shapes = cluster_shapes(cpus)
    chosen = args.configs.split(",")
    rows_path = _rows_file(args.rows, args.work_dir)
    runs: list[dict] = []
    # Interleaved (a b a b): drift in the machine's load hits both shapes alike.
    for repeat in range(args.repeats):
        for shape in chosen:
            run = measure(shape, shapes[shape], rows_path, args.rows_per_shard, args.work_dir)
            run["repeat"] = repeat
            runs.append(run)
            print(render([run]).splitlines()[-1], flush=True)
    result = {
        "bench": "cluster",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": cpus, "platform": platform.platform(), "cpu": _cpu_model()},
        "args": {**vars(args), "work_dir": str(args.work_dir)},
        "runs": runs,
        "compare": compare(runs, chosen),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / f"cluster-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(render(runs))
    print(json.dumps(result["compare"], indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
