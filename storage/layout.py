"""Where each file of a shard set lives.

A shard set is a folder that is also a valid Hugging Face dataset repository::

    <root>/README.md                              dataset card (YAML configs + logitforge block)
    <root>/data/train-00003-of-00016.parquet      shards, names fixed by the plan
    <root>/.logitforge/plan.json                  the frozen plan
    <root>/.logitforge/done/train-00003.json      completion record of shard 3
    <root>/.logitforge/prompts/train-00003.parquet  prepared prompt rows of shard 3

Bookkeeping lives under a dot folder so ``datasets`` and the Hub never mistake it for data.

``root`` may be on an object store (``s3://bucket/prefix``): there, listings are never cached
(other processes, the Dask workers, add shards and records all the time), and no folders are
created (object stores have none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fsspec

from storage.writer import OBJECT_STORE_PROTOCOLS, is_object_store


def shard_name(index: int, num_shards: int, split: str = "train") -> str:
    """``train-00003-of-00016.parquet``: the Hub's own naming, so split inference just works."""
    if num_shards < 1 or not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} out of range for {num_shards} shards")
    return f"{split}-{index:05d}-of-{num_shards:05d}.parquet"


@dataclass(frozen=True)
class ShardSetLayout:
    """Paths of one shard set on one fsspec filesystem. ``root`` has no protocol prefix."""

    fs: Any  # fsspec.AbstractFileSystem
    root: str
    split: str = "train"

    @classmethod
    def from_url(cls, url: str, split: str = "train", **storage_options: Any) -> ShardSetLayout:
        """Local path (the default) or any fsspec URL (``memory://x``, ``s3://bucket/x``...).

        Credentials and endpoints are not arguments here on purpose: they come from the
        environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``...)
        of each process, so they never enter a config, plan, record or Dask task.
        """
        if fsspec.utils.get_protocol(str(url)) in OBJECT_STORE_PROTOCOLS:
            # A cached listing would hide the shards and records workers write after it.
            storage_options.setdefault("use_listings_cache", False)
        fs, root = fsspec.core.url_to_fs(str(url), **storage_options)
        return cls(fs=fs, root=root.rstrip("/") or "/", split=split)

    @property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.root)

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def data_dir(self) -> str:
        return self.join("data")

    @property
    def meta_dir(self) -> str:
        return self.join(".logitforge")

    @property
    def done_dir(self) -> str:
        return self.join(".logitforge", "done")

    @property
    def prompts_dir(self) -> str:
        return self.join(".logitforge", "prompts")

    def data_path(self, index: int, num_shards: int) -> str:
        return self.join("data", shard_name(index, num_shards, self.split))

    def data_file(self, name: str) -> str:
        """Path of a data file by the name a plan recorded."""
        return self.join("data", name)

    def done_path(self, index: int) -> str:
        return self.join(".logitforge", "done", f"{self.split}-{index:05d}.json")

    def plan_path(self) -> str:
        return self.join(".logitforge", "plan.json")

    def prompts_path(self, index: int) -> str:
        return self.join(".logitforge", "prompts", f"{self.split}-{index:05d}.parquet")

    def card_path(self) -> str:
        return self.join("README.md")

    def shard_glob(self) -> str:
        return self.join("data", f"{self.split}-*.parquet")

    def ensure_dirs(self) -> None:
        """Create the folders on a filesystem that has them (not on an object store, where
        s3fs's makedirs would even create a missing bucket instead of failing)."""
        if is_object_store(self.fs):
            return
        for d in (self.data_dir, self.done_dir, self.prompts_dir):
            self.fs.makedirs(d, exist_ok=True)
