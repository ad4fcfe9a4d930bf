"""Experiment tracking with MLflow: the one module that talks to it (docs/tracking.md).

Every call is made by a driver process (``hrem-ray train``, ``tune``, ``jobs/*.py``), never
by a Ray worker: rank 0 sends its live figures to the driver through the run's
``LineRelay``, so the store only has to be reachable from the driver. With no tracking URI
the store is an SQLite file beside the runs (``<storage-path>/mlflow.db``; for runs in object
storage, ``$HREM_RAY_HOME/mlflow.db``, by default ``~/.hrem-ray/``), which needs no server.
MLflow is imported lazily: the command line starts without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hrem_ray import storage

URI_ENV = "MLFLOW_TRACKING_URI"
REGISTRY_ENV = "MLFLOW_REGISTRY_URI"
EXPERIMENT = "hrem"  # the default experiment of runs and sweeps
RUN_FILE = "mlflow_run.json"  # <run>/: the tracking URI and run id a resumed run reattaches to
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# The folder of the embedded store of runs kept in object storage: $HREM_RAY_HOME, else this.
HOME_ENV, HOME_DEFAULT = "HREM_RAY_HOME", "~/.hrem-ray"
# Switches MLflow reads: no usage telemetry, no progress bars on artifact uploads.
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # fmt: skip
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a sweep's trials under it


class TrackingError(ValueError):
    """A tracking server that cannot be reached or a store that cannot be opened."""


def quiet() -> None:
    """Turn MLflow's telemetry and chatter off in this process and the ones it starts."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import mlflow  # noqa: F401  (it sets its loggers' levels on import: set them after)

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@contextlib.contextmanager
def own_uri_env() -> Iterator[None]:
    """Undo MLflow's ``set_tracking_uri``/``set_registry_uri`` side effect on the process
    environment (Ray's ``MLflowLoggerCallback`` calls them): left set, it would send every
    later run of this process to that store, whatever its ``--storage-path``."""
    saved = {key: os.environ.get(key) for key in (URI_ENV, REGISTRY_ENV)}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def resolve_uri(uri: str | None, storage_path: str) -> str:
    """The tracking URI: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded store
    beside the runs (a local ``storage_path``), or, for runs in object storage, where SQLite
    cannot live, in the driver's ``$HREM_RAY_HOME`` or ``~/.hrem-ray/`` (never the current
    folder: under ``ray job submit`` that is the job's unpacked working dir, which Ray may
    delete)."""
    uri = uri or os.environ.get(URI_ENV)
    if uri:
        return uri
    home = os.environ.get(HOME_ENV) or HOME_DEFAULT
    root = Path(home) if storage.is_remote(storage_path) else Path(storage_path)
    return f"sqlite:///{(root.expanduser() / STORE_FILE).resolve()}"


def run_uri(options: Any) -> str | None:
    """The tracking URI of a run's or sweep's ``RayRunOptions``; None with ``--no-tracking``."""
    return None if options.no_tracking else resolve_uri(options.tracking_uri, options.storage_path)


def _artifacts(uri: str) -> str | None:
    """An embedded store keeps its artifacts beside its file, not in MLflow's default
    ``./mlruns`` of whatever folder the driver runs in; a server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR).resolve().as_uri()


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in one line when the tracking server at ``uri`` does not answer its health
    check (called before Ray starts); a local store's folder is made here."""
    if not is_server(uri):
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as reply:
            reply.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"tracking server {uri} cannot be reached: {reason}") from None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": "1"}``: a config as MLflow params."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def data_identity(blocks: Iterable[Any], caps_path: str) -> str:
    """What identifies a split's content: its shards' manifest checksums, or, for precomp
    files, their sizes and modification times (hashing gigabytes per run would cost more
    than the check is worth)."""
    blocks = list(blocks)
    if blocks and all(b.sha256 for b in blocks):
        return "sha256:" + storage.sha256("".join(b.sha256 for b in blocks).encode())
    parts = []
    for path in sorted({b.path for b in blocks} | {caps_path}):
        if storage.is_remote(path):
            parts.append(f"{path}:{storage.file_size(path)}")
        else:
            st = os.stat(path)
            parts.append(f"{os.path.basename(path)}:{st.st_size}:{int(st.st_mtime)}")
    return "files:" + ";".join(parts)


def run_tags(*, dataset: str, data_id: str, workers: int, devices: str) -> dict[str, str]:
    """The tags every run carries: code, data, software and hardware."""
    import ray
    import torch

    from hrem_ray.checkpoint import code_version

    tags = {f"code.{k}": v for k, v in code_version().items()}
    tags.update({"dataset": dataset, "data.identity": data_id, "ray": ray.__version__,
                 "torch": torch.__version__, "python": platform.python_version(),
                 "workers": str(workers), "devices": devices})  # fmt: skip
    return tags


@dataclass
class Tracker:
    """One MLflow run, written through ``MlflowClient`` (no global state, thread-safe).

    ``log_metrics`` drops a point whose step a metric already has, so a restarted worker
    group that redoes part of an epoch, or a resumed run, continues its curves without
    duplicating steps."""

    uri: str
    run_id: str
    client: Any
    last_step: dict[str, int] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        uri: str,
        *,
        run_name: str,
        experiment: str = EXPERIMENT,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Tracker:
        """A new run, or run ``run_id`` reattached (its curves' last steps read back)."""
        quiet()
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        if run_id is not None:
            tracker = cls(uri, run_id, client)
            client.update_run(run_id, status="RUNNING")
            for key in client.get_run(run_id).data.metrics:
                history = client.get_metric_history(run_id, key)
                tracker.last_step[key] = max(m.step for m in history)
            return tracker
        found = client.get_experiment_by_name(experiment)
        if found is None:
            exp_id = client.create_experiment(experiment, artifact_location=_artifacts(uri))
        else:
            exp_id = found.experiment_id
        run = client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
        return cls(uri, run.info.run_id, client)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if step > self.last_step.get(k, -1)]  # fmt: skip
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)
            self.last_step.update((m.key, step) for m in fresh)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifacts(self, paths: Iterable[str]) -> None:
        """Local files or folders (a URI run's files are fetched first)."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="hrem-artifacts-") as tmp:
            for path in paths:
                if storage.is_remote(path):
                    if not storage.exists(path):
                        continue
                    if storage.is_dir(path):
                        path = str(storage.fetch_dir(path))
                    else:
                        local = Path(tmp, os.path.basename(path))
                        local.write_bytes(storage.read_bytes(path))
                        path = str(local)
                if os.path.isdir(path):
                    self.client.log_artifacts(self.run_id, path, os.path.basename(path))
                elif os.path.exists(path):
                    self.client.log_artifact(self.run_id, path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def save_run_ref(run_dir: str, tracker: Tracker) -> None:
    """Record the run id with the run, so ``--resume`` continues the same MLflow run."""
    ref = {"tracking_uri": tracker.uri, "run_id": tracker.run_id}
    storage.write_text(storage.join(run_dir, RUN_FILE), json.dumps(ref))


def saved_run_id(run_dir: str, uri: str) -> str | None:
    """The MLflow run id stored with the run when it was tracked at ``uri``."""
    path = storage.join(run_dir, RUN_FILE)
    if not storage.exists(path):
        return None
    ref = json.loads(storage.read_text(path))
    return ref["run_id"] if ref.get("tracking_uri") == uri else None


def ui_command(uri: str) -> str:
    """The command that opens MLflow's UI over the store at ``uri``."""
    if is_server(uri):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
