"""Load-test the Ray Serve retrieval app, one hop and two hops, against its serving targets.

    .venv/bin/python bench/serve_load.py              # MiniLM backbone, 36x2048 features
    .venv/bin/python bench/serve_load.py --tiny       # tiny random BERT, 6x2048 features (quick)
    .venv/bin/python bench/serve_load.py --bert-base  # the paper's model size, random weights
    .venv/bin/python bench/serve_load.py --checkpoint C --gallery G
    .venv/bin/python bench/serve_load.py --tiny --hops 1 --no-autoscale   # the app only, faster

A private local Ray (``address="local"``: it never joins another cluster on the machine) serves
the real app (``run_service``) on 127.0.0.1. Every setting is the same closed loop, ``measure``:
N threads, one request at a time each, counted for ``--duration`` s after a warm-up. HTTP load
comes from a separate process, so that the client does not share the server's GIL. The
settings (docs/serving.md, "Benchmark"): the model in-process, 1 and 32 queries a call (the
ceiling); Serve's floor, an echo app of each shape; for each shape of ``SHAPES``, text search
with batching on at each concurrency, the search page, and an image query of 100 x img_dim
features as JSON, base64 and ``.npy``; one hop with batching off, and through a Serve handle
(no HTTP); and an autoscaling phase for each shape. The mean model batch comes from the app's
``/metrics``. The run ends with PASS/FAIL against the targets of docs/benchmarks.md and the
load average, since other work on the machine moves every number.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import re
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from hrem_ray.ray_runtime import haproxy_env, set_env_defaults
from hrem_ray.serving.client import wait_ready
from hrem_ray.testing import TINY_MODEL, free_port, metric_samples

MODELS = {
    "tiny": "tiny random BERT, 6x2048 features",
    "minilm": "MiniLM, 36x2048",
    "bert-base": "bert-base shape (random weights), the paper's model config, 36x2048",
}
BERT_BASE = ["--hidden", "768", "--layers", "12", "--heads", "12", "--intermediate", "3072"]
K = 10
WARMUP_S = 1.5
# --proxy: what stands between the clients and the replicas (docs/serving.md, "Benchmark"), as
# the environment the private Ray starts with (a variable already set wins)
PROXIES: dict[str, Callable[[], dict[str, str]]] = {
    "serve": dict,  # Serve's proxy, the default
    "throughput": lambda: {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},  # Serve's proxy, tuned
    "haproxy": haproxy_env,  # hrem-ray serve --haproxy
}
# Targets (issue 16): Serve's overhead at concurrency 1 at most this times the echo floor of
# the same shape; QPS at the top concurrency at least this share of the in-process ceiling
# (32 queries per call); p99 at most this times p50 there.
OVERHEAD_VS_FLOOR = 1.2
CEILING_SHARE = 0.85
P99_OVER_P50 = 3.0
STARTED = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f} s] {msg}", flush=True)


# -- the load generator: one closed loop for every setting ------------------------------------
Parts = tuple[float, ...]  # the seconds of each part of a request that succeeded
OK: Parts = ()  # a request of one part that succeeded
Client = Callable[[], "Parts | None"]  # makes one request; None: it failed


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


def measure(
    clients: list[Client], duration_s: float, max_requests: int = 10**9, stop: Any = None,
    per_call: int = 1, warmup_s: float = WARMUP_S,
) -> dict[str, Any]:  # fmt: skip
    """Closed loop: one thread per client, one request at a time each. Counted: the requests
    that complete in the window from ``warmup_s`` after the start to its end (``duration_s``
    later, or earlier at ``max_requests`` requests or once ``stop`` is set); the drain after
    the window is not, so QPS is the rate at full concurrency. ``per_call``: queries in a
    request. Requests of several parts also give each part's p50 (``parts_p50_ms``)."""
    start = time.perf_counter() + warmup_s
    deadline, tickets = start + duration_s, itertools.count()
    stopped: list[float] = []  # when threads stopped early, at the request cap or the stop
    done: list[tuple[float, float, Parts | None]] = []  # (finish time, latency, parts)

    def work(client: Client) -> None:
        while (t0 := time.perf_counter()) < deadline:
            if next(tickets) >= max_requests or (stop is not None and stop.is_set()):
                stopped.append(t0)  # the window ends: no new requests
                return
            parts = client()
            t1 = time.perf_counter()
            done.append((t1, t1 - t0, parts))

    with ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(work, clients))  # re-raises what a client raised
    end = max(start, min(deadline, *stopped, max((t for t, _, _ in done), default=start)))
    window = [(lat, parts) for t, lat, parts in done if start <= t <= end]
    lat = sorted(x for x, parts in window if parts is not None)
    r = {
        "n": len(lat) * per_call,
        "errors": len(window) - len(lat),
        "p50_ms": 1000 * percentile(lat, 50),
        "p99_ms": 1000 * percentile(lat, 99),
        "qps": len(lat) * per_call / max(end - start, 1e-9),
    }
    if split := [parts for _, parts in window if parts]:
        r["parts_p50_ms"] = [1000 * percentile(sorted(p), 50) for p in zip(*split, strict=True)]
    return r


class HttpPost:
    """POST ``bodies`` in turn on one persistent connection (a new one after an error)."""

    def __init__(self, port: int, path: str, bodies: list[bytes], content_type: str, offset: int):
        self.port, self.path, self.bodies, self.i = port, path, bodies, offset
        self.headers = {"content-type": content_type}
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def __call__(self) -> Parts | None:
        body = self.bodies[self.i % len(self.bodies)]
        self.i += 1
        try:
            self.conn.request("POST", self.path, body, self.headers)
            resp = self.conn.getresponse()
            resp.read()
            return OK if resp.status == 200 else None
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            return None


def loadgen(conn: Any, stop: Any) -> None:
    """The load-generator process: measures each load sent over ``conn`` (None: quit), with
    its own CPU share (``client_cpu``)."""
    while (load := conn.recv()) is not None:
        c, duration_s, max_requests, http = load
        clients = [HttpPost(**http, offset=7 * i) for i in range(c)]
        cpu0, t0 = time.process_time(), time.perf_counter()
        r = measure(clients, duration_s, max_requests, stop)
        r["client_cpu"] = (time.process_time() - cpu0) / (time.perf_counter() - t0)
        for client in clients:
            client.conn.close()
        conn.send(r)


class LoadGen:
    """The load-generator process, started before this process holds Ray or torch threads."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.stop = ctx.Event()
        self.proc = ctx.Process(target=loadgen, args=(child, self.stop), daemon=True)
        self.proc.start()

    def run(self, load: tuple, every_s: Callable[[], None] | None = None) -> dict[str, Any]:
        """Measure ``load`` there; ``every_s`` is called each second meanwhile."""
        self.stop.clear()
        self.conn.send(load)
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise RuntimeError(f"the load generator exited ({self.proc.exitcode})")
            if every_s is not None:
                every_s()
        return self.conn.recv()

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()


def in_process(service: Any, queries: list[str], batch: int) -> Client:
    """``batch`` queries a call to the service itself: the model without HTTP or Serve."""
    cycle = itertools.cycle(queries)

    def call() -> Parts:
        for emb in service.embed_texts([next(cycle) for _ in range(batch)]):
            service.images_for(emb, K)
        return OK

    return call


def through_handle(queries: list[str], loop: asyncio.AbstractEventLoop) -> Client:
    """``search_text`` on the one-hop app's Retriever through a Serve handle: Serve's replica
    call without the HTTP proxy and the ingress (splits the overhead). Awaited on ``loop``
    (``EventLoop``), as a deployment awaits a handle: under RAY_SERVE_THROUGHPUT_OPTIMIZED
    a handle's router runs on the caller's event loop, and a blocking ``.result()`` from a
    thread without one raises."""
    from ray import serve

    handle = serve.get_deployment_handle("Retriever", app_name="hrem")
    cycle = itertools.cycle(queries)

    async def search(query: str) -> None:
        await handle.search_text.remote(query, K)

    def call() -> Parts:
        asyncio.run_coroutine_threadsafe(search(next(cycle)), loop).result()
        return OK

    return call


class EventLoop:
    """An asyncio event loop in a thread of its own, for the handle clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()


class PageVisit:
    """The search page as a browser uses it, in plain HTTP: a new connection, ``GET /``, then
    on the same connection the one API call its search form makes (the path is read from the
    page's script, so a changed page is measured as it is). Parts: the page, the search."""

    def __init__(self, port: int, queries: list[str]):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
            found = re.search(r'post\("(/search/[a-z]+)"', r.read().decode())
        if found is None:
            raise RuntimeError('the search page has no post("/search/...") call')
        self.api, self.port, self.page_bytes = found.group(1), port, 0
        self.cycle = itertools.cycle(queries)

    def __call__(self) -> Parts | None:
        body = json.dumps({"query": next(self.cycle), "k": K}).encode()
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", "/", headers={"accept": "text/html"})
            resp = conn.getresponse()
            self.page_bytes, ok, t1 = len(resp.read()), resp.status == 200, time.perf_counter()
            conn.request("POST", self.api, body, {"content-type": "application/json"})
            resp = conn.getresponse()
            ok = ok and resp.status == 200 and bool(json.loads(resp.read())["results"])
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            ok = False
        finally:
            conn.close()
        return (t1 - t0, time.perf_counter() - t1) if ok else None


def feature_bodies(img_dim: int, regions: int = 100) -> list[tuple[str, str, str, bytes]]:
    """One image query (``POST /search/image``, k=K) of ``regions`` x ``img_dim`` float32
    features in each encoding of docs/serving.md: (name, path, content type, body)."""
    import numpy as np

    feats = np.random.default_rng(0).uniform(0, 4, (regions, img_dim)).astype(np.float32)
    npy = io.BytesIO()
    np.save(npy, feats)
    encoded = base64.b64encode(feats.astype("<f4").tobytes()).decode()
    as_b64 = {"features": {"shape": list(feats.shape), "base64": encoded}, "k": K}
    return [
        ("JSON", "/search/image", "application/json",
         json.dumps({"features": feats.tolist(), "k": K}).encode()),
        ("base64", "/search/image", "application/json", json.dumps(as_b64).encode()),
        ("npy", f"/search/image?k={K}", "application/x-npy", npy.getvalue()),
    ]  # fmt: skip


# -- the app shapes -------------------------------------------------------------------------------
class Shape(NamedTuple):
    """One hop: the app as ``run_service`` starts it (proxy -> Retriever). Two hops: the older
    shape, a FastAPI ingress deployment in front of the same Retriever (docs/serving.md)."""

    hops: int
    retriever_app: str  # the Serve application holding the Retriever
    floor: str  # the echo app of the same shape, no model: Serve's own cost
    prefix: str  # of its result keys; the one-hop app's have none (bench/run_all.py reads them)

    @property
    def name(self) -> str:
        return f"{self.hops} hop{'s' if self.hops > 1 else ''}"

    def key(self, name: str) -> str:
        return self.prefix + name


SHAPES = {
    1: Shape(1, "hrem", "ingress alone", ""),
    2: Shape(2, "hrem_retriever", "ingress + 1 deployment", "2hop/"),
}


def floor_app(shape: Shape) -> Any:
    """An echo app of ``shape``: ``POST /echo`` returns its JSON body."""
    from fastapi import FastAPI
    from ray import serve

    api, options = FastAPI(), {"ray_actor_options": {"num_cpus": 0.1}}

    @serve.deployment(**options)
    class Echo:
        async def echo(self, body: dict) -> dict:
            return body

    @serve.deployment(**options)
    @serve.ingress(api)
    class EchoIngress:
        def __init__(self, forward_to: Any = None):
            self.forward_to = forward_to

        @api.post("/echo")
        async def echo(self, body: dict) -> dict:
            return body if self.forward_to is None else await self.forward_to.echo.remote(body)

    return EchoIngress.bind() if shape.hops == 1 else EchoIngress.bind(Echo.bind())


def deploy_shape(
    shape: Shape, ckpt: Path, gallery: Path, img_dim: int, n_images: int, max_batch: int,
    max_replicas: int, num_gpus: float = 0.0, bf16: bool = False,
) -> None:  # fmt: skip
    """(Re)deploy ``shape`` with a new ``serve.run``: the user_config reaches the new replicas'
    ``reconfigure()`` (Ray 2.60 gives every deployment of a ``serve.run`` a new version). Two
    hops: Serve allows one FastAPI deployment per application, so the Retriever is one with no
    route and the ingress (``build_app`` over a DeploymentHandle, one replica) another; it
    holds no model, so it is told ``img_dim`` (its request schema) and the gallery size.
    ``num_gpus`` and ``bf16``: the Retriever's, as ``run_service`` takes them."""
    from ray import serve

    from hrem_ray.serving.api import build_app
    from hrem_ray.serving.app import AUTOSCALING, Retriever

    actor = {**Retriever.ray_actor_options, **({"num_gpus": num_gpus} if num_gpus else {})}
    retriever = Retriever.options(
        autoscaling_config={**AUTOSCALING, "max_replicas": max_replicas},
        user_config={"max_batch_size": max_batch},
        ray_actor_options=actor,
    ).bind(str(ckpt.resolve()), str(gallery.resolve()), None, bf16)
    if shape.hops == 1:
        serve.run(retriever, name="hrem", route_prefix="/")
        return

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

        def __serve_build_asgi_app__(self) -> Any:
            return build_app(self.backend)

    serve.delete("hrem")  # a clean switch of shape
    serve.run(retriever, name=shape.retriever_app, route_prefix=None)
    app = Ingress.bind(shape.retriever_app, img_dim, n_images)
    serve.run(app, name="hrem", route_prefix="/")


def wait_for_search(base: str) -> None:
    """Until a text search answers 200: the whole path of the shape, ingress and model."""
    wait_ready(base, 120, path="/search/text", body={"query": "warm up", "k": 1})


def batch_counters(base: str) -> tuple[float, float]:
    """(sum, count) of the app's hrem_text_batch_size histogram."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        samples = metric_samples(r.read().decode())
    return tuple(samples.get((f"hrem_text_batch_size_{s}", ()), 0.0) for s in ("sum", "count"))


def replica_states(app_name: str) -> dict[str, int]:
    """The Retriever's replicas in ``app_name`` by state, e.g. {"RUNNING": 1}."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or "Retriever" not in app.deployments:
        return {}
    states = app.deployments["Retriever"].replica_states
    return {str(getattr(k, "value", k)): n for k, n in states.items()}


class ReplicaWatch:
    """The Retriever's replicas over an autoscaling phase, sampled from ``serve.status()``.
    Times in ``out`` are from the start of the load: ``decided_at`` (a second replica exists,
    STARTING or more), ``up_at`` (2 RUNNING), ``down_after`` (back to 1, after the load)."""

    def __init__(self, app_name: str, stop: Any, max_load_s: float):
        self.app_name, self.stop, self.max_load_s = app_name, stop, max_load_s
        self.start, self.samples, self.out = time.monotonic(), [], {}

    def sample(self) -> tuple[float, dict[str, int]]:
        t, states = time.monotonic() - self.start, replica_states(self.app_name)
        self.samples.append((t, states))
        if sum(states.values()) >= 2:
            self.out.setdefault("decided_at", t)
        if states.get("RUNNING", 0) >= 2:
            self.out.setdefault("up_at", t)
        return t, states

    def during_load(self) -> None:
        """Sample; end the load once a second replica has served 8 s, or at ``max_load_s``."""
        t, _ = self.sample()
        if t > self.max_load_s or t > self.out.get("up_at", math.inf) + 8:
            self.stop.set()

    def after_load(self, wait_s: float) -> dict[str, Any]:
        """Wait (at most ``wait_s``) until the deployment is back to one RUNNING replica."""
        out = self.out
        out["load_s"] = load_s = time.monotonic() - self.start
        out["peak_in_load"] = max((s.get("RUNNING", 0) for _, s in self.samples), default=0)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            t, states = self.sample()
            if "decided_at" in out and states == {"RUNNING": 1}:
                out["down_after"] = t - load_s
                break
            if "decided_at" not in out and t > load_s + 15:
                break  # never scaled: nothing to wait for
            time.sleep(1.0)
        out["peak"] = max((s.get("RUNNING", 0) for _, s in self.samples), default=0)
        out["after"] = replica_states(self.app_name)
        return out


# -- one run ------------------------------------------------------------------------------------
@dataclass
class Bench:
    """One run: the app it serves and where, the load generator, and the figures so far."""

    gen: LoadGen
    port: int
    ckpt: Path
    gallery: Path
    queries: list[str]
    n_images: int
    duration_s: float
    max_requests: int
    img_dim: int = 0  # from the in-process service
    num_gpus: float = 0.0  # each Retriever's GPU share (--num-gpus)
    bf16: bool = False
    # one loop for every handle client: Serve caches a handle, and its router stays on the
    # loop that first used it
    handle_loop: EventLoop = field(default_factory=EventLoop)
    rows: list[str] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    scales: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, key: str | None, name: str, hops: Any, c: int, r: dict[str, Any]) -> None:
        if key is not None:
            self.results[key] = r
        self.rows.append(fmt_row(name, hops, c, r))
        log(self.rows[-1])

    def load(
        self, c: int, path: str = "/search/text", bodies: list[bytes] | None = None,
        content_type: str = "application/json", duration_s: float | None = None,
        max_requests: int | None = None, every_s: Callable[[], None] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """HTTP load at concurrency ``c``, with the mean model batch it caused (``batch``)."""
        if bodies is None:
            bodies = [json.dumps({"query": q, "k": K}).encode() for q in self.queries]
        http = dict(port=self.port, path=path, bodies=bodies, content_type=content_type)
        s0, n0 = batch_counters(self.base)
        load = (c, duration_s or self.duration_s, max_requests or self.max_requests, http)
        r = self.gen.run(load, every_s)
        s1, n1 = batch_counters(self.base)
        return {**r, "batch": (s1 - s0) / (n1 - n0) if n1 > n0 else None}

    def deploy(self, shape: Shape, max_batch: int, max_replicas: int) -> None:
        t0 = time.monotonic()
        deploy_shape(shape, self.ckpt, self.gallery, self.img_dim, self.n_images, max_batch,
                     max_replicas, self.num_gpus, self.bf16)  # fmt: skip
        wait_for_search(self.base)
        log(f"{shape.hops}-hop app (max_batch {max_batch}, max_replicas {max_replicas}) up in "
            f"{time.monotonic() - t0:.1f} s")  # fmt: skip

    def baselines(self, service: Any) -> None:
        """The in-process ceiling, with Serve up and idle (the background of the Serve runs),
        and Serve's floor: the echo app of each shape."""
        from ray import serve

        self.img_dim = service.img_dim
        service.embed_texts(self.queries[:32])  # warm
        for batch in (1, 32):
            name = f"in-process, {batch} quer{'y' if batch == 1 else 'ies'}/call"
            r = measure([in_process(service, self.queries, batch)], self.duration_s, per_call=batch)
            self.record(name, name, "-", 1, {**r, "batch": batch})
        for shape in SHAPES.values():
            serve.run(floor_app(shape), name="floor", route_prefix="/floor")
            name = f"Serve floor: echo, {shape.floor}"
            self.record(f"floor/{shape.floor}", name, shape.hops, 1, self.load(1, "/floor/echo"))
            serve.delete("floor")

    def text_search(self, shape: Shape, levels: list[int], batching: str) -> None:
        """``POST /search/text`` at each concurrency, as deployed (batching "on" or "off"),
        then on one hop through a Serve handle."""
        label = "on (max 32)" if batching == "on" else "off (max 1)"
        for c in levels:
            r = self.load(c)
            self.record(shape.key(f"{batching}/{c}"), f"Serve, batching {label}", shape.hops, c, r)
        if shape.hops == 1:
            r = measure([through_handle(self.queries, self.handle_loop.loop)], self.duration_s)
            name = f"Retriever handle, no HTTP (batching {batching})"
            self.record(f"{batching}/handle", name, "-", 1, r)

    def page_and_images(self, shape: Shape) -> None:
        """The search page, then one image query in each encoding."""
        page = PageVisit(self.port, self.queries)
        r = measure([page], self.duration_s, max_requests=200)
        del r["qps"]  # one at a time on a new connection: latency only
        page_ms, search_ms = r.pop("parts_p50_ms", [math.nan, math.nan])
        r.update(api=page.api, page_bytes=page.page_bytes, page_p50_ms=page_ms,
                 search_p50_ms=search_ms)  # fmt: skip
        self.record(shape.key("page"), f"search page: GET / + POST {page.api}", shape.hops, 1, r)
        for encoding, path, content_type, body in feature_bodies(self.img_dim):
            r = self.load(1, path, [body], content_type)
            r.update(bytes=len(body), shape=f"100x{self.img_dim}")
            name = f"image query, {encoding} ({len(body)} B)"
            self.record(shape.key(f"features/{encoding}"), name, shape.hops, 1, r)

    def autoscale(self, shape: Shape, c: int, max_load_s: float, down_wait_s: float) -> None:
        """Load at concurrency ``c`` until a second replica has served 8 s (at most
        ``max_load_s``), then a bounded wait for the downscale."""
        log(f"autoscaling phase, {shape.name}: max_replicas 2, concurrency {c}")
        watch = ReplicaWatch(shape.retriever_app, self.gen.stop, max_load_s)
        r = self.load(c, duration_s=max_load_s + 5, max_requests=10**7, every_s=watch.during_load)
        self.record(None, "Serve, batching on, max_replicas 2", shape.hops, c, r)
        log(f"replicas at the end of the load: {watch.samples[-1][1] if watch.samples else '?'}")
        self.scales[shape.hops] = watch.after_load(down_wait_s)


# -- the report -----------------------------------------------------------------------------------
# The settings table: (column, format), fixed widths so that each row is logged when measured.
COLUMNS = (("setting", "<41"), ("hops", ">4"), ("conc", ">4"), ("n", ">6"), ("err", ">4"),
           ("p50 ms", ">8"), ("p99 ms", ">8"), ("QPS", ">7"), ("batch", ">6"),
           ("client", ">6"))  # fmt: skip


def _cells(cells: tuple[Any, ...]) -> str:
    cells = tuple(f"{c!s:{spec}}" for c, (_, spec) in zip(cells, COLUMNS, strict=True))
    return "| " + " | ".join(cells) + " |"


def fmt_row(name: str, hops: Any, c: Any, r: dict[str, Any]) -> str:
    """A setting's row: no QPS for the one-at-a-time page rows, no client CPU for the rows
    measured in this process."""
    qps, batch, cpu = r.get("qps"), r.get("batch"), r.get("client_cpu")
    return _cells((
        name, hops, c, r["n"], r["errors"], f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
        "-" if qps is None else f"{qps:.1f}",
        "-" if batch is None else batch if isinstance(batch, int) else f"{batch:.1f}",
        "" if cpu is None else f"{100 * cpu:.0f}%",
    ))  # fmt: skip


def md_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(f"{c!s:<{w}}" for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


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


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else "PASS" if ok else "FAIL"


def verdicts(
    results: dict[str, Any], scales: dict[int, Any], hops: list[int], top: int
) -> list[tuple[str, str, str, str]]:
    """(target, shape, measured, PASS/FAIL/-) for each target of each measured shape."""
    out: list[tuple[str, str, str, str]] = []
    base1 = results.get("in-process, 1 query/call")
    ceiling = results.get("in-process, 32 queries/call")
    for shape in (SHAPES[h] for h in hops):
        r1, floor = results.get(shape.key("on/1")), results.get(f"floor/{shape.floor}")
        if r1 and floor and base1:
            over = r1["p50_ms"] - base1["p50_ms"]
            ratio = over / max(floor["p50_ms"], 1e-9)
            out.append((f"overhead at conc 1 <= {OVERHEAD_VS_FLOOR:g}x the echo floor", shape.name,
                        f"{over:.1f} ms over in-process vs floor {floor['p50_ms']:.1f} ms "
                        f"({ratio:.2f}x)", _verdict(ratio <= OVERHEAD_VS_FLOOR)))  # fmt: skip
        rt = results.get(shape.key(f"on/{top}"))
        if rt and ceiling:
            share = rt["qps"] / max(ceiling["qps"], 1e-9)
            out.append((f"QPS at conc {top} >= {CEILING_SHARE:.0%} of the in-process ceiling",
                        shape.name, f"{rt['qps']:.1f} vs {ceiling['qps']:.1f} QPS ({share:.0%})",
                        _verdict(share >= CEILING_SHARE)))  # fmt: skip
        if rt:
            ratio = rt["p99_ms"] / max(rt["p50_ms"], 1e-9)
            out.append((f"p99 <= {P99_OVER_P50:g}x p50 at conc {top}", shape.name,
                        f"p99 {rt['p99_ms']:.1f} / p50 {rt['p50_ms']:.1f} ms ({ratio:.2f}x)",
                        _verdict(ratio <= P99_OVER_P50)))  # fmt: skip
        text, ok = scale_text(scales.get(shape.hops))
        out.append(("autoscaling 1 -> 2 -> 1 replicas (times reported)", shape.name, text,
                    _verdict(ok)))  # fmt: skip
        enc = {e: results.get(shape.key(f"features/{e}")) for e in ("JSON", "base64", "npy")}
        if all(enc.values()):
            j, b64, npy = (enc[e]["p50_ms"] for e in ("JSON", "base64", "npy"))
            out.append((f"binary faster than JSON, image query {enc['npy']['shape']}", shape.name,
                        f"p50 JSON {j:.1f}, base64 {b64:.1f}, npy {npy:.1f} ms "
                        f"(JSON/binary {j / max(min(npy, b64), 1e-9):.1f}x)",
                        _verdict(min(npy, b64) < j)))  # fmt: skip
    return out


def comparison(
    results: dict[str, Any], scales: dict[int, Any], top: int
) -> list[tuple[str, str, str, str]]:
    """One hop vs two hops, figure by figure: (figure, 1 hop, 2 hops, 2 hops / 1 hop)."""
    figures = [
        ("p50 ms, conc 1", "on/1", "p50_ms"),
        ("p99 ms, conc 1", "on/1", "p99_ms"),
        (f"p50 ms, conc {top}", f"on/{top}", "p50_ms"),
        (f"p99 ms, conc {top}", f"on/{top}", "p99_ms"),
        (f"QPS, conc {top}", f"on/{top}", "qps"),
        ("image query p50 ms, .npy body", "features/npy", "p50_ms"),
        ("image query p50 ms, JSON body", "features/JSON", "p50_ms"),
        ("search page: GET / p50 ms", "page", "page_p50_ms"),
        ("search page: GET / + one search p50 ms", "page", "p50_ms"),
        ("scale-up: 2nd replica RUNNING, s into load", "scale", "up_at"),
        ("scale-down: back to 1 replica, s after load", "scale", "down_after"),
    ]
    rows = []
    for label, name, figure in figures:
        one, two = (
            ((scales.get(s.hops) if name == "scale" else results.get(s.key(name))) or {}).get(
                figure
            )
            for s in (SHAPES[1], SHAPES[2])
        )
        one_s, two_s = ("-" if v is None else f"{v:.1f}" for v in (one, two))
        rows.append((label, one_s, two_s, f"{two / one:.2f}x" if one and two is not None else "-"))
    return rows


def report(bench: Bench, a: argparse.Namespace, load0: tuple[float, float, float]) -> None:
    """The settings table, the one-hop vs two-hop table and the verdicts; ``--json`` too."""
    results, scales, top = bench.results, bench.scales, max(a.levels)
    print()
    print(f"proxy: {a.proxy}; model: {MODELS[a.model]}; checkpoint "
          f"{a.checkpoint or 'built fresh'}; gallery {bench.n_images} images; {a.duration:g} s "
          f"per setting after {WARMUP_S:g} s warm-up; k={K}")  # fmt: skip
    print(_cells(tuple(name for name, _ in COLUMNS)))
    print("|" + "|".join("-" * (int(spec[1:]) + 2) for _, spec in COLUMNS) + "|")
    print(*bench.rows, sep="\n")
    print("batch: mean queries per model call (from the app's /metrics); client: CPU of the "
          "load-generator process; search page rows: p50/p99 of GET / + the search, "
          "one at a time on a new connection")  # fmt: skip
    if f"on/{top}" in results and f"off/{top}" in results:
        speedup = results[f"on/{top}"]["qps"] / max(results[f"off/{top}"]["qps"], 1e-9)
        ceiling = results["in-process, 32 queries/call"]["qps"]
        ceiling /= results["in-process, 1 query/call"]["qps"]
        print(f"batching at concurrency {top}, 1 hop: {speedup:.2f}x the QPS of batching off; "
              f"in-process, 32 queries per call give {ceiling:.2f}x the QPS of one")  # fmt: skip
    if a.hops == [1, 2]:
        print()
        print(f"one hop vs two hops (batching on; autoscaling: max_replicas 2, concurrency {top}):")
        print(*md_table(("figure", "1 hop", "2 hops", "2 hops / 1 hop"),
                        comparison(results, scales, top)), sep="\n")  # fmt: skip
    load1 = os.getloadavg()
    print()
    print("targets:")
    print(*md_table(("target", "shape", "measured", "verdict"),
                    verdicts(results, scales, a.hops, top)), sep="\n")  # fmt: skip
    print(f"load average (1/5/15 min): start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
          f"end {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}; {os.cpu_count()} CPUs; "
          f"total {time.monotonic() - STARTED:.0f} s")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "results": results, "scale": scales.get(1),
                       "scale_2hop": scales.get(2), "load": [load0, load1]},
                      f, default=str)  # fmt: skip


# -- main -----------------------------------------------------------------------------------------
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    p.add_argument(
        "--proxy", choices=PROXIES, default="serve",
        help="serve: Serve's proxy; throughput: RAY_SERVE_THROUGHPUT_OPTIMIZED=1; haproxy: "
        "hrem-ray serve --haproxy",
    )  # fmt: skip
    p.add_argument(
        "--num-gpus",
        type=float,
        default=0.0,
        help="each replica's GPU share (hrem-ray serve --num-gpus); default the CPU",
    )
    p.add_argument("--bf16", action="store_true", help="replicas encode queries under bf16")
    a = p.parse_args(argv)
    if a.num_gpus < 0:
        p.error("--num-gpus must be >= 0")
    if bool(a.checkpoint) != bool(a.gallery):
        p.error("--checkpoint and --gallery go together")
    a.levels = [int(x) for x in a.concurrency.split(",")]
    a.hops = sorted({int(x) for x in a.hops.split(",")})
    if not set(a.hops) <= set(SHAPES):
        p.error("--hops takes 1, 2 or 1,2")
    a.model = "tiny" if a.tiny else "bert-base" if a.bert_base else "minilm"
    return a


def run(a: argparse.Namespace, gen: LoadGen, ckpt: Path, gallery: Path) -> Bench:
    """Every setting, in the order of the docstring, on a private local Ray."""
    import ray
    import torch
    from ray import serve

    from hrem_ray.index.gallery import Gallery
    from hrem_ray.serving.app import run_service
    from hrem_ray.serving.service import RetrievalService

    torch.set_num_threads(1)
    opened = Gallery.open(gallery)
    bench = Bench(gen, free_port(), ckpt, gallery, list(opened.captions[:500]), opened.n_images,
                  a.duration, a.max_requests, num_gpus=a.num_gpus, bf16=a.bf16)  # fmt: skip
    del opened
    try:
        log("ray.init (a private local instance)")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        t0 = time.monotonic()
        url = run_service(str(ckpt), str(gallery), host="127.0.0.1", port=bench.port,
                          max_replicas=1, num_gpus=a.num_gpus, bf16=a.bf16)  # fmt: skip
        wait_for_search(bench.base)
        log(f"run_service up at {url} in {time.monotonic() - t0:.1f} s")
        device = "cuda" if a.num_gpus else "cpu"  # the in-process ceiling on the replicas' device
        bench.baselines(RetrievalService(ckpt, gallery, device=device, bf16=a.bf16))
        for shape in (SHAPES[h] for h in a.hops):
            if shape.hops == 2:
                bench.deploy(shape, max_batch=32, max_replicas=1)
            bench.text_search(shape, a.levels, "on")
            bench.page_and_images(shape)
            if shape.hops == 1:
                bench.deploy(shape, max_batch=1, max_replicas=1)
                bench.text_search(shape, a.levels, "off")
            if not a.no_autoscale:
                bench.deploy(shape, max_batch=32, max_replicas=2)
                bench.autoscale(shape, max(a.levels), a.scale_load_s, a.scale_down_wait_s)
    finally:
        try:
            serve.shutdown()
        finally:
            bench.handle_loop.close()
            ray.shutdown()
    return bench


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    set_env_defaults()
    set_env_defaults(PROXIES[a.proxy]())
    load0 = os.getloadavg()
    gen = LoadGen()  # first, before this process holds Ray or torch threads
    with ExitStack() as cleanup:
        cleanup.callback(gen.close)
        if a.checkpoint:
            ckpt, gallery = Path(a.checkpoint), Path(a.gallery)
        else:
            tmp = (
                None
                if a.work
                else cleanup.enter_context(tempfile.TemporaryDirectory(prefix="hrem_serve_load_"))
            )
            work = Path(a.work or tmp)
            log(f"building a {a.model} checkpoint and gallery in {work}")
            ckpt, gallery = build_world(work, a.model, a.test_images)
        bench = run(a, gen, ckpt, gallery)
    report(bench, a, load0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
