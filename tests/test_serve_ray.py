"""The real Ray Serve app (``run_service``) over HTTP on 127.0.0.1: answers equal the
in-process API's, bad requests keep their clean 4xx, concurrent text queries are batched, and
a new checkpoint/gallery is swapped in under load without a failed request (a killed replica:
tests/test_serve_failover.py).

One ``ray.init(address="local", num_cpus=2)`` cluster of its own (``serving``; dashboard on
a free loopback port, for the failover test's ``ray.util.state.list_actors``), one replica
of the one deployment (docs/serving.md; a second replica adds nothing on 2 cores).
``serve.run`` again restarts the replicas (imperative deploys get a new code version); the
swap loses no request only because the deployments surge (``max_surge_percent``): the old
replicas serve until the new ones are ready.

Measured on the 2-core machine, lightly / heavily loaded by other jobs: ``ray.init`` 14 / 29 s,
app ready 35 / 95 s after it started, redeploy 21 / 27 s; the whole file 95 / 190 s.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import requests
from ray import serve
from starlette.testclient import TestClient

from hrem_ray.cli import main
from hrem_ray.serving.api import LocalBackend, build_app
from hrem_ray.serving.app import AUTOSCALING, Retriever, run_service
from hrem_ray.serving.service import RetrievalService
from hrem_ray.testing import SYNTH, TINY_MODEL, free_port, metric_samples
from tests.test_serve_fuzz import FUZZ_CONFIG, run_schemathesis

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(240)]

IMG_DIM = 24
APP = "hrem"
REQUEST_TIMEOUT_S = 10  # every HTTP request of these tests gives up after this
SCORE_TOL = 1e-4  # batched vs single forward passes differ in the last float32 bits
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert) -> dict[str, Path]:
    """Tiny data; two checkpoints (seeds 0 and 1) and their galleries of the test split."""
    root = tmp_path_factory.mktemp("serve_ray")
    data = root / "data"
    main(["synth", "--out", str(data), *SYNTH])
    out = {"data": data}
    for tag, seed in (("1", 0), ("2", 1)):
        ckpt, gallery = root / f"ckpt{tag}", root / f"gallery{tag}"
        main(
            [
                "init-checkpoint",
                "--out",
                str(ckpt),
                "--bert-path",
                tiny_bert,
                "--seed",
                str(seed),
                *TINY_MODEL,
            ]
        )
        main(
            [
                "index",
                "--checkpoint",
                str(ckpt),
                "--data-path",
                str(data),
                "--dataset",
                "f30k",
                "--split",
                "test",
                "--out",
                str(gallery),
            ]
        )
        out[f"ckpt{tag}"], out[f"gallery{tag}"] = ckpt.resolve(), gallery.resolve()
    return out


@pytest.fixture(scope="module")
def local(world) -> dict[str, TestClient]:
    """The in-process API over each checkpoint, keyed by checkpoint name (ckpt1, ckpt2): the
    reference."""
    return {
        f"ckpt{tag}": TestClient(
            build_app(LocalBackend(RetrievalService(world[f"ckpt{tag}"], world[f"gallery{tag}"])))
        )
        for tag in ("1", "2")
    }


@pytest.fixture(scope="module")
def cluster(world) -> Iterator[dict[str, Any]]:
    with serving(world, max_replicas=1) as c:
        yield c


@contextlib.contextmanager
def serving(world, env: dict[str, str] | None = None, **service: Any) -> Iterator[dict[str, Any]]:
    """A local Ray of our own, ``env`` in the environment it starts with (every Ray process
    inherits it), serving ckpt1 and gallery1 (``run_service(**service)``): {url, gcs}."""
    start = time.perf_counter()
    with patched_env(env or {}):
        ctx = ray.init(
            address="local",  # our own cluster, never another engineer's
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=free_port(),
            log_to_driver=False,
        )
    try:
        init_s = time.perf_counter() - start
        url = run_service(
            str(world["ckpt1"]), str(world["gallery1"]), host="127.0.0.1", port=free_port(),
            **service,
        )  # fmt: skip
        print(f"\nray.init {init_s:.1f} s, app ready {time.perf_counter() - start:.1f} s")
        yield {"url": url, "gcs": ctx.address_info["gcs_address"]}
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def patched_env(env: dict[str, str]) -> Iterator[None]:
    """``env`` set in os.environ, and the old values back afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # no proxy from the environment between us and 127.0.0.1
    return s


HTTP = session()


def post(cluster, path: str, body: Any, timeout: float = REQUEST_TIMEOUT_S, s=None):
    return (s or HTTP).post(cluster["url"] + path, json=body, timeout=timeout)


def get(cluster, path: str):
    return HTTP.get(cluster["url"] + path, timeout=REQUEST_TIMEOUT_S)


def same_hits(got: list[dict], want: list[dict]) -> bool:
    """The same hits with the same scores (within SCORE_TOL) and the same captions; ranks
    may swap only between scores that equal within SCORE_TOL."""
    if len(got) != len(want) or len({h["id"] for h in got}) != len(got):
        return False
    want_by_id = {h["id"]: h for h in want}
    for g, w in zip(got, want, strict=True):
        ref = want_by_id.get(g["id"])
        if ref is None or abs(g["score"] - w["score"]) > SCORE_TOL:
            return False
        if abs(ref["score"] - g["score"]) > SCORE_TOL:
            return False
        if {k: v for k, v in g.items() if k != "score"} != {
            k: v for k, v in ref.items() if k != "score"
        }:
            return False
    return True


def assert_same_answer(got: requests.Response, want, path: str) -> None:
    assert got.status_code == want.status_code, (path, got.status_code, got.text[:300])
    g, w = got.json(), want.json()
    if "results" in w:
        assert same_hits(g["results"], w["results"]), (path, g, w)
        assert {k: v for k, v in g.items() if k != "results"} == {
            k: v for k, v in w.items() if k != "results"
        }
    elif "embedding" in w:
        np.testing.assert_allclose(g["embedding"], w["embedding"], atol=SCORE_TOL)
    else:
        assert g == w, path


def current_checkpoint(cluster, local) -> str:
    """Which checkpoint serves: the one whose model id /readyz reports."""
    model_id = get(cluster, "/readyz").json()["model_id"]
    (name,) = [k for k, c in local.items() if c.get("/readyz").json()["model_id"] == model_id]
    return name


def features(i: int) -> list[list[float]]:
    return np.random.default_rng(i).uniform(0, 2, (3 + i, IMG_DIM)).round(4).tolist()


GOOD = [
    ("/search/text", {"query": "a dog runs on the grass", "k": 3}),
    ("/search/text", {"query": "Ünïcødé 狗 🐕"}),
    ("/search/text", {"query": "x", "k": 100}),
    ("/search/image", {"image_id": 0, "k": 5}),
    ("/search/image", {"image_id": 9, "k": 100}),
    ("/search/image", {"features": features(1), "k": 4}),
    ("/embed/text", {"query": "two men"}),
    ("/embed/image", {"features": features(2)}),
]
BAD = [
    ("/search/text", {"query": "   "}),  # refused by the replica: travels back through Ray
    ("/search/text", {"query": "x" * 1001}),
    ("/search/text", {"query": "a", "k": 0}),
    ("/search/text", {"query": "a", "k": True}),
    ("/search/text", {"query": "a", "extra": 1}),
    ("/search/image", {"image_id": 10}),  # 404 from the replica
    ("/search/image", {"image_id": -1, "k": 3}),
    ("/search/image", {}),
    ("/search/image", {"image_id": 1, "features": features(0)}),
    ("/search/image", {"features": [[0.5] * (IMG_DIM - 1)]}),
    ("/search/image", {"features": [[0.5] * IMG_DIM, [0.5]]}),  # ragged
    ("/embed/image", {"features": [[1e20] * IMG_DIM]}),  # the model overflows
    ("/embed/image", {"features": [[1e39] * IMG_DIM]}),  # inf as float32
    ("/embed/text", {"query": "\t\n"}),
]


# --------------------------------------------------------------------------------------------


def test_every_endpoint_equals_the_in_process_api(cluster, local):
    ref = local[current_checkpoint(cluster, local)]
    for path, body in GOOD:
        assert_same_answer(post(cluster, path, body), ref.post(path, json=body), path)
    for path in ("/healthz", "/readyz"):
        assert_same_answer(get(cluster, path), ref.get(path), path)
    page = get(cluster, "/")
    assert page.status_code == 200 and page.text == ref.get("/").text
    assert get(cluster, "/openapi.json").json()["paths"] == ref.get("/openapi.json").json()["paths"]
    assert get(cluster, "/metrics").status_code == 200


def test_bad_requests_keep_their_clean_4xx(cluster, local):
    ref = local[current_checkpoint(cluster, local)]
    for path, body in BAD:
        got, want = post(cluster, path, body), ref.post(path, json=body)
        assert 400 <= want.status_code < 500
        assert (got.status_code, got.json()) == (want.status_code, want.json()), (path, body)
        for marker in ("Traceback", "RayTaskError", "ray."):
            assert marker not in got.text, got.text
    r = HTTP.post(
        cluster["url"] + "/search/text", data=b"{oops", headers=JSON, timeout=REQUEST_TIMEOUT_S
    )
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]
    big = b'{"query": "' + b"x" * (5 << 20) + b'"}'  # Content-Length over the JSON limit
    r = HTTP.post(cluster["url"] + "/embed/text", data=big, headers=JSON, timeout=30)
    assert r.status_code == 413 and "larger than" in r.json()["error"]

    def chunks():  # no Content-Length at all: chunked transfer encoding
        yield b'{"query": "'
        for _ in range(5):
            yield b"x" * (1 << 20)
        yield b'"}'

    r = HTTP.post(cluster["url"] + "/embed/text", data=chunks(), headers=JSON, timeout=30)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert r.status_code == 413 and "larger than" in r.json()["error"]


def test_concurrent_text_queries_are_batched(cluster, local):
    ref = local[current_checkpoint(cluster, local)]
    threads, waves = 16, 4
    barrier = threading.Barrier(threads)

    def worker(i: int) -> list[tuple[str, requests.Response]]:
        s, out = session(), []
        for w in range(waves):
            query = f"a photo of thing {i} in wave {w}"
            barrier.wait(timeout=60)  # every wave reaches the replica together
            out.append((query, post(cluster, "/search/text", {"query": query, "k": 5}, s=s)))
        return out

    before = metric_samples(get(cluster, "/metrics").text)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        answers = [a for part in pool.map(worker, range(threads)) for a in part]
    elapsed = time.perf_counter() - start
    assert len(answers) == threads * waves
    for query, r in answers:
        assert r.status_code == 200, r.text
        assert_same_answer(r, ref.post("/search/text", json={"query": query, "k": 5}), query)
    after = metric_samples(get(cluster, "/metrics").text)

    def delta(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    queries = delta("hrem_text_batch_size_count")
    singles = delta("hrem_text_batch_size_bucket", (("le", "1.0"),))
    assert queries == threads * waves
    mean_batch = delta("hrem_text_batch_size_sum") / queries
    print(
        f"\n{threads * waves} queries in {elapsed:.1f} s: {int(queries - singles)} answered "
        f"from batches > 1, mean batch size (per query) {mean_batch:.1f}"
    )
    assert singles < queries, "no text query was batched with another"
    ok = (("path", "/search/text"), ("status", "200"))
    assert delta("hrem_requests_total", ok) == threads * waves


BATCH_SAMPLES = ("hrem_text_batch_size_count", "hrem_text_batch_size_sum")


def test_a_list_of_text_queries_is_one_model_batch(cluster, local):
    """A list's queries are items of ``@serve.batch``: one forward pass for all of them here
    (an idle replica, fewer than max_batch_size), each answer the single query's."""
    ref = local[current_checkpoint(cluster, local)]
    queries = [f"a list query about thing {i}" for i in range(8)]
    for path, k in (("/search/text", {"k": 5}), ("/embed/text", {})):
        before = metric_samples(get(cluster, "/metrics").text)
        r = post(cluster, path, {"query": queries, **k})
        after = metric_samples(get(cluster, "/metrics").text)
        assert r.status_code == 200, r.text
        assert len(r.json()) == len(queries)
        for query, got in zip(queries, r.json(), strict=True):
            want = ref.post(path, json={"query": query, **k}).json()
            if path == "/search/text":
                assert got["query"] == query and same_hits(got["results"], want["results"])
            else:
                np.testing.assert_allclose(got["embedding"], want["embedding"], atol=SCORE_TOL)
        count, total = (after[(m, ())] - before.get((m, ()), 0) for m in BATCH_SAMPLES)
        assert (count, total) == (len(queries), len(queries) ** 2), path  # one batch of 8


class Stream:
    """Requests from ``threads`` background threads (each its own connection), each request
    with a timeout, until stopped."""

    def __init__(
        self, cluster, bodies: list[tuple[str, dict]], pause_s: float = 0.05, threads: int = 1
    ):
        self.cluster, self.bodies, self.pause_s = cluster, bodies, pause_s
        self.log: list[dict[str, Any]] = []  # list.append is atomic: the threads share it
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        s, i = session(), 0
        while not self._stop.is_set():
            path, body = self.bodies[i % len(self.bodies)]
            i += 1
            entry: dict[str, Any] = {"path": path, "body": body, "start": time.monotonic()}
            try:
                r = post(self.cluster, path, body, s=s)
                entry.update(status=r.status_code, json=_json(r))
                entry["retry_after"] = r.headers.get("retry-after")
            except requests.RequestException as e:  # timeout, reset connection
                entry.update(status=None, error=f"{type(e).__name__}: {e}"[:200])
            entry["end"] = time.monotonic()
            self.log.append(entry)
            self._stop.wait(self.pause_s)

    def __enter__(self) -> Stream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=REQUEST_TIMEOUT_S + 5)
            assert not thread.is_alive()

    def wait_for(self, predicate, timeout_s: float) -> dict[str, Any] | None:
        """The first logged entry (from now on) that satisfies ``predicate``."""
        seen, deadline = len(self.log), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for entry in self.log[seen:]:
                if predicate(entry):
                    return entry
            time.sleep(0.05)
        return None


def _json(r: requests.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return {"raw": r.text[:200]}


STREAM = [
    ("/search/text", {"query": "a dog runs on the grass", "k": 5}),
    ("/search/image", {"image_id": 3, "k": 5}),
    ("/embed/image", {"features": features(4)}),
]


def answer_of(client: TestClient, path: str, body: dict) -> Any:
    return client.post(path, json=body).json()


def matches(entry: dict, want: Any) -> bool:
    got = entry.get("json") or {}
    if "results" in want:
        return "results" in got and same_hits(got["results"], want["results"])
    return "embedding" in got and np.allclose(got["embedding"], want["embedding"], atol=SCORE_TOL)


def test_user_config_swap_under_load(cluster, world, local):
    """``serve.run`` again with a new checkpoint and gallery in ``user_config``, while
    requests keep coming: none fails, and the answers switch to the new model."""
    old, new = local["ckpt1"], local["ckpt2"]
    assert current_checkpoint(cluster, local) == "ckpt1"
    want_old = [answer_of(old, p, b) for p, b in STREAM]
    want_new = [answer_of(new, p, b) for p, b in STREAM]
    assert not matches({"json": want_old[0]}, want_new[0])  # the two models do differ
    user_config = {"checkpoint": str(world["ckpt2"]), "gallery": str(world["gallery2"])}
    retriever = Retriever.options(
        autoscaling_config={**AUTOSCALING, "max_replicas": 1}, user_config=user_config
    ).bind(str(world["ckpt1"]), str(world["gallery1"]))
    with Stream(cluster, STREAM) as stream:
        assert stream.wait_for(lambda e: e["status"] == 200, 30), "no answer before the swap"
        start = time.monotonic()
        serve.run(retriever, name=APP, route_prefix="/")
        deployed_at = time.monotonic()
        first_new = next((e for e in stream.log if _is(e, want_new)), None) or stream.wait_for(
            lambda e: _is(e, want_new), 30
        )
        assert first_new is not None, "answers never switched to the new checkpoint"
        settled_at = max(deployed_at, first_new["end"]) + 1  # old replicas out of routing
        time.sleep(3)  # keep streaming on the new model for a while
    log = stream.log
    failed = [e for e in log if e["status"] != 200]
    print(
        f"\nswap: redeploy {deployed_at - start:.1f} s, first new answer "
        f"{first_new['end'] - start:.1f} s, {len(log)} requests, {len(failed)} failed, "
        f"max latency {max(e['end'] - e['start'] for e in log):.1f} s"
    )
    assert not failed, failed[:3]
    # every answer came from one model or the other, never from a mix of the two
    for e in log:
        assert _is(e, want_old) or _is(e, want_new), e
    assert all(_is(e, want_old) for e in log if e["end"] < start)
    late = [e for e in log if e["start"] > settled_at]
    assert late and all(_is(e, want_new) for e in late)
    assert get(cluster, "/readyz").json() == new.get("/readyz").json()
    for path, body in GOOD:
        assert_same_answer(post(cluster, path, body), new.post(path, json=body), path)


def _is(entry: dict, wants: list[Any]) -> bool:
    i = [b for _, b in STREAM].index(entry["body"])
    return matches(entry, wants[i])


@pytest.mark.timeout(180)
def test_openapi_conformance_through_serve(cluster, local):
    """The schemathesis run of test_serve_fuzz.py, over HTTP through Serve's proxy."""
    import schemathesis

    start = time.perf_counter()
    report = run_schemathesis(
        schemathesis.openapi.from_url(cluster["url"] + "/openapi.json", config=FUZZ_CONFIG), {}
    )
    took = time.perf_counter() - start
    statuses = sorted(report["statuses"].items())
    print(f"\nschemathesis through Serve: {report['cases']} cases in {took:.0f} s: {statuses}")
    assert report["operations"] == 6
    assert any(k.startswith("POST /search/image positive 200") for k in report["statuses"])
