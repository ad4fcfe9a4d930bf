"""The retrieval gallery (``hrem-ray index``, ``Gallery``): files, embeddings, exact top-k.

Everything is checked against an independent computation: the offline ``hrem_ray.embed``
embeddings of the same split and a naive full ``argsort`` over all scores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hrem_ray.checkpoint import load_checkpoint
from hrem_ray.cli import main
from hrem_ray.data.precomp import open_split
from hrem_ray.embed import embed_captions, embed_features
from hrem_ray.index import gallery as gallery_mod
from hrem_ray.index.gallery import (
    CAPTION_EMBS,
    CAPTIONS,
    FORMAT,
    IMAGE_EMBS,
    MANIFEST,
    Gallery,
    GalleryError,
    build_gallery,
    top_k,
)
from hrem_ray.testing import tiny_data_and_checkpoint
from tests.helpers import run_err

N_IMAGES, N_CAPTIONS, DIM = 10, 50, 32


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert) -> dict[str, Path]:
    """Tiny f30k data, a fresh tiny checkpoint and its float32 + float16 test galleries."""
    root = tmp_path_factory.mktemp("gallery")
    data, ckpt = tiny_data_and_checkpoint(root, tiny_bert)
    common = ["--checkpoint", str(ckpt), "--data-path", str(data), "--dataset", "f30k"]
    main(["index", *common, "--split", "test", "--out", str(root / "g32")])
    main(["index", *common, "--split", "test", "--out", str(root / "g16"), "--dtype", "float16"])
    return {"root": root, "data": data, "ckpt": ckpt, "g32": root / "g32", "g16": root / "g16"}


@pytest.fixture(scope="module")
def offline(world) -> dict[str, np.ndarray]:
    """The split embedded by ``hrem_ray.embed`` (the path ``hrem-ray embed`` takes)."""
    ck = load_checkpoint(world["ckpt"])
    tok = ck.tokenizer()
    split = open_split(world["data"], "f30k", "test")
    feats = np.asarray(split.features[split.image_rows()])
    return {
        "images": embed_features(ck.model, feats, batch_size=3),
        "captions": embed_captions(ck.model, tok, split.captions, batch_size=7),
        "texts": split.captions,
    }


def naive_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, axis=-1)[..., :k]
    return order, np.take_along_axis(scores, order, axis=-1)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def test_gallery_files_and_manifest(world, offline):
    g = world["g32"]
    assert sorted(p.name for p in g.iterdir()) == sorted([MANIFEST, IMAGE_EMBS, CAPTION_EMBS,
                                                          CAPTIONS])  # fmt: skip
    manifest = json.loads((g / MANIFEST).read_text())
    assert manifest["format"] == FORMAT
    assert manifest["checkpoint"] == str(world["ckpt"].resolve())
    assert (manifest["dataset"], manifest["split"]) == ("f30k", "test")
    assert (manifest["n_images"], manifest["n_captions"]) == (N_IMAGES, N_CAPTIONS)
    assert (manifest["dim"], manifest["dtype"]) == (DIM, "float32")
    assert manifest["created"]
    assert np.load(g / IMAGE_EMBS).shape == (N_IMAGES, DIM)
    assert np.load(g / CAPTION_EMBS).shape == (N_CAPTIONS, DIM)
    table = pq.read_table(g / CAPTIONS).to_pydict()
    assert table["caption_id"] == list(range(N_CAPTIONS))
    assert table["image_id"] == [c // 5 for c in range(N_CAPTIONS)]
    assert table["text"] == offline["texts"]
    # nothing but the two galleries next to them: no temporary folder left behind
    assert sorted(p.name for p in world["root"].iterdir()) == ["ckpt", "data", "g16", "g32"]


def test_open_exposes_memory_mapped_embeddings(world, offline):
    gal = Gallery.open(world["g32"])
    assert isinstance(gal.image_embs, np.memmap) and isinstance(gal.caption_embs, np.memmap)
    assert (gal.n_images, gal.n_captions) == (N_IMAGES, N_CAPTIONS)
    assert gal.captions == offline["texts"]
    assert gal.captions_of(3) == offline["texts"][15:20]


def test_embeddings_equal_offline_embed(world, offline):
    gal = Gallery.open(world["g32"])
    assert gal.image_embs.dtype == np.float32
    np.testing.assert_allclose(gal.image_embs, offline["images"], atol=1e-5)
    np.testing.assert_allclose(gal.caption_embs, offline["captions"], atol=1e-5)
    for embs in (gal.image_embs, gal.caption_embs):
        np.testing.assert_allclose(np.linalg.norm(embs, axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# exact top-k
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(50,), (4, 50), (3, 1), (2, 3, 17)])
@pytest.mark.parametrize("k", [1, 2, 5, 17, 50, 1000])
def test_top_k_equals_naive_argsort(shape, k):
    rng = np.random.default_rng(hash((shape, k)) % 2**32)
    scores = rng.standard_normal(shape).astype(np.float32)  # continuous: no ties
    ids, vals = top_k(scores, k)
    want_ids, want_vals = naive_top_k(scores, k)
    assert ids.shape == vals.shape == (*shape[:-1], min(k, shape[-1]))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(vals, want_vals)


def test_top_k_with_ties_returns_the_right_values():
    scores = np.array([[0.5, 1.0, 0.5, 1.0, 0.0, 0.5]], np.float32)
    ids, vals = top_k(scores, 4)
    np.testing.assert_array_equal(vals, [[1.0, 1.0, 0.5, 0.5]])
    assert set(ids[0, :2]) == {1, 3} and set(ids[0, 2:]) <= {0, 2, 5}


@pytest.mark.parametrize("k", [0, -1, True, 2.5])
def test_top_k_refuses_a_bad_k(k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        top_k(np.zeros((1, 5), np.float32), k)


@pytest.mark.parametrize("k", [1, 3, 10, 50, 60])
def test_search_equals_offline_embed_and_naive_top_k(world, offline, k):
    gal = Gallery.open(world["g32"])
    caps, imgs = offline["captions"], offline["images"]
    ids, vals = gal.search_images(caps, k)  # text -> image, every caption a query
    want_ids, want_vals = naive_top_k(caps @ imgs.T, min(k, N_IMAGES))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(vals, want_vals, atol=1e-5)
    ids, vals = gal.search_captions(imgs, k)  # image -> text
    want_ids, want_vals = naive_top_k(imgs @ caps.T, min(k, N_CAPTIONS))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(vals, want_vals, atol=1e-5)


def test_float16_gallery_is_close_and_ranks_the_same(world, offline):
    g16, g32 = Gallery.open(world["g16"]), Gallery.open(world["g32"])
    assert g16.manifest["dtype"] == "float16"
    assert g16.image_embs.dtype == g16.caption_embs.dtype == np.float16
    np.testing.assert_allclose(g16.image_embs.astype(np.float32), g32.image_embs, atol=1e-3)
    np.testing.assert_allclose(g16.caption_embs.astype(np.float32), g32.caption_embs, atol=1e-3)
    for queries, search16, search32, targets in (
        (offline["captions"], g16.search_images, g32.search_images, g32.image_embs),
        (offline["images"], g16.search_captions, g32.search_captions, g32.caption_embs),
    ):
        ids16, vals16 = search16(queries, 5)
        ids32, vals32 = search32(queries, 5)
        assert vals16.dtype == np.float32
        np.testing.assert_allclose(vals16, vals32, atol=2e-3)
        full32 = queries @ np.asarray(targets).T
        for row, (a, b) in enumerate(zip(ids16[:, 0], ids32[:, 0], strict=True)):
            # the same best match, unless float32 itself puts the two within float16 noise
            assert a == b or abs(full32[row, a] - full32[row, b]) < 2e-3, (row, a, b)


def test_float16_scores_read_in_chunks(world, offline, monkeypatch):
    """A float16 gallery is converted a chunk at a time; chunking must not change results."""
    gal = Gallery.open(world["g16"])
    whole = gal.search_captions(offline["images"], 50)
    monkeypatch.setattr(gallery_mod, "SCORE_CHUNK", 7)
    chunked = gal.search_captions(offline["images"], 50)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_allclose(whole[1], chunked[1], atol=1e-6)  # matmul blocking: last ulp


# --------------------------------------------------------------------------------------------
# broken galleries, atomic writes
# --------------------------------------------------------------------------------------------


def _copy(world, tmp_path: Path) -> Path:
    return Path(shutil.copytree(world["g32"], tmp_path / "g"))


@pytest.mark.parametrize("missing", [MANIFEST, IMAGE_EMBS, CAPTION_EMBS, CAPTIONS])
def test_incomplete_gallery_is_a_gallery_error(world, tmp_path, missing):
    g = _copy(world, tmp_path)
    (g / missing).unlink()
    with pytest.raises(GalleryError, match=f"incomplete: missing {missing}"):
        Gallery.open(g)


def test_missing_folder_is_a_gallery_error(tmp_path):
    with pytest.raises(GalleryError, match="incomplete"):
        Gallery.open(tmp_path / "nope")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def _manifest(**changes):
    def edit(path: Path) -> None:
        manifest = json.loads(path.read_text())
        manifest.update(changes)
        path.write_text(json.dumps(manifest))

    return edit


BREAKAGES = {
    "manifest-not-json": (MANIFEST, lambda p: p.write_text("{oops"), "unreadable"),
    "manifest-not-utf8": (MANIFEST, lambda p: p.write_bytes(b"\xff\xfe{"), "unreadable"),
    "manifest-a-list": (MANIFEST, lambda p: p.write_text("[]"), "is not an"),
    "wrong-format": (MANIFEST, _manifest(format="other"), "is not an"),
    "wrong-n-images": (MANIFEST, _manifest(n_images=11), "disagree"),
    "wrong-n-captions": (MANIFEST, _manifest(n_captions=45), "disagree"),
    "wrong-dim": (MANIFEST, _manifest(dim=16), "disagree"),
    "wrong-dtype": (MANIFEST, _manifest(dtype="float16"), "disagree"),
    "truncated-images": (IMAGE_EMBS, _truncate, "unreadable"),
    "truncated-captions": (CAPTION_EMBS, _truncate, "unreadable"),
    "images-not-npy": (IMAGE_EMBS, lambda p: p.write_text("hello"), "unreadable"),
    "parquet-garbage": (CAPTIONS, lambda p: p.write_bytes(b"PAR1 nonsense"), "unreadable"),
    "fewer-captions": (
        CAPTION_EMBS,
        lambda p: np.save(p, np.load(p)[:45]),
        "disagree",
    ),
    "caption-dim": (
        CAPTION_EMBS,
        lambda p: np.save(p, np.load(p)[:, :16]),
        "disagree",
    ),
    "texts-short": (
        CAPTIONS,
        lambda p: pq.write_table(pq.read_table(p).slice(0, 49), p),
        "disagree",
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_inconsistent_gallery_is_a_gallery_error(world, tmp_path, case):
    name, breaks, message = BREAKAGES[case]
    g = _copy(world, tmp_path)
    breaks(g / name)
    with pytest.raises(GalleryError, match=message) as exc:
        Gallery.open(g)
    assert "\n" not in str(exc.value)


def test_a_failed_build_leaves_no_folder(world, tmp_path, monkeypatch):
    def boom(*_, **__):
        raise OSError("disk full")

    monkeypatch.setattr(gallery_mod.pq, "write_table", boom)
    out = tmp_path / "g"
    with pytest.raises(OSError, match="disk full"):
        build_gallery(world["ckpt"], world["data"], "f30k", "test", out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no hidden temporary folder either


def test_a_failed_rebuild_keeps_the_old_gallery(world, tmp_path, monkeypatch):
    out = _copy(world, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*_, **__):
        raise OSError("disk full")

    monkeypatch.setattr(gallery_mod.pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        build_gallery(world["ckpt"], world["data"], "f30k", "test", out, dtype="float16")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["g"]
    monkeypatch.undo()
    build_gallery(world["ckpt"], world["data"], "f30k", "test", out, dtype="float16")
    assert Gallery.open(out).manifest["dtype"] == "float16"  # a good rebuild replaces it
    assert [p.name for p in tmp_path.iterdir()] == ["g"]


# --------------------------------------------------------------------------------------------
# hrem-ray index: user errors
# --------------------------------------------------------------------------------------------


INDEX_ERRORS = {
    "no-checkpoint": ({"--checkpoint": "{root}/nope"}, "checkpoint not found"),
    "not-a-checkpoint": ({"--checkpoint": "{root}/data"}, "incomplete"),
    "no-data": ({"--data-path": "{root}/nope"}, "not found"),
    "unknown-dataset": ({"--dataset": "zzz"}, "not found"),
    "unknown-split": ({"--split": "nope"}, "not found"),
    "batch-size-0": ({"--batch-size": "0"}, "batch size must be a positive integer"),
    "batch-size-neg": ({"--batch-size": "-3"}, "batch size must be a positive integer"),
    "out-under-a-file": ({"--out": "{root}/g32/manifest.json/g"}, "exists"),
}


@pytest.mark.parametrize("case", sorted(INDEX_ERRORS))
def test_cli_index_bad_arguments_are_one_line_errors(world, tmp_path, capsys, case):
    changes, message = INDEX_ERRORS[case]
    args = {
        "--checkpoint": str(world["ckpt"]),
        "--data-path": str(world["data"]),
        "--dataset": "f30k",
        "--split": "test",
        "--out": str(tmp_path / "g"),
    }
    args.update({k: v.format(root=world["root"]) for k, v in changes.items()})
    line = run_err(capsys, "index", *[x for kv in args.items() for x in kv])
    assert message in line, line
    assert not Path(args["--out"]).exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_index_reports_what_it_wrote(world, tmp_path, capsys):
    out = tmp_path / "g"
    main(["index", "--checkpoint", str(world["ckpt"]), "--data-path", str(world["data"]),
          "--dataset", "f30k", "--out", str(out), "--batch-size", "4"])  # fmt: skip
    stdout = capsys.readouterr().out
    assert stdout.strip().splitlines()[-1] == f"wrote {out}"
    np.testing.assert_allclose(Gallery.open(out).image_embs, Gallery.open(world["g32"]).image_embs,
                               atol=1e-5)  # fmt: skip
