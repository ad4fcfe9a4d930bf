"""Client-side helpers for a running retrieval app (the demo and the serving benchmark): only
the standard library, so that a client imports neither torch nor Ray."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any


def wait_ready(
    base: str,
    timeout_s: float = 180,
    *,
    path: str = "/readyz",
    body: dict[str, Any] | None = None,
    interval_s: float = 0.5,
) -> None:
    """Poll ``base + path`` until it answers 200, or raise TimeoutError after ``timeout_s``.

    A ``body`` is POSTed as JSON: e.g. a text search, which also waits for the ingress and
    the model behind it, not only for the replica to report ready.
    """
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data, {"content-type": "application/json"})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base} did not answer {path} in {timeout_s:.0f} s")
        time.sleep(interval_s)
