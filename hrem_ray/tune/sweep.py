"""Ray Tune sweeps: every trial is a Ray Train run of ``hrem_ray.train.ray_train``.

Train V2 does not nest a TorchTrainer inside a Tuner directly; the V2 pattern used here is
a trial function that builds and fits a TorchTrainer whose ``TuneReportCallback`` forwards
rank 0's per-epoch metrics (and checkpoint path) to Tune, where ASHA reads the dev rsum.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from hrem_ray import storage, tracking
from hrem_ray.checkpoint import (
    CheckpointError,
    copy_checkpoint,
    load_train_state,
    read_record,
)
from hrem_ray.config import HREMConfig
from hrem_ray.eval.evaluate import evaluate_ensemble
from hrem_ray.options import RayRunOptions, SweepOptions
from hrem_ray.train.ray_train import METRIC, build_trainer
from hrem_ray.train.setup import check_data, check_new_run, resolve_config, run_path
from hrem_ray.tune.space import SearchSpace, check_relation_knobs_active

CHECKPOINT_PATH = "checkpoint_path"  # key TuneReportCallback adds to the reported metrics
ENSEMBLE = "ensemble"  # <sweep>/ensemble/: the top-K trials' checkpoints and ENSEMBLE_JSON
ENSEMBLE_JSON = "ensemble.json"
ENSEMBLE_FORMAT = "hrem-ray-ensemble"


def concurrency(options: SweepOptions, space: SearchSpace) -> int:
    """Trials that fit side by side, keeping one CPU free for Ray Data and the drivers.

    Each trial holds ``num_workers`` x (``cpus_per_worker`` CPUs, one GPU with --use-gpu);
    over-subscribing a small machine makes Train-in-Tune hang silently.
    """
    if options.max_concurrent_trials or space.max_concurrent_trials:
        return int(options.max_concurrent_trials or space.max_concurrent_trials)
    resources, run = ray.cluster_resources(), options.run
    by_cpu = (resources.get("CPU", 1) - 1) / (run.num_workers * run.cpus_per_worker)
    fit = by_cpu
    if run.use_gpu:
        fit = min(fit, resources.get("GPU", 0) / run.num_workers)
    return max(1, math.floor(fit))


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> HREMConfig:
    """The base config with one trial's sampled values (``section.key`` -> value)."""
    cfg = HREMConfig.from_dict(base)
    for key, value in sampled.items():
        cfg.set(key, value)
    return cfg.validate()


def _run_trial(sampled: dict[str, Any], base: dict[str, Any], options: dict[str, Any]) -> None:
    """One trial: a Ray Train run named after the trial (so a resumed sweep resumes it)."""
    cfg = trial_config(base, sampled)
    ctx = tune.get_context()
    run = RayRunOptions(**options, name=ctx.get_trial_id(), resume=True)
    build_trainer(cfg, run, callbacks=[TuneReportCallback()]).fit()


class EpochLines(tune.Callback):
    """One console line per trial epoch and one per finished trial, printed by the sweep's
    driver; ``total`` is the sweep's number of trials, ``epochs`` each trial's full run."""

    def __init__(self, log: Callable[[str], None], total: int, epochs: int) -> None:
        self.log, self.total, self.epochs = log, total, epochs

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if METRIC in result and "epoch" in result:
            self.log(
                f"trial {trial.trial_id} epoch {int(result['epoch']) + 1}: loss "
                f"{result.get('train_loss', float('nan')):.4f}, "
                f"{result.get('samples_per_s', 0.0):.1f} samples/s, dev rsum {result[METRIC]:.2f}"
            )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        # Tune calls this before it marks ``trial`` finished, and ``trials`` holds only the
        # trials created so far. Fewer epochs than the run's: ASHA stopped it (as the table).
        done = 1 + sum(t.is_finished() for t in trials if t is not trial)
        ran = int((trial.last_result or {}).get("epoch", -1)) + 1
        status = "stopped early" if ran < self.epochs else "finished"
        self.log(f"trial {trial.trial_id} {status} ({done}/{self.total} done)")


@contextmanager
def _quiet_tune_console() -> Iterator[None]:
    """Tune's default console engine prints an experiment-configuration box and a TensorBoard
    hint pointing into Ray's session folder (not the sweep's) at any verbosity; its legacy
    engine prints neither (at ``verbose=1`` its status tables), and the trial folders keep
    their TensorBoard events. Tune reads the switch when ``fit()`` starts."""
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["RAY_AIR_NEW_OUTPUT"]
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def searcher(space: SearchSpace, metric: str, seed: int | None = None, max_concurrent: int = 0):
    """The space's search algorithm; with ``seed`` (a sweep's ``train.seed``, ``--seed``) its
    draws are reproducible: the same trials, in the same order, for the same seed."""
    if space.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=metric, mode="max", seed=seed)
    if space.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(metric=metric, mode="max", random_state_seed=seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Random sampling and grid_search. Tune ignores TuneConfig's max_concurrent_trials for a
    # search generator passed in: it takes its own limit (0: none).
    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


class TrialRuns(tune.Callback):
    """A sweep in MLflow: one child run per trial under the sweep's parent run, with its
    searched params and per-epoch curve (``MLflowLoggerCallback``), and, where ASHA stopped
    it, the epoch it stopped after."""

    def __init__(self, uri: str, parent_id: str, epochs: int) -> None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        tracking.quiet()
        self.epochs = epochs
        self.mlflow = MLflowLoggerCallback(
            tracking_uri=uri, experiment_name=tracking.EXPERIMENT,
            tags={tracking.PARENT_TAG: parent_id}, save_artifact=False,
        )  # fmt: skip

    def setup(self, **info) -> None:
        with tracking.own_uri_env():
            self.mlflow.setup(**info)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.mlflow.on_trial_start(iteration, trials, trial, **info)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.mlflow.on_trial_result(iteration, trials, trial, result, **info)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        ran = int((trial.last_result or {}).get("epoch", -1)) + 1
        run_id = self.mlflow._trial_runs.get(trial)
        if run_id is not None and ran < self.epochs:
            self.mlflow.mlflow_util._get_client().set_tag(run_id, "stopped_early_after_epoch", ran)
        self.mlflow.on_trial_complete(iteration, trials, trial, **info)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.mlflow.on_trial_error(iteration, trials, trial, **info)


def _scheduler(space: SearchSpace, epochs: int):
    if space.scheduler["type"] == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=epochs,
        grace_period=min(space.scheduler["grace_period"], epochs),
        reduction_factor=space.scheduler["reduction_factor"],
    )


def sweep_dir(options: SweepOptions) -> str:
    return run_path(options.run.storage_path, options.run.name)


def run_sweep(
    cfg: HREMConfig,
    space: SearchSpace,
    options: SweepOptions,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or, with ``options.run.resume``, continue) a sweep; returns the summary."""
    path = sweep_dir(options)
    space.check(cfg)  # before any trial: every value valid on top of this config
    if options.ensemble_top is not None:
        check_ensemble_top(options.ensemble_top, max_trials(space))
    check_new_run(path, options.run.resume, "sweep")
    cfg = resolve_config(cfg)
    train = check_data(cfg, options.run.num_workers)
    if not options.allow_inactive:
        check_relation_knobs_active(space, cfg, train.n_captions)
    trial_options = {
        "storage_path": storage.join(path, "trials"),
        "num_workers": options.run.num_workers,
        "use_gpu": options.run.use_gpu,
        "cpus_per_worker": options.run.cpus_per_worker,
    }
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base=cfg.to_dict(), options=trial_options),
        {"cpu": 0.01},  # the trial driver only waits; its Train workers hold the resources
    )
    parent, trial_runs = _track_sweep(path, cfg, space, options, train)
    storage_path, storage_filesystem = storage.ray_storage(options.run.storage_path)
    if options.run.resume and tune.Tuner.can_restore(path):
        log(f"resuming sweep {path}")
        inside = path if storage_filesystem is None else f"{storage_path}/{options.run.name}"
        tuner = tune.Tuner.restore(
            inside, trainable, resume_unfinished=True, resume_errored=True,
            storage_filesystem=storage_filesystem,
        )  # fmt: skip
    else:
        n = concurrency(options, space)
        log(f"sweep {path}: {space.num_samples} sample(s), up to {n} trial(s) at a time")
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                num_samples=space.num_samples,
                scheduler=_scheduler(space, cfg.train.epochs),
                search_alg=searcher(space, METRIC, cfg.train.seed, n),
                max_concurrent_trials=n,
            ),
            run_config=tune.RunConfig(
                name=options.run.name,
                storage_path=storage_path,
                storage_filesystem=storage_filesystem,
                verbose=1 if options.verbose else 0,
                callbacks=[EpochLines(log, max_trials(space), cfg.train.epochs), *trial_runs],
            ),
        )
    try:
        with _quiet_tune_console():
            results = tuner.fit()
        summary = summarise(results, list(space.params), cfg.train.epochs, path, log=log)
    except BaseException:
        if parent is not None:
            parent.end("FAILED")
        raise
    if parent is not None:
        parent.set_tags({"best_checkpoint": summary["best"]})
        parent.log_artifacts([storage.join(path, f) for f in ("trials.json", "trials.csv",
                                                               "sweep.png")])  # fmt: skip
        parent.end()
        log(f"tracked in {parent.uri}; the UI: {tracking.ui_command(parent.uri)}")
    if options.ensemble_top:
        summary["ensemble"] = export_ensemble(summary["trials"], options.ensemble_top, path, cfg,
                                              log=log)  # fmt: skip
    return summary


def _track_sweep(path: str, cfg: HREMConfig, space: SearchSpace, options: SweepOptions,
                 train) -> tuple[tracking.Tracker | None, list]:  # fmt: skip
    """The sweep's parent MLflow run (reattached on --resume) and the callback that logs
    its trials as children; (None, []) with tracking off."""
    uri = tracking.run_uri(options.run)
    if uri is None:
        return None, []
    run = options.run
    run_id = tracking.saved_run_id(path, uri) if run.resume else None
    tags = tracking.run_tags(
        dataset=cfg.data.dataset,
        data_id=tracking.data_identity(train.blocks, train.caps_path),
        workers=run.num_workers,
        devices="gpu" if run.use_gpu else "cpu",
    )
    parent = tracking.Tracker.start(uri, run_name=run.name, run_id=run_id, tags=tags)
    if run_id is None:
        parent.set_tags({"sweep_dir": path, "search": space.search})
        params = tracking.flatten(cfg.to_dict()) | tracking.flatten(
            {"space": space.params, "num_samples": space.num_samples, "seed": cfg.train.seed,
             "scheduler": space.scheduler}, "sweep.")  # fmt: skip
        parent.log_params(params)
        tracking.save_run_ref(path, parent)
    return parent, [TrialRuns(uri, parent.run_id, cfg.train.epochs)]


def max_trials(space: SearchSpace) -> int:
    """The most trials a sweep of ``space`` runs: num_samples times every grid's size."""
    n = space.num_samples
    for spec in space.params.values():
        if "grid" in spec:
            n *= len(spec["grid"])
    return n


def check_ensemble_top(k: int, trials: int | None = None) -> int:
    """``--ensemble-top K``: at least 2 (one model is ``best/``), at most ``trials``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"--ensemble-top must be an integer >= 2, got {k!r}")
    if trials is not None and k > trials:
        raise ValueError(f"--ensemble-top {k}: the sweep runs at most {trials} trial(s)")
    return k


def export_ensemble(
    rows: list[dict[str, Any]],
    k: int,
    path: str,
    cfg: HREMConfig,
    *,
    batch_size: int = 128,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The ensemble of the ``k`` trials with the best dev rsum (``rows`` of the trial table),
    evaluated on the dev split with ``evaluate_ensemble`` and written, beside ``best/``, to
    ``path/ensemble/``: a copy of each member's checkpoint (``member1/``, ... best first, the
    order to give ``hrem-ray index`` and ``serve``) and ``ensemble.json`` (the members, their
    own dev rsum, the ensemble's), as one folder that appears complete or not at all."""
    check_ensemble_top(k)
    done = [r for r in rows if r["best_rsum"] is not None and r["checkpoint"]]
    if k > len(done):
        raise ValueError(
            f"--ensemble-top {k}: only {len(done)} trial(s) of {path} finished with a "
            "checkpoint (its trial tables and best/ are written)"
        )
    top = sorted(done, key=lambda r: -r["best_rsum"])[:k]  # ties: the first, as best/
    for r in top:
        read_record(r["checkpoint"])
    data = cfg.data
    log(f"evaluating the ensemble of the top {k} trials on {data.dataset} {data.val_split}")
    result = evaluate_ensemble(
        [r["checkpoint"] for r in top], data.data_path, data.dataset, data.val_split,
        batch_size=batch_size, device=device,
    )  # fmt: skip
    members = [
        {"dir": f"member{i + 1}", "trial": r["trial"], "dev_rsum": r["best_rsum"],
         "source": str(r["checkpoint"])}
        for i, r in enumerate(top)
    ]  # fmt: skip
    record = {
        "format": ENSEMBLE_FORMAT,
        "dataset": data.dataset,
        "split": data.val_split,
        "members": members,
        "dev_rsum": float(result["rsum"]),
        "best_single_dev_rsum": float(top[0]["best_rsum"]),
        "dev_metrics": result,
    }

    def fill(tmp: Path) -> None:
        for member in members:
            local = storage.fetch_dir(member["source"], "checkpoint")
            shutil.copytree(local, tmp / member["dir"])
        (tmp / ENSEMBLE_JSON).write_text(json.dumps(record, indent=2, default=float))

    out = storage.write_dir(storage.join(path, ENSEMBLE), fill)
    log(
        f"ensemble of the top {k} trials ({', '.join(r['trial'] for r in top)}): dev rsum "
        f"{record['dev_rsum']:.2f}, best single trial {top[0]['trial']}: "
        f"{record['best_single_dev_rsum']:.2f}; written to {out}"
    )
    return {"path": str(out), **record}


def summarise(
    results, params: list[str], epochs: int, path: str, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Trial table (JSON + CSV), plot, and the best trial's best checkpoint in ``path/best``."""
    runs = storage.join(path, "trials")  # each trial's Ray Train run: runs/<trial id>
    rows = sorted((_trial_row(r, params, epochs, runs) for r in results), key=lambda r: r["trial"])
    done = [r for r in rows if r["best_rsum"] is not None and r["checkpoint"]]
    if not done:
        raise RuntimeError(f"sweep {path}: no trial reported a checkpoint")
    best = max(done, key=lambda r: r["best_rsum"])
    best_path = copy_checkpoint(best["checkpoint"], storage.join(path, "best"))
    storage.write_text(storage.join(path, "trials.json"), json.dumps(rows, indent=2))
    storage.write_text(storage.join(path, "trials.csv"), _csv(rows))
    with tempfile.TemporaryDirectory(prefix="hrem-sweep-") as tmp:
        _plot(rows, params, os.path.join(tmp, "sweep.png"))
        storage.put_files(tmp, path)
    log(format_summary(rows, params))
    log(f"best trial {best['trial']}: dev rsum {best['best_rsum']:.2f}")
    return {"best": str(best_path), "best_trial": best, "trials": rows}


def _trial_row(result, params: list[str], epochs: int, runs: str | None = None) -> dict[str, Any]:
    """One line of the trial table from a Tune result and its per-epoch history.

    Tune's history of a trial that a resumed sweep restarted holds only the epochs run after
    the restart (the trial restarts from Tune's point of view, while its Ray Train run goes on
    from its last checkpoint); the history saved with that run's latest checkpoint has them
    all. Checkpoints are taken from the run's folder: only those Ray kept (the best by dev
    rsum, and the latest) still exist. Tune names a checkpoint by its path inside the
    storage's filesystem (``bucket/...`` for S3), so it is re-rooted at ``runs`` as a URI.
    """
    trial = (result.metrics or {}).get("trial_id") or _trial_id(result.path, runs)
    per_epoch: dict[int, tuple[float, str | None]] = {}  # epoch -> (rsum, checkpoint)
    frame = result.metrics_dataframe
    if frame is not None and METRIC in frame and "epoch" in frame:
        for _, row in frame.dropna(subset=[METRIC]).iterrows():
            raw = row.get(CHECKPOINT_PATH)
            raw = raw if isinstance(raw, str) and raw else None  # NaN in epochs without one
            where = storage.join(runs, trial, Path(raw).name) if runs and raw else raw
            per_epoch[int(row["epoch"])] = (float(row[METRIC]), where)
    if runs is not None:
        kept = _kept_checkpoints(storage.join(runs, trial))
        # Restarted by a resume, Tune has only the epochs since the restart (or none, when
        # the run had trained its last epoch before the interruption): the earlier ones come
        # from the run's own history. Epochs after Tune's last are not added: a trial ASHA
        # stopped may have finished one more epoch before the stop reached its Train run.
        first = min(per_epoch, default=max(kept, default=-1) + 1)
        if kept and first > 0:
            for h in _run_history(kept[max(kept)]):
                if METRIC in h and int(h["epoch"]) < first:
                    per_epoch.setdefault(int(h["epoch"]), (float(h[METRIC]), None))
        if kept:
            per_epoch = {e: (v, kept.get(e)) for e, (v, _) in per_epoch.items()}
    curve = [per_epoch[e][0] for e in sorted(per_epoch)]
    best = max(sorted(per_epoch), key=lambda e: per_epoch[e][0], default=None)
    if best is not None and not per_epoch[best][1]:  # a tie Ray broke the other way
        best = max((e for e in sorted(per_epoch) if per_epoch[e][1]),
                   key=lambda e: per_epoch[e][0], default=best)  # fmt: skip
    ran = len(curve)
    return {
        "trial": trial,
        **{k: result.config.get(k) for k in params},
        "best_rsum": None if best is None else per_epoch[best][0],
        "best_epoch": None if best is None else best + 1,
        "epochs_run": ran,
        "stopped_early": result.error is None and ran < epochs,
        "error": None if result.error is None else str(result.error).splitlines()[0],
        "checkpoint": None if best is None else per_epoch[best][1],
        "curve": curve,
    }


def _trial_id(path: str, runs: str | None) -> str:
    """A trial's id from its Tune folder's name (``_run_trial_<id>_<index>_<params>_<date>``),
    for a trial that reported nothing since a resume restarted it."""
    name = Path(path).name
    if runs is not None and storage.is_dir(runs):
        ids = [t for t in storage.list_dir(runs) if f"_{t}_" in name]
        if len(ids) == 1:
            return ids[0]
    return name


def _kept_checkpoints(run: str) -> dict[int, str]:
    """The checkpoints a trial's Ray Train run kept: epoch -> folder."""
    kept: dict[int, str] = {}
    for name in storage.list_dir(run):
        if not name.startswith("checkpoint_"):
            continue
        folder = storage.join(run, name)
        try:
            kept[int(read_record(folder)["meta"]["epoch"])] = folder
        except (CheckpointError, KeyError, TypeError, ValueError):
            continue  # not one of ours
    return kept


def _run_history(checkpoint: str) -> list[dict[str, Any]]:
    """The per-epoch history saved with a run's latest checkpoint (next to the optimizer
    state), every epoch of the run whatever restarts it went through."""
    state = load_train_state(storage.fetch_dir(checkpoint, "checkpoint")) or {}
    return list(state.get("state", {}).get("history", []))


def _csv(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k != "curve"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def format_summary(rows: list[dict[str, Any]], params: list[str]) -> str:
    short = [p.split(".")[-1] for p in params]
    head = f"{'trial':<12}" + "".join(f"{s:>16}" for s in short)
    head += f"{'rsum':>9}{'epochs':>8}  status"
    lines = [head]
    for r in sorted(rows, key=lambda r: -(r["best_rsum"] or -1)):
        vals = "".join(f"{_fmt(r[p]):>16}" for p in params)
        status = "error" if r["error"] else ("stopped early" if r["stopped_early"] else "done")
        rsum = f"{r['best_rsum']:.2f}" if r["best_rsum"] is not None else "-"
        lines.append(f"{r['trial']:<12}{vals}{rsum:>9}{r['epochs_run']:>8}  {status}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plot(rows: list[dict[str, Any]], params: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(params) + 1, figsize=(4 * (len(params) + 1), 3.5))
    scored = [r for r in rows if r["best_rsum"] is not None]
    for ax, p in zip(axes, params, strict=False):
        ax.scatter([r[p] for r in scored], [r["best_rsum"] for r in scored])
        ax.set(xlabel=p, ylabel="best dev rsum")
    for r in scored:
        axes[-1].plot(range(1, len(r["curve"]) + 1), r["curve"], "o-", label=r["trial"][-5:])
    axes[-1].set(xlabel="epoch", ylabel="dev rsum", title="learning curves")
    if len(scored) <= 12:
        axes[-1].legend(fontsize=7, title="trial", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)
