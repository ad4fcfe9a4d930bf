"""The HTTP API of the retrieval service (FastAPI), independent of how the model is hosted.

``build_app(backend)`` takes any object with the async methods of ``Backend``: the Ray Serve
ingress passes one that calls the model deployment, tests pass ``LocalBackend`` over a
``RetrievalService`` in the same process.
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from hrem_ray.serving.service import MAX_K, Hit, RequestError, RetrievalService

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20  # 100 x 2048 features as JSON fit comfortably
PAGE = Path(__file__).with_name("page.html")
OPEN_PATHS = {"/", "/healthz", "/readyz", "/docs", "/openapi.json"}


class Backend(Protocol):
    async def embed_text(self, query: str) -> tuple[np.ndarray, int]: ...  # (emb, batch size)
    async def embed_image(self, features: list[list[float]]) -> np.ndarray: ...
    async def search_text(self, query: str, k: int) -> tuple[list[Hit], int]: ...
    async def search_image(self, image_id: int | None, features: Any, k: int) -> list[Hit]: ...
    async def status(self) -> dict[str, Any]: ...


class LocalBackend:
    """A ``RetrievalService`` in this process (tests, benchmarks' in-process baseline)."""

    def __init__(self, service: RetrievalService):
        self.service = service

    async def embed_text(self, query: str) -> tuple[np.ndarray, int]:
        return self.service.embed_texts([self.service.check_query(query)])[0], 1

    async def embed_image(self, features: Any) -> np.ndarray:
        return self.service.embed_image(self.service.check_features(features))

    async def search_text(self, query: str, k: int) -> tuple[list[Hit], int]:
        self.service.check_k(k)
        emb, batch = await self.embed_text(query)
        return self.service.images_for(emb, k), batch

    async def search_image(self, image_id: int | None, features: Any, k: int) -> list[Hit]:
        return search_image(self.service, image_id, features, k)

    async def status(self) -> dict[str, Any]:
        return service_status(self.service)


def search_image(service: RetrievalService, image_id: int | None, features: Any, k: int):
    """Captions for a gallery image or for raw region features (exactly one of them)."""
    service.check_k(k)
    if (image_id is None) == (features is None):
        raise RequestError("give exactly one of image_id and features")
    if image_id is not None:
        emb = service.gallery_image(image_id)
    else:
        emb = service.embed_image(service.check_features(features))
    return service.captions_for(emb, k)


def service_status(service: RetrievalService) -> dict[str, Any]:
    return {
        "checkpoint": service.checkpoint_path,
        "gallery": service.gallery_path,
        "n_images": service.gallery.n_images,
        "n_captions": service.gallery.n_captions,
    }


# strict: JSON true, "3" or 2.0 is not an integer k or image_id, "1.5" is not a feature value.
class TextQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    query: str = Field(min_length=1, max_length=1000)
    k: int = Field(default=10, ge=1, le=MAX_K)


class ImageQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    image_id: int | None = None
    features: list[list[float]] | None = None
    k: int = Field(default=10, ge=1, le=MAX_K)


class TextEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    query: str = Field(min_length=1, max_length=1000)


class ImageEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    features: list[list[float]]


def _hits(hits: list[Hit]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.__dict__.items() if v is not None} for h in hits]


def build_app(backend: Backend, *, api_key: str | None = None) -> FastAPI:
    app = FastAPI(
        title="HREM retrieval",
        description="Text-to-image and image-to-text search over a gallery encoded by HREM.",
        version="1",
    )
    registry = CollectorRegistry()
    requests = Counter("hrem_requests", "HTTP requests", ["path", "status"], registry=registry)
    latency = Histogram("hrem_request_seconds", "Request latency", ["path"], registry=registry)
    batch_sizes = Histogram(
        "hrem_text_batch_size", "Queries per model batch", registry=registry,
        buckets=(1, 2, 4, 8, 16, 32, 64),
    )  # fmt: skip
    gallery_size = Gauge("hrem_gallery_images", "Images in the gallery", registry=registry)

    # Inner to ``guard``: a body sent without Content-Length (chunked) is cut off at the limit.
    app.add_middleware(_BodyLimit, max_bytes=MAX_BODY_BYTES)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        size = request.headers.get("content-length")
        if (
            api_key
            and path not in OPEN_PATHS
            and not hmac.compare_digest(
                request.headers.get("x-api-key", "").encode(), api_key.encode()
            )
        ):
            response = _error(401, "missing or wrong x-api-key header")
        elif size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
            response = _error(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        else:
            try:
                response = await call_next(request)
            except Exception:  # a bug or a lost replica: a JSON 500, counted, never a trace
                log.exception("%s %s failed", request.method, path)
                response = _error(500, "internal error")
        route = path if path in _ROUTES else "other"
        requests.labels(route, str(response.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError):
        return _error(e.status, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):  # 404 route, 405 method, 413
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "")
            return _error(422, f"body is not valid JSON: {detail}".rstrip(": "))
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(422, f"{where or 'body'}: {first.get('msg', 'invalid request')}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE.read_text()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict[str, Any]:
        status = await backend.status()
        gallery_size.set(status["n_images"])
        return {"status": "ready", **status}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/search/text")
    async def search_text(q: TextQuery) -> dict[str, Any]:
        hits, batch = await backend.search_text(q.query, q.k)
        batch_sizes.observe(batch)
        return {"query": q.query, "results": _hits(hits)}

    @app.post("/search/image")
    async def search_image_route(q: ImageQuery) -> dict[str, Any]:
        hits = await backend.search_image(q.image_id, q.features, q.k)
        return {"results": _hits(hits)}

    @app.post("/embed/text")
    async def embed_text(q: TextEmbedRequest) -> dict[str, Any]:
        emb, batch = await backend.embed_text(q.query)
        batch_sizes.observe(batch)
        return {"embedding": emb.tolist()}

    @app.post("/embed/image")
    async def embed_image(q: ImageEmbedRequest) -> dict[str, Any]:
        return {"embedding": (await backend.embed_image(q.features)).tolist()}

    return app


_ROUTES = {
    "/", "/healthz", "/readyz", "/metrics", "/search/text", "/search/image", "/embed/text",
    "/embed/image", "/docs", "/openapi.json",
}  # fmt: skip


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _BodyTooLarge(HTTPException):
    """Raised from ``receive``; FastAPI passes HTTPExceptions met reading a body through."""


class _BodyLimit:
    """ASGI middleware: answer 413 once a request body passes ``max_bytes``, however it is
    sent (the Content-Length check in ``guard`` misses chunked bodies)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received = 0
        started = False
        message = f"request body larger than {self.max_bytes} bytes"

        async def limited_receive() -> dict:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(413, message)
            return event

        async def tracking_send(event: dict) -> None:
            nonlocal started
            started = started or event["type"] == "http.response.start"
            await send(event)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:  # read outside a route's exception handling
            if started:
                raise
            await _error(413, message)(scope, receive, send)
