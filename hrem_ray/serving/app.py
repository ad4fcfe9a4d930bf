"""The Ray Serve application: one autoscaling deployment that is the whole service.

``Retriever`` is ``RetrievalService`` (every operation) plus ``@serve.batch`` on the text
embedding, and carries the FastAPI app of ``api.py`` itself, so a request goes proxy ->
replica in one hop (docs/serving.md). A new checkpoint or gallery arrives through
``user_config`` (``reconfigure``): it is loaded first and swapped in atomically, so requests
in flight finish on the old one. Several checkpoints serve an ensemble gallery
(``hrem-ray index`` with the same checkpoints, in the same order).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any

import numpy as np
from ray import serve

from hrem_ray import storage
from hrem_ray.serving.api import LocalBackend, build_app, check_api_key
from hrem_ray.serving.service import Model, RetrievalService, check_served, checkpoint_list

# No waiting for a batch to fill: a lone query runs at once (a 5 ms wait cost 5 ms at
# concurrency 1), and under load the queries that arrive while a batch runs form the next one.
DEFAULT_BATCH = {"max_batch_size": 32, "batch_wait_timeout_s": 0.0}
# On 2 cores a second replica adds no capacity (docs/serving.md); on a cluster
# raise max_replicas (serve/config.yaml, or hrem-ray serve --max-replicas).
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 16,
    "upscale_delay_s": 5,
    "downscale_delay_s": 30,
}
# A redeploy that restarts replicas (``serve.run`` again, new code, new init args) starts the
# replacements first and stops the old replicas once they are ready. Serve's default (0) stops
# first: with one replica every redeploy was an outage while the new one loaded the model.
MAX_SURGE_PERCENT = 100
# Serve's proxy (uvicorn) options: a request, body and answer included, gets at most
# request_timeout_s; an idle keep-alive connection is closed after keep_alive_timeout_s. The
# app's own body read timeout (api.BODY_READ_TIMEOUT_S) answers a stalled body with a 408.
HTTP_TIMEOUTS = {"request_timeout_s": 60, "keep_alive_timeout_s": 5}


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=64,
    autoscaling_config=AUTOSCALING,
    max_surge_percent=MAX_SURGE_PERCENT,
)
@serve.ingress()
class Retriever(RetrievalService):
    """The whole service in each autoscaling replica: the HTTP API, the towers and the
    memory-mapped gallery, one hop from Serve's proxy (docs/serving.md: one hop measured
    faster than an ingress deployment in front). Text queries are batched here."""

    def __init__(self, checkpoint: str | list[str], gallery: str, api_key: str | None = None):
        super().__init__(checkpoint, gallery)
        self.api_key = api_key or os.environ.get("HREM_API_KEY") or None

    def __serve_build_asgi_app__(self):
        return build_app(LocalBackend(self), api_key=self.api_key)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config: {checkpoint (one, or a list for an ensemble), gallery, max_batch_size,
        batch_wait_timeout_s}."""
        self.swap(
            config.get("checkpoint", self.current.checkpoints),
            config.get("gallery", self.current.gallery_ref),
        )
        batch = {**DEFAULT_BATCH, **config}
        self._embed_batch.set_max_batch_size(int(batch["max_batch_size"]))
        self._embed_batch.set_batch_wait_timeout_s(float(batch["batch_wait_timeout_s"]))

    @serve.batch(**DEFAULT_BATCH)
    async def _embed_batch(self, queries: list[str]) -> list[tuple[np.ndarray, int, Model]]:
        # Each embedding goes back with the model that made it: a query embedded by a new
        # checkpoint (swapped in while it waited in the batch) must search the new gallery.
        model = self.current
        return [(e, len(queries), model) for e in model.embed_texts(queries)]

    async def embed_query(self, query: str) -> tuple[np.ndarray, int, Model]:
        return await self._embed_batch(query)


def app_builder(args: dict[str, str]) -> serve.Application:
    """``serve run``/``serve deploy`` entry: args ``checkpoint`` (a list for an ensemble),
    ``gallery``, ``api_key``."""
    missing = [k for k in ("checkpoint", "gallery") if not args.get(k)]
    if missing:
        raise ValueError(f"the HREM app needs the argument(s) {', '.join(missing)}")
    if args.get("api_key"):
        check_api_key(args["api_key"])
    return Retriever.bind(args["checkpoint"], args["gallery"], args.get("api_key"))


def run_service(
    checkpoint: str | list[str],
    gallery: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_replicas: int = 2,
    check: bool = True,
) -> str:
    """Start the app on the current Ray cluster; returns its URL (it keeps running).
    ``checkpoint``: one, or an ensemble's in the order its gallery was built with.
    ``check=False``: the caller has already run ``check_served``."""
    checkpoints = checkpoint_list(checkpoint)
    if check:
        check_served(checkpoints, gallery)  # fail here, not in a replica
    if api_key:
        check_api_key(api_key)
    serve.start(http_options={"host": host, "port": port, **HTTP_TIMEOUTS})
    autoscaling = {**AUTOSCALING, "max_replicas": max(max_replicas, AUTOSCALING["min_replicas"])}
    served = [storage.absolute(c) for c in checkpoints]
    app = Retriever.options(autoscaling_config=autoscaling).bind(
        served[0] if len(served) == 1 else served, storage.absolute(gallery), api_key
    )
    serve.run(app, name="hrem", route_prefix="/")
    return f"http://{host}:{port}"


def wait_until_interrupted() -> None:
    """Block until Ctrl-C or SIGTERM (a service's foreground process)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()
