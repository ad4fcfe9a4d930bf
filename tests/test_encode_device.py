"""``--device`` and ``--bf16`` of eval, index, embed and the service, and the two device paths
of evaluation and serving: ranking a similarity matrix as a tensor, and exact gallery search
in torch. Each is checked on the CPU against an independent computation; the CUDA runs of
the same paths are ``-m gpu`` (tests/test_gpu.py, tests/test_serve_device.py).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from hrem_ray.cli import main
from hrem_ray.devices import check_device
from hrem_ray.eval import metrics
from hrem_ray.eval.metrics import CAPTIONS_PER_IMAGE, evaluate_fold5, evaluate_sims
from hrem_ray.index.gallery import Gallery, device_search, top_k, write_gallery
from hrem_ray.testing import tiny_data_and_checkpoint
from tests.helpers import run_err

needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="no faiss")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert):
    return tiny_data_and_checkpoint(tmp_path_factory.mktemp("device"), tiny_bert)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# a device this machine lacks: one line, before any work
# --------------------------------------------------------------------------------------------


def _argv(command: str, data, ckpt, tmp_path) -> list[str]:
    """A command whose checkpoint does not exist: a device error must come before it."""
    missing = str(tmp_path / "no-checkpoint")
    split = ["--data-path", str(data), "--dataset", "f30k", "--split", "test"]
    embed = ["--captions", str(tmp_path / "c.txt"), "--out", str(tmp_path / "e.npy")]
    return {
        "eval": ["eval", "--checkpoint", missing, *split],
        "index": ["index", "--checkpoint", missing, *split, "--out", str(tmp_path / "g")],
        "embed": ["embed", "--checkpoint", missing, *embed],
    }[command]


@pytest.mark.parametrize("command", ["eval", "index", "embed"])
def test_cuda_without_cuda_is_one_line_before_any_work(world, tmp_path, capsys, command,
                                                       monkeypatch):  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = run_err(capsys, *_argv(command, *world, tmp_path), "--device", "cuda")
    assert line.startswith(f"hrem-ray {command}: error: device 'cuda': CUDA is not available")
    assert not (tmp_path / "g").exists() and not (tmp_path / "e.npy").exists()


@pytest.mark.parametrize("command", ["eval", "index", "embed"])
def test_a_gpu_out_of_range_is_one_line(world, tmp_path, capsys, command, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    line = run_err(capsys, *_argv(command, *world, tmp_path), "--device", "cuda:7")
    assert line == (f"hrem-ray {command}: error: device 'cuda:7': this machine shows 2 CUDA "
                    "device(s), cuda:0 to cuda:1")  # fmt: skip


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "meta", ""])
def test_a_device_that_is_no_device_is_refused(device):
    with pytest.raises(ValueError, match="give cpu, cuda or cuda:N"):
        check_device(device)


def test_the_service_checks_its_device(world, monkeypatch):
    from hrem_ray.serving.service import RetrievalService

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        RetrievalService(world[1], "no-gallery", device="cuda")


def test_train_local_checks_its_device(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = run_err(capsys, "train", "--local", "--device", "cuda:1", "--no-tracking",
                   "--storage-path", str(tmp_path))  # fmt: skip
    assert "device 'cuda:1': CUDA is not available" in line
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# ranking a tensor on its device: the numpy ranks and an argsort recomputation, exactly
# --------------------------------------------------------------------------------------------


def lifted_sims(n_images: int, seed: int = 0) -> np.ndarray:
    """Random scores with each image's own captions lifted: ranks from 0 to large."""
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((n_images, CAPTIONS_PER_IMAGE * n_images)).astype(np.float32)
    own = np.repeat(np.arange(n_images), CAPTIONS_PER_IMAGE)
    sims[own, np.arange(len(own))] += 2.5 * rng.random(len(own)).astype(np.float32)
    return sims


def argsort_ranks(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-query loop of VSE-family code: positions in descending argsort."""
    i2t = [min(np.flatnonzero(np.argsort(-row, kind="stable") // CAPTIONS_PER_IMAGE == i))
           for i, row in enumerate(sims)]  # fmt: skip
    t2i = [int(np.flatnonzero(np.argsort(-col, kind="stable") == c // CAPTIONS_PER_IMAGE)[0])
           for c, col in enumerate(sims.T)]  # fmt: skip
    return np.array(i2t), np.array(t2i)


@pytest.mark.parametrize("chunk", [metrics.DEVICE_CHUNK_ELEMENTS, 7 * 200])  # 1 chunk, 29
def test_tensor_ranks_equal_numpy_and_argsort(monkeypatch, chunk):
    sims = lifted_sims(40)
    monkeypatch.setattr(metrics, "DEVICE_CHUNK_ELEMENTS", chunk)
    got = metrics._ranks(torch.from_numpy(sims))
    want = argsort_ranks(sims)
    for g, n, w in zip(got, metrics._ranks(sims), want, strict=True):
        assert np.array_equal(g, n) and np.array_equal(g, w)


def test_tensor_metrics_and_fold5_equal_numpy():
    sims = lifted_sims(50, seed=1)
    assert evaluate_sims(torch.from_numpy(sims)) == evaluate_sims(sims)
    assert evaluate_fold5(torch.from_numpy(sims)) == evaluate_fold5(sims)


def test_tensor_with_nan_is_refused():
    sims = lifted_sims(5)
    sims[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        evaluate_sims(torch.from_numpy(sims))


def test_placed_matrix_is_numpy_on_the_cpu():
    """The CPU keeps the cache-chunked numpy path; another device gets a tensor (-m gpu)."""
    sims = lifted_sims(3)
    assert isinstance(metrics.placed(sims, "cpu"), np.ndarray)
    assert isinstance(metrics.similarity(sims[:, :4], sims[:, :4], "cpu"), np.ndarray)


# --------------------------------------------------------------------------------------------
# exact gallery search in torch: faiss's exact index and numpy's top-k
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    imgs = unit(rng.standard_normal((60, 16)))
    caps = unit(np.repeat(imgs, 5, axis=0) + 0.4 * rng.standard_normal((300, 16)))
    return {"images": imgs, "captions": caps, "queries": unit(rng.standard_normal((9, 16)))}


@needs_faiss
@pytest.mark.parametrize("k", [1, 10, 60, 500])
def test_torch_exact_search_equals_faiss_flat(embs, k):
    import faiss

    for gallery in (embs["images"], embs["captions"]):
        index = faiss.IndexFlatIP(gallery.shape[1])
        index.add(gallery)
        want_scores, want_ids = index.search(embs["queries"], min(k, len(gallery)))
        ids, scores = device_search(embs["queries"], torch.from_numpy(gallery), k)
        assert np.array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gallery_searched_in_torch_equals_its_numpy_search(embs, tmp_path, dtype, monkeypatch):
    monkeypatch.setattr("hrem_ray.index.gallery.SCORE_CHUNK", 7)  # copied in chunks
    texts = [f"caption {i}" for i in range(len(embs["captions"]))]
    write_gallery(tmp_path / "g", embs["images"], embs["captions"], texts, {}, dtype=dtype)
    numpy_side, torch_side = Gallery.open(tmp_path / "g"), Gallery.open(tmp_path / "g")
    assert torch_side.search_on("cpu") == torch.device("cpu")
    assert torch_side.device_embs is not None
    stored = np.asarray(numpy_side.image_embs, np.float32)
    assert torch.equal(torch_side.device_embs[0], torch.from_numpy(np.array(stored)))
    q = embs["queries"]
    for search in ("search_images", "search_captions"):
        ids, scores = getattr(torch_side, search)(q, 10)
        want_ids, want_scores = getattr(numpy_side, search)(q, 10)
        assert np.array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)
    gallery = np.asarray(numpy_side.caption_embs, np.float32)
    assert np.array_equal(torch_side.search_captions(q[:2], 5)[0], top_k(q[:2] @ gallery.T, 5)[0])


@needs_faiss
def test_an_ivf_gallery_stays_on_faiss_cpu(embs, tmp_path):
    texts = [f"caption {i}" for i in range(len(embs["captions"]))]
    write_gallery(tmp_path / "g", embs["images"], embs["captions"], texts, {}, index="IVF4,Flat")
    gallery = Gallery.open(tmp_path / "g")
    assert gallery.search_on("cpu") == torch.device("cpu")
    assert gallery.device_embs is None and gallery.image_index is not None


# --------------------------------------------------------------------------------------------
# bf16: autocast of the towers, the same in every command
# --------------------------------------------------------------------------------------------


def test_bf16_embed_is_autocast_of_the_float32_weights(world, tmp_path):
    data, ckpt = world
    captions = tmp_path / "c.txt"
    captions.write_text("a dog runs\ntwo people on a bench\nx\n")
    out = {}
    for name, flags in (("fp32", []), ("bf16", ["--bf16"])):
        out[name] = tmp_path / f"{name}.npy"
        main(["embed", "--checkpoint", str(ckpt), "--captions", str(captions),
              "--out", str(out[name]), *flags])  # fmt: skip
    fp32, bf16 = np.load(out["fp32"]), np.load(out["bf16"])
    assert bf16.dtype == np.float32 and not np.array_equal(fp32, bf16)
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1, atol=1e-2)
    np.testing.assert_allclose(bf16, fp32, atol=BF16_EMBED_ABS)


def test_bf16_is_autocast_not_a_cast_of_the_module(world):
    from hrem_ray.checkpoint import load_checkpoint
    from hrem_ray.data.batches import caption_batches
    from hrem_ray.embed import embed_captions

    ck = load_checkpoint(world[1])
    captions = ["a dog runs", "two people on a bench", "x"]
    got = embed_captions(ck.model, ck.tokenizer(), captions, bf16=True)
    assert {p.dtype for p in ck.model.parameters()} == {torch.float32}
    ((_, tokens, lengths),) = caption_batches(captions, ck.tokenizer(), 3)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        want = ck.model.embed_texts(tokens, lengths).float().numpy()
    assert np.array_equal(got, want)


def test_eval_and_index_bf16_are_the_bf16_embeddings(world, tmp_path):
    """``eval --bf16`` scores, and ``index --bf16`` stores, what ``embed_split`` makes under
    bf16 autocast: the one encoding path, whichever command."""
    import json

    from hrem_ray.checkpoint import load_checkpoint
    from hrem_ray.data.source import open_precomp
    from hrem_ray.embed import embed_split

    data, ckpt = world
    split = ["--data-path", str(data), "--dataset", "f30k", "--split", "test"]
    main(["eval", "--checkpoint", str(ckpt), *split, "--bf16", "--json", str(tmp_path / "m")])
    main(["index", "--checkpoint", str(ckpt), *split, "--bf16", "--out", str(tmp_path / "g")])
    ck = load_checkpoint(ckpt)
    imgs, caps = embed_split(ck.model, open_precomp(data, "f30k", "test"), ck.tokenizer(),
                             bf16=True)  # fmt: skip
    assert json.loads((tmp_path / "m").read_text()) == evaluate_sims(imgs @ caps.T)
    gallery = Gallery.open(tmp_path / "g")
    assert np.array_equal(gallery.image_embs, imgs)
    assert np.array_equal(gallery.caption_embs, caps)


# --------------------------------------------------------------------------------------------
# bf16 recall drift against float32 on the synthetic gallery (docs/serving.md, "bf16")
# --------------------------------------------------------------------------------------------


def at_risk(sims: np.ndarray, eps: float, k: int) -> tuple[float, float]:
    """The fractions of i2t and t2i queries whose R@K *can* change when every score moves by
    at most ``eps``: those whose rank could land on either side of ``k``. A competitor more
    than 2 eps above the score it must beat (the best own caption's; the own image's) still
    beats it, one less than 2 eps below it still does not; the rest may go either way."""
    n_images, n_captions = sims.shape
    images, cols = np.arange(n_images), np.arange(n_captions)
    own = cols // CAPTIONS_PER_IMAGE
    best_own = sims.reshape(n_images, n_images, CAPTIONS_PER_IMAGE)[images, images].max(1)
    i2t = sims - best_own[:, None]
    t2i = sims - sims[own, cols][None, :]
    fractions = []
    for gap, axis in ((i2t, 1), (t2i, 0)):
        gap[own, cols] = -np.inf  # a query's own items never count in its rank
        surely, maybe = (gap > 2 * eps).sum(axis), (gap >= -2 * eps).sum(axis)
        fractions.append(float(((surely < k) & (k <= maybe)).mean()))
    return fractions[0], fractions[1]


def bf16_drift(ckpt, data, split: str = "test") -> dict:
    """float32 and bf16 embeddings and metrics of a split: the figures the test bounds."""
    from hrem_ray.checkpoint import load_checkpoint
    from hrem_ray.data.source import open_precomp
    from hrem_ray.embed import embed_split

    ck, data = load_checkpoint(ckpt), open_precomp(data, "f30k", split)
    embs = {b: embed_split(ck.model, data, ck.tokenizer(), bf16=b) for b in (False, True)}
    sims = {b: embs[b][0] @ embs[b][1].T for b in embs}
    diff = [np.abs(embs[True][i] - embs[False][i]) for i in (0, 1)]
    return {
        "embs": embs,
        "sims": sims,
        "max_abs": float(max(d.max() for d in diff)),
        "max_l2": [float(np.linalg.norm(d, axis=1).max()) for d in diff],  # images, captions
        "metrics": {b: evaluate_sims(sims[b]) for b in sims},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert):
    """The learnability test's model, trained 3 epochs (recall far above chance), and a
    synthetic gallery of 200 images to encode."""
    from hrem_ray.synth import write_synthetic
    from hrem_ray.train.local import train_local
    from tests.test_learning import config

    root = tmp_path_factory.mktemp("bf16")
    write_synthetic(root / "data", train_images=300, dev_images=20, test_images=200,
                    regions=12, dim=64, seed=0, progress=None)  # fmt: skip
    cfg = config(tiny_bert, str(root / "data"))
    cfg.train.epochs = 3
    return train_local(cfg, root / "run", log=lambda _: None), root / "data"


# bf16 keeps 8 significant bits: each rounding is off by at most 2^-9 (0.2%) of the value,
# and through the towers these add up to a few roundings in a unit embedding's components
# (measured 0.006, docs/serving.md "GPU replicas"); 0.02 is ten roundings.
BF16_EMBED_ABS = 0.02
# R@K points that bf16 may move on 200 images (1 image query = 0.5 points, 1 caption query
# 0.1). Measured at most 1.5. The score drift alone would allow far more (every query whose
# rank can cross K flipping: ``at_risk``, about 50 points here), but rounding errors are not
# adversarial: few of those queries flip, and their flips go both ways.
BF16_RECALL_POINTS = 3.0


@pytest.mark.slow
def test_bf16_recall_drift_is_bounded(trained):
    """R@1/5/10 under bf16 against float32, both directions: within ``BF16_RECALL_POINTS``,
    and within what the measured score drift can explain (``at_risk``). Scores of unit
    vectors move by at most |d img| + |d cap| (Cauchy-Schwarz), checked too."""
    d = bf16_drift(*trained)
    fp32, bf16 = d["metrics"][False], d["metrics"][True]
    eps = float(np.abs(d["sims"][True] - d["sims"][False]).max())
    print(f"\nbf16 vs fp32: max |d emb| {d['max_abs']:.4f}, max |d score| {eps:.4f}; "
          + "; ".join(f"{s} R@1/5/10 " + "/".join(f"{fp32[s][f'r{k}']:.1f}" for k in (1, 5, 10))
                      + " -> " + "/".join(f"{bf16[s][f'r{k}']:.1f}" for k in (1, 5, 10))
                      for s in ("i2t", "t2i")))  # fmt: skip
    assert 0 < d["max_abs"] <= BF16_EMBED_ABS
    assert eps <= sum(d["max_l2"]) * 1.001
    assert fp32["rsum"] > 100  # trained: far above chance (about 16 for 200 images)
    for k in (1, 5, 10):
        risk = dict(zip(("i2t", "t2i"), at_risk(d["sims"][False], eps, k), strict=True))
        for side, fraction in risk.items():
            drift = abs(bf16[side][f"r{k}"] - fp32[side][f"r{k}"])
            assert drift <= min(BF16_RECALL_POINTS, 100 * fraction + 1e-9), (side, k, drift)
