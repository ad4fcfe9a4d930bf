"""The environment every hrem-ray process sets before Ray or transformers start.

Every Ray process inherits these from the process that starts Ray (facts measured in
../shared/docs/ray-notes.md); transformers reads its offline switches when first imported.
This module imports neither Ray nor torch, so scripts can use it before either.
"""

from __future__ import annotations

import os

# For a shared cluster use RAY_AUTH_MODE=token instead (see the README).
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


def set_env_defaults(env: dict[str, str] = ENV_DEFAULTS) -> None:
    """Set each variable of ``env`` that is not set already (the user's value wins)."""
    for key, value in env.items():
        os.environ.setdefault(key, value)
