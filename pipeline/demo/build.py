"""Build the embedded default teacher: a local tokenizer and a small Llama trained on the task.

Why: nothing can be downloaded on the machines logitforge is developed and tested on, yet
`make cache-teacher` and the tests need a real teacher whose distributions are peaked like a
trained LM's (random-init models are near-uniform and hide every capture error). So the
project builds one itself, once, deterministically from a seed, and caches it.

The recipe (a fixed number of AdamW steps with warm-up and cosine decay, loss on completion
tokens plus eos) is the whole build spec; its hash is the build fingerprint, so a rerun with
the same spec is a no-op and any change rebuilds. The model is written to a temporary
folder and renamed into place, so an interrupted build never leaves a half model behind.

    python -m pipeline.demo.build [--out DIR] [--steps N] [--force] [--baseline]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.demo.task import DEFAULT_TASK, TaskSpec, generate, is_correct

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEACHER_DIR = Path("artifacts/models/arith-teacher")
DEFAULT_BASELINE_DIR = Path("artifacts/models/arith-baseline")

# Bump when the recipe changes in a way the spec does not capture (new data layout, ...).
# 2: trained by the student stage's Trainer (one training path for teacher and students).
RECIPE_VERSION = 2

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    """Llama shape. head_dim = hidden_size / num_heads must be one vLLM's CPU backend accepts."""

    hidden_size: int = 192
    num_layers: int = 3
    num_heads: int = 3
    intermediate_size: int = 576
    max_position_embeddings: int = 64
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class BuildSpec:
    """Everything that determines the built model; its hash is the build fingerprint."""

    task: TaskSpec = DEFAULT_TASK
    model: ModelSpec = field(default_factory=ModelSpec)
    vocab_size: int = 320  # upper bound: 256 bytes + specials + the merges the corpus offers
    steps: int = 1100
    batch_size: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # Measured (0.12 M model, 800 steps): completion-only 0.74 exact match, all tokens 0.00;
    # the random prompt digits are unpredictable and swamp the signal.
    loss_on: Literal["completion", "all"] = "completion"
    seed: int = 0
    n_eval: int = 512

    def to_dict(self) -> dict:
        d = asdict(self)
        d["task"] = self.task.to_dict()
        return d

    def fingerprint(self) -> str:
        payload = json.dumps({"recipe": RECIPE_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


DEFAULT_SPEC = BuildSpec()
# Same recipe and step count, a model ~12x smaller: what a small model reaches on its own.
BASELINE_SPEC = replace(
    DEFAULT_SPEC,
    model=ModelSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192),
)


# --------------------------------------------------------------------------- tokenizer


def _tokenizer_corpus(task: TaskSpec, seed: int) -> list[str]:
    """Task text in plain and chat form, so role markers get merges and digits stay single."""
    rows = generate(task, 2000, "train", seed)
    plain = [r["prompt"] + r["completion"] for r in rows]
    # Special tokens are matched before BPE at encode time; keep them out of the corpus too.
    chat = [
        f"<|{role}|>\n{r['prompt']}\n<|assistant|>\n{r['completion']}\n"
        for role, r in zip(("user", "system") * len(rows), rows, strict=False)
    ]
    return plain + chat


def train_tokenizer(spec: BuildSpec):
    """ByteLevel BPE with individually split digits, wrapped as a PreTrainedTokenizerFast.

    The full 256-byte alphabet is seeded into the vocabulary, so any UTF-8 text tokenizes
    (no unknown token exists); digits are always single tokens, so arithmetic is learned per
    digit and a student tokenizer that also splits digits aligns one to one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(spec.task, spec.seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=spec.model.max_position_embeddings,
    )


# --------------------------------------------------------------------------- data


def _char_lut(tokenizer, alphabet: set[str]) -> np.ndarray | None:
    """Byte -> token id table [256] if every character of ``alphabet`` is always its own token.

    That holds when each character is a single-token ASCII byte and no multi-character vocab
    entry consists only of alphabet characters (BPE can then never merge across them). It is
    what digit splitting gives the arithmetic task, and it turns tokenizing a quarter of a
    million rows from tens of seconds into a numpy gather. None when it does not hold.
    """
    if any(len(c.encode()) != 1 for c in alphabet):
        return None
    vocab = tokenizer.convert_tokens_to_string  # decodes ByteLevel symbols to text
    for token in tokenizer.get_vocab():  # a few hundred entries, once per build
        text = vocab([token])
        if len(text) > 1 and set(text) <= alphabet:
            return None
    lut = np.full(256, -1, dtype=np.int64)
    for c in alphabet:
        (lut[ord(c)],) = tokenizer(c, add_special_tokens=False)["input_ids"]
    return lut


def _encode(tokenizer, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Token matrix [n, L] (right-padded) and prompt lengths [n] for `<s> prompt completion </s>`.

    Prompt and completion are tokenized apart, as a pair, to know exactly where the
    completion starts.
    """
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    texts = [r["prompt"] + r["completion"] for r in rows]
    lut = _char_lut(tokenizer, set("".join(texts[:4096])) | set("0123456789+-*="))
    if lut is not None and set("".join(texts)) <= {chr(i) for i in np.flatnonzero(lut >= 0)}:
        width = max(map(len, texts))
        raw = np.array(texts, dtype=f"S{width}").view(np.uint8).reshape(len(texts), width)
        body = np.where(raw > 0, lut[raw], pad)  # NUL bytes are numpy's string padding
        n_tok = (raw > 0).sum(axis=1)
        ids = np.full((len(texts), width + 2), pad, dtype=np.int64)
        ids[:, 0] = bos
        ids[:, 1:-1] = body
        ids[np.arange(len(texts)), n_tok + 1] = eos
        prompt_len = np.array([len(r["prompt"]) for r in rows], dtype=np.int64) + 1
        return ids, prompt_len
    enc = tokenizer.backend_tokenizer.encode_batch_fast(
        [(r["prompt"], r["completion"]) for r in rows]
    )
    seqs = [[*e.ids, eos] for e in enc]
    ids = np.full((len(seqs), max(map(len, seqs))), pad, dtype=np.int64)
    for i, s in enumerate(seqs):  # a loop over rows, once per build
        ids[i, : len(s)] = s
    prompt_len = np.array([len(e.type_ids) - sum(e.type_ids) for e in enc], dtype=np.int64)
    return ids, prompt_len


# --------------------------------------------------------------------------- model


def _make_model(spec: BuildSpec, tokenizer):
    """The Llama of ``spec.model``, built by the student stage's builder."""
    from stages.train.options import StudentArch
    from stages.train.student import build_llama

    return build_llama(StudentArch(**asdict(spec.model)), tokenizer, spec.seed)


def train(spec: BuildSpec, model, tokenizer, log_every: int = 0) -> float:
    """Train in place for exactly spec.steps steps with the student stage's trainer.

    One fresh batch of generated rows per step (no repeats), hard-label CE on the completion
    (or every token); returns the mean loss of the last 10% of steps.
    """
    from stages.train.loader import RowsDataset, token_rows

    rows = generate(spec.task, spec.steps * spec.batch_size, "train", spec.seed)
    ids, prompt_len = _encode(tokenizer, rows)
    lengths = (ids != tokenizer.pad_token_id).sum(axis=1)
    dataset = RowsDataset(
        token_rows(ids, lengths, prompt_len),
        batch_size=spec.batch_size,
        pad_id=tokenizer.pad_token_id,
        include_prompt=spec.loss_on == "all",
    )
    return train_ce(model, dataset, spec, print if log_every else lambda _: None)


def train_ce(model, dataset, spec, log) -> float:
    """Exactly ``spec.steps`` AdamW steps (warm-up, cosine) of hard-label CE on ``dataset``
    through the student stage's trainer, no checkpoint kept; the mean loss of the last 10%.

    ``spec`` is any build spec with steps, lr, min_lr_ratio, warmup_steps, weight_decay,
    grad_clip and seed (this module's and the code teacher's).
    """
    import tempfile

    from stages.train.options import LossOptions, TrainOptions
    from stages.train.trainer import train_model

    with tempfile.TemporaryDirectory(prefix="logitforge-build-") as scratch:
        result = train_model(
            model,
            dataset,
            TrainOptions(
                output_dir=scratch,
                steps=spec.steps,
                lr=spec.lr,
                min_lr_ratio=spec.min_lr_ratio,
                warmup_steps=spec.warmup_steps,
                weight_decay=spec.weight_decay,
                adam_beta2=0.98,
                grad_clip=spec.grad_clip,
                seed=spec.seed,
                save_steps=None,
                logging_steps=max(1, spec.steps // 10),
            ),
            LossOptions(kind="ce"),
            save_final=False,
            log=log,
        )
    return float(result.final_loss) if result.final_loss is not None else float("nan")


# --------------------------------------------------------------------------- eval


def evaluate(model, tokenizer, task: TaskSpec, n: int, seed: int, batch_size: int = 512) -> float:
    """Held-out exact-match accuracy of batched greedy decoding (left padding)."""
    import torch

    rows = generate(task, n, "heldout", seed)
    max_new = max(len(r["completion"]) for r in rows) + 2  # answer (+ a sign) + eos
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct = 0
    try:
        for start in range(0, n, batch_size):
            batch = rows[start : start + batch_size]
            enc = tokenizer([r["prompt"] for r in batch], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new, do_sample=False)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :])
            correct += sum(
                is_correct(r["prompt"], t, eos=tokenizer.eos_token)
                for r, t in zip(batch, texts, strict=True)
            )
    finally:
        tokenizer.padding_side = side
    return correct / n


# --------------------------------------------------------------------------- build


def _resolve(out: Path) -> Path:
    out = Path(out)
    return out if out.is_absolute() else REPO_ROOT / out


def read_build(out: Path) -> dict | None:
    """build.json of a complete build in ``out``, or None."""
    path = _resolve(out) / "build.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def build_teacher(
    out: Path = DEFAULT_TEACHER_DIR,
    spec: BuildSpec | None = None,
    force: bool = False,
    log_every: int = 0,
) -> dict:
    """Build (or reuse) the model for ``spec`` in ``out``; returns the build.json contents.

    Relative ``out`` paths resolve against the repository root.
    """
    spec = spec or DEFAULT_SPEC
    out = _resolve(out)
    fingerprint = spec.fingerprint()
    cached = read_build(out)
    if not force and cached and cached.get("build_fingerprint") == fingerprint:
        return {**cached, "cached": True}  # decided before importing torch: stays fast

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the reference machine's core count; also pins the numerics
    try:
        t0 = time.perf_counter()
        tokenizer = train_tokenizer(spec)
        model = _make_model(spec, tokenizer)
        train_loss = train(spec, model, tokenizer, log_every=log_every)
        train_seconds = time.perf_counter() - t0
        # Eval items come from a stream separate from the jsonl prompts' (seed 0).
        accuracy = evaluate(model, tokenizer, spec.task, spec.n_eval, seed=spec.seed + 1)
    finally:
        torch.set_num_threads(threads)

    record = {
        "build_fingerprint": fingerprint,
        "recipe_version": RECIPE_VERSION,
        "spec": spec.to_dict(),
        "task": spec.task.to_dict(),
        "model": {
            "architecture": "LlamaForCausalLM",
            **asdict(spec.model),
            "head_dim": spec.model.head_dim,
            "vocab_size": len(tokenizer),
            "dtype": "float32",
        },
        "params": sum(p.numel() for p in model.parameters()),
        "steps": spec.steps,
        "seed": spec.seed,
        "train_seconds": round(train_seconds, 2),
        "final_train_loss": round(train_loss, 5),
        "heldout_accuracy": accuracy,
        "n_heldout": spec.n_eval,
    }
    write_build(out, model, tokenizer, record)
    return {**record, "cached": False}


def write_build(
    out: Path,
    model,
    tokenizer,
    record: dict,
    verify: Callable[[Path], None] | None = None,
    record_file: str = "build.json",
) -> None:
    """Save model, tokenizer and build.json to a temporary folder, then rename it to ``out``.

    An interrupted build never leaves a half model behind, and build.json (the cache marker;
    ``record_file`` names it otherwise) only ever sits next to the complete files it
    describes. ``verify(folder)`` runs on the saved files before build.json is written (it
    may add to ``record``); if it raises, the folder is removed and ``out`` keeps what it had.
    """
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _portable_tokenizer_config(tmp / "tokenizer_config.json")
    if verify is not None:
        try:
            verify(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    (tmp / record_file).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _portable_tokenizer_config(path: Path) -> None:
    """Name the generic fast-tokenizer class, which transformers 4.x and 5.x both load.

    transformers 5 writes its own ``TokenizersBackend`` name, unknown to 4.x readers (such as a
    GPU box's vLLM environment); the tokenizer.json itself is the same for both.
    """
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def summary_line(record: dict, out: Path) -> str:
    state = "cached" if record.get("cached") else f"built in {record['train_seconds']:.0f}s"
    return (
        f"{record['task']['name']} model ({record['params'] / 1e6:.2f}M params, "
        f"{record['steps']} steps, {state}) at {out}: held-out exact match "
        f"{record['heldout_accuracy']:.3f} on {record['n_heldout']} items"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo.build", description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="train the smaller baseline model with the same recipe instead of the teacher",
    )
    args = parser.parse_args(argv)
    spec = BASELINE_SPEC if args.baseline else DEFAULT_SPEC
    if args.steps is not None:
        spec = replace(spec, steps=args.steps, warmup_steps=min(spec.warmup_steps, args.steps))
    if args.seed is not None:
        spec = replace(spec, seed=args.seed)
    out = args.out or (DEFAULT_BASELINE_DIR if args.baseline else DEFAULT_TEACHER_DIR)
    record = build_teacher(out, spec, force=args.force, log_every=max(1, spec.steps // 10))
    print(summary_line(record, _resolve(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
