"""End to end on Ray: ``hrem-ray train`` on Ray Train, a worker killed mid-run, and
``ray job submit`` of ``jobs/train.py`` to a cluster started with ``ray start``.

Costs on 2 idle cores: about 35 s per fit and 6 s per ``ray.init`` (3-4 min for the file);
several times that while other Ray jobs load the machine, hence the wide timeouts. The
in-process tests share one ``ray.init(address="local", num_cpus=2)``; the job test starts
(and stops, by process group, never with the machine-wide ``ray stop``) its own cluster on
free loopback ports with its own temp dir, and runs first, so the two clusters never
compete for the 2 cores. See docs/ray.md.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pytest
import ray

from hrem_ray.checkpoint import load_checkpoint, load_train_state, read_record
from hrem_ray.cli import main
from hrem_ray.config import load_config
from hrem_ray.data.precomp import open_split
from hrem_ray.options import RayRunOptions
from hrem_ray.ray_runtime import ENV_DEFAULTS
from hrem_ray.synth import write_synthetic
from hrem_ray.testing import TINY_SETS, alive, is_loopback, wait_until_up
from hrem_ray.train.ray_train import train_ray
from tests.helpers import WorkerKiller

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's ray / hrem-ray
WORKERS = 2
BATCH = 16  # global batch: 8 rows per worker
TRAIN_IMAGES = 60  # x 5 captions = 300 pairs: 300 // 2 workers // 8 = 18 steps per epoch
SETS = [*TINY_SETS, "model.warmup=5", f"train.batch_size={BATCH}", "train.log_every=1000"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray_data")
    write_synthetic(
        root, train_images=TRAIN_IMAGES, dev_images=10, test_images=10, regions=6, dim=24,
        progress=None,
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def steps_per_epoch(synth_data) -> int:
    n = open_split(synth_data, "f30k", "train").n_captions
    return n // WORKERS // (BATCH // WORKERS)


@pytest.fixture(scope="module")
def local_ray():
    """One in-process 2-CPU Ray for the in-process tests, shut down at the module's end.

    ``address="local"`` always starts a fresh instance: a bare ``ray.init()`` would join
    the cluster of whoever last ran ``ray start`` on this machine. Worker output is not
    forwarded (``log_to_driver=False``) so the CLI's own stdout can be checked line by line.
    """
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _wait_cpus_released(timeout: float = 30.0) -> None:
    """A leaked placement group keeps CPUs reserved after ``fit()`` (ray-notes.md)."""
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0.0) == total


def _train_argv(data: Path, bert: str, storage: Path, name: str, epochs: int) -> list[str]:
    return [
        "--data-path", str(data), "--dataset", "f30k", "--bert-path", bert,
        "--epochs", str(epochs), "--num-workers", str(WORKERS), "--cpus-per-worker", "0.5",
        "--storage-path", str(storage), "--name", name,
        *[x for s in SETS for x in ("--set", s)],
    ]  # fmt: skip


def _best_from_stdout(out: str) -> Path:
    """The CLI's contract: its last line is ``best checkpoint: <path>``."""
    last = out.strip().splitlines()[-1]
    assert last.startswith("best checkpoint: "), out[-2000:]
    return Path(last.removeprefix("best checkpoint: "))


def _checkpoints(run: Path) -> list[Path]:
    """The checkpoint folders Ray kept for the run (not its checkpoint_manager_snapshot)."""
    return [p for p in run.glob("checkpoint_*") if p.is_dir()]


def _checkpoint_epochs(run: Path) -> list[int]:
    """The epoch recorded in each checkpoint folder of the run."""
    return sorted(read_record(p)["meta"]["epoch"] for p in _checkpoints(run))


def _latest_checkpoint(run: Path) -> Path:
    return max(_checkpoints(run), key=lambda p: read_record(p)["meta"]["epoch"])


def _tensorboard_steps(folder: Path) -> dict[str, list[int]]:
    """tag -> steps, from the newest event file (each write holds the whole history; on
    a restart TensorBoard purges the older file's steps that the new one repeats)."""
    from tensorboardX.proto.event_pb2 import Event

    newest = max(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    data, i, steps = newest.read_bytes(), 0, defaultdict(list)
    while i < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
        (n,) = struct.unpack("<Q", data[i : i + 8])
        event = Event.FromString(data[i + 12 : i + 12 + n])
        i += 12 + n + 4
        for value in event.summary.value:
            steps[value.tag].append(event.step)
    return steps


# --------------------------------------------------------------------------- ray start + jobs


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(ENV_DEFAULTS)
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM: stop now, no 30 s drain
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cluster_processes(head_pid: int, temp_dir: str) -> list[psutil.Process]:
    """Every process of the cluster started by ``head_pid`` (a session leader): its process
    group, its descendants, and anything naming or running inside its temp dir (the job
    driver runs in its own session, with its working dir unpacked under the temp dir)."""
    found: dict[int, psutil.Process] = {}
    try:
        head = psutil.Process(head_pid)
        for p in [head, *head.children(recursive=True)]:
            found[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            ours = os.getpgid(p.pid) == head_pid
            ours = ours or temp_dir in " ".join(p.info["cmdline"] or [])
            ours = ours or (p.info["cwd"] or "").startswith(temp_dir)
        except (psutil.Error, OSError):
            continue
        if ours and p.pid != os.getpid():
            found[p.pid] = p
    return list(found.values())


def _listening(procs: list[psutil.Process]) -> set[str]:
    """The addresses that ``procs`` accept connections on."""
    addresses = set()
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        addresses |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    return addresses


def _stop_cluster(head: subprocess.Popen, temp_dir: str) -> list[psutil.Process]:
    """Stop exactly the cluster of ``ray start --block`` (``head``); returns what it held.

    ``ray stop`` would stop every Ray process on the machine, other people's included.
    SIGTERM to ``ray start --block`` runs Ray's own teardown of its node; what is left
    after 30 s gets SIGKILL, strictly from the list of this cluster's processes.
    """
    procs = _cluster_processes(head.pid, temp_dir)
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait(timeout=10)
    psutil.wait_procs(alive(procs), timeout=30)
    for p in alive(procs):
        p.kill()
    psutil.wait_procs(alive(procs), timeout=10)
    return procs


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_job_submit_to_started_cluster(synth_data, tiny_bert, tmp_path):
    """``ray start --head`` + ``ray job submit --working-dir <repo> -- python jobs/train.py``:
    the job trains on the cluster, prints ``best checkpoint:``, and that checkpoint loads
    with ``hrem-ray eval``; the cluster is then stopped without touching any other."""
    env = _subprocess_env()
    # Ray puts unix sockets under the temp dir; pytest's tmp_path is too long for them.
    temp_dir = tempfile.mkdtemp(prefix="hr-", dir="/tmp")
    gcs, dashboard, client, agent = _free_ports(4)
    log = tmp_path / "ray_start.log"
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2",
            "--node-ip-address", "127.0.0.1", "--port", str(gcs),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
            "--dashboard-agent-listen-port", str(agent), "--temp-dir", temp_dir,
            "--disable-usage-stats",
        ],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        start_new_session=True,  # its own process group: stopped by pid, not `ray stop`
    )  # fmt: skip
    procs: list[psutil.Process] = []
    try:
        wait_until_up(f"http://127.0.0.1:{dashboard}/api/version", head, "ray start", 90, log)
        storage = tmp_path / "runs"
        # .gitignore already keeps .venv, data and runs out; these make it explicit.
        excludes = [".git", ".venv", "*.egg-info", "**/__pycache__", ".pytest_cache",
                    ".ruff_cache", "runs", "data", "work"]  # fmt: skip
        submit = subprocess.run(
            [
                str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                "--working-dir", str(REPO), "--runtime-env-json",
                json.dumps({"excludes": excludes}), "--",
                sys.executable, "jobs/train.py",
                *_train_argv(synth_data, tiny_bert, storage, "job", epochs=2),
            ],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=200,
        )  # fmt: skip
        out = submit.stdout + submit.stderr
        assert submit.returncode == 0, out[-4000:]
        assert "succeeded" in out, out[-4000:]
        # the uploaded working dir is the code only
        unpacked = Path(temp_dir, "session_latest", "runtime_resources", "working_dir_files")
        pkgs = [p for p in unpacked.glob("_ray_pkg_*") if p.is_dir()]
        assert len(pkgs) == 1, list(unpacked.iterdir())
        pkg = pkgs[0]
        assert (pkg / "hrem_ray" / "cli.py").is_file() and (pkg / "jobs" / "train.py").is_file()
        assert not (pkg / ".venv").exists() and not (pkg / ".git").exists()
        assert sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file()) < 5 * 2**20

        best = re.findall(r"^best checkpoint: (\S.*)$", out, flags=re.MULTILINE)
        assert best, out[-4000:]
        best_path = Path(best[-1].strip())
        assert best_path.parent == storage / "job" and best_path.is_dir()
        history = json.loads((storage / "job" / "metrics.json").read_text())
        assert [row["epoch"] for row in history] == [0, 1]

        evaluation = subprocess.run(
            [str(BIN / "hrem-ray"), "eval", "--checkpoint", str(best_path),
             "--data-path", str(synth_data), "--dataset", "f30k", "--split", "test",
             "--json", str(tmp_path / "eval.json")],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert evaluation.returncode == 0, evaluation.stderr[-3000:]
        assert "rsum" in json.loads((tmp_path / "eval.json").read_text())
        listening = _listening(_cluster_processes(head.pid, temp_dir))
        assert listening and all(is_loopback(ip) for ip in listening), listening
    finally:
        procs = _stop_cluster(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert len(procs) >= 3  # gcs_server, raylet, dashboard, ... were found and stopped
    assert not alive(procs), alive(procs)
    assert not alive(_cluster_processes(head.pid, temp_dir))


# --------------------------------------------------------------------------- in-process


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(360)
def test_cli_train_eval_refuse_and_resume(
    local_ray, synth_data, tiny_bert, steps_per_epoch, tmp_path, capsys
):
    """``hrem-ray train`` on Ray Train with 2 workers: best checkpoint on the last line,
    loadable and evaluable; run files with one row per epoch; the same --name again is a
    one-line error; --resume with more epochs continues where the run stopped."""
    storage = tmp_path / "runs"
    run = storage / "cli"
    main(["train", *_train_argv(synth_data, tiny_bert, storage, "cli", epochs=2)])
    best = _best_from_stdout(capsys.readouterr().out)
    _wait_cpus_released()

    assert best == run / "best"
    kept = {read_record(c)["meta"]["metrics"]["rsum"]: c for c in _checkpoints(run)}
    top = kept[max(kept)]  # best/ is a copy of the kept checkpoint with the highest dev rsum
    for name in ("model.safetensors", "config.json", "train_state.pt"):
        assert (best / name).read_bytes() == (top / name).read_bytes(), name
    ck = load_checkpoint(best)
    assert ck.meta["epoch"] in (0, 1)
    assert ck.config.model.embed_size == 32
    main(["eval", "--checkpoint", str(best), "--data-path", str(synth_data), "--dataset", "f30k",
          "--split", "test", "--json", str(tmp_path / "eval.json")])  # fmt: skip
    assert "rsum" in json.loads((tmp_path / "eval.json").read_text())
    capsys.readouterr()

    history = json.loads((run / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [0, 1]
    assert all(row["steps"] == steps_per_epoch for row in history)
    with open(run / "metrics.csv", newline="") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [0, 1]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _tensorboard_steps(run / "tensorboard")["rsum"] == [1, 2]
    assert _checkpoint_epochs(run) == [0, 1]

    # the same --name without --resume: one line, exit status 2, the run untouched
    with pytest.raises(SystemExit) as exc:
        main(["train", *_train_argv(synth_data, tiny_bert, storage, "cli", epochs=3)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("hrem-ray train: error:")]
    assert len(errors) == 1 and "--resume" in errors[0], err
    assert "Traceback" not in err
    assert _checkpoint_epochs(run) == [0, 1]

    # --resume with one more epoch: runs only epoch 2
    main(["train", *_train_argv(synth_data, tiny_bert, storage, "cli", epochs=3), "--resume"])
    best = _best_from_stdout(capsys.readouterr().out)
    _wait_cpus_released()
    assert best.parent == run
    load_checkpoint(best)
    resumed = json.loads((run / "metrics.json").read_text())
    assert [row["epoch"] for row in resumed] == [0, 1, 2]
    assert resumed[:2] == history  # restored from the checkpoint, not trained again
    assert _tensorboard_steps(run / "tensorboard")["rsum"] == [1, 2, 3]
    state = load_train_state(_latest_checkpoint(run))["state"]
    assert state["epoch"] == 3
    assert state["iteration"] == 3 * steps_per_epoch


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(360)
def test_killed_worker_resumes_from_checkpoint(
    local_ray, synth_data, tiny_bert, steps_per_epoch, tmp_path
):
    """A training worker SIGKILLed during epoch 2: with max_failures=1 a new worker group
    resumes from the epoch-1 checkpoint and finishes; no epoch is trained or recorded
    twice and the iteration count is that of an uninterrupted run."""
    epochs = 2
    cfg = load_config(None, [*SETS, f"data.data_path={synth_data}", f"model.bert_path={tiny_bert}",
                             f"train.epochs={epochs}"])  # fmt: skip
    options = RayRunOptions(
        storage_path=str(tmp_path / "runs"), name="ft", num_workers=WORKERS,
        cpus_per_worker=0.5, max_failures=1, keep_checkpoints=10,
    )  # fmt: skip
    run = tmp_path / "runs" / "ft"
    # written by Ray's checkpoint manager once a reported checkpoint is registered
    killer = WorkerKiller((run / "checkpoint_manager_snapshot.json").exists, WORKERS)
    killer.start()
    lines: list[str] = []
    best = train_ray(cfg, options, log=lines.append)
    killer.stop()
    _wait_cpus_released()

    assert killer.error is None, killer.error
    assert killer.killed is not None and not psutil.pid_exists(killer.killed)
    assert len(killer.groups) == 2  # the whole group was restarted, once

    load_checkpoint(best)
    # keep_checkpoints=10: a restart from scratch would have left a second epoch-0 folder; an
    # epoch-1 checkpoint the dying group had uploaded, unregistered, may sit beside the new one
    saved = _checkpoint_epochs(run)
    assert saved.count(0) == 1 and set(saved) == {0, 1} and len(saved) <= 3, saved
    history = json.loads((run / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == list(range(epochs))
    assert sum(row["steps"] for row in history) == epochs * steps_per_epoch
    state = load_train_state(_latest_checkpoint(run))["state"]
    assert state["epoch"] == epochs
    assert state["iteration"] == epochs * steps_per_epoch
    assert [row["epoch"] for row in state["history"]] == list(range(epochs))
    # epoch 0's row is the one saved before the kill (a re-run would differ, in timings)
    first = min(_checkpoints(run), key=lambda p: read_record(p)["meta"]["epoch"])
    assert history[0] == load_train_state(first)["state"]["history"][0]
