"""The storage layer through a proxy that resets, stalls and throttles (hrem_ray.testing.s3proxy):
transient faults are retried, a dead endpoint still fails in seconds, a faulty one fails after
the retry bound, and corruption on the server is still corruption (docs/storage.md)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest

from hrem_ray import storage
from hrem_ray.storage import StorageError
from hrem_ray.testing import free_port
from hrem_ray.testing.s3proxy import FaultProxy
from tests.conftest import S3_BUCKET

pytestmark = pytest.mark.timeout(120)

RETRY = re.compile(r"^storage: (\S+): (.+), retrying \(attempt (\d+), [\d.]+ s\)$")
MB = 1 << 20


@pytest.fixture
def moto(s3_server, tmp_path, monkeypatch) -> tuple[str, int]:
    """The S3 server's host and port, and a fresh node cache."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    url = urlparse(s3_server)
    return url.hostname, url.port


def through(proxy: FaultProxy, monkeypatch) -> str:
    """Send storage's requests through ``proxy``; a fresh prefix in the test bucket."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}"


def retries(err: str) -> list[tuple[str, str, int]]:
    """(target, reason, attempt) of every retry line; every stderr line must be one."""
    lines = [ln for ln in err.splitlines() if ln.startswith("storage: ")]
    assert all(RETRY.match(ln) or "fetching it again" in ln for ln in lines), lines
    assert "Traceback" not in err
    return [(m[1], m[2], int(m[3])) for ln in lines if (m := RETRY.match(ln))]


def workload(base: str, tmp: Path) -> dict[str, bytes]:
    """Every kind of storage operation on a folder of several MB; what was read back."""
    rng = random.Random(7)
    files = {f"part-{i}.bin": rng.randbytes(MB + i) for i in range(4)}
    files |= {"meta/config.json": b'{"a": 1}', "meta/vocab.txt": b"x\n" * 5000}
    src = tmp / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    got: dict[str, bytes] = {}
    storage.check_access(base)
    storage.write_bytes(storage.join(base, "one.bin"), files["part-0.bin"])
    got["read_bytes"] = storage.read_bytes(storage.join(base, "one.bin"))
    got["read_head"] = storage.read_head(storage.join(base, "one.bin"), 1000)
    got["size"] = str(storage.file_size(storage.join(base, "one.bin"))).encode()
    got["exists"] = str(storage.exists(storage.join(base, "nothing"))).encode()
    storage.copy_dir(src, storage.join(base, "ckpt"))
    got["list"] = json.dumps(storage.list_dir(storage.join(base, "ckpt"))).encode()
    local = storage.fetch_dir(storage.join(base, "ckpt"), "checkpoint")
    got |= {f"fetch/{rel}": (local / rel).read_bytes() for rel in files}
    storage.copy_dir(storage.join(base, "ckpt"), storage.join(base, "best"))  # remote -> remote
    storage.put_files(src / "meta", storage.join(base, "run"))
    storage.download(storage.join(base, "best", "part-3.bin"), tmp / "dl.bin")
    got["download"] = (tmp / "dl.bin").read_bytes()
    got["run"] = storage.read_bytes(storage.join(base, "run", "config.json"))
    return got


def test_workload_survives_faults(moto, tmp_path, monkeypatch, capsys):
    """The same bytes with and without 15% resets, 10% delays and 15% 503s; the faults were
    injected and retried, one line each. (pyarrow retries each request once, so only a
    request that fails twice reaches storage's retries: rates lower than these print none.)"""
    with FaultProxy(*moto, seed=3) as clean:
        base = through(clean, monkeypatch)
        start = time.monotonic()
        want = workload(base, tmp_path / "clean")
        clean_s = time.monotonic() - start
    assert retries(capsys.readouterr().err) == []
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache2"))
    with FaultProxy(*moto, seed=3, reset=0.15, delay=0.1, delay_s=0.5, http503=0.15) as proxy:
        base = through(proxy, monkeypatch)
        start = time.monotonic()
        got = workload(base, tmp_path / "faulty")
        faulty_s = time.monotonic() - start
        report = proxy.report()
    assert got == want
    lines = retries(capsys.readouterr().err)
    assert report["resets_up"] and report["resets_down"] and report["delays"]
    assert report["http503"] and lines
    ops = sum(attempt == 2 for *_, attempt in lines)
    assert {reason for _, reason, _ in lines} <= {
        "connection reset", "timed out", "HTTP 503", "HTTP 503 (slow down)"
    }  # fmt: skip
    print(
        f"\nfaults: {report['resets']} resets, {report['delays']} delays, "
        f"{report['http503']} 503s in {report['requests']} requests; {ops} operations retried "
        f"({len(lines)} retries); {clean_s:.1f} s clean, {faulty_s:.1f} s faulty "
        f"(+{faulty_s - clean_s:.1f} s)",
        file=sys.__stdout__,
    )


def test_dead_endpoint_fails_fast(s3_server, monkeypatch, capsys):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    uri = f"s3://{S3_BUCKET}/x"
    for call in (
        storage.check_access,
        storage.fetch_dir,
        storage.list_dir,
        storage.read_bytes,
        lambda u: storage.write_bytes(u, b"x"),
    ):
        start = time.monotonic()
        with pytest.raises(StorageError, match=f"^{uri}: cannot reach the object store at "):
            call(uri)
        assert time.monotonic() - start < 5
    assert retries(capsys.readouterr().err) == []


@pytest.mark.parametrize("fault", ["http503", "reset", "refused"])
def test_faulty_endpoint_fails_after_the_bound(moto, monkeypatch, capsys, fault):
    """An endpoint that answered and then keeps failing is retried for HREM_STORAGE_RETRY_S,
    then named in one line."""
    monkeypatch.setenv(storage.RETRY_ENV, "3")
    proxy = FaultProxy(*moto, seed=1).start()
    try:
        base = through(proxy, monkeypatch)
        storage.write_text(storage.join(base, "a.json"), "{}")  # the endpoint answers
        if fault == "refused":
            proxy.close()
        else:
            proxy.set_rates(**{fault: 1.0})
        start = time.monotonic()
        with pytest.raises(StorageError) as e:
            storage.read_text(storage.join(base, "a.json"))
        took = time.monotonic() - start
    finally:
        proxy.close()
    why = {"http503": "HTTP 503", "reset": "connection reset", "refused": "cannot connect"}[fault]
    assert re.fullmatch(
        rf"{base}/a.json: {why}, still failing after \d+ attempts in \d+ s "
        rf"\({storage.RETRY_ENV}=3\)",
        str(e.value),
    ), str(e.value)
    assert 3 <= took < 10
    lines = retries(capsys.readouterr().err)
    assert lines and {reason for _, reason, _ in lines} == {why}


def test_stays_faulty_from_the_start(moto, monkeypatch, capsys):
    """A throttling endpoint is up, so it is retried (to the bound) even before it answered."""
    monkeypatch.setenv(storage.RETRY_ENV, "2")
    with FaultProxy(*moto, seed=1, http503=1.0) as proxy:
        base = through(proxy, monkeypatch)
        with pytest.raises(StorageError, match=f"^{base}: HTTP 503, still failing after "):
            storage.check_access(base)
    assert retries(capsys.readouterr().err)


def test_corrupt_on_the_server_is_still_corrupt(moto, tmp_path, monkeypatch, capsys):
    base = f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}"
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "w.bin").write_bytes(b"a" * 1000)
    (tmp_path / "src" / "ok.txt").write_text("fine")
    uri = storage.join(base, "ckpt")
    storage.copy_dir(tmp_path / "src", uri)
    key = f"{uri.removeprefix(f's3://{S3_BUCKET}/')}/sub/w.bin"
    boto3.client("s3").put_object(Bucket=S3_BUCKET, Key=key, Body=b"b" * 1000)  # same size
    with pytest.raises(StorageError) as e:
        storage.fetch_dir(uri, "checkpoint")
    assert str(e.value) == f"checkpoint at {uri} is corrupt or changed during download (sub/w.bin)"
    err = capsys.readouterr().err
    assert err.count("differs from its marker, fetching it again") == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


def test_torn_read_is_fetched_again(moto, tmp_path, monkeypatch, capsys):
    """A download cut by a reset is retried; one that arrives whole but wrong (what a torn read
    looks like to a reader that cannot tell) is fetched once more and then used."""
    big = os.urandom(4 * MB)
    with FaultProxy(*moto, seed=5) as proxy:
        base = through(proxy, monkeypatch)
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "big.bin").write_bytes(big)
        uri = storage.join(base, "gallery")
        storage.copy_dir(tmp_path / "src", uri)
        proxy.set_rates(reset=0.5)
        local = storage.fetch_dir(uri, "gallery")
        assert (local / "big.bin").read_bytes() == big
        assert proxy.report()["resets_down"]  # responses cut short, retried by pyarrow or us
    retries(capsys.readouterr().err)

    real, calls = storage._download, []

    def torn_once(fs, src, dst):
        calls.append(src)
        got = real(fs, src, dst)
        return {**got, "sha256": "0" * 64} if len(calls) == 1 else got

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache2"))
    monkeypatch.setattr(storage, "_download", torn_once)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{moto[0]}:{moto[1]}")
    assert (storage.fetch_dir(uri, "gallery") / "big.bin").read_bytes() == big
    assert len(calls) == 2
    assert "gallery/big.bin: differs from its marker, fetching it again" in capsys.readouterr().err


def test_a_ray_checkpoint_is_restored_through_faults(moto, monkeypatch, capsys):
    """A restarted worker group restores the checkpoint Ray persisted (no marker: sizes are
    checked) through storage's retries; Ray's own ``as_directory()`` retries nothing."""
    from ray.train import Checkpoint

    from hrem_ray.train.ray_train import fetched

    files = {"model.safetensors": os.urandom(2 * MB), "train_state.json": b'{"epoch": 0}'}
    with FaultProxy(*moto, seed=9) as proxy:
        run = storage.join(through(proxy, monkeypatch), "run")
        for rel, data in files.items():
            storage.write_bytes(storage.join(run, "checkpoint_000000", rel), data)
        proxy.set_rates(reset=0.5)
        fs, inner = storage.filesystem(run)
        local = fetched(run, Checkpoint(f"{inner}/checkpoint_000000", fs))
        assert {rel: (local / rel).read_bytes() for rel in files} == files
        assert proxy.report()["resets_down"]
    retries(capsys.readouterr().err)


def test_proxy_as_a_process(moto, tmp_path, monkeypatch):
    """``python -m hrem_ray.testing.s3proxy`` forwards, counts, and reports on SIGTERM."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hrem_ray.testing.s3proxy", "--upstream", f"{moto[0]}:{moto[1]}",
         "--port", str(port), "--seed", "2", "--reset", "0", "--delay", "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert "listening on" in proc.stdout.readline()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        uri = f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}/x.bin"
        storage.write_bytes(uri, b"z" * 5000)
        assert storage.read_bytes(uri) == b"z" * 5000
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["requests"] >= 2 and report["resets"] == 0
    assert report["bytes_up"] > 5000 and report["bytes_down"] > 5000


AWS = "When reading information for key 'x' in bucket 'b': AWS Error {} during HeadObject: m"


@pytest.mark.parametrize(
    ("message", "healthy", "reason"),
    [  # pyarrow's texts as provoked through the proxy and a stub server
        ("NETWORK_CONNECTION curlCode: 56, Failure when receiving data from the peer; "
         "Details: Recv failure: Connection reset by peer", False, "connection reset"),
        ("NETWORK_CONNECTION curlCode: 28, Timeout was reached; Details: Operation too slow",
         False, "timed out"),
        ("UNKNOWN (HTTP status 503)", False, "HTTP 503"),
        ("UNKNOWN (HTTP status 502)", False, "HTTP 502"),
        ("SLOW_DOWN", False, "HTTP 503 (slow down)"),
        ("INTERNAL_FAILURE", False, "HTTP 500"),
        ("INTERNAL_FAILURE during GetObject operation: Failed to flush response stream", False,
         "HTTP 500"),  # a reset while Ray restored a checkpoint (docs/cluster.md)
        ("NETWORK_CONNECTION curlCode: 7, Could not connect to server", False, None),
        ("NETWORK_CONNECTION curlCode: 7, Could not connect to server", True, "cannot connect"),
        ("ACCESS_DENIED", True, None),
        ("NO_SUCH_BUCKET", True, None),
        ("RESOURCE_NOT_FOUND", True, None),
    ],
)  # fmt: skip
def test_what_is_transient(monkeypatch, message, healthy, reason):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(storage, "_healthy", {storage._endpoint("s3://b")} if healthy else set())
    assert storage._transient(OSError(AWS.format(message)), "s3://b/x") == reason
    assert storage._transient(FileNotFoundError("Path does not exist"), "s3://b/x") is None
    assert storage._transient(OSError(AWS.format(message)), "/local/x") is None


def test_retry_bound_is_checked(monkeypatch):
    monkeypatch.setenv(storage.RETRY_ENV, "soon")
    with pytest.raises(StorageError, match=f"^{storage.RETRY_ENV}='soon': not a number"):
        storage.read_bytes("s3://b/x")
