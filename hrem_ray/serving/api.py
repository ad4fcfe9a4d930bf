"""The HTTP API of the retrieval service (FastAPI): parsing, limits, auth, metrics, errors.

``build_app(backend)`` serves any object with ``async call(op, **kwargs) -> Reply`` and the
``img_dim``/``gallery_images`` attributes: ``LocalBackend`` over a ``RetrievalService`` in this
process, which is also what each Ray Serve replica runs (``app.py``). Every route in
``ROUTES`` forwards to the service operation of the same name, so an endpoint is one service
method, one ``Route`` and one test. The generated OpenAPI documents every status the service
answers, and the request schemas refuse what the service refuses (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

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
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from hrem_ray.serving.service import (
    MAX_FEATURE_ABS,
    MAX_K,
    MAX_QUERIES,
    MAX_QUERY_CHARS,
    MAX_REGIONS,
    QUERIES_MESSAGE,
    SPACE_CLASS,
    Reply,
    RequestError,
    RetrievalService,
)

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("page.html")
NPY = "application/x-npy"
# The longest JSON number a client writes for a float within MAX_FEATURE_ABS (Python's repr
# of a float64, e.g. -2.2250738585072014e-308), plus its ", " separator.
JSON_NUMBER_BYTES = 24 + 2
JSON_SLACK_BYTES = 1024  # braces, keys, k, whitespace
NPY_HEADER_BYTES = 128  # np.save's version-1 header of a 2-d float32 array
BODY_READ_TIMEOUT_S = 30.0  # a client that stops sending its body gets a 408


def body_limits(img_dim: int) -> dict[str, int]:
    """Largest legitimate body per encoding: MAX_REGIONS x img_dim features as JSON numbers
    (base64 is smaller) or MAX_QUERIES text queries, and features as an .npy file."""
    regions = MAX_REGIONS * img_dim
    # every character a \\ud83d\\ude00 surrogate-pair escape; each query in quotes, then ", "
    query = MAX_QUERIES * (MAX_QUERY_CHARS * 12 + 4)
    return {
        "json": max(regions * JSON_NUMBER_BYTES, query) + JSON_SLACK_BYTES,
        NPY: NPY_HEADER_BYTES + 4 * regions,
    }


class Backend(Protocol):
    img_dim: int

    async def call(self, op: str, **kwargs: Any) -> Reply: ...
    def gallery_images(self) -> int: ...


class LocalBackend:
    """A ``RetrievalService`` in this process: tests, the benchmarks' ceiling, each replica."""

    def __init__(self, service: RetrievalService):
        self.service = service

    @property
    def img_dim(self) -> int:
        return self.service.img_dim

    async def call(self, op: str, **kwargs: Any) -> Reply:
        return await getattr(self.service, op)(**kwargs)

    def gallery_images(self) -> int:
        return self.service.gallery.n_images


# -- request and response schemas -----------------------------------------------------------
# strict: JSON true or "3" is not an integer k or image_id (2.0 is, as in JSON Schema), and
# "1.5" is not a feature value.
STRICT = ConfigDict(extra="forbid", strict=True)
Query = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_QUERY_CHARS,
        pattern=f"[^{SPACE_CLASS}]",
        description="at least one character that is not white space",
    ),
]


def _integral(value: Any) -> Any:
    """JSON Schema's integer includes 2.0 (a number with no fraction): take it as 2."""
    return int(value) if type(value) is float and value.is_integer() else value


K = Annotated[int, Field(ge=1, le=MAX_K), BeforeValidator(_integral)]
ONE, MANY = "one", "many"  # the tags of Queries: validation errors name neither


def _one_or_many(value: Any) -> str | None:
    return ONE if isinstance(value, str) else MANY if isinstance(value, list) else None


# A query, or a list of them answered by a list in the same order (docs/serving.md). Tagged,
# so that a bad request gets the error of the form it tried, and the schema says oneOf.
Queries = Annotated[
    Annotated[Query, Tag(ONE)]
    | Annotated[list[Query], Field(min_length=1, max_length=MAX_QUERIES), Tag(MANY)],
    Discriminator(
        _one_or_many, custom_error_type="query_type", custom_error_message=QUERIES_MESSAGE
    ),
    Field(description=f"a query, or 1 to {MAX_QUERIES} of them: answered in their order"),
]


class TextQuery(BaseModel):
    model_config = STRICT
    query: Queries
    k: K = 10


class TextEmbedRequest(BaseModel):
    model_config = STRICT
    query: Queries


class Error(BaseModel):
    error: str


class ImageHit(BaseModel):
    id: int
    score: float
    captions: list[str]


class CaptionHit(BaseModel):
    id: int
    score: float
    caption: str
    image_id: int


class TextResults(BaseModel):
    query: str
    results: list[ImageHit]


class ImageResults(BaseModel):
    results: list[CaptionHit]


class Embedding(BaseModel):
    embedding: list[float]


def one_or_list(answer: type[BaseModel]) -> Any:
    """The answer to a query, or to a list of queries: a list of answers in its order."""
    answers = Annotated[
        list[answer],  # type: ignore[valid-type]
        Field(min_length=1, max_length=MAX_QUERIES, description="one per query, in order"),
    ]
    return answer | answers


class Health(BaseModel):
    status: Literal["ok"]


class ServedModel(BaseModel):
    model_id: str
    embed_dim: int


class RegistryVersion(BaseModel):
    name: str
    version: str


class SwapRefused(BaseModel):
    reason: str  # one line, without storage locations (the replica's log has them)
    at: float  # Unix time of the refusal


class IndexStatus(BaseModel):
    """The gallery's index: its FAISS spec (Flat: exact search), the knobs searches run with
    now, and what ``hrem-ray index`` measured (docs/serving.md, "Choosing an index")."""

    spec: str
    params: dict[str, int]
    bytes_per_item: float
    train_sample: dict[str, int]  # images, captions the quantisers trained on
    recall: dict[str, dict[str, float]] | None = None  # text_to_image/image_to_text: k -> recall


class Status(BaseModel):
    status: Literal["ready"]
    model_id: str
    gallery_id: str
    n_images: int
    n_captions: int
    img_dim: int
    embed_dim: int
    models: list[ServedModel]  # one, or an ensemble's in order; embed_dim is their sum
    index: IndexStatus
    registry: list[RegistryVersion]  # the registry versions served (models:/...), else empty
    swap_refused: SwapRefused | None  # the last swap, when it failed and the model stayed


def image_models(img_dim: int) -> dict[str, Any]:
    """The feature-carrying request schemas: their shapes depend on the checkpoint."""
    value = Annotated[float, Field(ge=-MAX_FEATURE_ABS, le=MAX_FEATURE_ABS)]
    row = Annotated[list[value], Field(min_length=img_dim, max_length=img_dim)]
    rows = Annotated[list[row], Field(min_length=1, max_length=MAX_REGIONS)]

    class EncodedFeatures(BaseModel):
        """float32 little-endian bytes, row-major, base64 (RFC 4648, padded)."""

        model_config = STRICT
        shape: tuple[
            Annotated[int, Field(ge=1, le=MAX_REGIONS), BeforeValidator(_integral)],
            Literal[img_dim],
        ]  # type: ignore[valid-type]
        base64: Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]*={0,2}$")]

    features = Annotated[rows | EncodedFeatures, Field(description="regions x img_dim")]

    class ByImageId(BaseModel):
        model_config = STRICT
        image_id: Annotated[int, Field(ge=0), BeforeValidator(_integral)]
        features: None = None
        k: K = 10

    class ByFeatures(BaseModel):
        model_config = STRICT
        features: features  # type: ignore[valid-type]
        image_id: None = None
        k: K = 10

    class ImageEmbedRequest(BaseModel):
        model_config = STRICT
        features: features  # type: ignore[valid-type]

    def which(body: Any) -> str | None:
        if not isinstance(body, dict):
            return "id"  # "Input should be an object"
        by_id, by_feats = body.get("image_id") is not None, body.get("features") is not None
        return "id" if by_id and not by_feats else "features" if by_feats and not by_id else None

    image_query = Annotated[
        Annotated[ByImageId, Tag("id")] | Annotated[ByFeatures, Tag("features")],
        Discriminator(
            which,
            custom_error_type="one_of",
            custom_error_message="give exactly one of image_id and features",
        ),
    ]
    return {"ImageQuery": image_query, "ImageEmbedRequest": ImageEmbedRequest}


@dataclass(frozen=True)
class Route:
    """One endpoint: the service operation it forwards to, its request and answer."""

    path: str
    op: str
    summary: str
    answer: Any  # a pydantic model, or one_or_list of one
    request: Any = None  # a pydantic model or type; None: a GET
    binary: bool = False  # also takes an application/x-npy body (and k in the query)
    statuses: tuple[int, ...] = ()  # beyond those of every POST


def routes(img_dim: int) -> list[Route]:
    image = image_models(img_dim)
    return [
        Route("/readyz", "status", "Readiness: model and gallery ids and sizes", Status),
        Route(
            "/search/text",
            "search_text",
            f"Images for a caption, or for each of a list of up to {MAX_QUERIES}",
            one_or_list(TextResults),
            TextQuery,
        ),  # fmt: skip
        Route(
            "/search/image",
            "search_image",
            "Captions for an image (id or region features)",
            ImageResults,
            image["ImageQuery"],
            binary=True,
            statuses=(404,),
        ),  # fmt: skip
        Route(
            "/embed/text",
            "embed_text",
            f"A caption's embedding, or those of a list of up to {MAX_QUERIES}",
            one_or_list(Embedding),
            TextEmbedRequest,
        ),  # fmt: skip
        Route(
            "/embed/image",
            "embed_image",
            "An image's embedding from its region features",
            Embedding,
            image["ImageEmbedRequest"],
            binary=True,
        ),  # fmt: skip
    ]


POST_STATUSES = {
    400: "Content-Length not a number, or a body that is not UTF-8",
    408: f"the body did not arrive within {BODY_READ_TIMEOUT_S:g} s",
    413: "body larger than the largest legitimate request of its encoding",
    415: "Content-Type is neither application/json nor (where taken) application/x-npy",
    422: "the request does not match its schema, or the service refuses it",
}
PATTERN_MESSAGES = {  # the schema's regular expressions, in words
    "query": "must be a non-empty string with a character that is not white space",
    "base64": "must be base64 (A-Z, a-z, 0-9, + and /, with = padding)",
}
OPEN_PATHS = {"/", "/healthz", "/readyz", "/docs", "/openapi.json"}


def check_api_key(api_key: str) -> bytes:
    """HTTP header values are bytes; a key of visible ASCII is the same bytes on every client,
    so it is compared as bytes (a non-ASCII key could never match reliably)."""
    if not re.fullmatch(r"[\x21-\x7e]+", api_key):
        raise ValueError(
            "the API key must be visible ASCII characters (letters, digits, punctuation; no "
            "spaces): HTTP headers cannot carry other characters portably"
        )
    return api_key.encode("ascii")


# -- the app --------------------------------------------------------------------------------
def build_app(
    backend: Backend, *, api_key: str | None = None, body_timeout_s: float = BODY_READ_TIMEOUT_S
) -> FastAPI:
    key = check_api_key(api_key) if api_key else None
    limits = body_limits(backend.img_dim)
    app = FastAPI(
        title="HREM retrieval",
        description="Text-to-image and image-to-text search over a gallery encoded by HREM.",
        version="2",
    )
    registry = CollectorRegistry()
    requests = Counter("hrem_requests", "HTTP requests", ["path", "status"], registry=registry)
    latency = Histogram("hrem_request_seconds", "Request latency", ["path"], registry=registry)
    batch_sizes = Histogram(
        "hrem_text_batch_size", "Queries per model batch", registry=registry,
        buckets=(1, 2, 4, 8, 16, 32, 64),
    )  # fmt: skip
    gallery_size = Gauge("hrem_gallery_images", "Images in the gallery", registry=registry)
    gallery_size.set_function(backend.gallery_images)  # read at every scrape, swaps included
    table = routes(backend.img_dim)
    known = {r.path for r in table} | {"/", "/healthz", "/metrics", "/docs", "/openapi.json"}

    # Inner to ``guard``: limits bodies sent without Content-Length and slow bodies too.
    app.add_middleware(_BodyGuard, limits=limits, timeout_s=body_timeout_s)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        size = request.headers.get("content-length")
        limit = limits[NPY if _media_type(request) == NPY else "json"]
        if key and path not in OPEN_PATHS and not _key_matches(request, key):
            response = _error(401, "missing or wrong x-api-key header")
        elif size is not None and not (size.isascii() and size.isdigit()):
            response = _error(400, f"Content-Length {size!r} is not a number of bytes")
        elif size is not None and int(size) > limit:
            response = _error(413, f"request body larger than {limit} bytes")
        else:
            try:
                response = await call_next(request)
            except Exception:  # a bug or a lost replica: a JSON 500, counted, never a trace
                log.exception("%s %s failed", request.method, path)
                response = _error(500, "internal error")
        route = path if path in known else "other"
        requests.labels(route, str(response.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError):
        return _error(e.status, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):  # 404 route, 405 method, 413
        return _error(e.status_code, str(e.detail), headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "id", ONE, MANY)]
        field = next((x for x in reversed(loc) if not x.isdigit()), "")  # query.3: query
        message = first.get("msg", "invalid request")
        if first.get("type") == "query_type":  # QUERIES_MESSAGE names its field
            return _error(422, message)
        if first.get("type") == "string_pattern_mismatch":
            message = PATTERN_MESSAGES.get(field, message)
        elif first.get("type") in ("too_short", "too_long") and loc == ["query"]:
            n = first.get("ctx", {}).get("actual_length")
            message = f"a list of queries must hold 1 to {MAX_QUERIES}, got {n}"
        return _error(422, f"{'.'.join(loc) or 'body'}: {message}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE.read_text()

    @app.get("/healthz", responses={200: {"model": Health}})
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    components: dict[str, Any] = {}
    for route in table:
        _add_route(app, route, backend, batch_sizes, components, protected=key is not None)
    _extend_openapi(app, components, protected=key is not None)
    app.add_middleware(_Head)
    return app


def _add_route(app, route: Route, backend, batch_sizes, components, *, protected) -> None:
    """Register ``route``: parse its body (JSON or .npy), call ``backend``, answer JSON."""
    adapter = TypeAdapter(route.request) if route.request is not None else None
    responses: dict[int | str, Any] = {200: {"model": route.answer}}
    codes = ([401] if protected else []) + [500]
    if adapter is not None:
        codes += [*POST_STATUSES, *route.statuses]
    for code in sorted(set(codes)):
        responses[code] = {"model": Error, "description": POST_STATUSES.get(code, "error")}
    extra: dict[str, Any] = {}
    if adapter is not None:
        schema = adapter.json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        content: dict[str, Any] = {"application/json": {"schema": schema}}
        if route.binary:
            npy = "np.save of a float32 [regions, img_dim] array"
            content[NPY] = {"schema": {"type": "string", "format": "binary", "description": npy}}
        extra["requestBody"] = {"required": True, "content": content}
        if route.binary and route.op.startswith("search"):
            extra["parameters"] = [{
                "name": "k", "in": "query", "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
                "description": "results, when the body (x-npy, or JSON without k) has none",
            }]  # fmt: skip
    if protected and route.path not in OPEN_PATHS:
        extra["security"] = [{"apiKey": []}]

    takes_k = bool(extra.get("parameters"))

    async def endpoint(request: Request) -> JSONResponse:
        unknown = sorted(set(request.query_params) - ({"k"} if takes_k else set()))
        if unknown:
            raise RequestError(f"unknown query parameter(s): {', '.join(unknown)}")
        kwargs = await _parse(request, route, adapter) if adapter is not None else {}
        reply = await backend.call(route.op, **kwargs)
        for batch in reply.batches:  # one observation per text query, as for single queries
            batch_sizes.observe(batch)
        return JSONResponse(reply.body)

    method = "POST" if adapter is not None else "GET"
    app.add_api_route(route.path, endpoint, methods=[method], summary=route.summary,
                      operation_id=route.op, responses=responses, openapi_extra=extra)  # fmt: skip


async def _parse(request: Request, route: Route, adapter: TypeAdapter) -> dict[str, Any]:
    media = _media_type(request)
    body = await request.body()
    if route.binary and media == NPY:
        kwargs: dict[str, Any] = {"features": _load_npy(body)}
    elif media != "application/json":
        allowed = "application/json" + (f" or {NPY}" if route.binary else "")
        raise HTTPException(415, f"Content-Type must be {allowed}, got {media or 'none'!r}")
    else:
        try:
            parsed = adapter.validate_json(body)  # strict JSON mode: objects for models
        except ValidationError as e:
            if e.errors()[0]["type"] == "json_invalid":
                _refuse_invalid_json(body)
            raise RequestValidationError(e.errors()) from None
        kwargs = {f: getattr(parsed, f) for f in parsed.model_fields_set}
        if "features" in kwargs and not isinstance(kwargs["features"], list | type(None)):
            kwargs["features"] = _decode_base64(kwargs["features"])
    if "k" in request.query_params:
        kwargs.setdefault("k", _query_k(request.query_params["k"]))
    return kwargs


def _refuse_invalid_json(body: bytes) -> None:
    """The reason, in the words of Python's parser: a 400 if not UTF-8, else a 422."""
    try:
        json.loads(body)
    except UnicodeDecodeError:
        raise HTTPException(400, "There was an error parsing the body: not UTF-8") from None
    except json.JSONDecodeError as e:
        raise RequestError(f"body is not valid JSON: {e}") from None


def _query_k(raw: str) -> int:
    if not re.fullmatch(r"[0-9]{1,3}", raw) or not 1 <= int(raw) <= MAX_K:
        raise RequestError(f"k must be an integer in [1, {MAX_K}], got {raw!r}")
    return int(raw)


def _decode_base64(encoded: Any) -> np.ndarray:
    try:
        raw = base64.b64decode(encoded.base64, validate=True)
    except binascii.Error as e:
        raise RequestError(f"features.base64: not base64 ({e})") from None
    n, d = encoded.shape
    if len(raw) != 4 * n * d:
        raise RequestError(
            f"features.base64: {len(raw)} bytes, but shape {[n, d]} of float32 needs {4 * n * d}"
        )
    return np.frombuffer(raw, dtype="<f4").reshape(n, d)


def _load_npy(body: bytes) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise RequestError(f"body is not an .npy array ({' '.join(str(e).split())})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise RequestError(f"the .npy array must hold real numbers, got {arr.dtype}")
    return arr


def _extend_openapi(app: FastAPI, components: dict[str, Any], *, protected: bool) -> None:
    """FastAPI's OpenAPI plus the request schemas (declared by hand, since the routes parse
    JSON and .npy bodies themselves) and the API-key scheme."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(components)
            if protected:
                spec["components"]["securitySchemes"] = {
                    "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}
                }
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _key_matches(request: Request, key: bytes) -> bool:
    import hmac

    sent = [v for k, v in request.headers.raw if k == b"x-api-key"]
    return len(sent) == 1 and hmac.compare_digest(sent[0], key)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _BodyError(HTTPException):
    """Raised from ``receive``; FastAPI passes HTTPExceptions met reading a body through."""


class _BodyGuard:
    """ASGI middleware: 413 once a body passes its encoding's limit, however it is sent (the
    Content-Length check in ``guard`` misses chunked bodies), and 408 when the next part of
    a body takes longer than ``timeout_s`` to arrive."""

    def __init__(self, app: Any, limits: dict[str, int], timeout_s: float):
        self.app = app
        self.limits = limits
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        media = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip()
        limit = self.limits[NPY if media.lower() == NPY.encode() else "json"]
        received = 0
        started = False

        async def guarded_receive() -> dict:
            nonlocal received
            try:
                event = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                message = f"request body not received within {self.timeout_s:g} s"
                raise _BodyError(408, message) from None
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:
                    raise _BodyError(413, f"request body larger than {limit} bytes")
            return event

        async def tracking_send(event: dict) -> None:
            nonlocal started
            started = started or event["type"] == "http.response.start"
            await send(event)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _BodyError as e:  # read outside a route's exception handling
            if started:
                raise
            await _error(e.status_code, str(e.detail))(scope, receive, send)


class _Head:
    """ASGI middleware: HEAD is GET without the body (RFC 9110), for every GET route."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(event: dict) -> None:
            if event["type"] == "http.response.body":
                event = {**event, "body": b""}
            await send(event)

        await self.app({**scope, "method": "GET"}, receive, headers_only)
