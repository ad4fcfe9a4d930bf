"""The README's paths from object storage through a proxy that resets, stalls and throttles
(hrem_ray.testing.s3proxy): ``hrem-ray shard`` to S3, ``check-data``, a Ray Train run from the
S3 shards with the run in S3 (a worker killed on the way), ``eval`` of the printed URI, a
2-trial sweep in S3, and serving from S3 with a swap. With faults each must end as it does
without them: the same weights, bit for bit (the data path does not depend on timing), and
the same dev rsum; the faults must have happened and been retried."""

from __future__ import annotations

import hashlib
import json
import time
from urllib.parse import urlparse

import pytest
import ray

from hrem_ray import storage
from hrem_ray.checkpoint import read_record
from hrem_ray.cli import main
from hrem_ray.config import load_config
from hrem_ray.options import RayRunOptions, SweepOptions
from hrem_ray.ray_runtime import init_ray
from hrem_ray.synth import write_synthetic
from hrem_ray.testing import TINY_SETS
from hrem_ray.testing.s3proxy import FaultProxy
from hrem_ray.train.ray_train import train_ray
from hrem_ray.tune.space import parse_space
from hrem_ray.tune.sweep import run_sweep
from tests.conftest import S3_BUCKET
from tests.helpers import WorkerKiller

pytestmark = [pytest.mark.slow, pytest.mark.ray]
FAULTS = dict(reset=0.05, delay=0.05, http503=0.05)
RUNS = f"s3://{S3_BUCKET}/chaos-runs"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's: a checkpoint is registered


@pytest.fixture(scope="module")
def proxy(s3_server, tmp_path_factory):
    """A faulty proxy in front of the S3 server, which Ray's workers reach too: the
    environment is set before Ray starts, since its workers inherit it."""
    url = urlparse(s3_server)
    faults = FaultProxy(url.hostname, url.port, seed=11, delay_s=1.0, **FAULTS)
    with faults as p, pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", p.endpoint)
        mp.setenv(storage.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        if ray.is_initialized():
            ray.shutdown()
        # as the sweep test's Ray: Train-in-Tune needs the state API (ray_runtime.init_ray)
        init_ray(num_cpus=2, include_dashboard=True, log_to_driver=False)
        try:
            yield p
        finally:
            ray.shutdown()


def _train(cfg, name: str, max_failures: int = 0) -> tuple[str, float]:
    options = RayRunOptions(storage_path=RUNS, name=name, num_workers=1,
                            cpus_per_worker=0.5, max_failures=max_failures)  # fmt: skip
    start = time.monotonic()
    best = train_ray(cfg, options, log=lambda _: None)
    return best, time.monotonic() - start


def _weights_sha(uri: str) -> str:
    return hashlib.sha256((storage.fetch_dir(uri) / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def world(proxy, tmp_path_factory, tiny_bert) -> dict:
    """The synthetic splits sharded to S3 and checked through the faults, and the run's
    config: what the training and the sweep below read."""
    data = tmp_path_factory.mktemp("chaos") / "data"
    write_synthetic(data, train_images=40, dev_images=10, test_images=10, regions=6, dim=24,
                    progress=None)  # fmt: skip
    uri = f"s3://{S3_BUCKET}/chaos-data"
    for split in ("train", "dev"):
        main(["shard", "--data-path", str(data), "--dataset", "f30k", "--split", split,
              "--out", uri, "--rows-per-shard", "8"])  # fmt: skip
    main(["check-data", "--data-path", uri, "--dataset", "f30k", "--split", "train",
          "--split", "dev"])  # fmt: skip
    sets = [*TINY_SETS, "train.batch_size=8", "train.log_every=1000", "train.epochs=2",
            f"data.data_path={uri}", f"model.bert_path={tiny_bert}"]  # fmt: skip
    return {"uri": uri, "cfg": load_config(None, sets), "clean": {}}


@pytest.mark.timeout(900)
def test_shard_check_train_eval_survive_faults(proxy, world, s3_server, tmp_path, capsys):
    """Training from the S3 shards with the run in S3, under faults and with a worker
    SIGKILLed once the first checkpoint is registered: the faults restart nothing (one
    worker group before the kill, one after), the run resumes from that checkpoint, and
    its weights equal, bit for bit, those of the same run without faults or kill."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)  # past the proxy: polling adds no faults
    key = f"{RUNS.removeprefix(f's3://{S3_BUCKET}/')}/faulty/{SNAPSHOT}"
    killer = WorkerKiller(lambda: s3.list_objects_v2(Bucket=S3_BUCKET, Prefix=key)["KeyCount"] > 0,
                          workers=1, timeout=600)  # fmt: skip
    killer.start()
    try:
        faulty, faulty_s = _train(world["cfg"], "faulty", max_failures=1)
    finally:
        killer.stop()
    out = tmp_path / "eval.json"
    main(["eval", "--checkpoint", faulty, "--data-path", world["uri"], "--dataset", "f30k",
          "--split", "dev", "--json", str(out)])  # fmt: skip
    injected = proxy.report()
    err = capsys.readouterr().err

    proxy.set_rates()  # the same run without faults
    try:
        clean, clean_s = _train(world["cfg"], "clean")
    finally:
        proxy.set_rates(**FAULTS)
    world["clean"]["weights"] = _weights_sha(clean)
    print(f"\nfaults {injected}; train {faulty_s:.0f} s with faults and a worker killed, "
          f"{clean_s:.0f} s without; {err.count('retrying')} retries printed")  # fmt: skip
    assert injected["resets"] > 0 and injected["delays"] > 0 and injected["http503"] > 0
    assert "Traceback" not in err
    assert killer.error is None, killer.error
    assert len(killer.groups) == 2, killer.groups  # the kill's restart, and no other
    history = json.loads(storage.read_text(f"{RUNS}/faulty/metrics.json"))
    assert [row["epoch"] for row in history] == [0, 1]  # each epoch recorded once
    assert _weights_sha(faulty) == world["clean"]["weights"]
    faulty_rsum = json.loads(out.read_text())["rsum"]
    assert faulty_rsum == pytest.approx(read_record(clean)["meta"]["metrics"]["rsum"], abs=1e-4)


@pytest.mark.timeout(900)
def test_sweep_in_s3_survives_faults(proxy, world, capsys):
    """A 2-trial sweep kept in S3, under faults: both trials finish, the sweep's files are
    complete, and the trial that runs the training test's config has its weights, bit for
    bit (the data path and the trials' seeds do not depend on timing)."""
    if "weights" not in world["clean"]:
        pytest.skip("needs the clean run of test_shard_check_train_eval_survive_faults")
    cfg = world["cfg"]
    grid = {"train.lr": {"grid": [cfg.train.lr, cfg.train.lr / 4]}}
    space = parse_space({"search": "grid", "num_samples": 1, "max_concurrent_trials": 1,
                         "scheduler": {"type": "none"}, "params": grid})  # fmt: skip
    options = SweepOptions(run=RayRunOptions(storage_path=RUNS, name="sweep", num_workers=1,
                                             cpus_per_worker=0.5))  # fmt: skip
    proxy.reset_counters()
    start = time.monotonic()
    summary = run_sweep(cfg, space, options, log=lambda _: None)
    seconds = time.monotonic() - start
    injected = proxy.report()
    err = capsys.readouterr().err
    print(f"\nsweep in S3: faults {injected}, {seconds:.0f} s, "
          f"{err.count('retrying')} retries printed")  # fmt: skip
    assert injected["resets"] + injected["http503"] > 0
    assert "Traceback" not in err
    rows = json.loads(storage.read_text(f"{RUNS}/sweep/trials.json"))
    assert [r["error"] for r in rows] == [None, None] and all(r["epochs_run"] == 2 for r in rows)
    same = next(r for r in rows if r["train.lr"] == cfg.train.lr)
    assert _weights_sha(same["checkpoint"]) == world["clean"]["weights"]
    assert storage.exists(f"{summary['best']}/{storage.MARKER}")


@pytest.mark.timeout(600)
def test_serve_from_s3_and_swap_survive_faults(proxy, tmp_path, tiny_bert, capsys):
    """``run_service`` of a checkpoint and gallery in S3 while storage faults: the replica's
    start retries its fetches and answers as the same files do locally; then a swap to a
    second checkpoint and gallery in S3, under a continuous request stream, answers every
    request with 200 and switches to the new model."""
    from ray import serve
    from starlette.testclient import TestClient

    from hrem_ray.serving.api import LocalBackend, build_app
    from hrem_ray.serving.app import AUTOSCALING, Retriever, run_service
    from hrem_ray.serving.client import wait_ready
    from hrem_ray.serving.service import RetrievalService
    from hrem_ray.testing import SYNTH, TINY_MODEL, free_port
    from tests.test_serve_ray import GOOD, STREAM, Stream, assert_same_answer, matches, post

    data = tmp_path / "data"
    main(["synth", "--out", str(data), *SYNTH])
    local, remote = {}, {}
    proxy.set_rates()  # build the world without faults, then upload it through them
    for tag, seed in (("1", 0), ("2", 1)):
        ckpt, gallery = tmp_path / f"ckpt{tag}", tmp_path / f"gallery{tag}"
        main(["init-checkpoint", "--out", str(ckpt), "--bert-path", tiny_bert, "--seed",
              str(seed), *TINY_MODEL])  # fmt: skip
        main(["index", "--checkpoint", str(ckpt), "--data-path", str(data), "--dataset",
              "f30k", "--split", "test", "--out", str(gallery)])  # fmt: skip
        local[tag] = TestClient(build_app(LocalBackend(RetrievalService(ckpt, gallery))))
        remote[tag] = tuple(f"s3://{S3_BUCKET}/chaos-serve/{p.name}" for p in (ckpt, gallery))
    proxy.set_rates(reset=0.15, delay=0.1, http503=0.15)
    proxy.reset_counters()
    start = time.monotonic()
    for tag in local:
        for src, dst in zip((tmp_path / f"ckpt{tag}", tmp_path / f"gallery{tag}"),
                            remote[tag], strict=True):  # fmt: skip
            storage.copy_dir(src, dst)
    port = free_port()
    cluster = {"url": f"http://127.0.0.1:{port}"}
    try:
        run_service(*remote["1"], port=port, max_replicas=1)
        wait_ready(cluster["url"], timeout_s=240)
        ready_s = time.monotonic() - start
        for path, body in GOOD:
            r = post(cluster, path, body)
            assert_same_answer(r, local["1"].post(path, json=body), path)
        want_new = [local["2"].post(p, json=b).json() for p, b in STREAM]
        retriever = Retriever.options(
            autoscaling_config={**AUTOSCALING, "max_replicas": 1},
            user_config={"checkpoint": remote["2"][0], "gallery": remote["2"][1]},
        ).bind(*remote["1"])
        with Stream(cluster, STREAM) as stream:
            assert stream.wait_for(lambda e: e["status"] == 200, 60), "no answer before"
            serve.run(retriever, name="hrem", route_prefix="/")
            switched = stream.wait_for(
                lambda e: matches(e, want_new[[b for _, b in STREAM].index(e["body"])]), 120
            )
            assert switched is not None, "answers never switched to the new model"
            time.sleep(2)
        failed = [e for e in stream.log if e["status"] != 200]
        injected = proxy.report()
        err = capsys.readouterr().err
        print(f"\nserve from S3: faults {injected}, ready in {ready_s:.0f} s, "
              f"{len(stream.log)} requests during the swap, {len(failed)} failed, "
              f"{err.count('retrying')} retries printed")  # fmt: skip
        assert not failed, failed[:3]
        assert injected["resets"] + injected["http503"] > 0
        for path, body in GOOD:
            assert_same_answer(post(cluster, path, body), local["2"].post(path, json=body), path)
    finally:
        serve.shutdown()
        proxy.set_rates(**FAULTS)
