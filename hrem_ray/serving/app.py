"""The Ray Serve application: an HTTP ingress in front of autoscaling model replicas.

``Ingress`` (FastAPI, light) validates nothing itself: it forwards each call to ``Retriever``,
which holds the towers and the memory-mapped gallery, batches concurrent text queries with
``@serve.batch`` and raises ``RequestError`` (a 4xx) for bad input. A new checkpoint or
gallery arrives through ``user_config`` (``reconfigure``): the new service is loaded first
and swapped in atomically, so requests in flight finish on the old one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any

import numpy as np
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from hrem_ray.checkpoint import read_record
from hrem_ray.index.gallery import Gallery
from hrem_ray.serving.api import build_app, search_image, service_status
from hrem_ray.serving.service import Hit, RequestError, RetrievalService

# No waiting for a batch to fill: a lone query runs at once (a 5 ms wait cost 5 ms at
# concurrency 1), and under load the queries that arrive while a batch runs form the next one.
DEFAULT_BATCH = {"max_batch_size": 32, "batch_wait_timeout_s": 0.0}
# On 2 cores a second replica adds no capacity (../shared/docs/ray-notes.md); on a cluster
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


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=64,
    autoscaling_config=AUTOSCALING,
    max_surge_percent=MAX_SURGE_PERCENT,
)
class Retriever:
    def __init__(self, checkpoint: str, gallery: str):
        self.service = RetrievalService(checkpoint, gallery)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config: {checkpoint, gallery, max_batch_size, batch_wait_timeout_s}."""
        checkpoint = config.get("checkpoint", self.service.checkpoint_path)
        gallery = config.get("gallery", self.service.gallery_path)
        if (checkpoint, gallery) != (self.service.checkpoint_path, self.service.gallery_path):
            self.service = RetrievalService(checkpoint, gallery)  # load, then swap
        batch = {**DEFAULT_BATCH, **config}
        self._embed_batch.set_max_batch_size(int(batch["max_batch_size"]))
        self._embed_batch.set_batch_wait_timeout_s(float(batch["batch_wait_timeout_s"]))

    @serve.batch(**DEFAULT_BATCH)
    async def _embed_batch(
        self, queries: list[str]
    ) -> list[tuple[np.ndarray, int, RetrievalService]]:
        # Each embedding goes back with the service that made it: a query embedded by a new
        # checkpoint (swapped in while it waited in the batch) must search the new gallery.
        service = self.service
        embs = service.embed_texts(queries)
        return [(e, len(queries), service) for e in embs]

    async def embed_text(self, query: str) -> tuple[np.ndarray, int]:
        emb, batch, _ = await self._embed_batch(self.service.check_query(query))
        return emb, batch

    async def search_text(self, query: str, k: int) -> tuple[list[Hit], int]:
        self.service.check_k(k)
        emb, batch, service = await self._embed_batch(self.service.check_query(query))
        return service.images_for(emb, k), batch

    async def search_image(self, image_id: int | None, features: Any, k: int) -> list[Hit]:
        return search_image(self.service, image_id, features, k)

    async def embed_image(self, features: Any) -> np.ndarray:
        return self.service.embed_image(self.service.check_features(features))

    async def status(self) -> dict[str, Any]:
        return service_status(self.service)


class HandleBackend:
    """The API's backend: every call goes to a Retriever replica through its handle."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args)
        except RayTaskError as e:  # a replica's RequestError: answer with it, not its trace
            if isinstance(e.cause, RequestError):
                raise e.cause from None
            raise

    async def embed_text(self, query: str):
        return await self._call("embed_text", query)

    async def embed_image(self, features: Any):
        return await self._call("embed_image", features)

    async def search_text(self, query: str, k: int):
        return await self._call("search_text", query, k)

    async def search_image(self, image_id: int | None, features: Any, k: int):
        return await self._call("search_image", image_id, features, k)

    async def status(self):
        return await self._call("status")


@serve.deployment(
    ray_actor_options={"num_cpus": 0.1},
    max_ongoing_requests=256,
    max_surge_percent=MAX_SURGE_PERCENT,
)
@serve.ingress()
class Ingress:
    def __init__(self, retriever: DeploymentHandle, api_key: str | None = None):
        self.retriever = retriever
        self.api_key = api_key or os.environ.get("HREM_API_KEY") or None

    def __serve_build_asgi_app__(self):
        return build_app(HandleBackend(self.retriever), api_key=self.api_key)


def app_builder(args: dict[str, str]) -> serve.Application:
    """``serve run``/``serve deploy`` entry: args ``checkpoint``, ``gallery``, ``api_key``."""
    missing = [k for k in ("checkpoint", "gallery") if not args.get(k)]
    if missing:
        raise ValueError(f"the HREM app needs the argument(s) {', '.join(missing)}")
    retriever = Retriever.bind(args["checkpoint"], args["gallery"])
    return Ingress.bind(retriever, args.get("api_key"))


def run_service(
    checkpoint: str,
    gallery: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_replicas: int = 2,
) -> str:
    """Start the app on the current Ray cluster; returns its URL (it keeps running)."""
    read_record(checkpoint)  # fail here, not in a replica
    Gallery.open(gallery)
    serve.start(http_options={"host": host, "port": port})
    autoscaling = {**AUTOSCALING, "max_replicas": max(max_replicas, AUTOSCALING["min_replicas"])}
    retriever = Retriever.options(autoscaling_config=autoscaling).bind(
        os.path.abspath(checkpoint), os.path.abspath(gallery)
    )
    serve.run(Ingress.bind(retriever, api_key), name="hrem", route_prefix="/")
    return f"http://{host}:{port}"


def wait_until_interrupted() -> None:
    """Block until Ctrl-C or SIGTERM (a service's foreground process)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()
