"""``bench/serve_load.py``: its closed loop, the verdicts against the serving targets, the
one-hop vs two-hop table, and the image query bodies of each encoding (no Ray: the pure parts)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bench import serve_load as sl

REPO = Path(__file__).resolve().parents[1]


def r(p50, p99=None, qps=100.0):
    return {"n": 10, "errors": 0, "p50_ms": p50, "p99_ms": p99 or 2 * p50, "qps": qps}


def test_verdicts_and_comparison():
    feats = {"shape": "100x2048"}
    results = {
        "in-process, 1 query/call": r(2.0),
        "in-process, 32 queries/call": r(8.0, qps=1000.0),
        "floor/ingress alone": r(10.0),
        "floor/ingress + 1 deployment": r(15.0),
        "on/1": r(13.0),  # 11 ms over in-process: 1.1x the 10 ms floor
        "on/32": r(100.0, 250.0, qps=900.0),  # 90% of the ceiling; p99 2.5x p50
        "features/JSON": {**r(50.0), **feats},
        "features/base64": {**r(30.0), **feats},
        "features/npy": {**r(20.0), **feats},
        "page": {**r(20.0), "page_p50_ms": 5.0},
        "2hop/on/1": r(22.0),  # 20 ms over: 1.33x the 15 ms floor
        "2hop/on/32": r(200.0, 700.0, qps=400.0),
        "2hop/features/JSON": {**r(50.0), **feats},
        "2hop/features/base64": {**r(60.0), **feats},
        "2hop/features/npy": {**r(55.0), **feats},
    }
    scales = {1: {"decided_at": 6.0, "up_at": 12.0, "down_after": 35.0, "load_s": 20.0},
              2: {"decided_at": None, "load_s": 30.0}}  # fmt: skip
    got = {
        (t.split(" ")[0], shape): v for t, shape, _, v in sl.verdicts(results, scales, [1, 2], 32)
    }
    assert got == {
        ("overhead", "1 hop"): "PASS", ("QPS", "1 hop"): "PASS", ("p99", "1 hop"): "PASS",
        ("autoscaling", "1 hop"): "PASS", ("binary", "1 hop"): "PASS",
        ("overhead", "2 hops"): "FAIL", ("QPS", "2 hops"): "FAIL", ("p99", "2 hops"): "FAIL",
        ("autoscaling", "2 hops"): "FAIL", ("binary", "2 hops"): "FAIL",
    }  # fmt: skip
    assert sl.verdicts(results, {}, [1], 32)[3][2:] == ("not run (--no-autoscale)", "-")

    table = {row[0]: row[1:] for row in sl.comparison(results, scales, 32)}
    assert table["p50 ms, conc 1"] == ("13.0", "22.0", "1.69x")
    assert table["QPS, conc 32"] == ("900.0", "400.0", "0.44x")
    assert table["scale-up: 2nd replica RUNNING, s into load"] == ("12.0", "-", "-")
    assert sl.comparison(results, {}, 32)[-1][1:] == ("-", "-", "-")  # --no-autoscale
    lines = sl.md_table(("a", "bb"), [("xyz", "1")])
    assert lines == ["| a   | bb |", "|-----|----|", "| xyz | 1  |"]


def test_rows_keep_the_table_columns():
    cells = lambda row: [c.strip() for c in row.split("|")[1:-1]]  # noqa: E731
    assert cells(sl._cells(tuple(name for name, _ in sl.COLUMNS))) == [
        "setting", "hops", "conc", "n", "err", "p50 ms", "p99 ms", "QPS", "batch", "client",
    ]  # fmt: skip
    http = {**r(9.0), "batch": 4.44, "client_cpu": 0.031}
    assert cells(sl.fmt_row("Serve", 1, 8, http))[5:] == ["9.0", "18.0", "100.0", "4.4", "3%"]
    in_process = sl.fmt_row("in-process", "-", 1, {**r(2.0), "batch": 32})
    assert cells(in_process)[8:] == ["32", ""]  # the batch as given, no client CPU
    page = {"n": 3, "errors": 0, "p50_ms": 9, "p99_ms": 12}
    assert cells(sl.fmt_row("search page", 1, 1, page))[7:9] == ["-", "-"]  # no QPS, no batch
    assert len(sl.fmt_row("x", 1, 1, page)) == len(sl._cells(("",) * len(sl.COLUMNS)))


def test_measure_counts_the_window_only():
    calls = []

    def client():
        calls.append(time.perf_counter())
        time.sleep(0.01)
        return None if len(calls) % 5 == 0 else (0.004, 0.006)

    got = sl.measure([client, client], 0.5, warmup_s=0.2)
    counted = got["n"] + got["errors"]
    assert 20 <= counted <= 100  # 2 clients, at most one request each per 10 ms for 0.5 s
    assert len(calls) > counted + 10  # the warm-up's requests are not counted
    assert 0.1 <= got["errors"] / counted <= 0.3  # 1 in 5 fails
    assert got["p50_ms"] >= 10 and got["parts_p50_ms"] == [4.0, 6.0]
    assert got["qps"] == pytest.approx(got["n"] / 0.5, rel=0.1)  # successes over the window

    stop = threading.Event()
    stop.set()
    assert sl.measure([client], 5.0, stop=stop, warmup_s=0)["n"] == 0  # a set stop ends it
    capped = sl.measure([lambda: sl.OK] * 2, 5.0, max_requests=50, per_call=32, warmup_s=0)
    assert capped["n"] == 50 * 32 and capped["errors"] == 0 and "parts_p50_ms" not in capped


def test_image_query_bodies_carry_the_same_features():
    bodies = {name: (path, ctype, body) for name, path, ctype, body in sl.feature_bodies(2048)}
    assert set(bodies) == {"JSON", "base64", "npy"}
    as_json = json.loads(bodies["JSON"][2])
    feats = np.asarray(as_json["features"], np.float32)
    assert feats.shape == (100, 2048) and as_json["k"] == sl.K
    enc = json.loads(bodies["base64"][2])["features"]
    decoded = np.frombuffer(base64.b64decode(enc["base64"]), "<f4").reshape(enc["shape"])
    npy = np.load(io.BytesIO(bodies["npy"][2]), allow_pickle=False)
    assert np.array_equal(decoded, feats) and np.array_equal(npy, feats)
    assert bodies["npy"][:2] == (f"/search/image?k={sl.K}", "application/x-npy")
    assert len(bodies["npy"][2]) == 128 + 4 * 100 * 2048  # the documented .npy size


def test_handle_client_awaits_on_its_own_event_loop(monkeypatch):
    """Under RAY_SERVE_THROUGHPUT_OPTIMIZED a handle's router runs on the caller's event loop
    and ``.remote()`` from a thread without one raises: the client calls it on ``EventLoop``."""
    from ray import serve

    queries: list[str] = []

    class SearchText:
        def remote(self, query: str, k: int):
            asyncio.get_running_loop()  # RuntimeError without one, as such a handle raises
            queries.append(query)
            return asyncio.sleep(0)

    handle = SimpleNamespace(search_text=SearchText())
    monkeypatch.setattr(serve, "get_deployment_handle", lambda *_, **__: handle)
    loop = sl.EventLoop()
    try:
        client = sl.through_handle(["a", "b"], loop.loop)
        assert sl.measure([client], 0.2, max_requests=4, warmup_s=0)["errors"] == 0
    finally:
        loop.close()
    assert queries == ["a", "b", "a", "b"]


def test_runs_as_a_script_without_path_edits():
    """``python bench/serve_load.py`` has bench/ on sys.path, not the repository: it finds
    the tiny world in the package."""
    done = subprocess.run([sys.executable, "bench/serve_load.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--hops" in done.stdout and "--no-autoscale" in done.stdout
