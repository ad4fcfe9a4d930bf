"""Load-test the Ray Serve retrieval app: latency, throughput, batching and autoscaling.

    .venv/bin/python bench/serve_load.py              # MiniLM backbone, 36x2048 features (~4 min)
    .venv/bin/python bench/serve_load.py --tiny       # tiny random BERT, 6x24 features (quick)
    .venv/bin/python bench/serve_load.py --bert-base  # the paper's model size, random weights
    .venv/bin/python bench/serve_load.py --checkpoint C --gallery G

Starts a private local Ray (``address="local"``: it never joins another cluster on the machine),
serves the real app with ``run_service`` on 127.0.0.1 and a free port, and drives
``POST /search/text`` from a separate load-generator process: closed loop, N threads, one
persistent HTTP connection each, bounded by time and by request count. Settings:

* in-process baseline: ``RetrievalService.embed_texts`` + ``images_for`` in this process, one
  query per call (concurrency 1) and 32 queries per call; their QPS ratio is what batching can
  give at most with this model on this CPU, the ceiling for Serve's batching speed-up;
* Serve's floor on this machine: two echo apps with no model, a FastAPI ingress answering
  alone (one hop: this app's shape, docs/serving.md) and a FastAPI ingress calling one
  deployment (two hops), at concurrency 1. The latency they add is what any app pays on this
  machine before doing any work;
* Serve with batching on (``max_batch_size`` 32) and off (1, redeployed through
  ``Retriever.options(user_config=...)`` and a second ``serve.run``), one replica, at
  concurrency 1, 8 and 32;
* at concurrency 1 in each mode, the Retriever called through a Serve handle from this process
  (no HTTP proxy, no ingress), which splits Serve's overhead into its two hops;
* ``/embed/image`` with one 100-region image as JSON numbers and as an ``.npy`` body
  (bytes and latency), at concurrency 1;
* one autoscaling phase (``max_replicas`` 2, concurrency 32): ``serve.status()`` replica counts
  during the load and after it, with a bounded wait for the downscale.

The mean model batch per setting comes from the app's own ``/metrics`` (``hrem_text_batch_size``),
so the table shows that batching really was on or off. Targets (issue): Serve adds at most 5 ms
at concurrency 1; batching gives at least 3x the QPS at concurrency 32.

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
    "tiny": "tiny random BERT, 6x24 features",
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
        main(["synth", "--out", str(data), "--train-images", "20", "--dev-images", "5",
              "--test-images", str(test_images), "--regions", "6", "--dim", "24"])  # fmt: skip
        main(["init-checkpoint", "--out", str(ckpt), "--bert-path", str(work / "bert"),
              *TINY_MODEL])  # fmt: skip
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


def feature_bodies(img_dim: int) -> list[tuple[str, str, bytes]]:
    """A 100-region image as the JSON body and as the application/x-npy body of /embed/image."""
    import io

    import numpy as np

    feats = np.random.default_rng(0).uniform(0, 4, (100, img_dim)).astype(np.float32)
    npy = io.BytesIO()
    np.save(npy, feats)
    as_json = json.dumps({"features": feats.tolist()}).encode()
    return [("JSON", "application/json", as_json), ("npy", "application/x-npy", npy.getvalue())]


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


def replica_states() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications.get("hrem")
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


def autoscale_phase(a, c, base, load, stop, rows, log) -> dict[str, Any]:
    """Load at concurrency ``c`` until a second replica has served 8 s (at most
    ``a.scale_load_s``), sampling ``serve.status()`` every second; then wait (bounded) until
    the deployment is back to one RUNNING replica. Times are from the start of the load."""
    samples: list[tuple[float, dict[str, int]]] = []
    done = threading.Event()
    t_load = time.monotonic()
    out: dict[str, Any] = {}

    def sample() -> None:
        while not done.is_set():
            t, states = time.monotonic() - t_load, replica_states()
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
        rows.append(fmt_row("Serve, batching on, max_replicas 2", c, r, mean_batch))
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
    out["after"] = replica_states()
    return out


def fmt_row(name: str, c: Any, r: dict[str, Any], batch: str) -> str:
    cpu = "" if r["client_cpu"] != r["client_cpu"] else f"{100 * r['client_cpu']:.0f}%"
    return (
        f"| {name:<41} | {c!s:>4} | {r['n']:>6} | {r['errors']:>4} | {r['p50_ms']:>8.1f} "
        f"| {r['p99_ms']:>8.1f} | {r['qps']:>7.1f} | {batch:>6} | {cpu:>6} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="use this checkpoint (with --gallery)")
    p.add_argument("--gallery", help="gallery folder written by hrem-ray index")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny random BERT and 6x24 features")
    size.add_argument(
        "--bert-base", action="store_true", help="a random BERT of bert-base's shape (HREM's)"
    )
    p.add_argument("--test-images", type=int, default=100, help="gallery size when building one")
    p.add_argument("--duration", type=float, default=6.0, help="measured seconds per setting")
    p.add_argument("--max-requests", type=int, default=20000, help="cap per setting")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--scale-load-s", type=float, default=40.0, help="max load in the scale phase")
    p.add_argument("--scale-down-wait-s", type=float, default=75.0)
    p.add_argument("--no-autoscale", action="store_true", help="skip the max_replicas 2 phase")
    p.add_argument("--work", help="folder for the built gallery (default: a temp folder)")
    p.add_argument("--json", help="also write the figures here (bench/run_all.py)")
    a = p.parse_args(argv)
    if bool(a.checkpoint) != bool(a.gallery):
        p.error("--checkpoint and --gallery go together")
    levels = [int(x) for x in a.concurrency.split(",")]
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
    port = free_port()
    base = f"http://127.0.0.1:{port}"

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
            rows.append(fmt_row(name, 1, r, str(batch)))
            log(rows[-1])
        img_dim = service.img_dim
        del service

        for name, floor_app in floor_apps().items():
            serve.run(floor_app, name="floor", route_prefix="/floor")
            results[f"floor/{name}"] = r = load(1, a.duration, path="/floor/echo")
            rows.append(fmt_row(f"Serve floor: echo, {name}", 1, r, "-"))
            log(rows[-1])
            serve.delete("floor")

        for mode, max_batch in (("on", 32), ("off", 1)):
            if mode == "off":
                deploy(ckpt, gallery, max_batch=1, max_replicas=1)
                wait_ready(base)
            for c in levels:
                s0, n0 = batch_counters(base)
                r = load(c, a.duration)
                s1, n1 = batch_counters(base)
                mean_batch = f"{(s1 - s0) / (n1 - n0):.1f}" if n1 > n0 else "-"
                name = f"Serve, batching {mode} (max {max_batch})"
                results[f"{mode}/{c}"] = r
                rows.append(fmt_row(name, c, r, mean_batch))
                log(rows[-1])
            results[f"{mode}/handle"] = r = through_handle(queries, a.duration)
            rows.append(fmt_row(f"Serve handle, no HTTP (batching {mode})", 1, r, "-"))
            log(rows[-1])

        # The same 100-region image as JSON numbers and as an .npy body (docs/serving.md).
        for encoding, content_type, payload in feature_bodies(img_dim):
            r = load(1, a.duration, path="/embed/image", payloads=[payload],
                     content_type=content_type)  # fmt: skip
            results[f"features/{encoding}"] = {**r, "bytes": len(payload)}
            rows.append(fmt_row(f"/embed/image, {encoding} ({len(payload)} B)", 1, r, "-"))
            log(rows[-1])

        scale: dict[str, Any] = {}
        if not a.no_autoscale:
            c = max(levels)
            deploy(ckpt, gallery, max_batch=32, max_replicas=2)
            wait_ready(base)
            log(f"autoscaling phase: max_replicas 2, concurrency {c}")
            scale.update(autoscale_phase(a, c, base, load, stop, rows, log))
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
        f"| {'setting':<41} | {'conc':>4} | {'n':>6} | {'err':>4} | {'p50 ms':>8} "
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
          "load-generator process")  # fmt: skip

    base1 = results["in-process, 1 query/call"]
    floor = {k.removeprefix("floor/"): r["p50_ms"] for k, r in results.items() if "floor/" in k}
    print(f"Serve's floor at concurrency 1 on this machine (echo apps, no model, p50): "
          f"{floor['ingress alone']:.1f} ms for an ingress alone, "
          f"{floor['ingress + 1 deployment']:.1f} ms for an ingress calling one deployment; "
          f"this app is the first shape (one hop)")  # fmt: skip
    for mode in ("on", "off"):
        if f"{mode}/1" in results:
            r = results[f"{mode}/1"]
            over50, over99 = r["p50_ms"] - base1["p50_ms"], r["p99_ms"] - base1["p99_ms"]
            ok = over50 <= 5.0
            over_floor = over50 - floor["ingress alone"]  # this app's shape: one hop
            h = results.get(f"{mode}/handle")
            split = (
                f"; the handle call alone adds {h['p50_ms'] - base1['p50_ms']:+.1f} ms p50, "
                f"HTTP proxy + ingress the rest"
                if h
                else ""
            )
            print(f"Serve overhead at concurrency 1, batching {mode}: p50 {over50:+.1f} ms, "
                  f"p99 {over99:+.1f} ms over in-process "
                  f"({'within' if ok else 'OVER'} the 5 ms target; "
                  f"{over_floor:+.1f} ms over the floor){split}")  # fmt: skip
    top = max(levels)
    if f"on/{top}" in results and f"off/{top}" in results:
        speedup = results[f"on/{top}"]["qps"] / max(results[f"off/{top}"]["qps"], 1e-9)
        ok = speedup >= 3.0
        ceiling = results["in-process, 32 queries/call"]["qps"] / base1["qps"]
        print(f"batching speed-up at concurrency {top}: {speedup:.2f}x QPS "
              f"({'meets' if ok else 'BELOW'} the 3x target); in-process, 32 queries per call "
              f"give {ceiling:.2f}x the QPS of one, the most batching can give this model on "
              f"this CPU")  # fmt: skip
    if scale:
        up, decided, down = scale.get("up_at"), scale.get("decided_at"), scale.get("down_after")
        parts = [f"autoscaling (max_replicas 2, concurrency {top}, load {scale['load_s']:.0f} s):"]
        if decided is None:
            parts.append(f"did NOT scale up (RUNNING replicas stayed at {scale['peak']})")
        else:
            parts.append(f"second replica started {decided:.0f} s into the load")
            parts.append(
                f"RUNNING at {up:.0f} s" + (" (after the load had stopped)" if up > scale["load_s"]
                                            else "") if up is not None else "never RUNNING"
            )  # fmt: skip
            parts.append(f"peak RUNNING during the load {scale['peak_in_load']}")
            parts.append(
                f"back to 1 replica {down:.0f} s after the load stopped" if down is not None
                else f"NOT back to 1 replica within {a.scale_down_wait_s:.0f} s "
                     f"({scale['after']})"
            )  # fmt: skip
        print(parts[0], "; ".join(parts[1:]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": model, "results": results, "scale": scale}, f, default=str)
    load1 = os.getloadavg()
    print(f"load average (1/5/15 min): start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
          f"end {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}; {os.cpu_count()} CPUs; "
          f"total {time.monotonic() - started:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
