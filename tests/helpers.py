"""Helpers that need pytest. The tiny world (model config, data sizes, servers) shared with the
benchmarks is ``hrem_ray.testing``; fixtures live in ``tests/conftest.py``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
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


class WorkerKiller(threading.Thread):
    """Once ``registered()`` says the run has registered its first checkpoint, SIGKILL one Ray
    Train worker process; then watch the worker groups until :meth:`stop`.

    Only descendants of this pytest process are candidates: the in-process Ray's raylet is
    our child and the workers are its children, so no other cluster on the machine is hit.
    ``groups`` lists each worker group seen, in order: the first, the one started after the
    kill, and any other restart (which a test may forbid).
    """

    def __init__(self, registered: Callable[[], bool], workers: int, timeout: float = 280.0):
        super().__init__(daemon=True)
        self.registered, self.n, self.timeout = registered, workers, timeout
        self.killed: int | None = None
        self.groups: list[set[int]] = []
        self.error: BaseException | None = None
        self._finished = threading.Event()

    @staticmethod
    def workers() -> set[int]:
        found = set()
        for p in psutil.Process().children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    found.add(p.pid)
            except psutil.Error:
                pass
        return found

    def stop(self) -> None:
        self._finished.set()
        self.join(timeout=30)

    def run(self) -> None:
        try:
            self._kill()
            self._watch()
        except BaseException as e:  # surfaced by the test
            self.error = e

    def _kill(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.registered():
            if time.monotonic() > deadline or self._finished.is_set():
                raise TimeoutError("no registered checkpoint before the deadline")
            time.sleep(0.1)
        group = self.workers()
        assert len(group) == self.n, group
        self.groups.append(group)
        self.killed = max(group)
        psutil.Process(self.killed).kill()

    def _watch(self) -> None:
        """Record each new full group of workers (pids never seen before) until stopped."""
        seen = set().union(*self.groups)
        while not self._finished.is_set():
            new = self.workers() - seen
            if len(new) == self.n:
                self.groups.append(new)
                seen |= new
            time.sleep(0.1)
