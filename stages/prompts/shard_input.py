"""A logitforge shard set as input: rows that are already tokenized, e.g. rollouts to score.

Scoring a rollout set is the teacher stage on another input (DESIGN: "a rollout set is just
another input"). Its rows carry token ids, byte spans and the rollout columns; re-tokenizing
the text could give other ids than the policy sampled, so the rows are taken as they are:
the tokenizer must be the teacher's (checked by fingerprint), and a row is never re-cut.
Reading is O(shards) in bookkeeping and verifies every shard's sha256 as it reads.
"""

from __future__ import annotations

import hashlib

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.reader import ShardSet
from storage.schema import PROMPT_SCHEMA, ROLLOUT_SCHEMA, ShardSetMetadata, is_rollout_table

from .options import InputOptions, PrepareOptions
from .records import TOO_LONG, PreparedPrompts, SkippedRow


def is_shard_set(path: str) -> bool:
    """Whether ``path`` (local or fsspec URL) is a logitforge shard set."""
    fs, root = fsspec.core.url_to_fs(str(path))
    return fs.exists(f"{root.rstrip('/')}/.logitforge/plan.json")


def shard_set_fingerprint(path: str) -> str:
    """What identifies a shard set's rows: its plan and every shard's recorded sha256."""
    shard_set = ShardSet.open(path)
    h = hashlib.sha256(shard_set.plan.fingerprint.encode())
    for i in shard_set.complete_indices(strict=True):
        record = shard_set.layout.fs.cat_file(shard_set.layout.done_path(i))
        h.update(b"\0" + hashlib.sha256(record).digest())
    return h.hexdigest()


def read_shard_set_rows(
    opts: InputOptions,
    prepare: PrepareOptions,
    tokenizer_fingerprint: str,
    max_length: int,
) -> tuple[PreparedPrompts, ShardSetMetadata]:
    """The set's rows (prompt columns, plus rollout columns when present) and its metadata.

    Refuses a set made with another tokenizer than the teacher's and, unless
    ``prompts.on_too_long`` is ``skip``, a row longer than ``max_length`` (named by id).
    """
    shard_set = ShardSet.open(opts.path)
    try:
        shard_set.complete_indices(strict=True)
    except RuntimeError as e:
        raise ValueError(f"input {opts.path} is an incomplete shard set: {e}") from e
    metadata = shard_set.metadata
    if metadata.tokenizer_fingerprint != tokenizer_fingerprint:
        raise ValueError(
            f"input {opts.path} was tokenized with another tokenizer "
            f"({metadata.tokenizer_fingerprint}) than the teacher's ({tokenizer_fingerprint}); "
            "its token ids mean nothing to this teacher"
        )
    table = shard_set.read_table(strict=True)
    schema = ROLLOUT_SCHEMA if is_rollout_table(table) else PROMPT_SCHEMA
    table = table.select(schema.names)
    if opts.limit is not None:
        table = table.slice(0, opts.limit)
    num_input = table.num_rows
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    too_long = np.flatnonzero(lengths > max_length)
    skipped: list[SkippedRow] = []
    if too_long.size:
        first = int(too_long[0])
        row_id = table.column("id")[first].as_py()
        if prepare.on_too_long != "skip":
            raise ValueError(
                f"input {opts.path}: row {first} (id {row_id!r}) has {int(lengths[first])} "
                f"tokens, more than the {max_length} the teacher can score; tokenized rows are "
                "not re-cut. Raise teacher.max_model_len or set prompts.on_too_long: skip"
            )
        ids = table.column("id").take(pa.array(too_long)).to_pylist()
        skipped = [SkippedRow(int(r), i, TOO_LONG) for r, i in zip(too_long, ids, strict=True)]
        table = table.filter(pa.array(lengths <= max_length))
    prepared = PreparedPrompts(table=table, skipped=skipped, num_input_rows=num_input)
    return prepared, metadata
