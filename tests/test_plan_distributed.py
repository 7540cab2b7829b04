"""Planning on Dask: same plan, shard boundaries and prompt bytes for any partitioning and any
cluster size, as the whole-input planner; the same errors, naming the same rows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.plan import EmptyInputError, load_tokenizer, make_plan, max_row_tokens
from stages.prompts import InputError, load_rows, prepare_prompts
from storage.layout import ShardSetLayout
from storage.manifest import read_plan
from storage.writer import parquet_bytes
from tests.conftest import plan_config

ROWS_PER_SHARD = 7


def _cfg(teacher_dir: Path, input_path: Path, out: Path, *extra: str):
    return plan_config(teacher_dir, input_path, out, ROWS_PER_SHARD, *extra)


def _serial(cfg) -> dict:
    """The whole-input planner as it was: read everything, prepare, slice, hash the shards."""
    options = cfg.prompts.model_copy(update={"max_length": max_row_tokens(cfg)})
    prepared = prepare_prompts(load_rows(cfg.input), load_tokenizer(cfg), options, cfg.input)
    table = prepared.table
    shards = []
    for start in range(0, table.num_rows, ROWS_PER_SHARD):
        part = table.slice(start, ROWS_PER_SHARD)
        digest = hashlib.sha256(memoryview(parquet_bytes(part))).hexdigest()
        shards.append((start, start + part.num_rows, digest))
    return {
        "shards": shards,
        "skipped": prepared.skip_counts(),
        "num_input_rows": prepared.num_input_rows,
        "num_truncated": prepared.num_truncated,
        "num_tokens": sum(len(x) for x in table.column("input_ids").to_pylist()),
    }


def _summary(plan) -> dict:
    return {
        "shards": [(s.row_start, s.row_stop, s.prompts_sha256) for s in plan.shards],
        "skipped": plan.skipped,
        "num_input_rows": plan.extra["num_input_rows"],
        "num_truncated": plan.extra["num_truncated"],
        "num_tokens": plan.extra["num_tokens"],
    }


@pytest.fixture(scope="module")
def two_workers():
    """A second LocalCluster with two workers (no engines: planning only)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(params=["in-process", "1 worker", "2 workers"])
def connect(request):
    """How planning runs: in-process (no connect), or on a cluster of 1 or 2 workers."""
    if request.param == "in-process":
        return None
    client = request.getfixturevalue(
        "dask_client" if request.param == "1 worker" else "two_workers"
    )
    return lambda: client


def _plan(cfg, out: Path, connect=None, **sizes):
    return make_plan(
        cfg, ShardSetLayout.from_url(str(out)), log=lambda _: None, connect=connect, **sizes
    )


def _messy_jsonl(path: Path) -> Path:
    """Blank lines, a BOM, bad UTF-8, bad JSON, empty text, chats, duplicates near and far,
    over-long rows (one a later duplicate, one a first occurrence)."""
    lines: list[bytes] = []
    for i in range(60):
        row = {"id": f"r{i}", "text": f"{i}+{i}={2 * i}"}
        if i % 7 == 3:
            row = {"id": f"r{i}", "prompt": f"{i}*2=", "completion": str(2 * i)}
        if i % 11 == 5:
            row = {
                "id": f"r{i}",
                "messages": [
                    {"role": "user", "content": f"{i}+1="},
                    {"role": "assistant", "content": str(i + 1)},
                ],
            }
        lines.append(json.dumps(row).encode())
        if i % 9 == 0:
            lines.append(b"   ")  # blank: not a row
            lines.append(b"")
    lines[0] = b"\xef\xbb\xbf" + lines[0]
    lines.insert(10, b'{"id": "bad-utf8", "text": "caf\xe9"}')
    lines.insert(20, b'{"id": "bad-json", "text": ')
    lines.insert(25, b"[1, 2]")
    lines.insert(30, b'{"id": "empty", "text": "  "}')
    lines.insert(33, json.dumps({"id": "r2", "text": "near duplicate"}).encode())
    lines.append(json.dumps({"id": "r1", "text": "far duplicate"}).encode())
    lines.append(json.dumps({"id": "r40", "text": "9" * 200}).encode())  # duplicate, too long
    lines.insert(5, json.dumps({"id": "long", "text": "8" * 200}).encode())  # first, too long
    lines.append(json.dumps({"id": "long", "text": "later"}).encode())
    lines.append(json.dumps({"text": "no id, derived"}).encode())
    lines.append(json.dumps({"text": "no id, derived"}).encode())  # same content: duplicate
    path.write_bytes(b"\n".join(lines))  # no newline at the end of the file
    return path


SKIP = ("prompts.on_invalid=skip", "prompts.on_too_long=skip")


def test_jsonl_plan_matches_whole_input_planner_on_any_cluster(teacher_dir, tmp_path, connect):
    path = _messy_jsonl(tmp_path / "in.jsonl")
    cfg = _cfg(teacher_dir, path, tmp_path / "out", *SKIP)
    expected = _serial(cfg)
    assert expected["skipped"]["duplicate_id"] == 5
    assert expected["skipped"]["too_long"] == 1
    plan = _plan(cfg, tmp_path / "out", connect, partition_bytes=64).plan
    assert _summary(plan) == expected
    # One partition and many give the same fingerprint and shards.
    one = _plan(cfg, tmp_path / "one", connect, partition_bytes=1 << 30).plan
    assert one.fingerprint == plan.fingerprint
    assert one.shards == plan.shards
    # The prompt shards hold exactly the kept rows, later duplicates dropped.
    layout = ShardSetLayout.from_url(str(tmp_path / "out"))
    ids = [
        i
        for s in plan.shards
        for i in pq.read_table(layout.prompts_path(s.index)).column("id").to_pylist()
    ]
    assert ids.count("r1") == ids.count("r2") == 1
    assert "long" not in ids and ids.count("r40") == 1
    assert not (tmp_path / "out" / ".logitforge" / "planning").exists()


def test_truncation_and_limit_match(teacher_dir, tmp_path):
    path = _messy_jsonl(tmp_path / "in.jsonl")
    for extra in (
        ("prompts.on_invalid=skip",),
        (*SKIP, "input.limit=37"),
        (*SKIP, "input.limit=0"),
    ):
        cfg = _cfg(teacher_dir, path, tmp_path / "out", *extra, "output.overwrite=true")
        if "input.limit=0" in extra:
            with pytest.raises(EmptyInputError, match="0 read"):
                _plan(cfg, tmp_path / "out", partition_bytes=100)
            continue
        plan = _plan(cfg, tmp_path / "out", partition_bytes=100).plan
        assert _summary(plan) == _serial(cfg)


def _parquet_input(folder: Path) -> Path:
    folder.mkdir()
    rows = [{"id": f"p{i}", "prompt": f"{i}+3=", "completion": str(i + 3)} for i in range(50)]
    rows[17] = {"id": "p3", "prompt": "dup", "completion": "x"}
    rows[30] = {"id": "p30", "prompt": None, "completion": None}  # no content field
    pq.write_table(pa.Table.from_pylist(rows[:23]), folder / "a.parquet", row_group_size=4)
    pq.write_table(pa.Table.from_pylist(rows[23:]), folder / "b.parquet", row_group_size=11)
    return folder


def test_parquet_plan_matches_on_any_cluster(teacher_dir, tmp_path, connect):
    cfg = _cfg(teacher_dir, _parquet_input(tmp_path / "pq"), tmp_path / "out", *SKIP)
    expected = _serial(cfg)
    assert expected["skipped"] == {"duplicate_id": 1, "missing_field": 1}
    # 5 rows per partition: runs of 4-row groups, and 11-row groups split in pieces.
    assert _summary(_plan(cfg, tmp_path / "out", connect, partition_rows=5).plan) == expected


def test_datasets_plan_matches_on_any_cluster(teacher_dir, tmp_path, connect):
    import datasets

    rows = [{"id": str(i), "text": f"{i}-1={i - 1}"} for i in range(30)]
    rows[21]["id"] = "4"
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    cfg = _cfg(teacher_dir, tmp_path / "ds", tmp_path / "out", *SKIP, "input.limit=25")
    expected = _serial(cfg)
    assert expected["num_input_rows"] == 25 and expected["skipped"] == {"duplicate_id": 1}
    assert _summary(_plan(cfg, tmp_path / "out", connect, partition_rows=4).plan) == expected


def _serial_error(cfg) -> InputError:
    with pytest.raises(InputError) as err:
        _serial(cfg)
    return err.value


ERROR_CASES = {
    # A duplicate in a late partition of an id first seen in the first one.
    "duplicate across partitions": [{"id": "a", "text": "1"}]
    + [{"id": f"x{i}", "text": str(i)} for i in range(30)]
    + [{"id": "a", "text": "again"}, {"id": "z", "text": 5}],
    # The earliest bad row wins, though a later partition finishes first.
    "earliest of several": [{"id": f"x{i}", "text": str(i)} for i in range(20)]
    + [{"id": "x3", "text": "dup"}]
    + [{"id": f"y{i}", "text": str(i)} for i in range(10)]
    + [{"id": "w", "text": 5}],
    # A row failing validation beats an over-long row before it: validation comes first.
    "invalid beats too long": [{"id": "long", "text": "7" * 200}]
    + [{"id": f"x{i}", "text": str(i)} for i in range(20)]
    + [{"id": "m", "foo": 1}],
    "too long": [{"id": f"x{i}", "text": str(i)} for i in range(20)]
    + [{"id": "long", "text": "7" * 200}],
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_name_the_same_row_as_the_whole_input_check(teacher_dir, tmp_path, case):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ERROR_CASES[case]) + "\n\n")
    cfg = _cfg(teacher_dir, path, tmp_path / "out", "prompts.on_too_long=error")
    expected = _serial_error(cfg)
    with pytest.raises(InputError) as err:
        _plan(cfg, tmp_path / "out", partition_bytes=48)
    assert str(err.value) == str(expected)
    assert (err.value.row, err.value.line, err.value.reason) == (
        expected.row,
        expected.line,
        expected.reason,
    )
    assert not (tmp_path / "out" / ".logitforge" / "plan.json").exists()


def test_duplicate_error_names_row_line_and_first_seen_row(teacher_dir, tmp_path, dask_client):
    path = tmp_path / "in.jsonl"
    rows = [{"id": f"x{i}", "text": str(i)} for i in range(40)]
    rows[33] = {"id": "x4", "text": "again"}
    path.write_text("\n\n".join(json.dumps(r) for r in rows) + "\n")  # blank line between rows
    cfg = _cfg(teacher_dir, path, tmp_path / "out")
    with pytest.raises(InputError) as err:
        _plan(cfg, tmp_path / "out", lambda: dask_client, partition_bytes=64)
    assert str(err.value) == (
        "input row 33 (line 67 of in.jsonl, id 'x4'): "
        "duplicate id 'x4', first seen at input row 4 (line 9 of in.jsonl)"
    )


def test_reuse_needs_no_cluster_and_reads_no_prompt_bytes(teacher_dir, tmp_path):
    path = _messy_jsonl(tmp_path / "in.jsonl")
    out = tmp_path / "out"
    cfg = _cfg(teacher_dir, path, out, *SKIP)
    plan = _plan(cfg, out, partition_bytes=256).plan
    assert all(s.prompts_bytes for s in plan.shards)

    def no_cluster():
        raise AssertionError("a reused plan must not start a cluster")

    assert _plan(cfg, out, no_cluster).reused
    # A plan written before prompt sizes were recorded is still reused (checked by sha256).
    plan_path = out / ".logitforge" / "plan.json"
    old = json.loads(plan_path.read_text())
    for shard in old["shards"]:
        del shard["prompts_bytes"]
    plan_path.write_text(json.dumps(old))
    again = _plan(cfg, out, no_cluster)
    assert again.reused and again.plan == read_plan(ShardSetLayout.from_url(str(out)))
    # A prompt shard of another size is rebuilt, identically, and the old plan kept.
    shard = out / ".logitforge" / "prompts" / "train-00002.parquet"
    good = shard.read_bytes()
    shard.write_bytes(good[:100])
    rebuilt = _plan(cfg, out, partition_bytes=64)
    assert rebuilt.plan == again.plan
    assert shard.read_bytes() == good


def test_rows_work_file_batches_do_not_follow_the_input_chunks(tmp_path, monkeypatch):
    """`cut_task` finds a row's batch by division, so batches must be exactly
    WORK_BATCH_ROWS long however the table was chunked (a shard-set input is one chunk per
    file)."""
    from stages.prompts import planning

    monkeypatch.setattr(planning, "WORK_BATCH_ROWS", 4)
    table = pa.concat_tables(
        [pa.table({"pos": pa.array(range(lo, hi))}) for lo, hi in ((0, 3), (3, 5), (5, 11))]
    )
    planning.write_rows(str(tmp_path), 0, table)
    fs, path = planning.work_path(str(tmp_path), "rows", 0)
    assert planning._read_batches(fs, path, [1]).column("pos").to_pylist() == [4, 5, 6, 7]
    assert planning._read_batches(fs, path).column("pos").to_pylist() == list(range(11))
