"""The node's shard cache: every shard read once per node, checked as it lands (docs/data.md).

A shard in object storage is downloaded into ``<cache>/shards/<split key>/`` under a per-shard
file lock (concurrent workers of a node download it once), hashed on the way, checked against
the manifest's size and SHA-256 (a torn download is fetched once more before the shard is
called corrupt) and renamed into place: a cached shard is complete or absent. From then on
it is read from local disk as the precomp ``.npy`` is. When the cached shards exceed the byte
budget (``data.cache_limit``), the least recently used are deleted; a process that still reads
one keeps its open file.

A local shard is not copied: the first process of a node to use it hashes it in place and
leaves a stamp (size, modification time, checksum), so it too is checked once per node.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from hrem_ray import storage
from hrem_ray.data.shards import ShardError

MARGIN_BYTES = 2 << 30  # left free on the cache's disk by the automatic budget


def shard_cache_root() -> Path:
    return storage.cache_root() / "shards"


def auto_limit(root: Path) -> int:
    """What fits: the free space of the cache's disk plus what the cache holds, less a margin."""
    root.mkdir(parents=True, exist_ok=True)
    held = sum(stat.st_size for _, stat in cached(root))
    return max(0, shutil.disk_usage(root).free + held - MARGIN_BYTES)


class NodeCache:
    """Shards of one split on this node's disk, fetched once and checked once (see module)."""

    def __init__(self, key: str, limit: int | None, root: Path | None = None) -> None:
        self.root = root or shard_cache_root()
        self.folder = self.root / key
        self.limit = auto_limit(self.root) if limit is None else limit
        self.bytes_fetched = 0  # by this process: the benchmark's cross-check of the proxy
        self._lock = threading.Lock()
        if self.root.is_dir():
            self.evict()  # a smaller budget than the last run's takes effect at once

    def local(self, uri: str, size: int, sha256: str) -> Path:
        """A checked local copy of shard ``uri`` (fetched now if absent); every use touches
        it, which is the recency that eviction goes by."""
        path = self.folder / Path(uri).name
        if _size(path) == size:
            _touch(path)
            return path
        self.folder.mkdir(parents=True, exist_ok=True)
        with storage.lock_file(path.with_name(f".{path.name}.lock")):
            if _size(path) != size:  # nobody fetched it while we waited
                self._fetch(uri, path, size, sha256)
        self.evict(keep={path})
        return path

    def _fetch(self, uri: str, path: Path, size: int, sha256: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
        try:
            for attempt in (1, 2):  # a torn download is not corruption: once more
                try:
                    got = storage.download(uri, Path(tmp))
                except storage.StorageError as e:
                    raise ShardError(f"{uri}: cannot read shard ({e})") from None
                with self._lock:
                    self.bytes_fetched += int(got["size"])
                problem = _mismatch(uri, got, size, sha256)
                if problem is None:
                    os.replace(tmp, path)
                    return
                if attempt == 2:
                    raise ShardError(problem)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def evict(self, keep: Iterable[Path] = ()) -> None:
        """Delete least recently used shards of every split until the cache fits its budget."""
        keep = set(keep)
        files = sorted(cached(self.root), key=lambda fs: fs[1].st_mtime_ns)
        total = sum(stat.st_size for _, stat in files)
        for f, stat in files:
            if total <= self.limit:
                break
            if f not in keep:
                total -= stat.st_size
                f.unlink(missing_ok=True)


def verified_local(path: str, size: int, sha256: str) -> Path:
    """Local shard ``path`` after a once-per-node checksum (a stamp records size and mtime)."""
    file = Path(path)
    stat = _stat(file)
    if stat is None:
        raise ShardError(f"{path}: shard missing")
    stamp = storage.cache_root() / "verified" / storage.sha256(path.encode())[:32]
    want = {"size": size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    if _read_json(stamp) == want:
        return file
    got = storage.digest(path) if stat.st_size == size else {"size": stat.st_size}
    problem = _mismatch(path, got, size, sha256)
    if problem:
        raise ShardError(problem)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    storage.write_text(stamp, json.dumps(want))
    return file


def _mismatch(uri: str, got: dict, size: int, sha256: str) -> str | None:
    if got["size"] != size:
        return f"{uri}: shard is {got['size']} bytes, the manifest says {size}"
    if got.get("sha256") != sha256:
        return f"{uri}: shard checksum differs from the manifest's (corrupt)"
    return None


def cached(root: Path) -> list[tuple[Path, os.stat_result]]:
    """The cached shards under ``root`` with their stats (another process may evict any)."""
    found = ((f, _stat(f)) for f in root.glob("*/*.npy"))
    return [(f, stat) for f, stat in found if stat is not None]


def _size(path: Path) -> int | None:
    stat = _stat(path)
    return None if stat is None else stat.st_size


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _touch(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):  # evicted by another process: fetched again
        os.utime(path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
