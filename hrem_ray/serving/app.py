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
import ray
import torch
from ray import serve

from hrem_ray import storage
from hrem_ray.registry import is_model_ref, resolve_checkpoints
from hrem_ray.serving.api import LocalBackend, build_app, check_api_key
from hrem_ray.serving.service import Model, RetrievalService, check_served, checkpoint_list
from hrem_ray.tracking import URI_ENV

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

    def __init__(
        self,
        checkpoint: str | list[str],
        gallery: str,
        api_key: str | None = None,
        bf16: bool = False,
    ):
        super().__init__(checkpoint, gallery, device=replica_device(), bf16=bf16)
        self.api_key = api_key or os.environ.get("HREM_API_KEY") or None
        self._configured = False  # until the first reconfigure (see there)

    def __serve_build_asgi_app__(self):
        return build_app(LocalBackend(self), api_key=self.api_key)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config: {checkpoint (one, or a list for an ensemble; paths, URIs or
        ``models:/`` references, resolved anew), gallery, max_batch_size, batch_wait_timeout_s,
        search_params ({nprobe}, {efSearch} or {refine} over the gallery's, set on the loaded index
        without reloading anything)}.
        A swap into a serving replica that fails keeps the running model (``try_swap``):
        Serve stops a replica whose reconfigure raises, so a bad swap would take down the
        replicas that were serving. A starting replica's first call must load what it is
        configured with, so there a failure raises and Serve starts the replica again, while
        the replicas it replaces keep serving (``max_surge_percent``)."""
        swap = self.try_swap if self._configured else self.swap
        swap(
            config.get("checkpoint", self.current.checkpoints),
            config.get("gallery", self.current.gallery_ref),
        )
        self._configured = True
        self.set_search_params(config.get("search_params", {}))
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


def replica_device() -> str:
    """A replica's torch device: its GPU when Ray gave it one (``num_gpus`` in its
    ``ray_actor_options``; Ray sets ``CUDA_VISIBLE_DEVICES`` to it, so it is ``cuda``), else
    the CPU, the default. Outside Ray it is the CPU: ``ray.get_gpu_ids()`` would start one."""
    if not ray.is_initialized():
        return "cpu"
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def app_builder(args: dict[str, str]) -> serve.Application:
    """``serve run``/``serve deploy`` entry: args ``checkpoint`` (a list for an ensemble),
    ``gallery``, ``api_key``, ``bf16`` (true: query encoding under bf16 autocast)."""
    missing = [k for k in ("checkpoint", "gallery") if not args.get(k)]
    if missing:
        raise ValueError(f"the HREM app needs the argument(s) {', '.join(missing)}")
    bf16 = args.get("bf16", False)
    if not isinstance(bf16, bool):
        raise ValueError(f"the HREM app's argument bf16 must be true or false, got {bf16!r}")
    if args.get("api_key"):
        check_api_key(args["api_key"])
    resolve_checkpoints(args["checkpoint"])  # a missing models:/ name fails the deploy here
    return Retriever.bind(args["checkpoint"], args["gallery"], args.get("api_key"), bf16)


def run_service(
    checkpoint: str | list[str],
    gallery: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    min_replicas: int = 1,
    max_replicas: int = 2,
    check: bool = True,
    search_params: dict[str, int] | None = None,
    num_gpus: float = 0.0,
    bf16: bool = False,
) -> str:
    """Start the app on the current Ray cluster; returns its URL (it keeps running).
    ``checkpoint``: one, or an ensemble's in the order its gallery was built with.
    ``min_replicas`` 2 or more: a replica that dies leaves a live one to take over
    (docs/serving.md). ``check=False``: the caller has already run ``check_served``.
    ``search_params`` (``nprobe``, ``efSearch``, ``refine``) override the gallery's, as the
    ``user_config`` key.
    ``num_gpus``: each replica's share of a GPU (0.25: four replicas share a card); its towers
    then run there (``replica_device``). ``bf16``: the replicas encode under bf16 autocast."""
    checkpoints = checkpoint_list(checkpoint)
    if check:
        check_served(resolve_checkpoints(checkpoints)[0], gallery)  # here, not in a replica
    if api_key:
        check_api_key(api_key)
    serve.start(http_options={"host": host, "port": port, **HTTP_TIMEOUTS})
    autoscaling = {**AUTOSCALING, "min_replicas": min_replicas,
                   "max_replicas": max(max_replicas, min_replicas)}  # fmt: skip
    served = [c if is_model_ref(c) else storage.absolute(c) for c in checkpoints]
    options: dict[str, Any] = {"autoscaling_config": autoscaling}
    if any(map(is_model_ref, served)) and os.environ.get(URI_ENV):  # the replicas' registry
        runtime_env = {"env_vars": {URI_ENV: os.environ[URI_ENV]}}
        options["ray_actor_options"] = {**Retriever.ray_actor_options, "runtime_env": runtime_env}
    if num_gpus:
        actor = options.get("ray_actor_options", Retriever.ray_actor_options)
        options["ray_actor_options"] = {**actor, "num_gpus": float(num_gpus)}
    if search_params:  # the user_config key, so that a redeploy can change it
        options["user_config"] = {"search_params": search_params}
    app = Retriever.options(**options).bind(
        served[0] if len(served) == 1 else served, storage.absolute(gallery), api_key, bf16
    )
    serve.run(app, name="hrem", route_prefix="/")
    return f"http://{host}:{port}"


def wait_until_interrupted() -> None:
    """Block until Ctrl-C or SIGTERM (a service's foreground process)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()
