"""The Ray runtime: the environment every hrem-ray process sets before Ray or transformers
start, and ``init_ray``, the one way the CLI, sweeps, Serve and the demo join or start Ray.

Every Ray process inherits the environment of the process that starts Ray (docs/ray.md);
transformers reads its offline switches when first imported, so ``hrem_ray/__init__.py``
sets those on import. Ray itself is imported only inside ``init_ray``, so scripts and test
configs can use this module before anything starts.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

# For a shared cluster use RAY_AUTH_MODE=token instead (docs/cluster.md).
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # else Ray binds the external interface too
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # per-epoch bars of a few ms each: noise
}
# Backbones are local folders: never reach for a hub. One tokenizer thread per process.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
ENV_DEFAULTS = {**RAY_ENV_DEFAULTS, **OFFLINE_ENV}
# ``hrem-ray serve --haproxy`` (docs/serving.md, "A replica that dies"): HAProxy forwards each
# request straight to a replica's own HTTP port, in place of Serve's proxy, and sends a request
# whose replica died before answering (connection refused, or closed with no answer) to another
# replica. Every route is a read, so a replay is safe. Serve reads these as each of its
# processes starts: they must be in the environment of the process that starts Ray.
HAPROXY_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response",
    "RAY_SERVE_HAPROXY_RETRIES": "3",
}
# HAProxy mode's own listeners, by default fixed ports (8404, 9101, 8500) that a second service
# or test cluster on the machine would collide with; a Ray started here takes free ones.
HAPROXY_PORT_VARS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
)


def set_env_defaults(env: dict[str, str] = ENV_DEFAULTS) -> None:
    """Set each variable of ``env`` that is not set already (the user's value wins)."""
    for key, value in env.items():
        os.environ.setdefault(key, value)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_env() -> dict[str, str]:
    """``HAPROXY_ENV`` and a free port for each of ``HAPROXY_PORT_VARS``: the environment a
    Ray started for ``serve --haproxy`` needs (``set_env_defaults`` keeps the user's)."""
    return {**HAPROXY_ENV, **{var: str(free_port()) for var in HAPROXY_PORT_VARS}}


def init_ray(address: str | None = None, *, verbose: bool = False, **init_kwargs: Any) -> None:
    """Join ``address`` (or RAY_ADDRESS, as under ``ray job submit``; ``"auto"``: the cluster
    started with ``ray start`` on this machine), else start a new local Ray; either way every
    Ray process of the job gets RAY_ADDRESS naming this cluster. A no-op if Ray is running.

    Unless ``verbose``, Ray's own output (worker logs, Ray Data banners, Train's controller
    messages) stays in Ray's log files (``/tmp/ray/session_latest/logs``) and the console
    shows hrem-ray's lines only; workers send theirs through a ``LineRelay``.

    Each Ray Train run (a training, every trial of a sweep) starts a PlacementGroupCleaner that
    watches the run's controller through the state API, and the state API finds its cluster from
    RAY_ADDRESS or, failing that, by looking for Ray instances on the machine. With a second
    instance on the machine (another user's, a test's) it finds two and its thread dies; the
    placement group of every run that ends (finished, or a trial stopped by ASHA) then leaks,
    and after a trial or two a sweep waits forever for CPUs. A new local instance gets a GCS
    port chosen here, so that its address is known before it starts. ``init_kwargs`` go to
    ``ray.init`` (e.g. ``num_cpus``).
    """
    set_env_defaults()
    import ray

    if ray.is_initialized():
        return
    if not verbose:
        init_kwargs.setdefault("log_to_driver", False)
        init_kwargs.setdefault("logging_level", logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    if address == "local":
        port = free_port()
        # the address a new local Ray binds (loopback under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)
        env_vars.setdefault("RAY_ADDRESS", f"{ray.util.get_node_ip_address()}:{port}")
        previous = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        try:
            ray.init(address="local", runtime_env={**runtime_env, "env_vars": env_vars},
                     **init_kwargs)  # fmt: skip
        finally:
            if previous is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = previous
        return
    if "://" not in address and address != "auto":  # host:port of the GCS
        env_vars.setdefault("RAY_ADDRESS", address)
    if env_vars:
        runtime_env["env_vars"] = env_vars
    ray.init(address=address, runtime_env=runtime_env or None, **init_kwargs)


class LineRelay:
    """Console lines sent by Ray workers (rank 0 of a run) and printed by the driver, once.

    Ray's log forwarding to the driver is off by default (``init_ray``); this carries only
    hrem-ray's progress lines. ``send`` is picklable: it travels in a worker's config.
    """

    def __init__(self, log: Callable[[str], None]) -> None:
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.log = log
        # On the driver's node: a queue on a worker node would die with that node and take
        # the run with it (a lost node must only cost the epoch in progress).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)

    @property
    def send(self) -> Callable[[str], None]:
        return self.queue.put

    def __enter__(self) -> LineRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        while not self.queue.empty():  # what arrived after the last poll
            self.log(self.queue.get_nowait())
        self.queue.shutdown()

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self.log(self.queue.get(timeout=0.5))
            except Empty:
                continue
