"""A real two-node Ray cluster on this machine, with S3 as the only shared storage.

The head node has no CPUs and the worker node has them all, so no Train worker runs on the
driver's node; an S3 server (moto) holds every run, sweep, checkpoint and gallery. All of it,
clients included, runs in a network namespace that holds only loopback, set up by
tests/cluster_node.py (why: docs/cluster.md, "Testing"); pytest stays outside and sends each
client command (``ray job submit``, ``hrem-ray eval``, ...) to that process to run. The data
and the tiny BERT are local folders here: on a real cluster these paths must exist on every
node (docs/cluster.md); the worker node is on this machine, so they do.

One cluster for the module; the tests run in file order, the lost-node test last because it
replaces the worker node, and serving reads the training test's checkpoint. Ray token auth is
on, as on a real cluster. Measured at a load average of 8-12 on 2 cores: start-up 43 s,
train + eval 120 s, bad input 32 s, tune 171 s (to its failure), serve 49 s, lost node 233 s;
index from shards 147 s at a load average of 10-17 (247 s at 16-20, the job 180 s of it).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from hrem_ray.data.precomp import open_split
from hrem_ray.index.gallery import CAPTION_EMBS, CAPTIONS, IMAGE_EMBS, MANIFEST
from hrem_ray.storage import MARKER, sha256
from hrem_ray.synth import write_synthetic
from hrem_ray.testing import TINY_SETS, alive, is_loopback

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKERS = 2
BATCH = 16  # global batch: 8 rows per worker
TRAIN_IMAGES = 60  # x 5 captions = 300 pairs: 18 steps per epoch with 2 workers
SETS = [*TINY_SETS, "model.warmup=5", f"train.batch_size={BATCH}"]
# the job uploads the code only (.gitignore keeps the rest out; these make it explicit)
EXCLUDES = [".git", ".venv", "*.egg-info", "**/__pycache__", ".pytest_cache", ".ruff_cache",
            "runs", "data", "work"]  # fmt: skip
TIMES: dict[str, float] = {}


class Namespace:
    """The client side of tests/cluster_node.py: one JSON line out, one back."""

    def __init__(self, root: Path):
        self.root = root
        self.proc = subprocess.Popen(
            ["unshare", "-n", "bash", "-c",
             f"ip link set lo up && exec {sys.executable} -m tests.cluster_node {root}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
        )  # fmt: skip
        self.host_net = os.readlink("/proc/self/ns/net")
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def wait_ready(self, timeout: float) -> None:
        first = self._reply(timeout)
        assert "ready" in first, first
        self.info = first["ready"]
        assert self.net != self.host_net

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)

    def _reply(self, timeout: float) -> dict:
        try:
            return json.loads(self._lines.get(timeout=timeout))
        except queue.Empty:
            raise TimeoutError(f"cluster_node: no answer in {timeout} s") from None

    def call(self, timeout: float = 60, **cmd) -> dict:
        self.proc.stdin.write(json.dumps({**cmd, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout + 30)

    def run(self, *argv: str, timeout: float = 120, env: dict | None = None) -> dict:
        return self.call(timeout, op="run", argv=list(argv), env=env or {})

    def python(self, code: str, timeout: float = 60) -> dict:
        return self.run(sys.executable, "-c", code, timeout=timeout)

    @property
    def net(self) -> str:
        return os.readlink(f"/proc/{self.proc.pid}/ns/net")

    def processes(self) -> list[psutil.Process]:
        """Every process in this namespace (all of them ours: nothing else can enter it)."""
        if self.proc.poll() is not None:
            return []
        net, found = self.net, []
        for p in psutil.process_iter():
            if _net(p) == net and p.pid != self.proc.pid:
                found.append(p)
        return found

    def close(self) -> list[psutil.Process]:
        """End of input: the helper stops its process groups. Whatever is still in the
        namespace 60 s later (say, a job driver in a session of its own) gets SIGKILL."""
        procs = [p for p in self.processes() if self.net != self.host_net]
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        psutil.wait_procs(alive(procs), timeout=60)
        for p in alive(procs):
            p.kill()
        psutil.wait_procs(alive(procs), timeout=10)
        return procs


@pytest.fixture(scope="module")
def ns(tiny_bert):
    root = Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp"))  # short: Ray's unix sockets
    write_synthetic(
        root / "data", train_images=TRAIN_IMAGES, dev_images=10, test_images=10, regions=6,
        dim=24, progress=None,
    )  # fmt: skip
    start = time.monotonic()
    space = Namespace(root)
    space.bert = tiny_bert
    try:
        space.wait_ready(timeout=240)
        TIMES["start-up"] = time.monotonic() - start
        yield space
    finally:
        procs = space.close()
        leftovers = alive(procs)
        shutil.rmtree(root, ignore_errors=True)
        print("\ncluster test times (s):", json.dumps({k: round(v) for k, v in TIMES.items()}))
        assert not leftovers, leftovers


# --------------------------------------------------------------------------- helpers


def _train_argv(ns: Namespace, storage: str, name: str, epochs: int, *extra: str) -> list[str]:
    return [
        "--data-path", str(ns.root / "data"), "--dataset", "f30k", "--bert-path", ns.bert,
        "--epochs", str(epochs), "--num-workers", str(WORKERS), "--cpus-per-worker", "0.5",
        "--storage-path", storage, "--name", name, *extra,
        *[x for s in SETS for x in ("--set", s)],
    ]  # fmt: skip


def _submit(ns: Namespace, script: str, *args: str) -> list[str]:
    """``ray job submit`` of ``jobs/<script>`` to the head's dashboard on loopback, with the
    S3 and tracking settings passed to the job as env_vars (a real cluster gets the S3 ones
    from its instance profile, docs/cluster.md)."""
    aws = {k: v for k, v in ns.info["env"].items() if k.startswith(("AWS_", "MLFLOW_"))}
    runtime_env = {"env_vars": aws, "excludes": EXCLUDES}
    return [
        str(BIN / "ray"), "job", "submit", "--address",
        f"http://127.0.0.1:{ns.info['dashboard']}", "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", f"jobs/{script}", *args,
    ]  # fmt: skip


def _best_uri(out: str) -> str:
    best = re.findall(r"^best checkpoint: (\S+)\s*$", out, flags=re.MULTILINE)
    assert best, out[-4000:]
    return best[-1]


# client code run in the namespace: the keys under prefix ``p`` of bucket ``b`` (``s3``: boto3)
S3_LIST = ("[o['Key'] for page in s3.get_paginator('list_objects_v2').paginate(Bucket=b, "
           "Prefix=p) for o in page.get('Contents', [])]")  # fmt: skip


def _s3_keys(ns: Namespace, prefix: str) -> list[str]:
    code = (
        f"import boto3, json; s3 = boto3.client('s3'); b, p = {ns.info['bucket']!r}, "
        f"{prefix!r}; print(json.dumps({S3_LIST}))"
    )
    r = ns.python(code)
    assert r["rc"] == 0, r["err"][-2000:]
    return json.loads(r["out"])


def _s3_text(ns: Namespace, key: str) -> str:
    code = (
        f"import boto3, sys; sys.stdout.write(boto3.client('s3').get_object(Bucket="
        f"{ns.info['bucket']!r}, Key={key!r})['Body'].read().decode())"
    )
    r = ns.python(code)
    assert r["rc"] == 0, r["err"][-2000:]
    return r["out"]


def _s3_objects(ns: Namespace, *prefixes: str) -> dict[str, bytes]:
    """Every object under ``prefixes`` with its bytes, in one client run (small objects:
    they come back as base64 in JSON)."""
    code = (
        f"import base64, boto3, json; s3 = boto3.client('s3'); b = {ns.info['bucket']!r}; "
        "print(json.dumps({k: base64.b64encode(s3.get_object(Bucket=b, Key=k)['Body'].read())"
        f".decode() for p in {list(prefixes)!r} for k in {S3_LIST}}}))"
    )
    r = ns.python(code)
    assert r["rc"] == 0, r["err"][-2000:]
    return {k: base64.b64decode(v) for k, v in json.loads(r["out"]).items()}


def _hrem_ray(ns: Namespace, *commands: list[str], timeout: float = 240) -> dict:
    """Several ``hrem-ray`` commands, in order, in one process in the namespace: one start of
    torch instead of one per command."""
    code = f"from hrem_ray.cli import main\nfor argv in {list(commands)!r}:\n    main(argv)"
    return ns.python(code, timeout=timeout)


def _checkpoint_epochs(ns: Namespace, run: str) -> list[int]:
    """The epoch recorded in each of the run's Ray checkpoint folders in the bucket."""
    folder = re.compile(rf"^{run}/checkpoint_[^/]+/config\.json$")  # not backbone/config.json
    keys = [k for k in _s3_keys(ns, f"{run}/checkpoint_") if folder.match(k)]
    return sorted(json.loads(_s3_text(ns, k))["meta"]["epoch"] for k in keys)


def _net(p: psutil.Process) -> str | None:
    try:
        return os.readlink(f"/proc/{p.pid}/ns/net")
    except OSError:  # gone meanwhile
        return None


def _no_local_s3_folder(ns: Namespace) -> None:
    """An ``s3://`` path treated as a local one leaves an ``s3:`` folder in the cwd."""
    here = [REPO, ns.root, *ns.root.glob("ray*/session_*/runtime_resources/working_dir_files/*")]
    assert not [p / "s3:" for p in here if (p / "s3:").exists()]


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(600)
def test_train_job_to_s3_then_eval(ns):
    """``ray job submit`` of jobs/train.py to the two-node cluster, 2 epochs, 2 workers on
    the worker node, everything written to the bucket; ``hrem-ray eval`` of the printed URI.
    Every listening socket of the cluster is on loopback, inside the namespace."""
    start = time.monotonic()
    ns.call(
        op="spawn",
        name="trainjob",
        argv=_submit(ns, "train.py", *_train_argv(ns, "s3://hrem/runs", "job", 2)),
    )
    live = ns.python(LIVE_RUN.format(name="job"), timeout=300)  # while the job goes
    done = ns.call(op="wait", name="trainjob", timeout=420)
    out = (ns.root / "trainjob.log").read_text()
    assert live["rc"] == 0, live["err"][-2000:] + out[-3000:]
    assert done["rc"] == 0 and "succeeded" in out, out[-4000:]
    best = _best_uri(out)
    assert best == "s3://hrem/runs/job/best", best
    _check_tracked_run(ns, json.loads(live["out"]), best)

    keys = _s3_keys(ns, "runs/job/")
    for name in ("metrics.json", "metrics.csv", "curves.png", "best/model.safetensors",
                 "best/config.json"):  # fmt: skip
        assert f"runs/job/{name}" in keys, keys
    assert any(k.startswith("runs/job/tensorboard/events.out.tfevents") for k in keys), keys
    history = json.loads(_s3_text(ns, "runs/job/metrics.json"))
    assert [row["epoch"] for row in history] == [0, 1]
    steps = open_split(ns.root / "data", "f30k", "train").n_captions // BATCH
    assert all(row["steps"] == steps for row in history)
    _no_local_s3_folder(ns)

    ev = ns.run(str(BIN / "hrem-ray"), "eval", "--checkpoint", best, "--data-path",
                str(ns.root / "data"), "--dataset", "f30k", "--split", "test", "--json",
                str(ns.root / "eval.json"), timeout=180)  # fmt: skip
    assert ev["rc"] == 0, ev["err"][-3000:]
    assert 0 <= json.loads((ns.root / "eval.json").read_text())["rsum"] <= 600

    # sockets as the namespace sees them (psutil reads the caller's /proc/net)
    code = ("import json, psutil; print(json.dumps(sorted({c.laddr.ip for c in "
            "psutil.net_connections('inet') if c.status == 'LISTEN'})))")  # fmt: skip
    listening = ns.python(code)
    assert listening["rc"] == 0, listening["err"][-2000:]
    assert all(is_loopback(ip) for ip in json.loads(listening["out"])), listening["out"]
    # nothing we started left the namespace (a process listening outside it would have)
    started = psutil.Process(ns.proc.pid).children(recursive=True)
    assert len(started) > 5 and {_net(p) for p in started} <= {ns.net, None}
    TIMES["train+eval"] = time.monotonic() - start


# In the namespace, against its mlflow server: poll the run named {name} until rank 0's live
# points are in while it is still RUNNING; print what was seen then.
LIVE_RUN = """
import json, time
from mlflow import MlflowClient
c = MlflowClient()
deadline = time.monotonic() + 280
while True:
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()],
                         "attributes.run_name = '{name}'")
    if runs and "train/loss" in runs[0].data.metrics:
        run = runs[0]
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")]
        print(json.dumps({{"id": run.info.run_id, "status": run.info.status, "steps": steps}}))
        break
    assert time.monotonic() < deadline, "no live metrics"
    time.sleep(0.5)
"""


def _check_tracked_run(ns: Namespace, live: dict, best: str) -> None:
    """The job's run in the tracking server: live points seen while it was RUNNING, then
    FINISHED with one point per step (no duplicates), its config and data identity, the best
    checkpoint by URI, and the metrics files as artifacts in the bucket."""
    assert live["status"] == "RUNNING" and live["steps"], live
    code = f"""
import json
from mlflow import MlflowClient
c = MlflowClient()
run = c.get_run({live["id"]!r})
steps = [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")]
dev = [m.step for m in c.get_metric_history(run.info.run_id, "dev/rsum")]
files = [a.path for a in c.list_artifacts(run.info.run_id)]
print(json.dumps({{"status": run.info.status, "steps": steps, "dev": dev,
                  "params": run.data.params, "tags": run.data.tags, "artifacts": files}}))
"""
    r = ns.python(code)
    assert r["rc"] == 0, r["err"][-2000:]
    run = json.loads(r["out"])
    assert run["status"] == "FINISHED", run["status"]
    assert len(run["steps"]) == len(set(run["steps"])), run["steps"]  # no step twice
    assert len(run["steps"]) >= len(live["steps"]), (run["steps"], live["steps"])
    assert len(run["dev"]) == 2, run["dev"]
    assert run["params"]["train.epochs"] == "2" and run["params"]["run.num_workers"] == "2"
    assert run["tags"]["best_checkpoint"] == best and run["tags"]["dataset"] == "f30k"
    assert run["tags"]["data.identity"].startswith("files:"), run["tags"]
    assert {"metrics.json", "metrics.csv", "curves.png"} <= set(run["artifacts"]), run
    assert any(k.startswith("mlflow/") for k in _s3_keys(ns, "mlflow/"))


# a learnable world for the sharded run: 2 epochs of 400 images lift dev rsum from about 60
# (a fresh model, 50 dev images) to about 280 (measured with `hrem-ray train --local`)
SHARD_SETS = [
    *[f"model.{k}={v}" for k, v in dict(img_dim=64, embed_size=32, num_heads=4, ff_dim=64,
                                         mlp_hidden=32, dropout=0.0, warmup=1000).items()],
    *[f"train.{k}={v}" for k, v in dict(batch_size=32, lr=2e-3, bert_lr_factor=1.0,
                                         lr_decay_epochs=[], log_every=1000).items()],
]  # fmt: skip


@pytest.mark.timeout(900)
def test_train_from_shards_in_s3(ns):
    """``hrem-ray shard`` of train and dev into the bucket, then a 2-epoch, 2-worker job that
    reads both from there through the node cache, with a budget of a third of the split (no
    local feature file is given to it): its dev rsum is far above the fresh model's, each
    epoch took the plan's steps, and the epochs were shuffled in windows of 2 shards."""
    start = time.monotonic()
    data = ns.root / "sdata"
    write_synthetic(data, train_images=400, dev_images=50, test_images=5, regions=12, dim=64,
                    progress=None)  # fmt: skip
    for split in ("train", "dev"):
        r = ns.run(str(BIN / "hrem-ray"), "shard", "--data-path", str(data), "--dataset",
                   "f30k", "--split", split, "--out", "s3://hrem/sharded", "--rows-per-shard",
                   "40", "--dtype", "float16", timeout=120)  # fmt: skip
        assert r["rc"] == 0 and "100%" in r["out"], r["err"][-3000:]
    keys = _s3_keys(ns, "sharded/f30k_precomp/train/")
    assert len([k for k in keys if k.endswith(".npy")]) == 10 and keys[-1].endswith(
        "shard-00009.npy"
    )
    sets = [x for s in SHARD_SETS for x in ("--set", s)]
    args = ["--data-path", "s3://hrem/sharded", "--dataset", "f30k", "--bert-path", ns.bert,
            "--epochs", "2", "--num-workers", str(WORKERS), "--cpus-per-worker", "0.5",
            "--storage-path", "s3://hrem/runs", "--name", "sharded", *sets,
            "--set", "data.cache_limit=250KB"]  # fmt: skip
    job = ns.run(*_submit(ns, "train.py", *args), timeout=720)
    out = job["out"] + job["err"]
    assert job["rc"] == 0 and "succeeded" in out, out[-4000:]
    assert "10 shards in s3://hrem/sharded/f30k_precomp/train (node cache); windows of 2" in out
    history = json.loads(_s3_text(ns, "runs/sharded/metrics.json"))
    assert [row["epoch"] for row in history] == [0, 1]
    assert all(row["steps"] == 5 * 400 // 32 for row in history)

    fresh = ns.root / "fresh"
    r = ns.run(str(BIN / "hrem-ray"), "init-checkpoint", "--out", str(fresh), "--bert-path",
               ns.bert, *sets, timeout=120)  # fmt: skip
    assert r["rc"] == 0, r["err"][-3000:]
    r = ns.run(str(BIN / "hrem-ray"), "eval", "--checkpoint", str(fresh), "--data-path",
               str(data), "--dataset", "f30k", "--split", "dev", "--json",
               str(ns.root / "fresh.json"), timeout=120)  # fmt: skip
    assert r["rc"] == 0, r["err"][-3000:]
    fresh_rsum = json.loads((ns.root / "fresh.json").read_text())["rsum"]
    best = max(row["rsum"] for row in history)
    assert best > 2 * fresh_rsum and best > fresh_rsum + 100, (fresh_rsum, history)
    TIMES["sharded train"] = time.monotonic() - start


@pytest.mark.timeout(300)
def test_bad_storage_is_one_line_before_training(ns):
    """An unreachable endpoint, a missing bucket, wrong credentials (jobs/train.py, as the
    job runs it) and a URI with no checkpoint (eval): exit 2 and one error line naming the
    URI, and nothing trained or written."""
    start = time.monotonic()
    closed = ns.python("from hrem_ray.ray_runtime import free_port; print(free_port())")
    wrong = {"AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong",
             "AWS_ENDPOINT_URL": ns.info["strict"]}  # fmt: skip
    cases = [
        ("s3://hrem/bad", {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed['out'].strip()}"},
         "cannot reach"),
        ("s3://no-such-bucket/runs", {}, "no such bucket"),
        ("s3://hrem/bad", wrong, "access denied"),
    ]  # fmt: skip
    address = f"127.0.0.1:{ns.info['gcs']}"
    for uri, env, why in cases:
        r = ns.run(sys.executable, "jobs/train.py", *_train_argv(ns, uri, "bad", 1),
                   "--address", address, env=env, timeout=120)  # fmt: skip
        _assert_one_line(r, "train", uri, why)
        assert "epoch" not in r["out"], r["out"]
    r = ns.run(str(BIN / "hrem-ray"), "eval", "--checkpoint", "s3://hrem/runs/none",
               "--data-path", str(ns.root / "data"), "--dataset", "f30k", "--split", "test",
               timeout=120)  # fmt: skip
    _assert_one_line(r, "eval", "s3://hrem/runs/none", "no checkpoint")
    assert _s3_keys(ns, "bad") == []
    TIMES["bad input"] = time.monotonic() - start


def _assert_one_line(r: dict, command: str, uri: str, why: str) -> None:
    assert r["rc"] == 2, (r["rc"], r["err"][-3000:])
    assert "Traceback" not in r["err"], r["err"][-3000:]
    errors = [line for line in r["err"].splitlines() if line.startswith("hrem-ray")]
    assert len(errors) == 1, r["err"][-3000:]
    assert errors[0].startswith(f"hrem-ray {command}: error: "), errors
    assert uri in errors[0] and why in errors[0], errors[0]


@pytest.mark.timeout(600)
def test_tune_sweep_to_s3(ns):
    """A 2-trial sweep submitted as a job: trials.json and best/ in the bucket, the printed
    best checkpoint under the sweep, no local ``s3:`` folder; in the tracking server a parent
    run with a child per trial, and the best registered (``--register``) by its URI."""
    start = time.monotonic()
    args = [
        "--space", "tune_spaces/default.yaml", "--num-samples", "2",
        "--max-concurrent-trials", "2", "--data-path", str(ns.root / "data"),
        "--dataset", "f30k", "--bert-path", ns.bert, "--epochs", "1", "--num-workers", "1",
        "--cpus-per-worker", "0.5",
        "--storage-path", "s3://hrem/sweeps", "--name", "sweep",
        "--register", "hrem-sweep", "--alias", "best",
        *[x for s in SETS for x in ("--set", s)],
    ]  # fmt: skip
    job = ns.run(*_submit(ns, "tune.py", *args), timeout=480)
    out = job["out"] + job["err"]
    assert job["rc"] == 0 and "succeeded" in out, out[-4000:]
    best = _best_uri(out)
    assert best.startswith("s3://hrem/sweeps/sweep/"), out[-2000:]
    assert "registered models:/hrem-sweep/1 (alias best" in out, out[-2000:]
    code = """
import json
from mlflow import MlflowClient
c = MlflowClient()
runs = c.search_runs([c.get_experiment_by_name("hrem").experiment_id])
parent = [r for r in runs if r.info.run_name == "sweep"][0]
kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
v = c.get_model_version_by_alias("hrem-sweep", "best")
print(json.dumps({"parent": parent.info.status, "best": parent.data.tags.get("best_checkpoint"),
                  "kids": [sorted(k.data.metrics) for k in kids], "source": v.source}))
"""
    r = ns.python(code)
    assert r["rc"] == 0, r["err"][-2000:]
    tracked = json.loads(r["out"])
    assert tracked["parent"] == "FINISHED" and tracked["best"] == best, tracked
    assert len(tracked["kids"]) == 2 and all("rsum" in k for k in tracked["kids"]), tracked
    assert tracked["source"] == best, tracked
    keys = _s3_keys(ns, "sweeps/sweep/")
    assert "sweeps/sweep/trials.json" in keys and "sweeps/sweep/best/config.json" in keys, keys
    assert len(json.loads(_s3_text(ns, "sweeps/sweep/trials.json"))) == 2
    _no_local_s3_folder(ns)
    TIMES["tune"] = time.monotonic() - start


@pytest.mark.timeout(420)
def test_serve_from_s3(ns):
    """``hrem-ray index`` into the bucket, ``hrem-ray register`` of the s3 checkpoint as
    ``models:/hrem@champion`` in the tracking server, then ``hrem-ray serve`` of that reference
    and the gallery on the cluster answers a text query with the gallery's best images, and
    its ``/readyz`` names the registered version."""
    start = time.monotonic()
    best = "s3://hrem/runs/job/best"  # written by test_train_job_to_s3_then_eval
    reg = ns.run(str(BIN / "hrem-ray"), "register", best, "--name", "hrem", "--alias",
                 "champion", timeout=120)  # fmt: skip
    assert reg["rc"] == 0 and "models:/hrem/1" in reg["out"], reg["err"][-3000:]
    idx = ns.run(str(BIN / "hrem-ray"), "index", "--checkpoint", best, "--data-path",
                 str(ns.root / "data"), "--dataset", "f30k", "--split", "test", "--out",
                 "s3://hrem/gallery", timeout=180)  # fmt: skip
    assert idx["rc"] == 0, idx["err"][-3000:]
    port = ns.python("from hrem_ray.ray_runtime import free_port; print(free_port())")["out"]
    port = int(port)
    ns.call(op="spawn", name="serve", argv=[
        str(BIN / "hrem-ray"), "serve", "--checkpoint", "models:/hrem@champion", "--gallery",
        "s3://hrem/gallery",
        "--port", str(port), "--max-replicas", "1", "--address", f"127.0.0.1:{ns.info['gcs']}",
    ])  # fmt: skip
    try:
        code = f"""
import json, time, urllib.request
deadline = time.monotonic() + 240
while True:
    try:
        ready = json.load(urllib.request.urlopen("http://127.0.0.1:{port}/readyz", timeout=5))
        break
    except OSError:
        assert time.monotonic() < deadline, "not ready"
        time.sleep(1)
req = urllib.request.Request("http://127.0.0.1:{port}/search/text", method="POST",
    data=json.dumps({{"query": "a dog", "k": 3}}).encode(),
    headers={{"content-type": "application/json"}})
print(json.dumps({{"ready": ready, **json.load(urllib.request.urlopen(req, timeout=30))}}))
"""
        r = ns.python(code, timeout=300)
        log = (ns.root / "serve.log").read_text()[-3000:]
        assert r["rc"] == 0, r["err"][-2000:] + log
        reply = json.loads(r["out"])
        assert reply["ready"]["registry"] == [{"name": "hrem", "version": "1"}], reply
        results = reply["results"]
        ids, scores = [h["id"] for h in results], [h["score"] for h in results]
        assert len(set(ids)) == 3 and all(isinstance(i, int) for i in ids), results
        assert scores == sorted(scores, reverse=True), results
    finally:
        ns.call(op="stop", name="serve")
    TIMES["serve"] = time.monotonic() - start


INDEX_BATCH = 3  # 10 test images, 50 captions: 4 + 17 encode batches (blocks), last ones short


@pytest.mark.timeout(480)
def test_index_job_from_s3_shards_is_byte_identical(ns):
    """``hrem-ray index --num-workers 2`` as a job (jobs/index.py): 2 replicas on the worker
    node encode the test split from shards in the bucket (4 rows a shard, so batches straddle
    shards) with a checkpoint from the bucket, and the driver on the head writes the gallery
    there. Every file is byte-identical to the single-process build's (no Ray, the local
    precomp split the shards came from), the manifest too apart from ``created`` (the build's
    time); both galleries are complete (their markers list every file with its true SHA-256);
    the job printed images/s and the ETA."""
    start = time.monotonic()
    ckpt, shards = "s3://hrem/index/checkpoint", "s3://hrem/index/shards"
    split = ["--dataset", "f30k", "--split", "test"]
    encode = ["--checkpoint", ckpt, *split, "--batch-size", str(INDEX_BATCH)]
    data = str(ns.root / "data")
    prep = _hrem_ray(
        ns,
        ["init-checkpoint", "--out", ckpt, "--bert-path", ns.bert,
         *[x for s in TINY_SETS for x in ("--set", s)]],
        ["shard", "--data-path", data, *split, "--out", shards, "--rows-per-shard", "4"],
        ["index", *encode, "--data-path", data, "--out", "s3://hrem/index/single"],
    )  # fmt: skip
    assert prep["rc"] == 0 and "wrote s3://hrem/index/single" in prep["out"], prep["err"][-3000:]
    job = ns.run(*_submit(ns, "index.py", *encode, "--data-path", shards, "--num-workers",
                          str(WORKERS), "--out", "s3://hrem/index/ray"), timeout=360)  # fmt: skip
    out = job["out"] + job["err"]
    assert job["rc"] == 0 and "succeeded" in out, out[-4000:]
    progress = r"^encode images \[#+\] 100% 10/10 images, [\d.]+ images/s, ETA 0s$"
    assert re.search(progress, out, flags=re.MULTILINE), out[-3000:]
    assert "wrote s3://hrem/index/ray" in out, out[-3000:]

    objects = _s3_objects(ns, "index/single/", "index/ray/")
    single, ray = (_complete_gallery(objects, f"index/{name}/") for name in ("single", "ray"))
    assert set(single) == {MANIFEST, IMAGE_EMBS, CAPTION_EMBS, CAPTIONS}
    assert set(ray) == set(single)
    for name in (IMAGE_EMBS, CAPTION_EMBS, CAPTIONS):
        assert ray[name] == single[name], name
    manifests = [json.loads(files[MANIFEST]) for files in (single, ray)]
    for manifest in manifests:
        del manifest["created"]
    assert manifests[0] == manifests[1], manifests
    assert manifests[1]["checkpoint"] == ckpt and manifests[1]["n_images"] == 10
    TIMES["index"] = time.monotonic() - start


def _complete_gallery(objects: dict[str, bytes], prefix: str) -> dict[str, bytes]:
    """The files of the gallery at ``prefix`` by name, once its marker is found to list every
    one of them with the SHA-256 it has (the gallery is complete)."""
    files = {k[len(prefix) :]: v for k, v in objects.items() if k.startswith(prefix)}
    listed = json.loads(files.pop(MARKER))["files"]
    assert {name: f["sha256"] for name, f in listed.items()} == {
        name: sha256(data) for name, data in files.items()
    }, (prefix, listed)
    return files


@pytest.mark.timeout(600)
def test_lost_worker_node_resumes_from_s3(ns):
    """The worker node's process group SIGKILLed once the first checkpoint is in the bucket,
    a fresh worker node started: the run resumes from that checkpoint and finishes, with
    each epoch recorded once. The epochs lost are the steps trained twice (rank 0 logs every
    step), counted and printed."""
    start = time.monotonic()
    epochs = 3
    argv = _submit(ns, "train.py", *_train_argv(
        ns, "s3://hrem/runs", "lost", epochs, "--max-failures", "2",
        "--set", "train.log_every=1"))  # fmt: skip
    ns.call(op="spawn", name="lost", argv=argv)
    log = ns.root / "lost.log"
    deadline = time.monotonic() + 360
    while not _s3_keys(ns, "runs/lost/checkpoint_manager_snapshot.json"):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    assert ns.call(op="kill_worker")["survivors"] == []  # the whole node is gone
    ns.call(op="start_worker", timeout=180)
    rc = ns.call(op="wait", name="lost", timeout=400)["rc"]
    out = log.read_text()
    assert rc == 0 and "succeeded" in out, out[-4000:]
    assert _best_uri(out) == "s3://hrem/runs/lost/best"

    history = json.loads(_s3_text(ns, "runs/lost/metrics.json"))
    assert [row["epoch"] for row in history] == list(range(epochs))
    steps = open_split(ns.root / "data", "f30k", "train").n_captions // BATCH
    assert sum(row["steps"] for row in history) == epochs * steps
    # A checkpoint the dying node had uploaded but Ray had not yet registered stays in the
    # bucket beside the one the resumed run wrote for the same epoch: at most that one.
    epochs_in_s3 = _checkpoint_epochs(ns, "runs/lost")
    assert len(epochs_in_s3) - len(set(epochs_in_s3)) <= 1, epochs_in_s3

    done = re.findall(r"epoch (\d+) step (\d+) iter", out)
    assert len(set(done)) == epochs * steps  # every step of every epoch ran
    redone = len(done) - len(set(done))
    # At most the epochs since the last checkpoint Ray had registered: the dying node may
    # finish (and upload, unregistered) one more epoch between our poll and the kill.
    assert redone < 2 * steps, redone
    TIMES["epochs lost"] = redone / steps
    print(f"\nlost node: {redone} steps trained twice = {redone / steps:.2f} epochs lost")
    TIMES["lost node"] = time.monotonic() - start
