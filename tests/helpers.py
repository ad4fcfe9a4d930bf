"""Helpers that need pytest. The tiny world (model config, data sizes, servers) shared with the
benchmarks is ``hrem_ray.testing``; fixtures live in ``tests/conftest.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from hrem_ray.cli import main

# Debian's browser and its driver, given explicitly so Selenium Manager never downloads one
# (CI: ``apt-get install -y chromium chromium-driver``); the ``browser`` fixture drives them.
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs Debian's Chromium: apt-get install -y chromium chromium-driver "
    f"({CHROMIUM} and {CHROMEDRIVER} not both present)",
)


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


def wait_for(driver, predicate, what: str, timeout: float = 20.0):
    """Poll ``predicate(driver)`` until it is truthy (returned) or ``timeout`` seconds pass."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: predicate(d), message=f"timed out waiting for {what}"
    )
