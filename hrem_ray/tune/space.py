"""Search spaces for Ray Tune, read from ``tune_spaces/*.yaml`` and validated before any trial.

A space file names config keys (``section.key`` of ``hrem_ray.config``) and a distribution for
each, plus the sweep's settings::

    num_samples: 8
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
    search: random            # random | grid | optuna | hyperopt
    params:
      model.mask_weight: {uniform: [0.5, 2.5]}
      model.margin: {uniform: [0.1, 0.4]}
      model.num_layers_enc: {choice: [1, 2, 3, 4]}
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from hrem_ray.config import ConfigError, HREMConfig, read_yaml

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")
CONTINUOUS = ("uniform", "loguniform", "quniform")  # they sample floats
SEARCHERS = ("random", "grid", "optuna", "hyperopt")
TOP_KEYS = {"num_samples", "scheduler", "search", "params", "max_concurrent_trials"}
SCHEDULER_KEYS = {"type", "grace_period", "reduction_factor"}


class SpaceError(ConfigError):
    """A search-space file that cannot be used; the message names the key."""


@dataclass
class SearchSpace:
    params: dict[str, dict[str, Any]]  # config key -> {distribution: argument}
    num_samples: int = 4
    search: str = "random"
    scheduler: dict[str, Any] = field(
        default_factory=lambda: {"type": "asha", "grace_period": 1, "reduction_factor": 2}
    )
    max_concurrent_trials: int | None = None

    def param_space(self) -> dict[str, Any]:
        """The Ray Tune ``param_space``: config key -> Tune domain."""
        return {key: _domain(spec) for key, spec in self.params.items()}

    def check(self, base: HREMConfig) -> SearchSpace:
        """Every parameter's extreme values are valid on top of ``base`` (the sweep's own
        config, whose other keys, e.g. embed_size for num_heads, may differ from the
        defaults the file was checked against on load)."""
        for key, spec in self.params.items():
            _check_param(key, spec, base)
        return self


def _domain(spec: dict[str, Any]) -> Any:
    ((kind, arg),) = spec.items()
    if kind == "choice":
        return tune.choice(arg)
    if kind == "grid":
        return tune.grid_search(arg)
    if kind == "quniform":
        return tune.quniform(*arg)
    return getattr(tune, kind)(*arg)


def load_space(path: str | Path, base: HREMConfig | None = None) -> SearchSpace:
    """Read and validate a space file; every problem is a SpaceError naming the key.

    With ``base``, parameter values are checked on top of that config, not the defaults."""
    raw = read_yaml(path, SpaceError, "search space")
    try:
        return parse_space(raw, base)
    except SpaceError as e:
        raise SpaceError(f"{path}: {e}") from None


def parse_space(raw: Any, base: HREMConfig | None = None) -> SearchSpace:
    if not isinstance(raw, dict):
        raise SpaceError("a search space must be a mapping")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise SpaceError(f"unknown key(s) {', '.join(sorted(unknown))}")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise SpaceError("'params' must map at least one config key to a distribution")
    for key, spec in params.items():
        _check_param(key, spec, base)
    space = SearchSpace(params=params)
    if "num_samples" in raw:
        n = raw["num_samples"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SpaceError(f"'num_samples' must be a positive integer, got {n!r}")
        space.num_samples = n
    if "search" in raw:
        if raw["search"] not in SEARCHERS:
            raise SpaceError(f"'search' must be one of {', '.join(SEARCHERS)}")
        space.search = raw["search"]
        if space.search in ("optuna", "hyperopt") and not importlib.util.find_spec(space.search):
            raise SpaceError(f"'search': {space.search} is not installed (pip install it)")
    if "scheduler" in raw:
        space.scheduler = _check_scheduler(raw["scheduler"])
    if "max_concurrent_trials" in raw:
        m = raw["max_concurrent_trials"]
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise SpaceError(f"'max_concurrent_trials' must be a positive integer, got {m!r}")
        space.max_concurrent_trials = m
    grids = [k for k, spec in params.items() if "grid" in spec]
    if space.search != "random" and space.search != "grid" and grids:
        raise SpaceError(f"'{grids[0]}': grid values need search: random or grid")
    if space.search == "grid" and len(grids) != len(params):
        other = next(k for k in params if k not in grids)
        raise SpaceError(f"'{other}': search: grid needs every parameter as a grid")
    return space


def _check_param(key: str, spec: Any, base: HREMConfig | None = None) -> None:
    """The distribution is well formed and its extreme values are valid for the config key."""
    examples = _examples(key, spec)
    ((kind, _),) = spec.items()
    for value in examples:
        probe = HREMConfig() if base is None else copy.deepcopy(base)
        try:
            probe.set(key, value)
            probe.validate()
        except ConfigError as e:
            if kind in CONTINUOUS and _is_int_key(key):
                raise SpaceError(
                    f"'{key}': {kind} samples floats but {key} is an integer "
                    "(use randint or choice)"
                ) from None
            raise SpaceError(f"'{key}': {e}") from None


def _is_int_key(key: str) -> bool:
    section, _, name = key.partition(".")
    default = getattr(getattr(HREMConfig(), section, None), name, None)
    return isinstance(default, int) and not isinstance(default, bool)


def _examples(key: str, spec: Any) -> list[Any]:
    """Check the distribution's shape; return the values to check against the config."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(f"'{key}' must be {{distribution: argument}}, one of {DISTRIBUTIONS}")
    ((kind, arg),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SpaceError(f"'{key}': unknown distribution '{kind}' (use {', '.join(DISTRIBUTIONS)})")
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise SpaceError(f"'{key}': {kind} needs a non-empty list of values")
        return arg
    n_args = 3 if kind == "quniform" else 2
    if not isinstance(arg, list) or len(arg) != n_args:
        raise SpaceError(
            f"'{key}': {kind} needs [{'low, high, step' if n_args == 3 else 'low, high'}]"
        )
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in arg):
        raise SpaceError(f"'{key}': {kind} bounds must be numbers, got {arg!r}")
    low, high = arg[0], arg[1]
    if not low < high:
        raise SpaceError(f"'{key}': empty range [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"'{key}': loguniform needs low > 0, got {low}")
    if kind == "quniform" and not arg[2] > 0:
        raise SpaceError(f"'{key}': quniform needs step > 0, got {arg[2]}")
    if kind == "randint":
        if not (isinstance(low, int) and isinstance(high, int)):
            raise SpaceError(f"'{key}': randint bounds must be integers")
        return [low, high - 1]  # Tune's randint excludes high
    # uniform, loguniform and quniform sample floats: an int key cannot take them
    return [float(low), float(high)]


def _check_scheduler(spec: Any) -> dict[str, Any]:
    if spec is None or spec == "none":
        return {"type": "none"}
    if not isinstance(spec, dict):
        raise SpaceError("'scheduler' must be a mapping like {type: asha, grace_period: 1}")
    unknown = set(spec) - SCHEDULER_KEYS
    if unknown:
        raise SpaceError(f"unknown scheduler key(s) {', '.join(sorted(unknown))}")
    kind = spec.get("type", "asha")
    if kind not in ("asha", "none"):
        raise SpaceError(f"'scheduler.type' must be asha or none, got {kind!r}")
    out = {"type": kind, "grace_period": 1, "reduction_factor": 2, **spec}
    for key in ("grace_period", "reduction_factor"):
        v = out[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SpaceError(f"'scheduler.{key}' must be a positive integer, got {v!r}")
    if out["reduction_factor"] < 2:
        raise SpaceError("'scheduler.reduction_factor' must be >= 2")
    return out


# Keys that change a run only through the instance-level relation module: before
# ``model.warmup`` iterations they have no effect on the loss (docs/sweeps.md).
RELATION_KNOBS = (
    "model.mask_weight",
    "model.num_layers_enc",
    "model.threshold",
    "model.frag_topk",
    "model.frag_min_words",
    "model.kl_weight",
    "model.relation_loss",
    "model.cross_loss",
    "train.relation_lr_factor",
)


def iterations_per_epoch(cfg: HREMConfig, n_captions: int) -> int:
    """Training steps per epoch: the last partial batch is dropped."""
    return n_captions // cfg.train.batch_size


def check_relation_knobs_active(space: SearchSpace, cfg: HREMConfig, n_captions: int) -> None:
    """Refuse a sweep whose searched relation knobs cannot act before ASHA's first cut or
    before the last epoch: the trials would differ by noise only (docs/sweeps.md)."""
    knobs = [k for k in space.params if k in RELATION_KNOBS]
    if not knobs:
        return
    warmup = cfg.model.warmup
    if "model.warmup" in space.params:  # the latest start any trial can get
        warmup = max(_examples("model.warmup", space.params["model.warmup"]))
    per_epoch = iterations_per_epoch(cfg, n_captions)
    start = warmup // per_epoch + 1  # the 1-based epoch whose training first runs it
    why = (
        f"the searched relation knob(s) {', '.join(knobs)} act only from epoch {start} "
        f"(model.warmup={warmup} iterations, {per_epoch} per epoch = {n_captions} captions "
        f"// batch {cfg.train.batch_size})"
    )
    fix = "lower model.warmup, or search other keys (--allow-inactive runs it anyway)"
    if cfg.train.epochs < start:
        raise SpaceError(f"{why}, but trials stop after {cfg.train.epochs} epoch(s): raise "
                         f"--epochs to >= {start}, {fix}")  # fmt: skip
    grace = space.scheduler.get("grace_period")
    if space.scheduler["type"] == "asha" and grace < start:
        raise SpaceError(
            f"{why}, but ASHA's scheduler.grace_period={grace} cuts trials before that: "
            f"raise grace_period to >= {start}, {fix}"
        )
