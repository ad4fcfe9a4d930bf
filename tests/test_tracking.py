"""MLflow tracking in the embedded store: a run's params, tags, live curves without duplicate
steps across a resume, its artifacts and best checkpoint by URI; seeded sweep draws; an
unreachable server as a one-line error before Ray starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow import MlflowClient
from ray.tune.experiment import Experiment

from hrem_ray import tracking
from hrem_ray.cli import main
from hrem_ray.config import HREMConfig
from hrem_ray.train.local import train_local
from hrem_ray.tune.space import load_space
from hrem_ray.tune.sweep import searcher


def run_cfg(small_cfg, synth_root, epochs: int) -> HREMConfig:
    cfg = HREMConfig(model=small_cfg)
    cfg.data.data_path = str(synth_root)
    cfg.train.batch_size = 16
    cfg.train.eval_batch_size = 16
    cfg.train.log_every = 3  # 200 pairs / 16 = 12 steps an epoch: 4 points each
    cfg.train.epochs = epochs
    return cfg.validate()


def test_local_run_is_tracked_and_resume_continues_its_curves(small_cfg, synth_root, tmp_path):
    uri = tracking.resolve_uri(None, str(tmp_path))
    run = tmp_path / "run"
    quiet = lambda *_: None  # noqa: E731
    train_local(run_cfg(small_cfg, synth_root, 1), run, tracking_uri=uri, log=quiet)
    run_id = tracking.saved_run_id(str(run), uri)
    train_local(run_cfg(small_cfg, synth_root, 2), run, resume=True, tracking_uri=uri, log=quiet)
    assert tracking.saved_run_id(str(run), uri) == run_id  # reattached, not a new run

    client = MlflowClient(uri)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["train.epochs"] == "1"  # the config the run started with
    assert got.data.params["run.device"] == "cpu"
    assert got.data.tags["dataset"] == "f30k"
    assert got.data.tags["data.identity"].startswith("files:")
    assert got.data.tags["best_checkpoint"] == str(run / "best")
    assert "code.hrem_ray" in got.data.tags and got.data.tags["workers"] == "1"
    loss = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in loss] == [3, 6, 9, 12, 15, 18, 21, 24]  # 2 epochs, no repeats
    assert all(m.value > 0 for m in loss)
    for key in (
        "train/lr",
        "train/samples_per_s",
        "train/data_wait_frac",
        "train/base",
        "train/kl",
    ):
        assert len(client.get_metric_history(run_id, key)) == 8, key
    assert [m.step for m in client.get_metric_history(run_id, "dev/rsum")] == [12, 24]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"metrics.json", "metrics.csv", "curves.png", "tensorboard"} <= artifacts
    assert list((run / "tensorboard").glob("*.live"))  # the live events beside the run's


def test_no_tracking_leaves_no_store(small_cfg, synth_root, tmp_path):
    train_local(run_cfg(small_cfg, synth_root, 1), tmp_path / "run", log=lambda *_: None)
    assert not (tmp_path / tracking.STORE_FILE).exists()
    assert not (tmp_path / "run" / tracking.RUN_FILE).exists()


def test_the_store_of_runs_in_object_storage_is_in_hrem_ray_home(monkeypatch, tmp_path):
    """SQLite cannot live in a bucket: the driver's $HREM_RAY_HOME, else ~/.hrem-ray."""
    monkeypatch.delenv(tracking.URI_ENV, raising=False)
    monkeypatch.setenv(tracking.HOME_ENV, str(tmp_path / "home"))
    assert tracking.resolve_uri(None, "s3://b/runs") == f"sqlite:///{tmp_path}/home/mlflow.db"
    monkeypatch.delenv(tracking.HOME_ENV)
    home = Path("~/.hrem-ray/mlflow.db").expanduser()
    assert tracking.resolve_uri(None, "s3://b/runs") == f"sqlite:///{home}"
    assert tracking.resolve_uri(None, str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv(tracking.URI_ENV, "http://127.0.0.1:5000")
    assert tracking.resolve_uri(None, "s3://b/runs") == "http://127.0.0.1:5000"
    assert tracking.resolve_uri("http://h:1", "s3://b/runs") == "http://h:1"


def test_a_sweep_leaves_the_process_tracking_uri_as_it_was(monkeypatch, tmp_path):
    """Ray's MLflow callback sets MLFLOW_TRACKING_URI in the driver as a side effect; left
    there, every later run of the process would be tracked in the first sweep's store."""
    from hrem_ray.tune.sweep import TrialRuns

    monkeypatch.delenv(tracking.URI_ENV, raising=False)
    uri = f"sqlite:///{tmp_path / 'sweep' / tracking.STORE_FILE}"
    tracking.check_reachable(uri)
    TrialRuns(uri, parent_id="0" * 32, epochs=2).setup()
    assert MlflowClient(uri).get_experiment_by_name(tracking.EXPERIMENT) is not None
    assert tracking.URI_ENV not in os.environ
    assert tracking.resolve_uri(None, str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv(tracking.URI_ENV, "http://127.0.0.1:5000")
    TrialRuns(uri, parent_id="0" * 32, epochs=2).setup()
    assert os.environ[tracking.URI_ENV] == "http://127.0.0.1:5000"


def draws(space_file: str, seed: int | None, n: int = 4) -> list[dict]:
    space = load_space(space_file)
    gen = searcher(space, "rsum", seed)
    gen.add_configurations([Experiment("s", lambda c: None, config=space.param_space(),
                                       num_samples=n)])  # fmt: skip
    return [gen.next_trial().config for _ in range(n)]


def test_seeded_sweep_draws_repeat():
    first = draws("tune_spaces/default.yaml", 7)
    assert draws("tune_spaces/default.yaml", 7) == first
    assert draws("tune_spaces/default.yaml", 8) != first
    assert len({c["model.margin"] for c in first}) == 4


def test_unreachable_server_is_one_line_error_before_ray(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--tracking-uri", "http://127.0.0.1:9", "--data-path", str(tmp_path),
              "--dataset", "f30k", "--storage-path", str(tmp_path)])  # fmt: skip
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hrem-ray train: error: tracking server http://127.0.0.1:9 cannot")
    assert "\n" not in err
