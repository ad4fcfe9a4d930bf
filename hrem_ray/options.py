"""Run options: how a run or a sweep maps onto the cluster and storage, each defined once.

The model and its recipe are ``config.py``; these are the other knobs of a command. Each is a
dataclass field with its default and its help (``option``), and the command line is built
from the fields (``add_flags``, ``from_args``), in the manner of torchtitan's config
manager: adding an option is one field. Light on purpose (no torch, pyarrow or Ray): the CLI
imports it at start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

DATASETS = ("f30k", "coco")  # the layouts of splits that synthetic data writes
FEATURE_DTYPES = ("float32", "float16")  # stored region features (shards, galleries)

# Config keys with a flag of their own on the training commands, with its type and help (the
# rest go through --set); the flag is the key's name: ``train.batch_size`` -> ``--batch-size``.
CLI_FLAGS: dict[str, tuple[type, str]] = {
    "data.data_path": (str, "data root holding <dataset>_precomp/ (a folder or a URI)"),
    "data.dataset": (str, "f30k, coco, or the name of another <dataset>_precomp/"),
    "model.bert_path": (str, "backbone folder (default: offline MiniLM)"),
    "train.epochs": (int, "epochs to train"),
    "train.batch_size": (int, "global batch, split across workers"),
    "train.seed": (int, "seed of the model, the data order, the augmentation and a sweep's draws"),
}

T = TypeVar("T")
_TYPES = {"str": str, "int": int, "float": float, "int | None": int, "float | None": float,
          "str | None": str}  # fmt: skip


def option(default: Any, help: str, **flag: Any) -> Any:
    """A field that is also a command-line flag ``--field-name`` (``flag``: argparse's)."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class RayRunOptions:
    """How a Ray Train run maps onto the cluster and storage (docs/training.md)."""

    storage_path: str = option("runs", "a local folder, NFS, or a URI (s3://, gs://)")
    name: str = option("hrem", "the run's (a sweep's) folder under --storage-path")
    num_workers: int = option(2, "Ray Train workers (a sweep: per trial)")
    use_gpu: bool = option(False, "one GPU per worker, NCCL")
    cpus_per_worker: float = option(1.0, "CPUs each worker reserves")
    max_failures: int = option(2, "worker-group restarts")
    keep_checkpoints: int = option(2, "checkpoints kept in the run, the best by dev rsum")
    resume: bool = option(False, "continue the run (the sweep) named --name")
    tracking_uri: str | None = option(
        None, "MLflow tracking server (default: $MLFLOW_TRACKING_URI, else the store "
        "<storage-path>/mlflow.db, or $HREM_RAY_HOME (~/.hrem-ray)/mlflow.db for s3:// runs; "
        "docs/tracking.md)",
    )  # fmt: skip
    no_tracking: bool = option(False, "do not track the run (the sweep) in MLflow")


def _sweep_run() -> RayRunOptions:
    return RayRunOptions(name="sweep", num_workers=1)


@dataclass
class SweepOptions:
    """A Ray Tune sweep (docs/sweeps.md): where it lives and how each trial's Ray Train run
    maps onto the cluster (``run``; a trial's name is its id), and Tune's own knobs."""

    run: RayRunOptions = field(default_factory=_sweep_run)
    max_concurrent_trials: int | None = option(
        None, "trials at once (default: what the cluster holds)"
    )
    allow_inactive: bool = option(
        False, "run even if searched relation knobs act only after ASHA's first cut"
    )
    ensemble_top: int | None = option(
        None, "also evaluate the ensemble of the K best trials on dev and export it to "
        "<storage-path>/<name>/ensemble (K >= 2)", metavar="K",
    )  # fmt: skip
    verbose: bool = False  # Tune's own status tables (the command's --verbose)


@dataclass
class EncodeOptions:
    """How ``eval``, ``index`` and ``embed`` run the towers (``serve`` takes ``bf16``; a
    replica's device is its GPU, if given one). bf16 is autocast, as ``train.bf16``."""

    batch_size: int = option(128, "rows encoded at a time")
    device: str = option("cpu", "torch device of the model: cpu, cuda or cuda:N")
    bf16: bool = option(
        False, "encode under bf16 autocast (recall drift vs float32: docs/serving.md)"
    )


@dataclass
class FailoverOptions:
    """How ``serve`` rides out a replica that dies (docs/serving.md, "A replica that dies")."""

    min_replicas: int = option(
        1, "replicas kept however idle; 2 or more: a live replica takes over from a dead one"
    )
    haproxy: bool = option(
        False, "HAProxy in place of Serve's proxy: a request whose replica died before answering "
        "is sent to another one (only on the Ray that serve starts; on a running cluster: ray "
        "start's env)",
    )  # fmt: skip


# Run options a sweep's command does not offer: each trial's run keeps their defaults.
SWEEP_RUN_SKIPS = ("max_failures", "keep_checkpoints")


def cli_flag(key: str) -> str:
    """The flag of config key ``key`` in ``CLI_FLAGS``."""
    return "--" + key.partition(".")[2].replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--set`` and the flags of ``CLI_FLAGS`` (unset: the config decides)."""
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, repeatable")
    for key, (kind, help) in CLI_FLAGS.items():
        parser.add_argument(cli_flag(key), type=kind, help=help)


def add_flags(parser: argparse.ArgumentParser, defaults: object, *, skip: tuple = ()) -> None:
    """A flag for every option of the dataclass instance ``defaults`` (its values are the
    defaults), but those in ``skip``; a bool is a switch."""
    for f in dataclasses.fields(defaults):
        if f.name in skip or "help" not in f.metadata:
            continue
        flag, value = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", **f.metadata)
        else:
            parser.add_argument(flag, type=_TYPES[f.type], default=value, **f.metadata)


def from_args(args: argparse.Namespace, cls: type[T], **values: Any) -> T:
    """An instance of ``cls`` from the parsed flags that ``add_flags`` made, and ``values``."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return cls(**(given | values))
