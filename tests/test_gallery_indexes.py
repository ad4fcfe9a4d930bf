"""Every kind of gallery index (``hrem-ray index --index SPEC``) searched through the service.

The tiny model's 10 test images and their captions, tiled with noise into 300 images (OPQ
trains 256 centroids), are written as one gallery per index type; a RetrievalService over
each must return true cosines, exact search's answers where the index is lossless at the
knobs used, and show the spec, knobs and the recall measured at build time in its status.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hrem_ray.cli import main
from hrem_ray.index.faiss_index import (
    DEFAULT_REFINE,
    RECALL_QUERIES,
    IndexSpec,
    parse_spec,
    recall_sample,
)
from hrem_ray.index.gallery import Gallery, write_gallery
from hrem_ray.serving.service import RetrievalService
from hrem_ray.testing import tiny_data_and_checkpoint
from tests.helpers import run_err

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss-cpu not installed"
)
N_IMAGES = 300
# spec -> knobs at which it must answer exactly as exact search does (None: lossy codes)
SPECS = {
    "Flat": {},
    "IVF8,Flat": {"nprobe": 8},
    "IVF8,PQ8x4": None,
    "OPQ8,IVF8,PQ8x4": None,
    "HNSW8": {"efSearch": 400},
}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("indexes")
    data, ckpt = tiny_data_and_checkpoint(root, tiny_bert)
    main(["index", "--checkpoint", str(ckpt), "--data-path", str(data), "--dataset", "f30k",
          "--out", str(root / "seed")])  # fmt: skip
    seed = Gallery.open(root / "seed")
    rng = np.random.default_rng(0)
    reps = N_IMAGES // seed.n_images
    imgs = unit(np.tile(seed.image_embs, (reps, 1)) + 0.1 * rng.standard_normal(
        (N_IMAGES, seed.image_embs.shape[1])))  # fmt: skip
    caps = unit(
        np.repeat(imgs, 5, axis=0) + 0.1 * rng.standard_normal((5 * N_IMAGES, imgs.shape[1]))
    )
    texts = seed.captions * reps
    galleries = {}
    for spec in SPECS:
        out = root / spec.replace(",", "_")
        write_gallery(out, imgs, caps, texts, {"checkpoint": str(ckpt)}, index=spec)
        galleries[spec] = out
    return {"ckpt": ckpt, "data": data, "images": imgs, "captions": caps, "galleries": galleries,
            "texts": texts}  # fmt: skip


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_service_searches_every_index_type(world, spec):
    svc = RetrievalService(world["ckpt"], world["galleries"][spec])
    info = asyncio.run(svc.status()).body["index"]
    assert info["spec"] == spec
    if spec != "Flat":
        assert 0.0 < info["recall"]["text_to_image"]["10"] <= 1.0
        assert info["bytes_per_item"] > 0
    knobs = SPECS[spec]
    defaults = parse_spec(spec, N_IMAGES, world["images"].shape[1]).params(None, None)
    assert svc.gallery.search_params == defaults == info["params"]
    if knobs:
        assert svc.set_search_params(knobs) == knobs
    queries = svc.embed_texts(world["texts"][:10])
    want = queries @ world["images"].T
    for q, w in zip(queries, want, strict=True):
        hits = svc.images_for(q, 10)
        ids = [h.id for h in hits]
        assert len(set(ids)) == 10
        # scores are the true cosines, best first, whatever the index's codes
        np.testing.assert_allclose([h.score for h in hits], w[ids], atol=1e-5)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        if knobs is not None:
            assert ids == list(np.argsort(-w, kind="stable")[:10])


def test_status_shows_the_index_and_the_knobs_in_force(world):
    svc = RetrievalService(world["ckpt"], world["galleries"]["IVF8,Flat"])
    built = svc.gallery.manifest["index"]
    body = asyncio.run(svc.status()).body
    assert body["index"] == {**built, "params": {"nprobe": built["params"]["nprobe"]}}
    assert svc.set_search_params({"nprobe": 2}) == {"nprobe": 2}
    assert svc.gallery.image_index.index.nprobe == svc.gallery.caption_index.index.nprobe == 2
    body = asyncio.run(svc.status()).body
    assert body["index"]["params"] == {"nprobe": 2}
    assert body["index"]["recall"] == built["recall"]
    # a knob the index does not take is refused and the current ones stay (never a stop)
    assert svc.set_search_params({"efSearch": 10}) == {"nprobe": 2}
    assert svc.set_search_params({}) == built["params"]  # back to the gallery's own


def test_refine_rescores_the_best_pq_candidates(world, tmp_path):
    """A PQ index hands its ``refine`` best candidates to the exact rescoring: all of them
    (every list probed) is exact search's answer; k of them ranks by the codes alone."""
    import json

    svc = RetrievalService(world["ckpt"], world["galleries"]["IVF8,PQ8x4"])
    assert svc.gallery.search_params == {"nprobe": 8, "refine": DEFAULT_REFINE}
    queries = svc.embed_texts(world["texts"][:20])
    truth = np.argsort(-(queries @ world["images"].T), axis=1, kind="stable")[:, :10]
    overlap = {}
    for refine in (10, N_IMAGES):
        assert svc.set_search_params({"refine": refine}) == {"nprobe": 8, "refine": refine}
        ids = [[h.id for h in svc.images_for(q, 10)] for q in queries]
        overlap[refine] = np.mean([len(set(a) & set(t)) for a, t in zip(ids, truth, strict=True)])
    assert overlap[N_IMAGES] == 10 and overlap[10] < 10, overlap
    # a knob for another kind of index is refused, and the knobs in force stay
    flat = RetrievalService(world["ckpt"], world["galleries"]["IVF8,Flat"])
    assert flat.set_search_params({"refine": 50}) == {"nprobe": 8}
    # a PQ gallery written before --refine (no refine saved) opens with the default
    old = tmp_path / "old"
    shutil.copytree(world["galleries"]["IVF8,PQ8x4"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["index"]["params"]["refine"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert Gallery.open(old).search_params == {"nprobe": 8, "refine": DEFAULT_REFINE}


def test_manifest_recall_is_cross_modal(world, tmp_path):
    args = (world["images"], world["captions"], world["texts"], {})
    write_gallery(tmp_path / "p1", *args, index="IVF16,Flat", nprobe=1)
    write_gallery(tmp_path / "p16", *args, index="IVF16,Flat", nprobe=16)
    low, full = (Gallery.open(tmp_path / n).manifest["index"] for n in ("p1", "p16"))
    assert full["recall"]["text_to_image"] == {"1": 1.0, "5": 1.0, "10": 1.0}
    r = low["recall"]["text_to_image"]
    assert 0.0 < r["10"] < 1.0
    # recomputed here: the sampled captions query the image index (nprobe 1) against exact
    queries = world["captions"][recall_sample(len(world["captions"]))]
    assert len(queries) == RECALL_QUERIES
    approx, _ = Gallery.open(tmp_path / "p1").search_images(queries, 10)
    truth = np.argsort(-(queries @ world["images"].T), axis=1)[:, :10]
    for k in (1, 5, 10):
        hits = [len(set(a[:k]) & set(t[:k])) / k for a, t in zip(approx, truth, strict=True)]
        assert r[str(k)] == pytest.approx(float(np.mean(hits)), abs=1e-9)
    assert low["train_sample"] == {"images": N_IMAGES, "captions": 5 * N_IMAGES}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("IVF4096,Flat", "needs at least 4096 vectors to train on, the gallery has 300 images"),
        ("IVF8,PQ5", "PQ5 must divide the embedding size 32"),
        ("OPQ4,IVF8,PQ8", "OPQ4 must match PQ8"),
        ("IVF8,PQ8x9", "needs 1..16 bits and at least 512 vectors"),
        ("LSH", "--index must be one of Flat, IVF<nlist>,Flat"),
        ("HNSW0", "HNSW M must be a positive integer"),
    ],
)
def test_bad_specs_are_one_line_errors(world, tmp_path, spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as exc:
        write_gallery(tmp_path / "g", world["images"], world["captions"], world["texts"], {},
                      index=spec)  # fmt: skip
    assert "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_train_sample_size():
    spec = IndexSpec("IVF4096,PQ64", nlist=4096, pq_centroids=256)
    assert spec.train_size(1_000_000) == 39 * 4096
    assert spec.train_size(50_000) == 50_000
    assert IndexSpec("IVF8,Flat", nlist=8).train_size(1_000_000) == 10_000
    assert IndexSpec("IVF65536,Flat", nlist=65536).train_size(10**7) == 262_144
    assert IndexSpec("HNSW32", hnsw=32).train_size(10**6) == 0


def test_cli_index_spec_and_knob_errors(world, tmp_path, capsys):
    common = ["index", "--checkpoint", str(world["ckpt"]), "--data-path", str(world["data"]),
              "--dataset", "f30k", "--out", str(tmp_path / "g")]  # fmt: skip
    for flags, message in (
        (["--index", "HNSW4", "--nprobe", "4"], "--nprobe applies to IVF indexes, not HNSW4"),
        (["--index", "IVF2,Flat", "--ivf", "2"], "give --index or its short form --ivf"),
        (["--ef-search", "8"], "--ef-search applies to HNSW indexes, not Flat"),
        (["--index", "HNSW4", "--refine", "8"], "--refine applies to PQ indexes, not HNSW4"),
        (["--index", "IVF2,PQ8x2", "--refine", "0"], "--refine must be a positive integer"),
    ):
        line = run_err(capsys, *common, *flags)
        assert message in line, line
    assert not Path(tmp_path / "g").exists()
    main([*common, "--index", "HNSW4", "--ef-search", "32"])
    info = Gallery.open(tmp_path / "g").manifest["index"]
    assert (info["spec"], info["params"]) == ("HNSW4", {"efSearch": 32})
    assert "HNSW4 {'efSearch': 32}" in capsys.readouterr().out
