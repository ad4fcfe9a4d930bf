"""The training source (hrem_ray/data/source.py, plan.py, cache.py): one epoch plan and one
batch path for a precomp folder, local shards and shards in S3; the node cache (fetched
once, checked as it lands, evicted under a budget); and what the plan guarantees."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from hrem_ray import storage
from hrem_ray.data.cache import NodeCache, cached
from hrem_ray.data.plan import epoch_plan, rank_slice, windows
from hrem_ray.data.precomp import open_split
from hrem_ray.data.shards import ShardError, open_sharded, write_shards
from hrem_ray.data.source import encoded, open_precomp, open_source
from hrem_ray.data.tokenize import CaptionTokenizer
from hrem_ray.synth import write_synthetic
from tests.conftest import S3_BUCKET

IMAGES, PER_SHARD, BATCH = 37, 8, 6  # 5 shards, the last one short


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("source")
    write_synthetic(root / "src", train_images=IMAGES, dev_images=5, test_images=5, regions=5,
                    dim=8, progress=None)  # fmt: skip
    write_shards(root / "src", "f30k", "train", root / "out", rows_per_shard=PER_SHARD)
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tok(tiny_bert) -> CaptionTokenizer:
    return CaptionTokenizer.from_dir(tiny_bert, max_tokens=32)


def _epoch(source, tok, epoch: int, *, rank: int = 0, workers: int = 1, seed: int = 0):
    tokens = encoded(source.captions, tok)
    return list(source.batches(tokens, tok, BATCH // workers, seed=seed, epoch=epoch, rank=rank,
                               workers=workers))  # fmt: skip


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in ("images", "image_lengths", "tokens", "token_lengths", "caption_ids"):
            assert (getattr(x, name) == getattr(y, name)).all(), name


@pytest.fixture(scope="module")
def s3_data(data, s3_server) -> str:
    uri = f"s3://{S3_BUCKET}/source"
    write_shards(data / "src", "f30k", "train", uri, rows_per_shard=PER_SHARD)
    return uri


# --- the epoch plan ------------------------------------------------------------------------


def test_one_window_is_one_permutation_of_all_captions():
    plan = epoch_plan([8, 8, 5], 3, 4, seed=7, epoch=2)
    reference = np.random.default_rng([7, 2]).permutation(21 * 5)
    np.testing.assert_array_equal(plan.ravel(), reference[: 26 * 4])
    assert plan.shape == (26, 4)


@pytest.mark.parametrize("window", [1, 2, 5])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_plan_uses_each_caption_once_with_equal_disjoint_ranks(window, workers):
    rows = [8, 8, 8, 8, 5]
    batch = 6 * workers
    plan = epoch_plan(rows, window, batch, seed=3, epoch=1)
    assert plan.shape == (37 * 5 // batch, batch)
    flat = plan.ravel()
    assert len(set(flat.tolist())) == flat.size  # every caption at most once
    assert flat.size == 37 * 5 - 37 * 5 % batch  # and all but the remainder exactly once
    shares = [rank_slice(plan, r, workers) for r in range(workers)]
    assert all(s.shape == (plan.shape[0], 6) for s in shares)
    assert sum(len(set(s.ravel().tolist())) for s in shares) == flat.size  # disjoint
    np.testing.assert_array_equal(plan, epoch_plan(rows, window, batch, seed=3, epoch=1))
    assert not np.array_equal(plan, epoch_plan(rows, window, batch, seed=3, epoch=2))


def test_a_window_holds_its_blocks_captions_together():
    rows = [8, 8, 8, 8, 5]
    wins = windows(rows, 2, seed=3, epoch=1)
    assert sorted(np.concatenate(wins).tolist()) == [0, 1, 2, 3, 4]
    plan = epoch_plan(rows, 2, 1, seed=3, epoch=1).ravel()  # batch 1: nothing dropped
    starts = np.cumsum([0, *rows])
    block_of = np.searchsorted(starts, plan // 5, side="right") - 1
    window_of = {b: w for w, blocks in enumerate(wins) for b in blocks.tolist()}
    visited = [window_of[b] for b in block_of.tolist()]
    assert visited == sorted(visited)  # window by window, each window's captions shuffled


# --- one batch path for every kind -----------------------------------------------------------


def test_precomp_and_local_shards_give_the_same_batches(data, tok):
    precomp = open_source(data / "src", "f30k", "train")
    shards = open_source(data / "out", "f30k", "train")
    assert "precomp" in precomp.describe() and "5 shards" in shards.describe()
    for epoch in (0, 1):
        _same(_epoch(precomp, tok, epoch), _epoch(shards, tok, epoch))


def test_batches_are_the_source_pairs(data, tok):
    source = open_split(data / "src", "f30k", "train")
    batches = _epoch(open_source(data / "out", "f30k", "train"), tok, 0)
    assert len(batches) == 5 * IMAGES // BATCH
    for b in batches:
        assert int(b.image_lengths.max()) == b.images.shape[1]
        np.testing.assert_array_equal(b.image_ids.numpy(), b.caption_ids.numpy() // 5)
        for i, cid in enumerate(b.caption_ids.tolist()):
            kept = b.images[i, : int(b.image_lengths[i])].numpy()
            image = source.features[cid // 5]
            matches = [np.flatnonzero((image == row).all(axis=1)) for row in kept]
            assert all(m.size for m in matches)  # region dropout: an in-order subsequence
            assert np.all(np.diff([m[0] for m in matches]) > 0)
            assert not b.images[i, int(b.image_lengths[i]) :].any()
            tokens = b.tokens[i, : int(b.token_lengths[i])].tolist()
            assert tokens[0] == tok.cls_id and tokens[-1] == tok.sep_id
            assert len(tokens) <= len(tok.encode(source.captions[cid]))  # only deletes words


def test_two_ranks_together_are_the_one_worker_global_batches(data, tok):
    source = open_source(data / "out", "f30k", "train")
    one = _epoch(source, tok, 0)
    ranks = [_epoch(source, tok, 0, rank=r, workers=2) for r in range(2)]
    assert [len(r) for r in ranks] == [len(one)] * 2
    for step, whole in enumerate(one):
        joined = np.concatenate([ranks[r][step].caption_ids.numpy() for r in range(2)])
        np.testing.assert_array_equal(joined, whole.caption_ids.numpy())


def test_s3_shards_with_the_split_in_cache_are_fetched_once(data, s3_data, tok):
    source = open_source(s3_data, "f30k", "train")
    assert "node cache" in source.describe() and "one permutation" in source.describe()
    split_bytes = sum(s.bytes for s in open_sharded(s3_data, "f30k", "train").shards)
    first = _epoch(source, tok, 0)
    assert source.bytes_fetched == split_bytes  # epoch 1: the split, once
    _same(first, _epoch(open_source(data / "src", "f30k", "train"), tok, 0))
    _epoch(source, tok, 1)
    assert source.bytes_fetched == split_bytes  # epoch 2: nothing
    again = open_source(s3_data, "f30k", "train")  # another process of the node
    _same(first, _epoch(again, tok, 0))
    assert again.bytes_fetched == 0


def test_s3_shards_under_half_the_split_stay_within_the_budget(data, s3_data, tok, cache):
    shards = open_sharded(s3_data, "f30k", "train").shards
    budget = sum(s.bytes for s in shards) // 2
    source = open_source(s3_data, "f30k", "train", cache_limit=budget)
    assert source.window == 1 and "windows of 1 shards" in source.describe()
    tokens = encoded(source.captions, tok)
    seen = []
    for b in source.batches(tokens, tok, BATCH, seed=0, epoch=0):
        held = sum(stat.st_size for _, stat in cached(cache / "shards"))
        assert held <= budget + max(s.bytes for s in shards)  # at most one shard in flight
        seen.extend(b.caption_ids.tolist())
    assert len(seen) == len(set(seen)) == 5 * IMAGES // BATCH * BATCH
    reference = open_split(data / "src", "f30k", "train")
    batch = next(iter(source.batches(tokens, tok, BATCH, seed=0, epoch=1)))
    image = reference.features[int(batch.caption_ids[0]) // 5]
    kept = batch.images[0, : int(batch.image_lengths[0])].numpy()
    assert all((image == row).all(axis=1).any() for row in kept)


def test_concurrent_workers_of_a_node_download_each_shard_once(s3_data, tok):
    shards = open_sharded(s3_data, "f30k", "train").shards
    sources = [open_source(s3_data, "f30k", "train") for _ in range(3)]
    threads = [threading.Thread(target=_epoch, args=(s, tok, 0)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(s.bytes_fetched for s in sources) == sum(s.bytes for s in shards)


def test_dev_copy_of_s3_shards_is_the_source_split(data, s3_data):
    local = open_precomp(s3_data, "f30k", "train")
    source = open_split(data / "src", "f30k", "train")
    np.testing.assert_array_equal(np.asarray(local.features), np.asarray(source.features))
    assert local.captions == source.captions
    mtime = local.ims_path.stat().st_mtime_ns
    assert open_precomp(s3_data, "f30k", "train").ims_path.stat().st_mtime_ns == mtime


# --- checks as shards land -------------------------------------------------------------------


def _corrupt(path: Path, at: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_local_shard_corrupted_after_opening_stops_the_epoch_naming_it(tmp_path, tok):
    write_synthetic(tmp_path / "src", train_images=20, dev_images=5, test_images=5, regions=5,
                    dim=8, progress=None)  # fmt: skip
    split = write_shards(tmp_path / "src", "f30k", "train", tmp_path / "out", rows_per_shard=5)
    source = open_source(tmp_path / "out", "f30k", "train")
    _epoch(source, tok, 0)  # checked once: a stamp per shard
    _corrupt(Path(split.path(split.shards[2])))
    with pytest.raises(ShardError, match=r"shard-00002\.npy: shard checksum differs") as e:
        _epoch(open_source(tmp_path / "out", "f30k", "train"), tok, 0)
    assert "\n" not in str(e.value)


def test_a_shard_corrupt_in_s3_is_reported_and_never_cached(tmp_path, data, s3_server, tok):
    import boto3

    uri = f"s3://{S3_BUCKET}/corrupt"
    split = write_shards(data / "src", "f30k", "train", uri, rows_per_shard=PER_SHARD)
    key = split.path(split.shards[1]).split(f"{S3_BUCKET}/", 1)[1]
    s3 = boto3.client("s3")
    body = bytearray(s3.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read())
    body[-1] ^= 0x01
    s3.put_object(Bucket=S3_BUCKET, Key=key, Body=bytes(body))
    with pytest.raises(ShardError, match=r"shard-00001\.npy: shard checksum differs") as e:
        _epoch(open_source(uri, "f30k", "train"), tok, 0)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache" / "shards").glob("*/shard-00001.npy"))


def test_a_torn_download_is_fetched_again(s3_data, tok, monkeypatch):
    real, calls = storage.download, []

    def torn_once(path, dst):
        got = real(path, dst)
        if "/torn/" not in str(dst):  # another test's background fetch, still running
            return got
        calls.append(path)
        if len(calls) == 1:  # the first download arrives damaged
            _corrupt(Path(dst))
            got = storage.digest(dst)
        return got

    monkeypatch.setattr(storage, "download", torn_once)
    shard = open_sharded(s3_data, "f30k", "train").shards[0]
    cache = NodeCache("torn", None)
    path = cache.local(f"{s3_data}/f30k_precomp/train/{shard.file}", shard.bytes, shard.sha256)
    assert storage.digest(path)["sha256"] == shard.sha256
    assert len(calls) == 2, calls


def test_cache_limit_is_a_size_or_auto():
    from hrem_ray.config import ConfigError, HREMConfig, parse_size

    assert parse_size("auto") is None
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("512MiB") == 512 << 20
    with pytest.raises(ConfigError, match="data.cache_limit"):
        HREMConfig.from_dict({"data": {"cache_limit": "lots"}})
    assert HREMConfig.from_dict({"data": {"shuffle_buffer": 2048}}).data.cache_limit == "auto"
