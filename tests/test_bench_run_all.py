"""``bench/run_all.py``: a benchmark that fails or overruns its limit becomes a row saying so,
and the benchmarks after it still run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

RUN_ALL = Path(__file__).resolve().parents[1] / "bench" / "run_all.py"


def load_run_all():
    spec = importlib.util.spec_from_file_location("run_all", RUN_ALL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text("import json, sys, time\nout = sys.argv[sys.argv.index('--json') + 1]\n" + body)
    return str(path)


def test_failing_and_slow_benchmarks_become_rows(tmp_path, capsys):
    ra = load_run_all()
    ok = script(tmp_path, "ok", "json.dump({'v': 2.0}, open(out, 'w'))\n")
    crash = script(tmp_path, "crash", "print('boom'); sys.exit(3)\n")
    slow = script(tmp_path, "slow", "time.sleep(30)\n")

    def rows(f):
        return [ra.Row("v", f["v"], 1.0, "s", True)]

    benches = [ra.Bench("crash", [crash], rows, 30), ra.Bench("slow", [slow], rows, 1),
               ra.Bench("ok", [ok], rows, 30)]  # fmt: skip
    got = [row for b in benches for row in ra.run(b, tmp_path, 1.0)]
    assert [r.failed for r in got] == ["exit 3", "stopped after its 1 s limit", ""]
    assert math.isclose(got[2].ratio, 2.0)
    text = ra.table(got)
    assert "| crash | failed: exit 3 |" in text and "| v | 2 s | 1 s | 2.00x |" in text
    assert "boom" in capsys.readouterr().out  # the failed benchmark's last lines are shown
    assert json.loads((tmp_path / "ok.json").read_text()) == {"v": 2.0}
