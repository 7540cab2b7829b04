"""push / pull / hf:// reading against a fake Hub, up to the HTTP boundary.

No network: an in-process fake of the Hub's HTTP API is installed as huggingface_hub's HTTP
client (``set_client_factory`` with an ``httpx2.MockTransport``). Everything above it is the
real huggingface_hub client code: create_repo, validate-yaml, preupload, the git-LFS batch API
and the PUT of each object, the NDJSON commit, then repo info, tree listing and resolve
(HEAD/GET with ranges) for snapshot_download and HfFileSystem. The fake stores files in memory
per commit and records every request, so the tests check what the client sent.

Uploads take the git-LFS path (hf_xet disabled for the test): hf_xet speaks its own protocol
from Rust, below httpx, so it cannot be faked at this boundary. One test also runs
upload_folder's hf_xet pipeline (the default when hf_xet is installed) with the fake answering
"regular" for every file, which that pipeline commits inline without any Xet transfer.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import io
import json
import logging
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import httpx2
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main as cli_main
from pipeline.hub import (
    HubError,
    ShardSetVerificationError,
    pull_shard_set,
    push_shard_set,
    validate_repo_id,
)
from storage.layout import ShardSetLayout
from storage.manifest import read_done, read_plan, write_done
from storage.reader import ShardSet
from storage.schema import METADATA_KEY
from tests.conftest import TEST_K, cache_settings, write_jsonl

TOKEN = "hf_" + "FAKEtokenNEVERlogged" + "x7Q2"  # built so the literal is not in this file
ENDPOINT_HOST = "huggingface.co"
LFS_HOST = "lfs.fake-hub.invalid"


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


@dataclass
class Recorded:
    method: str
    url: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class Repo:
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> path -> bytes
    branches: dict[str, str] = field(default_factory=dict)  # branch -> sha


class InterruptedUpload(httpx2.ReadError):
    """What the fake's transport raises to cut an upload off part way."""


class FakeHub:
    """The Hub endpoints huggingface_hub calls for push, pull and HfFileSystem, in memory."""

    def __init__(self, token: str, lfs_patterns: tuple[str, ...] = ("*.parquet",)) -> None:
        self.token = token
        self.lfs_patterns = lfs_patterns
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[Recorded] = []
        self.fail_on: object = None  # callable(Recorded) -> bool: raise instead of answering
        self.lock = threading.Lock()

    # -------------------------------------------------------------- plumbing

    def client(self) -> httpx2.Client:
        """The client huggingface_hub gets: its own request hook, our transport."""
        from huggingface_hub.utils._http import hf_request_event_hook

        return httpx2.Client(
            transport=httpx2.MockTransport(self.handle),
            event_hooks={"request": [hf_request_event_hook]},
            follow_redirects=True,
            timeout=None,
        )

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        body = request.read()
        parts = urlsplit(str(request.url))
        rec = Recorded(
            request.method,
            str(request.url),
            unquote(parts.path),
            parse_qs(parts.query),
            dict(request.headers),
            body,
        )
        with self.lock:
            self.requests.append(rec)
            if self.fail_on is not None and self.fail_on(rec):  # type: ignore[operator]
                raise InterruptedUpload("connection reset by the fake Hub", request=request)
            return self._route(rec)

    def _authorized(self, rec: Recorded) -> bool:
        return rec.headers.get("authorization") == f"Bearer {self.token}"

    @staticmethod
    def _json(data: object, status: int = 200, headers: dict | None = None) -> httpx2.Response:
        return httpx2.Response(status, json=data, headers=headers or {})

    def _error(self, status: int, message: str, code: str | None = None) -> httpx2.Response:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        return self._json({"error": message}, status, headers)

    # -------------------------------------------------------------- routing

    def _route(self, rec: Recorded) -> httpx2.Response:
        host = urlsplit(rec.url).hostname
        if host == LFS_HOST:
            return self._lfs_put(rec)
        assert host == ENDPOINT_HOST, rec.url
        p = rec.path
        if p == "/api/repos/create" and rec.method == "POST":
            return self._create_repo(rec)
        if p == "/api/validate-yaml" and rec.method == "POST":
            return self._validate_yaml(rec)
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)\.git/info/lfs/objects/batch", p)
        if m and rec.method == "POST":
            return self._lfs_batch(rec, m[1])
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/(\w[\w-]*)(?:/(.*))?)?", p)
        if m:
            repo_id, action, rest = m[1], m[2], m[3] or ""
            repo = self.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized(rec)):
                return self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
            if action in ("preupload", "commit", "branch") and not self._authorized(rec):
                return self._error(401, "Invalid credentials")
            if action == "preupload":
                return self._preupload(rec, repo, unquote(rest))
            if action == "commit":
                return self._commit(rec, repo_id, repo, unquote(rest))
            if action == "branch":
                return self._branch(repo, unquote(rest))
            if action is None or action == "revision":
                return self._repo_info(repo_id, repo, unquote(rest) or "main")
            if action == "tree":
                return self._tree(rec, repo, rest)
            if action == "paths-info":
                return self._paths_info(rec, repo, unquote(rest))
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", p)
        if m and rec.method in ("GET", "HEAD"):
            return self._resolve(rec, m[1], unquote(m[2]), m[3])
        return self._error(404, f"fake Hub has no endpoint {rec.method} {p}")

    # -------------------------------------------------------------- write side

    def _create_repo(self, rec: Recorded) -> httpx2.Response:
        if not self._authorized(rec):
            return self._error(401, "Invalid credentials")
        data = json.loads(rec.body)
        repo_id = f"{data['organization']}/{data['name']}"
        if data.get("type") != "dataset":
            return self._error(400, f"unexpected repo type {data.get('type')}")
        url = f"https://{ENDPOINT_HOST}/datasets/{repo_id}"
        if repo_id in self.repos:  # the real Hub's 409 also carries the repo's url
            message = "You already created this dataset repo"
            return self._json({"error": message, "url": url}, 409, {"X-Error-Message": message})
        repo = Repo(private=data.get("visibility") == "private" or bool(data.get("private")))
        repo.commits["0" * 40] = {}
        repo.branches["main"] = "0" * 40
        self.repos[repo_id] = repo
        return self._json({"url": url})

    def _validate_yaml(self, rec: Recorded) -> httpx2.Response:
        content = json.loads(rec.body)["content"]
        front = content.split("---")[1] if content.startswith("---") else ""
        try:
            yaml.safe_load(front)
        except yaml.YAMLError as e:
            return self._json({"errors": [{"message": str(e)}]}, 400)
        return self._json({"errors": [], "warnings": []})

    def _branch(self, repo: Repo, branch: str) -> httpx2.Response:
        if branch in repo.branches:
            return self._error(409, "Reference already exists")
        repo.branches[branch] = repo.branches["main"]
        return self._json({})

    def _snapshot(self, repo: Repo, rev: str) -> tuple[str, dict[str, bytes]] | None:
        sha = repo.branches.get(rev, rev if rev in repo.commits else None)
        return None if sha is None else (sha, repo.commits[sha])

    def _is_lfs(self, path: str) -> bool:
        return any(fnmatch.fnmatch(path, pattern) for pattern in self.lfs_patterns)

    def _preupload(self, rec: Recorded, repo: Repo, rev: str) -> httpx2.Response:
        snap = self._snapshot(repo, rev)
        files = snap[1] if snap else {}
        out = []
        for f in json.loads(rec.body)["files"]:
            lfs = self._is_lfs(f["path"])
            old = files.get(f["path"])
            oid = None
            if old is not None:
                oid = hashlib.sha256(old).hexdigest() if lfs else _git_blob_sha1(old)
            out.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return self._json({"files": out, "commitOid": snap[0] if snap else None})

    def _lfs_batch(self, rec: Recorded, repo_id: str) -> httpx2.Response:
        if repo_id not in self.repos or not self._authorized(rec):
            return self._error(401, "Invalid credentials")
        data = json.loads(rec.body)
        objects = []
        for obj in data["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs:  # already stored: no actions, the client skips it
                entry["actions"] = {"upload": {"href": f"https://{LFS_HOST}/upload/{obj['oid']}"}}
            objects.append(entry)
        return self._json({"transfer": "basic", "objects": objects})

    def _lfs_put(self, rec: Recorded) -> httpx2.Response:
        oid = rec.path.rsplit("/", 1)[-1]
        if rec.method != "PUT" or hashlib.sha256(rec.body).hexdigest() != oid:
            return self._error(400, "LFS object does not match its oid")
        self.lfs[oid] = rec.body
        return httpx2.Response(200)

    def _commit(self, rec: Recorded, repo_id: str, repo: Repo, rev: str) -> httpx2.Response:
        snap = self._snapshot(repo, rev)
        if snap is None:
            return self._error(404, f"Revision {rev} not found", "RevisionNotFound")
        files = dict(snap[1])
        lines = [json.loads(line) for line in rec.body.decode().splitlines() if line]
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return self._error(422, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.lfs[value["oid"]]
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
            else:
                return self._error(400, f"fake Hub does not support {item['key']}")
        sha = hashlib.sha1(f"{snap[0]}{sorted(files.items())}".encode()).hexdigest()
        repo.commits[sha] = files
        repo.branches[rev] = sha
        return self._json(
            {
                "commitUrl": f"https://{ENDPOINT_HOST}/datasets/{repo_id}/commit/{sha}",
                "commitOid": sha,
                "pullRequestUrl": None,
            }
        )

    # -------------------------------------------------------------- read side

    def _entry(self, path: str, data: bytes, expand: bool = False) -> dict:
        entry = {"type": "file", "path": path, "size": len(data), "oid": _git_blob_sha1(data)}
        if self._is_lfs(path):
            entry["lfs"] = {
                "oid": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "pointerSize": 130,
            }
        return entry

    def _repo_info(self, repo_id: str, repo: Repo, rev: str) -> httpx2.Response:
        snap = self._snapshot(repo, rev)
        if snap is None:
            return self._error(404, f"Revision {rev} not found", "RevisionNotFound")
        sha, files = snap
        return self._json(
            {
                "_id": "fake",
                "id": repo_id,
                "sha": sha,
                "private": repo.private,
                "siblings": [{"rfilename": p} for p in sorted(files)],
            }
        )

    def _dirs(self, files: dict[str, bytes]) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}

    def _tree(self, rec: Recorded, repo: Repo, rest: str) -> httpx2.Response:
        rev, _, prefix = rest.partition("/")
        snap = self._snapshot(repo, unquote(rev))
        if snap is None:
            return self._error(404, "Revision not found", "RevisionNotFound")
        files, prefix = snap[1], unquote(prefix).strip("/")
        recursive = rec.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        if prefix and prefix not in self._dirs(files):
            return self._error(404, f"{prefix} not found", "EntryNotFound")
        base = f"{prefix}/" if prefix else ""

        def shown(path: str) -> bool:
            return path.startswith(base) and (recursive or "/" not in path[len(base) :])

        out = [{"type": "directory", "path": d, "oid": "0" * 40} for d in sorted(self._dirs(files))]
        out = [d for d in out if shown(d["path"])]
        out += [self._entry(p, files[p]) for p in sorted(files) if shown(p)]
        return self._json(out)

    def _paths_info(self, rec: Recorded, repo: Repo, rev: str) -> httpx2.Response:
        snap = self._snapshot(repo, rev)
        if snap is None:
            return self._error(404, "Revision not found", "RevisionNotFound")
        files = snap[1]
        if rec.headers.get("content-type", "").startswith("application/json"):
            paths = json.loads(rec.body)["paths"]
        else:
            paths = parse_qs(rec.body.decode())["paths"]
        out = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(self._entry(p, files[p]))
            elif p in self._dirs(files) or p == "":
                out.append({"type": "directory", "path": p, "oid": "0" * 40})
        return self._json(out)

    def _resolve(self, rec: Recorded, repo_id: str, rev: str, path: str) -> httpx2.Response:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized(rec)):
            return self._error(404, "Repository not found", "RepoNotFound")
        snap = self._snapshot(repo, rev)
        if snap is None:
            return self._error(404, "Revision not found", "RevisionNotFound")
        sha, files = snap
        if path not in files:
            return self._error(404, f"{path} not found", "EntryNotFound")
        data = files[path]
        etag = hashlib.sha256(data).hexdigest() if self._is_lfs(path) else _git_blob_sha1(data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        status, content = 200, data
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rec.headers.get("range", ""))
        if m:
            start = int(m[1])
            stop = min(int(m[2]) + 1 if m[2] else len(data), len(data))
            status, content = 206, data[start:stop]
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        headers["Content-Length"] = str(len(content))
        if rec.method == "HEAD":
            return httpx2.Response(status, headers=headers)
        return httpx2.Response(status, headers=headers, content=content)

    # -------------------------------------------------------------- helpers for tests

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[rev]]

    def calls(self, method: str, pattern: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fresh fake Hub as huggingface_hub's HTTP client; the token only in HF_TOKEN."""
    import huggingface_hub
    from huggingface_hub import _commit_api, constants, hf_api

    fake = FakeHub(TOKEN)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1
    monkeypatch.setattr(constants, "ENDPOINT", f"https://{ENDPOINT_HOST}")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 10)
    # LFS path: hf_xet transfers cannot be faked at the HTTP boundary (see module docstring).
    monkeypatch.setattr(hf_api, "is_xet_available", lambda: False)
    monkeypatch.setattr(_commit_api, "is_xet_available", lambda: False)
    huggingface_hub.set_client_factory(fake.client)
    try:
        yield fake
    finally:
        from huggingface_hub.utils._http import default_client_factory

        huggingface_hub.set_client_factory(default_client_factory)


@pytest.fixture(scope="module")
def real_set(tmp_path_factory, teacher_dir, dask_client) -> Path:
    """A small real shard set: the embedded teacher, k = 4, 40 rows in 3 shards."""
    from pipeline.config import CacheTeacherConfig
    from pipeline.demo.task import DEFAULT_TASK, generate
    from pipeline.execute import run_cache_teacher

    root = tmp_path_factory.mktemp("hub-real")
    rows = write_jsonl(root / "rows.jsonl", generate(DEFAULT_TASK, 40, "train", seed=3))
    settings = cache_settings(rows, root / "set", teacher_dir)
    settings["teacher"]["k"] = 4
    settings["output"]["rows_per_shard"] = 16
    run_cache_teacher(
        CacheTeacherConfig.model_validate(settings), client=dask_client, log=lambda _: None
    )
    assert TEST_K != 4  # the set really is small-k, not the session default
    return root / "set"


def _small_set(path: Path) -> Path:
    """A synthetic complete shard set (plan, 2 shards, records, card): for the error paths."""
    from tests.test_storage_shards import write_shard_set

    write_shard_set(str(path), [[3, 4], [2, 5, 1]])
    return path


def _tree_bytes(root: Path, skip_cache: bool = True) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not (skip_cache and p.relative_to(root).parts[0] == ".cache")
    }


@pytest.fixture
def hub_logs():
    """Every log record, huggingface_hub's included (its root logger does not propagate)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield records
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


# ------------------------------------------------------------------ the round trip


@pytest.mark.slow
def test_push_pull_round_trip_of_a_real_set(real_set, hub, hub_logs, capfd, tmp_path):
    repo_id = "distill-lab/arith-k4"
    local = _tree_bytes(real_set)
    rc = cli_main(["push", str(real_set), repo_id, "--private", "--revision", "main"])
    assert rc == 0
    out, err = capfd.readouterr()

    # Requests: repo created private, as a dataset; card validated; every Parquet shard went
    # through the LFS batch API and a PUT; one commit on main carried every file.
    create = hub.calls("POST", r"^/api/repos/create$")
    assert len(create) == 1
    assert json.loads(create[0].body) == {
        "name": "arith-k4",
        "organization": "distill-lab",
        "visibility": "private",
        "type": "dataset",
    }
    assert hub.repos[repo_id].private
    assert hub.calls("POST", r"^/api/validate-yaml$")
    assert hub.calls("POST", rf"^/api/datasets/{repo_id}/preupload/main$")
    parquet = {p for p in local if p.endswith(".parquet")}
    batch = hub.calls("POST", rf"^/datasets/{repo_id}\.git/info/lfs/objects/batch$")
    oids = {o["oid"] for b in batch for o in json.loads(b.body)["objects"]}
    assert oids == {hashlib.sha256(local[p]).hexdigest() for p in parquet}
    assert all(json.loads(b.body)["ref"] == {"name": "main"} for b in batch)
    assert len([r for r in hub.requests if r.method == "PUT"]) == len(parquet)
    commits = hub.calls("POST", rf"^/api/datasets/{repo_id}/commit/main$")
    assert len(commits) == 1
    committed = {
        json.loads(line)["value"]["path"]
        for line in commits[0].body.decode().splitlines()[1:]
        if line
    }
    plan = read_plan(ShardSetLayout.from_url(str(real_set)))
    assert plan is not None and plan.num_shards == 3
    expected = {"README.md", ".logitforge/plan.json"}
    expected |= {f"data/{s.name}" for s in plan.shards}
    expected |= {f".logitforge/done/train-{i:05d}.json" for i in range(3)}
    expected |= {f".logitforge/prompts/train-{i:05d}.parquet" for i in range(3)}
    assert committed == expected == set(local)
    assert hub.files(repo_id) == local  # byte for byte on the Hub

    # The token: in the Authorization header of every Hub API request, nowhere else.
    # huggingface_hub also fetches a public registry for its user agent, without a token.
    api_requests = [
        r
        for r in hub.requests
        if urlsplit(r.url).hostname == ENDPOINT_HOST and r.path != "/api/agent-harnesses"
    ]
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api_requests)
    assert not [
        r
        for r in hub.requests
        if r.path == "/api/agent-harnesses" and r.headers.get("authorization")
    ]
    for r in hub.requests:
        assert TOKEN not in r.url
        assert TOKEN.encode() not in r.body
        assert all(TOKEN not in v for k, v in r.headers.items() if k != "authorization")
    lfs_puts = [r for r in hub.requests if urlsplit(r.url).hostname == LFS_HOST]
    assert lfs_puts and all("authorization" not in r.headers for r in lfs_puts)
    assert hub_logs, "the client logged nothing: the log check would be vacuous"
    for text in (out, err, *(rec.getMessage() for rec in hub_logs)):
        assert TOKEN not in text
    for blob in (*local.values(), *_tree_bytes(real_set, skip_cache=False).values()):
        assert TOKEN.encode() not in blob
    assert _tree_bytes(real_set) == local  # push changed nothing locally

    # Pull into a new folder: same bytes, verified, same rows through the reader.
    pulled = tmp_path / "pulled"
    assert cli_main(["pull", repo_id, str(pulled)]) == 0
    assert _tree_bytes(pulled) == local
    assert (pulled / ".cache" / "huggingface").is_dir()  # huggingface_hub's own bookkeeping
    a = ShardSet.open(str(real_set)).to_batch(strict=True)
    b = ShardSet.open(str(pulled)).to_batch(strict=True)
    assert a.ids == b.ids and a.num_rows == 40 and a.k == 4
    for name in ("row_offsets", "input_ids", "topk_ids", "topk_logprobs", "next_logprob"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))

    # Plain `datasets` reads the pulled folder through the card's configs (not confused by
    # .cache/ or .logitforge/).
    import datasets

    ds = datasets.load_dataset(str(pulled), split="train", cache_dir=str(tmp_path / "ds-cache"))
    assert ds["id"] == a.ids
    assert len(ds[0]["topk_ids"][0]) == 4

    # Pushing the pulled copy again uploads nothing new: no LFS PUT, no .cache file offered.
    before = len(hub.requests)
    assert cli_main(["push", str(pulled), repo_id]) == 0
    again = hub.requests[before:]
    assert not [r for r in again if r.method == "PUT"]
    offered = {
        f["path"]
        for r in again
        if r.path.endswith("/preupload/main")
        for f in json.loads(r.body)["files"]
    }
    assert offered == expected
    assert hub.files(repo_id) == local


@pytest.mark.slow
def test_hf_url_reads_the_same_rows_through_the_fake_hub(real_set, hub, tmp_path):
    from huggingface_hub import HfFileSystem

    repo_id = "distill-lab/arith-hf-url"
    push_shard_set(real_set, repo_id)
    HfFileSystem.clear_instance_cache()
    shards = ShardSet.open(f"hf://datasets/{repo_id}")
    assert shards.layout.url.startswith("hf://datasets/")
    assert all(why == "ok" for why in shards.check().values())  # sha256 over hf://
    remote = shards.to_batch(strict=True)
    local = ShardSet.open(str(real_set)).to_batch(strict=True)
    assert remote.ids == local.ids
    np.testing.assert_array_equal(remote.topk_logprobs, local.topk_logprobs)
    assert hub.calls("GET", rf"^/datasets/{repo_id}/resolve/")


# ------------------------------------------------------------------ bad input


def test_invalid_repo_id_sends_no_request(hub, tmp_path, capsys):
    folder = _small_set(tmp_path / "set")
    for bad in ("no-owner", "a/b/c", "owner/bad name", "owner/--x", "owner/x..y"):
        with pytest.raises(HubError, match="invalid repo id"):
            validate_repo_id(bad)
        with pytest.raises(HubError, match="invalid repo id"):
            push_shard_set(folder, bad)
        with pytest.raises(HubError, match="invalid repo id"):
            pull_shard_set(bad, tmp_path / "pulled")
    assert cli_main(["push", str(folder), "owner/bad name"]) == 2
    assert "invalid repo id" in capsys.readouterr().err
    assert hub.requests == []
    assert not (tmp_path / "pulled").exists()


def test_partial_set_is_refused_unless_allowed(hub, tmp_path):
    folder = _small_set(tmp_path / "set")
    layout = ShardSetLayout.from_url(str(folder))
    (folder / ".logitforge" / "done" / "train-00001.json").unlink()
    with pytest.raises(ShardSetVerificationError, match="1 of 2 shards are not complete"):
        push_shard_set(folder, "owner/partial")
    assert hub.requests == []
    result = push_shard_set(folder, "owner/partial", allow_partial=True)
    assert result.partial
    files = hub.files("owner/partial")
    assert "data/train-00000-of-00002.parquet" in files
    assert "data/train-00001-of-00002.parquet" not in files  # no record: not a shard yet
    assert read_done(layout, 0) is not None


def test_push_without_token_fails_before_any_request(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(HubError, match="no Hugging Face token"):
        push_shard_set(_small_set(tmp_path / "set"), "owner/name")
    assert hub.requests == []


def test_interrupted_upload_is_reported_and_a_rerun_completes(hub, tmp_path, monkeypatch):
    import huggingface_hub.utils._http as hub_http

    folder = _small_set(tmp_path / "set")
    local = _tree_bytes(folder)
    repo_id = "owner/interrupted"
    puts = []

    def connection_lost_after_first_put(rec: Recorded) -> bool:
        if rec.method == "PUT":
            puts.append(rec)
            return len(puts) > 1  # the first object lands, then the link is down for good
        return False

    # The client retries each PUT 5 times with backoff; skip the waiting, not the retries.
    monkeypatch.setattr(hub_http.time, "sleep", lambda _: None)
    hub.fail_on = connection_lost_after_first_put
    with pytest.raises(HubError, match=r"push to owner/interrupted failed .*run the same push"):
        push_shard_set(folder, repo_id)
    assert hub.files(repo_id) == {}  # nothing committed
    assert len(hub.lfs) == 1
    assert _tree_bytes(folder, skip_cache=False) == local  # nothing local lost or added

    hub.fail_on = None
    before = len(hub.requests)
    push_shard_set(folder, repo_id)
    assert hub.files(repo_id) == local
    rerun_puts = [r for r in hub.requests[before:] if r.method == "PUT"]
    # The client really retried: an object that failed was tried 1 + 5 times before the push
    # gave up. How many of the other 2 it started first depends on its upload threads.
    tries = Counter(r.url for r in puts[1:])
    assert max(tries.values()) == 6 and set(tries.values()) <= {1, 2, 3, 4, 5, 6}
    assert len(rerun_puts) == 3  # the object the Hub already had was not sent again


def test_pulled_card_that_disagrees_with_the_footers_is_an_error(hub, tmp_path):
    folder = _small_set(tmp_path / "set")
    card = folder / "README.md"
    card.write_text(card.read_text().replace("codec: fp16", "codec: q8"))
    # The local check refuses to push it...
    with pytest.raises(ShardSetVerificationError, match=r"card metadata disagrees.*codec"):
        push_shard_set(folder, "owner/liar")
    # ...and a repo that holds such a set (pushed by anything else) fails the pull.
    _upload_raw(hub, "owner/liar", folder)
    with pytest.raises(ShardSetVerificationError, match="card 'q8' vs footers 'fp16'"):
        pull_shard_set("owner/liar", tmp_path / "pulled")


def test_pulled_set_with_a_corrupted_shard_is_an_error(hub, tmp_path):
    folder = _small_set(tmp_path / "set")
    push_shard_set(folder, "owner/flip")
    files = hub.repos["owner/flip"].commits[hub.repos["owner/flip"].branches["main"]]
    name = "data/train-00001-of-00002.parquet"
    data = bytearray(files[name])
    data[len(data) // 2] ^= 0xFF
    files[name] = bytes(data)
    with pytest.raises(ShardSetVerificationError, match=r"train-00001.*sha256 mismatch"):
        pull_shard_set("owner/flip", tmp_path / "pulled")


def test_unknown_format_version_is_an_error(hub, tmp_path):
    folder = _small_set(tmp_path / "set")
    plan_path = folder / ".logitforge" / "plan.json"
    plan = json.loads(plan_path.read_text())
    plan["format_version"] = 99
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(ShardSetVerificationError, match="format_version 99 is newer"):
        push_shard_set(folder, "owner/future")
    assert hub.requests == []
    _upload_raw(hub, "owner/future", folder)
    with pytest.raises(ShardSetVerificationError, match="format_version 99 is newer"):
        pull_shard_set("owner/future", tmp_path / "pulled")


def test_unknown_footer_format_version_is_an_error(tmp_path):
    """A shard written by a newer logitforge (footer format_version 99, records consistent)."""
    from pipeline.hub import verify_shard_set

    folder = _small_set(tmp_path / "set")
    layout = ShardSetLayout.from_url(str(folder))
    path = folder / "data" / "train-00000-of-00002.parquet"
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    meta["format_version"] = 99
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    with io.BytesIO() as buf:
        pq.write_table(table, buf)
        path.write_bytes(buf.getvalue())
    record = read_done(layout, 0)
    assert record is not None
    write_done(
        layout,
        record.model_copy(
            update={
                "bytes": path.stat().st_size,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        ),
    )
    with pytest.raises(ShardSetVerificationError, match="format_version 99 is newer"):
        verify_shard_set(str(folder))


def test_push_through_the_xet_pipeline_with_regular_files(monkeypatch, tmp_path):
    """upload_folder's default path when hf_xet is installed (the streamed multi-commit
    pipeline); the fake answers "regular" for every file, so no Xet transfer is needed."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils._http import default_client_factory
    from huggingface_hub.utils._runtime import is_xet_available

    if not is_xet_available():
        pytest.skip("hf_xet is not installed: upload_folder takes the create_commit path")
    fake = FakeHub(TOKEN, lfs_patterns=())
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"https://{ENDPOINT_HOST}")
    huggingface_hub.set_client_factory(fake.client)
    try:
        folder = _small_set(tmp_path / "set")
        push_shard_set(folder, "owner/pipeline", revision="v1")
        assert fake.calls("POST", r"^/api/datasets/owner/pipeline/branch/v1$")
        assert fake.calls("POST", r"^/api/datasets/owner/pipeline/commit/v1$")
        assert fake.files("owner/pipeline", "v1") == _tree_bytes(folder)
        assert fake.files("owner/pipeline", "main") == {}
    finally:
        huggingface_hub.set_client_factory(default_client_factory)


def _upload_raw(hub: FakeHub, repo_id: str, folder: Path) -> None:
    """Put a folder on the fake Hub as is, bypassing push's checks (another tool's upload)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="dataset")
