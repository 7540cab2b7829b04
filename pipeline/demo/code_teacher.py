"""Build a second local teacher: a small Llama with a 32,000-token vocabulary, trained on code.

Why: the embedded arithmetic teacher (`pipeline.demo.build`) has a ~300-token vocabulary, so
it cannot tell how a logit-compression codec behaves on a real LM's vocabulary (ids that need
15 bits, long heavy tails of small probabilities). Nothing can be downloaded where logitforge
is developed, so this teacher is built here too, from text every machine already has: the
Python standard library of the running interpreter (its own sources, minus tests and
generated tables). The same Python minor version gives the same corpus on any machine; the
corpus hash is part of the build fingerprint all the same.

The model need not be good, only realistic in shape. A few minutes of CPU cannot teach a
32k-vocabulary model the whole stdlib (on unseen files it stays near a unigram model: entropy
~6 nats against ~1-3 for a real LM), so the training windows come from a *focus* set of
training files, seen several times: on that familiar text (`code_prompts(split="familiar")`,
the text a codec benchmark caches) its distributions are peaked and heavy-tailed the way a
real model's are on text like its training data, which is what a distillation cache usually
holds. The build records both, next to the random-init model of the same shape
(near-uniform). The build follows `pipeline.demo.build`: the spec's hash (with the corpus
hash) is the fingerprint, so a rerun is a no-op and any change rebuilds; the folder is
written elsewhere and renamed into place.

    python -m pipeline.demo.code_teacher [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.demo.build import ModelSpec, _resolve, read_build, train_ce, write_build
from pipeline.demo.tokenizers import byte_level_bpe

DEFAULT_CODE_TEACHER_DIR = Path("artifacts/models/code-teacher-32k")

# Bump when the recipe changes in a way the spec does not capture.
RECIPE_VERSION = 2  # 2: training windows from the focus files

# Test suites, IDLE's tests, installed packages and generated tables (the codec tables under
# encodings/, pydoc's topic dump) are not the code a code model should learn from.
SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "encodings",
        "pydoc_data",
    }
)

Log = Callable[[str], None]


@dataclass(frozen=True)
class CodeSpec:
    """Everything that determines the built model; its hash (with the corpus's) is the
    build fingerprint."""

    model: ModelSpec = field(
        default_factory=lambda: ModelSpec(
            hidden_size=256,
            num_layers=2,
            num_heads=4,  # head size 64: one of the two vLLM's CPU backend accepts
            intermediate_size=688,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        )
    )
    vocab_size: int = 32000  # exact: the build fails if the corpus offers fewer merges
    window: int = 256  # tokens per training row
    steps: int = 600
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    # Corpus: files over max_file_bytes are skipped (generated code); a file is held out
    # when the hash of its path is 0 modulo heldout_mod; max_train_files keeps only the
    # first training files (sorted paths), for tiny test builds.
    max_file_bytes: int = 256_000
    heldout_mod: int = 10
    max_train_files: int | None = None
    # Training windows come from the first focus_files training files only (the tokenizer
    # still learns from all of them): ~170k tokens seen ~7 times in 600 steps.
    focus_files: int | None = 24
    n_eval_windows: int = 32  # held-out windows the distribution statistics are taken on
    eval_batch_size: int = 4

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self, corpus_hash: str) -> str:
        payload = json.dumps(
            {"recipe": RECIPE_VERSION, "corpus": corpus_hash, **self.to_dict()}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


DEFAULT_SPEC = CodeSpec()


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    """The stdlib sources split into training and held-out files, as (path, text) pairs."""

    train: list[tuple[str, str]]
    heldout: list[tuple[str, str]]
    hash: str  # of every path and text in both splits

    def summary(self) -> dict[str, Any]:
        return {
            "source": "python-stdlib",
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "n_train_files": len(self.train),
            "n_heldout_files": len(self.heldout),
            "train_chars": sum(len(t) for _, t in self.train),
            "heldout_chars": sum(len(t) for _, t in self.heldout),
            "corpus_hash": self.hash,
        }


@lru_cache(maxsize=4)
def stdlib_sources(max_file_bytes: int) -> tuple[tuple[str, str], ...]:
    """Every usable ``*.py`` of the interpreter's stdlib as (relative path, text), sorted.

    Skips SKIP_DIRS, files over ``max_file_bytes``, blank files and exact duplicates (the
    first path keeps the text), so no text is both trained on and held out.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    files = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or path.stat().st_size > max_file_bytes:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        digest = hashlib.sha256(text.encode()).hexdigest()
        if not text.strip() or digest in seen:
            continue
        seen.add(digest)
        files.append((rel.as_posix(), text))
    return tuple(files)


def is_heldout(path: str, heldout_mod: int) -> bool:
    """Held out by a hash of the path: stable whatever else the stdlib holds."""
    return int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) % heldout_mod == 0


def load_corpus(spec: CodeSpec) -> Corpus:
    files = stdlib_sources(spec.max_file_bytes)
    heldout = [f for f in files if is_heldout(f[0], spec.heldout_mod)]
    train = [f for f in files if not is_heldout(f[0], spec.heldout_mod)]
    if spec.max_train_files is not None:
        train = train[: spec.max_train_files]
    h = hashlib.sha256()
    for split, rows in (("train", train), ("heldout", heldout)):
        for path, text in rows:
            h.update(f"{split}\0{path}\0".encode() + text.encode() + b"\0")
    return Corpus(train=train, heldout=heldout, hash=h.hexdigest()[:16])


def focus(spec: CodeSpec, corpus: Corpus) -> list[tuple[str, str]]:
    """The training files the model's windows come from (all of them without a focus)."""
    return corpus.train if spec.focus_files is None else corpus.train[: spec.focus_files]


SPLITS = ("train", "heldout", "familiar")


def split_files(corpus: Corpus, split: str) -> list[tuple[str, str]]:
    """The (path, text) files of one split of the default spec's corpus."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "familiar":
        return focus(DEFAULT_SPEC, corpus)
    return corpus.train if split == "train" else corpus.heldout


def code_prompts(
    n: int, seed: int = 0, max_chars: int = 1000, split: str = "heldout"
) -> list[dict]:
    """``n`` code chunks as rows ``{"id": "path:Lline", "text": ...}``.

    ``split="heldout"``: from the default spec's held-out files (never trained on);
    ``"familiar"``: from its focus files (trained on), text the model knows, as a teacher
    knows text like its training data; ``"train"``: from every training file. Chunks are
    runs of whole lines, at most ``max_chars`` long and at least a quarter of it; the choice
    is a seeded draw without replacement.
    """
    corpus = load_corpus(DEFAULT_SPEC)
    files = split_files(corpus, split)
    chunks: list[dict] = []
    for path, text in files:
        lines = text.splitlines(keepends=True)

        def emit(first: int, end: int, path: str = path, lines: list[str] = lines) -> None:
            body = "".join(lines[first:end])
            if len(body) >= max_chars // 4 and body.strip():
                chunks.append({"id": f"{path}:L{first + 1}", "text": body})

        first, size = 0, 0
        for i, line in enumerate(lines):  # a loop over the lines of ~1 MB: not a hot path
            if size + len(line) > max_chars:
                emit(first, i)
                first, size = i, 0
                if len(line) > max_chars:  # a line too long for any chunk: skip it
                    first = i + 1
                    continue
            size += len(line)
        emit(first, len(lines))
    if n > len(chunks):
        raise ValueError(f"asked for {n} code prompts; the {split} files give {len(chunks)}")
    pick = np.random.default_rng(seed).choice(len(chunks), size=n, replace=False)
    return [chunks[i] for i in pick]


# --------------------------------------------------------------------------- tokens


def train_tokenizer(spec: CodeSpec, corpus: Corpus) -> Any:
    """Byte-level BPE over the training files (any UTF-8 round-trips: all 256 bytes are in)."""
    tokenizer = byte_level_bpe(
        (text for _, text in corpus.train),
        spec.vocab_size,
        model_max_length=spec.model.max_position_embeddings,
    )
    if len(tokenizer) != spec.vocab_size:
        raise ValueError(
            f"the corpus gave a {len(tokenizer)}-token vocabulary, not {spec.vocab_size}"
        )
    return tokenizer


def token_stream(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """All texts as one id stream, each file as ``<s> ids </s>`` (GPT-style packing)."""
    enc = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    bos = np.array([tokenizer.bos_token_id], dtype=np.int64)
    eos = np.array([tokenizer.eos_token_id], dtype=np.int64)
    parts = [a for e in enc for a in (bos, np.asarray(e.ids, dtype=np.int64), eos)]
    return np.concatenate(parts)


def windows(stream: np.ndarray, width: int, count: int, seed: int) -> np.ndarray:
    """``count`` non-overlapping windows [count, width] of ``stream`` in a seeded order,
    cycling through fresh permutations when ``count`` exceeds the windows available."""
    available = stream[: len(stream) // width * width].reshape(-1, width)
    if len(available) == 0:
        raise ValueError(f"a {len(stream)}-token stream has no {width}-token window")
    rng = np.random.default_rng(seed)
    rounds = -(-count // len(available))
    order = np.concatenate([rng.permutation(len(available)) for _ in range(rounds)])
    return available[order[:count]]


# --------------------------------------------------------------------------- stats


def next_token_stats(model: Any, rows: np.ndarray, batch_size: int = 4) -> dict[str, float]:
    """Shape of the model's next-token distributions at T=1 over every position of ``rows``.

    Mean top-1 probability, entropy (nats), top-64 mass, the fraction of positions whose top-1
    exceeds 0.9, top-1 accuracy and the loss/perplexity of the actual next tokens: what a
    logit codec's bytes/token and KL depend on. Whole batches at once, no per-token loop.
    """
    import torch

    sums = torch.zeros(6, dtype=torch.float64)
    model.eval()
    for start in range(0, len(rows), batch_size):
        ids = torch.from_numpy(rows[start : start + batch_size]).long()
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
        p = logp.exp()
        top1, arg = p.max(dim=-1)
        target = ids[:, 1:]
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        sums += torch.stack(
            [
                top1.sum(),
                -(p * logp).sum(-1).sum(),
                p.topk(min(64, p.shape[-1]), dim=-1).values.sum(-1).sum(),
                (top1 > 0.9).sum(),
                (arg == target).sum(),
                nll.sum(),
            ]
        ).double()
    n = rows.shape[0] * (rows.shape[1] - 1)
    mean = (sums / n).tolist()
    keys = ("top1_prob", "entropy_nats", "top64_mass", "frac_top1_gt_0.9", "top1_acc", "loss")
    stats = {k: round(v, 5) for k, v in zip(keys, mean, strict=True)}
    stats["perplexity"] = round(float(np.exp(mean[-1])), 3)
    stats["positions"] = n
    return stats


# --------------------------------------------------------------------------- build


def train(spec: CodeSpec, model: Any, tokenizer: Any, rows: np.ndarray, log: Log) -> float:
    """Exactly spec.steps AdamW steps (warm-up, cosine) of next-token CE on ``rows``, through
    the student stage's trainer; returns the mean loss of the last 10% of steps."""
    from stages.train.loader import RowsDataset, token_rows

    lengths = np.full(len(rows), rows.shape[1], dtype=np.int64)
    dataset = RowsDataset(
        token_rows(rows, lengths, np.zeros(len(rows), dtype=np.int64)),
        batch_size=spec.batch_size,
        pad_id=tokenizer.pad_token_id,
        include_prompt=True,  # every position is trained: there is no prompt
    )
    return train_ce(model, dataset, spec, log)


def build_code_teacher(
    out: Path = DEFAULT_CODE_TEACHER_DIR,
    force: bool = False,
    spec: CodeSpec = DEFAULT_SPEC,
    log: Log = print,
) -> dict:
    """Build (or reuse) the code teacher of ``spec`` in ``out``; returns the build record.

    Relative ``out`` paths resolve against the repository root. The cache check reads the
    corpus (a fraction of a second) but imports no torch.
    """
    out = _resolve(out)
    corpus = load_corpus(spec)
    fingerprint = spec.fingerprint(corpus.hash)
    cached = read_build(out)
    if not force and cached and cached.get("build_fingerprint") == fingerprint:
        return {**cached, "cached": True}

    import torch

    from stages.train.options import StudentArch
    from stages.train.student import build_llama

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the reference machine's core count; also pins the numerics
    try:
        t0 = time.perf_counter()
        tokenizer = train_tokenizer(spec, corpus)
        log(f"  tokenizer: {len(tokenizer)} tokens in {time.perf_counter() - t0:.1f}s")
        train_stream = token_stream(tokenizer, [t for _, t in corpus.train])
        focus_stream = token_stream(tokenizer, [t for _, t in focus(spec, corpus)])
        heldout_stream = token_stream(tokenizer, [t for _, t in corpus.heldout])
        train_rows = windows(focus_stream, spec.window, spec.steps * spec.batch_size, spec.seed)
        eval_rows = windows(heldout_stream, spec.window, spec.n_eval_windows, spec.seed + 1)
        familiar_rows = windows(focus_stream, spec.window, spec.n_eval_windows, spec.seed + 2)
        model = build_llama(StudentArch(**asdict(spec.model)), tokenizer, spec.seed)
        random_init = next_token_stats(model, eval_rows, spec.eval_batch_size)
        log(f"  random init: {_stats_text(random_init)}")
        t1 = time.perf_counter()
        train_loss = train(spec, model, tokenizer, train_rows, log)
        train_seconds = time.perf_counter() - t1
        trained = next_token_stats(model, eval_rows, spec.eval_batch_size)
        familiar = next_token_stats(model, familiar_rows, spec.eval_batch_size)
        log(f"  trained, familiar text: {_stats_text(familiar)}")
        build_seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)

    corpus_info = corpus.summary()
    record = {
        "build_fingerprint": fingerprint,
        "recipe_version": RECIPE_VERSION,
        "spec": spec.to_dict(),
        "corpus": {
            **corpus_info,
            "train_tokens": len(train_stream),
            "focus_tokens": len(focus_stream),
            "heldout_tokens": len(heldout_stream),
            "train_chars_per_token": round(corpus_info["train_chars"] / len(train_stream), 3),
        },
        "tokenizer": {
            "kind": "byte-level BPE",
            "vocab_size": len(tokenizer),
            "sha256": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        },
        "model": {
            "architecture": "LlamaForCausalLM",
            **asdict(spec.model),
            "head_dim": spec.model.head_dim,
            "vocab_size": int(model.config.vocab_size),
            "dtype": "float32",
        },
        "params": sum(p.numel() for p in model.parameters()),
        "steps": spec.steps,
        "tokens_trained": spec.steps * spec.batch_size * (spec.window - 1),
        "seed": spec.seed,
        "train_seconds": round(train_seconds, 2),
        "build_seconds": round(build_seconds, 2),
        "final_train_loss": round(train_loss, 5),
        "heldout": {"trained": trained, "random_init": random_init},
        "familiar": {"trained": familiar},
    }
    write_build(out, model, tokenizer, record)
    return {**record, "cached": False}


def _stats_text(s: dict) -> str:
    return (
        f"loss {s['loss']:.3f} (ppl {s['perplexity']:.1f}), top-1 p {s['top1_prob']:.3f}, "
        f"entropy {s['entropy_nats']:.2f} nats, top-64 mass {s['top64_mass']:.3f}, "
        f"top-1>0.9 {s['frac_top1_gt_0.9']:.3f}"
    )


def summary_line(record: dict, out: Path) -> str:
    state = "cached" if record.get("cached") else f"built in {record['build_seconds']:.0f}s"
    held = record["heldout"]
    return (
        f"code teacher ({record['params'] / 1e6:.2f}M params, vocab "
        f"{record['model']['vocab_size']}, {record['steps']} steps, {state}) at {out}: "
        f"familiar text {_stats_text(record['familiar']['trained'])}; held-out "
        f"{_stats_text(held['trained'])}; random init {_stats_text(held['random_init'])}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.demo.code_teacher", description=__doc__
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_CODE_TEACHER_DIR)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    record = build_code_teacher(args.out, force=args.force)
    print(summary_line(record, _resolve(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
