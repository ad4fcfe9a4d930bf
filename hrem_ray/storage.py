"""One storage layer: every run, checkpoint, gallery and sweep path is a local path or a URI.

A URI is anything ``pyarrow.fs`` resolves (``s3://``, ``gs://``, ``file://``, ...): the
filesystem layer Ray itself uses for ``storage_path``. S3-compatible endpoints and credentials
come from the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so
no flag of ours names them (docs/storage.md).

Object stores have no rename, so a folder written here is *complete* once its marker
``.hrem-complete.json`` exists: the marker is written last and lists every file with its size
and SHA-256. ``fetch_dir`` copies a remote folder once per node into a local cache keyed by
that content, downloading into a temporary folder that is renamed into place only when every
file has been checked; readers then memory-map the local copy as they do any local folder.

This is the only module that tells a URI from a local path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pyarrow.fs as pafs

from hrem_ray.fileio import write_atomic, write_dir_atomic

MARKER = ".hrem-complete.json"
CACHE_ENV = "HREM_CACHE"
CHUNK = 8 << 20
# Fail in seconds, not minutes, when an endpoint is down (the SDK default retries for long).
S3_OPTIONS = dict(
    connect_timeout=5.0,
    request_timeout=60.0,
    retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
)
_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN")
CREDENTIALS_HELP = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN"

FileList = dict[str, dict[str, object]]  # relative path -> {"size": int, "sha256": str}


class StorageError(ValueError):
    """A URI that cannot be used: endpoint down, no bucket, nothing there, or access denied."""


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URI (``scheme://...``), False for a local path."""
    return "://" in str(path)


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (the same on every process of a node); a URI unchanged."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...``, keeping a URI's scheme (``os.path.join`` would not)."""
    if not is_remote(base):
        return str(Path(base, *parts))
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding ``path`` and the path inside it.

    S3 is rebuilt with short timeouts and the endpoint of ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL``: ``pyarrow.fs.S3FileSystem`` itself ignores those variables.
    """
    if not is_remote(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    try:
        fs, inner = pafs.FileSystem.from_uri(str(path))
    except (ValueError, OSError) as e:
        raise StorageError(f"{path}: {_one_line(e)}") from None
    if isinstance(fs, pafs.S3FileSystem):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = pafs.S3FileSystem(region=fs.region, endpoint_override=endpoint, **S3_OPTIONS)
    return fs, inner.rstrip("/")


@contextlib.contextmanager
def errors(uri: str | os.PathLike, what: str = "file") -> Iterator[None]:
    """Turn pyarrow's errors about ``uri`` into one-line ``StorageError``s that name it."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"no {what} at {uri}") from None
    except OSError as e:
        msg = str(e)
        if "NETWORK_CONNECTION" in msg:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            where = f" at {endpoint}" if endpoint else ""
            raise StorageError(f"{uri}: cannot reach the object store{where}") from None
        if "NO_SUCH_BUCKET" in msg:
            raise StorageError(f"{uri}: no such bucket") from None
        if any(code in msg for code in _DENIED):
            raise StorageError(f"{uri}: access denied ({CREDENTIALS_HELP})") from None
        raise StorageError(f"{uri}: {_one_line(e)}") from None


def check_access(path: str | os.PathLike) -> None:
    """Fail now, with a one-line error, if ``path``'s object store or bucket is unusable:
    call it before work whose result will be written there."""
    if not is_remote(path):
        return
    fs, inner = filesystem(path)
    if isinstance(fs, pafs.S3FileSystem):
        bucket = inner.split("/", 1)[0]
        with errors(path):
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(f"{path}: no such bucket")


def _info(path: str | os.PathLike) -> pafs.FileInfo:
    fs, inner = filesystem(path)
    with errors(path):
        return fs.get_file_info(inner)


def exists(path: str | os.PathLike) -> bool:
    return _info(path).type != pafs.FileType.NotFound


def is_dir(path: str | os.PathLike) -> bool:
    """A folder; on an object store, any prefix with objects under it."""
    return _info(path).type == pafs.FileType.Directory


def list_dir(path: str | os.PathLike) -> list[str]:
    """Names of the entries directly in folder ``path``, sorted; [] when there is none."""
    fs, inner = filesystem(path)
    with errors(path, "folder"):
        infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file. A random-access file reads it in one request of known size; pyarrow's
    input stream took 23 s for 75 MB from moto, against 0.2 s this way."""
    fs, inner = filesystem(path)
    with errors(path), fs.open_input_file(inner) as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode()


def write_text(path: str | os.PathLike, text: str) -> str:
    return write_bytes(path, text.encode())


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write a whole file atomically: locally a temp file renamed into place; on an object
    store one upload, which becomes visible only once complete."""
    if not is_remote(path):
        return str(write_atomic(path, lambda tmp: tmp.write_bytes(data)))
    fs, inner = filesystem(path)
    with errors(path), fs.open_output_stream(inner) as f:
        f.write(data)
    return str(path)


def read_head(path: str | os.PathLike, n: int) -> bytes:
    """The first ``n`` bytes of a file (fewer if it is shorter): one ranged read."""
    fs, inner = filesystem(path)
    with errors(path), fs.open_input_file(inner) as f:
        return f.read(n)


def file_size(path: str | os.PathLike) -> int | None:
    """The size of file ``path`` in bytes, None when there is no file there."""
    info = _info(path)
    return info.size if info.type == pafs.FileType.File else None


def write_dir(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path | str:
    """Call ``fill(folder)`` and make its result the folder ``path``, complete or not at all;
    returns the folder (a ``Path`` when local, else the URI).

    Locally the folder is renamed into place (``fileio.write_dir_atomic``); for a URI it is
    filled in a local temporary folder and uploaded with ``copy_dir``.
    """
    if not is_remote(path):
        return write_dir_atomic(path, fill)
    check_access(path)
    with tempfile.TemporaryDirectory(prefix="hrem-upload-") as tmp:
        fill(Path(tmp))
        return copy_dir(tmp, path)


def copy_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path | str:
    """Copy folder ``src`` to ``dst``, either of them local or a URI; readers of ``dst`` see
    the old folder or the new one, never a mix.

    On an object store the old marker is deleted first, the files are uploaded, the marker
    is written last, and files the new marker does not list are deleted after it.
    """
    local = fetch_dir(src)
    if not local.is_dir():
        raise StorageError(f"no folder at {src}")
    if not is_remote(dst):
        return write_dir_atomic(dst, partial(shutil.copytree, local, dirs_exist_ok=True))
    files = _local_files(local)
    fs, root = filesystem(dst)
    with errors(dst, "folder"):
        if fs.get_file_info(f"{root}/{MARKER}").type != pafs.FileType.NotFound:
            fs.delete_file(f"{root}/{MARKER}")
        for rel in files:
            with open(local / rel, "rb") as s, fs.open_output_stream(f"{root}/{rel}") as d:
                shutil.copyfileobj(s, d, CHUNK)
        with fs.open_output_stream(f"{root}/{MARKER}") as d:
            d.write(json.dumps({"files": files}, indent=1, sort_keys=True).encode())
        _delete_others(fs, root, {*files, MARKER})
    return str(dst)


def _delete_others(fs: pafs.FileSystem, root: str, keep: set[str]) -> None:
    """Delete what is under ``root`` but not in ``keep`` (relative file paths), folders
    included: pyarrow leaves an empty folder object behind a deleted file's folder."""
    kept_dirs = {"/".join(rel.split("/")[:i]) for rel in keep for i in range(1, rel.count("/") + 1)}
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    gone: list[str] = []
    for info in sorted(infos, key=lambda i: i.path):  # a folder sorts before its content
        rel = info.path[len(root) + 1 :]
        if any(rel.startswith(f"{d}/") for d in gone):
            continue
        if info.type == pafs.FileType.Directory and rel not in kept_dirs:
            fs.delete_dir(info.path)
            gone.append(rel)
        elif info.type == pafs.FileType.File and rel not in keep:
            fs.delete_file(info.path)


def put_files(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Copy every file under local folder ``src`` into folder ``dst`` (local or a URI), each
    file replaced whole and the folder's other files kept: for files that sit beside others
    in a run folder (metrics, plots), not for folders that must appear complete."""
    src = Path(src)
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = file.relative_to(src).as_posix()
        if not is_remote(dst):
            write_atomic(Path(dst, rel), partial(shutil.copyfile, file))
            continue
        fs, root = filesystem(dst)
        target = f"{root}/{rel}"
        with errors(dst, "folder"), open(file, "rb") as s, fs.open_output_stream(target) as d:
            shutil.copyfileobj(s, d, CHUNK)
    return str(dst)


def cache_root() -> Path:
    """This node's download cache: ``$HREM_CACHE``, else ``~/.cache/hrem-ray``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hrem-ray")


def fetch_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    """A local folder with the content of ``path``: the path itself when local, else this
    node's cached copy, downloaded once and reused by every process of the node.

    With a marker (folders written by ``copy_dir``/``write_dir``) the cache entry is keyed by
    the marker's content and every file is checked against its size and SHA-256; without one
    (e.g. a checkpoint persisted by Ray Train) it is keyed by the URI and the listing's names,
    sizes and modification times, and sizes are checked. Downloads go to a temporary folder
    renamed into place when complete, under a per-entry file lock, so concurrent fetches on
    one node download once; an entry whose files are missing or of the wrong size is fetched
    again. ``what`` names the thing in errors ("no checkpoint at s3://...").
    """
    if not is_remote(path):
        return Path(path)
    fs, root = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):  # file://
        return Path(root)
    with errors(path, what):
        files, key = _remote_manifest(fs, root, str(path), what)
        entry = cache_root() / key
        if _intact(entry, files):
            return entry
        entry.parent.mkdir(parents=True, exist_ok=True)
        with _locked(entry.with_name(f".{key}.lock")):
            if _intact(entry, files):  # another process fetched it while we waited
                return entry
            shutil.rmtree(entry, ignore_errors=True)  # damaged
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=entry.parent))
            try:
                for rel, want in files.items():
                    got = _download(fs, f"{root}/{rel}", tmp / rel)
                    if {k: got[k] for k in want} != want:
                        raise StorageError(
                            f"{what} at {path} changed during download ({rel}): try again"
                        )
                os.rename(tmp, entry)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return entry


def _remote_manifest(fs: pafs.FileSystem, root: str, uri: str, what: str) -> tuple[FileList, str]:
    """The files a remote folder consists of, and the cache key of that content."""
    listing = _remote_files(fs, root)
    if not listing:
        check_access(uri)  # a missing bucket lists as empty
        raise StorageError(f"no {what} at {uri}")
    if MARKER not in listing:
        files: FileList = {rel: {"size": size} for rel, (size, _) in listing.items()}
        seed = json.dumps([uri, sorted(listing.items())], default=str)
        return files, hashlib.sha256(seed.encode()).hexdigest()[:32]
    with fs.open_input_stream(f"{root}/{MARKER}") as f:
        raw = f.read()
    files = json.loads(raw)["files"]
    for rel, want in files.items():
        if rel not in listing or listing[rel][0] != want["size"]:
            raise StorageError(f"{what} at {uri} is incomplete: {rel} is missing or changed")
    return files, hashlib.sha256(raw).hexdigest()[:32]


def _remote_files(fs: pafs.FileSystem, root: str) -> dict[str, tuple[int, object]]:
    """relative path -> (size, mtime) of every file under ``root``; {} when there is none."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {
        info.path[len(root) + 1 :]: (info.size, info.mtime)
        for info in infos
        if info.type == pafs.FileType.File
    }


def _local_files(folder: Path) -> FileList:
    files: FileList = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder).as_posix()
        if rel != MARKER:
            files[rel] = {"size": file.stat().st_size, "sha256": _sha256(file)}
    return files


def _download(fs: pafs.FileSystem, src: str, dst: Path) -> dict[str, object]:
    """Copy one object to ``dst``; returns its size and SHA-256 as read."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with fs.open_input_file(src) as s, open(dst, "wb") as d:  # see read_bytes
        while chunk := s.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            d.write(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _intact(entry: Path, files: FileList) -> bool:
    """Whether a cache entry holds every file at its size (a cheap check, no hashing)."""
    try:
        return all((entry / rel).stat().st_size == want["size"] for rel, want in files.items())
    except OSError:
        return False


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """An exclusive lock between processes (and threads) of one node; released on exit,
    including when the holder dies."""
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
