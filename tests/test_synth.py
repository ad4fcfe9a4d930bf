"""The synthetic precomp generator: format, byte-identical output for a seed (pinned),
real-English captions, learnability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hrem_ray import synth
from hrem_ray.options import DATASETS
from hrem_ray.synth.lexicon import NOUNS, vocabulary, words
from hrem_ray.synth.scenes import make_world

SMALL = {"train_images": 7, "dev_images": 3, "regions": 5, "dim": 16, "progress": None}


def _captions(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# SHA-256 (first 16 hex digits) of every file that seed 3 writes: the demo's and the docs'
# figures depend on these bytes, so a change to the generator must show up here.
PINNED = {
    "f30k": {"train_ims.npy": "64f0dfc8908a73c7", "train_caps.txt": "17b80685ee687e22",
             "dev_ims.npy": "fc855c9f368275bd", "dev_caps.txt": "c16ab00941bb43da",
             "test_ims.npy": "6b7e0ce2b546b106", "test_caps.txt": "367ae3e1dd1160c0"},
    "coco": {"train_ims.npy": "64f0dfc8908a73c7", "train_caps.txt": "17b80685ee687e22",
             "dev_ims.npy": "fc855c9f368275bd", "dev_caps.txt": "c16ab00941bb43da",
             "testall_ims.npy": "ff1c0d62f51073a0", "testall_caps.txt": "110abd5ca5b0802b",
             "test_ims.npy": "150bfba87b84d71a", "test_caps.txt": "667d17d164dfcad3"},
}  # fmt: skip


@pytest.mark.parametrize("dataset", ["f30k", "coco"])
def test_output_for_a_seed_is_pinned(tmp_path: Path, dataset: str) -> None:
    import hashlib

    sizes = dict(train_images=30, dev_images=7, test_images=11, regions=6, dim=24)
    folder = synth.write_synthetic(tmp_path, dataset=dataset, seed=3, progress=None, **sizes)
    got = {name: hashlib.sha256(data).hexdigest()[:16] for name, data in _files(folder).items()}
    assert got == PINNED[dataset]


@pytest.mark.parametrize("dataset", ["f30k", "coco"])
def test_format(tmp_path: Path, dataset: str) -> None:
    folder = synth.write_synthetic(tmp_path, dataset=dataset, test_images=11, **SMALL)
    assert folder == tmp_path / f"{dataset}_precomp"
    expected = {"train": 7, "dev": 3, "test": 11}
    if dataset == "coco":
        expected = {"train": 7, "dev": 3, "testall": 11, "test": 2}
    assert set(synth.SPLIT_NAMES[dataset]) == set(expected)
    assert tuple(synth.SPLIT_NAMES) == DATASETS  # the synth command offers every layout
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{s}_{kind}" for s in expected for kind in ("ims.npy", "caps.txt")
    )
    for split, n in expected.items():
        ims = np.load(folder / f"{split}_ims.npy")
        assert ims.dtype == np.float32 and ims.shape == (n, 5, 16)
        assert np.isfinite(ims).all() and (ims >= 0).all()
        assert 0.2 < (ims == 0).mean() < 0.9  # sparse-ish, like ReLU'd CNN features
        caps = _captions(folder / f"{split}_caps.txt")
        assert len(caps) == 5 * n and all(c.strip() for c in caps)
    if dataset == "coco":
        testall = np.load(folder / "testall_ims.npy")
        np.testing.assert_array_equal(np.load(folder / "test_ims.npy"), testall[:2])
        assert _captions(folder / "test_caps.txt") == _captions(folder / "testall_caps.txt")[:10]


def test_coco_first_fold_has_at_least_one_image(tmp_path: Path) -> None:
    folder = synth.write_synthetic(tmp_path, dataset="coco", test_images=3, **SMALL)
    assert np.load(folder / "test_ims.npy").shape[0] == 1
    assert len(_captions(folder / "test_caps.txt")) == 5


def test_deterministic(tmp_path: Path) -> None:
    def run(name: str, seed: int, dim: int = 16) -> dict[str, bytes]:
        args = {**SMALL, "dim": dim}
        return _files(synth.write_synthetic(tmp_path / name, test_images=2, seed=seed, **args))

    first = run("a", 0)
    assert run("b", 0) == first
    other = run("c", 1)
    assert all(other[name] != first[name] for name in first)
    # captions are drawn apart from the features, so they do not depend on the feature width
    wide = run("d", 0, dim=32)
    assert all(wide[n] == first[n] for n in first if n.endswith(".txt"))


def test_dev_does_not_depend_on_train_size(tmp_path: Path) -> None:
    a = synth.write_synthetic(tmp_path / "a", test_images=2, **SMALL)
    b = synth.write_synthetic(tmp_path / "b", test_images=2, **{**SMALL, "train_images": 9})
    assert _files(a)["dev_ims.npy"] == _files(b)["dev_ims.npy"]


def test_captions_are_real_english_about_their_scene(tmp_path: Path) -> None:
    seed, n = 3, 200
    args = {"train_images": 1, "test_images": 1, "regions": 4, "dim": 8, "progress": None}
    folder = synth.write_synthetic(tmp_path, dev_images=n, seed=seed, **args)
    caps = _captions(folder / "dev_caps.txt")
    world = make_world(seed, 8)
    chunks = list(synth.iter_split(world, seed, "dev", n, 4, chunk=64))
    assert [c for ch in chunks for c in ch.captions] == caps
    vocab = vocabulary()
    assert len(vocab) > 150
    for i, scene in enumerate(s for ch in chunks for s in ch.scenes):
        mine = caps[5 * i : 5 * i + 5]
        assert len(set(mine)) == 5, mine
        forms = {f for pair in NOUNS[scene.groups[0].noun].forms for f in pair}
        for text in mine:
            found = words(text)
            assert set(found) <= vocab, text
            assert any(f" {f} " in f" {' '.join(found)} " for f in forms), (text, forms)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dataset": "mscoco"},
        {"train_images": 0},
        {"dev_images": 0},
        {"test_images": -1},
        {"regions": 0},
        {"dim": 7},
        {"seed": -1},
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs)).split("_")[0]):
        synth.write_synthetic(tmp_path, **{**SMALL, **kwargs})


def test_atomic_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "CHUNK_BYTES", 5 * 16 * 4 * 2)  # two images per chunk

    def fail_midway(line: str) -> None:
        if "/train:" in line and "/" in line.split(":")[1]:
            raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        synth.write_synthetic(tmp_path, **{**SMALL, "progress": fail_midway})
    assert list((tmp_path / "f30k_precomp").iterdir()) == []  # nothing half-written

    lines: list[str] = []
    folder = synth.write_synthetic(tmp_path, **{**SMALL, "progress": lines.append})
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
    assert any("train: 7 images, 35 captions" in line for line in lines)
    assert any("train: 4/7 images" in line for line in lines)


def _ridge_recall(folder: Path, shuffle: bool) -> tuple[float, float, float]:
    """Text->image R@1/5/10 on dev of ridge regression from bag-of-words to mean-pooled regions."""
    vocab = {w: i for i, w in enumerate(sorted(vocabulary()))}

    def bow(split: str) -> np.ndarray:
        caps = _captions(folder / f"{split}_caps.txt")
        x = np.zeros((len(caps), len(vocab) + 1))
        x[:, -1] = 1.0
        for row, text in enumerate(caps):
            x[row, [vocab[w] for w in words(text)]] = 1.0
        return x

    train_img = np.load(folder / "train_ims.npy").mean(axis=1)
    if shuffle:
        train_img = train_img[np.random.default_rng(0).permutation(len(train_img))]
    x, y = bow("train"), np.repeat(train_img, 5, axis=0)
    mean = y.mean(axis=0)
    w = np.linalg.solve(x.T @ x + np.eye(x.shape[1]), x.T @ (y - mean))
    query = bow("dev") @ w
    images = np.load(folder / "dev_ims.npy").mean(axis=1) - mean
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    scores = query @ images.T
    truth = scores[np.arange(len(scores)), np.arange(len(scores)) // 5]
    ranks = (scores > truth[:, None]).sum(axis=1)
    r1, r5, r10 = (round(float((ranks < k).mean()), 3) for k in (1, 5, 10))
    return r1, r5, r10


def test_learnable_by_a_linear_model(tmp_path: Path) -> None:
    folder = synth.write_synthetic(
        tmp_path, train_images=600, dev_images=100, test_images=1, dim=64, progress=None
    )
    fitted = _ridge_recall(folder, shuffle=False)
    shuffled = _ridge_recall(folder, shuffle=True)
    print(f"\nridge BoW->mean regions, dev 100 images, t2i R@1/5/10: {fitted}, shuffled {shuffled}")
    assert 0.10 < fitted[0] < 0.95  # far above chance (1%), yet not trivially solved
    assert fitted[2] > 0.6
    assert shuffled[0] < 0.05 and shuffled[2] < 0.25
