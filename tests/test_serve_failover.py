"""A Retriever replica SIGKILLed under load loses at most the answers it was sending when the
service runs as ``hrem-ray serve --haproxy --min-replicas 2`` does (docs/serving.md, "A replica
that dies"): HAProxy in front of two replicas sends each request the killed one had not begun
to answer to the live one, and the killed replica is replaced.

Serve's default proxy answers the requests in flight on a killed replica with a 500 (it maps
the RayActorError to 500, with no hook in our code), so the test runs HAProxy mode, whose
environment (``ray_runtime.haproxy_env``) the test's own Ray starts with. Measured on the
2-core machine in 4 runs (docs/serving.md): 2367 to 3349 requests, 4 in flight at the kill,
0 or 2 failed (an answer cut short); the replacement ALIVE 18 to 47 s after the kill; the
whole file 80 to 167 s (30 s of it Serve's shutdown in HAProxy mode).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from hrem_ray.ray_runtime import haproxy_env
from tests import test_serve_ray
from tests.test_serve_ray import (
    APP,
    GOOD,
    STREAM,
    Stream,
    _is,
    answer_of,
    assert_same_answer,
    post,
    serving,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]
world, local = test_serve_ray.world, test_serve_ray.local  # the same fixtures, built here

RETRIEVER_CLASS = f"ServeReplica:{APP}:Retriever"
# A killed replica is back in 10-20 s on a quiet machine; other engineers' jobs share these
# 2 cores, and under their load it has taken 45 s (a restart loads the model twice: the init
# args, then the user_config checkpoint).
RECOVERY_S = 90
THREADS = 4  # client threads, one request at a time each (issue 25 measured at 4)


@pytest.fixture(scope="module")
def cluster(world) -> Iterator[dict[str, Any]]:
    env = haproxy_env()
    with serving(world, env, min_replicas=2, max_replicas=2) as c:
        yield {**c, "stats": f"http://127.0.0.1:{env['RAY_SERVE_HAPROXY_STATS_PORT']}/stats"}


def retriever_pids(cluster) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(
        address=cluster["gcs"],
        filters=[("class_name", "=", RETRIEVER_CLASS), ("state", "=", "ALIVE")],
        detail=True,
        raise_on_missing_output=False,
    )
    return [a.pid for a in actors]


def wait_replaced(cluster, killed: int, n: int, timeout_s: float) -> float | None:
    """When (monotonic) ``n`` replicas are alive again, none of them ``killed``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = retriever_pids(cluster)
        if len(pids) == n and killed not in pids:
            return time.monotonic()
        time.sleep(0.5)
    return None


def test_killed_replica_loses_no_request(cluster, local):
    assert requests.get(cluster["stats"], timeout=10).status_code == 200, "HAProxy is not on"
    ref = local["ckpt1"]
    want = [answer_of(ref, p, b) for p, b in STREAM]
    pids = retriever_pids(cluster)
    assert len(pids) == 2, pids
    with Stream(cluster, STREAM, pause_s=0, threads=THREADS) as stream:
        assert stream.wait_for(lambda e: e["status"] == 200, 30), "no answer before the kill"
        time.sleep(2)  # both replicas busy
        killed_at = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        replaced_at = wait_replaced(cluster, pids[0], 2, RECOVERY_S)
        assert replaced_at is not None, f"no replacement replica within {RECOVERY_S} s"
        time.sleep(3)  # and traffic goes on over both
    log = stream.log
    failed = [e for e in log if e["status"] != 200]
    window = (
        f"{min(e['start'] for e in failed) - killed_at:+.2f} to "
        f"{max(e['end'] for e in failed) - killed_at:+.2f} s from the kill"
        if failed
        else "none"
    )
    around = [e for e in log if e["start"] <= killed_at <= e["end"]]
    print(
        f"\nkill: {len(log)} requests from {THREADS} threads, {len(around)} in flight at the "
        f"kill, {len(failed)} failed {dict(Counter(e['status'] for e in failed))}, window "
        f"{window}; replacement ALIVE {replaced_at - killed_at:.1f} s after the SIGKILL, slowest "
        f"{max(e['end'] - e['start'] for e in log):.2f} s; {[e.get('error') for e in failed]}"
    )
    # HAProxy sends again each request the killed replica had not begun to answer; one whose
    # answer it was already sending (spliced through to the client) cannot be, so at most the
    # requests in flight at the kill fail, and none sent after it
    brief = [{k: e.get(k) for k in ("path", "status", "error")} for e in failed]
    assert len(failed) <= THREADS, brief  # each thread has one request in flight
    assert all(e["start"] <= killed_at + 0.2 for e in failed if e["status"] != 503), brief
    assert all(e["retry_after"] for e in failed if e["status"] == 503), brief
    assert all(_is(e, want) for e in log if e["status"] == 200)
    assert retriever_pids(cluster) != pids
    for path, body in GOOD:
        assert_same_answer(post(cluster, path, body), ref.post(path, json=body), path)
