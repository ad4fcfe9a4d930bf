"""The HTTP API (``build_app``) in-process over ``LocalBackend``: no Ray, no sockets.

Every answer is checked against the offline ``hrem_ray.embed`` embeddings and a naive full
``argsort``; every bad input must be a 4xx ``{"error": message}``, never a 5xx or a trace.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from hrem_ray.checkpoint import load_checkpoint
from hrem_ray.cli import main
from hrem_ray.data.precomp import open_split
from hrem_ray.embed import embed_captions, embed_features
from hrem_ray.serving.api import NPY, PAGE, LocalBackend, body_limits, build_app
from hrem_ray.serving.service import (
    MAX_K,
    MAX_QUERIES,
    MAX_QUERY_CHARS,
    MAX_REGIONS,
    RetrievalService,
)
from hrem_ray.testing import metric_samples, tiny_data_and_checkpoint

N_IMAGES, N_CAPTIONS, IMG_DIM, DIM = 10, 50, 24, 32
API_KEY = "s3cret-key"
POSTS = ["/search/text", "/search/image", "/embed/text", "/embed/image"]
JSON = {"content-type": "application/json"}
JSON_LIMIT = body_limits(IMG_DIM)["json"]
NPY_LIMIT = body_limits(IMG_DIM)[NPY]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert) -> dict[str, Any]:
    """Tiny f30k data, a fresh tiny checkpoint, its test gallery and the offline embeddings."""
    root = tmp_path_factory.mktemp("serve_api")
    data, ckpt = tiny_data_and_checkpoint(root, tiny_bert)
    gallery = root / "gallery"
    main(["index", "--checkpoint", str(ckpt), "--data-path", str(data), "--dataset", "f30k",
          "--split", "test", "--out", str(gallery)])  # fmt: skip
    ck = load_checkpoint(ckpt)
    tok = ck.tokenizer()
    split = open_split(data, "f30k", "test")
    feats = np.asarray(split.features[split.image_rows()], dtype=np.float32)
    return {
        "ckpt": ckpt,
        "gallery": gallery,
        "model": ck.model,
        "tokenizer": tok,
        "features": feats,  # [10, 6, 24]
        "texts": split.captions,
        "images": embed_features(ck.model, feats),
        "captions": embed_captions(ck.model, tok, split.captions),
    }


@pytest.fixture(scope="module")
def service(world) -> RetrievalService:
    return RetrievalService(world["ckpt"], world["gallery"])


@pytest.fixture(scope="module")
def client(service) -> TestClient:
    with TestClient(build_app(LocalBackend(service)), raise_server_exceptions=False) as c:
        yield c


def offline_text(world, query: str) -> np.ndarray:
    return embed_captions(world["model"], world["tokenizer"], [query])[0]


def offline_image(world, features) -> np.ndarray:
    return embed_features(world["model"], np.asarray(features, np.float32)[None])[0]


def naive_top_k(scores: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    order = np.argsort(-scores)[:k]
    return order.tolist(), scores[order]


def expect_text_hits(world, query: str, k: int, results: list[dict]) -> None:
    ids, scores = naive_top_k(world["images"] @ offline_text(world, query), k)
    assert [r["id"] for r in results] == ids
    np.testing.assert_allclose([r["score"] for r in results], scores, atol=1e-5)
    for r in results:
        assert set(r) == {"id", "score", "captions"}
        assert r["captions"] == world["texts"][5 * r["id"] : 5 * r["id"] + 5]


def expect_image_hits(world, image_emb: np.ndarray, k: int, results: list[dict]) -> None:
    ids, scores = naive_top_k(world["captions"] @ image_emb, k)
    assert [r["id"] for r in results] == ids
    np.testing.assert_allclose([r["score"] for r in results], scores, atol=1e-5)
    for r in results:
        assert set(r) == {"id", "score", "caption", "image_id"}
        assert r["caption"] == world["texts"][r["id"]]
        assert r["image_id"] == r["id"] // 5


def assert_error(response, status: int, message: str = "") -> str:
    """A JSON ``{"error": <non-empty message>}`` with this status; returns the message."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert body["error"].strip(), body
    assert "Traceback" not in body["error"]
    assert message.lower() in body["error"].lower(), (message, body["error"])
    return body["error"]


# --------------------------------------------------------------------------------------------
# answers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "k"),
    [("a dog runs on the grass", 3), ("two men", 1), ("Ünïcødé — 狗 🐕", 10), ("x", 100)],
)
def test_search_text_equals_offline_embed_and_exact_top_k(world, client, query, k):
    r = client.post("/search/text", json={"query": query, "k": k})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == query
    assert len(body["results"]) == min(k, N_IMAGES)
    expect_text_hits(world, query, min(k, N_IMAGES), body["results"])


def test_search_text_default_k_is_10(world, client):
    r = client.post("/search/text", json={"query": "a cat"})
    assert r.status_code == 200
    expect_text_hits(world, "a cat", 10, r.json()["results"])


# Repeats, white space, non-ASCII, a query at the length bound: each answered as if alone.
QUERY_LIST = [
    "a dog runs",
    "two men",
    "a dog runs",
    "  padded  ",
    "Ünïcødé 狗 🐕",
    "A" * MAX_QUERY_CHARS,
]


@pytest.mark.parametrize("path", ["/search/text", "/embed/text"])
@pytest.mark.parametrize(
    "queries", [QUERY_LIST, ["one query"], [f"thing {i}" for i in range(MAX_QUERIES)]]
)
def test_a_list_of_queries_answers_each_as_alone_in_order(client, path, queries):
    k = {"k": 3} if path == "/search/text" else {}
    singles = [client.post(path, json={"query": q, **k}) for q in queries]
    assert all(r.status_code == 200 for r in singles)
    r = client.post(path, json={"query": queries, **k})
    assert r.status_code == 200, r.text
    assert r.json() == [s.json() for s in singles]  # exactly, not merely close


def test_a_list_search_equals_offline(world, client):
    r = client.post("/search/text", json={"query": QUERY_LIST[:3]})
    assert [a["query"] for a in r.json()] == QUERY_LIST[:3]
    for query, answer in zip(QUERY_LIST[:3], r.json(), strict=True):
        expect_text_hits(world, query, 10, answer["results"])  # k applies to every query


@pytest.mark.parametrize(("image_id", "k"), [(0, 5), (7, 1), (9, 100)])
def test_search_image_by_id_equals_offline(world, client, image_id, k):
    r = client.post("/search/image", json={"image_id": image_id, "k": k})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == min(k, N_CAPTIONS)
    expect_image_hits(world, world["images"][image_id], min(k, N_CAPTIONS), results)


def test_search_image_by_features_equals_by_id(world, client):
    feats = world["features"][4]
    r = client.post("/search/image", json={"features": feats.tolist(), "k": 7})
    assert r.status_code == 200, r.text
    expect_image_hits(world, offline_image(world, feats), 7, r.json()["results"])
    by_id = client.post("/search/image", json={"image_id": 4, "k": 7}).json()["results"]
    assert [h["id"] for h in r.json()["results"]] == [h["id"] for h in by_id]


@pytest.mark.parametrize("regions", [1, 3, MAX_REGIONS])
def test_search_image_by_new_features(world, client, regions):
    feats = np.random.default_rng(regions).standard_normal((regions, IMG_DIM)).astype(np.float32)
    body = {"features": feats.tolist(), "k": 4}
    r = client.post("/search/image", json=body)
    assert r.status_code == 200, r.text
    expect_image_hits(world, offline_image(world, feats), 4, r.json()["results"])


@pytest.mark.parametrize("query", ["a dog", "  padded query  ", "A" * MAX_QUERY_CHARS])
def test_embed_text_equals_offline(world, client, query):
    r = client.post("/embed/text", json={"query": query})
    assert r.status_code == 200, r.text
    emb = np.array(r.json()["embedding"])
    assert emb.shape == (DIM,)
    np.testing.assert_allclose(emb, offline_text(world, query), atol=1e-5)
    assert abs(np.linalg.norm(emb) - 1) < 1e-5


def test_embed_image_equals_offline_and_the_gallery(world, client):
    for i in (0, 6):
        r = client.post("/embed/image", json={"features": world["features"][i].tolist()})
        assert r.status_code == 200, r.text
        emb = np.array(r.json()["embedding"])
        assert emb.shape == (DIM,)
        np.testing.assert_allclose(emb, world["images"][i], atol=1e-5)
        assert abs(np.linalg.norm(emb) - 1) < 1e-5


def test_integer_features_are_numbers(world, client):
    feats = [[int(v) for v in row] for row in (world["features"][2] * 3).round()]
    r = client.post("/embed/image", json={"features": feats})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["embedding"], offline_image(world, feats), atol=1e-5)


def test_healthz_readyz_page_openapi(world, client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert {k: v for k, v in body.items() if not k.endswith("_id")} == {
        "status": "ready",
        "n_images": N_IMAGES,
        "n_captions": N_CAPTIONS,
        "img_dim": IMG_DIM,
        "embed_dim": DIM,
        "models": [{"model_id": body["model_id"], "embed_dim": DIM}],  # the one model
        "swap_refused": None,
        "registry": [],  # given by path, not as models:/
        "index": {
            "spec": "Flat",
            "params": {},
            "bytes_per_item": 4 * DIM,
            "train_sample": {"images": 0, "captions": 0},
        },  # exact search  # fmt: skip
    }
    assert len(body["model_id"]) == len(body["gallery_id"]) == 16
    assert "/" not in r.text  # no filesystem path or URI
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.text == PAGE.read_text() and "<html" in r.text.lower()
    spec = client.get("/openapi.json").json()
    assert set(POSTS) <= set(spec["paths"]) and {"/healthz", "/readyz"} <= set(spec["paths"])
    for path in POSTS:
        assert "post" in spec["paths"][path]
    assert client.get("/docs").status_code == 200


# --------------------------------------------------------------------------------------------
# bad input: a 4xx JSON error with a message, for every endpoint
# --------------------------------------------------------------------------------------------

ROW = [0.5] * IMG_DIM
QUERY_ERRORS = [
    ({"query": ""}, "query"),
    ({"query": "   "}, "non-empty"),
    ({"query": "\t\n \u3000"}, "non-empty"),
    ({"query": "x" * (MAX_QUERY_CHARS + 1)}, str(MAX_QUERY_CHARS)),
    ({"query": 5}, "query"),
    ({"query": None}, "query"),
    ({"query": []}, f"a list of queries must hold 1 to {MAX_QUERIES}, got 0"),
    ({"query": ["a"] * (MAX_QUERIES + 1)}, f"1 to {MAX_QUERIES}, got {MAX_QUERIES + 1}"),
    ({"query": ["a", 5]}, "query.1"),
    ({"query": ["a", ["b"]]}, "query.1"),
    ({"query": ["a", "  "]}, "query.1: must be a non-empty string"),
    (
        {"query": ["x" * (MAX_QUERY_CHARS + 1)]},
        f"query.0: string should have at most {MAX_QUERY_CHARS}",
    ),
    ({"query": {"q": "a"}}, f"query must be a string or a list of 1 to {MAX_QUERIES} strings"),
    ({}, "query"),
    ({"query": "a", "extra": 1}, "extra"),
]
K_ERRORS = [0, -1, MAX_K + 1, 10**30, "3", 2.5, 1e300, True, False, None, [3]]


@pytest.mark.parametrize("path", ["/search/text", "/embed/text"])
@pytest.mark.parametrize(("body", "message"), QUERY_ERRORS)
def test_bad_query(client, path, body, message):
    assert_error(client.post(path, json=body), 422, message)


@pytest.mark.parametrize("k", K_ERRORS)
def test_bad_k(client, k):
    assert_error(client.post("/search/text", json={"query": "a dog", "k": k}), 422, "k")
    assert_error(client.post("/search/image", json={"image_id": 1, "k": k}), 422, "k")


def test_integral_numbers_are_integers_as_in_json_schema(client):
    by_int = client.post("/search/image", json={"image_id": 2, "k": 3}).json()
    assert client.post("/search/image", json={"image_id": 2.0, "k": 3.0}).json() == by_int


def test_bad_k_in_the_service_too(service):
    """The Ray replicas get k straight from the ingress: the service checks it itself."""
    from hrem_ray.serving.service import RequestError

    for k in K_ERRORS:
        if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_K:
            continue
        with pytest.raises(RequestError, match="k must be"):
            service.check_k(k)


def test_bad_query_lists_in_the_service_too(service):
    """So do the replicas with a list of queries: its bound, and each query."""
    from hrem_ray.serving.service import RequestError

    assert service.check_queries("a") == ["a"] and service.check_queries(["a", "b"]) == ["a", "b"]
    for query in ([], ["a"] * (MAX_QUERIES + 1), ("a",), None, 5):
        with pytest.raises(RequestError, match=f"list of 1 to {MAX_QUERIES} strings"):
            service.check_queries(query)
    with pytest.raises(RequestError, match="non-empty"):
        service.check_queries(["a", " "])


FEATURE_ERRORS = [
    ([[0.0] * (IMG_DIM - 1)], "features"),
    ([[0.0] * (IMG_DIM + 1)], "features"),
    ([], "features"),
    ([[]], "features"),
    ([ROW] * (MAX_REGIONS + 1), "features"),
    ([ROW, ROW[:-1]], "features"),  # ragged
    ([ROW, []], "features"),
    ([[ROW]], "features"),  # 3-d
    (ROW, "features"),  # 1-d
    ([["0.5"] * IMG_DIM], "features"),
    ([[True] * IMG_DIM], "features"),
    ([[None] * IMG_DIM], "features"),
    ([[1e39] + ROW[1:]], "less than or equal"),  # finite in JSON, inf as float32
    ([[1e20] * IMG_DIM], "less than or equal"),  # finite float32, but the model overflows
    ([[-3e38] * IMG_DIM, ROW], "greater than or equal"),
    # found by the fuzz test: the model's output is finite, but its squared norm overflows in
    # the final L2 normalisation and the "embedding" is a zero vector
    ([[0.0] * (IMG_DIM - 1) + [1.6756583595585307e19]], "less than or equal"),
    ({"shape": [1, IMG_DIM], "base64": "AAAA"}, "bytes"),
    ({"shape": [1, IMG_DIM + 1], "base64": ""}, "features"),
    ({"shape": [0, IMG_DIM], "base64": ""}, "features"),
    ({"shape": [1, IMG_DIM], "base64": "not base64!"}, "features"),
    ("abc", "features"),
    ({"a": 1}, "features"),
]


@pytest.mark.parametrize(("features", "message"), FEATURE_ERRORS)
def test_bad_features(client, features, message):
    assert_error(client.post("/search/image", json={"features": features}), 422, message)
    assert_error(client.post("/embed/image", json={"features": features}), 422, message)


NON_FINITE = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity"]


@pytest.mark.parametrize("number", NON_FINITE)
def test_non_finite_features(client, number):
    """1e400 overflows to inf when the JSON is parsed; NaN/Infinity literals are accepted by
    Python's parser; either way the features are refused."""
    raw = json.dumps({"features": [ROW, ROW]}).replace("0.5", number, 1).encode()
    for path in ("/search/image", "/embed/image"):
        assert_error(client.post(path, content=raw, headers=JSON), 422, "features")


@pytest.mark.parametrize("number", NON_FINITE)
def test_non_finite_elsewhere_is_refused(client, number):
    for path, raw in (
        ("/search/text", f'{{"query": "a", "k": {number}}}'),
        ("/search/image", f'{{"image_id": {number}}}'),
        ("/embed/text", f'{{"query": {number}}}'),
    ):
        r = client.post(path, content=raw.encode(), headers=JSON)
        assert 400 <= r.status_code < 500, (path, raw, r.status_code, r.text)
        assert_error(r, r.status_code)


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        (b"{not json", 422, "not valid JSON"),
        (b'{"query": "a dog"', 422, "not valid JSON"),
        (b'{"query": "a\xff"}', 400, "parsing the body"),  # not UTF-8
        (b"", 422, ""),
        (b"[1, 2]", 422, ""),
        (b"null", 422, ""),
        (b'"a dog"', 422, ""),
        (b"42", 422, ""),
    ],
)
def test_malformed_json(client, raw, status, message):
    for path in POSTS:
        assert_error(client.post(path, content=raw, headers=JSON), status, message)


def test_not_json_content_type(client):
    r = client.post(
        "/search/text", content=b'{"query": "a"}', headers={"content-type": "text/plain"}
    )
    assert_error(r, 415, "application/json")


@pytest.mark.parametrize("image_id", [N_IMAGES, N_IMAGES + 5, 10**20])
def test_unknown_image_id_is_404(client, image_id):
    msg = assert_error(client.post("/search/image", json={"image_id": image_id}), 404)
    assert msg == f"unknown image_id {image_id}"


@pytest.mark.parametrize("image_id", [-1, True, "3", 1.5, [1], {"id": 1}])
def test_image_id_of_the_wrong_type(client, image_id):
    assert_error(client.post("/search/image", json={"image_id": image_id}), 422, "image_id")


@pytest.mark.parametrize(
    "body",
    [{}, {"k": 3}, {"image_id": None, "features": None}, {"image_id": 1, "features": [ROW]}],
)
def test_exactly_one_of_image_id_and_features(client, body):
    assert_error(client.post("/search/image", json=body), 422, "exactly one of image_id")


@pytest.mark.parametrize("path", POSTS)
def test_extra_fields_are_refused(client, path):
    body = {
        "/search/text": {"query": "a", "k": 3},
        "/search/image": {"image_id": 1},
        "/embed/text": {"query": "a"},
        "/embed/image": {"features": [ROW]},
    }[path]
    assert client.post(path, json=body).status_code == 200
    assert_error(client.post(path, json={**body, "K": 3}), 422, "extra")


@pytest.mark.parametrize("path", POSTS)
def test_body_too_large_is_413(client, path):
    huge = str(JSON_LIMIT + 1)
    r = client.post(path, content=b'{"query": "a"}', headers={**JSON, "content-length": huge})
    assert_error(r, 413, "larger than")
    for bad in (b"12abc", "²".encode("latin-1"), b"-1", b"1e3"):  # "²".isdigit(), int("²") fails
        r = client.post(path, content=b"x", headers={**JSON, "content-length": bad})
        assert_error(r, 400, "Content-Length")


def test_a_real_body_too_large_is_413(client):
    body = json.dumps({"features": [ROW] * 40_000}).encode()  # ~5 MB
    assert len(body) > JSON_LIMIT
    assert_error(client.post("/embed/image", content=body, headers=JSON), 413, "larger than")


def test_a_chunked_body_too_large_is_413(client):
    """No Content-Length (chunked transfer): the body is cut off once it passes the limit."""
    chunk = b" " * (1 << 20)
    sent = []

    def body():
        yield b'{"features": '
        for _ in range(6):
            sent.append(1)
            yield chunk

    r = client.post("/embed/image", content=body(), headers=JSON)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413, "larger than")
    # and a small chunked body is served as usual
    r = client.post("/embed/text", content=iter([b'{"query": ', b'"a dog"}']), headers=JSON)
    assert r.status_code == 200, r.text


def test_unknown_route_and_wrong_method_are_json(client):
    assert_error(client.get("/nope"), 404)
    assert_error(client.post("/search/nope", json={}), 404)
    assert_error(client.get("/search/text"), 405)
    assert_error(client.put("/embed/image", json={}), 405)


# --------------------------------------------------------------------------------------------
# API key, metrics, unexpected errors
# --------------------------------------------------------------------------------------------


def test_api_key(service):
    with TestClient(build_app(LocalBackend(service), api_key=API_KEY)) as c:
        for path in ("/healthz", "/readyz", "/", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        ok = {"/search/text": {"query": "a"}, "/search/image": {"image_id": 0},
              "/embed/text": {"query": "a"}, "/embed/image": {"features": [ROW]}}  # fmt: skip
        for path, body in ok.items():
            assert_error(c.post(path, json=body), 401, "x-api-key")
            assert_error(c.post(path, json=body, headers={"x-api-key": "wrong"}), 401)
            assert_error(c.post(path, json=body, headers={"x-api-key": API_KEY[:-1]}), 401)
            assert_error(c.post(path, json=body, headers={"x-api-key": API_KEY + "x"}), 401)
            assert_error(c.post(path, json=body, headers={"x-api-key": ""}), 401)
            r = c.post(path, json=body, headers={"x-api-key": API_KEY})
            assert r.status_code == 200, (path, r.text)
        assert_error(c.get("/metrics"), 401)
        assert c.get("/metrics", headers={"x-api-key": API_KEY}).status_code == 200
        # the key is checked before the body is even looked at
        r = c.post("/embed/text", content=b"{bad", headers={**JSON, "content-length": "9" * 9})
        assert_error(r, 401)


def test_metrics_count_requests_by_path_and_status(service):
    with TestClient(build_app(LocalBackend(service), api_key=API_KEY)) as c:
        key = {"x-api-key": API_KEY}
        for _ in range(3):
            assert c.post("/search/text", json={"query": "a dog"}, headers=key).status_code == 200
        assert c.post("/embed/text", json={"query": "a dog"}, headers=key).status_code == 200
        r = c.post("/embed/text", json={"query": ["a", "b", "c"]}, headers=key)
        assert r.status_code == 200
        assert c.post("/search/text", json={"query": " "}, headers=key).status_code == 422
        assert c.post("/search/image", json={"image_id": 99}, headers=key).status_code == 404
        assert c.post("/search/image", json={"image_id": 1}).status_code == 401
        assert c.get("/nope", headers=key).status_code == 404
        assert c.get("/readyz").status_code == 200
        r = c.get("/metrics", headers=key)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = metric_samples(r.text)

    def count(path: str, status: int) -> float:
        return samples.get(("hrem_requests_total", (("path", path), ("status", str(status)))), 0)

    assert count("/search/text", 200) == 3
    assert count("/search/text", 422) == 1
    assert count("/embed/text", 200) == 2  # a list of queries is one request
    assert count("/search/image", 404) == 1
    assert count("/search/image", 401) == 1
    assert count("other", 404) == 1
    assert count("/readyz", 200) == 1
    assert samples[("hrem_request_seconds_count", (("path", "/search/text"),))] == 4
    # every text query, the list's three included, embedded in a batch of one in-process
    assert samples[("hrem_text_batch_size_count", ())] == 7
    assert samples[("hrem_text_batch_size_bucket", (("le", "1.0"),))] == 7
    assert samples[("hrem_gallery_images", ())] == N_IMAGES


def test_an_unexpected_error_is_a_counted_json_500(service):
    class Broken(LocalBackend):
        async def call(self, op, **kwargs):
            raise RuntimeError("the replica fell over")

    with TestClient(build_app(Broken(service)), raise_server_exceptions=False) as c:
        r = c.post("/search/text", json={"query": "a dog"})
        assert_error(r, 500, "internal error")
        assert "fell over" not in r.text
        samples = metric_samples(c.get("/metrics").text)
    key = ("hrem_requests_total", (("path", "/search/text"), ("status", "500")))
    assert samples[key] == 1


# --------------------------------------------------------------------------------------------
# fuzz: no JSON body makes any POST endpoint answer 5xx
# --------------------------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 10, 100, 101, -1, 0.0, 1e39, -1e39, 2.0, 1e308]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=30))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
feature_rows = st.lists(numbers, min_size=IMG_DIM - 1, max_size=IMG_DIM + 1)
features = st.one_of(
    st.lists(feature_rows, min_size=0, max_size=4),
    st.lists(st.lists(numbers, max_size=3), max_size=3),
    json_values,
)
queries = st.one_of(st.text(max_size=40), st.text(max_size=1100), json_values)
ks = st.one_of(st.integers(min_value=-5, max_value=120), json_values)
image_ids = st.one_of(st.integers(min_value=-3, max_value=N_IMAGES + 3), json_values)


def maybe(**fields) -> st.SearchStrategy[dict]:
    """Dicts holding any subset of the fields, sometimes with an unknown one."""
    return st.fixed_dictionaries(
        {}, optional={**fields, "extra": json_values}
    )  # optional keys come and go independently


# Well-formed bodies too, so that a good share of examples reach the model and the search.
good_query = st.text(min_size=1, max_size=MAX_QUERY_CHARS)
good_queries = st.one_of(
    good_query, st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=5)
)
good_k = st.integers(min_value=1, max_value=MAX_K)
feature_value = st.one_of(
    st.floats(-100, 100, width=32),  # what region features look like
    st.floats(width=32, allow_nan=False, allow_infinity=False),  # anything float32 holds
)
good_features = st.lists(
    st.lists(feature_value, min_size=IMG_DIM, max_size=IMG_DIM), min_size=1, max_size=5
)
BODIES = {
    "/search/text": st.one_of(
        maybe(query=queries, k=ks),
        st.fixed_dictionaries({"query": good_queries}, optional={"k": good_k}),
    ),
    "/search/image": st.one_of(
        maybe(image_id=image_ids, features=features, k=ks),
        st.fixed_dictionaries({"image_id": image_ids}, optional={"k": good_k}),
        st.fixed_dictionaries({"features": good_features}, optional={"k": good_k}),
    ),
    "/embed/text": st.one_of(maybe(query=queries), st.fixed_dictionaries({"query": good_queries})),
    "/embed/image": st.one_of(
        maybe(features=features), st.fixed_dictionaries({"features": good_features})
    ),
}


def _dumps(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode()  # NaN/Infinity literals included


@pytest.mark.parametrize("path", POSTS)
@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzz_json_bodies_never_5xx(client, path, data):
    body = data.draw(st.one_of(BODIES[path], json_values), label="body")
    r = client.post(path, content=_dumps(body), headers=JSON)
    event(f"HTTP {r.status_code}")  # pytest --hypothesis-show-statistics shows the mix
    assert r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code == 200:
        answers = r.json()
        if isinstance(body.get("query"), list):  # a list of queries: a list, in its order
            event("a list of queries")
            assert isinstance(answers, list) and len(answers) == len(body["query"])
            if path == "/search/text":
                assert [a["query"] for a in answers] == body["query"]
        else:
            answers = [answers]
        for answer in answers:
            if path.startswith("/embed"):
                emb = answer["embedding"]
                assert len(emb) == DIM
                assert all(isinstance(v, float) and math.isfinite(v) for v in emb)
                assert abs(math.hypot(*emb) - 1) < 1e-4
            else:
                scores = [h["score"] for h in answer["results"]]
                assert scores and all(isinstance(v, float) and math.isfinite(v) for v in scores)
                assert scores == sorted(scores, reverse=True)
    else:
        assert_error(r, r.status_code)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(raw=st.binary(max_size=200))
def test_fuzz_raw_bytes_never_5xx(client, raw):
    for path in POSTS:
        r = client.post(path, content=raw, headers=JSON)
        assert r.status_code < 500, (raw, r.status_code, r.text)


def test_page_file_is_shipped():
    assert Path(PAGE).is_file()


# --------------------------------------------------------------------------------------------
# binary features, body limits, HTTP conformance (docs/serving.md)
# --------------------------------------------------------------------------------------------


def b64_body(feats: np.ndarray) -> dict[str, Any]:
    import base64

    raw = np.ascontiguousarray(feats, dtype="<f4").tobytes()
    return {"shape": list(feats.shape), "base64": base64.b64encode(raw).decode()}


def npy_bytes(feats: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    np.save(out, np.asarray(feats, np.float32))
    return out.getvalue()


@pytest.mark.parametrize("regions", [1, 6, MAX_REGIONS])
def test_binary_features_equal_the_json_ones(world, client, regions):
    feats = np.random.default_rng(regions).standard_normal((regions, IMG_DIM)).astype(np.float32)
    want = client.post("/embed/image", json={"features": feats.tolist()}).json()["embedding"]
    hits = client.post("/search/image", json={"features": feats.tolist(), "k": 6}).json()
    r = client.post("/embed/image", json={"features": b64_body(feats)})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["embedding"], want, atol=1e-6)
    np.testing.assert_allclose(want, offline_image(world, feats), atol=1e-5)
    r = client.post("/embed/image", content=npy_bytes(feats), headers={"content-type": NPY})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["embedding"], want, atol=1e-6)
    r = client.post("/search/image", json={"features": b64_body(feats), "k": 6})
    assert r.json() == hits
    r = client.post("/search/image?k=6", content=npy_bytes(feats), headers={"content-type": NPY})
    assert r.json() == hits
    assert len(client.post("/search/image", content=npy_bytes(feats),
                           headers={"content-type": NPY}).json()["results"]) == 10  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not an npy file", "npy"),
        (npy_bytes(np.zeros((2, IMG_DIM + 1))), "shape"),
        (npy_bytes(np.zeros((0, IMG_DIM))), "shape"),
        (npy_bytes(np.full((1, IMG_DIM), np.nan)), "non-finite"),
        (npy_bytes(np.full((1, IMG_DIM), 1e7)), "too large"),
    ],
)
def test_bad_npy_bodies(client, raw, message):
    for path in ("/search/image", "/embed/image"):
        assert_error(client.post(path, content=raw, headers={"content-type": NPY}), 422, message)
    obj = np.array([{"a": 1}], dtype=object)
    import io

    pickled = io.BytesIO()
    np.save(pickled, obj, allow_pickle=True)  # never unpickled by the service
    r = client.post("/embed/image", content=pickled.getvalue(), headers={"content-type": NPY})
    assert_error(r, 422, "npy")
    assert_error(client.post("/search/image?k=0", content=npy_bytes(np.ones((1, IMG_DIM))),
                             headers={"content-type": NPY}), 422, "k must be")  # fmt: skip


def test_text_routes_take_no_npy(client):
    r = client.post("/search/text", content=npy_bytes(np.ones((1, IMG_DIM))),
                    headers={"content-type": NPY})  # fmt: skip
    assert_error(r, 415, "application/json")


def test_body_limits_are_exact_for_each_encoding(client):
    """The largest legitimate body of each encoding is served, one byte more is a 413."""
    feats = np.full((MAX_REGIONS, IMG_DIM), -2.2250738585072014e-308)
    npy = npy_bytes(feats)
    assert len(npy) == NPY_LIMIT
    r = client.post("/embed/image", content=npy, headers={"content-type": NPY})
    assert r.status_code == 200, r.text
    r = client.post("/embed/image", content=npy + b" ", headers={"content-type": NPY})
    assert_error(r, 413, str(NPY_LIMIT))
    body = json.dumps({"features": feats.tolist()}).encode()
    assert len(body) <= JSON_LIMIT
    # at this img_dim the largest JSON body is MAX_QUERIES queries of escaped emoji
    queries = ["\U0001f600" * MAX_QUERY_CHARS] * MAX_QUERIES
    text = json.dumps({"query": queries}).encode()
    assert len(text) <= JSON_LIMIT < 1.01 * len(text)  # a tight limit
    padded = text[:-1] + b" " * (JSON_LIMIT - len(text)) + b"}"
    r = client.post("/embed/text", content=padded, headers=JSON)
    assert r.status_code == 200 and len(r.json()) == MAX_QUERIES, r.text
    assert_error(client.post("/embed/text", content=padded + b" ", headers=JSON), 413)
    body = body[:-1] + b" " * (JSON_LIMIT - len(body)) + b"}"
    assert len(body) == JSON_LIMIT
    r = client.post("/embed/image", content=body, headers=JSON)
    assert r.status_code == 200, r.text
    assert_error(client.post("/embed/image", content=body + b" ", headers=JSON), 413)
    # for a real model (100 x 2048) the binary encodings are a quarter of the JSON one
    real = body_limits(2048)
    assert real[NPY] == 128 + 4 * 100 * 2048 and real["json"] / real[NPY] > 4


def test_wrong_method_has_allow_and_head_works(client):
    r = client.get("/search/text")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"
    r = client.delete("/readyz")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    for path in ("/healthz", "/readyz", "/", "/openapi.json"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"]
        assert head.headers["content-length"] == get.headers["content-length"]


def test_openapi_documents_every_status_and_the_error_schema(client):
    spec = client.get("/openapi.json").json()
    error = {"$ref": "#/components/schemas/Error"}
    assert spec["components"]["schemas"]["Error"]["required"] == ["error"]
    for path in POSTS:
        responses = spec["paths"][path]["post"]["responses"]
        want = {"200", "400", "408", "413", "415", "422", "500"} | (
            {"404"} if path == "/search/image" else set()
        )
        assert set(responses) == want, path
        for code in want - {"200"}:
            assert responses[code]["content"]["application/json"]["schema"] == error
    content = spec["paths"]["/search/image"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", NPY}
    assert "401" not in spec["paths"]["/search/text"]["post"]["responses"]


@pytest.mark.parametrize(
    ("path", "answer"), [("/search/text", "TextResults"), ("/embed/text", "Embedding")]
)
def test_openapi_describes_a_query_and_a_list_of_them(client, path, answer):
    post = client.get("/openapi.json").json()["paths"][path]["post"]
    query = post["requestBody"]["content"]["application/json"]["schema"]["properties"]["query"]
    one, many = query["oneOf"]
    assert one["type"] == "string" and one["maxLength"] == MAX_QUERY_CHARS
    assert many["type"] == "array" and many["items"] == one
    assert (many["minItems"], many["maxItems"]) == (1, MAX_QUERIES)
    assert str(MAX_QUERIES) in post["summary"] and "order" in query["description"]
    ref = {"$ref": f"#/components/schemas/{answer}"}
    single, listed = post["responses"]["200"]["content"]["application/json"]["schema"]["anyOf"]
    assert single == ref and listed["items"] == ref and listed["type"] == "array"
    assert (listed["minItems"], listed["maxItems"]) == (1, MAX_QUERIES)


def test_schema_valid_requests_found_by_review_are_served(client):
    """Each was schema-valid and refused before; now the schema refuses them, or they pass."""
    spec = client.get("/openapi.json").json()
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import ValidationError as SchemaError

    def valid(path: str, body: Any) -> bool:
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        resolver_doc = {**schema["schema"], "components": spec["components"]}
        try:
            Draft202012Validator(resolver_doc).validate(body)
        except SchemaError:
            return False
        return True

    for path, body in [
        ("/embed/image", {"features": [[]]}),
        ("/search/image", {"features": [], "image_id": None, "k": 99}),
        ("/search/text", {"query": "\u001f"}),
        ("/search/image", {"image_id": -1}),
        ("/search/image", {"features": [[1e20] * IMG_DIM]}),
    ]:
        assert not valid(path, body), (path, body)
        assert_error(client.post(path, json=body), 422)
    served = [
        ("/search/text", {"query": "\u200b"}),
        ("/search/image", {"features": [ROW], "image_id": None, "k": 99}),
    ]
    for path, body in served:
        assert valid(path, body)
        assert client.post(path, json=body).status_code == 200


def test_api_key_must_be_visible_ascii(service):
    for bad in ("clé", "with space", "", "tab\t"):
        if bad:
            with pytest.raises(ValueError, match="visible ASCII"):
                build_app(LocalBackend(service), api_key=bad)
    with TestClient(build_app(LocalBackend(service), api_key=API_KEY)) as c:
        ok = {"x-api-key": API_KEY}
        assert c.post("/embed/text", json={"query": "a"}, headers=ok).status_code == 200
        r = c.post("/embed/text", json={"query": "a"}, headers={"x-api-key": "s3cret-kéy".encode()})
        assert_error(r, 401)
        spec = c.get("/openapi.json").json()
        assert spec["components"]["securitySchemes"]["apiKey"]["name"] == "x-api-key"
        assert "401" in spec["paths"]["/search/text"]["post"]["responses"]


def test_gallery_gauge_is_set_before_any_request(service):
    with TestClient(build_app(LocalBackend(service))) as c:
        samples = metric_samples(c.get("/metrics").text)
    assert samples[("hrem_gallery_images", ())] == N_IMAGES


def test_a_stalled_body_is_a_408(service):
    """A client that sends Content-Length and then stops: 408 after the read timeout."""
    import asyncio

    app = build_app(LocalBackend(service), body_timeout_s=0.2)
    sent: list[dict] = []

    async def receive() -> dict:
        await asyncio.sleep(3600)  # the body never comes
        return {}

    async def send(event: dict) -> None:
        sent.append(event)

    scope = {"type": "http", "method": "POST", "path": "/embed/text", "raw_path": b"/embed/text",
             "query_string": b"", "headers": [(b"content-type", b"application/json"),
             (b"content-length", b"20")], "http_version": "1.1", "scheme": "http",
             "server": ("t", 80), "client": ("c", 1), "root_path": ""}  # fmt: skip
    start = time.perf_counter()
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 5))
    assert time.perf_counter() - start < 2
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["error"].startswith("request body not received")


def test_cli_refuses_a_non_ascii_key_before_starting_anything(capsys):
    from tests.helpers import run_err

    line = run_err(capsys, "serve", "--checkpoint", "nowhere", "--gallery", "nowhere",
                   "--api-key", "clé")  # fmt: skip
    assert "visible ASCII" in line


def test_cli_refuses_haproxy_on_a_running_cluster_before_starting_anything(capsys):
    """HAProxy mode is the environment Ray starts with: a running cluster has its own."""
    from tests.helpers import run_err

    line = run_err(capsys, "serve", "--checkpoint", "nowhere", "--gallery", "nowhere",
                   "--haproxy", "--address", "127.0.0.1:6379")  # fmt: skip
    assert "--haproxy applies to the Ray that serve starts" in line
