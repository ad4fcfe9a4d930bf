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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class FirstDemo:
    out: Path  # the demo folder
    run: subprocess.CompletedProcess  # its first run, from nothing


@pytest.fixture(scope="module")
def first_demo(tmp_path_factory) -> FirstDemo:
    """The tiny demo run once from nothing; the tests below share it (it takes minutes)."""
    out = tmp_path_factory.mktemp("tiny") / "demo"
    first = _demo(out, timeout=600)
    assert first.returncode == 0, (first.stdout + first.stderr)[-6000:]
    return FirstDemo(out, first)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_demo_end_to_end_then_reused(first_demo):
    out, first = first_demo.out, first_demo.run
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


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mlflow_ui_shows_the_demo_sweep_and_its_trials(first_demo, browser, tmp_path):
    """The UI command the demo prints, run as printed (on a free port), shows the sweep's
    parent run in the ``hrem`` experiment, and, expanded, its two trials nested under it."""
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By

    from hrem_ray.testing import stop_group, wait_until_up
    from hrem_ray.tracking import EXPERIMENT, PARENT_TAG, QUIET_ENV
    from tests.helpers import wait_for

    stdout = first_demo.run.stdout
    found = re.findall(r"its UI: (mlflow ui .+)$", stdout, re.MULTILINE)
    assert len(found) == 1, stdout[-3000:]
    argv = shlex.split(found[0])
    store = argv[argv.index("--backend-store-uri") + 1]
    assert store == f"sqlite:///{first_demo.out / 'runs' / 'mlflow.db'}"

    # what to expect, from the store itself: the sweep's run and the trials nested under it
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    (tune,) = re.findall(r"^\$ hrem-ray tune .+$", stdout, re.MULTILINE)
    sweep = _parse(tune).name  # the parent run is named after the sweep
    parents = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{sweep}'")
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0].info
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.run_id}'"
    )
    trials = {r.info.run_id: r.info.run_name for r in children}
    assert len(trials) == 2 and all(trials.values()), trials

    port = free_port()
    argv[0] = str(BIN / argv[0])  # the venv's mlflow, whatever PATH holds
    argv[argv.index("--port") + 1] = str(port)
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "mlflow-ui.log"
    with log.open("w") as sink:
        env = {**os.environ, **QUIET_ENV}
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp_path, start_new_session=True)  # fmt: skip
    try:
        wait_until_up(f"{url}/health", proc, "mlflow ui", 120, log)

        def run_row(d, run_id: str, name: str):
            """The grid row of run ``run_id`` whose Run Name cell links to it as ``name``."""
            links = d.find_elements(
                By.XPATH,
                f"//div[@role='row'][@row-id='{run_id}']"
                f"//a[contains(@href, '/runs/{run_id}')][normalize-space()='{name}']",
            )
            return next((a for a in links if a.is_displayed()), None)

        browser.get(f"{url}/#/experiments/{experiment.experiment_id}/runs")
        link = wait_for(browser, lambda d: run_row(d, parent.run_id, sweep),
                        f"the sweep's run {sweep!r} in the runs table", timeout=90)  # fmt: skip
        # the trials are nested under it, collapsed: not shown until it is expanded
        for run_id, name in trials.items():
            assert run_row(browser, run_id, name) is None, name
        expand = link.find_element(By.XPATH, "./ancestor::div[@role='gridcell'][1]//button")
        expand.click()
        for run_id, name in trials.items():
            shown = wait_for(browser, lambda d, i=run_id, n=name: run_row(d, i, n),
                             f"trial {name!r} under the expanded sweep", timeout=30)  # fmt: skip
            assert shown.text == name
        # ...listed right below their parent
        rows = browser.execute_script(
            "const at = {}; for (const r of document.querySelectorAll('[role=row][row-id]'))"
            " at[r.getAttribute('row-id')] = +r.getAttribute('row-index'); return at;"
        )
        below = rows[parent.run_id] + 1
        assert sorted(rows[i] for i in trials) == [below, below + 1], rows
    finally:
        stop_group(proc)


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
