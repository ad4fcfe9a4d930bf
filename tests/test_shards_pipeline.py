"""Training batches from a sharded split through Ray Data (hrem_ray/data/ray_data.py).

The memmap path draws each epoch's batches from a permutation of all captions, reading
any image at random; a stream of shards cannot, so the two paths give different batches for
the same seed (docs/data.md, "Sharded datasets"). What both must give, and what is tested
here: every caption at most once per epoch, the same count on every rank, the source's
features and captions for every pair, and batches (augmentation included) that depend only
on the seed and epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray

from hrem_ray.data.precomp import open_split
from hrem_ray.data.ray_data import epoch_slices, sharded_batches, steps_per_epoch
from hrem_ray.data.shards import ShardError, open_sharded, write_shards
from hrem_ray.data.synth import write_synthetic
from hrem_ray.data.tokenize import CaptionTokenizer

IMAGES, PER_SHARD, BATCH = 37, 8, 6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    write_synthetic(root / "src", train_images=IMAGES, dev_images=5, test_images=5, regions=5,
                    dim=8, progress=None)  # fmt: skip
    write_shards(root / "src", "f30k", "train", root / "out", rows_per_shard=PER_SHARD)
    return root


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _epoch(data: Path, bert: str, epoch: int, rank: int = 0, workers: int = 1, seed: int = 0):
    split = open_sharded(data / "out", "f30k", "train")
    return list(sharded_batches(split, bert, 32, BATCH, seed=seed, epoch=epoch, rank=rank,
                                workers=workers, shuffle_buffer=20))  # fmt: skip


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_epoch_slices_split_each_round_evenly_and_disjointly(data, workers):
    split = open_sharded(data / "out", "f30k", "train")
    per_rank = IMAGES // workers
    seen = []
    for rank in range(workers):
        slices = epoch_slices(split, seed=3, epoch=1, rank=rank, workers=workers)
        for round_ in range(5):
            images = [split.shards[s["shard"]].first_image + i for s in slices
                      if s["round"] == round_ for i in range(s["lo"], s["hi"])]  # fmt: skip
            assert len(images) == len(set(images)) == per_rank
            seen.append((round_, frozenset(images)))
    for round_ in range(5):
        sets = [images for r, images in seen if r == round_]
        assert len(frozenset().union(*sets)) == per_rank * workers  # disjoint across ranks
    other = epoch_slices(split, seed=3, epoch=2, rank=0, workers=workers)
    assert other != epoch_slices(split, seed=3, epoch=1, rank=0, workers=workers)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_sharded_batches_are_the_source_pairs_seeded_and_complete(data, tiny_bert, local_ray):
    source = open_split(data / "src", "f30k", "train")
    tok = CaptionTokenizer.from_dir(tiny_bert, max_tokens=32)
    batches = _epoch(data, tiny_bert, epoch=0)
    split = open_sharded(data / "out", "f30k", "train")
    assert len(batches) == steps_per_epoch(split, 1, BATCH) == 5 * IMAGES // BATCH
    ids = np.concatenate([b.caption_ids.numpy() for b in batches])
    assert len(ids) == len(set(ids.tolist())) == len(batches) * BATCH  # each caption once
    for b in batches:
        assert b.images.dtype.is_floating_point and b.images.shape[0] == BATCH
        assert int(b.image_lengths.max()) == b.images.shape[1]
        np.testing.assert_array_equal(b.image_ids.numpy(), b.caption_ids.numpy() // 5)
        for i, cid in enumerate(b.caption_ids.tolist()):
            kept = b.images[i, : int(b.image_lengths[i])].numpy()
            image = source.features[cid // 5]
            # region dropout keeps a subsequence of the image's regions, in order
            matches = [np.flatnonzero((image == row).all(axis=1)) for row in kept]
            assert all(m.size for m in matches)
            assert np.all(np.diff([m[0] for m in matches]) > 0)
            assert not b.images[i, int(b.image_lengths[i]) :].any()
            tokens = b.tokens[i, : int(b.token_lengths[i])].tolist()
            assert tokens[0] == tok.cls_id and tokens[-1] == tok.sep_id
            assert len(tokens) <= len(tok.encode(source.captions[cid]))  # only deletes words
    # batches depend on (seed, epoch) only; another epoch or seed gives other batches
    again = _epoch(data, tiny_bert, epoch=0)
    for a, b in zip(batches, again, strict=True):
        assert (a.caption_ids == b.caption_ids).all() and (a.images == b.images).all()
        assert (a.tokens == b.tokens).all()
    later = _epoch(data, tiny_bert, epoch=1)
    assert [b.caption_ids.tolist() for b in later] != [b.caption_ids.tolist() for b in batches]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_two_ranks_take_equal_disjoint_shares(data, tiny_bert, local_ray):
    split = open_sharded(data / "out", "f30k", "train")
    ranks = [_epoch(data, tiny_bert, epoch=0, rank=r, workers=2) for r in range(2)]
    steps = steps_per_epoch(split, 2, BATCH)
    assert [len(r) for r in ranks] == [steps, steps] and steps == 5 * (IMAGES // 2) // BATCH
    ids = [set(np.concatenate([b.caption_ids.numpy() for b in r]).tolist()) for r in ranks]
    assert not ids[0] & ids[1]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_shard_corrupted_after_opening_stops_the_epoch_naming_it(tmp_path, tiny_bert, local_ray):
    write_synthetic(tmp_path / "src", train_images=20, dev_images=5, test_images=5, regions=5,
                    dim=8, progress=None)  # fmt: skip
    split = write_shards(tmp_path / "src", "f30k", "train", tmp_path / "out", rows_per_shard=5)
    path = Path(split.path(split.shards[2]))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-00002\.npy: shard checksum differs") as e:
        list(sharded_batches(open_sharded(tmp_path / "out", "f30k", "train"), tiny_bert, 32, 4,
                             seed=0, epoch=0, rank=0, workers=1))  # fmt: skip
    assert "\n" not in str(e.value)


def _train_world(root: Path, bert: str, epochs: int):
    """A sharded train split beside a precomp dev split, and a tiny 1-worker run of it."""
    from hrem_ray.config import load_config
    from hrem_ray.train.ray_train import RayRunOptions
    from tests.helpers import TINY_SETS

    if not (root / "f30k_precomp" / "train").exists():
        write_synthetic(root, train_images=20, dev_images=5, test_images=5, regions=6, dim=24,
                        progress=None)  # fmt: skip
        write_shards(root, "f30k", "train", root, rows_per_shard=5)
        (root / "f30k_precomp" / "train_ims.npy").unlink()
    sets = [*TINY_SETS, "train.batch_size=8", "train.log_every=1000", f"train.epochs={epochs}",
            f"data.data_path={root}", f"model.bert_path={bert}"]  # fmt: skip
    options = RayRunOptions(storage_path=str(root / "runs"), name="run", num_workers=1,
                            cpus_per_worker=0.5, max_failures=0, resume=epochs > 1)  # fmt: skip
    return load_config(None, sets), options


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_shard_damaged_mid_run_stops_it_and_keeps_its_checkpoints(
    tmp_path, tiny_bert, local_ray, monkeypatch
):
    from hrem_ray.checkpoint import read_record
    from hrem_ray.train import ray_train

    cfg, options = _train_world(tmp_path, tiny_bert, epochs=1)
    ray_train.train_ray(cfg, options, log=lambda _: None)
    split = open_sharded(tmp_path, "f30k", "train")
    path = Path(split.path(split.shards[1]))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))
    cfg, options = _train_world(tmp_path, tiny_bert, epochs=2)
    # before training: the checksum pass names the shard and no worker starts
    with pytest.raises(ShardError, match=r"shard-00001\.npy: shard checksum differs"):
        ray_train.train_ray(cfg, options, log=lambda _: None)
    # found while reading (the pass skipped): the same one-line error, epoch 1's checkpoint kept
    monkeypatch.setattr(ray_train, "check_shards", lambda *a, **k: None)
    with pytest.raises(ShardError, match=r"shard-00001\.npy: shard checksum differs") as e:
        ray_train.train_ray(cfg, options, log=lambda _: None)
    assert "\n" not in str(e.value)
    run = tmp_path / "runs" / "run"
    kept = [read_record(p)["meta"]["epoch"] for p in run.glob("checkpoint_*") if p.is_dir()]
    assert kept == [0]
