"""The storage layer against a real S3 server (moto): round trips, complete folders, the node
cache, and one-line errors for the four kinds of bad URI (docs/storage.md)."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import boto3
import numpy as np
import pytest

from hrem_ray import storage
from hrem_ray.checkpoint import copy_checkpoint, read_record
from hrem_ray.cli import main
from hrem_ray.index.gallery import Gallery
from hrem_ray.serving.service import RetrievalService
from hrem_ray.storage import MARKER, StorageError
from hrem_ray.testing import free_port, start_moto, stop_group, tiny_data_and_checkpoint
from tests.conftest import S3_BUCKET
from tests.helpers import run_err

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def s3_uri(s3_server, tmp_path, monkeypatch) -> str:
    """A fresh prefix in the test bucket, and a fresh node cache for this test."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}"


def make_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


FILES = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 100, "sub/deeper/c.json": b"{}"}


def count_downloads(monkeypatch) -> list[str]:
    """The objects ``fetch_dir`` downloads from now on, in order."""
    seen: list[str] = []
    real = storage._download

    def counting(fs, src, dst):
        seen.append(src)
        return real(fs, src, dst)

    monkeypatch.setattr(storage, "_download", counting)
    return seen


def test_paths_and_uris(tmp_path):
    assert storage.is_remote("s3://b/k") and storage.is_remote("gs://b/k")
    assert not storage.is_remote(tmp_path) and not storage.is_remote("runs/x")
    assert storage.join("s3://b/run/", "best", "config.json") == "s3://b/run/best/config.json"
    assert storage.join(tmp_path, "best") == str(tmp_path / "best")
    assert storage.absolute("s3://b/k") == "s3://b/k"
    assert storage.absolute("runs") == str(Path("runs").resolve())
    assert storage.fetch_dir(tmp_path) == tmp_path  # local folders are used in place
    assert storage.fetch_dir(f"file://{tmp_path}") == tmp_path


def test_file_round_trip(s3_uri, tmp_path):
    uri = storage.join(s3_uri, "run", "metrics.json")
    assert not storage.exists(uri)
    assert storage.write_text(uri, '{"rsum": 1}') == uri
    assert storage.read_text(uri) == '{"rsum": 1}'
    assert storage.exists(uri) and not storage.is_dir(uri)
    assert storage.is_dir(storage.join(s3_uri, "run"))
    assert storage.list_dir(storage.join(s3_uri, "run")) == ["metrics.json"]
    assert storage.list_dir(storage.join(s3_uri, "nothing")) == []
    storage.write_text(uri, "v2")  # overwrite
    assert storage.read_bytes(uri) == b"v2"
    local = tmp_path / "out" / "m.json"
    storage.write_text(local, "local")
    assert storage.read_text(local) == "local"
    assert [p.name for p in local.parent.iterdir()] == ["m.json"]  # no temp file left


def test_copy_dir_round_trip_and_overwrite(s3_uri, tmp_path):
    src = make_folder(tmp_path / "src", FILES)
    uri = storage.join(s3_uri, "ckpt")
    assert storage.copy_dir(src, uri) == uri
    assert sorted(storage.list_dir(uri)) == sorted([MARKER, "a.txt", "sub"])
    marker = json.loads(storage.read_text(storage.join(uri, MARKER)))
    assert {rel: f["size"] for rel, f in marker["files"].items()} == {
        rel: len(data) for rel, data in FILES.items()
    }
    local = storage.fetch_dir(uri)
    assert {rel: (local / rel).read_bytes() for rel in FILES} == FILES
    assert not (local / MARKER).exists()

    # a new version replaces the old one; files it lacks are gone from the store
    new = make_folder(tmp_path / "new", {"a.txt": b"beta"})
    storage.copy_dir(new, uri)
    assert storage.list_dir(uri) == [MARKER, "a.txt"]
    fresh = storage.fetch_dir(uri)
    assert fresh != local and (fresh / "a.txt").read_bytes() == b"beta"
    assert sorted(p.name for p in fresh.iterdir()) == ["a.txt"]

    # remote -> remote and remote -> local
    storage.copy_dir(uri, storage.join(s3_uri, "best"))
    assert storage.read_text(storage.join(s3_uri, "best", "a.txt")) == "beta"
    out = tmp_path / "back"
    storage.copy_dir(uri, out)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    with pytest.raises(StorageError, match="^no folder at "):
        storage.copy_dir(tmp_path / "missing", storage.join(s3_uri, "empty"))
    assert not storage.exists(storage.join(s3_uri, "empty"))


def test_write_dir_to_uri(s3_uri):
    uri = storage.join(s3_uri, "gallery")
    storage.write_dir(uri, lambda tmp: (tmp / "manifest.json").write_text("{}"))
    assert storage.list_dir(uri) == [MARKER, "manifest.json"]

    def fail(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        storage.write_dir(storage.join(s3_uri, "failed"), fail)
    assert not storage.exists(storage.join(s3_uri, "failed"))


def test_partial_upload_is_not_accepted(s3_uri, tmp_path):
    uri = storage.join(s3_uri, "ckpt")
    storage.copy_dir(make_folder(tmp_path / "src", FILES), uri)
    s3 = boto3.client("s3")
    key = uri.removeprefix(f"s3://{S3_BUCKET}/")
    s3.delete_object(Bucket=S3_BUCKET, Key=f"{key}/sub/b.bin")  # as if the upload was cut
    with pytest.raises(StorageError, match=f"checkpoint at {uri} is incomplete: sub/b.bin"):
        storage.fetch_dir(uri, "checkpoint")
    s3.put_object(Bucket=S3_BUCKET, Key=f"{key}/sub/b.bin", Body=b"short")
    with pytest.raises(StorageError, match="incomplete: sub/b.bin"):
        storage.fetch_dir(uri, "checkpoint")
    assert not list(storage.cache_root().glob("[!.]*"))  # nothing cached


def test_folder_without_marker(s3_uri, tmp_path, monkeypatch):
    """Folders written by others (Ray Train's persisted checkpoints) carry no marker: their
    listing is what they hold, and a changed listing is a new cache entry."""
    s3 = boto3.client("s3")
    key = s3_uri.removeprefix(f"s3://{S3_BUCKET}/") + "/ray_ckpt"
    for rel, data in FILES.items():
        s3.put_object(Bucket=S3_BUCKET, Key=f"{key}/{rel}", Body=data)
    uri = f"{s3_uri}/ray_ckpt"
    local = storage.fetch_dir(uri)
    assert {rel: (local / rel).read_bytes() for rel in FILES} == FILES
    s3.put_object(Bucket=S3_BUCKET, Key=f"{key}/a.txt", Body=b"changed")
    assert (storage.fetch_dir(uri) / "a.txt").read_bytes() == b"changed"


def test_fetch_cache_hit_and_repair(s3_uri, tmp_path, monkeypatch):
    uri = storage.join(s3_uri, "ckpt")
    storage.copy_dir(make_folder(tmp_path / "src", FILES), uri)
    downloads = count_downloads(monkeypatch)
    first = storage.fetch_dir(uri)
    assert len(downloads) == len(FILES)
    assert first.parent == tmp_path / "cache"
    assert storage.fetch_dir(uri) == first
    assert len(downloads) == len(FILES)  # the second fetch downloaded nothing

    # a damaged entry (truncated or missing file) is never used: it is fetched again
    (first / "sub" / "b.bin").write_bytes(b"trunc")
    (first / "a.txt").unlink()
    again = storage.fetch_dir(uri)
    assert {rel: (again / rel).read_bytes() for rel in FILES} == FILES
    assert len(downloads) == 2 * len(FILES)
    assert not list((tmp_path / "cache").glob(".*.tmp-*"))


def test_download_changed_midway_is_discarded(s3_uri, tmp_path, monkeypatch):
    """A file that does not match the marker's size/hash as read, downloaded twice (the second
    time in case the first read was torn), fails the fetch and leaves nothing in the cache."""
    uri = storage.join(s3_uri, "ckpt")
    storage.copy_dir(make_folder(tmp_path / "src", FILES), uri)
    real = storage._download

    def corrupt(fs, src, dst):
        got = real(fs, src, dst)
        return {**got, "sha256": "0" * 64} if src.endswith("a.txt") else got

    monkeypatch.setattr(storage, "_download", corrupt)
    with pytest.raises(StorageError, match=r"changed during download \(a.txt\)"):
        storage.fetch_dir(uri)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


def test_concurrent_fetches_download_once(s3_uri, tmp_path, monkeypatch):
    uri = storage.join(s3_uri, "ckpt")
    storage.copy_dir(make_folder(tmp_path / "src", FILES), uri)
    downloads = count_downloads(monkeypatch)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(storage.fetch_dir(uri))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert len(downloads) == len(FILES)


def _fetch_and_read(uri: str) -> dict[str, bytes]:
    local = storage.fetch_dir(uri)
    return {rel: (local / rel).read_bytes() for rel in FILES}


def test_concurrent_fetches_by_processes(s3_uri, tmp_path):
    uri = storage.join(s3_uri, "ckpt")
    storage.copy_dir(make_folder(tmp_path / "src", FILES), uri)
    with ProcessPoolExecutor(3) as pool:
        assert list(pool.map(_fetch_and_read, [uri] * 3)) == [FILES] * 3
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1


def test_missing_bucket(s3_server):
    uri = "s3://no-such-bucket-here/ckpt"
    with pytest.raises(StorageError, match=f"^{uri}: no such bucket$"):
        storage.fetch_dir(uri, "checkpoint")
    with pytest.raises(StorageError, match=f"^{uri}: no such bucket$"):
        storage.check_access(uri)
    with pytest.raises(StorageError, match="no such bucket"):
        storage.write_text(f"{uri}/x.json", "{}")


def test_empty_prefix(s3_uri):
    with pytest.raises(StorageError, match=f"^no checkpoint at {s3_uri}/none$"):
        storage.fetch_dir(f"{s3_uri}/none", "checkpoint")
    with pytest.raises(StorageError, match=f"^no file at {s3_uri}/none.json$"):
        storage.read_text(f"{s3_uri}/none.json")
    storage.check_access(s3_uri)  # the bucket is there


def test_unreachable_endpoint(s3_uri, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(StorageError, match=f"^{s3_uri}/x: cannot reach the object store at "):
        storage.fetch_dir(f"{s3_uri}/x")
    with pytest.raises(StorageError, match="cannot reach"):
        storage.check_access(s3_uri)


def test_wrong_credentials(monkeypatch):
    port = free_port()
    proc = start_moto(port, env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # checks credentials
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        uri = "s3://any/ckpt"
        for call in (storage.fetch_dir, storage.check_access, storage.exists):
            with pytest.raises(StorageError, match=f"^{uri}: access denied \\(check AWS_"):
                call(uri)
    finally:
        stop_group(proc)


def test_bad_scheme():
    with pytest.raises(StorageError, match="^nosuch://x/y: "):
        storage.fetch_dir("nosuch://x/y")


def test_put_files_keeps_the_others(s3_uri, tmp_path):
    run = storage.join(s3_uri, "run")
    storage.write_text(storage.join(run, "keep.json"), "kept")
    make_folder(tmp_path / "plots", {"history.png": b"png", "sub/x.csv": b"1,2"})
    assert storage.put_files(tmp_path / "plots", run) == run
    assert storage.list_dir(run) == ["history.png", "keep.json", "sub"]
    assert storage.read_bytes(storage.join(run, "sub", "x.csv")) == b"1,2"
    local = tmp_path / "local_run"
    storage.put_files(tmp_path / "plots", local)
    assert (local / "sub" / "x.csv").read_bytes() == b"1,2"


@pytest.fixture(scope="module")
def tiny_world(tiny_bert, tmp_path_factory):
    return tiny_data_and_checkpoint(tmp_path_factory.mktemp("world"), tiny_bert)


def test_cli_from_an_s3_checkpoint(s3_uri, tiny_world, tmp_path, capsys):
    """eval, embed and index read a checkpoint from S3, and index writes its gallery there."""
    data, ckpt = tiny_world
    uri = storage.join(s3_uri, "ckpt")
    copy_checkpoint(ckpt, uri)
    assert read_record(uri) == read_record(ckpt)
    split = ["--data-path", str(data), "--dataset", "f30k", "--split", "test"]

    main(["eval", "--checkpoint", uri, *split, "--json", storage.join(s3_uri, "eval.json")])
    remote = json.loads(storage.read_text(storage.join(s3_uri, "eval.json")))
    main(["eval", "--checkpoint", str(ckpt), *split, "--json", str(tmp_path / "eval.json")])
    assert remote == json.loads((tmp_path / "eval.json").read_text())

    (tmp_path / "caps.txt").write_text("a dog\na red car\n")
    for source, out in ((uri, "remote.npy"), (str(ckpt), "local.npy")):
        main(["embed", "--checkpoint", source, "--captions", str(tmp_path / "caps.txt"),
              "--out", str(tmp_path / out)])  # fmt: skip
    np.testing.assert_array_equal(np.load(tmp_path / "remote.npy"), np.load(tmp_path / "local.npy"))

    gallery = storage.join(s3_uri, "gallery")
    main(["index", "--checkpoint", uri, *split, "--out", gallery])
    opened = Gallery.open(gallery)
    assert opened.manifest["checkpoint"] == uri and opened.n_images == 10
    assert opened.path.is_relative_to(storage.cache_root())
    service = RetrievalService(uri, gallery)  # what each Serve replica builds
    assert service.gallery.n_images == 10
    capsys.readouterr()

    args = [*split, "--out", storage.join(s3_uri, "g2")]
    err = run_err(capsys, "index", "--checkpoint", storage.join(s3_uri, "none"), *args)
    assert err.endswith(f"error: no checkpoint at {s3_uri}/none")
    err = run_err(capsys, "index", "--checkpoint", uri, *split, "--out", "s3://no-bucket-x/g")
    assert err.endswith("error: s3://no-bucket-x/g: no such bucket")
    err = run_err(capsys, "eval", "--checkpoint", "s3://no-bucket-x/ck", *split)
    assert err.endswith("error: s3://no-bucket-x/ck: no such bucket")


def test_cli_unreachable_endpoint(s3_uri, tiny_world, capsys, monkeypatch):
    data, _ = tiny_world
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    err = run_err(capsys, "embed", "--checkpoint", f"{s3_uri}/ck", "--captions", str(data),
                  "--out", "x.npy")  # fmt: skip
    assert f"error: {s3_uri}/ck: cannot reach the object store at http://127.0.0.1:" in err
