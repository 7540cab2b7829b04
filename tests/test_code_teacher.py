"""The code teacher's build (`pipeline.demo.code_teacher`) on a tiny spec: caching,
determinism, the tokenizer, the held-out prompts and the distribution statistics."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.demo.build import ModelSpec
from pipeline.demo.code_teacher import (
    DEFAULT_SPEC,
    CodeSpec,
    build_code_teacher,
    code_prompts,
    load_corpus,
    next_token_stats,
    summary_line,
)

# Head size 32 (vLLM-CPU accepts it), a 1,000-token vocabulary from the first 12 training
# files, 30 steps: a few seconds.
TINY = CodeSpec(
    model=ModelSpec(
        hidden_size=64,
        num_layers=1,
        num_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    ),
    vocab_size=1000,
    window=64,
    steps=30,
    batch_size=8,
    lr=1e-2,
    warmup_steps=3,
    max_train_files=12,
    n_eval_windows=8,
)
STAT_KEYS = {
    "top1_prob",
    "entropy_nats",
    "top64_mass",
    "frac_top1_gt_0.9",
    "top1_acc",
    "loss",
    "perplexity",
    "positions",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("code") / "tiny"
    return out, build_code_teacher(out, spec=TINY, log=lambda _: None)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_rebuild_is_a_noop_and_a_changed_spec_rebuilds(tiny: tuple[Path, dict]) -> None:
    out, record = tiny
    assert record["cached"] is False
    corpus = load_corpus(TINY)
    assert record["build_fingerprint"] == TINY.fingerprint(corpus.hash)
    assert record["corpus"]["n_train_files"] == 12 and record["steps"] == 30
    before = _mtimes(out)

    start = time.perf_counter()
    again = build_code_teacher(out, spec=TINY, log=lambda _: None)
    assert time.perf_counter() - start < 2.0
    assert again["cached"] is True and again["build_fingerprint"] == record["build_fingerprint"]
    assert _mtimes(out) == before
    assert "cached" in summary_line(again, out)

    # Determinism: the same spec in another folder gives the same bytes.
    twin = out.parent / "twin"
    build_code_teacher(twin, spec=TINY, log=lambda _: None)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (twin / name).read_bytes() == (out / name).read_bytes(), name

    changed = build_code_teacher(twin, spec=replace(TINY, steps=31), log=lambda _: None)
    assert changed["cached"] is False
    assert changed["build_fingerprint"] != record["build_fingerprint"]
    assert json.loads((twin / "build.json").read_text())["steps"] == 31
    assert (twin / "model.safetensors").read_bytes() != (out / "model.safetensors").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny", "twin"]  # no temp folders


def test_fingerprint_tracks_the_corpus() -> None:
    assert TINY.fingerprint("a") == replace(TINY).fingerprint("a")
    assert TINY.fingerprint("a") != TINY.fingerprint("b")
    assert load_corpus(TINY).hash != load_corpus(replace(TINY, max_train_files=11)).hash


def test_saved_model_and_tokenizer(tiny: tuple[Path, dict]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, record = tiny
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(tok) == TINY.vocab_size == model.config.vocab_size == record["model"]["vocab_size"]
    assert model.config.head_dim == 32 and model.config.tie_word_embeddings
    assert tok("x = 1")["input_ids"][0] == tok.bos_token_id

    texts = [
        code_prompts(1, seed=3)[0]["text"],
        "def f(x):\r\n\treturn x  # trailing   \n\n\n",
        "naïve café 日本語 🐍 \x00\x7f ﬁ  ",
    ]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < TINY.vocab_size
        assert tok.decode(ids) == text


def test_trained_model_is_more_peaked_than_random_init(tiny: tuple[Path, dict]) -> None:
    _, record = tiny
    trained, random_init = record["heldout"]["trained"], record["heldout"]["random_init"]
    assert set(trained) == set(random_init) == STAT_KEYS
    assert trained["positions"] == TINY.n_eval_windows * (TINY.window - 1)
    # Random weights are near-uniform over the vocabulary; training makes them peaked.
    assert random_init["entropy_nats"] > 0.95 * math.log(TINY.vocab_size)
    assert trained["entropy_nats"] < random_init["entropy_nats"] - 1.0
    assert trained["top1_prob"] > 2 * random_init["top1_prob"]
    assert trained["top64_mass"] > random_init["top64_mass"]
    assert trained["loss"] < random_init["loss"] - 1.0
    assert trained["perplexity"] == pytest.approx(math.exp(trained["loss"]), rel=1e-3)


def test_next_token_stats_on_known_distributions() -> None:
    """One fixed distribution at every position: every statistic has a closed form."""
    import torch

    vocab, top = 100, 0.95
    probs = torch.full((vocab,), (1 - top) / (vocab - 1))
    probs[7] = top

    class Fixed(torch.nn.Module):
        def eval(self) -> Fixed:
            return self

        def forward(self, input_ids: torch.Tensor):
            logits = probs.log().expand(*input_ids.shape, vocab)
            return type("Out", (), {"logits": logits})()

    rows = np.full((5, 9), 7, dtype=np.int64)
    rows[:, ::2] = 3  # half the targets are the top token, half a tail token
    stats = next_token_stats(Fixed(), rows, batch_size=2)
    entropy = float(-(probs * probs.log()).sum())
    assert stats["positions"] == 5 * 8
    assert stats["top1_prob"] == pytest.approx(top, abs=1e-5)
    assert stats["entropy_nats"] == pytest.approx(entropy, abs=1e-5)
    assert stats["top64_mass"] == pytest.approx(top + 63 * (1 - top) / (vocab - 1), abs=1e-5)
    assert stats["frac_top1_gt_0.9"] == 1.0
    assert stats["top1_acc"] == 0.5
    nll = 0.5 * (-math.log(top)) + 0.5 * (-math.log((1 - top) / (vocab - 1)))
    assert stats["loss"] == pytest.approx(nll, abs=1e-5)


def test_code_prompts_are_deterministic_and_held_out() -> None:
    rows = code_prompts(20, seed=0, max_chars=800)
    assert rows == code_prompts(20, seed=0, max_chars=800)
    assert rows != code_prompts(20, seed=1, max_chars=800)
    assert len({r["id"] for r in rows}) == 20
    corpus = load_corpus(DEFAULT_SPEC)
    heldout, train = dict(corpus.heldout), dict(corpus.train)
    assert heldout and not heldout.keys() & train.keys()
    train_text = "\0".join(train.values())
    for row in rows:
        path = row["id"].rsplit(":L", 1)[0]
        assert path in heldout and path not in train
        assert 200 <= len(row["text"]) <= 800 and row["text"] in heldout[path]
        assert row["text"] not in train_text
    with pytest.raises(ValueError, match="heldout files give"):
        code_prompts(10**6)


def test_familiar_prompts_come_from_the_focus_files() -> None:
    rows = code_prompts(20, seed=0, max_chars=800, split="familiar")
    corpus = load_corpus(DEFAULT_SPEC)
    focused = dict(corpus.train[: DEFAULT_SPEC.focus_files])
    for row in rows:
        path = row["id"].rsplit(":L", 1)[0]
        assert path in focused and row["text"] in focused[path]
    train = dict(corpus.train)
    for row in code_prompts(20, seed=0, max_chars=800, split="train"):
        path = row["id"].rsplit(":L", 1)[0]
        assert path in train and row["text"] in train[path]
    with pytest.raises(ValueError, match="split must be"):
        code_prompts(1, split="test")
