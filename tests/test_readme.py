"""The README and docs/ stay true: the README's commands are the ones CI runs, its Python
example runs, and every command line in the README and docs parses with the real CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from hrem_ray.cli import build_parser
from hrem_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = {p.relative_to(ROOT).as_posix(): p.read_text() for p in [ROOT / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]}  # fmt: skip
JOBS = {"jobs/train.py": "train", "jobs/tune.py": "tune", "jobs/index.py": "index"}


def blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def command_lines() -> list[tuple[str, list[str]]]:
    """Every ``hrem-ray ...`` invocation in a bash block of the README or docs, as the argv
    of the sub-command (``python jobs/train.py ...`` counts as ``hrem-ray train ...``)."""
    found = []
    for page, text in PAGES.items():
        for block in blocks("bash", text):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" # ")[0].strip()
                for part in re.split(r"\s&&\s|\s;\s", line):
                    argv = shlex.split(part)
                    if argv[:1] == ["hrem-ray"]:
                        found.append((page, argv[1:]))
                    for script, command in JOBS.items():
                        if script in argv:
                            found.append((page, [command, *argv[argv.index(script) + 1 :]]))
    return found


def test_ci_runs_the_readme_test_command():
    test_command = blocks("bash")[1].strip()
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert test_command in ci_lines


def test_docs_show_commands():
    pages = {page for page, _ in command_lines()}
    assert {"README.md", "docs/training.md", "docs/data.md"} <= pages


@pytest.mark.parametrize(
    "page,argv", command_lines(), ids=lambda x: x if isinstance(x, str) else x[0]
)
def test_every_command_line_parses(page, argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's exit on an unknown flag or a missing argument
        pytest.fail(f"{page}: hrem-ray {shlex.join(argv)} does not parse (exit {e.code})")


def test_commands_mentioned_in_code_exist():
    """Sub-commands named in code spans (tables, prose) exist too."""
    commands = build_parser()._subparsers._group_actions[0].choices
    code = "\n".join(span for text in PAGES.values() for span in re.findall(r"`[^`\n]+`", text))
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


def test_links_and_images_exist():
    missing = []
    for page, text in PAGES.items():
        base = (ROOT / page).parent
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text):
            if "://" not in target and not (base / target).exists():
                missing.append(f"{page}: {target}")
    assert not missing, missing


def test_readme_is_short():
    assert len(README.splitlines()) <= 250
