"""``hrem-ray demo``: the whole pipeline at ``--tiny`` size (Ray Train, Tune, eval, index,
Ray Serve and HTTP queries) in a subprocess, a re-run that reuses the finished stages, the
report, and the demo's refusals to touch folders that are not its own."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hrem_ray.cli import _config as cli_config
from hrem_ray.cli import build_parser, main
from hrem_ray.demo.pipeline import STATE_FILE, Demo, DemoOptions, run_demo
from hrem_ray.demo.report import write_report
from hrem_ray.testing import free_port

BIN = Path(sys.executable).parent
STAGES = ["data", "fresh", "train", "frozen", "sweep", "eval", "index", "serve"]


def _demo(out: Path, *flags: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [str(BIN / "hrem-ray"), "demo", "--tiny", "--no-serve", "--out", str(out),
         "--port", str(free_port()), *flags],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=out.parent,
    )  # fmt: skip


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_demo_end_to_end_then_reused(tmp_path):
    out = tmp_path / "demo"
    first = _demo(out, timeout=600)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-6000:]
    for i, stage in enumerate(STAGES, 1):
        assert f"== [{i}/{len(STAGES)}] {stage}: " in first.stdout
    for command in ("synth", "init-checkpoint", "train", "tune", "eval", "index", "serve"):
        assert re.search(rf"^\$ hrem-ray {command} ", first.stdout, re.MULTILINE), command

    state = json.loads((out / STATE_FILE).read_text())
    assert state["profile"] == "tiny" and list(state["stages"]) == STAGES
    stages = state["stages"]
    # the models evaluated are the ones trained; the served one is the better on dev
    ev = stages["eval"]
    assert set(ev["test"]) == {"fresh", "frozen", "train", "sweep"}
    assert ev["best"] == max(ev["dev_rsum"], key=ev["dev_rsum"].get)
    assert ev["checkpoint"] == stages[ev["best"]]["checkpoint"]
    for m in ev["test"].values():
        assert 0 <= m["rsum"] <= 600 and m["n_images"] == 20
    assert len(stages["sweep"]["trials"]) == 2
    # the HTTP queries: 5 hits each, ranked by score, images of the 20-image test split
    queries = stages["serve"]["queries"]
    assert [q["kind"] for q in queries] == ["text"] * 3 + ["image"]
    for q in queries:
        scores = [h["score"] for h in q["results"]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
        key = "id" if q["kind"] == "text" else "image_id"
        assert all(0 <= h[key] < 20 for h in q["results"])
        assert q["query"] in first.stdout
    # the report and the plots it embeds
    page = (out / "report" / "index.html").read_text()
    for png in ("train_curves.png", "frozen_curves.png", "sweep.png"):
        assert f"src='{png}'" in page
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count("<tr") >= 4 + 1 + len(STAGES) + 2  # recall rows, head, timings, trials
    assert queries[0]["query"] in page

    second = _demo(out, timeout=300)
    assert second.returncode == 0, (second.stdout + second.stderr)[-6000:]
    for stage in STAGES[:-1]:
        assert re.search(rf"\] {stage}: reusing", second.stdout), stage
    assert "] serve: Ray Serve" in second.stdout  # the service always starts anew
    again = json.loads((out / STATE_FILE).read_text())["stages"]
    assert {k: v for k, v in again.items() if k != "serve"} == {
        k: v for k, v in stages.items() if k != "serve"
    }


def test_fresh_refuses_a_folder_that_is_not_a_demo(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--tiny", "--fresh", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "not a demo folder" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    with pytest.raises(FileExistsError, match="holds no demo"):
        run_demo(DemoOptions(out=str(tmp_path), tiny=True))


def test_a_demo_folder_of_the_other_size_is_refused(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps({"profile": "demo", "stages": {}}))
    with pytest.raises(ValueError, match="holds a 'demo' demo; pass --fresh"):
        run_demo(DemoOptions(out=str(tmp_path), tiny=True))
    assert json.loads((tmp_path / STATE_FILE).read_text())["profile"] == "demo"


def test_report_escapes_text_and_marks_hits(tmp_path):
    """Captions are user data: they are escaped, and the target's rows are marked."""
    metrics = {"i2t": {"r1": 1.0, "r5": 2.0, "r10": 3.0},
               "t2i": {"r1": 4.0, "r5": 5.0, "r10": 6.0}, "rsum": 21.0}  # fmt: skip
    stages = {
        "data": {"seconds": 1.0},
        "eval": {"seconds": 2.0, "best": "train",
                 "dev_rsum": {"train": 9.0, "frozen": 8.0, "sweep": 7.0},
                 "test": {m: metrics for m in ("fresh", "frozen", "train", "sweep")}},
        "serve": {"seconds": 3.0, "url": "http://127.0.0.1:1", "queries": [
            {"kind": "text", "query": "a <b>dog</b>", "target": 7,
             "results": [{"id": 3, "score": 0.9, "captions": ["x & y"]},
                         {"id": 7, "score": 0.5, "captions": ["<script>"]}]},
        ]},
    }  # fmt: skip
    page = write_report(tmp_path, stages, "tiny").read_text()
    assert "a &lt;b&gt;dog&lt;/b&gt;" in page and "&lt;script&gt;" in page
    assert "<script>" not in page and "x &amp; y" in page
    assert page.count("<tr class='hit'>") == 1
    assert "<tr class='hit'><td>2</td><td>7</td>" in page
    assert "<tr class='best'><td>trained" in page and page.count("class='best'") == 1
    assert "<td>total</td><td>6</td>" in page  # stage timings and their sum


def test_a_busy_port_is_refused_before_any_work(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exc:
            main(["demo", "--tiny", "--port", str(port), "--out", str(tmp_path / "demo")])
    assert exc.value.code == 2
    assert f"port {port} is in use" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def _parse(line: str):
    """A printed ``$ hrem-ray ...`` line parsed by the real CLI parser."""
    argv = shlex.split(line.removeprefix("$ "))
    assert argv[0] == "hrem-ray"
    return build_parser().parse_args(argv[1:])


def test_printed_commands_are_the_calls_that_run(tmp_path):
    """Each stage prints the command line of the call it makes: parsed back by the CLI, the
    line gives the same config and the same options, so what is shown is what ran."""
    lines: list[str] = []
    demo = Demo(DemoOptions(out=str(tmp_path / "demo"), tiny=True), log=lines.append)
    for (cfg, options), command in ((demo.train_call("frozen", "train.bert_lr_factor=0"), "train"),
                                    (demo.sweep_call(), "tune")):  # fmt: skip
        demo.show(command, cfg, **options)
        args = _parse(lines[-1])
        assert args.command == command
        assert cli_config(args).to_dict() == cfg.to_dict()
        assert cfg.train.bert_lr_factor == 0 and cfg.model.warmup == 0
        for key, value in options.items():
            assert getattr(args, key) == value, key
    demo.show("eval", checkpoint="/a b/ck", data_path=str(demo.data), dataset="f30k")
    args = _parse(lines[-1])
    assert (args.checkpoint, args.data_path, args.split) == (["/a b/ck"], str(demo.data), "test")


def test_the_demo_never_imports_the_cli():
    """The CLI imports the demo, never the other way round (no import cycle)."""
    code = (
        "import sys, hrem_ray.demo.pipeline, hrem_ray.demo.report; "
        "sys.exit('hrem_ray.cli' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
