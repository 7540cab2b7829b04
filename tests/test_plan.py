"""Planning: input is validated and frozen into prompt shards before any engine starts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.execute import run_cache_teacher
from pipeline.plan import make_plan
from stages.prompts import InputError
from stages.teacher.engine import EngineLimitError
from storage.layout import ShardSetLayout
from storage.manifest import PlanMismatchError, read_plan
from tests.conftest import BUNDLED_PROMPTS, plan_config, read_jsonl, write_jsonl


def _cfg(teacher_dir: Path, input_path: Path, out: Path, *extra: str):
    return plan_config(teacher_dir, input_path, out, 10, *extra)


@pytest.fixture
def small_input(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", read_jsonl(BUNDLED_PROMPTS)[:25])


def test_plan_freezes_prompt_shards(teacher_dir, small_input, tmp_path):
    out = tmp_path / "out"
    outcome = make_plan(_cfg(teacher_dir, small_input, out), ShardSetLayout.from_url(str(out)))
    plan = outcome.plan
    assert not outcome.reused
    assert (plan.num_rows, plan.num_shards) == (25, 3)
    assert [(s.row_start, s.row_stop) for s in plan.shards] == [(0, 10), (10, 20), (20, 25)]
    ids = [
        i
        for s in plan.shards
        for i in pq.read_table(out / ".logitforge/prompts" / f"train-{s.index:05d}.parquet")
        .column("id")
        .to_pylist()
    ]
    assert ids == [r["id"] for r in read_jsonl(small_input)]
    assert plan.shards[2].name == "train-00002-of-00003.parquet"


def test_same_config_reuses_plan(teacher_dir, small_input, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(teacher_dir, small_input, out)
    layout = ShardSetLayout.from_url(str(out))
    first = make_plan(cfg, layout).plan
    again = make_plan(cfg, layout)
    assert again.reused and again.plan == first


def test_corrupted_prompt_shard_is_rebuilt_identically(teacher_dir, small_input, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(teacher_dir, small_input, out)
    layout = ShardSetLayout.from_url(str(out))
    plan = make_plan(cfg, layout).plan
    shard = out / ".logitforge/prompts/train-00001.parquet"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    logs: list[str] = []
    assert make_plan(cfg, layout, log=logs.append).plan == plan
    assert shard.read_bytes() == good
    assert any("rebuilt" in line for line in logs)


def test_different_config_is_refused_with_the_difference(teacher_dir, small_input, tmp_path):
    out = tmp_path / "out"
    layout = ShardSetLayout.from_url(str(out))
    make_plan(_cfg(teacher_dir, small_input, out), layout)
    with pytest.raises(PlanMismatchError, match=r"teacher\.k: 8 -> 4") as err:
        make_plan(_cfg(teacher_dir, small_input, out, "teacher.k=4"), layout)
    assert "--overwrite" in str(err.value)
    replaced = make_plan(
        _cfg(teacher_dir, small_input, out, "teacher.k=4", "output.overwrite=true"), layout
    )
    assert read_plan(layout) == replaced.plan
    assert replaced.plan.config["teacher"]["k"] == 4


def test_changed_input_is_refused(teacher_dir, small_input, tmp_path):
    out = tmp_path / "out"
    layout = ShardSetLayout.from_url(str(out))
    make_plan(_cfg(teacher_dir, small_input, out), layout)
    rows = read_jsonl(small_input)
    rows[3]["completion"] = "0"
    write_jsonl(small_input, rows)
    with pytest.raises(PlanMismatchError, match="input data changed"):
        make_plan(_cfg(teacher_dir, small_input, out), layout)


def test_foreign_files_in_output_are_refused(teacher_dir, small_input, tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "mine.parquet").write_bytes(b"not ours")
    with pytest.raises(PlanMismatchError, match="no logitforge plan"):
        make_plan(_cfg(teacher_dir, small_input, out), ShardSetLayout.from_url(str(out)))


BAD_ROWS = [
    ({"id": "x", "prompt": 12, "completion": "3"}, "wrong_type"),
    ({"id": "x", "foo": "bar"}, "missing_field"),
    ({"id": "dup", "text": "1+1=2"}, "duplicate_id"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_bad_input_fails_before_any_engine(teacher_dir, tmp_path, dask_client, bad, reason):
    rows = [{"id": "dup", "text": "2+2=4"}, {"id": "ok", "text": "3+3=6"}, bad]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    logs: list[str] = []
    with pytest.raises(InputError) as err:
        run_cache_teacher(
            _cfg(teacher_dir, path, tmp_path / "out"), client=dask_client, log=logs.append
        )
    assert err.value.row == 2 and err.value.reason == reason
    assert "line 3" in str(err.value)
    # Planning ran on the cluster, but no shard task was submitted, so no engine was used;
    # nothing was planned and the planning work files are gone.
    assert any("planning:" in line for line in logs)
    assert not any("submitted" in line for line in logs)
    meta = tmp_path / "out" / ".logitforge"
    assert not (meta / "plan.json").exists()
    assert not (meta / "planning").exists()


def test_invalid_utf8_names_the_line(teacher_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"id": "a", "text": "1+1=2"}\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(InputError, match="line 2") as err:
        make_plan(_cfg(teacher_dir, path, tmp_path / "out"), ShardSetLayout.from_url(str(tmp_path)))
    assert err.value.reason == "invalid_utf8"


def test_skips_are_counted_in_the_plan(teacher_dir, tmp_path):
    rows = [
        {"id": "a", "text": "1+1=2"},
        {"id": "b", "text": "   "},
        {"id": "c", "prompt": "2+2=", "completion": ""},
        {"id": "d", "text": "9" * 500},
        {"id": "a", "text": "again"},
        {"id": "e", "text": 5},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = _cfg(
        teacher_dir, path, tmp_path / "out", "prompts.on_invalid=skip", "prompts.on_too_long=skip"
    )
    plan = make_plan(cfg, ShardSetLayout.from_url(str(tmp_path / "out"))).plan
    assert plan.num_rows == 1
    assert plan.skipped == {"empty_text": 2, "too_long": 1, "duplicate_id": 1, "wrong_type": 1}
    assert plan.extra["num_input_rows"] == 6


def test_too_long_rows_are_truncated_to_the_teacher_context(teacher_dir, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "long", "text": "7" * 500}])
    out = tmp_path / "out"
    plan = make_plan(_cfg(teacher_dir, path, out), ShardSetLayout.from_url(str(out))).plan
    context = json.loads((teacher_dir / "config.json").read_text())["max_position_embeddings"]
    table = pq.read_table(out / ".logitforge/prompts/train-00000.parquet")
    assert len(table.column("input_ids")[0]) == context - 1
    assert table.column("truncated").to_pylist() == [True]
    assert plan.extra["num_truncated"] == 1


def test_k_above_vocabulary_fails_before_the_engine(teacher_dir, small_input, tmp_path):
    with pytest.raises(EngineLimitError, match="exceeds the vocabulary"):
        make_plan(
            _cfg(teacher_dir, small_input, tmp_path / "out", "teacher.k=100000"),
            ShardSetLayout.from_url(str(tmp_path / "out")),
        )


def test_cli_reports_bad_input_with_exit_code_2(teacher_dir, tmp_path, capsys):
    from pipeline.cli import main

    path = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "text": "1+1=2"}, {"id": "b"}])
    config = tmp_path / "job.yaml"
    config.write_text(
        f"input: {{path: {path}}}\nteacher: {{model: {teacher_dir}, k: 8}}\n"
        f"output: {{path: {tmp_path / 'out'}}}\n"
    )
    assert main(["cache-teacher", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("logitforge: error: input row 1 (line 2")


def test_same_size_damaged_prompt_shard_is_removed_by_its_task_then_rebuilt(
    teacher_dir, small_input, tmp_path
):
    """The reuse check compares sizes only; the shard task's sha256 check catches a flipped
    byte, removes the file, and the next plan check rebuilds it from the input."""
    from stages.shard_task import CorruptPromptShardError, ShardTask, read_prompt_shard

    out = tmp_path / "out"
    cfg = _cfg(teacher_dir, small_input, out)
    layout = ShardSetLayout.from_url(str(out))
    plan = make_plan(cfg, layout).plan
    path = Path(layout.prompts_path(1))
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert make_plan(cfg, layout).reused  # same size: the metadata check passes
    task = ShardTask(
        output_url=str(out),
        index=1,
        num_shards=plan.num_shards,
        plan_fingerprint=plan.fingerprint,
        prompts_sha256=plan.shard(1).prompts_sha256,
        metadata={},
    )
    with pytest.raises(CorruptPromptShardError, match="was removed"):
        read_prompt_shard(task)
    assert not path.exists()
    logs: list[str] = []
    assert make_plan(cfg, layout, log=logs.append).plan == plan
    assert path.read_bytes() == good
    assert read_prompt_shard(task).num_rows == 10
