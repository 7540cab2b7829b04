"""Bundled synthetic task: integer arithmetic with checkable answers.

Why arithmetic: every prompt has exactly one correct completion, so a teacher's and a
student's quality are plain exact-match numbers, and the data costs nothing to generate
offline. Why *this* default, the sum of two 5-digit numbers from [50000, 100000) written most
significant digit first ("61234+98765=159999"): measured on 2 CPU cores, easy 3-digit a+b
saturates a 0.4 M model (DESIGN.md), while here each output digit depends on a carry chain
that can run through the whole number, so capacity binds: after the same 800 steps a 1.5 M
teacher gets 0.92 held-out exact match and a 0.12 M model 0.74. The operand range makes
every answer exactly 6 digits long; with a variable answer length the position of each
digit's operands shifts, and tiny models sat on a loss plateau for most of the step budget.
Three operands (a+b+c) did not leave that plateau at all within the budget.

Items are generated deterministically from a seed. Whether an item belongs to the training or
the held-out split is decided by a salted hash of its (sorted) operands, so the two splits are
disjoint by construction, also across commutations (``a+b`` and ``b+a`` share a split).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Split = Literal["train", "heldout"]

_OPS = "+-*"
# One held-out item in this many (by hash); enough for thousands of unseen eval items while
# leaving the training pool essentially unbounded.
_HELDOUT_MODULUS = 16
_EXPR = re.compile(r"^\s*(\d+(?:\s*[-+*]\s*\d+)*)\s*=\s*$")


@dataclass(frozen=True)
class TaskSpec:
    """What arithmetic is asked.

    Operand i is uniform over the half-open range ``operands[i] = (low, high)``; ``ops[i]`` is
    the operator between operand i and i+1. ``seed`` salts the train/held-out split hash, so a
    different seed gives a different partition.
    """

    name: str = "add5"
    operands: tuple[tuple[int, int], ...] = ((50_000, 100_000), (50_000, 100_000))
    ops: str = "+"
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.ops) != len(self.operands) - 1:
            raise ValueError(f"need {len(self.operands) - 1} operators, got {self.ops!r}")
        if any(op not in _OPS for op in self.ops):
            raise ValueError(f"operators must be from {_OPS!r}, got {self.ops!r}")
        if any(not 0 <= lo < hi for lo, hi in self.operands):
            raise ValueError(f"operand ranges must satisfy 0 <= low < high: {self.operands}")
        if math.prod(hi for _, hi in self.operands) > 10**18:
            # Keys and answers are int64; this bound keeps both exact.
            raise ValueError(f"operand ranges too large for int64: {self.operands}")

    def to_dict(self) -> dict:
        return {**asdict(self), "operands": [list(r) for r in self.operands]}


DEFAULT_TASK = TaskSpec()


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser: a fast, well-mixed, platform-independent hash."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _split_of(spec: TaskSpec, operands: np.ndarray) -> np.ndarray:
    """Boolean mask [n]: True where the operand row belongs to the held-out split."""
    key = np.sort(operands, axis=1).astype(np.uint64)  # commutation-invariant
    h = _splitmix64(np.full(len(key), spec.seed, dtype=np.uint64))
    with np.errstate(over="ignore"):
        for col in key.T:  # a handful of operand columns, not a loop over rows
            h = _splitmix64(h ^ col)
    return (h % np.uint64(_HELDOUT_MODULUS)) == 0


def _evaluate(operands: list, ops: str):
    """Evaluate with * binding tighter than + and -.

    Works on int64 columns (one value per row, vectorised) and on plain Python ints alike.
    """
    terms = [operands[0]]
    signs = [1]
    for op, value in zip(ops, operands[1:], strict=True):
        if op == "*":
            terms[-1] = terms[-1] * value
        else:
            terms.append(value)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms, strict=True))


def _format_prompts(operands: list[np.ndarray], ops: str) -> np.ndarray:
    """Prompt strings [n] such as "123+45=", built column-wise (numpy string ufuncs)."""
    text = operands[0].astype(str)
    for op, value in zip(ops, operands[1:], strict=True):
        text = np.strings.add(np.strings.add(text, op), value.astype(str))
    return np.strings.add(text, "=")


def generate(spec: TaskSpec, n: int, split: Split, seed: int) -> list[dict]:
    """``n`` distinct items of ``split``, deterministic in (spec, split, seed).

    Rows are ``{"id", "prompt", "completion"}``; ``completion`` is the bare answer (no eos:
    the end-of-sequence convention is the tokenizer's business). Ids are derived from the
    content, so they are unique and stable however many items are asked for.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    lows = np.array([lo for lo, _ in spec.operands], dtype=np.int64)
    highs = np.array([hi for _, hi in spec.operands], dtype=np.int64)
    want_heldout = split == "heldout"
    rows = np.zeros((0, len(highs)), dtype=np.int64)
    for _ in range(64):  # a few rounds at most, unless the task space is too small
        if len(rows) >= n:
            break
        draw = max(1024, 2 * (n - len(rows)) * (_HELDOUT_MODULUS if want_heldout else 1))
        fresh = rng.integers(lows, highs, size=(draw, len(highs)), dtype=np.int64)
        rows = np.concatenate([rows, fresh[_split_of(spec, fresh) == want_heldout]])
        # Exact duplicates would repeat ids: keep first occurrences, in draw order. The
        # mixed-radix key is exact, as the product of the highs is <= 10**18.
        key = np.zeros(len(rows), dtype=np.int64)
        for col, high in zip(rows.T, highs, strict=True):
            key = key * high + col
        _, first = np.unique(key, return_index=True)
        rows = rows[np.sort(first)]
    if len(rows) < n:
        raise ValueError(f"task {spec.name} has fewer than {n} distinct {split} items")
    rows = rows[:n]
    cols = list(rows.T)
    prompts = _format_prompts(cols, spec.ops).tolist()
    answers = _evaluate(cols, spec.ops).astype(str).tolist()
    return [
        {"id": f"{spec.name}:{p[:-1]}", "prompt": p, "completion": a}
        for p, a in zip(prompts, answers, strict=True)
    ]


def answer(prompt: str) -> str:
    """The correct completion for a prompt such as ``"123+456="`` (surrounding spaces ok)."""
    m = _EXPR.match(prompt)
    if m is None:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    expr = m.group(1).replace(" ", "")
    operands = [int(x) for x in re.split(r"[-+*]", expr)]
    return str(_evaluate(operands, "".join(re.findall(r"[-+*]", expr))))


def is_correct(prompt: str, generated_text: str, eos: str = "</s>") -> bool:
    """Exact match of the answer; whatever follows an eos token or a newline is ignored."""
    text = generated_text.split(eos, 1)[0].split("\n", 1)[0].strip()
    return text == answer(prompt)


def write_prompts_jsonl(
    path: str | Path, n: int = 2048, seed: int = 0, spec: TaskSpec = DEFAULT_TASK
) -> Path:
    """Write ``n`` held-out rows (id, prompt, completion) as JSON lines, byte-reproducibly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row, ensure_ascii=False) for row in generate(spec, n, "heldout", seed)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


DEFAULT_PROMPTS_PATH = Path(__file__).resolve().parents[2] / "configs" / "data" / "arith.jsonl"


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.demo.task``: regenerate the bundled prompts file."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.demo.task", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_PROMPTS_PATH)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_prompts_jsonl(args.out, args.n, args.seed)
    print(f"wrote {args.n} held-out {DEFAULT_TASK.name} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
