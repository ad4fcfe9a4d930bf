"""Ensemble galleries and their service (``hrem-ray index`` / ``serve`` with several
``--checkpoint``): one dot product of concatenated, 1/sqrt(m)-scaled embeddings must be the
mean of the single models' cosine similarities.

Every score is checked against an independent computation: each model's own offline
``hrem_ray.embed`` embeddings, their cosine similarities averaged here, the mean similarity
matrix ``evaluate_ensemble`` saves, and a naive full ``argsort``. The two models differ in
weights and in embedding size (32 and 16), so a wrong order or scale cannot go unnoticed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from hrem_ray.checkpoint import load_checkpoint
from hrem_ray.cli import main
from hrem_ray.data.precomp import open_split
from hrem_ray.embed import embed_captions, embed_features, ensemble_embedding, model_id
from hrem_ray.eval.evaluate import evaluate_ensemble
from hrem_ray.index.gallery import MANIFEST, Gallery, GalleryError
from hrem_ray.serving.api import LocalBackend, build_app
from hrem_ray.serving.service import RetrievalService
from hrem_ray.testing import TINY_MODEL, tiny_data_and_checkpoint
from tests.helpers import run_err

N_IMAGES, N_CAPTIONS, IMG_DIM = 10, 50, 24
DIMS = (32, 16)  # checkpoint A's embedding size, checkpoint B's (and C's)
needs_faiss = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss-cpu not installed"
)


def _checkpoint(out: Path, bert: str, seed: int, embed_size: int) -> Path:
    main(["init-checkpoint", "--out", str(out), "--bert-path", bert, "--seed", str(seed),
          *TINY_MODEL, f"--set=model.embed_size={embed_size}"])  # fmt: skip
    return out


def _index(out: Path, data: Path, *checkpoints: Path, extra: tuple[str, ...] = ()) -> Path:
    flags = [x for c in checkpoints for x in ("--checkpoint", str(c))]
    main(["index", *flags, "--data-path", str(data), "--dataset", "f30k", "--split", "test",
          "--out", str(out), *extra])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert) -> dict[str, Any]:
    """Tiny f30k data; checkpoints A (32-d), B and C (16-d, other seeds); the galleries of
    A alone, of A+B and of A+C; each model's offline embeddings of the test split."""
    root = tmp_path_factory.mktemp("ensemble")
    data, a = tiny_data_and_checkpoint(root, tiny_bert)
    b = _checkpoint(root / "ckpt_b", tiny_bert, 1, DIMS[1])
    c = _checkpoint(root / "ckpt_c", tiny_bert, 2, DIMS[1])
    split = open_split(data, "f30k", "test")
    feats = np.asarray(split.features[split.image_rows()], dtype=np.float32)
    models = {}
    for name, path in (("a", a), ("b", b), ("c", c)):
        ck = load_checkpoint(path)
        tok = ck.tokenizer()
        models[name] = {
            "path": path,
            "model": ck.model,
            "tokenizer": tok,
            "id": model_id(ck.model),
            "images": embed_features(ck.model, feats, batch_size=3),
            "captions": embed_captions(ck.model, tok, split.captions, batch_size=7),
        }
    return {
        "root": root,
        "data": data,
        "features": feats,
        "texts": split.captions,
        "models": models,
        "single": _index(root / "g_a", data, a),
        "ab": _index(root / "g_ab", data, a, b),
        "ac": _index(root / "g_ac", data, a, c),
    }


def mean_sims(world, names: tuple[str, ...]) -> np.ndarray:
    """The [images, captions] mean of the models' cosine similarities, from their own
    embeddings."""
    ms = [world["models"][n] for n in names]
    return np.mean([m["images"] @ m["captions"].T for m in ms], axis=0)


def naive_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, axis=-1)[..., :k]
    return order, np.take_along_axis(scores, order, axis=-1)


# --------------------------------------------------------------------------------------------
# ensemble_embedding
# --------------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("dims", [(8,), (8, 8), (8, 3, 5), (4, 4, 4, 4, 4)])
def test_ensemble_embedding_dot_is_the_mean_cosine(dims):
    rng = np.random.default_rng(len(dims))
    queries = [_unit(rng.standard_normal((6, d))) for d in dims]
    items = [_unit(rng.standard_normal((9, d))) for d in dims]
    q, x = ensemble_embedding(queries), ensemble_embedding(items)
    assert q.shape == (6, sum(dims)) and x.shape == (9, sum(dims)) and q.dtype == np.float32
    mean = np.mean([a @ b.T for a, b in zip(queries, items, strict=True)], axis=0)
    np.testing.assert_allclose(q @ x.T, mean, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)  # still unit


def test_ensemble_embedding_of_one_model_is_that_model_unchanged():
    x = _unit(np.random.default_rng(0).standard_normal((5, 7)))
    out = ensemble_embedding([x])
    assert out.tobytes() == x.tobytes()


def test_ensemble_embedding_refuses_nothing_and_different_counts():
    with pytest.raises(ValueError, match="no embeddings"):
        ensemble_embedding([])
    with pytest.raises(ValueError, match="different counts"):
        ensemble_embedding([np.zeros((3, 4), np.float32), np.zeros((2, 4), np.float32)])


# --------------------------------------------------------------------------------------------
# the ensemble gallery
# --------------------------------------------------------------------------------------------


def test_ensemble_manifest_records_the_models_in_order(world):
    manifest = json.loads((world["ab"] / MANIFEST).read_text())
    a, b = world["models"]["a"], world["models"]["b"]
    assert "checkpoint" not in manifest
    assert [m["checkpoint"] for m in manifest["models"]] == [str(a["path"]), str(b["path"])]
    assert [m["model_id"] for m in manifest["models"]] == [a["id"], b["id"]]
    assert [m["dim"] for m in manifest["models"]] == list(DIMS)
    assert a["id"] != b["id"]
    assert manifest["dim"] == sum(DIMS)
    gal = Gallery.open(world["ab"])
    assert gal.model_ids == [a["id"], b["id"]]
    assert (gal.n_images, gal.n_captions) == (N_IMAGES, N_CAPTIONS)
    for embs in (gal.image_embs, gal.caption_embs):
        np.testing.assert_allclose(np.linalg.norm(embs, axis=1), 1.0, atol=1e-5)
    # a one-model gallery is as it always was: its checkpoint, no models list
    single = Gallery.open(world["single"])
    assert single.model_ids is None and "models" not in single.manifest
    assert single.manifest["checkpoint"] == str(a["path"])
    assert single.manifest["dim"] == DIMS[0]
    np.testing.assert_allclose(single.image_embs, a["images"], atol=1e-5)


def test_ensemble_gallery_scores_are_the_mean_of_the_models_scores(world, tmp_path):
    gal = Gallery.open(world["ab"])
    scores = np.asarray(gal.image_embs) @ np.asarray(gal.caption_embs).T
    np.testing.assert_allclose(scores, mean_sims(world, ("a", "b")), atol=1e-5)
    # ... and the matrix hrem-ray eval scores for the same two checkpoints
    a, b = world["models"]["a"]["path"], world["models"]["b"]["path"]
    evaluate_ensemble([a, b], world["data"], "f30k", "test", save_to=tmp_path / "sims.npy")
    np.testing.assert_allclose(scores, np.load(tmp_path / "sims.npy"), atol=1e-5)
    # the mean of the two one-model galleries' scores, built on their own
    ga = Gallery.open(world["single"])
    gb = Gallery.open(_index(tmp_path / "g_b", world["data"], b))
    single_mean = np.mean([np.asarray(g.image_embs) @ np.asarray(g.caption_embs).T
                           for g in (ga, gb)], axis=0)  # fmt: skip
    np.testing.assert_allclose(scores, single_mean, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_ensemble_search_ranks_by_the_mean_similarity(world, k):
    gal, sims = Gallery.open(world["ab"]), mean_sims(world, ("a", "b"))
    queries = ensemble_embedding([world["models"][n]["captions"] for n in ("a", "b")])
    ids, vals = gal.search_images(queries, k)  # text -> image, every caption a query
    want_ids, want_vals = naive_top_k(sims.T, min(k, N_IMAGES))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(vals, want_vals, atol=1e-5)
    queries = ensemble_embedding([world["models"][n]["images"] for n in ("a", "b")])
    ids, vals = gal.search_captions(queries, k)  # image -> text
    want_ids, want_vals = naive_top_k(sims, min(k, N_CAPTIONS))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(vals, want_vals, atol=1e-5)


@needs_faiss
def test_ensemble_gallery_with_ivf(world, tmp_path):
    """IVF over the concatenated vectors: with nprobe = nlist the answers are the exact
    ensemble's; with one list probed, k real ids and the recall the manifest measured."""
    a, b = world["models"]["a"]["path"], world["models"]["b"]["path"]
    full = Gallery.open(_index(tmp_path / "full", world["data"], a, b,
                               extra=("--ivf", "3", "--nprobe", "3")))  # fmt: skip
    probe1 = Gallery.open(_index(tmp_path / "p1", world["data"], a, b,
                                 extra=("--ivf", "3", "--nprobe", "1")))  # fmt: skip
    exact = Gallery.open(world["ab"])
    assert full.image_index is not None and full.model_ids == exact.model_ids
    assert full.manifest["index"]["recall"]["text_to_image"]["10"] == 1.0
    np.testing.assert_array_equal(full.image_embs, exact.image_embs)
    sims = mean_sims(world, ("a", "b"))
    captions = np.asarray(exact.caption_embs)
    images = np.asarray(exact.image_embs)
    for gal in (full, probe1):
        ids, vals = gal.search_images(captions, 5)
        assert ids.shape == (N_CAPTIONS, 5) and (ids >= 0).all()
        # every score is the mean similarity of that pair
        np.testing.assert_allclose(vals, np.take_along_axis(sims.T, ids, axis=1), atol=1e-5)
        ids, vals = gal.search_captions(images, 5)
        np.testing.assert_allclose(vals, np.take_along_axis(sims, ids, axis=1), atol=1e-5)
    for search in ("search_images", "search_captions"):
        queries = captions if search == "search_images" else images
        np.testing.assert_array_equal(getattr(full, search)(queries, 7)[0],
                                      getattr(exact, search)(queries, 7)[0])  # fmt: skip
    # image -> text over 50 captions in 3 lists: the recall the manifest measured at build
    recall = probe1.manifest["index"]["recall"]["image_to_text"]["10"]
    approx, _ = probe1.search_captions(images, 10)
    truth, _ = naive_top_k(sims, 10)
    measured = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(approx, truth, strict=True)])
    assert recall == pytest.approx(measured, abs=1e-6)


def test_gallery_with_inconsistent_models_is_a_gallery_error(world, tmp_path):
    g = Path(shutil.copytree(world["ab"], tmp_path / "g"))
    manifest = json.loads((g / MANIFEST).read_text())
    manifest["models"][1]["dim"] = 8  # 32 + 8 != 48
    (g / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(GalleryError, match="models of its manifest"):
        Gallery.open(g)
    manifest["models"] = manifest["models"][:1]
    manifest["models"][0]["dim"] = sum(DIMS)  # a list of one is no ensemble
    (g / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(GalleryError, match="models of its manifest"):
        Gallery.open(g)


def test_cli_index_checks_every_checkpoint_before_encoding(world, tmp_path, capsys, monkeypatch):
    def no_encoding(*_, **__):
        raise AssertionError("encoded before every checkpoint was checked")

    monkeypatch.setattr("hrem_ray.index.gallery.embed_split_each", no_encoding)
    out = tmp_path / "g"
    line = run_err(capsys, "index", "--checkpoint", str(world["models"]["a"]["path"]),
                   "--checkpoint", str(tmp_path / "nope"), "--data-path", str(world["data"]),
                   "--dataset", "f30k", "--out", str(out))  # fmt: skip
    assert "checkpoint not found" in line and "nope" in line
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# serving an ensemble gallery
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(world) -> RetrievalService:
    ms = world["models"]
    return RetrievalService([ms["a"]["path"], ms["b"]["path"]], world["ab"])


@pytest.fixture(scope="module")
def client(service):
    with TestClient(build_app(LocalBackend(service)), raise_server_exceptions=False) as c:
        yield c


def offline_text(world, names: tuple[str, ...], query: str) -> list[np.ndarray]:
    ms = [world["models"][n] for n in names]
    return [embed_captions(m["model"], m["tokenizer"], [query])[0] for m in ms]


def offline_image(world, names: tuple[str, ...], features: np.ndarray) -> list[np.ndarray]:
    return [embed_features(world["models"][n]["model"], features[None])[0] for n in names]


def expect_text_hits(world, names, query: str, k: int, results: list[dict]) -> None:
    """Images ranked by the mean over the models of cos(query, image), each model's own."""
    per_model = zip(names, offline_text(world, names, query), strict=True)
    scores = np.mean([world["models"][n]["images"] @ q for n, q in per_model], axis=0)
    ids, vals = naive_top_k(scores, k)
    assert [r["id"] for r in results] == ids.tolist()
    np.testing.assert_allclose([r["score"] for r in results], vals, atol=1e-5)
    for r in results:
        assert r["captions"] == world["texts"][5 * r["id"] : 5 * r["id"] + 5]


def expect_image_hits(world, names, per_model: list[np.ndarray], k: int, results) -> None:
    pairs = zip(names, per_model, strict=True)
    scores = np.mean([world["models"][n]["captions"] @ e for n, e in pairs], axis=0)
    ids, vals = naive_top_k(scores, k)
    assert [r["id"] for r in results] == ids.tolist()
    np.testing.assert_allclose([r["score"] for r in results], vals, atol=1e-5)
    for r in results:
        assert r["caption"] == world["texts"][r["id"]] and r["image_id"] == r["id"] // 5


@pytest.mark.parametrize(("query", "k"), [("a dog runs on the grass", 3), ("two men", 10)])
def test_served_text_search_equals_offline_ensemble(world, client, query, k):
    r = client.post("/search/text", json={"query": query, "k": k})
    assert r.status_code == 200, r.text
    expect_text_hits(world, ("a", "b"), query, k, r.json()["results"])


@pytest.mark.parametrize("image_id", [0, 7])
def test_served_image_search_equals_offline_ensemble(world, client, image_id):
    names = ("a", "b")
    per_model = [world["models"][n]["images"][image_id] for n in names]
    r = client.post("/search/image", json={"image_id": image_id, "k": 8})
    assert r.status_code == 200, r.text
    expect_image_hits(world, names, per_model, 8, r.json()["results"])
    feats = world["features"][image_id]
    r2 = client.post("/search/image", json={"features": feats.tolist(), "k": 8})
    assert r2.status_code == 200, r2.text
    expect_image_hits(world, names, offline_image(world, names, feats), 8, r2.json()["results"])
    assert [h["id"] for h in r2.json()["results"]] == [h["id"] for h in r.json()["results"]]


def test_served_search_by_new_features_and_the_embeddings(world, client):
    names = ("a", "b")
    feats = np.random.default_rng(3).standard_normal((4, IMG_DIM)).astype(np.float32)
    r = client.post("/search/image", json={"features": feats.tolist(), "k": 5})
    assert r.status_code == 200, r.text
    expect_image_hits(world, names, offline_image(world, names, feats), 5, r.json()["results"])
    r = client.post("/embed/image", json={"features": feats.tolist()})
    emb = np.array(r.json()["embedding"])
    np.testing.assert_allclose(emb, ensemble_embedding(offline_image(world, names, feats)),
                               atol=1e-5)  # fmt: skip
    emb = np.array(client.post("/embed/text", json={"query": "a cat"}).json()["embedding"])
    assert emb.shape == (sum(DIMS),)
    np.testing.assert_allclose(emb, ensemble_embedding(offline_text(world, names, "a cat")),
                               atol=1e-5)  # fmt: skip


def test_readyz_lists_the_models_in_order(world, client):
    body = client.get("/readyz").json()
    ms = world["models"]
    assert body["models"] == [{"model_id": ms["a"]["id"], "embed_dim": DIMS[0]},
                              {"model_id": ms["b"]["id"], "embed_dim": DIMS[1]}]  # fmt: skip
    assert body["embed_dim"] == sum(DIMS) and body["img_dim"] == IMG_DIM
    assert body["model_id"] not in (ms["a"]["id"], ms["b"]["id"]) and len(body["model_id"]) == 16
    assert (body["n_images"], body["n_captions"]) == (N_IMAGES, N_CAPTIONS)
    assert "/" not in json.dumps(body)  # no filesystem path or URI


def _paths(world, *names: str) -> list[Path]:
    return [world["models"][n]["path"] for n in names]


MISMATCHES = {
    "other order": (("b", "a"), "ab", "in another order: give them as"),
    "one of two": (("a",), "ab", "built with 2 checkpoints"),
    "three of two": (("a", "b", "c"), "ab", "built with 2 checkpoints"),
    "another model": (("a", "c"), "ab", "checkpoint 2"),
    "two for one": (("a", "b"), "single", "built with one checkpoint, not 2"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_models_that_are_not_the_gallerys_are_refused(world, case):
    names, gallery, message = MISMATCHES[case]
    with pytest.raises(ValueError, match=message) as exc:
        RetrievalService(_paths(world, *names), world[gallery])
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_cli_serve_mismatch_is_one_line_before_ray(world, capsys, monkeypatch, case):
    def no_ray(*_, **__):
        raise AssertionError("Ray started before the models were checked")

    monkeypatch.setattr("hrem_ray.ray_runtime.init_ray", no_ray)
    names, gallery, message = MISMATCHES[case]
    flags = [x for p in _paths(world, *names) for x in ("--checkpoint", str(p))]
    line = run_err(capsys, "serve", *flags, "--gallery", str(world[gallery]))
    assert message in line, line


def test_swap_to_another_ensemble(world):
    """An ensemble service swaps to another ensemble of the same shapes and answers with
    it; a pair in the wrong order is refused and the running one kept; a one-model gallery
    of other shapes cannot be swapped in."""
    svc = RetrievalService(_paths(world, "a", "b"), world["ab"])
    before = asyncio.run(svc.status()).body
    with pytest.raises(ValueError, match="another order"):
        svc.swap(_paths(world, "c", "a"), world["ac"])
    assert asyncio.run(svc.status()).body == before
    with pytest.raises(ValueError, match="new application"):
        svc.swap(_paths(world, "a"), world["single"])
    svc.swap([str(p) for p in _paths(world, "a", "c")], world["ac"])
    body = asyncio.run(svc.status()).body
    assert [m["model_id"] for m in body["models"]] == [world["models"][n]["id"] for n in "ac"]
    with TestClient(build_app(LocalBackend(svc)), raise_server_exceptions=False) as c:
        r = c.post("/search/text", json={"query": "a dog", "k": 4})
        assert r.status_code == 200, r.text
        expect_text_hits(world, ("a", "c"), "a dog", 4, r.json()["results"])
