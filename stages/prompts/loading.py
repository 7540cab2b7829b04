"""Read input rows (JSONL, Parquet, `datasets`) and fingerprint the input.

JSONL is read as bytes, line by line, so that a bad line is reported by its line number instead of
by a decoder error deep inside a library.

JSONL and Parquet inputs may be local paths or fsspec URLs (``s3://bucket/rows.jsonl``, a
``gs://`` folder of Parquet files, ...): every access goes through fsspec, and a JSONL byte
range is read with ranged reads (``cat_file(start, end)``), so a planning task on an object
store fetches its own range and not the whole file. Credentials come from the environment
of whichever process reads (the driver, or a Dask worker). `datasets` inputs stay local
folders or Hub ids.
"""

from __future__ import annotations

import codecs
import contextlib
import fnmatch
import hashlib
import io
import json
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

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


def input_fs(path: str | Path) -> tuple[Any, str]:
    """(fsspec filesystem, path on it) of a local path or an fsspec URL."""
    return fsspec.core.url_to_fs(str(path))


def is_local(fs: Any) -> bool:
    return isinstance(fs, LocalFileSystem)


def file_url(fs: Any, path: str) -> str:
    """What a task needs to open ``path`` again: the plain path if local, else its URL."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def _visible_files(fs: Any, root: str, pattern: str = "*") -> list[str]:
    """Files under ``root`` whose name matches ``pattern``, ordered by relative path, ignoring
    hidden paths (.git, caches). One recursive listing; a loop over files, not rows."""
    root = root.rstrip("/")
    found = []
    for path in fs.find(root):
        rel = path[len(root) + 1 :]
        parts = rel.split("/")
        if any(part.startswith(".") for part in parts):
            continue
        if fnmatch.fnmatchcase(parts[-1], pattern):
            found.append((rel, path))
    return [path for _, path in sorted(found)]


def _input_files(fs: Any, root: str, pattern: str) -> list[str]:
    """``root`` itself when it is a file, else its visible files matching ``pattern``."""
    if fs.isfile(root):
        return [root]
    files = _visible_files(fs, root, pattern)
    if not files:
        raise FileNotFoundError(f"no {pattern} files under {file_url(fs, root)}")
    return files


def _is_saved_dataset(fs: Any, root: str) -> bool:
    return fs.isdir(root) and (
        fs.isfile(posixpath.join(root, "state.json"))
        or fs.isfile(posixpath.join(root, "dataset_dict.json"))
    )


def resolve_format(opts: InputOptions) -> Format:
    """The concrete reader for ``opts`` (see `InputOptions` for the ``auto`` rule)."""
    if opts.format != "auto":
        return opts.format
    fs, root = input_fs(opts.path)
    suffix = posixpath.splitext(root.rstrip("/"))[1].lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if fs.isdir(root) and not _is_saved_dataset(fs, root):
        files = _visible_files(fs, root)
        if files and all(p.lower().endswith(".parquet") for p in files):
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


def _read_jsonl(path: str | Path, limit: int | None) -> InputRows:
    fs, root = input_fs(path)
    with fs.open(root, "rb") as f:
        return _parse_jsonl(f, 1, 0, limit, posixpath.basename(root))


_TAIL_CHUNK = 1 << 16
_TAIL_CHUNK_MAX = 1 << 24


def _rest_of_line(fs: Any, path: str, pos: int, size: int) -> bytes:
    """Bytes from ``pos`` up to and including the next newline (or the end of the file), in
    ranged reads that double in size, so a long line costs few requests on an object store."""
    tail: list[bytes] = []
    step = _TAIL_CHUNK
    while pos < size:
        chunk = fs.cat_file(path, start=pos, end=min(pos + step, size))
        if not chunk:
            break
        end = chunk.find(b"\n")
        if end >= 0:
            tail.append(chunk[: end + 1])
            break
        tail.append(chunk)
        pos += len(chunk)
        step = min(step * 2, _TAIL_CHUNK_MAX)
    return b"".join(tail)


def _jsonl_range(path: str | Path, lo: int, hi: int) -> tuple[bytes, int, int]:
    """`jsonl_block` plus the newline bytes inside ``[lo, hi)``, from one ranged read of the
    range (and of the end of its last line)."""
    fs, root = input_fs(path)
    size = fs.size(root)
    hi = min(hi, size)
    if lo >= hi:
        return b"", 0, 0
    first = lo - 1 if lo > 0 else 0  # byte lo - 1 tells whether a line starts at lo
    data = fs.cat_file(root, start=first, end=hi)
    newlines = data.count(b"\n", lo - first)
    skipped = 0
    if lo > 0:
        cut = data.find(b"\n")
        if cut < 0 or cut + 1 >= len(data):
            return b"", 0, newlines  # no line starts inside the range
        skipped = int(cut > 0)
        data = data[cut + 1 :]
    if data and not data.endswith(b"\n"):
        data += _rest_of_line(fs, root, hi, size)
    return data, skipped, newlines


def jsonl_block(path: str | Path, lo: int, hi: int) -> tuple[bytes, int]:
    """The bytes of the lines that *start* in ``[lo, hi)``, and how many newlines precede them
    inside the range (0, or 1 when ``lo`` falls inside a line that an earlier range owns).

    Every line belongs to exactly one range whatever the range size, so ranges can be read in
    parallel; the last line is read past ``hi`` up to its newline (or the end of the file).
    ``path`` is a local path or an fsspec URL.
    """
    block, skipped, _ = _jsonl_range(path, lo, hi)
    return block, skipped


def read_jsonl_range(
    path: str | Path, lo: int, hi: int, *, start: int, newlines_before: int, limit: int | None
) -> InputRows:
    """The rows of the lines starting in ``[lo, hi)``; ``start`` is the global row of the first
    one and ``newlines_before`` the newlines in ``[0, lo)`` (which give the line numbers)."""
    block, skipped = jsonl_block(path, lo, hi)
    first_line = 1 + newlines_before + skipped if lo > 0 else 1
    source = posixpath.basename(str(path))
    return _parse_jsonl(io.BytesIO(block), first_line, start, limit, source)


_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True  # what bytes.strip() removes


def count_jsonl_range(path: str | Path, lo: int, hi: int) -> tuple[int, int]:
    """(rows, newlines): rows (non-blank lines) starting in ``[lo, hi)`` and the newline bytes
    inside ``[lo, hi)``, counted with numpy over the bytes (no per-line Python)."""
    block, _, newlines = _jsonl_range(path, lo, hi)
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


def parquet_files(path: str | Path) -> list[str]:
    """The Parquet files of an input (one file, or a folder's visible ``*.parquet`` files), as
    paths or URLs a task can open with `open_parquet`."""
    fs, root = input_fs(path)
    return [file_url(fs, f) for f in _input_files(fs, root, "*.parquet")]


@contextlib.contextmanager
def open_parquet(file: str) -> Iterator[Any]:
    """A `pyarrow.parquet.ParquetFile` on a local path (pyarrow's own reader) or an fsspec URL
    (an fsspec file: pyarrow fetches the footer and the column chunks it needs by range)."""
    import pyarrow.parquet as pq

    fs, root = input_fs(file)
    if is_local(fs):
        with pq.ParquetFile(root) as pf:
            yield pf
        return
    with fs.open(root, "rb") as f, pq.ParquetFile(f) as pf:
        yield pf


def _read_parquet(path: str | Path, limit: int | None) -> InputRows:
    source = Path(str(path)).name
    rows: list[dict[str, Any]] = []
    for file in parquet_files(path):
        with open_parquet(file) as pf:
            for batch in pf.iter_batches(batch_size=65536):
                if limit is not None and len(rows) + batch.num_rows > limit:
                    batch = batch.slice(0, limit - len(rows))
                rows.extend(batch.to_pylist())
                if limit is not None and len(rows) >= limit:
                    return InputRows(rows=rows, source=source)
    return InputRows(rows=rows, source=source)


def _open_dataset(opts: InputOptions) -> Any:
    import datasets

    fs, root = input_fs(opts.path)
    if not is_local(fs):
        # Every planning task would download the whole dataset again; say what works instead.
        raise ValueError(
            f"input {opts.path}: only JSONL or Parquet inputs (a file, or a folder of Parquet "
            "files) can be read from an fsspec URL; a `datasets` input must be a local folder "
            "or a Hub id. Set input.format to jsonl or parquet if the name hides the format."
        )
    path = Path(opts.path)
    if _is_saved_dataset(fs, root):
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
    if fmt == "jsonl":
        return _read_jsonl(opts.path, opts.limit)
    if fmt == "parquet":
        return _read_parquet(opts.path, opts.limit)
    return _read_datasets(opts)


def _hash_file(h: Any, fs: Any, path: str) -> None:
    h.update(int(fs.size(path)).to_bytes(8, "little"))
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def input_fingerprint(opts: InputOptions) -> str:
    """sha256 over the input's bytes and the options that decide which rows are read.

    File inputs, local or at a URL, are content-addressed (file bytes, and relative names
    inside a directory), so a moved or copied input keeps its fingerprint (a file uploaded to
    S3 has the fingerprint it had on disk); a Hub dataset uses its ``datasets`` fingerprint.
    """
    h = hashlib.sha256(b"logitforge-input-v1\0")
    options = opts.model_dump(exclude={"path"})
    options["format"] = resolve_format(opts)
    h.update(json.dumps(options, sort_keys=True).encode())
    fs, root = input_fs(opts.path)
    if fs.isfile(root):
        h.update(b"\0file\0")
        _hash_file(h, fs, root)
    elif fs.isdir(root):
        root = root.rstrip("/")
        for file in _visible_files(fs, root):
            rel = file[len(root) + 1 :].encode()
            h.update(b"\0file\0" + len(rel).to_bytes(4, "little") + rel)
            _hash_file(h, fs, file)
    elif not is_local(fs):
        raise FileNotFoundError(f"input {opts.path} does not exist (no such object or prefix)")
    else:
        ds = _open_dataset(opts)
        h.update(b"\0hub\0" + opts.path.encode() + b"\0" + ds._fingerprint.encode())
    return h.hexdigest()
