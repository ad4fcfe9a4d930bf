"""``bench/serve_load.py``: the verdicts against the serving targets, the one-hop vs two-hop
table, and the image query bodies of each encoding (no Ray: the pure parts)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np

SERVE_LOAD = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"


def load_serve_load():
    spec = importlib.util.spec_from_file_location("serve_load", SERVE_LOAD)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def r(p50, p99=None, qps=100.0):
    return {"n": 10, "errors": 0, "p50_ms": p50, "p99_ms": p99 or 2 * p50, "qps": qps}


def test_verdicts_and_comparison():
    sl = load_serve_load()
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
    page = sl.fmt_row("search page", 1, 1, {"n": 3, "errors": 0, "p50_ms": 9, "p99_ms": 12}, "-")
    assert page.split("|")[8].strip() == "-"  # no QPS for the one-at-a-time page rows
    lines = sl.md_table(("a", "bb"), [("xyz", "1")])
    assert lines == ["| a   | bb |", "|-----|----|", "| xyz | 1  |"]


def test_image_query_bodies_carry_the_same_features():
    sl = load_serve_load()
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
