"""FAISS IVF-Flat indexes in a gallery (``hrem-ray index --ivf``, short for ``--index IVFN,Flat``).

Checked against exact search computed here with a naive full ``argsort``: with nprobe = nlist
the IVF answers must be the exact ones; with a small nprobe the recall@10 the manifest reports
must be the one recomputed here from raw faiss searches.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hrem_ray.cli import main
from hrem_ray.index.faiss_index import RECALL_QUERIES
from hrem_ray.index.gallery import (
    CAPTION_INDEX,
    IMAGE_INDEX,
    MANIFEST,
    Gallery,
    GalleryError,
    write_gallery,
)
from hrem_ray.serving.service import RetrievalService
from hrem_ray.testing import tiny_data_and_checkpoint
from tests.helpers import run_err

needs_faiss = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss-cpu not installed"
)
N_IMAGES, DIM, NLIST = 200, 32, 8  # 1,000 captions: every caption is a recall query


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def naive_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, axis=-1)[..., :k]
    return order, np.take_along_axis(scores, order, axis=-1)


@pytest.fixture(scope="module")
def embs() -> dict[str, Any]:
    """Clustered unit vectors (the shape of real embeddings): 5 noisy captions per image."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((12, DIM))
    imgs = unit(centres[rng.integers(0, 12, N_IMAGES)] + 0.5 * rng.standard_normal((N_IMAGES, DIM)))
    caps = unit(np.repeat(imgs, 5, axis=0) + 0.3 * rng.standard_normal((5 * N_IMAGES, DIM)))
    assert len(caps) <= RECALL_QUERIES
    return {"images": imgs, "captions": caps, "texts": [f"caption {i}" for i in range(len(caps))]}


def make(out: Path, embs: dict[str, Any], **kw: Any) -> Gallery:
    """``ivf=N`` is short for ``index="IVFN,Flat"``, as ``--ivf`` on the command line."""
    if "ivf" in kw:
        kw["index"] = f"IVF{kw.pop('ivf')},Flat"
    write_gallery(out, embs["images"], embs["captions"], embs["texts"], {}, **kw)
    return Gallery.open(out)


@pytest.fixture(scope="module")
def galleries(embs, tmp_path_factory) -> dict[str, Gallery]:
    root = tmp_path_factory.mktemp("ivf")
    if importlib.util.find_spec("faiss") is None:
        return {"exact": make(root / "exact", embs)}
    return {
        "exact": make(root / "exact", embs),
        "full": make(root / "full", embs, ivf=NLIST, nprobe=NLIST),
        "probe1": make(root / "probe1", embs, ivf=NLIST, nprobe=1),
    }


# --------------------------------------------------------------------------------------------
# files, manifest, measured recall
# --------------------------------------------------------------------------------------------


@needs_faiss
def test_ivf_files_and_manifest(galleries):
    full = galleries["full"]
    assert {IMAGE_INDEX, CAPTION_INDEX} <= {p.name for p in full.path.iterdir()}
    info = json.loads((full.path / MANIFEST).read_text())["index"]
    every = {"1": 1.0, "5": 1.0, "10": 1.0}
    size = sum((full.path / name).stat().st_size for name in (IMAGE_INDEX, CAPTION_INDEX))
    assert info == {"spec": f"IVF{NLIST},Flat", "params": {"nprobe": NLIST},
                    "train_sample": {"images": N_IMAGES, "captions": 5 * N_IMAGES},
                    "bytes_per_item": round(size / (6 * N_IMAGES), 1),
                    "recall": {"text_to_image": every, "image_to_text": every}}  # fmt: skip
    assert info["bytes_per_item"] > 4 * DIM  # float32 vectors and their ids
    assert full.image_index is not None and full.caption_index is not None
    assert (full.image_index.index.ntotal, full.caption_index.index.ntotal) == (
        N_IMAGES, 5 * N_IMAGES)  # fmt: skip


def test_gallery_without_ivf_is_exact(galleries, embs):
    exact = galleries["exact"]
    assert exact.manifest["index"] == {"spec": "Flat", "params": {}, "bytes_per_item": 4 * DIM,
                                       "train_sample": {"images": 0, "captions": 0}}  # fmt: skip
    assert exact.image_index is None and exact.caption_index is None
    assert not {IMAGE_INDEX, CAPTION_INDEX} & {p.name for p in exact.path.iterdir()}
    ids, vals = exact.search_images(embs["captions"], 10)
    want_ids, want_vals = naive_top_k(embs["captions"] @ embs["images"].T, 10)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(vals, want_vals, atol=1e-5)


@needs_faiss
@pytest.mark.parametrize("k", [1, 10, 57, N_IMAGES, 5000])
def test_nprobe_equal_nlist_is_exact_search(galleries, embs, k):
    full = galleries["full"]
    imgs, caps = embs["images"], embs["captions"]
    for search, queries, targets in (
        (full.search_images, caps, imgs),
        (full.search_captions, imgs, caps),
    ):
        ids, vals = search(queries, k)
        full_scores = queries @ targets.T
        want_ids, want_vals = naive_top_k(full_scores, min(k, len(targets)))
        np.testing.assert_allclose(vals, want_vals, atol=1e-5)
        np.testing.assert_allclose(np.take_along_axis(full_scores, ids, -1), want_vals, atol=1e-5)
        if k <= 100:  # deeper down, float32 near-ties (< 1e-6 apart) may swap places
            np.testing.assert_array_equal(ids, want_ids)
    ids, vals = full.search_images(caps[7], k)  # one query, no batch axis: same as exact
    assert ids.shape == vals.shape == (min(k, N_IMAGES),)


@needs_faiss
def test_manifest_recall_equals_a_recomputation_from_raw_faiss(galleries, embs):
    import faiss

    gal = galleries["probe1"]
    info = gal.manifest["index"]
    assert (info["spec"], info["params"]) == (f"IVF{NLIST},Flat", {"nprobe": 1})
    for name, queries, targets, key in (
        (IMAGE_INDEX, embs["captions"], embs["images"], "text_to_image"),
        (CAPTION_INDEX, embs["images"], embs["captions"], "image_to_text"),
    ):
        index = faiss.read_index(str(gal.path / name))
        index.nprobe = 1
        _, approx = index.search(queries, 10)
        exact, _ = naive_top_k(queries @ targets.T, 10)
        # a query whose one probed list holds < 10 vectors is answered exactly (recall 1)
        short = (approx < 0).any(axis=1)
        per_query = [1.0 if s else len(set(a) & set(e)) / 10
                     for a, e, s in zip(approx, exact, short, strict=True)]  # fmt: skip
        recall = float(np.mean(per_query))
        assert 0.3 < recall < 1.0, recall  # a real approximation, not a degenerate one
        assert info["recall"][key]["10"] == pytest.approx(recall, abs=1e-12)
        served, _ = (gal.search_images if name == IMAGE_INDEX else gal.search_captions)(queries, 10)
        np.testing.assert_array_equal(served[~short], approx[~short])
        np.testing.assert_array_equal(served[short], exact[short])


@needs_faiss
def test_queries_whose_probed_lists_are_short_are_answered_exactly(embs, tmp_path):
    gal = make(tmp_path / "g", embs, ivf=40, nprobe=1)  # lists of ~5 images: often < k
    caps, imgs = embs["captions"], embs["images"]
    raw, _ = gal.image_index.search(caps, 10)
    short = (raw < 0).any(axis=1)
    assert 0 < short.sum() < len(short), short.sum()
    ids, vals = gal.search_images(caps, 10)
    want_ids, want_vals = naive_top_k(caps @ imgs.T, 10)
    assert (ids >= 0).all()
    np.testing.assert_array_equal(ids[short], want_ids[short])
    np.testing.assert_allclose(vals[short], want_vals[short], atol=1e-5)
    np.testing.assert_array_equal(ids[~short], raw[~short])


@needs_faiss
def test_nprobe_is_capped_at_nlist(embs, tmp_path):
    gal = make(tmp_path / "g", embs, ivf=4, nprobe=100)
    assert gal.manifest["index"]["params"] == {"nprobe": 4}
    assert gal.image_index.params == gal.caption_index.params == {"nprobe": 4}
    assert gal.image_index.index.nprobe == gal.caption_index.index.nprobe == 4


@needs_faiss
def test_float16_gallery_ivf_matches_its_exact_search(embs, tmp_path):
    ivf = make(tmp_path / "ivf", embs, dtype="float16", ivf=NLIST, nprobe=NLIST)
    exact = make(tmp_path / "exact", embs, dtype="float16")
    for a, b in ((ivf.search_images, exact.search_images),
                 (ivf.search_captions, exact.search_captions)):  # fmt: skip
        queries = embs["captions"] if a == ivf.search_images else embs["images"]
        (ids_a, vals_a), (ids_b, vals_b) = a(queries, 10), b(queries, 10)
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_allclose(vals_a, vals_b, atol=1e-5)


# --------------------------------------------------------------------------------------------
# user errors
# --------------------------------------------------------------------------------------------


@needs_faiss
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"ivf": N_IMAGES + 1}, f"needs at least {N_IMAGES + 1} vectors"),
        ({"ivf": -1}, "--index must be one of Flat, IVF"),
        ({"ivf": 4, "nprobe": 0}, "--nprobe must be a positive integer"),
    ],
)
def test_bad_ivf_settings_are_refused(embs, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path / "g", embs, **kw)
    assert list(tmp_path.iterdir()) == []


def test_ivf_without_faiss_is_a_clear_error(embs, galleries, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'hrem-ray\[faiss\]'") as exc:
        make(tmp_path / "g", embs, ivf=4)
    assert "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []
    Gallery.open(galleries["exact"].path)  # an exact-only gallery never needs faiss
    if "full" in galleries:
        with pytest.raises(GalleryError, match=r"hrem-ray\[faiss\]"):
            Gallery.open(galleries["full"].path)


def _manifest_index(**changes):
    def edit(g: Path) -> None:
        manifest = json.loads((g / MANIFEST).read_text())
        manifest["index"].update(changes)
        (g / MANIFEST).write_text(json.dumps(manifest))

    return edit


def _old_style(g: Path) -> None:  # the manifest of hrem-ray before --index
    manifest = json.loads((g / MANIFEST).read_text())
    manifest["ivf"] = {"nlist": NLIST, "nprobe": 1}
    del manifest["index"]
    (g / MANIFEST).write_text(json.dumps(manifest))


def _swap(g: Path) -> None:
    (g / IMAGE_INDEX).rename(g / "tmp")
    (g / CAPTION_INDEX).rename(g / IMAGE_INDEX)
    (g / "tmp").rename(g / CAPTION_INDEX)


IVF_BREAKAGES = {
    "missing-image-ivf": (lambda g: (g / IMAGE_INDEX).unlink(), f"missing {IMAGE_INDEX}"),
    "missing-caption-ivf": (lambda g: (g / CAPTION_INDEX).unlink(), f"missing {CAPTION_INDEX}"),
    "garbage": (lambda g: (g / IMAGE_INDEX).write_text("hello"), "unusable FAISS index"),
    "truncated": (
        lambda g: (g / CAPTION_INDEX).write_bytes((g / CAPTION_INDEX).read_bytes()[:-400]),
        "unusable FAISS index",
    ),
    "swapped": (_swap, "disagree"),
    "wrong-nlist": (_manifest_index(spec=f"IVF{NLIST // 2},Flat"), "disagree"),
    "nprobe-zero": (_manifest_index(params={"nprobe": 0}), "unusable FAISS index"),
    "no-nprobe": (_manifest_index(params={}), "unusable FAISS index"),
    "foreign-spec": (_manifest_index(spec="IVF8,Bogus"), "unusable FAISS index"),
    "old-style-ivf": (_old_style, "old-style IVF index: rebuild it"),
}


@needs_faiss
@pytest.mark.parametrize("case", sorted(IVF_BREAKAGES))
def test_broken_ivf_is_a_gallery_error(galleries, tmp_path, case):
    breaks, message = IVF_BREAKAGES[case]
    g = Path(shutil.copytree(galleries["probe1"].path, tmp_path / "g"))
    breaks(g)
    with pytest.raises(GalleryError, match=message) as exc:
        Gallery.open(g)
    assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------------------------
# hrem-ray index --ivf, and the serving path
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert) -> dict[str, Any]:
    """Tiny f30k data (10 test images), a fresh tiny checkpoint, an exact gallery."""
    root = tmp_path_factory.mktemp("ivf_world")
    data, ckpt = tiny_data_and_checkpoint(root, tiny_bert)
    common = ["--checkpoint", str(ckpt), "--data-path", str(data), "--dataset", "f30k"]
    main(["index", *common, "--out", str(root / "exact")])
    return {"ckpt": ckpt, "common": common, "exact": root / "exact", "root": root}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ivf", "11"], "needs at least 11 vectors to train on, the gallery has 10 images"),
        (["--ivf", "-2"], "--ivf (nlist; 0 = exact search only) must be a positive integer"),
        (["--ivf", "4", "--nprobe", "0"], "--nprobe must be a positive integer"),
    ],
)
def test_cli_index_bad_ivf_flags_are_one_line_errors(world, tmp_path, capsys, flags, message):
    out = tmp_path / "g"
    line = run_err(capsys, "index", *world["common"], "--out", str(out), *flags)
    assert message in line, line
    assert "gallery images" not in capsys.readouterr().out  # refused before any encoding
    assert not out.exists()


def test_cli_index_ivf_without_faiss(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    line = run_err(capsys, "index", *world["common"], "--out", str(tmp_path / "g"), "--ivf", "4")
    assert line.endswith("pip install 'hrem-ray[faiss]'"), line
    assert list(tmp_path.iterdir()) == []


@needs_faiss
def test_service_through_an_ivf_gallery_equals_exact(world, capsys):
    out = world["root"] / "ivf"
    main(["index", *world["common"], "--out", str(out), "--ivf", "4", "--nprobe", "4"])
    stdout = capsys.readouterr().out
    assert (
        "recall@1/5/10 vs exact search 1.000/1.000/1.000 text_to_image, 1.000/1.000/1.000" in stdout
    )
    ivf_svc = RetrievalService(world["ckpt"], out)
    exact_svc = RetrievalService(world["ckpt"], world["exact"])
    assert ivf_svc.gallery.image_index is not None and exact_svc.gallery.image_index is None
    texts = exact_svc.gallery.captions[::7]
    for a, b in zip(ivf_svc.embed_texts(texts), exact_svc.embed_texts(texts), strict=True):
        got, want = ivf_svc.images_for(a, 10), exact_svc.images_for(b, 10)
        assert [(h.id, h.captions) for h in got] == [(h.id, h.captions) for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    for image_id in range(10):
        got = ivf_svc.captions_for(ivf_svc.gallery_image(image_id), 20)
        want = exact_svc.captions_for(exact_svc.gallery_image(image_id), 20)
        assert [(h.id, h.caption, h.image_id) for h in got] == [
            (h.id, h.caption, h.image_id) for h in want
        ]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
