"""The README stays true: its commands are the ones CI runs, its example runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hrem_ray.cli import build_parser
from hrem_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = blocks("bash")[1].strip()
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert test_command in ci_lines


def test_readme_commands_exist():
    commands = build_parser()._subparsers._group_actions[0].choices
    code = "\n".join(blocks("bash")) + "\n".join(re.findall(r"`[^`\n]+`", README))
    mentioned = set(re.findall(r"hrem-ray ([a-z][a-z-]+)", code))
    assert mentioned and mentioned <= set(commands), mentioned - set(commands)


def test_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (example,) = blocks("python")
    exec(compile(example, "README.md", "exec"), {})
    rsum, r1 = capsys.readouterr().out.split()
    assert 0 <= float(rsum) <= 600 and 0 <= float(r1) <= 100


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


def test_readme_images_exist():
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", README)
    assert images
    missing = [p for p in images if "://" not in p and not (ROOT / p).is_file()]
    assert not missing, missing
