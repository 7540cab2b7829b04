"""Read input rows (JSONL, Parquet, `datasets`) and fingerprint the input.

JSONL is read as bytes, line by line, so that a bad line is reported by its line number instead of
by a decoder error deep inside a library.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .options import InputOptions

Format = Literal["jsonl", "parquet", "datasets"]
_CHUNK = 1 << 20


@dataclass
class InputRows:
    """Rows plus where each came from, so that errors can name the file line.

    Indices are global: ``start`` is the input row number of ``rows[0]``, and ``bad_utf8`` is keyed
    by global row, so a slice handed to one shard still reports the row of the whole input.
    """

    rows: list[dict[str, Any]]
    source: str | None = None  # file or dataset name for messages
    lines: list[int] | None = None  # [len(rows)] 1-based JSONL line numbers
    bad_utf8: dict[int, str] = field(default_factory=dict)  # global row -> what was wrong
    # global row -> why its JSONL line is not a JSON object; the row itself is an empty dict
    # placeholder, so the line keeps its row number and is skipped or reported like any row.
    bad_json: dict[int, str] = field(default_factory=dict)
    start: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def line(self, i: int) -> int | None:
        """1-based file line of local row ``i`` (JSONL only)."""
        return self.lines[i] if self.lines is not None else None

    def slice(self, begin: int, end: int) -> InputRows:
        """Local rows ``[begin, end)`` keeping their global row numbers."""
        lo, hi = self.start + begin, self.start + end
        return InputRows(
            rows=self.rows[begin:end],
            source=self.source,
            lines=self.lines[begin:end] if self.lines is not None else None,
            bad_utf8={r: d for r, d in self.bad_utf8.items() if lo <= r < hi},
            bad_json={r: d for r, d in self.bad_json.items() if lo <= r < hi},
            start=lo,
        )


def _visible_files(root: Path, pattern: str = "*") -> list[Path]:
    """Regular files under ``root`` in a stable order, ignoring hidden paths (.git, caches)."""
    return sorted(
        (
            p
            for p in root.rglob(pattern)
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    )


def resolve_format(opts: InputOptions) -> Format:
    """The concrete reader for ``opts`` (see `InputOptions` for the ``auto`` rule)."""
    if opts.format != "auto":
        return opts.format
    path = Path(opts.path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if path.is_dir() and not _is_saved_dataset(path):
        files = _visible_files(path)
        if files and all(p.suffix.lower() == ".parquet" for p in files):
            return "parquet"
    # Anything else (dataset repo folders with splits, Hub ids) is best understood by `datasets`.
    return "datasets"


def _parse_jsonl(
    lines: Iterable[bytes], first_line: int, start: int, limit: int | None, source: str
) -> InputRows:
    """Rows of JSONL ``lines`` (each with its newline, as a binary file iterates them).

    ``first_line`` is the 1-based file line of ``lines[0]`` and ``start`` the global row of the
    first row, so that a partition of the file names its rows exactly as a whole-file read does.
    Blank lines are not rows. ``limit`` caps the rows read.
    """
    rows: list[dict[str, Any]] = []
    lines_of: list[int] = []
    bad: dict[int, str] = {}
    bad_json: dict[int, str] = {}
    for lineno, raw in enumerate(lines, start=first_line):
        if limit is not None and len(rows) >= limit:
            break
        if not raw.strip():
            continue
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        g = start + len(rows)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad[g] = f"line is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 4]!r})"
            # Keep parsing so the id can still be reported; the bad bytes become lone
            # surrogates that never reach the tokenizer because the row is rejected.
            text = raw.decode("utf-8", "surrogateescape")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            bad_json[g] = f"invalid JSON: {e.msg} (column {e.colno})"
            obj = {}
        if not isinstance(obj, dict):
            bad_json[g] = f"line holds a JSON {type(obj).__name__}, not an object"
            obj = {}
        rows.append(obj)
        lines_of.append(lineno)
    return InputRows(
        rows=rows, source=source, lines=lines_of, bad_utf8=bad, bad_json=bad_json, start=start
    )


def _read_jsonl(path: Path, limit: int | None) -> InputRows:
    with path.open("rb") as f:
        return _parse_jsonl(f, 1, 0, limit, path.name)


def jsonl_block(path: Path, lo: int, hi: int) -> tuple[bytes, int]:
    """The bytes of the lines that *start* in ``[lo, hi)``, and how many newlines precede them
    inside the range (0, or 1 when ``lo`` falls inside a line that an earlier range owns).

    Every line belongs to exactly one range whatever the range size, so ranges can be read in
    parallel; the last line is read past ``hi`` up to its newline (or the end of the file).
    """
    with path.open("rb") as f:
        if lo > 0:
            f.seek(lo - 1)
            data = f.read(hi - lo + 1)  # byte lo - 1 tells whether a line starts at lo
            cut = data.find(b"\n")
            if cut < 0 or cut + 1 >= len(data):
                return b"", 0  # no line starts inside the range
            skipped = int(cut > 0)
            data = data[cut + 1 :]
        else:
            data, skipped = f.read(hi), 0
        if data and not data.endswith(b"\n"):
            tail = [data]
            while chunk := f.read(1 << 16):
                end = chunk.find(b"\n")
                if end >= 0:
                    tail.append(chunk[: end + 1])
                    break
                tail.append(chunk)
            data = b"".join(tail)
    return data, skipped


def read_jsonl_range(
    path: Path, lo: int, hi: int, *, start: int, newlines_before: int, limit: int | None
) -> InputRows:
    """The rows of the lines starting in ``[lo, hi)``; ``start`` is the global row of the first
    one and ``newlines_before`` the newlines in ``[0, lo)`` (which give the line numbers)."""
    block, skipped = jsonl_block(path, lo, hi)
    first_line = 1 + newlines_before + skipped if lo > 0 else 1
    return _parse_jsonl(io.BytesIO(block), first_line, start, limit, path.name)


_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True  # what bytes.strip() removes


def count_jsonl_range(path: Path, lo: int, hi: int) -> tuple[int, int]:
    """(rows, newlines): rows (non-blank lines) starting in ``[lo, hi)`` and the newline bytes
    inside ``[lo, hi)``, counted with numpy over the bytes (no per-line Python)."""
    with path.open("rb") as f:
        f.seek(lo)
        newlines = f.read(hi - lo).count(b"\n")
    block, _ = jsonl_block(path, lo, hi)
    raw = np.frombuffer(block, np.uint8)
    if raw.size == 0:
        return 0, newlines
    ends = np.flatnonzero(raw == 10)
    if raw[-1] != 10:
        ends = np.append(ends, raw.size)
    starts = np.concatenate([[0], ends[:-1] + 1])
    solid = np.zeros(raw.size + 1, np.int64)
    np.cumsum(~_WHITESPACE[raw], out=solid[1:])
    return int(np.count_nonzero(solid[ends] > solid[starts])), newlines


def _read_parquet(path: Path, limit: int | None) -> InputRows:
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else _visible_files(path, "*.parquet")
    if not files:
        raise FileNotFoundError(f"no parquet files under {path}")
    rows: list[dict[str, Any]] = []
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=65536):
            if limit is not None and len(rows) + batch.num_rows > limit:
                batch = batch.slice(0, limit - len(rows))
            rows.extend(batch.to_pylist())
            if limit is not None and len(rows) >= limit:
                return InputRows(rows=rows, source=path.name)
    return InputRows(rows=rows, source=path.name)


def _open_dataset(opts: InputOptions) -> Any:
    import datasets

    path = Path(opts.path)
    if _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if opts.split not in ds:
                raise ValueError(f"{opts.path} has no split {opts.split!r}; it has {sorted(ds)}")
            ds = ds[opts.split]
        return ds
    return datasets.load_dataset(opts.path, split=opts.split)


def _read_datasets(opts: InputOptions) -> InputRows:
    ds = _open_dataset(opts)
    if opts.limit is not None and opts.limit < len(ds):
        ds = ds.select(range(opts.limit))
    return InputRows(rows=ds.to_list(), source=Path(opts.path).name or opts.path)


def load_rows(opts: InputOptions) -> InputRows:
    """All input rows (up to ``opts.limit``) as dicts, with their provenance.

    A JSONL line that is not a JSON object becomes an empty placeholder row listed in
    ``bad_json``: preparing the rows reports it by line (``on_invalid: error``) or skips and
    counts it as ``invalid_json`` (``on_invalid: skip``), like any other invalid row.
    """
    fmt = resolve_format(opts)
    path = Path(opts.path)
    if fmt == "jsonl":
        return _read_jsonl(path, opts.limit)
    if fmt == "parquet":
        return _read_parquet(path, opts.limit)
    return _read_datasets(opts)


def _hash_file(h: Any, path: Path) -> None:
    h.update(path.stat().st_size.to_bytes(8, "little"))
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def input_fingerprint(opts: InputOptions) -> str:
    """sha256 over the input's bytes and the options that decide which rows are read.

    Local inputs are content-addressed (file bytes, and relative names inside a directory), so a
    moved or copied input keeps its fingerprint; a Hub dataset uses its ``datasets`` fingerprint.
    """
    h = hashlib.sha256(b"logitforge-input-v1\0")
    options = opts.model_dump(exclude={"path"})
    options["format"] = resolve_format(opts)
    h.update(json.dumps(options, sort_keys=True).encode())
    path = Path(opts.path)
    if path.is_file():
        h.update(b"\0file\0")
        _hash_file(h, path)
    elif path.is_dir():
        for file in _visible_files(path):
            rel = file.relative_to(path).as_posix().encode()
            h.update(b"\0file\0" + len(rel).to_bytes(4, "little") + rel)
            _hash_file(h, file)
    else:
        ds = _open_dataset(opts)
        h.update(b"\0hub\0" + opts.path.encode() + b"\0" + ds._fingerprint.encode())
    return h.hexdigest()
