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

Object stores also fail for a moment: they reset connections, stall and answer 503 SlowDown.
Every operation here retries such transient errors with exponential backoff and jitter, for up
to ``HREM_STORAGE_RETRY_S`` (120 s) an operation, printing one line per retry to stderr. An
endpoint that is down, a missing bucket or bad credentials still fail in seconds before work
starts: a connection that cannot be made is retried only once an operation on that endpoint
has succeeded in this process, and the other two are never retried (docs/storage.md).

This is the only module that tells a URI from a local path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

from hrem_ray.errors import one_line
from hrem_ray.fileio import write_atomic, write_dir_atomic

MARKER = ".hrem-complete.json"
CACHE_ENV = "HREM_CACHE"
CHUNK = 8 << 20
# Fail in seconds, not minutes, when an endpoint is down (the SDK default retries for long).
# The SDK retries a request once, after 25-50 ms (the "standard" strategy waited about 0.5 s);
# retries with backoff are ``_retrying``'s, above it.
S3_OPTIONS = dict(
    connect_timeout=5.0,
    request_timeout=60.0,
    retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=2),
)
_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN")
CREDENTIALS_HELP = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN"
RETRY_ENV = "HREM_STORAGE_RETRY_S"
RETRY_S = 120.0  # default seconds one operation keeps retrying (HREM_STORAGE_RETRY_S)
_PAUSE_FIRST, _PAUSE_MAX = 0.5, 10.0
# pyarrow's texts (AWS error names, HTTP statuses, curl codes), as provoked through
# hrem_ray.testing.s3proxy: the connection could not be made at all ...
_UNREACHABLE = re.compile(
    r"curlCode: [567],|Failed to connect|Could not resolve|Connection timed out after"
)
# ... or the server answered "later" ...
_BUSY_REASONS = {
    "SLOW_DOWN": "HTTP 503 (slow down)",
    "SERVICE_UNAVAILABLE": "HTTP 503",
    "INTERNAL_FAILURE": "HTTP 500",
    "THROTTLING": "throttled",
    "REQUEST_LIMIT_EXCEEDED": "throttled",
    "REQUEST_TIMEOUT": "timed out",
}
_BUSY = re.compile(rf"HTTP status (429|500|502|503|504)\b|{'|'.join(_BUSY_REASONS)}")
# ... or the connection broke or stalled once made.
_BROKEN = re.compile(
    r"NETWORK_CONNECTION|Connection reset|Broken pipe|timed out|Timeout was reached", re.I
)
_healthy: set[str] = set()  # endpoints an operation has succeeded on in this process

T = TypeVar("T")

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
        raise StorageError(f"{path}: {one_line(e)}") from None
    if isinstance(fs, pafs.S3FileSystem):
        fs = pafs.S3FileSystem(region=fs.region, endpoint_override=_s3_endpoint(), **S3_OPTIONS)
    return fs, inner.rstrip("/")


RAY_SDK_ATTEMPTS = 10  # Ray's own persistence: the SDK's retries, with its backoff


def ray_storage(path: str | os.PathLike) -> tuple[str, pafs.FileSystem | None]:
    """``storage_path`` and ``storage_filesystem`` for Ray Train's and Tune's ``RunConfig``.

    Ray uploads checkpoints and results itself, not through this module, so a URI gets a
    filesystem whose SDK retries transient errors (``RAY_SDK_ATTEMPTS``) and knows the
    endpoint; Ray then names its files by their path inside it (``bucket/...``).
    """
    if not is_remote(path):
        return absolute(path), None
    fs, inner = filesystem(path)
    if not isinstance(fs, pafs.S3FileSystem):
        return str(path), None
    options = S3_OPTIONS | {
        "retry_strategy": pafs.AwsDefaultS3RetryStrategy(max_attempts=RAY_SDK_ATTEMPTS)
    }
    return inner, pafs.S3FileSystem(region=fs.region, endpoint_override=_s3_endpoint(), **options)


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _endpoint(uri: str | os.PathLike) -> str:
    """What ``uri``'s requests go to: the key of ``_healthy``."""
    scheme = str(uri).split("://", 1)[0]
    return f"s3 {_s3_endpoint()}" if scheme == "s3" else scheme


def retry_bound() -> float:
    """Seconds an operation keeps retrying transient errors: ``$HREM_STORAGE_RETRY_S``."""
    raw = os.environ.get(RETRY_ENV) or str(RETRY_S)
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise StorageError(f"{RETRY_ENV}={raw!r}: not a number of seconds") from None


def _transient(e: OSError, uri: str | os.PathLike) -> str | None:
    """A few words on why ``e`` (raised by an operation on ``uri``) is worth retrying, or
    None when it is not: local errors, no such key/bucket, access denied, and a connection
    that cannot be made to an endpoint that has not worked in this process (it is down)."""
    if not is_remote(uri) or isinstance(e, FileNotFoundError):
        return None
    msg = str(e)
    if busy := _BUSY.search(msg):
        return f"HTTP {busy[1]}" if busy[1] else _BUSY_REASONS[busy[0]]
    if _UNREACHABLE.search(msg):
        return "cannot connect" if _endpoint(uri) in _healthy else None
    if _BROKEN.search(msg):
        if re.search(r"reset|broken pipe", msg, re.I):
            return "connection reset"
        if re.search(r"curlCode: 28,|timed out|timeout", msg, re.I):
            return "timed out"
        curl = re.search(r"curlCode: (\d+)", msg)
        return f"connection lost (curl {curl[1]})" if curl else "connection lost"
    return None


def _retrying(
    uri: str | os.PathLike, op: Callable[[], T], what: str = "file", *, target: str = ""
) -> T:
    """``op()``, an operation on ``uri``, retried on transient errors (``_transient``) with
    exponential backoff and jitter for up to ``retry_bound()`` seconds, one stderr line per
    retry naming ``target`` (default ``uri``); any other error, or the last one, becomes a
    one-line ``StorageError`` naming ``uri`` (``what`` names the thing: "no folder at ...")."""
    bound, start, attempt = retry_bound(), time.monotonic(), 1
    while True:
        try:
            result = op()
        except StorageError:
            raise
        except OSError as e:
            reason = _transient(e, uri)
            if reason is None:
                raise _storage_error(e, uri, what) from None
            spent = time.monotonic() - start
            if spent >= bound:
                raise StorageError(
                    f"{uri}: {reason}, still failing after {attempt} attempts in {spent:.0f} s "
                    f"({RETRY_ENV}={bound:g})"
                ) from None
            pause = random.uniform(0.5, 1.0) * min(_PAUSE_MAX, _PAUSE_FIRST * 2 ** (attempt - 1))
            pause = min(pause, bound - spent)  # the last attempt comes at the bound
            attempt += 1
            print(
                f"storage: {target or uri}: {reason}, retrying (attempt {attempt}, {pause:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(pause)
        else:
            if is_remote(uri):
                _healthy.add(_endpoint(uri))
            return result


def _storage_error(e: OSError, uri: str | os.PathLike, what: str) -> StorageError:
    """pyarrow's error about ``uri`` as a one-line ``StorageError`` that names it."""
    if isinstance(e, FileNotFoundError):
        return StorageError(f"no {what} at {uri}")
    msg = str(e)
    if "NETWORK_CONNECTION" in msg:
        endpoint = _s3_endpoint()
        where = f" at {endpoint}" if endpoint else ""
        return StorageError(f"{uri}: cannot reach the object store{where}")
    if "NO_SUCH_BUCKET" in msg:
        return StorageError(f"{uri}: no such bucket")
    if any(code in msg for code in _DENIED):
        return StorageError(f"{uri}: access denied ({CREDENTIALS_HELP})")
    return StorageError(f"{uri}: {one_line(e)}")


def check_access(path: str | os.PathLike) -> None:
    """Fail now, with a one-line error, if ``path``'s object store or bucket is unusable:
    call it before work whose result will be written there."""
    if not is_remote(path):
        return
    fs, inner = filesystem(path)
    if isinstance(fs, pafs.S3FileSystem):
        bucket = inner.split("/", 1)[0]
        if _retrying(path, partial(fs.get_file_info, bucket)).type == pafs.FileType.NotFound:
            raise StorageError(f"{path}: no such bucket")


def _info(path: str | os.PathLike) -> pafs.FileInfo:
    fs, inner = filesystem(path)
    return _retrying(path, partial(fs.get_file_info, inner))


def exists(path: str | os.PathLike) -> bool:
    return _info(path).type != pafs.FileType.NotFound


def is_dir(path: str | os.PathLike) -> bool:
    """A folder; on an object store, any prefix with objects under it."""
    return _info(path).type == pafs.FileType.Directory


def list_dir(path: str | os.PathLike) -> list[str]:
    """Names of the entries directly in folder ``path``, sorted; [] when there is none."""
    fs, inner = filesystem(path)
    selector = pafs.FileSelector(inner, allow_not_found=True)
    infos = _retrying(path, partial(fs.get_file_info, selector), "folder")
    return sorted(info.base_name for info in infos)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file. A random-access file reads it in one request of known size; pyarrow's
    input stream took 23 s for 75 MB from moto, against 0.2 s this way."""
    fs, inner = filesystem(path)
    return _retrying(path, partial(_read, fs, inner, None))


def _read(fs: pafs.FileSystem, inner: str, n: int | None) -> bytes:
    with fs.open_input_file(inner) as f:
        return f.read(n)


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
    _retrying(path, partial(_write, fs, inner, data))
    return str(path)


def _write(fs: pafs.FileSystem, inner: str, data: bytes) -> None:
    with fs.open_output_stream(inner) as f:
        f.write(data)


def read_head(path: str | os.PathLike, n: int) -> bytes:
    """The first ``n`` bytes of a file (fewer if it is shorter): one ranged read."""
    fs, inner = filesystem(path)
    return _retrying(path, partial(_read, fs, inner, n))


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
    marker = f"{root}/{MARKER}"
    _retrying(dst, partial(_delete_if_there, fs, marker), "folder", target=join(dst, MARKER))
    for rel in files:
        upload = partial(_upload, fs, local / rel, f"{root}/{rel}")
        _retrying(dst, upload, "folder", target=join(dst, rel))
    listing = json.dumps({"files": files}, indent=1, sort_keys=True).encode()
    _retrying(dst, partial(_write, fs, marker, listing), "folder", target=join(dst, MARKER))
    _retrying(dst, partial(_delete_others, fs, root, {*files, MARKER}), "folder")
    return str(dst)


def _delete_if_there(fs: pafs.FileSystem, inner: str) -> None:
    if fs.get_file_info(inner).type != pafs.FileType.NotFound:
        fs.delete_file(inner)


def _upload(fs: pafs.FileSystem, src: Path, inner: str) -> None:
    with open(src, "rb") as s, fs.open_output_stream(inner) as d:
        shutil.copyfileobj(s, d, CHUNK)


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
        _retrying(dst, partial(_upload, fs, file, f"{root}/{rel}"), "folder", target=join(dst, rel))
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
    again. A file whose size or SHA-256 is wrong as downloaded is downloaded once more (a torn
    read) before the folder is called corrupt. ``what`` names the thing in errors ("no
    checkpoint at s3://...").
    """
    if not is_remote(path):
        return Path(path)
    fs, root = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):  # file://
        return Path(root)
    files, key = _retrying(path, partial(_remote_manifest, fs, root, str(path), what), what)
    entry = cache_root() / key
    if _intact(entry, files):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with lock_file(entry.with_name(f".{key}.lock")):
        if _intact(entry, files):  # another process fetched it while we waited
            return entry
        shutil.rmtree(entry, ignore_errors=True)  # damaged
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=entry.parent))
        try:
            for rel, want in files.items():
                _fetch_file(fs, root, rel, tmp, want, str(path), what)
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return entry


def _fetch_file(
    fs: pafs.FileSystem, root: str, rel: str, tmp: Path, want: dict, path: str, what: str
) -> None:
    """Download file ``rel`` of remote folder ``path`` into ``tmp`` and check it against its
    marker entry ``want``; once more on a mismatch, which a read torn by the network gives as
    well as a file that is corrupt on the server."""
    uri = join(path, rel)
    for attempt in (1, 2):
        got = _retrying(path, partial(_download, fs, f"{root}/{rel}", tmp / rel), what, target=uri)
        if {k: got[k] for k in want} == want:
            return
        if attempt == 1:
            print(f"storage: {uri}: differs from its marker, fetching it again", file=sys.stderr)
    raise StorageError(f"{what} at {path} is corrupt or changed during download ({rel})")


def _remote_manifest(fs: pafs.FileSystem, root: str, uri: str, what: str) -> tuple[FileList, str]:
    """The files a remote folder consists of, and the cache key of that content."""
    listing = _remote_files(fs, root)
    if not listing:
        check_access(uri)  # a missing bucket lists as empty
        raise StorageError(f"no {what} at {uri}")
    if MARKER not in listing:
        files: FileList = {rel: {"size": size} for rel, (size, _) in listing.items()}
        seed = json.dumps([uri, sorted(listing.items())], default=str)
        return files, sha256(seed.encode())[:32]
    with fs.open_input_stream(f"{root}/{MARKER}") as f:
        raw = f.read()
    files = json.loads(raw)["files"]
    for rel, want in files.items():
        if rel not in listing or listing[rel][0] != want["size"]:
            raise StorageError(f"{what} at {uri} is incomplete: {rel} is missing or changed")
    return files, sha256(raw)[:32]


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
            files[rel] = {"size": file.stat().st_size, "sha256": digest(file)["sha256"]}
    return files


def download(path: str | os.PathLike, dst: Path) -> dict[str, object]:
    """Copy the file ``path`` (local or a URI) to local ``dst``, hashing it on the way;
    returns its size and SHA-256 as read. ``dst`` is overwritten: callers that need it
    complete-or-absent download to a temporary name and rename (``data/cache.py``)."""
    fs, inner = filesystem(path)
    return _retrying(path, partial(_download, fs, inner, dst))


def digest(path: str | os.PathLike) -> dict[str, object]:
    """Size and SHA-256 of local file ``path``, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


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
def lock_file(lock: Path) -> Iterator[None]:
    """An exclusive lock between processes (and threads) of one node; released on exit,
    including when the holder dies."""
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sha256(data: bytes) -> str:
    """The SHA-256 of ``data`` in hex, as markers and shard manifests record it."""
    return hashlib.sha256(data).hexdigest()
