"""Load-test the Ray Serve retrieval app, one hop and two hops, against its serving targets.

Latency, throughput, batching, autoscaling, the search page and the image query encodings,
measured side by side in one run, then verdicts (PASS/FAIL) against the targets.

    .venv/bin/python bench/serve_load.py              # MiniLM backbone, 36x2048 features
    .venv/bin/python bench/serve_load.py --tiny       # tiny random BERT, 6x2048 features (quick)
    .venv/bin/python bench/serve_load.py --bert-base  # the paper's model size, random weights
    .venv/bin/python bench/serve_load.py --checkpoint C --gallery G
    .venv/bin/python bench/serve_load.py --tiny --hops 1 --no-autoscale   # the app only, faster

Starts a private local Ray (``address="local"``: it never joins another cluster on the machine),
serves the real app with ``run_service`` on 127.0.0.1 and a free port, and drives it from a
separate load-generator process: closed loop, N threads, one persistent HTTP connection each,
bounded by time and by request count. Settings:

* in-process baseline: ``RetrievalService.embed_texts`` + ``images_for`` in this process, one
  query per call (concurrency 1) and 32 queries per call; the second is the ceiling, the
  service's own batched throughput without HTTP or Serve;
* Serve's floor on this machine: two echo apps with no model, a FastAPI ingress answering
  alone (one hop: this app's shape, docs/serving.md) and a FastAPI ingress calling one
  deployment (two hops), at concurrency 1. The latency they add is what any app of that shape
  pays on this machine before doing any work;
* for each shape of ``--hops`` (both by default, side by side), ``POST /search/text`` with
  batching on (``max_batch_size`` 32), one Retriever replica, at each concurrency; the search
  page (a new connection, ``GET /``, then the search call its script makes); and one image
  query (``POST /search/image``) of 100 x img_dim float32 features as JSON numbers, base64 and
  an ``.npy`` body. One hop is the app as ``run_service`` starts it; two hops is the older
  shape built from the same code: a FastAPI ingress deployment (``api.build_app`` over a
  DeploymentHandle) in front of the same ``Retriever`` deployment;
* one hop only: batching off (1, redeployed through ``Retriever.options(user_config=...)``),
  and at concurrency 1 the Retriever called through a Serve handle from this process (no HTTP
  proxy, no ingress), which splits Serve's overhead;
* for each shape, one autoscaling phase (``max_replicas`` 2, the top concurrency):
  ``serve.status()`` replica counts during the load and after it, with a bounded wait for the
  downscale (``--no-autoscale`` skips it).

The mean model batch per setting comes from the app's own ``/metrics`` (``hrem_text_batch_size``),
so the table shows that batching really was on or off. Verdicts (PASS/FAIL, with the measured
values) against the targets: Serve's overhead at concurrency 1 (p50 over the in-process call)
at most 1.2x the echo floor of the same shape; QPS at the top concurrency at least 85% of the
in-process ceiling; p99 at most 3x p50 there; autoscaling up and back down, with its times;
binary bodies (``.npy`` or base64) faster than JSON for the image query.

The client shares the machine with the server (2 cores here): its CPU share is printed, and the
load average at start and end, since other work on the machine moves every number.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import re
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hrem_ray.ray_runtime import free_port, set_env_defaults

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test world: tests/helpers.py
from tests.helpers import TINY_MODEL  # noqa: E402

MODELS = {
    "tiny": "tiny random BERT, 6x2048 features",
    "minilm": "MiniLM, 36x2048",
    "bert-base": "bert-base shape (random weights), the paper's model config, 36x2048",
}
BERT_BASE = ["--hidden", "768", "--layers", "12", "--heads", "12", "--intermediate", "3072"]
K = 10
WARMUP_S = 1.5


# -- load generator (a separate process; imports nothing heavy) ------------------------------
def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def _worker(
    host: str,
    port: int,
    path: str,
    bodies: list[bytes],
    offset: int,
    start: threading.Barrier,
    state: dict[str, Any],
    lock: threading.Lock,
    content_type: str,
) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    headers = {"content-type": content_type}
    i = offset
    start.wait()
    while True:
        with lock:
            now = time.perf_counter()
            if now >= state["deadline"]:
                break
            if state["stop"].is_set() or state["issued"] >= state["limit"]:
                state["end_at"] = min(state["end_at"], now)  # the window ends: no new requests
                break
            state["issued"] += 1
        body = bodies[i % len(bodies)]
        i += 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body, headers)
            resp = conn.getresponse()
            resp.read()
            ok = resp.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=60)
        t1 = time.perf_counter()
        with lock:
            state["done"].append((t1, t1 - t0, ok))
    conn.close()


def run_load(
    host: str,
    port: int,
    bodies: list[bytes],
    concurrency: int,
    duration_s: float,
    max_requests: int,
    stop: Any,
    path: str = "/search/text",
    content_type: str = "application/json",
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` threads, each one request at a time on its own connection.
    Counted: the requests that complete in the window from WARMUP_S after the start to the end
    (``duration_s`` later, or earlier at ``max_requests`` requests or when ``stop`` is set); the
    drain after the window is not, so QPS is the rate at full concurrency."""
    now = time.perf_counter()
    state: dict[str, Any] = {
        "stop": stop,
        "issued": 0,
        "limit": max_requests,
        "measure_from": now + WARMUP_S,
        "deadline": now + WARMUP_S + duration_s,
        "end_at": float("inf"),
        "done": [],  # (finish time, latency, ok)
    }
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency)
    cpu0 = _cpu_s()
    threads = [
        threading.Thread(
            target=_worker,
            args=(host, port, path, bodies, i * 7, barrier, state, lock, content_type),
        )
        for i in range(concurrency)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = state["measure_from"]
    last = max((t for t, _, _ in state["done"]), default=start)
    end = max(start, min(state["deadline"], state["end_at"], last))
    window = [(lat, ok) for t, lat, ok in state["done"] if start <= t <= end]
    wall = max(end - start, 1e-9)
    lat = sorted(x for x, ok in window if ok)
    return {
        "n": len(lat),
        "errors": sum(not ok for _, ok in window),
        "p50_ms": 1000 * _percentile(lat, 50),
        "p99_ms": 1000 * _percentile(lat, 99),
        "qps": len(lat) / wall,
        "client_cpu": (_cpu_s() - cpu0) / (wall + WARMUP_S),
    }


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loadgen_main(conn: Any, stop: Any) -> None:
    """Serve load requests sent over ``conn`` until told to quit."""
    while True:
        msg = conn.recv()
        if msg is None:
            return
        stop.clear()
        conn.send(run_load(stop=stop, **msg))


# -- server side ------------------------------------------------------------------------------
def build_world(work: Path, model: str, test_images: int) -> tuple[Path, Path]:
    """A fresh checkpoint and a gallery over synthetic features (CLI commands, in-process)."""
    from hrem_ray.cli import main

    data, ckpt, gallery = work / "data", work / "ckpt", work / "gallery"
    if model == "tiny":
        main(["tiny-bert", "--out", str(work / "bert")])
        # 2048-d features, as the paper's: the image query encodings are timed at 100 x 2048.
        main(["synth", "--out", str(data), "--train-images", "20", "--dev-images", "5",
              "--test-images", str(test_images), "--regions", "6", "--dim", "2048"])  # fmt: skip
        main(["init-checkpoint", "--out", str(ckpt), "--bert-path", str(work / "bert"),
              *TINY_MODEL, "--set=model.img_dim=2048"])  # fmt: skip
    else:  # the synth defaults (36 regions x 2048) and the default model config
        main(["synth", "--out", str(data), "--train-images", "10", "--dev-images", "5",
              "--test-images", str(test_images)])  # fmt: skip
        bert = []  # the offline MiniLM backbone
        if model == "bert-base":
            main(["tiny-bert", "--out", str(work / "bert"), *BERT_BASE])
            bert = ["--bert-path", str(work / "bert")]
        main(["init-checkpoint", "--out", str(ckpt), *bert])
    main(["index", "--checkpoint", str(ckpt), "--data-path", str(data), "--dataset", "f30k",
          "--split", "test", "--out", str(gallery)])  # fmt: skip
    return ckpt, gallery


def in_process(service: Any, queries: list[str], duration_s: float, batch: int) -> dict[str, Any]:
    """The model without Serve: ``batch`` queries per call, closed loop, one thread."""
    lat: list[float] = []
    i = 0
    t_end = time.perf_counter() + WARMUP_S + duration_s
    measure_from = time.perf_counter() + WARMUP_S
    while (now := time.perf_counter()) < t_end:
        qs = [queries[(i + j) % len(queries)] for j in range(batch)]
        i += batch
        embs = service.embed_texts(qs)
        for e in embs:
            service.images_for(e, K)
        if now >= measure_from:
            lat.append(time.perf_counter() - now)
    lat.sort()
    wall = sum(lat)
    return {
        "n": len(lat) * batch,
        "errors": 0,
        "p50_ms": 1000 * _percentile(lat, 50),
        "p99_ms": 1000 * _percentile(lat, 99),
        "qps": len(lat) * batch / wall if wall else float("nan"),
        "client_cpu": float("nan"),
    }


def through_handle(queries: list[str], duration_s: float) -> dict[str, Any]:
    """``search_text`` on the Retriever through a Serve handle from this process, one at a time:
    Serve's replica call without the HTTP proxy and the ingress (splits the overhead)."""
    from ray import serve

    handle = serve.get_deployment_handle("Retriever", app_name="hrem")
    lat: list[float] = []
    i = 0
    t_end = time.perf_counter() + WARMUP_S + duration_s
    measure_from = time.perf_counter() + WARMUP_S
    while (now := time.perf_counter()) < t_end:
        handle.search_text.remote(queries[i % len(queries)], K).result()
        i += 1
        if now >= measure_from:
            lat.append(time.perf_counter() - now)
    lat.sort()
    return {
        "n": len(lat),
        "errors": 0,
        "p50_ms": 1000 * _percentile(lat, 50),
        "p99_ms": 1000 * _percentile(lat, 99),
        "qps": len(lat) / sum(lat) if lat else float("nan"),
        "client_cpu": float("nan"),
    }


def floor_apps() -> dict[str, Any]:
    """Echo apps with no model (POST /echo returns its JSON body): Serve's own cost here."""
    from fastapi import FastAPI
    from ray import serve

    alone, forwarding = FastAPI(), FastAPI()
    options = {"ray_actor_options": {"num_cpus": 0.1}}

    @serve.deployment(**options)
    class Echo:
        async def echo(self, body: dict) -> dict:
            return body

    @serve.deployment(**options)
    @serve.ingress(alone)
    class EchoIngress:
        @alone.post("/echo")
        async def echo(self, body: dict) -> dict:
            return body

    @serve.deployment(**options)
    @serve.ingress(forwarding)
    class ForwardingIngress:
        def __init__(self, echo: Any):
            self.echo_deployment = echo

        @forwarding.post("/echo")
        async def echo(self, body: dict) -> dict:
            return await self.echo_deployment.echo.remote(body)

    return {
        "ingress alone": EchoIngress.bind(),
        "ingress + 1 deployment": ForwardingIngress.bind(Echo.bind()),
    }


RETRIEVER_APP = {1: "hrem", 2: "hrem_retriever"}  # the Serve app holding the Retriever


def deploy_two_hop(
    ckpt: Path, gallery: Path, img_dim: int, n_images: int, max_batch: int, max_replicas: int
) -> None:
    """The older shape, built from the same service code: the ``Retriever`` of ``app.py``
    (autoscaling, its own HTTP app unused) as an application with no route, and in front of
    it a FastAPI ingress deployment (``build_app`` of ``api.py``, one replica) that forwards
    every route's operation through a DeploymentHandle: proxy -> ingress -> Retriever, two
    hops. Serve allows one FastAPI deployment per application, hence two applications. The
    ingress holds no model, so ``img_dim`` (its request schema) and the gallery size (its
    gauge) are arguments."""
    from ray import serve

    from hrem_ray.serving.api import build_app
    from hrem_ray.serving.app import AUTOSCALING, Retriever

    class HandleBackend:
        """``api.Backend`` over a DeploymentHandle: each operation runs in a Retriever."""

        def __init__(self, handle: Any, img_dim: int, n_images: int):
            self.handle, self.img_dim, self.n_images = handle, img_dim, n_images

        async def call(self, op: str, **kwargs: Any) -> Any:
            return await getattr(self.handle, op).remote(**kwargs)

        def gallery_images(self) -> int:
            return self.n_images

    # max_ongoing_requests: Serve's default (5) would cap the ingress below concurrency 32.
    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
    @serve.ingress()
    class Ingress:
        def __init__(self, app_name: str, img_dim: int, n_images: int):
            handle = serve.get_deployment_handle("Retriever", app_name=app_name)
            self.backend = HandleBackend(handle, img_dim, n_images)

        def __serve_build_asgi_app__(self):
            return build_app(self.backend)

    autoscaling = {**AUTOSCALING, "max_replicas": max_replicas}
    retriever = Retriever.options(
        autoscaling_config=autoscaling, user_config={"max_batch_size": max_batch}
    ).bind(str(ckpt.resolve()), str(gallery.resolve()))
    serve.run(retriever, name=RETRIEVER_APP[2], route_prefix=None)
    serve.run(Ingress.bind(RETRIEVER_APP[2], img_dim, n_images), name="hrem", route_prefix="/")


def feature_bodies(img_dim: int, regions: int = 100) -> list[tuple[str, str, str, bytes]]:
    """One image query (``POST /search/image``, k=K) of ``regions`` x ``img_dim`` float32
    features in each encoding of docs/serving.md: (name, path, content type, body)."""
    import base64
    import io

    import numpy as np

    feats = np.random.default_rng(0).uniform(0, 4, (regions, img_dim)).astype(np.float32)
    npy = io.BytesIO()
    np.save(npy, feats)
    as_json = json.dumps({"features": feats.tolist(), "k": K}).encode()
    encoded = base64.b64encode(feats.astype("<f4").tobytes()).decode()
    as_b64 = json.dumps({"features": {"shape": list(feats.shape), "base64": encoded}, "k": K})
    return [
        ("JSON", "/search/image", "application/json", as_json),
        ("base64", "/search/image", "application/json", as_b64.encode()),
        ("npy", f"/search/image?k={K}", "application/x-npy", npy.getvalue()),
    ]


def page_timing(
    port: int, queries: list[str], duration_s: float, max_rounds: int = 200
) -> dict[str, Any]:
    """The search page as a browser uses it, in plain HTTP: a new connection, ``GET /``, then
    on the same connection the one API call its search form makes (the path is read from the
    page's script, so a changed page is measured as it is). Sequential, after one warm-up."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
        found = re.search(r'post\("(/search/[a-z]+)"', r.read().decode())
    if found is None:
        raise RuntimeError('the search page has no post("/search/...") call')
    api = found.group(1)
    page, search, total = [], [], []
    size, i, errors = 0, 0, 0
    t_end = time.perf_counter() + duration_s
    while (i == 0 or time.perf_counter() < t_end) and i < max_rounds:
        body = json.dumps({"query": queries[i % len(queries)], "k": K}).encode()
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request("GET", "/", headers={"accept": "text/html"})
            resp = conn.getresponse()
            size = len(resp.read())
            ok = resp.status == 200
            t1 = time.perf_counter()
            conn.request("POST", api, body, {"content-type": "application/json"})
            resp = conn.getresponse()
            ok = ok and resp.status == 200 and bool(json.loads(resp.read())["results"])
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            ok = False
        finally:
            conn.close()
        t2 = time.perf_counter()
        i += 1
        if i == 1:
            continue  # warm-up round
        if not ok:
            errors += 1
            continue
        page.append(t1 - t0)
        search.append(t2 - t1)
        total.append(t2 - t0)
    page.sort(), search.sort(), total.sort()
    return {
        "api": api,
        "n": len(total),
        "errors": errors,
        "page_bytes": size,
        "page_p50_ms": 1000 * _percentile(page, 50),
        "search_p50_ms": 1000 * _percentile(search, 50),
        "p50_ms": 1000 * _percentile(total, 50),
        "p99_ms": 1000 * _percentile(total, 99),
    }


def batch_counters(base: str) -> tuple[float, float]:
    """(sum, count) of the ingress's hrem_text_batch_size histogram."""
    import urllib.request

    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    found = dict(re.findall(r"^hrem_text_batch_size_(sum|count) (\S+)$", text, re.M))
    return float(found.get("sum", 0)), float(found.get("count", 0))


def wait_ready(base: str, timeout_s: float = 120) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    body = json.dumps({"query": "warm up", "k": 1}).encode()
    while True:
        try:
            req = urllib.request.Request(
                base + "/search/text", body, {"content-type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=30) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base} did not answer /search/text in {timeout_s:.0f} s")
        time.sleep(0.5)


def replica_states(app_name: str = "hrem") -> dict[str, int]:
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or "Retriever" not in app.deployments:
        return {}
    states = app.deployments["Retriever"].replica_states
    return {str(getattr(k, "value", k)): n for k, n in states.items()}


def deploy(ckpt: Path, gallery: Path, max_batch: int, max_replicas: int) -> None:
    """Redeploy the app with a second ``serve.run``: the user_config reaches the new replicas'
    ``reconfigure()`` (Ray 2.60's ``serve.run`` gives every deployment a new version, so the
    replicas restart; ``Deployment.options(version=...)`` is gone)."""
    from ray import serve

    from hrem_ray.serving.app import AUTOSCALING, Retriever

    autoscaling = {**AUTOSCALING, "max_replicas": max_replicas}
    app = Retriever.options(
        autoscaling_config=autoscaling, user_config={"max_batch_size": max_batch}
    ).bind(str(ckpt.resolve()), str(gallery.resolve()))
    serve.run(app, name="hrem", route_prefix="/")


def autoscale_phase(a, c, base, load, stop, rows, log, hops: int) -> dict[str, Any]:
    """Load at concurrency ``c`` until a second replica has served 8 s (at most
    ``a.scale_load_s``), sampling ``serve.status()`` every second; then wait (bounded) until
    the deployment is back to one RUNNING replica. Times are from the start of the load."""
    samples: list[tuple[float, dict[str, int]]] = []
    done = threading.Event()
    t_load = time.monotonic()
    out: dict[str, Any] = {}

    def sample() -> None:
        while not done.is_set():
            t, states = time.monotonic() - t_load, replica_states(RETRIEVER_APP[hops])
            samples.append((t, states))
            if sum(states.values()) >= 2:
                out.setdefault("decided_at", t)  # a second replica exists (STARTING or more)
            if states.get("RUNNING", 0) >= 2:
                out.setdefault("up_at", t)
            done.wait(1.0)

    def stopper() -> None:
        while time.monotonic() - t_load < a.scale_load_s and not done.is_set():
            if "up_at" in out and time.monotonic() - t_load > out["up_at"] + 8:
                break
            time.sleep(0.5)
        stop.set()

    threads = [threading.Thread(target=f, daemon=True) for f in (sample, stopper)]
    for t in threads:
        t.start()
    try:
        s0, n0 = batch_counters(base)
        r = load(c, a.scale_load_s + 5, max_requests=10**7)
        s1, n1 = batch_counters(base)
        threads[1].join()
        out["load_s"] = time.monotonic() - t_load
        out["peak_in_load"] = max(
            (s.get("RUNNING", 0) for t, s in samples if t <= out["load_s"]), default=0
        )
        mean_batch = f"{(s1 - s0) / (n1 - n0):.1f}" if n1 > n0 else "-"
        rows.append(fmt_row("Serve, batching on, max_replicas 2", hops, c, r, mean_batch))
        log(rows[-1])
        log(f"replicas at the end of the load: {samples[-1][1] if samples else '?'}")
        deadline = time.monotonic() + a.scale_down_wait_s
        while time.monotonic() < deadline:
            states = samples[-1][1] if samples else {}
            if "decided_at" in out and states == {"RUNNING": 1} and samples[-1][0] > out["load_s"]:
                out["down_after"] = samples[-1][0] - out["load_s"]
                break
            if "decided_at" not in out and time.monotonic() - t_load > out["load_s"] + 15:
                break  # never scaled: nothing to wait for
            time.sleep(0.5)
    finally:
        done.set()
        for t in threads:
            t.join(5)
    out["peak"] = max((s.get("RUNNING", 0) for _, s in samples), default=0)
    out["after"] = replica_states(RETRIEVER_APP[hops])
    return out


def fmt_row(name: str, hops: Any, c: Any, r: dict[str, Any], batch: str) -> str:
    cpu = r.get("client_cpu", float("nan"))
    cpu = "" if cpu != cpu else f"{100 * cpu:.0f}%"
    qps = r.get("qps", float("nan"))
    qps = "-" if qps != qps else f"{qps:.1f}"  # the search page rows: one at a time, no QPS
    return (
        f"| {name:<41} | {hops!s:>4} | {c!s:>4} | {r['n']:>6} | {r['errors']:>4} "
        f"| {r['p50_ms']:>8.1f} "
        f"| {r['p99_ms']:>8.1f} | {qps:>7} | {batch:>6} | {cpu:>6} |"
    )


def key(hops: int, name: str) -> str:
    """Result keys: the one-hop app's as before (bench/run_all.py reads them), the two-hop
    app's under ``2hop/``."""
    return name if hops == 1 else f"2hop/{name}"


FLOOR = {1: "ingress alone", 2: "ingress + 1 deployment"}  # echo apps of each shape
# Targets (issue 16): Serve's overhead at concurrency 1 at most this times the echo floor of
# the same shape; QPS at the top concurrency at least this share of the in-process ceiling
# (32 queries per call); p99 at most this times p50 there.
OVERHEAD_VS_FLOOR = 1.2
CEILING_SHARE = 0.85
P99_OVER_P50 = 3.0


def scale_text(s: dict[str, Any] | None) -> tuple[str, bool | None]:
    """The autoscaling phase in words, and whether it scaled up and back down."""
    if not s:
        return "not run (--no-autoscale)", None
    if s.get("decided_at") is None:
        return f"did not scale up in {s['load_s']:.0f} s of load", False
    up, down = s.get("up_at"), s.get("down_after")
    text = f"2nd replica started at {s['decided_at']:.0f} s, "
    text += f"RUNNING at {up:.0f} s" if up is not None else "never RUNNING"
    text += f"; back to 1 {down:.0f} s after the load" if down is not None else "; not back to 1"
    return text, up is not None and down is not None


def verdicts(
    results: dict[str, Any], scales: dict[int, Any], hops: list[int], top: int
) -> list[tuple[str, str, str, str]]:
    """(target, shape, measured, PASS/FAIL/-) for each target of each measured shape."""
    out: list[tuple[str, str, str, str]] = []
    base1 = results.get("in-process, 1 query/call")
    ceiling = results.get("in-process, 32 queries/call")
    verdict = lambda ok: "-" if ok is None else "PASS" if ok else "FAIL"  # noqa: E731
    for h in hops:
        shape = f"{h} hop{'s' if h > 1 else ''}"
        r1, floor = results.get(key(h, "on/1")), results.get(f"floor/{FLOOR[h]}")
        if r1 and floor and base1:
            over = r1["p50_ms"] - base1["p50_ms"]
            ratio = over / max(floor["p50_ms"], 1e-9)
            out.append((f"overhead at conc 1 <= {OVERHEAD_VS_FLOOR:g}x the echo floor", shape,
                        f"{over:.1f} ms over in-process vs floor {floor['p50_ms']:.1f} ms "
                        f"({ratio:.2f}x)", verdict(ratio <= OVERHEAD_VS_FLOOR)))  # fmt: skip
        rt = results.get(key(h, f"on/{top}"))
        if rt and ceiling:
            share = rt["qps"] / max(ceiling["qps"], 1e-9)
            out.append((f"QPS at conc {top} >= {CEILING_SHARE:.0%} of the in-process ceiling",
                        shape, f"{rt['qps']:.1f} vs {ceiling['qps']:.1f} QPS ({share:.0%})",
                        verdict(share >= CEILING_SHARE)))  # fmt: skip
        if rt:
            ratio = rt["p99_ms"] / max(rt["p50_ms"], 1e-9)
            out.append((f"p99 <= {P99_OVER_P50:g}x p50 at conc {top}", shape,
                        f"p99 {rt['p99_ms']:.1f} / p50 {rt['p50_ms']:.1f} ms ({ratio:.2f}x)",
                        verdict(ratio <= P99_OVER_P50)))  # fmt: skip
        text, ok = scale_text(scales.get(h))
        out.append(("autoscaling 1 -> 2 -> 1 replicas (times reported)", shape, text, verdict(ok)))
        enc = {e: results.get(key(h, f"features/{e}")) for e in ("JSON", "base64", "npy")}
        if all(enc.values()):
            j = enc["JSON"]["p50_ms"]
            best = min(enc["npy"]["p50_ms"], enc["base64"]["p50_ms"])
            out.append((f"binary faster than JSON, image query {enc['npy']['shape']}", shape,
                        f"p50 JSON {j:.1f}, base64 {enc['base64']['p50_ms']:.1f}, npy "
                        f"{enc['npy']['p50_ms']:.1f} ms (JSON/binary {j / max(best, 1e-9):.1f}x)",
                        verdict(best < j)))  # fmt: skip
    return out


def comparison(
    results: dict[str, Any], scales: dict[int, Any], top: int
) -> list[tuple[str, str, str, str]]:
    """One hop vs two hops, figure by figure: (figure, 1 hop, 2 hops, 2 hops / 1 hop)."""

    def get(h: int, name: str, field: str) -> float | None:
        r = scales.get(h) if name == "scale" else results.get(key(h, name))
        return r.get(field) if r else None

    figures = [
        ("p50 ms, conc 1", "on/1", "p50_ms", "ms"),
        ("p99 ms, conc 1", "on/1", "p99_ms", "ms"),
        (f"p50 ms, conc {top}", f"on/{top}", "p50_ms", "ms"),
        (f"p99 ms, conc {top}", f"on/{top}", "p99_ms", "ms"),
        (f"QPS, conc {top}", f"on/{top}", "qps", "/s"),
        ("image query p50 ms, .npy body", "features/npy", "p50_ms", "ms"),
        ("image query p50 ms, JSON body", "features/JSON", "p50_ms", "ms"),
        ("search page: GET / p50 ms", "page", "page_p50_ms", "ms"),
        ("search page: GET / + one search p50 ms", "page", "p50_ms", "ms"),
        ("scale-up: 2nd replica RUNNING, s into load", "scale", "up_at", "s"),
        ("scale-down: back to 1 replica, s after load", "scale", "down_after", "s"),
    ]
    rows = []
    for label, name, field, _unit in figures:
        one, two = get(1, name, field), get(2, name, field)
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        ratio = f"{two / one:.2f}x" if one and two is not None else "-"
        rows.append((label, fmt(one), fmt(two), ratio))
    return rows


def md_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(f"{c!s:<{w}}" for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="use this checkpoint (with --gallery)")
    p.add_argument("--gallery", help="gallery folder written by hrem-ray index")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny random BERT and 6x2048 features")
    size.add_argument(
        "--bert-base", action="store_true", help="a random BERT of bert-base's shape (HREM's)"
    )
    p.add_argument("--test-images", type=int, default=100, help="gallery size when building one")
    p.add_argument("--duration", type=float, default=6.0, help="measured seconds per setting")
    p.add_argument("--max-requests", type=int, default=20000, help="cap per setting")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument(
        "--hops", default="1,2", help="app shapes: 1 (the app), 2 (ingress + Retriever), or 1,2"
    )
    p.add_argument("--scale-load-s", type=float, default=40.0, help="max load in the scale phase")
    p.add_argument("--scale-down-wait-s", type=float, default=75.0)
    p.add_argument("--no-autoscale", action="store_true", help="skip the max_replicas 2 phases")
    p.add_argument("--work", help="folder for the built gallery (default: a temp folder)")
    p.add_argument("--json", help="also write the figures here (bench/run_all.py)")
    a = p.parse_args(argv)
    if bool(a.checkpoint) != bool(a.gallery):
        p.error("--checkpoint and --gallery go together")
    levels = [int(x) for x in a.concurrency.split(",")]
    hops = sorted({int(x) for x in a.hops.split(",")})
    if not set(hops) <= {1, 2}:
        p.error("--hops takes 1, 2 or 1,2")
    model = "tiny" if a.tiny else "bert-base" if a.bert_base else "minilm"
    set_env_defaults()
    started = time.monotonic()
    log = lambda msg: print(f"[{time.monotonic() - started:6.1f} s] {msg}", flush=True)  # noqa: E731
    load0 = os.getloadavg()

    # The load generator starts first, before this process holds Ray or torch threads.
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    stop = ctx.Event()
    gen = ctx.Process(target=loadgen_main, args=(child, stop), daemon=True, name="loadgen")
    gen.start()

    tmp = None
    if a.checkpoint:
        ckpt, gallery = Path(a.checkpoint), Path(a.gallery)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="hrem_serve_load_")
        work = Path(a.work) if a.work else Path(tmp.name)
        log(f"building a {model} checkpoint and gallery in {work}")
        ckpt, gallery = build_world(work, model, a.test_images)

    import ray
    import torch
    from ray import serve

    from hrem_ray.index.gallery import Gallery
    from hrem_ray.serving.app import run_service
    from hrem_ray.serving.service import RetrievalService

    torch.set_num_threads(1)
    opened = Gallery.open(gallery)
    captions, n_images = opened.captions, opened.n_images
    del opened
    queries = captions[: min(len(captions), 500)]
    bodies = [json.dumps({"query": q, "k": K}).encode() for q in queries]
    rows: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    scales: dict[int, dict[str, Any]] = {}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    top = max(levels)

    def load(
        c: int,
        duration: float,
        max_requests: int | None = None,
        path: str = "/search/text",
        payloads: list[bytes] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        limit = max_requests or a.max_requests
        parent.send(
            dict(host="127.0.0.1", port=port, bodies=payloads or bodies, concurrency=c,
                 duration_s=duration, max_requests=limit, path=path, content_type=content_type)
        )  # fmt: skip
        return parent.recv()

    def add(h: Any, name: str, c: Any, r: dict[str, Any], batch: str = "-") -> None:
        rows.append(fmt_row(name, h, c, r, batch))
        log(rows[-1])

    def deploy_shape(h: int, max_batch: int, max_replicas: int) -> None:
        t0 = time.monotonic()
        if h == 1:
            deploy(ckpt, gallery, max_batch=max_batch, max_replicas=max_replicas)
        else:
            serve.delete("hrem")  # a clean switch of shape
            deploy_two_hop(ckpt, gallery, img_dim, n_images, max_batch, max_replicas)
        wait_ready(base)
        log(f"{h}-hop app (max_batch {max_batch}, max_replicas {max_replicas}) up in "
            f"{time.monotonic() - t0:.1f} s")  # fmt: skip

    def measure_shape(h: int) -> None:
        """Batching on at every level, the search page and the image query encodings."""
        for c in levels:
            s0, n0 = batch_counters(base)
            r = load(c, a.duration)
            s1, n1 = batch_counters(base)
            results[key(h, f"on/{c}")] = r
            add(h, "Serve, batching on (max 32)", c, r,
                f"{(s1 - s0) / (n1 - n0):.1f}" if n1 > n0 else "-")  # fmt: skip
        if h == 1:
            results["on/handle"] = r = through_handle(queries, a.duration)
            add("-", "Retriever handle, no HTTP (batching on)", 1, r)
        results[key(h, "page")] = r = page_timing(port, queries, a.duration)
        add(h, f"search page: GET / + POST {r['api']}", 1, r)
        for encoding, path, content_type, payload in feature_bodies(img_dim):
            r = load(1, a.duration, path=path, payloads=[payload], content_type=content_type)
            shape = {"bytes": len(payload), "shape": f"100x{img_dim}"}
            results[key(h, f"features/{encoding}")] = {**r, **shape}
            add(h, f"image query, {encoding} ({len(payload)} B)", 1, r)

    try:
        log("ray.init (a private local instance)")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        t0 = time.monotonic()
        url = run_service(str(ckpt), str(gallery), host="127.0.0.1", port=port, max_replicas=1)
        wait_ready(base)
        log(f"run_service up at {url} in {time.monotonic() - t0:.1f} s")

        # In-process baseline, with Serve up and idle (the same background as the Serve runs).
        service = RetrievalService(ckpt, gallery)
        service.embed_texts(queries[:32])  # warm
        for batch in (1, 32):
            name = f"in-process, {batch} quer{'y' if batch == 1 else 'ies'}/call"
            results[name] = r = in_process(service, queries, a.duration, batch)
            add("-", name, 1, r, str(batch))
        img_dim = service.img_dim
        del service

        for h, (name, floor_app) in zip((1, 2), floor_apps().items(), strict=True):
            serve.run(floor_app, name="floor", route_prefix="/floor")
            results[f"floor/{name}"] = r = load(1, a.duration, path="/floor/echo")
            add(h, f"Serve floor: echo, {name}", 1, r)
            serve.delete("floor")

        if 1 in hops:  # the app as run_service started it
            measure_shape(1)
            deploy_shape(1, max_batch=1, max_replicas=1)
            for c in levels:
                s0, n0 = batch_counters(base)
                r = load(c, a.duration)
                s1, n1 = batch_counters(base)
                results[f"off/{c}"] = r
                add(1, "Serve, batching off (max 1)", c, r,
                    f"{(s1 - s0) / (n1 - n0):.1f}" if n1 > n0 else "-")  # fmt: skip
            results["off/handle"] = r = through_handle(queries, a.duration)
            add("-", "Retriever handle, no HTTP (batching off)", 1, r)
            if not a.no_autoscale:
                deploy_shape(1, max_batch=32, max_replicas=2)
                log(f"autoscaling phase, 1 hop: max_replicas 2, concurrency {top}")
                scales[1] = autoscale_phase(a, top, base, load, stop, rows, log, hops=1)
        if 2 in hops:
            deploy_shape(2, max_batch=32, max_replicas=1)
            measure_shape(2)
            if not a.no_autoscale:
                deploy_shape(2, max_batch=32, max_replicas=2)
                log(f"autoscaling phase, 2 hops: max_replicas 2, concurrency {top}")
                scales[2] = autoscale_phase(a, top, base, load, stop, rows, log, hops=2)
    finally:
        parent.send(None)
        gen.join(10)
        if gen.is_alive():
            gen.terminate()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if tmp is not None:
                tmp.cleanup()

    header = (
        f"| {'setting':<41} | {'hops':>4} | {'conc':>4} | {'n':>6} | {'err':>4} | {'p50 ms':>8} "
        f"| {'p99 ms':>8} | {'QPS':>7} | {'batch':>6} | {'client':>6} |"
    )
    print()
    print(f"model: {MODELS[model]}; "
          f"checkpoint {a.checkpoint or 'built fresh'}; gallery {n_images} images; "
          f"{a.duration:g} s per setting after {WARMUP_S:g} s warm-up; k={K}")  # fmt: skip
    print(header)
    print("|" + "|".join("-" * (len(x) - 0) for x in header.split("|")[1:-1]) + "|")
    for row in rows:
        print(row)
    print("batch: mean queries per model call (from the app's /metrics); client: CPU of the "
          "load-generator process; search page rows: p50/p99 of GET / + the search, "
          "one at a time on a new connection")  # fmt: skip

    if f"on/{top}" in results and f"off/{top}" in results:
        speedup = results[f"on/{top}"]["qps"] / max(results[f"off/{top}"]["qps"], 1e-9)
        ceiling = results["in-process, 32 queries/call"]["qps"]
        ceiling /= results["in-process, 1 query/call"]["qps"]
        print(f"batching at concurrency {top}, 1 hop: {speedup:.2f}x the QPS of batching off; "
              f"in-process, 32 queries per call give {ceiling:.2f}x the QPS of one")  # fmt: skip
    if hops == [1, 2]:
        print()
        print("one hop vs two hops (batching on; autoscaling: max_replicas 2, "
              f"concurrency {top}):")  # fmt: skip
        for line in md_table(("figure", "1 hop", "2 hops", "2 hops / 1 hop"),
                             comparison(results, scales, top)):  # fmt: skip
            print(line)
    load1 = os.getloadavg()
    print()
    print("targets:")
    for line in md_table(("target", "shape", "measured", "verdict"),
                         verdicts(results, scales, hops, top)):  # fmt: skip
        print(line)
    print(f"load average (1/5/15 min): start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
          f"end {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}; {os.cpu_count()} CPUs; "
          f"total {time.monotonic() - started:.0f} s")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": model, "results": results, "scale": scales.get(1),
                       "scale_2hop": scales.get(2), "load": [load0, load1]},
                      f, default=str)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
