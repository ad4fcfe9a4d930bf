"""``hrem_ray.env``: defaults fill what is unset and never override the user's settings."""

from __future__ import annotations

import os

from hrem_ray.ray_runtime import ENV_DEFAULTS, OFFLINE_ENV, RAY_ENV_DEFAULTS, set_env_defaults


def test_user_values_win_and_missing_ones_are_set(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    set_env_defaults()
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"


def test_subset_leaves_other_variables_alone(monkeypatch):
    for key in ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    set_env_defaults(OFFLINE_ENV)
    assert all(os.environ[k] == v for k, v in OFFLINE_ENV.items())
    assert not any(k in os.environ for k in RAY_ENV_DEFAULTS)
