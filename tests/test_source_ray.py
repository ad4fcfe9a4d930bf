"""The training source under Ray Train: a 1-worker run trains on the same batches as
``train --local``, and a shard damaged between runs stops the next one with its one-line
error while the finished epochs' checkpoints stay."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from hrem_ray import storage
from hrem_ray.checkpoint import read_record
from hrem_ray.config import load_config
from hrem_ray.data.shards import ShardError, open_sharded, write_shards
from hrem_ray.options import RayRunOptions
from hrem_ray.synth import write_synthetic
from hrem_ray.testing import TINY_SETS
from hrem_ray.train import ray_train
from hrem_ray.train.local import train_local

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))


def _world(root: Path, bert: str, epochs: int, *, sharded: bool):
    """Train and dev splits (train as shards when ``sharded``) and a tiny 1-worker run."""
    if not (root / "f30k_precomp" / "dev_ims.npy").exists():
        write_synthetic(root, train_images=20, dev_images=5, test_images=5, regions=6, dim=24,
                        progress=None)  # fmt: skip
        if sharded:
            write_shards(root, "f30k", "train", root, rows_per_shard=5)
            (root / "f30k_precomp" / "train_ims.npy").unlink()
    sets = [*TINY_SETS, "train.batch_size=8", "train.log_every=1000", f"train.epochs={epochs}",
            f"data.data_path={root}", f"model.bert_path={bert}", "model.dropout=0.0"]  # fmt: skip
    options = RayRunOptions(storage_path=str(root / "runs"), name="run", num_workers=1,
                            cpus_per_worker=0.5, max_failures=0, resume=epochs > 1)  # fmt: skip
    return load_config(None, sets), options


@pytest.mark.timeout(600)
def test_a_one_worker_ray_run_trains_on_the_local_runs_batches(tmp_path, tiny_bert, local_ray):
    cfg, options = _world(tmp_path, tiny_bert, epochs=2, sharded=False)
    options.resume = False
    local = read_record(train_local(cfg, tmp_path / "local", log=lambda _: None))["meta"]
    on_ray = read_record(ray_train.train_ray(cfg, options, log=lambda _: None))["meta"]
    assert local["epoch"] == on_ray["epoch"]
    for key in ("train_loss", "rsum", "steps"):
        assert on_ray["metrics"][key] == pytest.approx(local["metrics"][key], rel=1e-4), key


@pytest.mark.timeout(900)
def test_a_shard_damaged_between_runs_stops_the_next_and_keeps_its_checkpoints(
    tmp_path, tiny_bert, local_ray
):
    cfg, options = _world(tmp_path, tiny_bert, epochs=1, sharded=True)
    ray_train.train_ray(cfg, options, log=lambda _: None)
    split = open_sharded(tmp_path, "f30k", "train")
    path = Path(split.path(split.shards[1]))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))
    cfg, options = _world(tmp_path, tiny_bert, epochs=2, sharded=True)
    with pytest.raises(ShardError, match=r"shard-00001\.npy: shard checksum differs") as e:
        ray_train.train_ray(cfg, options, log=lambda _: None)
    assert "\n" not in str(e.value)
    run = tmp_path / "runs" / "run"
    kept = [read_record(p)["meta"]["epoch"] for p in run.glob("checkpoint_*") if p.is_dir()]
    assert kept == [0]
