"""``hrem-ray train --local`` with a run in object storage (a moto S3 server) behaves as with
a local folder: the reuse guard, ``best/`` and the metrics files in the bucket, a full URI on
the last line that ``eval`` accepts, and ``--resume`` from the bucket. Also ``check-data``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hrem_ray import storage
from hrem_ray.cli import main
from hrem_ray.data.precomp import split_paths
from hrem_ray.testing import SYNTH, TINY_MODEL
from tests.conftest import S3_BUCKET
from tests.helpers import run_err

TRAIN = ["--epochs", "1", "--batch-size", "10", "--set", "model.warmup=0", *TINY_MODEL]


@pytest.fixture
def data(tmp_path):
    main(["synth", "--out", str(tmp_path / "data"), *SYNTH])
    return tmp_path / "data"


def train(capsys, data, tiny_bert, storage_path, *extra):
    main(["train", "--local", "--data-path", str(data), "--dataset", "f30k",
          "--bert-path", tiny_bert, "--storage-path", storage_path, "--name", "run", *TRAIN,
          *extra])  # fmt: skip
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_local_run_in_s3(capsys, s3_server, data, tiny_bert, tmp_path):
    runs = f"s3://{S3_BUCKET}/runs-{tmp_path.name}"
    last = train(capsys, data, tiny_bert, runs)
    run = f"{runs}/run"
    assert last == f"best checkpoint: {run}/best"
    names = set(storage.list_dir(run))
    assert {"best", "last", "metrics.json", "metrics.csv", "curves.png", "tensorboard"} <= names
    assert [h["epoch"] for h in json.loads(storage.read_text(f"{run}/metrics.json"))] == [0]
    assert storage.list_dir(f"{run}/tensorboard")
    assert not (tmp_path / "s3:").exists()

    # the printed URI is a checkpoint every command takes
    main(["eval", "--checkpoint", last.split(": ", 1)[1], "--data-path", str(data),
          "--dataset", "f30k", "--split", "test", "--json", str(tmp_path / "m.json")])  # fmt: skip
    assert 0 <= json.loads((tmp_path / "m.json").read_text())["rsum"] <= 600

    # the same run without --resume is refused before any work; with it, it goes on
    line = run_err(capsys, "train", "--local", "--data-path", str(data), "--dataset", "f30k",
                   "--bert-path", tiny_bert, "--storage-path", runs, "--name", "run",
                   *TRAIN)  # fmt: skip
    assert f"{run} already holds a run" in line
    train(capsys, data, tiny_bert, runs, "--resume", "--epochs", "2")
    history = json.loads(storage.read_text(f"{run}/metrics.json"))
    assert [h["epoch"] for h in history] == [0, 1]  # each epoch once


def test_bad_storage_is_one_line_before_training(capsys, s3_server, data, tiny_bert):
    line = run_err(capsys, "train", "--local", "--data-path", str(data), "--dataset", "f30k",
                   "--bert-path", tiny_bert, "--storage-path", "s3://no-such-bucket-here/runs",
                   *TRAIN)  # fmt: skip
    assert "s3://no-such-bucket-here" in line and "bucket" in line
    line = run_err(capsys, "eval", "--checkpoint", f"s3://{S3_BUCKET}/nothing-here",
                   "--data-path", str(data), "--dataset", "f30k")  # fmt: skip
    assert f"s3://{S3_BUCKET}/nothing-here" in line


def test_check_data_scans_every_row(capsys, data):
    main(["check-data", "--data-path", str(data), "--dataset", "f30k"])
    out = capsys.readouterr().out
    for split in ("train", "dev", "test"):
        assert f"f30k {split}: " in out and "100%" in out
    ims, _ = split_paths(data, "f30k", "dev")
    feats = np.load(ims)
    feats[3, 1, 2] = np.nan
    np.save(ims, feats)
    line = run_err(capsys, "check-data", "--data-path", str(data), "--dataset", "f30k",
                   "--split", "dev")  # fmt: skip
    assert "dev_ims.npy: row 3 has non-finite values" in line
