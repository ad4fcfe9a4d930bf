"""Helpers that need pytest. The tiny world (model config, data sizes, servers) shared with the
benchmarks is ``hrem_ray.testing``; fixtures live in ``tests/conftest.py``."""

from __future__ import annotations

import pytest

from hrem_ray.cli import main


def run_err(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run an ``hrem-ray`` command that must fail as a user error (exit 2, no traceback);
    returns its one error line."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"hrem-ray {argv[0]}: error: "), lines[0]
    return lines[0]
