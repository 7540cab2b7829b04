"""Shard sets on S3-compatible storage, against a real S3 server (moto's, on a free port).

The pipeline is run exactly as a user would: the CLI as a subprocess whose environment holds
the endpoint and credentials. The run that is SIGKILLed starts its own LocalCluster, whose
workers inherit them, so the kill takes out the driver, the worker and vLLM at once; the
uninterrupted runs and the rerun attach to one cluster started here after the credentials are
in the environment, which keeps its engine warm (an engine start is most of a run's time).
Every object is read back over S3 (boto3), never from moto's memory, so what is asserted is
what a client sees.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.plan import make_plan
from storage.layout import ShardSetLayout
from storage.manifest import read_plan
from storage.reader import ShardSet
from storage.writer import is_object_store, write_bytes_atomic
from tests.conftest import (
    BUNDLED_PROMPTS,
    REPO_ROOT,
    TEST_K,
    cli_env,
    plan_config,
    read_jsonl,
    sigkill_when,
    write_jsonl,
)
from tests.test_cache_teacher_e2e import _assert_same_rows

pytestmark = pytest.mark.slow

BUCKET = "logitforge-test"
NUM_ROWS = 320
ROWS_PER_SHARD = 16
NUM_SHARDS = NUM_ROWS // ROWS_PER_SHARD
ACCESS_KEY = f"AKIA{uuid.uuid4().hex[:16].upper()}"
SECRET_KEY = f"lf-secret-{uuid.uuid4().hex}"  # must never be written anywhere


@pytest.fixture(scope="module")
def s3() -> Iterator:
    """A moto S3 server on a free port, its endpoint and credentials in this process's
    environment (and so in every CLI subprocess and its Dask workers), and a boto3 client."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            mp.setenv(key, value)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client
    server.stop()


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


# ------------------------------------------------------------------------- writes and inputs


def test_object_store_writes_are_single_puts_without_temps(s3, monkeypatch, tmp_path) -> None:
    layout = ShardSetLayout.from_url(f"s3://{BUCKET}/unit/out")
    assert is_object_store(layout.fs) and not layout.fs.dircache.use_listings_cache
    layout.ensure_dirs()  # no folders on S3: nothing to create
    renames: list[tuple] = []
    monkeypatch.setattr(type(layout.fs), "mv", lambda *a, **k: renames.append(a))
    write_bytes_atomic(layout.fs, layout.plan_path(), b'{"x": 1}\n')
    write_bytes_atomic(layout.fs, layout.plan_path(), b'{"x": 2}\n')  # a retry overwrites
    assert renames == []
    assert _keys(s3, "unit/") == ["unit/out/.logitforge/plan.json"]
    body = s3.get_object(Bucket=BUCKET, Key="unit/out/.logitforge/plan.json")["Body"].read()
    assert body == b'{"x": 2}\n'
    # Nothing is written before the one PUT (no temp object), so a failed PUT leaves nothing.
    monkeypatch.setattr(layout.fs, "pipe_file", _failing_put)
    with pytest.raises(OSError, match="connection reset"):
        write_bytes_atomic(layout.fs, layout.data_path(0, 1), b"PAR1 half a shard")
    assert _keys(s3, "unit/") == ["unit/out/.logitforge/plan.json"]
    # A local folder still uses temp + rename.
    local = ShardSetLayout.from_url(str(tmp_path))
    assert not is_object_store(local.fs)


def _failing_put(path: str, data: bytes, **kwargs) -> None:
    raise OSError("connection reset by peer")


@pytest.fixture(scope="module")
def input_rows(tmp_path_factory) -> tuple[Path, str]:
    """The bundled prompts as a local JSONL file and the same bytes on S3."""
    path = write_jsonl(tmp_path_factory.mktemp("input") / "rows.jsonl", _rows())
    return path, f"s3://{BUCKET}/inputs/rows.jsonl"


def _rows() -> list[dict]:
    return read_jsonl(BUNDLED_PROMPTS)[:NUM_ROWS]


def test_planning_reads_input_and_writes_plan_on_s3(s3, input_rows, teacher_dir, tmp_path):
    """JSONL (in byte ranges) and a Parquet folder read from S3, work files and prompt shards
    written to S3: the same prompt shards, byte for byte, as planning everything locally."""
    local_input, s3_input = input_rows
    s3.put_object(Bucket=BUCKET, Key="inputs/rows.jsonl", Body=local_input.read_bytes())
    table = pa.Table.from_pylist(_rows())
    folder = tmp_path / "pq"
    (folder / "sub").mkdir(parents=True)
    pq.write_table(table.slice(0, 100), folder / "a.parquet", row_group_size=30)
    pq.write_table(table.slice(100), folder / "sub" / "b.parquet", row_group_size=64)
    for file in (folder / "a.parquet", folder / "sub" / "b.parquet"):
        key = f"inputs/pq/{file.relative_to(folder).as_posix()}"
        s3.put_object(Bucket=BUCKET, Key=key, Body=file.read_bytes())

    for local, remote, name in [
        (local_input, s3_input, "jsonl"),
        (folder, f"s3://{BUCKET}/inputs/pq", "parquet"),
    ]:
        out = f"s3://{BUCKET}/plans/{name}"
        small = {"partition_bytes": 4096, "partition_rows": 50}  # several partitions each
        remote_plan = make_plan(
            plan_config(teacher_dir, remote, out, ROWS_PER_SHARD), ShardSetLayout.from_url(out),
            log=lambda _: None, **small,
        ).plan  # fmt: skip
        local_plan = make_plan(
            plan_config(teacher_dir, local, tmp_path / name, ROWS_PER_SHARD),
            ShardSetLayout.from_url(str(tmp_path / name)), log=lambda _: None, **small,
        ).plan  # fmt: skip
        assert remote_plan.input_fingerprint == local_plan.input_fingerprint  # content-addressed
        assert remote_plan.num_rows == local_plan.num_rows == NUM_ROWS
        assert [s.prompts_sha256 for s in remote_plan.shards] == [
            s.prompts_sha256 for s in local_plan.shards
        ]
        keys = _keys(s3, f"plans/{name}/")
        assert not any("/.logitforge/planning/" in k or ".tmp-" in k for k in keys)
        assert keys == sorted(
            [f"plans/{name}/.logitforge/plan.json"]
            + [f"plans/{name}/.logitforge/prompts/train-{i:05d}.parquet" for i in range(20)]
        )
        reused = make_plan(
            plan_config(teacher_dir, remote, out, ROWS_PER_SHARD), ShardSetLayout.from_url(out),
            log=lambda _: None,
        )  # fmt: skip
        assert reused.reused and reused.plan == remote_plan


# ------------------------------------------------------------------ cache-teacher end to end


@pytest.fixture(scope="module")
def scheduler(s3) -> Iterator[str]:
    """A LocalCluster started after `s3` put the credentials in the environment (its worker
    inherits them), for the CLI runs that are not killed; one warm engine serves them all."""
    import dask
    from distributed import Client, LocalCluster

    from pipeline.workers import close_engines

    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        )
    client = Client(cluster)
    yield cluster.scheduler_address
    close_engines(client)  # no vLLM process may outlive the module
    client.close()
    cluster.close()


def _config(
    tmp_path: Path,
    name: str,
    input_path: str,
    output: str,
    teacher_dir: Path,
    scheduler: str | None = None,
) -> Path:
    settings = {
        "input": {"path": input_path, "format": "jsonl"},
        "prompts": {"append_eos": True},
        "teacher": {"model": str(teacher_dir), "k": TEST_K, "dtype": "float32",
                    "kv_cache_gib": 0.25},
        "output": {"path": output, "rows_per_shard": ROWS_PER_SHARD, "codec": "fp16"},
        "cluster": {"n_workers": 1, "scheduler": scheduler},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _cli(config: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "cache-teacher", "--config", str(config)]


def _run(config: Path) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    proc = subprocess.run(
        _cli(config), cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"{config.stem}: {time.perf_counter() - started:.1f} s")
    return proc


@pytest.fixture(scope="module")
def local_reference(input_rows, teacher_dir, scheduler, tmp_path_factory) -> tuple[Path, str]:
    """The uninterrupted run to a local folder, from the local input: the reference rows."""
    tmp = tmp_path_factory.mktemp("local")
    config = _config(tmp, "local", str(input_rows[0]), str(tmp / "out"), teacher_dir, scheduler)
    proc = _run(config)
    return tmp / "out", proc.stdout + proc.stderr


def test_cache_teacher_to_s3_equals_local_then_sigkill_and_resume(
    s3, input_rows, local_reference, scheduler, teacher_dir, tmp_path
) -> None:
    local_input, s3_input = input_rows
    s3.put_object(Bucket=BUCKET, Key="inputs/rows.jsonl", Body=local_input.read_bytes())
    local_out, local_logs = local_reference
    reference = ShardSet.open(str(local_out)).to_batch(strict=True)
    logs = [local_logs]

    # (a) Uninterrupted: input and output on S3; rows equal the local run's.
    url = f"s3://{BUCKET}/runs/whole"
    proc = _run(_config(tmp_path, "whole", s3_input, url, teacher_dir, scheduler))
    logs.append(proc.stdout + proc.stderr)
    assert f"{NUM_SHARDS} run now" in proc.stdout
    whole = ShardSet.open(url)
    _assert_same_rows(whole.to_batch(strict=True), reference)
    local_plan = read_plan(ShardSetLayout.from_url(str(local_out)))
    assert [s.prompts_sha256 for s in whole.plan.shards] == [
        s.prompts_sha256 for s in local_plan.shards
    ]
    _assert_complete(s3, "runs/whole/")

    # (b) SIGKILL the whole CLI process group (driver, its own LocalCluster worker, vLLM) once
    # some, not all, records are on S3. Its planning tasks and shard tasks run in a worker
    # that got the credentials only by inheriting the CLI's environment.
    url = f"s3://{BUCKET}/runs/killed"
    done_prefix = "runs/killed/.logitforge/done/"
    started = time.perf_counter()
    sigkill_when(
        _cli(_config(tmp_path, "killed", s3_input, url, teacher_dir)),
        lambda: bool(_keys(s3, done_prefix)),
        timeout_s=400,
    )
    print(f"killed after {time.perf_counter() - started:.1f} s")
    time.sleep(0.5)  # let the server finish any request that was fully sent before the kill
    finished_before = len(_keys(s3, done_prefix))
    assert 0 < finished_before < NUM_SHARDS, finished_before

    proc = _run(_config(tmp_path, "rerun", s3_input, url, teacher_dir, scheduler))
    logs.append(proc.stdout + proc.stderr)
    assert "resuming" in proc.stdout
    assert f"{NUM_SHARDS - finished_before} run now" in proc.stdout
    assert f"{finished_before} already done" in proc.stdout
    _assert_complete(s3, "runs/killed/")
    resumed = ShardSet.open(url).to_batch(strict=True)
    _assert_same_rows(resumed, whole.to_batch(strict=True))
    _assert_same_rows(resumed, reference)

    # (c) The secret key is in no object of the bucket and in no output of any CLI run.
    keys = _keys(s3, "")
    assert len(keys) > 3 * NUM_SHARDS
    for key in keys:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert SECRET_KEY.encode() not in body, key
        assert ACCESS_KEY.encode() not in body, key
    for text in logs:
        assert SECRET_KEY not in text and ACCESS_KEY not in text


def _assert_complete(s3, prefix: str) -> None:
    """Every planned shard and record present, nothing else: no temp or planning objects."""
    keys = _keys(s3, prefix)
    names = [k[len(prefix) :] for k in keys]
    data = [f"data/train-{i:05d}-of-{NUM_SHARDS:05d}.parquet" for i in range(NUM_SHARDS)]
    done = [f".logitforge/done/train-{i:05d}.json" for i in range(NUM_SHARDS)]
    prompts = [f".logitforge/prompts/train-{i:05d}.parquet" for i in range(NUM_SHARDS)]
    assert names == sorted([*data, *done, *prompts, ".logitforge/plan.json", "README.md"])
    for i in range(NUM_SHARDS):
        record = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}{done[i]}")["Body"].read())
        head = s3.head_object(Bucket=BUCKET, Key=f"{prefix}{data[i]}")
        assert record["bytes"] == head["ContentLength"]
