"""The inside of tests/test_cluster.py's network namespace: an S3 server and a two-node Ray
cluster, and a runner for the test's client commands.

Started by the test as ``unshare -n bash -c 'ip link set lo up && exec python -m
tests.cluster_node ROOT'``, so the namespace holds only loopback: with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 (needed for a second node) Ray swaps 127.0.0.1 for the
machine's external address, and in here the only address there is is loopback
(docs/cluster.md, "Testing"). pytest stays outside; every byte it exchanges with the cluster
goes through this process's stdin and stdout, one JSON object a line:

- it first prints ``{"ready": {...}}``: ports, the token file and the environment clients use;
- ``{"op": "run", "argv": [...], "env": {...}, "timeout": s}`` runs a command to its end and
  answers ``{"rc", "out", "err", "wall"}``;
- ``{"op": "spawn", "name": ..., "argv": [...], "env": {...}}`` starts one in the background
  (its output in ROOT/NAME.log) and ``{"op": "stop", "name": ...}`` stops it;
- ``{"op": "wait", "name": ..., "timeout": s}`` waits for a spawned one: ``{"rc"}``;
- ``{"op": "kill_worker"}`` SIGKILLs the worker node's process group (a lost machine; the
  answer lists its processes still alive after 10 s) and
  ``{"op": "start_worker"}`` starts a fresh worker node;
- end of input stops everything it started, each by its process group, never with
  ``ray stop`` (which stops every Ray process on the machine).

Two S3 servers run: ``s3`` (moto's default, any credentials; the tests' bucket) and
``strict`` (moto checking credentials), for the wrong-credentials case; and an ``mlflow
server`` (``mlflow``: SQLite store, artifacts in the bucket) that every command in the
namespace tracks into through ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import psutil

from hrem_ray.ray_runtime import ENV_DEFAULTS, free_port
from hrem_ray.testing import alive, start_mlflow_server, start_moto, stop_group
from hrem_ray.tracking import URI_ENV

BIN = Path(sys.executable).parent
BUCKET = "hrem"
WORKER_CPUS = 2
START_TIMEOUT = 120.0


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.temp_dir = root / "ray"  # Ray's unix sockets: ROOT must be short (/tmp/...)
        self.token = root / "auth_token"
        self.gcs, self.dashboard, self.s3_port, self.strict_port = (free_port() for _ in "1234")
        self.procs: dict[str, subprocess.Popen] = {}
        self.workers = 0
        self.env = {
            **os.environ,
            **ENV_DEFAULTS,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # a second node; loopback is all there is
            "RAY_AUTH_MODE": "token",  # what a real cluster runs (docs/cluster.md)
            "RAY_AUTH_TOKEN_PATH": str(self.token),
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM: stop now
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.s3_port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }
        for key in ("RAY_ADDRESS", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            self.env.pop(key, None)
        os.environ.clear()
        os.environ.update(self.env)  # this process makes the bucket with the same settings

    def start(self) -> dict:
        self.procs["s3"] = start_moto(self.s3_port)
        self.procs["strict"] = start_moto(self.strict_port, {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
        s3 = boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        # the runs' tracking server (SQLite store here, artifacts in the bucket), reached by
        # clients and job drivers through MLFLOW_TRACKING_URI as on a real cluster
        self.procs["mlflow"], self.env[URI_ENV] = start_mlflow_server(
            self.root / "mlflow", self.env["AWS_ENDPOINT_URL"], BUCKET
        )
        os.environ[URI_ENV] = self.env[URI_ENV]
        # the token every node and client reads (RAY_AUTH_TOKEN_PATH), made before any node
        env = {k: v for k, v in self.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
        env["HOME"] = str(self.root)  # it writes ~/.ray/auth_token
        generate = [str(BIN / "ray"), "get-auth-token", "--generate"]
        subprocess.run(generate, check=True, env=env, capture_output=True, timeout=60)
        (self.root / ".ray" / "auth_token").rename(self.token)
        self.temp_dir.mkdir()
        self.spawn("head", [
            str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "0",
            "--node-ip-address", "127.0.0.1", "--port", str(self.gcs),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard), "--temp-dir", str(self.temp_dir),
            "--disable-usage-stats",
        ])  # fmt: skip
        # a worker started before the head is in the GCS gives up after about 40 s (loaded CI)
        self._wait_nodes(alive_workers=0)
        self.start_worker()
        return {
            "gcs": self.gcs,
            "dashboard": self.dashboard,
            "s3": self.env["AWS_ENDPOINT_URL"],
            "strict": f"http://127.0.0.1:{self.strict_port}",
            "bucket": BUCKET,
            "mlflow": self.env[URI_ENV],
            "env": {k: self.env[k] for k in self.env if k.startswith(("AWS_", "RAY_", "MLFLOW_"))},
        }

    def start_worker(self) -> None:
        self.workers += 1
        self.spawn(f"worker{self.workers}", [
            str(BIN / "ray"), "start", "--block", "--address", f"127.0.0.1:{self.gcs}",
            "--num-cpus", str(WORKER_CPUS), "--node-ip-address", "127.0.0.1",
            # a folder of its own, as on another machine: sharing the head's, its runtime-env
            # agent would unpack a job's working dir over the one the job's driver runs in
            "--temp-dir", str(self.root / f"ray-w{self.workers}"),
            "--disable-usage-stats",
        ])  # fmt: skip
        self._wait_nodes(alive_workers=1)

    def kill_worker(self) -> list[str]:
        """A lost machine: SIGKILL to the worker node's process group, so its raylet and every
        worker process on it die at once, with no chance to say goodbye."""
        proc = self.procs.pop(f"worker{self.workers}")
        node = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        psutil.wait_procs(node, timeout=10)
        return [" ".join(p.cmdline()[:3]) for p in alive(node)]

    def _wait_nodes(self, alive_workers: int) -> None:
        """Until the head node and ``alive_workers`` worker nodes are ALIVE."""
        url = f"http://127.0.0.1:{self.dashboard}/api/v0/nodes?limit=100"
        headers = {"Authorization": f"Bearer {self.token.read_text().strip()}"}
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for name in ("head", f"worker{self.workers}"):
                code = self.procs[name].poll() if name in self.procs else None
                if code is not None:
                    log = (self.root / f"{name}.log").read_text()[-3000:]
                    raise RuntimeError(f"{name} exited {code}:\n{log}")
            try:
                req = urllib.request.Request(url, headers=headers)
                with urllib.request.urlopen(req, timeout=5) as r:
                    nodes = json.load(r)["data"]["result"]["result"]
                workers = [
                    n for n in nodes
                    if n["state"] == "ALIVE" and n["resources_total"].get("CPU", 0) > 0
                ]  # fmt: skip
                head = any(n["state"] == "ALIVE" and n["is_head_node"] for n in nodes)
                if head and len(workers) == alive_workers:
                    return
            except (OSError, KeyError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no head and {alive_workers} alive worker node(s) after start")
            time.sleep(1)

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> None:
        with open(self.root / f"{name}.log", "w") as log:
            self.procs[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**self.env, **(env or {})}, cwd=self.root, start_new_session=True,
            )  # fmt: skip

    def stop(self, name: str) -> None:
        stop_group(self.procs.pop(name))

    def run(self, argv: list[str], timeout: float, env: dict | None = None) -> dict:
        start = time.monotonic()
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, env={**self.env, **(env or {})}, cwd=os.getcwd(), start_new_session=True,
        )  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            err += f"\n[cluster_node: killed after {timeout} s]"
        return {"rc": proc.returncode, "out": out, "err": err, "wall": time.monotonic() - start}

    def close(self) -> None:
        """Nodes first (the head's SIGTERM runs Ray's own teardown), then the S3 servers."""
        for name in sorted(self.procs, key=lambda n: (n in ("s3", "strict", "mlflow"), n)):
            stop_group(self.procs[name])
        self.procs.clear()


def serve(cluster: Cluster) -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "run":
            reply = cluster.run(cmd["argv"], cmd["timeout"], cmd.get("env"))
        elif op == "spawn":
            cluster.spawn(cmd["name"], cmd["argv"], cmd.get("env"))
            reply = {"rc": 0}
        elif op == "stop":
            cluster.stop(cmd["name"])
            reply = {"rc": 0}
        elif op == "wait":
            try:
                reply = {"rc": cluster.procs[cmd["name"]].wait(timeout=cmd["timeout"])}
            except subprocess.TimeoutExpired:
                reply = {"rc": None}
        elif op == "kill_worker":
            reply = {"rc": 0, "survivors": cluster.kill_worker()}
        elif op == "start_worker":
            cluster.start_worker()
            reply = {"rc": 0}
        else:
            reply = {"rc": 2, "err": f"unknown op {op!r}"}
        print(json.dumps(reply), flush=True)


def main() -> None:
    cluster = Cluster(Path(sys.argv[1]))
    try:
        ready = cluster.start()
        print(json.dumps({"ready": ready}), flush=True)
        serve(cluster)
    except BaseException as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        raise
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
