"""Planning throughput and driver memory: Dask planning against the in-driver planner.

Synthetic JSONL of N short rows (prompt + completion, every fourth a chat), planned with the
embedded teacher's tokenizer. Each measurement runs in a subprocess of its own, so the driver's
peak RSS (``ru_maxrss`` of that process alone; Dask workers are other processes) belongs to
that size only:

- ``dask``: `make_plan` on a LocalCluster (cluster start excluded from the time);
- ``driver``: the planner as it was before issue 6, in the driver: read every row, prepare,
  slice into prompt shards (the baseline, skipped above ``--baseline-max`` rows).

Planning cost should grow linearly in rows (rows/s flat) and the Dask driver's memory stay
flat, where the in-driver planner's grows with the input.

    python -m bench.plan [--rows 100000 1000000] [--workers 2] [--baseline-max 1000000]
    python -m bench.run --suite plan [--slow]     # --slow adds 10M rows (Dask only)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = REPO_ROOT / "artifacts" / "bench" / "plan"
ROWS_PER_SHARD = 1024


def make_rows(path: Path, rows: int) -> Path:
    """Deterministic rows: ``a+b=`` -> ``c``; every fourth one a two-turn chat. Cached."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for lo in range(0, rows, 100_000):
            lines = []
            for i in range(lo, min(lo + 100_000, rows)):
                a, b = (i * 7919) % 1000, (i * 104729) % 1000
                if i % 4 == 3:
                    lines.append(
                        f'{{"id": "c{i}", "messages": [{{"role": "user", "content": "{a}+{b}="}}, '
                        f'{{"role": "assistant", "content": "{a + b}"}}]}}\n'
                    )
                else:
                    lines.append(
                        f'{{"id": "r{i}", "prompt": "{a}+{b}=", "completion": "{a + b}"}}\n'
                    )
            f.write("".join(lines))
    tmp.rename(path)
    return path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _config(teacher: Path, input_path: Path, out: Path):
    from pipeline.config import load_config

    return load_config(
        None,
        [
            f"input.path={input_path}",
            f"teacher.model={teacher}",
            "teacher.k=8",
            f"output.path={out}",
            f"output.rows_per_shard={ROWS_PER_SHARD}",
        ],
    )


def _plan_in_driver(cfg, out: Path) -> int:
    """The pre-issue-6 planner: the whole input as one table in the driver, sliced into shards."""
    from pipeline.plan import load_tokenizer, max_row_tokens
    from stages.prompts import load_rows, prepare_prompts
    from storage.layout import ShardSetLayout
    from storage.writer import write_parquet_atomic

    layout = ShardSetLayout.from_url(str(out))
    options = cfg.prompts.model_copy(update={"max_length": max_row_tokens(cfg)})
    prepared = prepare_prompts(load_rows(cfg.input), load_tokenizer(cfg), options, cfg.input)
    table = prepared.table
    layout.ensure_dirs()
    for index, start in enumerate(range(0, table.num_rows, ROWS_PER_SHARD)):
        part = table.slice(start, ROWS_PER_SHARD)
        write_parquet_atomic(layout.fs, layout.prompts_path(index), part)
    return prepared.num_input_rows


def measure(mode: str, input_path: Path, out: Path, workers: int) -> dict:
    """One measurement, in this (fresh) process: seconds, rows/s, driver peak RSS."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pipeline.plan  # noqa: F401  (imports belong to the floor, not to planning)
    from bench.run import _teacher_dir

    teacher = _teacher_dir()
    cfg = _config(teacher, input_path, out)
    shutil.rmtree(out, ignore_errors=True)
    floor = _peak_rss_mb()
    if mode == "driver":
        t0 = time.perf_counter()
        rows = _plan_in_driver(cfg, out)
        seconds = time.perf_counter() - t0
    else:
        import dask
        from distributed import Client, LocalCluster

        from pipeline.plan import make_plan
        from storage.layout import ShardSetLayout

        with dask.config.set({"distributed.worker.daemon": False}):
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
            )
        with cluster, Client(cluster) as client:
            t0 = time.perf_counter()
            outcome = make_plan(
                cfg, ShardSetLayout.from_url(str(out)), log=lambda _: None, connect=lambda: client
            )
            seconds = time.perf_counter() - t0
        rows = int(outcome.plan.extra["num_input_rows"])
    shutil.rmtree(out, ignore_errors=True)
    return {
        "mode": mode,
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "driver_peak_rss_mb": _peak_rss_mb(),
        "driver_rss_floor_mb": floor,
    }


def _run_child(mode: str, input_path: Path, workers: int, work_dir: Path) -> dict:
    out = work_dir / f"out-{mode}"
    cmd = [
        sys.executable,
        "-m",
        "bench.plan",
        "--measure",
        mode,
        "--input",
        str(input_path),
        "--out",
        str(out),
        "--workers",
        str(workers),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_plan(
    sizes: tuple[int, ...] = (100_000, 1_000_000),
    workers: int = 2,
    baseline_max: int = 1_000_000,
    work_dir: Path = WORK_DIR,
) -> dict:
    """Planning rows/s and driver peak RSS per input size, Dask and (up to ``baseline_max``
    rows) the in-driver baseline, measured in the same run."""
    results = []
    for rows in sizes:
        data = make_rows(work_dir / f"rows-{rows}.jsonl", rows)
        print(f"== plan: {rows:,} rows on {workers} Dask worker(s)", flush=True)
        entry = {"rows": rows, "dask": _run_child("dask", data, workers, work_dir)}
        if rows <= baseline_max:
            print(f"== plan: {rows:,} rows in the driver (baseline)", flush=True)
            entry["driver"] = _run_child("driver", data, workers, work_dir)
            entry["ratio_dask_to_driver"] = (
                entry["dask"]["rows_per_s"] / entry["driver"]["rows_per_s"]
            )
        results.append(entry)
    return {"workers": workers, "rows_per_shard": ROWS_PER_SHARD, "sizes": results}


def render(result: dict) -> str:
    head = (
        f"{'rows':>11} {'dask rows/s':>12} {'driver MB':>10} "
        f"{'baseline rows/s':>16} {'baseline MB':>12} {'dask/baseline':>14}"
    )
    lines = [f"planning on {result['workers']} Dask worker(s) vs in the driver", head]
    lines.append("-" * len(head))
    for r in result["sizes"]:
        d, b = r["dask"], r.get("driver")
        lines.append(
            f"{r['rows']:>11,} {d['rows_per_s']:>12,.0f} {d['driver_peak_rss_mb']:>10,.0f} "
            + (
                f"{b['rows_per_s']:>16,.0f} {b['driver_peak_rss_mb']:>12,.0f} "
                f"{r['ratio_dask_to_driver']:>14.2f}"
                if b
                else f"{'-':>16} {'-':>12} {'-':>14}"
            )
        )
    floor = result["sizes"][0]["dask"]["driver_rss_floor_mb"]
    lines.append(f"(driver RSS after imports, before planning: {floor:,.0f} MB)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baseline-max", type=int, default=1_000_000)
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="inputs and outputs")
    parser.add_argument("--measure", choices=["dask", "driver"], help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.input, args.out, args.workers)))
        return 0
    result = bench_plan(tuple(args.rows), args.workers, args.baseline_max, args.work_dir)
    print(json.dumps(result, indent=2))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
