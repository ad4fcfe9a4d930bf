"""The tiny world that tests and benchmarks share: a toy model config, small synthetic data
sizes, and helpers for the local servers they start (moto S3, Serve metrics, processes).

It lives in the package so that ``bench/`` imports it like any client, without ``sys.path``
edits. The library never imports it, and it imports neither pytest nor anything heavy at import
time: the CLI, psutil and prometheus_client are imported by the helpers that need them. Tools
too big for here are its submodules (``s3proxy``).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from hrem_ray.ray_runtime import free_port

if TYPE_CHECKING:
    import psutil

__all__ = [
    "SYNTH",
    "TINY_MODEL",
    "TINY_SETS",
    "alive",
    "free_port",
    "is_loopback",
    "metric_samples",
    "start_mlflow_server",
    "start_moto",
    "stop_group",
    "tiny_data_and_checkpoint",
    "wait_until_up",
]

# f30k-format data of 20/5/10 images of 6 regions x 24 dims, and a model at toy width: big
# enough to exercise every layer, small enough for a test to train in seconds on 2 cores.
TINY_SETS = [
    f"model.{k}={v}"
    for k, v in dict(img_dim=24, embed_size=32, num_heads=4, ff_dim=32, mlp_hidden=16).items()
]
TINY_MODEL = [f"--set={s}" for s in TINY_SETS]
SYNTH = ["--train-images", "20", "--dev-images", "5", "--test-images", "10"]
SYNTH += ["--regions", "6", "--dim", "24"]


def tiny_data_and_checkpoint(root: Path, tiny_bert: str) -> tuple[Path, Path]:
    """Synthetic data and a fresh tiny checkpoint under ``root``, made with the CLI (as a user
    would make them)."""
    from hrem_ray.cli import main

    data, ckpt = root / "data", root / "ckpt"
    main(["synth", "--out", str(data), *SYNTH])
    main(["init-checkpoint", "--out", str(ckpt), "--bert-path", tiny_bert, *TINY_MODEL])
    return data, ckpt


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes of ``procs`` still running (zombies count as gone): what a stopped
    cluster or run must leave behind is none."""
    import psutil

    running = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            pass
    return running


def is_loopback(ip: str) -> bool:
    """True for a loopback address, IPv4-mapped ones (``::ffff:127.0.0.1``) included."""
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text exposition as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def start_moto(port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A moto S3 server on 127.0.0.1:``port`` in its own process group, once it answers.

    ``env`` adds to the environment, e.g. ``INITIAL_NO_AUTH_ACTION_COUNT=0`` to make it check
    credentials. Stop it with ``stop_group``.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_until_up(f"http://127.0.0.1:{port}/moto-api/", proc, "moto server", 60)
    return proc


def wait_until_up(
    url: str, proc: subprocess.Popen, what: str, timeout: float, log: Path | None = None
) -> None:
    """Poll ``url`` until it answers 200. If ``proc`` exits or ``timeout`` seconds pass first,
    stop its group and raise, with the tail of ``log`` when there is one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc)
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            state = "exited" if proc.poll() is not None else f"not up after {timeout:.0f} s"
            raise RuntimeError(f"{what} {state}: {url}\n{tail}".rstrip())
        time.sleep(0.25)


def stop_group(proc: subprocess.Popen) -> None:
    """Terminate the process group ``proc`` leads (started with ``start_new_session``): never
    ``ray stop``, which would stop every Ray process on the machine."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_mlflow_server(
    root: Path,
    s3_endpoint: str,
    bucket: str,
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` with ``root/mlflow.db`` as its store and
    ``s3://bucket/mlflow`` (at ``s3_endpoint``) as its artifact destination; return the
    process and its tracking URI once ``/health`` answers. Stop it with ``stop_group``.

    The server proxies artifacts (``mlflow-artifacts:/``), so clients need no S3 credentials;
    the server itself gets moto's test credentials. ``env`` adds to its environment.
    """
    from hrem_ray.tracking import QUIET_ENV  # no telemetry from the server either

    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    server_env = {
        **os.environ,
        **QUIET_ENV,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        **(env or {}),
    }
    log = open(root / "server.log", "wb")  # noqa: SIM115 - the child owns it from here
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", f"s3://{bucket}/mlflow"]
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=server_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    uri = f"http://127.0.0.1:{port}"
    wait_until_up(f"{uri}/health", proc, "mlflow server", timeout, root / "server.log")
    return proc, uri
