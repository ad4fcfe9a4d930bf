"""Helpers shared by the tests and the benchmarks: the tiny world (a tiny model config and
synthetic data sizes), CLI and process checks, ports and metrics.

Import them as ``from tests.helpers import ...``; fixtures live in ``tests/conftest.py``.
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

import psutil
import pytest

from hrem_ray.cli import main
from hrem_ray.ray_runtime import free_port

__all__ = [
    "SYNTH",
    "TINY_MODEL",
    "TINY_SETS",
    "alive",
    "free_port",
    "is_loopback",
    "metric_samples",
    "run_err",
    "start_moto",
    "stop_group",
    "tiny_data_and_checkpoint",
]

# The tiny world of the CLI, gallery and serving tests: f30k-format data of 20/5/10 images of
# 6 regions x 24 dims, and a model at toy width.
TINY_SETS = [
    f"model.{k}={v}"
    for k, v in dict(img_dim=24, embed_size=32, num_heads=4, ff_dim=32, mlp_hidden=16).items()
]
TINY_MODEL = [f"--set={s}" for s in TINY_SETS]
SYNTH = ["--train-images", "20", "--dev-images", "5", "--test-images", "10"]
SYNTH += ["--regions", "6", "--dim", "24"]


def tiny_data_and_checkpoint(root: Path, tiny_bert: str) -> tuple[Path, Path]:
    """Synthetic data and a fresh tiny checkpoint under ``root``, made with the CLI."""
    data, ckpt = root / "data", root / "ckpt"
    main(["synth", "--out", str(data), *SYNTH])
    main(["init-checkpoint", "--out", str(ckpt), "--bert-path", tiny_bert, *TINY_MODEL])
    return data, ckpt


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes of ``procs`` still running (zombies count as gone)."""
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


def run_err(capsys, *argv: str) -> str:
    """Run an ``hrem-ray`` command that must fail as a user error (exit 2, no traceback);
    returns its one error line."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"hrem-ray {argv[0]}: error: "), lines[0]
    return lines[0]


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
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_group(proc)
                raise RuntimeError(f"moto server on port {port} did not start") from None
            time.sleep(0.1)


def stop_group(proc: subprocess.Popen) -> None:
    """Terminate the process group ``proc`` leads (started with ``start_new_session``)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
