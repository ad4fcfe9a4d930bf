"""Sharded datasets (hrem_ray/data/shards.py): writing, opening, checking, and every way a
shard can be damaged; locally and on the S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hrem_ray import storage
from hrem_ray.cli import main
from hrem_ray.data.precomp import PrecompError, PrecompSplit, open_split
from hrem_ray.data.shards import (
    MANIFEST,
    ShardedSplit,
    ShardError,
    open_sharded,
    read_shard,
    split_dir,
    verify_shards,
    write_shards,
)
from hrem_ray.data.source import open_precomp, open_source
from hrem_ray.synth import write_synthetic
from tests.conftest import S3_BUCKET

IMAGES = 23  # not a multiple of the shard size: the last shard is short


def _precomp(root: Path, per_caption: bool = False) -> Path:
    write_synthetic(root, train_images=IMAGES, dev_images=5, test_images=5, regions=4, dim=8,
                    progress=None)  # fmt: skip
    if per_caption:  # the other precomp layout: each image's row repeated for its captions
        ims = root / "f30k_precomp" / "train_ims.npy"
        np.save(ims, np.repeat(np.load(ims), 5, axis=0))
    return root


@pytest.fixture
def sharded(tmp_path) -> tuple[Path, ShardedSplit]:
    src = _precomp(tmp_path / "src")
    return src, write_shards(src, "f30k", "train", tmp_path / "out", rows_per_shard=5)


def _shard_file(split: ShardedSplit, index: int) -> Path:
    return Path(split.path(split.shards[index]))


@pytest.mark.parametrize("per_caption", [False, True])
def test_shards_hold_every_image_once_in_order(tmp_path, per_caption):
    src = _precomp(tmp_path / "src", per_caption)
    source = open_split(src, "f30k", "train")
    assert source.per_caption == per_caption
    written = write_shards(src, "f30k", "train", tmp_path / "out", rows_per_shard=5)
    split = open_sharded(tmp_path / "out", "f30k", "train")
    assert [s.rows for s in split.shards] == [5, 5, 5, 5, 3]
    assert split.shards == written.shards and split.n_images == IMAGES
    features = np.concatenate([read_shard(split, s) for s in split.shards])
    np.testing.assert_array_equal(features, source.features[source.image_rows()])
    assert split.captions == source.captions and split.n_captions == 5 * IMAGES
    manifest = json.loads((Path(split.root) / MANIFEST).read_text())
    assert manifest["source"]["layout"] == ("per_caption" if per_caption else "per_image")
    assert manifest["n_captions"] == 5 * IMAGES and manifest["dtype"] == "float32"
    assert split.root == split_dir(tmp_path / "out", "f30k", "train")


def test_float16_halves_the_shards(tmp_path):
    src = _precomp(tmp_path / "src")
    f32 = write_shards(src, "f30k", "train", tmp_path / "a", rows_per_shard=8)
    f16 = write_shards(src, "f30k", "train", tmp_path / "b", rows_per_shard=8, dtype="float16")
    data32 = sum(s.bytes for s in f32.shards) - 128 * len(f32.shards)  # minus .npy headers
    data16 = sum(s.bytes for s in f16.shards) - 128 * len(f16.shards)
    assert data16 * 2 == data32
    source = open_split(src, "f30k", "train").features
    got = np.concatenate([read_shard(f16, s) for s in f16.shards])
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, source.astype(np.float16))


def test_float16_overflow_is_refused_naming_the_row(tmp_path):
    src = _precomp(tmp_path / "src")
    ims = src / "f30k_precomp" / "train_ims.npy"
    features = np.load(ims)
    features[7, 1, 2] = 1e6  # finite in float32, inf in float16
    np.save(ims, features)
    with pytest.raises(PrecompError, match=r"train_ims\.npy as float16: row 7 "):
        write_shards(src, "f30k", "train", tmp_path / "out", dtype="float16")
    assert not (Path(split_dir(tmp_path / "out", "f30k", "train")) / MANIFEST).exists()


def test_a_precomp_split_stays_the_default_locally(sharded, tmp_path):
    src, _ = sharded
    # both kinds under one root: the memory map wins; the shards are read once it is gone
    write_shards(src, "f30k", "train", src, rows_per_shard=5)
    assert "precomp" in open_source(src, "f30k", "train").describe()
    assert isinstance(open_precomp(src, "f30k", "train"), PrecompSplit)
    (src / "f30k_precomp" / "train_ims.npy").unlink()
    assert "5 shards in" in open_source(src, "f30k", "train").describe()


def test_an_interrupted_write_leaves_no_manifest_and_can_be_redone(tmp_path, monkeypatch):
    src = _precomp(tmp_path / "src")
    real = storage.write_text

    def no_manifest(path, text):
        if str(path).endswith(MANIFEST):
            raise KeyboardInterrupt
        return real(path, text)

    monkeypatch.setattr(storage, "write_text", no_manifest)
    with pytest.raises(KeyboardInterrupt):
        write_shards(src, "f30k", "train", tmp_path / "out", rows_per_shard=5)
    monkeypatch.setattr(storage, "write_text", real)
    root = Path(split_dir(tmp_path / "out", "f30k", "train"))
    assert (root / "shard-00000.npy").exists() and not (root / MANIFEST).exists()
    with pytest.raises(ShardError, match=r"no manifest\.json, an unfinished `hrem-ray shard`"):
        open_sharded(tmp_path / "out", "f30k", "train")
    write_shards(src, "f30k", "train", tmp_path / "out", rows_per_shard=5)
    assert open_sharded(tmp_path / "out", "f30k", "train").n_images == IMAGES


def test_an_existing_sharded_split_is_never_overwritten(sharded, tmp_path):
    src, split = sharded
    before = (Path(split.root) / MANIFEST).read_bytes()
    with pytest.raises(ShardError, match="already holds a sharded dataset"):
        write_shards(src, "f30k", "train", tmp_path / "out", rows_per_shard=7)
    assert (Path(split.root) / MANIFEST).read_bytes() == before


def test_bad_options_are_refused_before_writing(tmp_path):
    src = _precomp(tmp_path / "src")
    with pytest.raises(ValueError, match="--dtype float64"):
        write_shards(src, "f30k", "train", tmp_path / "out", dtype="float64")
    with pytest.raises(ValueError, match="--rows-per-shard 0"):
        write_shards(src, "f30k", "train", tmp_path / "out", rows_per_shard=0)
    assert not (tmp_path / "out").exists()


def test_a_missing_shard_is_named_when_opened(sharded, tmp_path):
    _, split = sharded
    _shard_file(split, 2).unlink()
    with pytest.raises(ShardError, match=r"shard-00002\.npy: shard missing"):
        open_sharded(tmp_path / "out", "f30k", "train")


def test_a_truncated_shard_is_named_when_opened(sharded, tmp_path):
    _, split = sharded
    path = _shard_file(split, 1)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardError, match=r"shard-00001\.npy: shard is \d+ bytes, the manifest"):
        open_sharded(tmp_path / "out", "f30k", "train")


def test_a_shard_of_another_shape_is_named_when_opened(sharded, tmp_path):
    _, split = sharded
    path = _shard_file(split, 0)
    rows = np.load(path)
    np.save(path, rows.reshape(rows.shape[0], rows.shape[1] * 2, rows.shape[2] // 2))
    assert path.stat().st_size == split.shards[0].bytes  # same size: only the header tells
    with pytest.raises(ShardError, match=r"shard-00000\.npy: shard holds float32 \[5, 8, 4\]"):
        open_sharded(tmp_path / "out", "f30k", "train")


def test_a_corrupt_shard_is_found_by_its_checksum(sharded, tmp_path):
    _, split = sharded
    path = _shard_file(split, 3)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte: same size, same header
    path.write_bytes(bytes(data))
    opened = open_sharded(tmp_path / "out", "f30k", "train")  # sizes and headers still fine
    with pytest.raises(ShardError, match=r"shard-00003\.npy: shard checksum differs"):
        verify_shards(opened)
    with pytest.raises(ShardError, match=r"shard-00003\.npy: shard checksum differs"):
        read_shard(opened, opened.shards[3])
    read_shard(opened, opened.shards[2])  # the others still read


def test_damaged_captions_and_manifest_are_named(sharded, tmp_path):
    _, split = sharded
    root = Path(split.root)
    captions = (root / "captions.txt").read_bytes()
    (root / "captions.txt").write_bytes(captions.replace(b"\n", b"\n\n", 1))
    with pytest.raises(ShardError, match=r"captions\.txt: checksum differs"):
        open_sharded(tmp_path / "out", "f30k", "train")
    (root / "captions.txt").write_bytes(captions)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["shards"][1]["first_image"] = 4
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"shard-00001\.npy starts at image 4, expected 5"):
        open_sharded(tmp_path / "out", "f30k", "train")
    (root / MANIFEST).write_text("{")
    with pytest.raises(ShardError, match="not a JSON manifest"):
        open_sharded(tmp_path / "out", "f30k", "train")
    with pytest.raises(ShardError, match="no sharded dataset at .*f30k_precomp/dev"):
        open_sharded(tmp_path / "out", "f30k", "dev")


def test_open_precomp_writes_a_sharded_split_as_a_precomp_one_once(sharded, tmp_path, monkeypatch):
    src, _ = sharded
    monkeypatch.setenv("HREM_CACHE", str(tmp_path / "cache"))
    write_shards(src, "f30k", "train", src, rows_per_shard=5)
    (src / "f30k_precomp" / "train_ims.npy").rename(tmp_path / "kept.npy")
    local = open_precomp(src, "f30k", "train")
    assert str(local.ims_path).startswith(str(tmp_path / "cache"))
    np.testing.assert_array_equal(local.features, np.load(tmp_path / "kept.npy"))
    assert local.captions == open_sharded(src, "f30k", "train").captions
    mtime = local.ims_path.stat().st_mtime_ns
    assert open_precomp(src, "f30k", "train").ims_path.stat().st_mtime_ns == mtime


def test_cli_shard_and_check_data(tmp_path, capsys):
    src = _precomp(tmp_path / "src")
    out = tmp_path / "out"
    main(["shard", "--data-path", str(src), "--dataset", "f30k", "--split", "train",
          "--out", str(out), "--rows-per-shard", "10", "--dtype", "float16"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "shard f30k train [####################] 100% 23/23 images" in printed
    assert "3 shards, 23 images" in printed
    main(["check-data", "--data-path", str(out), "--dataset", "f30k", "--split", "train"])
    assert "f30k train: 23 images, 115 captions, 3 shards" in capsys.readouterr().out
    split = open_sharded(out, "f30k", "train")
    path = _shard_file(split, 1)
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(SystemExit) as e:
        main(["check-data", "--data-path", str(out), "--dataset", "f30k", "--split", "train"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard-00001.npy: shard checksum differs" in err


def test_shards_in_s3(tmp_path, s3_server):
    src = _precomp(tmp_path / "src")
    uri = f"s3://{S3_BUCKET}/sharded"
    write_shards(src, "f30k", "train", uri, rows_per_shard=6)
    split = open_sharded(uri, "f30k", "train")
    assert split.root.startswith("s3://")
    verify_shards(split)
    source = open_split(src, "f30k", "train")
    features = np.concatenate([read_shard(split, s) for s in split.shards])
    np.testing.assert_array_equal(features, source.features)
    assert storage.list_dir(split.root)[-1] == "shard-00003.npy"
    with pytest.raises(ShardError, match=r"no sharded dataset at s3://.*/f30k_precomp/dev"):
        open_source(uri, "f30k", "dev")
