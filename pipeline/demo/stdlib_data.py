"""Real text and chat rows for a real teacher, built offline from the Python standard library.

Why: a pretrained chat model (SmolLM2, `pipeline.demo.smollm2`) should be cached and distilled
on text like what users feed it, and nothing can be downloaded here. Every machine has the
interpreter's own sources, so they are the corpus: the same Python minor version gives the
same rows anywhere.

- Text rows (``{"id", "text"}``): runs of whole source lines, a realistic length mix (a
  quarter of ``max_chars`` up to all of it), `pipeline.demo.code_teacher.code_prompts`.
- Chat rows (``{"id", "messages"}``): instructions about one function of the stdlib, with the
  function as context. Two tasks have a reference answer taken from the source itself, so a
  cache-teacher run has a completion to train on: *document* (the function without its
  docstring; the answer is the docstring) and *complete* (signature and docstring; the answer
  is the whole function). *explain* has no reference answer: it is a generation prompt.
- The split is by file (`code_teacher.is_heldout`, a hash of the path): no function or line
  of a held-out file is in a training row. Draws are seeded and deterministic.

    python -m pipeline.demo.stdlib_data [--out artifacts/data/stdlib]
"""

from __future__ import annotations

import argparse
import ast
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.demo.build import _resolve
from pipeline.demo.code_teacher import DEFAULT_SPEC, code_prompts, load_corpus, split_files

DEFAULT_DATA_DIR = Path("artifacts/data/stdlib")
TASKS = ("document", "complete", "explain")
ANSWERED_TASKS = ("document", "complete")  # the answer is in the source
DATA_FILES = (
    "text-train.jsonl",
    "text-heldout.jsonl",
    "chat-train.jsonl",
    "chat-heldout.jsonl",
    "prompts-heldout.jsonl",
)


@dataclass(frozen=True)
class Function:
    """One documented stdlib function: its source (dedented) with and without docstring."""

    path: str
    qualname: str
    source: str
    undocumented: str  # the source without its docstring
    header: str  # decorators, signature and docstring: what *complete* shows
    docstring: str  # cleaned (inspect.cleandoc)


def _functions_of(path: str, text: str, max_chars: int) -> list[Function]:
    """The documented functions (and methods) of one file whose source fits ``max_chars``."""
    try:
        tree = ast.parse(text)
    except SyntaxError:  # a few stdlib files are templates or lib2to3 fixtures
        return []
    lines = text.splitlines(keepends=True)
    out = []
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:  # a walk over the file's definitions: not a hot path
        node, prefix = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                stack.append((child, f"{prefix}{child.name}."))
            if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(child)
            body = child.body
            if not doc or len(doc) < 40 or len(body) < 2 or child.end_lineno is None:
                continue
            first = min([child.lineno] + [d.lineno for d in child.decorator_list]) - 1
            doc_node = body[0]
            source = textwrap.dedent("".join(lines[first : child.end_lineno]))
            if len(source) > max_chars or doc_node.end_lineno is None:
                continue
            # Lines are cut by line numbers: a docstring sharing a line with code (rare) is
            # skipped rather than cut mid-line.
            if doc_node.end_lineno >= body[1].lineno or doc_node.lineno == child.lineno:
                continue
            before = lines[first : doc_node.lineno - 1]
            after = lines[doc_node.end_lineno : child.end_lineno]
            out.append(
                Function(
                    path=path,
                    qualname=f"{prefix}{child.name}",
                    source=source,
                    undocumented=textwrap.dedent("".join(before + after)),
                    header=textwrap.dedent("".join(lines[first : doc_node.end_lineno])),
                    docstring=doc,
                )
            )
    return sorted(out, key=lambda f: f.qualname)


def functions(split: str, max_chars: int = 1500) -> list[Function]:
    """Every documented function of one split's files (sorted by path, then name)."""
    corpus = load_corpus(DEFAULT_SPEC)
    files = split_files(corpus, split)
    return [f for path, text in files for f in _functions_of(path, text, max_chars)]


def _fence(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def chat_row(fn: Function, task: str) -> dict:
    """One chat row; *document* and *complete* end with the reference assistant answer."""
    where = f"`{fn.qualname}` from the Python standard library's `{fn.path}`"
    if task == "document":
        user = f"Write the docstring for {where}.\n\n{_fence(fn.undocumented)}"
        answer: str | None = fn.docstring
    elif task == "complete":
        user = f"Complete the body of {where}.\n\n{_fence(fn.header)}"
        answer = _fence(fn.source)
    elif task == "explain":
        user = f"Explain what {where} does.\n\n{_fence(fn.source)}"
        answer = None
    else:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"id": f"{fn.path}:{fn.qualname}:{task}", "messages": messages}


def chat_rows(
    n: int, split: str = "train", seed: int = 0, tasks: tuple[str, ...] = ANSWERED_TASKS
) -> list[dict]:
    """``n`` chat rows over distinct functions of ``split``, tasks in turn (seeded draw)."""
    fns = functions(split)
    if n > len(fns):
        raise ValueError(f"asked for {n} chat rows; the {split} files give {len(fns)} functions")
    pick = np.random.default_rng(seed).choice(len(fns), size=n, replace=False)
    return [chat_row(fns[i], tasks[j % len(tasks)]) for j, i in enumerate(pick.tolist())]


def prompt_rows(n: int, split: str = "heldout", seed: int = 0) -> list[dict]:
    """Generation prompts: chat rows of every task, the assistant's answer left out."""
    rows = chat_rows(n, split, seed, tasks=TASKS)
    return [{**r, "messages": r["messages"][:1]} for r in rows]


@dataclass(frozen=True)
class DataSpec:
    """How many rows of each file; the files are a function of this and the Python version."""

    text_train: int = 2048
    text_heldout: int = 256
    text_max_chars: int = 2000
    chat_train: int = 2048
    chat_heldout: int = 256
    prompts_heldout: int = 256
    seed: int = 0


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Atomically: a temporary file renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def write_data(out: Path = DEFAULT_DATA_DIR, spec: DataSpec | None = None) -> dict[str, int]:
    """Write the text, chat and prompt files to ``out``; returns rows per file name."""
    spec = spec or DataSpec()
    out = _resolve(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[dict]] = {
        "text-train.jsonl": code_prompts(
            spec.text_train, spec.seed, spec.text_max_chars, split="train"
        ),
        "text-heldout.jsonl": code_prompts(
            spec.text_heldout, spec.seed, spec.text_max_chars, split="heldout"
        ),
        "chat-train.jsonl": chat_rows(spec.chat_train, "train", spec.seed),
        "chat-heldout.jsonl": chat_rows(spec.chat_heldout, "heldout", spec.seed),
        "prompts-heldout.jsonl": prompt_rows(spec.prompts_heldout, "heldout", spec.seed),
    }
    assert tuple(files) == DATA_FILES
    for name, rows in files.items():
        write_jsonl(out / name, rows)
    return {name: len(rows) for name, rows in files.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.demo.stdlib_data", description=__doc__
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_DATA_DIR)
    args = parser.parse_args(argv)
    counts = write_data(args.out)
    print(", ".join(f"{name}: {n} rows" for name, n in counts.items()), f"in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
