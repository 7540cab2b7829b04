"""Shard sets end to end: table building, atomic writes, records, verification, card, readers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.card import read_card_metadata, write_dataset_card
from storage.codecs import VALUE_CODECS, Codec, get_codec
from storage.layout import ShardSetLayout, shard_name
from storage.manifest import (
    DoneRecord,
    Plan,
    ShardPlan,
    read_done,
    read_plan,
    remove_done,
    utc_now,
    verify_shard,
    write_done,
    write_plan,
)
from storage.reader import (
    IncompleteShardSetError,
    ShardCorruptedError,
    ShardSet,
    decode_logit_table,
)
from storage.schema import (
    METADATA_KEY,
    PROMPT_SCHEMA,
    ShardSetMetadata,
    build_logit_table,
    logit_schema,
    read_metadata,
)
from storage.writer import sha256_file, write_parquet_atomic

K = 4


def make_prompts(lengths: list[int], prefix: str = "r") -> pa.Table:
    """A prompt table whose token i of row r has id 100*r + i (easy to check by eye)."""
    ids = [[100 * r + i for i in range(n)] for r, n in enumerate(lengths)]
    return pa.table(
        {
            "id": [f"{prefix}{r}" for r in range(len(lengths))],
            "input_ids": ids,
            "prompt_len": [min(2, n) for n in lengths],
            "text": ["x" * n for n in lengths],
            "byte_start": [list(range(n)) for n in lengths],
            "byte_end": [list(range(1, n + 1)) for n in lengths],
            "truncated": [False] * len(lengths),
        },
        schema=PROMPT_SCHEMA,
    )


@dataclass
class Outputs:
    topk_ids: np.ndarray  # [T, K]
    topk_logprobs: np.ndarray  # [T, K]
    next_logprob: np.ndarray  # [T]


def make_outputs(num_tokens: int, seed: int = 0, k: int = K) -> Outputs:
    rng = np.random.default_rng(seed)
    lp = -np.sort(rng.exponential(3.0, size=(num_tokens, k)), axis=1).astype(np.float32)
    nxt = lp[:, 0].copy()
    return Outputs(
        topk_ids=rng.integers(0, 32000, size=(num_tokens, k), dtype=np.int64),
        topk_logprobs=lp,
        next_logprob=nxt,
    )


def make_metadata(codec: Codec, fingerprint: str = "plan-abc") -> ShardSetMetadata:
    return ShardSetMetadata(
        teacher_model="tiny/llama",
        teacher_revision=None,
        tokenizer_fingerprint="tok-123",
        k=K,
        codec=codec.name,
        codec_params=codec.params,
        logprobs_mode="raw_logprobs",
        engine="vllm",
        engine_version="0.32.0",
        plan_fingerprint=fingerprint,
    )


def write_shard_set(
    url: str,
    shard_lengths: list[list[int]],
    codec: Codec | None = None,
    fingerprint: str = "plan-abc",
    card: bool = True,
) -> tuple[ShardSetLayout, Plan, list[Outputs]]:
    """Write a complete shard set the way the pipeline does: plan, shards, records, card."""
    codec = codec or get_codec("fp16")
    layout = ShardSetLayout.from_url(url)
    layout.ensure_dirs()
    n = len(shard_lengths)
    shards, start = [], 0
    for i, lengths in enumerate(shard_lengths):
        shards.append(ShardPlan(index=i, name=shard_name(i, n), row_start=start,
                                row_stop=start + len(lengths)))  # fmt: skip
        start += len(lengths)
    plan = Plan(fingerprint=fingerprint, created_at=utc_now(), config={"k": K},
                input_fingerprint="in-1", num_rows=start, num_shards=n, shards=shards)  # fmt: skip
    write_plan(layout, plan)
    meta = make_metadata(codec, fingerprint)
    outputs = []
    for i, lengths in enumerate(shard_lengths):
        prompts = make_prompts(lengths, prefix=f"s{i}-")
        write_parquet_atomic(layout.fs, layout.prompts_path(i), prompts)
        out = make_outputs(sum(lengths), seed=i)
        outputs.append(out)
        table = build_logit_table(prompts, out.topk_ids, out.topk_logprobs, out.next_logprob, codec)
        f = write_parquet_atomic(layout.fs, layout.data_path(i, n), table, meta)
        write_done(layout, DoneRecord(shard=shards[i].name, index=i, rows=f.rows,
                                      tokens=sum(lengths), bytes=f.bytes, sha256=f.sha256,
                                      plan_fingerprint=fingerprint, timings={"teacher": 0.5},
                                      finished_at=utc_now()))  # fmt: skip
    if card:
        write_dataset_card(layout, meta, {"rows": start, "bytes_per_token": 9.5})
    return layout, plan, outputs


# ---------------------------------------------------------------- names and layout


def test_shard_name_format() -> None:
    assert shard_name(3, 16) == "train-00003-of-00016.parquet"
    assert shard_name(0, 1, split="test") == "test-00000-of-00001.parquet"
    with pytest.raises(ValueError):
        shard_name(16, 16)
    with pytest.raises(ValueError):
        shard_name(-1, 4)


def test_layout_paths(tmp_path: Path) -> None:
    layout = ShardSetLayout.from_url(str(tmp_path / "out"))
    root = (tmp_path / "out").as_posix()
    assert layout.root == root
    assert layout.data_path(3, 16) == f"{root}/data/train-00003-of-00016.parquet"
    assert layout.done_path(3) == f"{root}/.logitforge/done/train-00003.json"
    assert layout.plan_path() == f"{root}/.logitforge/plan.json"
    assert layout.prompts_path(3) == f"{root}/.logitforge/prompts/train-00003.parquet"
    assert layout.card_path() == f"{root}/README.md"
    assert layout.shard_glob() == f"{root}/data/train-*.parquet"
    layout.ensure_dirs()
    assert (tmp_path / "out" / "data").is_dir()
    assert (tmp_path / "out" / ".logitforge" / "done").is_dir()
    mem = ShardSetLayout.from_url("memory://somewhere/out")
    assert mem.root == "/somewhere/out" and mem.url == "memory:///somewhere/out"


# ---------------------------------------------------------------- building tables


def test_build_logit_table_schema_and_nesting() -> None:
    codec = get_codec("fp16")
    prompts = make_prompts([3, 0, 5])
    out = make_outputs(8)
    table = build_logit_table(prompts, out.topk_ids, out.topk_logprobs, out.next_logprob, codec)
    assert table.schema.equals(logit_schema(codec, K))
    assert table.num_rows == 3
    assert table.schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float16(), K))
    rows = table.column("topk_ids").to_pylist()
    assert [len(r) for r in rows] == [3, 0, 5]
    assert rows[2][0] == out.topk_ids[3].tolist()  # row 2 starts at token 3
    assert table.column("next_logprob").to_pylist()[0] == pytest.approx(out.next_logprob[:3])


def test_build_logit_table_accepts_sliced_chunked_prompts() -> None:
    codec = get_codec("fp32")
    prompts = pa.concat_tables([make_prompts([2, 3]), make_prompts([4, 1])]).slice(1, 2)
    assert prompts.column("input_ids").num_chunks == 2
    out = make_outputs(3 + 4)
    table = build_logit_table(prompts, out.topk_ids, out.topk_logprobs, out.next_logprob, codec)
    batch = decode_logit_table(table, make_metadata(codec))
    np.testing.assert_array_equal(batch.row_offsets, [0, 3, 7])
    np.testing.assert_array_equal(batch.input_ids, [100, 101, 102, 0, 1, 2, 3])
    np.testing.assert_array_equal(batch.topk_logprobs, out.topk_logprobs)


def test_build_logit_table_validates_shapes() -> None:
    codec = get_codec("fp16")
    prompts = make_prompts([3, 2])
    out = make_outputs(5)
    with pytest.raises(ValueError, match=r"topk_ids has shape \(4, 4\), expected \(5, 4\)"):
        build_logit_table(prompts, out.topk_ids[:4], out.topk_logprobs, out.next_logprob, codec)
    with pytest.raises(ValueError, match=r"topk_logprobs has shape \(5, 3\)"):
        build_logit_table(prompts, out.topk_ids, out.topk_logprobs[:, :3], out.next_logprob,
                          codec)  # fmt: skip
    with pytest.raises(ValueError, match=r"next_logprob has shape \(6,\)"):
        build_logit_table(prompts, out.topk_ids, out.topk_logprobs,
                          np.zeros(6, np.float32), codec)  # fmt: skip
    with pytest.raises(ValueError, match="integer"):
        build_logit_table(prompts, out.topk_ids.astype(np.float32), out.topk_logprobs,
                          out.next_logprob, codec)  # fmt: skip
    with pytest.raises(ValueError, match=r"lacks columns \['text'\]"):
        build_logit_table(prompts.drop_columns(["text"]), out.topk_ids, out.topk_logprobs,
                          out.next_logprob, codec)  # fmt: skip
    bad = prompts.set_column(4, "byte_start", pa.array([[0, 1, 2], [0]], pa.list_(pa.int32())))
    with pytest.raises(ValueError, match=r"byte_start length differs .* in row 1"):
        build_logit_table(bad, out.topk_ids, out.topk_logprobs, out.next_logprob, codec)


@pytest.mark.parametrize("name", VALUE_CODECS)
def test_round_trip_through_parquet(tmp_path: Path, name: str) -> None:
    codec = get_codec(name)
    lengths = [5, 1, 7, 3]
    prompts = make_prompts(lengths)
    out = make_outputs(sum(lengths), seed=7)
    out.next_logprob[np.cumsum(lengths) - 1] = np.nan  # last position of each row
    table = build_logit_table(prompts, out.topk_ids, out.topk_logprobs, out.next_logprob, codec)
    fs = fsspec.filesystem("file")
    path = (tmp_path / "data" / shard_name(0, 1)).as_posix()
    f = write_parquet_atomic(fs, path, table, make_metadata(codec))
    assert f.rows == 4 and f.bytes == Path(path).stat().st_size
    encodings = {
        col.path_in_schema: col.encodings
        for col in (pq.read_metadata(path).row_group(0).column(i) for i in range(10))
    }
    if name != "q8":  # float leaves are byte-stream-split, ids keep their dictionary
        assert "BYTE_STREAM_SPLIT" in encodings["topk_logprobs.list.element.list.element"]
    assert "RLE_DICTIONARY" in encodings["topk_ids.list.element.list.element"]
    assert f.sha256 == sha256_file(fs, path)

    back = pq.read_table(path)
    meta = read_metadata(back.schema)
    assert meta == make_metadata(codec)
    batch = decode_logit_table(back, meta)
    assert batch.num_rows == 4 and batch.num_tokens == 16 and batch.k == K
    assert batch.ids == ["r0", "r1", "r2", "r3"]
    np.testing.assert_array_equal(batch.row_offsets, [0, 5, 6, 13, 16])
    np.testing.assert_array_equal(batch.topk_ids, out.topk_ids)
    np.testing.assert_array_equal(batch.prompt_len, [2, 1, 2, 2])
    np.testing.assert_array_equal(batch.next_logprob, out.next_logprob)  # NaN == NaN here
    assert batch.topk_logprobs.dtype == np.float32
    err = np.abs(batch.topk_logprobs - out.topk_logprobs)
    bound = {"fp32": 0.0, "fp16": 2.0**-11 * np.abs(out.topk_logprobs), "q8": 20 / 510 + 1e-6}
    inside = out.topk_logprobs >= -20.0
    assert np.all(err[inside] <= np.broadcast_to(bound[name], err.shape)[inside])
    row = batch.row(2)
    assert row["id"] == "r2" and row["prompt_len"] == 2
    np.testing.assert_array_equal(row["input_ids"], np.arange(200, 207))
    np.testing.assert_array_equal(row["topk_ids"], out.topk_ids[6:13])


def test_parquet_metadata_round_trip(tmp_path: Path) -> None:
    codec = get_codec("q8", min_logprob=-12.0)
    meta = make_metadata(codec).model_copy(update={"extra": {"note": "ünïcode", "n": 3}})
    table = build_logit_table(make_prompts([2]), *vars(make_outputs(2)).values(), codec)
    path = (tmp_path / "s.parquet").as_posix()
    write_parquet_atomic(fsspec.filesystem("file"), path, table, meta)
    footer = pq.read_metadata(path)
    assert METADATA_KEY in footer.metadata
    assert read_metadata(footer) == meta
    assert read_metadata(pq.read_schema(path)) == meta
    assert read_metadata(footer).make_codec() == codec
    assert ShardSetMetadata.from_json_bytes(meta.to_json_bytes()) == meta
    with pytest.raises(ValueError, match="not a logitforge shard"):
        read_metadata(table.schema)
    with pytest.raises(ValueError, match="newer than this logitforge"):
        ShardSetMetadata.model_validate({**meta.model_dump(), "format_version": 99})


def test_write_is_reproducible(tmp_path: Path) -> None:
    codec = get_codec("fp16")
    table = build_logit_table(make_prompts([3, 4]), *vars(make_outputs(7)).values(), codec)
    fs = fsspec.filesystem("file")
    path = (tmp_path / "a.parquet").as_posix()
    first = write_parquet_atomic(fs, path, table, make_metadata(codec))
    second = write_parquet_atomic(fs, path, table, make_metadata(codec))
    assert first == second


# ---------------------------------------------------------------- atomicity


def test_failed_rename_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    codec = get_codec("fp16")
    table = build_logit_table(make_prompts([3]), *vars(make_outputs(3)).values(), codec)
    fs = fsspec.filesystem("file")
    folder = tmp_path / "data"
    path = (folder / shard_name(0, 2)).as_posix()

    def boom(*args, **kwargs):
        raise OSError("disk vanished")

    monkeypatch.setattr(fs, "mv", boom)
    with pytest.raises(OSError, match="disk vanished"):
        write_parquet_atomic(fs, path, table, make_metadata(codec))
    assert list(folder.iterdir()) == []  # neither final file nor temp

    # A previous good shard survives a failed rewrite untouched.
    monkeypatch.undo()
    good = write_parquet_atomic(fs, path, table, make_metadata(codec))
    monkeypatch.setattr(fs, "mv", boom)
    other = build_logit_table(make_prompts([5]), *vars(make_outputs(5)).values(), codec)
    with pytest.raises(OSError):
        write_parquet_atomic(fs, path, other, make_metadata(codec))
    assert sorted(p.name for p in folder.iterdir()) == [shard_name(0, 2)]
    assert sha256_file(fs, path) == good.sha256


def test_stale_temps_removed_and_never_globbed(tmp_path: Path) -> None:
    layout = ShardSetLayout.from_url(str(tmp_path))
    layout.ensure_dirs()
    path = layout.data_path(0, 1)
    stale = Path(layout.data_dir) / f".{shard_name(0, 1)}.tmp-deadbeef"
    stale.write_bytes(b"half a shard")
    assert layout.fs.glob(layout.shard_glob()) == []  # a temp is never mistaken for data
    codec = get_codec("fp16")
    table = build_logit_table(make_prompts([2]), *vars(make_outputs(2)).values(), codec)
    write_parquet_atomic(layout.fs, path, table, make_metadata(codec))
    assert not stale.exists()
    assert layout.fs.glob(layout.shard_glob()) == [path]


# ---------------------------------------------------------------- plan, records, verification


def test_plan_and_done_json_round_trip(tmp_path: Path) -> None:
    layout = ShardSetLayout.from_url(str(tmp_path))
    assert read_plan(layout) is None
    assert read_done(layout, 0) is None
    plan = Plan(fingerprint="f1", created_at=utc_now(), config={"k": 4, "nested": {"a": [1]}},
                input_fingerprint="i", num_rows=10, num_shards=2,
                shards=[ShardPlan(index=0, name=shard_name(0, 2), row_start=0, row_stop=6),
                        ShardPlan(index=1, name=shard_name(1, 2), row_start=6, row_stop=10,
                                  prompts_sha256="ab")],
                skipped={"empty_text": 2})  # fmt: skip
    write_plan(layout, plan)
    assert read_plan(layout) == plan
    assert plan.shard(1).num_rows == 4
    rec = DoneRecord(shard=shard_name(1, 2), index=1, rows=4, tokens=99, bytes=10, sha256="00",
                     plan_fingerprint="f1", timings={"teacher": 1.25}, finished_at=utc_now(),
                     worker="tcp://w1")  # fmt: skip
    write_done(layout, rec)
    assert read_done(layout, 1) == rec
    remove_done(layout, 1)
    assert read_done(layout, 1) is None
    remove_done(layout, 1)  # idempotent
    with pytest.raises(ValueError, match="lists 1 shards, num_shards=2"):
        Plan.model_validate({**plan.model_dump(), "shards": plan.model_dump()["shards"][:1]})


def test_verify_shard_detects_damage(tmp_path: Path) -> None:
    layout, plan, _ = write_shard_set(str(tmp_path / "out"), [[3, 4], [2]], card=False)
    assert verify_shard(layout, plan, 0) == (True, "ok")
    assert verify_shard(layout, plan, 1) == (True, "ok")
    assert verify_shard(layout, plan, 2)[0] is False

    data = Path(layout.data_path(0, 2))
    original = data.read_bytes()
    data.write_bytes(original[:-10])  # truncated
    ok, why = verify_shard(layout, plan, 0)
    assert not ok and "size mismatch" in why
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01  # same size, one bit off
    data.write_bytes(bytes(flipped))
    assert verify_shard(layout, plan, 0) == (False, "sha256 mismatch: shard corrupted or truncated")
    assert verify_shard(layout, plan, 0, check_sha256=False) == (True, "ok")
    data.unlink()
    assert verify_shard(layout, plan, 0) == (False, "data file missing")

    Path(layout.done_path(1)).write_text("{not json")
    assert read_done(layout, 1) is None
    assert verify_shard(layout, plan, 1) == (False, "completion record unreadable")
    remove_done(layout, 1)
    assert verify_shard(layout, plan, 1) == (False, "no completion record")

    other = plan.model_copy(update={"fingerprint": "another"})
    assert verify_shard(layout, plan, 1)[0] is False
    layout2, plan2, _ = write_shard_set(str(tmp_path / "out2"), [[2]], card=False)
    assert verify_shard(layout2, plan2, 0) == (True, "ok")
    ok, why = verify_shard(
        layout2, other.model_copy(update={"shards": plan2.shards, "num_shards": 1}), 0
    )
    assert not ok and why.startswith("plan fingerprint differs")


def test_a_recomputed_task_finds_the_record_an_earlier_attempt_wrote(tmp_path: Path) -> None:
    """A task recomputed after its worker was lost (the scheduler lost the result, not the
    shard) returns the record on storage; anything less than a whole shard of its own plan is
    redone."""
    from stages.shard_task import ShardTask, finished_earlier

    url = str(tmp_path / "out")
    layout, plan, _ = write_shard_set(url, [[3, 4], [2]], card=False)

    def task(index: int, fingerprint: str = plan.fingerprint) -> ShardTask:
        return ShardTask(output_url=url, index=index, num_shards=2, plan_fingerprint=fingerprint,
                         prompts_sha256=None, metadata={})  # fmt: skip

    assert finished_earlier(task(1)) == read_done(layout, 1)
    assert finished_earlier(task(1, fingerprint="another plan")) is None
    data = Path(layout.data_path(0, 2))
    data.write_bytes(data.read_bytes()[:-10])  # the attempt died mid-write (not atomic storage)
    assert finished_earlier(task(0)) is None
    data.unlink()
    assert finished_earlier(task(0)) is None
    remove_done(layout, 1)
    assert finished_earlier(task(1)) is None


# ---------------------------------------------------------------- readers


def test_shard_set_reader(tmp_path: Path) -> None:
    url = str(tmp_path / "out")
    layout, _, outputs = write_shard_set(url, [[3, 4], [2], [5, 1, 1]])
    shards = ShardSet.open(url)
    assert shards.metadata == make_metadata(get_codec("fp16"))
    assert len(shards.shard_paths(strict=True)) == 3
    batches = list(shards.iter_batches())
    assert [b.num_rows for b in batches] == [2, 1, 3]
    np.testing.assert_array_equal(batches[2].topk_ids, outputs[2].topk_ids)
    full = shards.to_batch()
    assert full.num_rows == 6 and full.num_tokens == 16
    np.testing.assert_array_equal(full.row_offsets, [0, 3, 7, 9, 14, 15, 16])
    assert full.ids[3] == "s2-0"
    assert shards.read_table().num_rows == 6

    # A missing record: the shard does not exist for readers; strict mode names it.
    record = read_done(layout, 1)
    remove_done(layout, 1)
    assert shards.shard_paths() == [layout.data_path(0, 3), layout.data_path(2, 3)]
    with pytest.raises(IncompleteShardSetError, match=r"train-00001-of-00003.parquet: no comp"):
        shards.shard_paths(strict=True)
    assert [b.num_rows for b in shards.iter_batches()] == [2, 3]

    # Same-size corruption is caught when the bytes are read, not silently decoded.
    data = Path(layout.data_path(2, 3))
    flipped = bytearray(data.read_bytes())
    flipped[100] ^= 0xFF
    data.write_bytes(bytes(flipped))
    with pytest.warns(RuntimeWarning, match="skipping shard"):
        assert [b.num_rows for b in shards.iter_batches()] == [2]
    assert shards.shard_paths() == [layout.data_path(0, 3)]
    write_done(layout, record)
    with pytest.raises(ShardCorruptedError, match="sha256 mismatch"):
        list(shards.iter_batches(strict=True))


def test_open_requires_plan(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no \.logitforge/plan\.json"):
        ShardSet.open(str(tmp_path))


def test_memory_filesystem_end_to_end() -> None:
    url = f"memory://logitforge-test-{uuid.uuid4().hex}/out"
    codec = get_codec("q8")
    layout, plan, outputs = write_shard_set(url, [[2, 2], [3]], codec=codec)
    try:
        assert all(verify_shard(layout, plan, i)[0] for i in range(2))
        shards = ShardSet.open(url)
        assert shards.metadata.codec == "q8"
        batch = shards.to_batch(strict=True)
        assert batch.num_tokens == 7
        np.testing.assert_array_equal(batch.topk_ids[4:], outputs[1].topk_ids)
        assert read_card_metadata(layout)["codec"] == "q8"
        assert not any(".tmp-" in p for p in layout.fs.find(layout.root))
    finally:
        layout.fs.rm(layout.root, recursive=True)


def test_card_front_matter(tmp_path: Path) -> None:
    layout, _, _ = write_shard_set(str(tmp_path / "out"), [[2]])
    text = Path(layout.card_path()).read_text()
    assert text.startswith("---\n")
    assert "path: data/train-*.parquet" in text and "config_name: default" in text
    assert "| `topk_logprobs` | `list<fixed_size_list<halffloat, 4>>` | [n, 4] |" in text
    meta = read_card_metadata(layout)
    assert ShardSetMetadata.model_validate(meta) == make_metadata(get_codec("fp16"))
    assert read_card_metadata(ShardSetLayout.from_url(str(tmp_path / "nothing"))) is None


@pytest.mark.parametrize("name", VALUE_CODECS)
def test_datasets_loads_shard_set(tmp_path: Path, monkeypatch, name: str) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "out"
    codec = get_codec(name)
    _, _, outputs = write_shard_set(str(out), [[3, 4], [2], [5]], codec=codec)
    ds = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert list(ds) == ["train"]
    train = ds["train"]
    assert train.num_rows == 4  # the prompt copies under .logitforge/ are not data
    assert train.column_names == logit_schema(codec, K).names
    feat = train.features["topk_logprobs"]  # fixed_size_list survives as List(length=K)
    assert feat.feature.length == K
    assert feat.feature.feature.dtype == {"fp32": "float32", "fp16": "float16", "q8": "uint8"}[name]
    row = train.with_format("numpy")[1]
    assert row["topk_ids"].shape == (4, K)
    np.testing.assert_array_equal(row["topk_ids"], outputs[0].topk_ids[3:7])
    np.testing.assert_array_equal(
        codec.decode(row["topk_logprobs"]),
        codec.decode(codec.encode(outputs[0].topk_logprobs[3:7])),
    )


def test_logit_batch_take_and_concat_select_whole_rows() -> None:
    from storage.reader import LogitBatch, ragged_gather

    positions, offsets = ragged_gather(np.array([5, 0, 2]), np.array([2, 0, 3]))
    assert positions.tolist() == [5, 6, 2, 3, 4] and offsets.tolist() == [0, 2, 2, 5]
    n = 9
    batch = LogitBatch(
        ids=["a", "b", "c"],
        row_offsets=np.array([0, 2, 5, 9]),
        input_ids=np.arange(n, dtype=np.int32),
        prompt_len=np.array([1, 2, 3], dtype=np.int32),
        topk_ids=np.arange(2 * n, dtype=np.int32).reshape(n, 2),
        topk_logprobs=-np.arange(2 * n, dtype=np.float32).reshape(n, 2),
        next_logprob=np.arange(n, dtype=np.float32),
    )
    picked = batch.take(np.array([2, 0, 2]))
    assert picked.ids == ["c", "a", "c"] and picked.row_offsets.tolist() == [0, 4, 6, 10]
    for i, src in enumerate([2, 0, 2]):
        for key, value in picked.row(i).items():
            np.testing.assert_array_equal(value, batch.row(src)[key], err_msg=key)
    both = LogitBatch.concat([batch.take(np.array([1])), batch.take(np.array([0, 2]))])
    assert both.ids == ["b", "a", "c"] and both.row_offsets.tolist() == [0, 3, 5, 9]
    np.testing.assert_array_equal(both.topk_ids, batch.take(np.array([1, 0, 2])).topk_ids)
