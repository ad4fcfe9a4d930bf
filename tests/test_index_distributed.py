"""``hrem-ray index`` on Ray Data (``hrem_ray.index.distributed``): byte-identical to the
single-process build, from a precomp folder and from shards, with one failed block retried.

One small ``ray.init(address="local", num_cpus=2)`` of its own; about 60 s on 2 idle cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hrem_ray.data.shards import write_shards
from hrem_ray.index.distributed import (
    FAIL_ONCE_ENV,
    batch_rows,
    build_gallery_distributed,
    wants_ray,
)
from hrem_ray.index.gallery import CAPTION_EMBS, CAPTIONS, IMAGE_EMBS, build_gallery
from hrem_ray.testing import tiny_data_and_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

BATCH = 4  # several batches per side, the last one short: batch composition matters


def test_batch_rows_are_the_single_process_batches():
    assert batch_rows(5, 3, 2) == [
        {"side": 0, "start": 0, "stop": 2}, {"side": 0, "start": 2, "stop": 4},
        {"side": 0, "start": 4, "stop": 5}, {"side": 1, "start": 0, "stop": 2},
        {"side": 1, "start": 2, "stop": 3},
    ]  # fmt: skip


def _same_files(a: Path, b: Path) -> None:
    for name in (IMAGE_EMBS, CAPTION_EMBS, CAPTIONS):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_distributed_build_is_byte_identical_and_retries_one_block(
    tmp_path, tiny_bert, monkeypatch
):
    import ray

    data, ckpt = tiny_data_and_checkpoint(tmp_path, tiny_bert)
    shards = tmp_path / "shards"
    write_shards(data, "f30k", "test", shards, rows_per_shard=3)
    assert not wants_ray(data, "f30k", "test", None) and wants_ray(data, "f30k", "test", 2)
    assert wants_ray(shards, "f30k", "test", None)  # sharded: on Ray without the flag
    build_gallery(ckpt, data, "f30k", "test", tmp_path / "single", batch_size=BATCH)
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_ONCE_ENV, f"{marker}:4")  # image batch 4..7 fails its first try
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    lines: list[str] = []
    try:
        build_gallery_distributed(ckpt, data, "f30k", "test", tmp_path / "retried",
                                  num_workers=2, batch_size=BATCH)  # fmt: skip
        assert marker.exists()  # the block did fail once, and the build went on
        monkeypatch.delenv(FAIL_ONCE_ENV)
        build_gallery_distributed(ckpt, shards, "f30k", "test", tmp_path / "sharded",
                                  num_workers=2, batch_size=BATCH,
                                  progress=lines.append)  # fmt: skip
    finally:
        ray.shutdown()
    _same_files(tmp_path / "single", tmp_path / "retried")
    _same_files(tmp_path / "single", tmp_path / "sharded")
    assert lines and "images/s" in lines[-1] and "ETA" in lines[-1]
