"""Share shard sets on the Hugging Face Hub: ``logitforge push`` / ``logitforge pull``.

A shard set is already a valid dataset repository (card + ``data/*.parquet``), so pushing is an
upload of exactly the files that make the set: the card, the verified shards and the
``.logitforge/`` bookkeeping (plan, completion records, prompt shards). The bookkeeping travels
too, so a pulled copy can be verified byte for byte, resumed or extended like a local run.

Nothing else in the folder is uploaded: not ``huggingface_hub``'s own ``.cache/huggingface/``
(written by a previous pull), not temp files of an interrupted write, not stray files.

The token is never handled here: ``huggingface_hub`` reads it itself (``HF_TOKEN`` or the saved
login) and sends it only in the ``Authorization`` header. This module only asks *whether* one
exists, to fail before any upload instead of half-way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from pydantic import ValidationError

from storage.card import read_card_front_matter
from storage.layout import ShardSetLayout
from storage.manifest import Plan, read_done, read_plan, verify_shard
from storage.schema import FORMAT_VERSION, ShardSetMetadata, read_metadata

Log = Callable[[str], None]
REPO_TYPE = "dataset"
HF_PREFIX = "hf://datasets/"


class HubError(ValueError):
    """A push or pull that cannot go on; the message says why and what to do."""


class ShardSetVerificationError(HubError):
    """A shard set whose files disagree with each other (plan, records, footers, card)."""


def validate_repo_id(repo_id: str) -> str:
    """``owner/name`` checked with the Hub's own rules, before any request is sent.

    An owner is required: without one the Hub would pick the token's user namespace, and a
    pull of the same id by someone else would look elsewhere.
    """
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise HubError(f"invalid repo id {repo_id!r}: expected 'owner/name'")
    try:
        hub_validate(repo_id)
    except HFValidationError as e:
        raise HubError(f"invalid repo id {repo_id!r}: {e}") from e
    return repo_id


@dataclass
class VerifyReport:
    """What :func:`verify_shard_set` found in a shard set."""

    plan: Plan
    metadata: ShardSetMetadata | None
    complete: list[int]
    incomplete: dict[int, str]  # shard index -> reason
    rows: int
    tokens: int
    files: list[str] = field(default_factory=list)  # relative paths that make the set

    @property
    def is_complete(self) -> bool:
        return not self.incomplete


def _relative(layout: ShardSetLayout, path: str) -> str:
    root = layout.root.rstrip("/") + "/"
    if not path.startswith(root):
        raise ValueError(f"{path} is not under {layout.root}")
    return path[len(root) :]


def _footer_metadata(layout: ShardSetLayout, path: str) -> tuple[ShardSetMetadata, int]:
    """The shard's footer metadata and row count, with a clear error for any bad footer."""
    where = layout.fs.unstrip_protocol(path)
    try:
        with layout.fs.open(path, "rb") as f:
            footer = pq.read_metadata(f)
        return read_metadata(footer.metadata), footer.num_rows
    except ValidationError as e:
        raise ShardSetVerificationError(f"{where}: unusable logitforge metadata: {e}") from e
    except (OSError, ValueError) as e:
        raise ShardSetVerificationError(f"{where}: unreadable Parquet footer: {e}") from e


def _check_card(layout: ShardSetLayout, metadata: ShardSetMetadata) -> None:
    """The card must point ``datasets`` at the shards and repeat the footers' metadata."""
    card = layout.fs.unstrip_protocol(layout.card_path())
    try:
        front = read_card_front_matter(layout)
    except ValueError as e:
        raise ShardSetVerificationError(str(e)) from e
    if front is None:
        raise ShardSetVerificationError(f"{card}: no dataset card with YAML front matter")
    configs = front.get("configs")
    wanted = f"data/{layout.split}-*.parquet"
    paths = [
        entry.get("path")
        for config in configs or []
        if isinstance(config, dict)
        for entry in config.get("data_files") or []
        if isinstance(entry, dict)
    ]
    if wanted not in paths:
        raise ShardSetVerificationError(
            f"{card}: its `configs` do not list {wanted}, so `datasets` would not find the shards"
        )
    block = front.get("logitforge")
    if not isinstance(block, dict):
        raise ShardSetVerificationError(f"{card}: no `logitforge:` metadata block")
    try:
        card_meta = ShardSetMetadata.model_validate(block)
    except ValidationError as e:
        raise ShardSetVerificationError(f"{card}: unusable `logitforge:` block: {e}") from e
    if card_meta != metadata:
        ours, theirs = card_meta.model_dump(), metadata.model_dump()
        differ = sorted(k for k in ours if ours[k] != theirs.get(k))
        shown = ", ".join(f"{k}: card {ours[k]!r} vs footers {theirs[k]!r}" for k in differ)
        raise ShardSetVerificationError(
            f"{card}: card metadata disagrees with the Parquet footers ({shown})"
        )


def verify_shard_set(
    url: str, require_complete: bool = True, check_sha256: bool = True, split: str = "train"
) -> VerifyReport:
    """Check that a shard set's files agree with each other; raise on the first disagreement.

    Checks: the plan exists and its format version is known; every planned shard has a record
    naming this plan and a data file of the recorded size and sha256 (unless
    ``require_complete`` is False, then incomplete shards are only reported); every complete
    shard's footer has the same metadata, names the plan, has the recorded row count; the card
    points ``datasets`` at the shards and its ``logitforge:`` block equals the footers'.
    """
    layout = ShardSetLayout.from_url(url, split=split)
    try:
        plan = read_plan(layout)
    except ValueError as e:
        raise ShardSetVerificationError(str(e)) from e
    if plan is None:
        raise ShardSetVerificationError(
            f"{layout.url} is not a logitforge shard set: no .logitforge/plan.json"
        )
    if plan.format_version > FORMAT_VERSION:
        raise ShardSetVerificationError(
            f"{layout.url}: plan format_version {plan.format_version} is newer than this "
            f"logitforge understands ({FORMAT_VERSION}); upgrade logitforge"
        )
    complete: list[int] = []
    incomplete: dict[int, str] = {}
    for i in range(plan.num_shards):
        ok, why = verify_shard(layout, plan, i, check_sha256=check_sha256)
        if ok:
            complete.append(i)
        else:
            incomplete[i] = why
    if incomplete and require_complete:
        shown = "; ".join(f"{plan.shard(i).name}: {why}" for i, why in list(incomplete.items())[:5])
        more = f" (and {len(incomplete) - 5} more)" if len(incomplete) > 5 else ""
        raise ShardSetVerificationError(
            f"{layout.url}: {len(incomplete)} of {plan.num_shards} shards are not complete: "
            f"{shown}{more}"
        )
    metadata: ShardSetMetadata | None = None
    rows = tokens = 0
    files = [_relative(layout, layout.plan_path())]
    for i in complete:
        path = layout.data_file(plan.shard(i).name)
        meta, num_rows = _footer_metadata(layout, path)
        record = read_done(layout, i)
        assert record is not None  # verify_shard said ok
        where = layout.fs.unstrip_protocol(path)
        if meta.plan_fingerprint != plan.fingerprint:
            raise ShardSetVerificationError(f"{where}: footer names another plan")
        if num_rows != record.rows:
            raise ShardSetVerificationError(
                f"{where}: footer has {num_rows} rows, completion record says {record.rows}"
            )
        if metadata is None:
            metadata = meta
        elif meta != metadata:
            raise ShardSetVerificationError(
                f"{where}: footer metadata differs from the first shard"
            )
        rows += record.rows
        tokens += record.tokens
        files += [_relative(layout, path), _relative(layout, layout.done_path(i))]
        if layout.fs.exists(layout.prompts_path(i)):
            files.append(_relative(layout, layout.prompts_path(i)))
    if metadata is not None and (not incomplete or layout.fs.exists(layout.card_path())):
        _check_card(layout, metadata)
    if layout.fs.exists(layout.card_path()):
        files.append(_relative(layout, layout.card_path()))
    return VerifyReport(plan, metadata, complete, incomplete, rows, tokens, sorted(files))


def _need_token() -> None:
    """Fail before any upload when no token is configured (only its presence is looked at)."""
    from huggingface_hub import get_token

    if not get_token():
        raise HubError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (the token is read by "
            "huggingface_hub and never printed or stored by logitforge)"
        )


def _transfer_cause(
    error: BaseException, kinds: tuple[type[BaseException], ...]
) -> BaseException | None:
    """The network or HTTP error behind ``error`` (its cause chain), if there is one."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _hub_failure(
    action: str, error: BaseException, resume: str, cause: BaseException | None = None
) -> HubError:
    """A request failure as a :class:`HubError` that says what happened and how to go on.

    Only exception types and first lines are kept: ``huggingface_hub`` error messages name
    the URL and the server's answer, never request headers (so never the token).
    """
    what = f"{type(error).__name__}: {_first_line(error)}"
    if cause is not None and cause is not error:
        what += f" <- {type(cause).__name__}: {_first_line(cause)}"
    return HubError(f"{action} failed ({what}). {resume}")


@dataclass
class PushResult:
    repo_id: str
    revision: str | None
    commit_url: str | None
    files: list[str]
    rows: int
    tokens: int
    partial: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit_url": self.commit_url,
            "files": len(self.files),
            "rows": self.rows,
            "tokens": self.tokens,
            "partial": self.partial,
        }


def push_shard_set(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    allow_partial: bool = False,
    log: Log = lambda _: None,
) -> PushResult:
    """Upload the shard set in ``folder`` to the dataset repo ``repo_id``.

    Order matters: the repo id, the folder (complete, consistent) and the token are all
    checked before the first request, so a bad call sends nothing. ``HfApi.upload_folder`` is
    resumable: a rerun after an interruption skips what the Hub already has (same oid) and
    commits the rest. Only the verified files are listed, so nothing else in the folder goes.
    """
    validate_repo_id(repo_id)
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    report = verify_shard_set(str(root), require_complete=not allow_partial)
    if report.incomplete:
        log(
            f"pushing a partial set: {len(report.complete)} of {report.plan.num_shards} shards "
            "complete; the others are left out"
        )
    if not report.complete:
        raise HubError(f"{root}: no complete shard to push")
    if "README.md" not in report.files:
        raise HubError(f"{root}: no dataset card (README.md); it is written when a run finishes")
    _need_token()

    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    resume = (
        f"Nothing in {root} was changed; run the same push again to resume (files the Hub "
        "already has are skipped)."
    )
    try:
        api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True)
        log(f"uploading {len(report.files)} files ({report.rows:,} rows) to {repo_id}")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=root,
            repo_type=REPO_TYPE,
            revision=revision,
            allow_patterns=report.files,  # exact paths: no cache, temp or stray file goes up
            commit_message=f"logitforge push: {len(report.complete)} shard(s), "
            f"{report.rows:,} rows, plan {report.plan.fingerprint[:12]}",
        )
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as e:
        raise _hub_failure(f"push to {repo_id}", e, resume) from e
    except RuntimeError as e:  # huggingface_hub wraps a failed LFS transfer in a RuntimeError
        cause = _transfer_cause(e, (HfHubHTTPError, httpx2.HTTPError, OSError))
        if cause is None:
            raise
        raise _hub_failure(f"push to {repo_id}", e, resume, cause) from e
    return PushResult(
        repo_id=repo_id,
        revision=revision,
        commit_url=getattr(info, "commit_url", None),
        files=report.files,
        rows=report.rows,
        tokens=report.tokens,
        partial=bool(report.incomplete),
    )


def pull_shard_set(
    repo_id: str,
    folder: str | Path,
    *,
    revision: str | None = None,
    allow_partial: bool = False,
    log: Log = lambda _: None,
) -> VerifyReport:
    """Download ``repo_id`` into ``folder`` and verify it as a shard set.

    ``snapshot_download`` keeps its own bookkeeping in ``folder/.cache/huggingface/`` (a dot
    folder: ``datasets`` and the reader ignore it, ``push`` never uploads it) and resumes an
    interrupted download. Verification then hashes every shard against its record and
    compares card, footers and plan; any disagreement raises :class:`ShardSetVerificationError`.
    """
    validate_repo_id(repo_id)
    import httpx2
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        path = snapshot_download(
            repo_id, repo_type=REPO_TYPE, revision=revision, local_dir=str(folder)
        )
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as e:
        raise _hub_failure(
            f"pull of {repo_id}", e, "Run the same pull again to resume the download."
        ) from e
    report = verify_shard_set(path, require_complete=not allow_partial)
    log(
        f"pulled {repo_id} into {path}: {len(report.complete)} shard(s), {report.rows:,} rows, "
        f"{report.tokens:,} tokens; sha256, footers and card verified"
    )
    return report
