"""Ray Tune sweeps: search-space validation (fast, no Ray), a whole sweep end to end, and an
interrupted sweep resumed with ``--resume``.

The end-to-end sweep runs 4 trials of 2 epochs one at a time, each a Ray Train run, under ASHA
(grace 1, reduction factor 2). Its space is a grid over the learning rate, in this order:
3e-3, 1e-6, 2e-6, 1e-3. With one trial at a time ASHA's rung-1 cutoff for a trial is the
median of the earlier trials' epoch-1 dev rsum, and a trial below it stops. At 1e-6 and 2e-6
the model stays at its initialisation (chance, about 60 on 50 dev images) while 3e-3 is
already well above it after one epoch (about 105), so the 2nd and 3rd trials stop after
epoch 1 whatever the noise, and the 1st runs both epochs (nothing to compare with yet).
Measured rsum after epoch 1 / 2: 106.0 / 178.8, 59.2, 59.2, 93.2 / 146.4.

The resume test runs ``hrem-ray tune`` in a subprocess (2 trials, no ASHA) and SIGKILLs all
of it once the first trial is TERMINATED in Tune's saved experiment state and the second has
registered its epoch-1 checkpoint; ``--resume`` then runs only the second trial's epoch 2.

Costs measured on the 2-core machine: the fast tests 4 s; the sweep 139 s at a load average
of 2 (152-170 s at 6-15, with other people's Ray tests running); the resume test 100 s at 2
(195-246 s at 6-15); the file 6-7.5 min under that load. Both Ray tests start their own Ray
(one at a time) through ``init_ray``, which gives every Ray process RAY_ADDRESS: without
it Ray Train's placement-group cleaner cannot tell its cluster from other Ray instances on
the machine, and the placement group of every trial that ends leaks until the sweep hangs.
See docs/ray.md for the environment.
"""

from __future__ import annotations

import contextlib
import csv
import filecmp
import importlib
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import ray
import yaml
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized

from hrem_ray import tracking
from hrem_ray.checkpoint import load_checkpoint, read_record
from hrem_ray.cli import main
from hrem_ray.config import HREMConfig, load_config
from hrem_ray.eval.evaluate import evaluate_ensemble
from hrem_ray.options import RayRunOptions, SweepOptions
from hrem_ray.ray_runtime import ENV_DEFAULTS, init_ray
from hrem_ray.synth import write_synthetic
from hrem_ray.testing import TINY_MODEL, alive, tiny_data_and_checkpoint
from hrem_ray.tune.space import (
    SearchSpace,
    SpaceError,
    check_relation_knobs_active,
    load_space,
    parse_space,
)
from hrem_ray.tune.sweep import (
    ENSEMBLE_JSON,
    export_ensemble,
    run_sweep,
    trial_config,
)
from tests.helpers import run_err

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
BATCH = 32
# 300 images x 5 captions: 46 steps of 32 per epoch, enough for lr 3e-3 to leave chance level
# in one epoch; no relation module (warmup beyond the run) and no lr decay, so that the
# learning rate is the only thing the trials differ in.
SYNTH = dict(train_images=300, dev_images=50, test_images=10, regions=12, dim=64)
SETS = [
    "model.img_dim=64",
    "model.embed_size=32",
    "model.num_heads=4",
    "model.ff_dim=64",
    "model.mlp_hidden=32",
    "model.dropout=0.0",
    "model.warmup=1000",
    "train.bert_lr_factor=1.0",
    "train.lr_decay_epochs=[]",
    "train.log_every=1000",
]
GOOD, BAD, BAD2, FAIR = 3e-3, 1e-6, 2e-6, 1e-3
E2E_SPACE = {
    "num_samples": 1,
    "search": "grid",
    "max_concurrent_trials": 1,
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "params": {"train.lr": {"grid": [GOOD, BAD, BAD2, FAIR]}},
}
ROW_KEYS = {"trial", "best_rsum", "best_epoch", "epochs_run", "stopped_early", "error",
            "checkpoint", "curve"}  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- fast: no Ray

OK_PARAMS = {"model.margin": {"uniform": [0.1, 0.4]}}
BAD_SPACES = {
    # unknown keys
    "unknown param key": ({"params": {"model.nope": {"uniform": [0, 1]}}}, ["model.nope"]),
    "unknown section": ({"params": {"optim.lr": {"uniform": [0.1, 1]}}}, ["optim.lr"]),
    "key without section": ({"params": {"margin": {"uniform": [0.1, 1]}}}, ["'margin'"]),
    "unknown top-level key": ({"params": OK_PARAMS, "schedular": {}}, ["schedular"]),
    # ranges
    "empty range": ({"params": {"model.margin": {"uniform": [1, 1]}}},
                    ["model.margin", "empty range"]),
    "reversed range": ({"params": {"model.mask_weight": {"uniform": [2, 1]}}},
                       ["model.mask_weight", "empty range"]),
    "empty randint": ({"params": {"model.num_layers_enc": {"randint": [3, 3]}}},
                      ["model.num_layers_enc", "empty range"]),
    "loguniform from 0": ({"params": {"train.lr": {"loguniform": [0, 1e-3]}}},
                          ["train.lr", "low > 0"]),
    "quniform step 0": ({"params": {"model.margin": {"quniform": [0.1, 0.4, 0]}}},
                        ["model.margin", "step"]),
    "one bound": ({"params": {"model.margin": {"uniform": [0.1]}}}, ["model.margin"]),
    "empty choice": ({"params": {"model.margin": {"choice": []}}}, ["model.margin", "choice"]),
    # types
    "strings for a float key": ({"params": {"model.margin": {"choice": ["a", "b"]}}},
                                ["model.margin", "float"]),
    "uniform on an int key": ({"params": {"model.num_layers_enc": {"uniform": [1, 4]}}},
                              ["model.num_layers_enc", "integer"]),
    "quniform on an int key": ({"params": {"model.num_layers_enc": {"quniform": [1, 4, 1]}}},
                               ["model.num_layers_enc", "integer"]),
    "float in a choice for an int key": (
        {"params": {"model.num_layers_enc": {"choice": [1, 2.5]}}}, ["model.num_layers_enc"]),
    "bool for a float key": ({"params": {"model.margin": {"choice": [True]}}}, ["model.margin"]),
    "non-numeric bounds": ({"params": {"model.margin": {"uniform": ["low", 0.4]}}},
                           ["model.margin", "numbers"]),
    "float randint bounds": ({"params": {"model.num_layers_enc": {"randint": [1.0, 3]}}},
                             ["model.num_layers_enc", "randint"]),
    "bare value": ({"params": {"model.margin": 0.2}}, ["model.margin"]),
    "two distributions": ({"params": {"model.margin": {"uniform": [0.1, 0.4],
                                                       "choice": [0.2]}}}, ["model.margin"]),
    # values the config rejects
    "threshold 0 (uniform)": ({"params": {"model.threshold": {"uniform": [0.0, 0.5]}}},
                              ["model.threshold", "(0, 1]"]),
    "threshold 0 (choice)": ({"params": {"model.threshold": {"choice": [0, 0.5]}}},
                             ["model.threshold"]),
    "threshold above 1": ({"params": {"model.threshold": {"uniform": [0.5, 1.5]}}},
                          ["model.threshold"]),
    "negative margin": ({"params": {"model.margin": {"uniform": [-0.1, 0.4]}}},
                        ["model.margin"]),
    "unknown distribution": ({"params": {"model.margin": {"normal": [0.2, 0.1]}}},
                             ["model.margin", "normal"]),
    # sweep settings
    "no params": ({"num_samples": 4}, ["params"]),
    "empty params": ({"params": {}}, ["params"]),
    "num_samples 0": ({"params": OK_PARAMS, "num_samples": 0}, ["num_samples"]),
    "num_samples text": ({"params": OK_PARAMS, "num_samples": "four"}, ["num_samples"]),
    "unknown searcher": ({"params": OK_PARAMS, "search": "bayes"}, ["search"]),
    "max_concurrent_trials 0": ({"params": OK_PARAMS, "max_concurrent_trials": 0},
                                ["max_concurrent_trials"]),
    "grace_period 0": ({"params": OK_PARAMS, "scheduler": {"type": "asha", "grace_period": 0}},
                       ["scheduler.grace_period"]),
    "grace_period 1.5": ({"params": OK_PARAMS, "scheduler": {"grace_period": 1.5}},
                         ["scheduler.grace_period"]),
    "reduction_factor 1": ({"params": OK_PARAMS, "scheduler": {"reduction_factor": 1}},
                           ["scheduler.reduction_factor"]),
    "scheduler type": ({"params": OK_PARAMS, "scheduler": {"type": "hyperband"}},
                       ["scheduler.type", "hyperband"]),
    "unknown scheduler key": ({"params": OK_PARAMS, "scheduler": {"max_t": 10}}, ["max_t"]),
    "scheduler not a mapping": ({"params": OK_PARAMS, "scheduler": [1, 2]}, ["scheduler"]),
    "grid mixed with uniform": (
        {"search": "grid", "params": {"model.margin": {"grid": [0.1, 0.2]},
                                      "model.mask_weight": {"uniform": [0.5, 2.5]}}},
        ["model.mask_weight", "grid"]),
    "not a mapping": ([1, 2], ["mapping"]),
}  # fmt: skip


@pytest.mark.parametrize("raw, words", BAD_SPACES.values(), ids=BAD_SPACES.keys())
def test_bad_space_is_one_error_naming_the_key(tmp_path, raw, words):
    path = _write(tmp_path / "space.yaml", raw)
    with pytest.raises(SpaceError) as exc:
        load_space(path)
    msg = str(exc.value)
    assert isinstance(exc.value, ValueError)  # the CLI's user errors: exit 2, one line
    assert str(path) in msg and "\n" not in msg, msg
    for word in words:
        assert word in msg, msg


@pytest.mark.parametrize(
    "text, word",
    [("params: [unclosed\n", "not valid YAML"), (None, "not found")],
    ids=["broken YAML", "missing file"],
)
def test_unreadable_space_file(tmp_path, text, word):
    path = tmp_path / "space.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SpaceError, match=word):
        load_space(path)


def test_searcher_must_be_installed():
    for searcher in ("optuna", "hyperopt"):
        raw = {"search": searcher, "params": OK_PARAMS}
        if importlib.util.find_spec(searcher) is None:
            with pytest.raises(SpaceError, match=f"'search': {searcher} is not installed"):
                parse_space(raw)
        else:
            assert parse_space(raw).search == searcher


def _sample(domain, n: int = 25) -> list:
    if isinstance(domain, dict):  # grid_search
        return list(domain["grid_search"])
    return [domain.sample() for _ in range(n)]


SHIPPED = sorted((REPO / "tune_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_spaces_load_and_every_sample_is_a_valid_config(path):
    space = load_space(path)
    assert space.num_samples >= 1 and space.scheduler["type"] == "asha"
    domains = space.param_space()
    assert set(domains) == set(space.params) and domains
    base = HREMConfig().to_dict()
    for key, domain in domains.items():
        for value in _sample(domain):
            assert trial_config(base, {key: value}) is not None  # validates or raises


def test_shipped_spaces_exist():
    assert {p.name for p in SHIPPED} >= {"default.yaml", "wide.yaml"}


def test_param_space_builds_tune_domains():
    space = parse_space({"params": {
        "model.mask_weight": {"uniform": [0.5, 2.5]},
        "train.lr": {"loguniform": [1e-4, 1e-3]},
        "model.margin": {"quniform": [0.1, 0.4, 0.05]},
        "model.num_layers_enc": {"randint": [1, 3]},
        "model.maxk": {"choice": [1, 2]},
        "model.threshold": {"grid": [0.3, 0.5]},
    }})  # fmt: skip
    d = space.param_space()
    assert isinstance(d["model.mask_weight"], Float)
    assert (d["model.mask_weight"].lower, d["model.mask_weight"].upper) == (0.5, 2.5)
    assert isinstance(d["train.lr"], Float)
    assert isinstance(d["train.lr"].get_sampler(), LogUniform)
    assert isinstance(d["model.margin"].get_sampler(), Quantized)
    assert d["model.margin"].get_sampler().q == 0.05
    assert isinstance(d["model.num_layers_enc"], Integer)
    assert isinstance(d["model.maxk"], Categorical)
    assert d["model.maxk"].categories == [1, 2]
    assert d["model.threshold"] == {"grid_search": [0.3, 0.5]}
    # Tune's randint excludes its upper bound: [1, 3) gives 1 or 2, both valid depths
    assert set(_sample(d["model.num_layers_enc"], 200)) == {1, 2}
    base = HREMConfig().to_dict()
    for key, domain in d.items():
        for value in _sample(domain):
            trial_config(base, {key: value})


def test_space_defaults_and_scheduler_none():
    space = parse_space({"params": OK_PARAMS})
    assert isinstance(space, SearchSpace)
    assert (space.num_samples, space.search, space.max_concurrent_trials) == (4, "random", None)
    assert space.scheduler == {"type": "asha", "grace_period": 1, "reduction_factor": 2}
    assert parse_space({"params": OK_PARAMS, "scheduler": "none"}).scheduler == {"type": "none"}
    grid = parse_space({"search": "grid", "params": {"model.margin": {"grid": [0.1, 0.2]}}})
    assert grid.search == "grid"


@pytest.fixture
def no_ray():
    """No Ray running in this process (an earlier test module may have left one), so that
    the test can tell whether the code under test started one."""
    if ray.is_initialized():
        ray.shutdown()


def _tiny_cfg(data: str, bert: str) -> HREMConfig:
    return load_config(None, [*SETS, f"data.data_path={data}", f"model.bert_path={bert}",
                              "train.epochs=1"])  # fmt: skip


def test_space_is_checked_against_the_sweeps_config(no_ray, tmp_path, tiny_bert):
    """64 heads divide the default embed_size (1024) but not the sweep's (32): the file loads
    on its own, and fails naming the key once checked against the config it will run on,
    before the sweep folder or Ray exists."""
    raw = {"params": {"model.num_heads": {"choice": [4, 64]}}}
    space = parse_space(raw)
    cfg = _tiny_cfg(str(tmp_path / "data"), tiny_bert)
    with pytest.raises(SpaceError, match=r"'model\.num_heads'.*embed_size"):
        load_space(_write(tmp_path / "space.yaml", raw), base=cfg)
    with pytest.raises(SpaceError, match=r"'model\.num_heads'"):
        space.check(cfg)
    assert not ray.is_initialized()
    options = SweepOptions(RayRunOptions(str(tmp_path / "runs"), "s"))
    with pytest.raises(SpaceError, match=r"'model\.num_heads'"):
        run_sweep(cfg, space, options, log=lambda _: None)
    assert not (tmp_path / "runs").exists()
    assert not ray.is_initialized()


CLI_BAD = {
    "unknown key": ({"params": {"model.nope": {"uniform": [0.1, 0.4]}}}, "model.nope"),
    "uniform on an int key": ({"params": {"model.num_layers_enc": {"uniform": [1, 4]}}},
                              "model.num_layers_enc"),
    "threshold 0": ({"params": {"model.threshold": {"uniform": [0.0, 0.5]}}},
                    "model.threshold"),
    "bad scheduler": ({"params": OK_PARAMS, "scheduler": {"grace_period": 0}},
                      "scheduler.grace_period"),
    "heads vs the sweep's embed_size": ({"params": {"model.num_heads": {"choice": [64]}}},
                                        "model.num_heads"),
}  # fmt: skip


@pytest.mark.parametrize("raw, key", CLI_BAD.values(), ids=CLI_BAD.keys())
def test_cli_bad_space_exits_2_before_ray(no_ray, capsys, tmp_path, tiny_bert, raw, key):
    space = _write(tmp_path / "space.yaml", raw)
    storage = tmp_path / "runs"
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--space", str(space), "--data-path", str(tmp_path / "data"),
              "--dataset", "f30k", "--bert-path", tiny_bert, "--storage-path", str(storage),
              "--name", "bad", *[x for s in SETS for x in ("--set", s)]])  # fmt: skip
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("hrem-ray tune: error: ") and key in lines[0], lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert not ray.is_initialized()
    assert not storage.exists()


@pytest.mark.parametrize("flag", ["--num-samples", "--max-concurrent-trials"])
def test_cli_bad_counts_exit_2_before_ray(no_ray, capsys, tmp_path, flag):
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--space", str(REPO / "tune_spaces" / "default.yaml"), flag, "0",
              "--storage-path", str(tmp_path / "runs")])  # fmt: skip
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hrem-ray tune: error: {flag} must be >= 1"), err
    assert not ray.is_initialized()


def _first_relation_epoch(n_captions: int, batch: int, warmup: int) -> int:
    """Step through training iteration by iteration: the 1-based epoch of the first step
    at which the relation module runs (iteration >= warmup)."""
    iteration, epoch = 0, 0
    while True:
        epoch += 1
        for _ in range(n_captions // batch):
            if iteration >= warmup:
                return epoch
            iteration += 1


F30K_CAPTIONS = 29_000 * 5
RECIPE = REPO / "configs" / "hrem_f30k.yaml"
RELATION_SPACE = {"params": {"model.mask_weight": {"uniform": [0.5, 2.5]}}}


@pytest.mark.parametrize(
    ("n_captions", "batch", "warmup"), [(F30K_CAPTIONS, 128, 8000), (5000, 64, 100),
                                        (1000, 100, 0), (1000, 100, 20), (1000, 100, 21)],
)  # fmt: skip
def test_relation_knobs_need_a_grace_period_past_the_warmup(n_captions, batch, warmup):
    start = _first_relation_epoch(n_captions, batch, warmup)
    cfg = load_config(None, [f"train.batch_size={batch}", f"model.warmup={warmup}"])
    for grace in [g for g in (start - 1, start) if g >= 1]:
        raw = {**RELATION_SPACE, "scheduler": {"grace_period": grace}}
        space = parse_space(raw)
        if grace < start:
            with pytest.raises(SpaceError, match=rf"epoch {start} .*grace_period={grace} "):
                check_relation_knobs_active(space, cfg, n_captions)
        else:
            check_relation_knobs_active(space, cfg, n_captions)
    cfg.train.epochs = start - 1
    if start > 1:
        with pytest.raises(
            SpaceError, match=rf"stop after {start - 1} epoch.*--epochs to >= {start}"
        ):
            check_relation_knobs_active(parse_space({**RELATION_SPACE, "scheduler": "none"}),
                                        cfg, n_captions)  # fmt: skip


def test_f30k_recipe_numbers_in_the_error():
    cfg = load_config(RECIPE)
    with pytest.raises(SpaceError) as e:
        check_relation_knobs_active(load_space(REPO / "tune_spaces" / "default.yaml"), cfg,
                                    F30K_CAPTIONS)  # fmt: skip
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("model.mask_weight, model.num_layers_enc", "epoch 8", "model.warmup=8000",
                 "1132 per epoch", "145000 captions // batch 128", "grace_period=2",
                 "to >= 8", "--allow-inactive"):  # fmt: skip
        assert part in msg, (part, msg)
    assert "model.margin" not in msg  # it acts through the base loss from the first step
    check_relation_knobs_active(load_space(REPO / "tune_spaces" / "hrem_f30k.yaml"), cfg,
                                F30K_CAPTIONS)  # fmt: skip


def test_only_relation_knobs_are_checked_and_a_searched_warmup_counts_at_its_largest():
    cfg = load_config(RECIPE)
    space = parse_space({"params": {"train.lr": {"loguniform": [1e-4, 1e-3]},
                                    "model.margin": {"uniform": [0.1, 0.4]}}})  # fmt: skip
    check_relation_knobs_active(space, cfg, F30K_CAPTIONS)
    space = parse_space({"params": {**RELATION_SPACE["params"],
                                    "model.warmup": {"choice": [0, 12000]}},
                         "scheduler": {"grace_period": 10}})  # fmt: skip
    with pytest.raises(SpaceError, match=r"epoch 11 .*model\.warmup=12000"):
        check_relation_knobs_active(space, cfg, F30K_CAPTIONS)


def test_sweep_with_sleeping_knobs_fails_before_ray(no_ray, tmp_path, tiny_bert, monkeypatch):
    """run_sweep refuses before any trial; --allow-inactive reaches run_sweep as the option."""
    write_synthetic(tmp_path / "data", train_images=20, dev_images=5, test_images=5,
                    regions=4, dim=64)  # fmt: skip
    cfg = _tiny_cfg(str(tmp_path / "data"), tiny_bert)
    cfg.train.batch_size = BATCH  # 100 captions // 32 = 3 iterations per epoch, warmup 1000
    options = SweepOptions(RayRunOptions(str(tmp_path / "runs"), "s"))
    with pytest.raises(SpaceError, match=r"model\.mask_weight act only from epoch 334"):
        run_sweep(cfg, parse_space(RELATION_SPACE), options, log=lambda _: None)
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()

    seen = {}

    def fake_sweep(cfg, space, options, log):
        seen["options"] = options
        return {"best": "nowhere"}

    monkeypatch.setattr("hrem_ray.ray_runtime.init_ray", lambda *a, **k: None)
    monkeypatch.setattr("hrem_ray.tune.sweep.run_sweep", fake_sweep)
    space = _write(tmp_path / "space.yaml", RELATION_SPACE)
    main(["tune", "--space", str(space), "--allow-inactive", "--storage-path", str(tmp_path)])
    assert seen["options"].allow_inactive is True


@pytest.mark.parametrize(
    ("k", "message"),
    [("1", "must be an integer >= 2, got 1"), ("0", ">= 2"), ("-3", ">= 2"),
     ("5", "--ensemble-top 5: the sweep runs at most 4 trial(s)")],
)  # fmt: skip
def test_cli_tune_ensemble_top_is_checked_before_ray(no_ray, tmp_path, capsys, k, message):
    """E2E_SPACE is a grid of 4 trials: K must be 2 to 4, refused before Ray or any folder."""
    space = _write(tmp_path / "space.yaml", E2E_SPACE)
    line = run_err(capsys, "tune", "--space", str(space), "--ensemble-top", k,
                   "--storage-path", str(tmp_path / "runs"))  # fmt: skip
    assert message in line, line
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()
    if int(k):  # run_sweep checks it too (its ensemble_top=0 means no ensemble)
        options = SweepOptions(RayRunOptions(str(tmp_path / "runs"), "s"), ensemble_top=int(k))
        with pytest.raises(ValueError, match=r"--ensemble-top"):
            run_sweep(load_config(None, SETS), parse_space(E2E_SPACE), options, log=print)
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def trial_rows(tmp_path_factory, tiny_bert) -> tuple[Path, list[dict]]:
    """Tiny data and the trial table of a finished sweep: three trials with a checkpoint
    (fresh tiny models of different seeds) and one that failed before its first epoch."""
    root = tmp_path_factory.mktemp("ensemble")
    data, c1 = tiny_data_and_checkpoint(root, tiny_bert)
    c2, c3 = root / "c2", root / "c3"
    for seed, out in ((1, c2), (2, c3)):
        main(["init-checkpoint", "--out", str(out), "--bert-path", tiny_bert, "--seed", str(seed),
              *TINY_MODEL])  # fmt: skip
    rows = [
        {"trial": "t1", "best_rsum": 10.0, "checkpoint": str(c1)},
        {"trial": "t2", "best_rsum": 30.0, "checkpoint": str(c2)},
        {"trial": "t3", "best_rsum": 20.0, "checkpoint": str(c3)},
        {"trial": "t4", "best_rsum": None, "checkpoint": None},
    ]
    return data, rows


def test_export_ensemble_of_the_top_trials(no_ray, trial_rows, tmp_path):
    """The K trials with the best dev rsum, best first: copies of their checkpoints and
    ensemble.json, whose dev rsum is ``evaluate_ensemble`` of the exported members; a K
    beyond the trials that finished with a checkpoint is refused and writes nothing."""
    data, rows = trial_rows
    c2, c3 = Path(rows[1]["checkpoint"]), Path(rows[2]["checkpoint"])
    cfg = load_config(None, [f"data.data_path={data}"])
    sweep, lines = tmp_path / "sweep", []
    summary = export_ensemble(rows, 2, str(sweep), cfg, log=lines.append)
    ens = sweep / "ensemble"
    assert summary["path"] == str(ens)
    assert sorted(p.name for p in ens.iterdir()) == [ENSEMBLE_JSON, "member1", "member2"]
    assert _same_tree(ens / "member1", c2) and _same_tree(ens / "member2", c3)
    record = json.loads((ens / ENSEMBLE_JSON).read_text())
    assert [(m["dir"], m["trial"], m["dev_rsum"], m["source"]) for m in record["members"]] == [
        ("member1", "t2", 30.0, str(c2)),
        ("member2", "t3", 20.0, str(c3)),
    ]
    want = evaluate_ensemble([ens / "member1", ens / "member2"], data, "f30k", "dev")
    assert record["dev_rsum"] == summary["dev_rsum"] == want["rsum"]
    assert record["dev_metrics"]["i2t"] == want["i2t"] and record["split"] == "dev"
    assert record["best_single_dev_rsum"] == 30.0
    assert f"dev rsum {want['rsum']:.2f}, best single trial t2: 30.00" in lines[-1]
    assert sorted(p.name for p in sweep.iterdir()) == ["ensemble"]  # no temporary folder

    with pytest.raises(ValueError, match=r"--ensemble-top 4: only 3 trial\(s\)"):
        export_ensemble(rows, 4, str(tmp_path / "other"), cfg, log=lines.append)
    assert not (tmp_path / "other").exists()


def test_export_ensemble_to_a_uri(no_ray, trial_rows, s3_server):
    """On an object store: ensemble.json and the members readable through their URIs, the
    completeness marker written, and the same dev rsum from the members read back."""
    from hrem_ray import storage
    from tests.conftest import S3_BUCKET

    data, rows = trial_rows
    cfg = load_config(None, [f"data.data_path={data}"])
    sweep = f"s3://{S3_BUCKET}/sweeps/ens"
    summary = export_ensemble(rows, 3, sweep, cfg, log=lambda _: None)
    ens = f"{sweep}/ensemble"
    assert summary["path"] == ens
    assert storage.exists(f"{ens}/{storage.MARKER}")
    record = json.loads(storage.read_text(f"{ens}/{ENSEMBLE_JSON}"))
    assert [m["trial"] for m in record["members"]] == ["t2", "t3", "t1"]
    members = [f"{ens}/{m['dir']}" for m in record["members"]]
    for member, row in zip(members, (rows[1], rows[2], rows[0]), strict=True):
        assert read_record(member)["config"] == read_record(row["checkpoint"])["config"]
    assert record["dev_rsum"] == evaluate_ensemble(members, data, "f30k", "dev")["rsum"]


# --------------------------------------------------------------------------- helpers for Ray


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune_data")
    write_synthetic(root, **SYNTH, progress=None)
    return root


def _tune_argv(space: Path, data: Path, bert: str, storage: Path, name: str) -> list[str]:
    return [
        "tune", "--space", str(space), "--data-path", str(data), "--dataset", "f30k",
        "--bert-path", bert, "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
        "--storage-path", str(storage), "--name", name,
        "--num-workers", "1", "--cpus-per-worker", "0.5",
        *[x for s in SETS for x in ("--set", s)],
    ]  # fmt: skip


def _best_from_stdout(out: str) -> Path:
    """The CLI's contract: its last line is ``best checkpoint: <path>``."""
    last = out.strip().splitlines()[-1]
    assert last.startswith("best checkpoint: "), out[-3000:]
    return Path(last.removeprefix("best checkpoint: "))


def _wait_cpus_released(timeout: float = 60.0) -> None:
    """A leaked placement group keeps CPUs reserved after the sweep (ray-notes.md)."""
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0.0) == total, ray.available_resources()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(_same_tree(a / d, b / d) for d in cmp.common_dirs)


def _check_tables(sweep: Path, n: int, param: str) -> list[dict]:
    """trials.json and trials.csv: one row per trial with its config and outcome."""
    rows = json.loads((sweep / "trials.json").read_text())
    assert len(rows) == n
    for row in rows:
        assert ROW_KEYS | {param} <= set(row), row
        assert row["error"] is None, row
        assert row["epochs_run"] == len(row["curve"]) >= 1
        assert row["best_rsum"] == max(row["curve"])
        assert row["stopped_early"] == (row["epochs_run"] < EPOCHS)
        assert Path(row["checkpoint"]).is_dir()
        assert read_record(row["checkpoint"])["meta"]["epoch"] == row["best_epoch"] - 1
    with open(sweep / "trials.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == n
    assert {param, "best_rsum", "epochs_run", "stopped_early"} <= set(table[0])
    for line, row in zip(table, rows, strict=True):
        assert line["trial"] == row["trial"]
        assert float(line[param]) == row[param]
        assert float(line["best_rsum"]) == row["best_rsum"]
        assert int(line["epochs_run"]) == row["epochs_run"]
        assert line["stopped_early"] == str(row["stopped_early"])
    return rows


# --------------------------------------------------------------------------- e2e, in-process


@pytest.fixture
def sweep_ray():
    """A fresh 2-CPU Ray with the dashboard on (Train-in-Tune leaks placement groups without
    it), for one test: the resume test starts its own in a subprocess, never beside this one."""
    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
def _worker_ray_address() -> str | None:
    return os.environ.get("RAY_ADDRESS")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(330)
def test_sweep_end_to_end(sweep_ray, sweep_data, tiny_bert, tmp_path, capsys):
    """4 trials x 2 epochs, one at a time, under ASHA: the two at a near-zero learning rate
    stop after epoch 1; best/ is the best trial's best checkpoint and evaluates; ensemble/
    (--ensemble-top 2) holds the two best trials and their ensemble's dev rsum; the trial
    tables and the plot are written; the console has one line per trial and none of Tune's
    banners; every CPU is free again afterwards."""
    # Ray processes know their own cluster (the state API finds it through RAY_ADDRESS)
    assert ray.get(_worker_ray_address.remote()) == ray.get_runtime_context().gcs_address

    storage = tmp_path / "runs"
    space = _write(tmp_path / "space.yaml", E2E_SPACE)
    switch = os.environ.get("RAY_AIR_NEW_OUTPUT")
    start = time.monotonic()
    main([*_tune_argv(space, sweep_data, tiny_bert, storage, "e2e"), "--ensemble-top", "2"])
    seconds = time.monotonic() - start
    assert os.environ.get("RAY_AIR_NEW_OUTPUT") == switch  # set for the sweep only
    out = capsys.readouterr().out
    best = _best_from_stdout(out)
    _wait_cpus_released()
    with capsys.disabled():
        print(f"\nsweep of 4 trials: {seconds:.0f}s")

    sweep = storage / "e2e"
    assert best == sweep / "best"
    rows = _check_tables(sweep, 4, "train.lr")
    assert [r["train.lr"] for r in sorted(rows, key=lambda r: r["trial"])] == [
        GOOD,
        BAD,
        BAD2,
        FAIR,
    ]  # the grid's order: the order in which the trials ran
    by_lr = {r["train.lr"]: r for r in rows}
    assert by_lr[GOOD]["epochs_run"] == EPOCHS and not by_lr[GOOD]["stopped_early"]
    for lr in (BAD, BAD2):  # below the median of the earlier trials at epoch 1
        assert by_lr[lr]["stopped_early"] and by_lr[lr]["epochs_run"] == 1, by_lr[lr]
        assert by_lr[lr]["best_rsum"] < by_lr[GOOD]["curve"][0]
    assert "stopped early" in out
    _check_trial_lines(out, by_lr, [GOOD, BAD, BAD2, FAIR])
    _check_tracked(tracking.resolve_uri(None, str(storage)), "e2e", by_lr)

    # best/ is a copy of the best trial's best checkpoint (ties: the first, as run_sweep)
    top = max(rows, key=lambda r: r["best_rsum"])
    assert top["best_rsum"] == max(r["best_rsum"] for r in rows)
    assert _same_tree(best, Path(top["checkpoint"]))
    record = read_record(best)
    assert record["meta"]["metrics"]["rsum"] == top["best_rsum"]
    assert load_checkpoint(best).config.train.lr == top["train.lr"]
    assert f"best trial {top['trial']}: dev rsum {top['best_rsum']:.2f}" in out

    # ensemble/ beside best/: the two best trials' checkpoints, best first, and their dev rsum
    ens = sweep / "ensemble"
    record = json.loads((ens / ENSEMBLE_JSON).read_text())
    ranked = sorted(rows, key=lambda r: -r["best_rsum"])[:2]
    assert [m["trial"] for m in record["members"]] == [r["trial"] for r in ranked]
    members = [ens / m["dir"] for m in record["members"]]
    for member, row, folder in zip(record["members"], ranked, members, strict=True):
        assert member["dev_rsum"] == row["best_rsum"]
        assert read_record(folder)["meta"]["metrics"]["rsum"] == row["best_rsum"]
        assert _same_tree(folder, Path(row["checkpoint"]))
    want = evaluate_ensemble(members, sweep_data, "f30k", "dev")
    assert record["dev_rsum"] == want["rsum"]
    assert record["best_single_dev_rsum"] == top["best_rsum"]
    assert (f"dev rsum {want['rsum']:.2f}, best single trial {top['trial']}: "
            f"{top['best_rsum']:.2f}") in out  # fmt: skip

    width, height = _png_size(sweep / "sweep.png")
    assert width >= 400 and height >= 200
    assert (sweep / "sweep.png").stat().st_size > 10_000

    main(["eval", "--checkpoint", str(best), "--data-path", str(sweep_data), "--dataset",
          "f30k", "--split", "test", "--json", str(tmp_path / "eval.json")])  # fmt: skip
    assert json.loads((tmp_path / "eval.json").read_text())["n_images"] == SYNTH["test_images"]

    # the same --name again without --resume is refused, the sweep untouched
    with pytest.raises(SystemExit) as exc:
        main(_tune_argv(space, sweep_data, tiny_bert, storage, "e2e"))
    assert exc.value.code == 2
    assert "--resume" in capsys.readouterr().err
    assert json.loads((sweep / "trials.json").read_text()) == rows


def _check_tracked(uri: str, name: str, by_lr: dict[float, dict]) -> None:
    """The sweep in the embedded MLflow store: a parent run with one child per trial, each
    child with its searched lr and its per-epoch curve, ASHA's stops tagged with the epoch."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id])
    parent = [r for r in runs if r.info.run_name == name]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED", runs
    assert parent[0].data.tags["best_checkpoint"].endswith("best")
    children = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == parent[0].info.run_id]
    assert len(children) == len(by_lr) == len(runs) - 1
    for child in children:
        row = by_lr[float(child.data.params["train.lr"])]
        curve = client.get_metric_history(child.info.run_id, "rsum")
        assert [m.value for m in sorted(curve, key=lambda m: m.step)] == pytest.approx(row["curve"])
        stopped = child.data.tags.get("stopped_early_after_epoch")
        assert stopped == (str(row["epochs_run"]) if row["stopped_early"] else None), child


TUNE_BANNERS = ("Configuration for experiment", "tensorboard", "View detailed results")


def _check_trial_lines(out: str, by_lr: dict[float, dict], order: list[float]) -> None:
    """One line per trial as it completes, counting the sweep's trials and this one, with the
    trial table's word for a trial ASHA stopped; none of Tune's own banners."""
    lines = [line for line in out.splitlines() if " done)" in line]
    n = len(order)
    assert lines == [
        f"trial {by_lr[lr]['trial']} "
        f"{'stopped early' if by_lr[lr]['stopped_early'] else 'finished'} ({i}/{n} done)"
        for i, lr in enumerate(order, 1)
    ], out
    for banner in TUNE_BANNERS:
        assert banner.lower() not in out.lower(), out


# --------------------------------------------------------------------------- resume, subprocess

RESUME_SPACE = {
    "num_samples": 1,
    "search": "grid",
    "max_concurrent_trials": 1,
    "scheduler": {"type": "none"},
    "params": {"train.lr": {"grid": [GOOD, FAIR]}},
}


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(ENV_DEFAULTS)
    # Tune saves the experiment state (what a resume reads) at most every 10 s by default;
    # every second here, so the kill lands right after the second trial's first checkpoint
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "1"
    return env


def _trial_states(sweep: Path) -> dict[str, str]:
    """trial id -> status, from Tune's latest saved experiment state (what a restore reads)."""
    states = {}
    for f in sorted(sweep.glob("experiment_state-*.json")):
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):  # being rewritten
            continue
        for entry in data.get("trial_data", []):
            state = entry[0] if isinstance(entry, list) else entry
            state = json.loads(state) if isinstance(state, str) else state
            states[state["trial_id"]] = state["status"]
    return states


def _wait_for_interruption_point(
    sweep: Path, proc: subprocess.Popen, log: Path, timeout: float
) -> tuple[str, str]:
    """Until Tune's saved experiment state shows a trial TERMINATED and another trial's Ray
    Train run has registered a checkpoint (its epoch 1): (finished trial, running trial)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"sweep exited early:\n{log.read_text()[-4000:]}"
        done = [t for t, s in _trial_states(sweep).items() if s == "TERMINATED"]
        running = [
            p.parent.name
            for p in (sweep / "trials").glob("*/checkpoint_manager_snapshot.json")
            if p.parent.name not in done
        ]
        if done and running:
            return done[0], running[0]
        assert time.monotonic() < deadline, f"not there yet:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)  # an epoch of the second trial takes 2 s on an idle machine


def _session_processes(leader: int, raylets: set[int] = frozenset()) -> list[psutil.Process]:
    """The processes of the Ray that the driver ``leader`` (a session leader) started: its
    process group and descendants (the GCS, raylet and dashboard it started, the raylet's
    workers) and every worker of its raylet(s), found by the RAY_RAYLET_PID a worker
    inherits (also once the driver is gone and they have been re-parented). Nothing of
    another cluster matches."""
    found = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(leader)
        for p in [root, *root.children(recursive=True)]:
            found[p.pid] = p
    raylets = set(raylets)
    for p in list(found.values()):
        with contextlib.suppress(psutil.Error):
            if p.name() == "raylet":
                raylets.add(p.pid)
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == leader or (
                raylets and int(p.environ().get("RAY_RAYLET_PID", 0)) in raylets
            ):
                found[p.pid] = p
        except (psutil.Error, OSError, ValueError):
            continue
    return list(found.values())


def _kill_session(proc: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL the driver's process group and, at the same moment, every process it started
    (Ray's workers run in process groups of their own and would otherwise go on for a while,
    e.g. finish an epoch): an interrupted sweep, no clean shutdown. Strictly its own list."""
    procs = _session_processes(proc.pid)
    for p in procs:  # remembered for the checks, once they are gone
        with contextlib.suppress(psutil.Error):
            p.label = p.name()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    proc.wait(timeout=30)
    psutil.wait_procs(alive(procs), timeout=30)
    return procs


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _tune_dir(sweep: Path, trial_id: str) -> Path:
    (folder,) = [p for p in sweep.glob(f"*_{trial_id}_*") if p.is_dir()]
    return folder


def _trial_snapshot(sweep: Path, trial_id: str) -> dict[str, dict]:
    """Everything a trial wrote: its Ray Train run (checkpoints) and its Tune folder
    (per-epoch results)."""
    train, tune = sweep / "trials" / trial_id, _tune_dir(sweep, trial_id)
    return {"train": _files(train), "tune": _files(tune)}


def _registered(run: Path) -> dict[str, int]:
    """The checkpoints Ray Train has registered for a run, what it resumes from: folder ->
    epoch (a folder still being written when the driver was killed is not one of them)."""
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    names = [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]
    return {name: read_record(run / name)["meta"]["epoch"] for name in names}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(360)
def test_interrupted_sweep_resumes(no_ray, sweep_data, tiny_bert, tmp_path, capsys):
    """``hrem-ray tune`` (2 trials, one at a time) killed, process group and SIGKILL, once its
    first trial has finished and the second has checkpointed its first epoch. The same
    command with --resume finishes the sweep: the finished trial is not run again, the
    interrupted one goes on from its checkpoint (only its second epoch is trained), and the
    trial table counts both of its epochs."""
    assert not ray.is_initialized()
    storage = tmp_path / "runs"
    sweep = storage / "res"
    space = _write(tmp_path / "space.yaml", RESUME_SPACE)
    cmd = [sys.executable, "-m", "hrem_ray.cli",
           *_tune_argv(space, sweep_data, tiny_bert, storage, "res")]  # fmt: skip
    env = _subprocess_env()
    log = tmp_path / "first.log"
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp_path, start_new_session=True)  # fmt: skip
    try:
        first, second = _wait_for_interruption_point(sweep, proc, log, timeout=240)
    finally:
        procs = _kill_session(proc)
    killed_at = time.time()
    snapshot = _trial_snapshot(sweep, first)
    interrupted = time.monotonic() - start
    names = {getattr(p, "label", "") for p in procs}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names)
    assert not alive(procs), [p.pid for p in alive(procs)]
    raylets = {p.pid for p in procs if getattr(p, "label", "") == "raylet"}
    assert not alive(_session_processes(proc.pid, raylets))  # nothing started since
    assert not (sweep / "trials.json").exists()  # it did not get to the end
    assert sorted(_registered(sweep / "trials" / first).values()) == [0, 1]
    # usually epoch 1 only; both when the second epoch was quicker than the kill
    before = _registered(sweep / "trials" / second)
    assert sorted(before.values()) in ([0], [0, 1])

    out_log, err_log = tmp_path / "resume.out", tmp_path / "resume.err"
    with out_log.open("w") as out, err_log.open("w") as err:
        proc = subprocess.Popen([*cmd, "--resume"], stdout=out, stderr=err, env=env,
                                cwd=tmp_path, start_new_session=True)  # fmt: skip
    try:
        returncode = proc.wait(timeout=240)
    finally:
        procs = _kill_session(proc)  # its Ray, if anything outlived the driver
    output = out_log.read_text()
    assert returncode == 0, output[-3000:] + err_log.read_text()[-3000:]
    assert not alive(procs)
    assert "resuming sweep" in output
    best = _best_from_stdout(output)
    with capsys.disabled():
        print(f"\nkilled after {interrupted:.0f}s with {len(before)} epoch(s) of the 2nd trial "
              f"checkpointed; resumed, all done after {time.monotonic() - start:.0f}s")  # fmt: skip

    rows = {r["trial"]: r for r in _check_tables(sweep, 2, "train.lr")}
    assert set(rows) == {first, second}
    assert all(r["epochs_run"] == EPOCHS for r in rows.values())  # no ASHA: both ran 2
    # the finished trial was not run again: none of its files changed, none appeared
    assert _trial_snapshot(sweep, first) == snapshot
    # the interrupted one went on from its checkpoint: the folders from before the kill are
    # still there, and only the epochs they lack were trained (reported) after the kill
    run = sweep / "trials" / second
    after = _registered(run)
    assert before.items() <= after.items() and sorted(after.values()) == [0, 1]
    results = [json.loads(line) for line in (_tune_dir(sweep, second) / "result.json").open()]
    trained = [r["epoch"] for r in results if r["timestamp"] > killed_at]
    assert trained == [e for e in range(EPOCHS) if e not in before.values()]
    # ...and its row counts every epoch, from before the kill too
    by_epoch = {e: read_record(run / name)["meta"]["metrics"]["rsum"] for name, e in after.items()}
    assert rows[second]["curve"] == [by_epoch[e] for e in range(EPOCHS)]
    assert best == sweep / "best"
    load_checkpoint(best)
