"""The model registry (MLflow's): a registered version points at a checkpoint, or an
ensemble's checkpoints, by URI, and ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``
stands for them wherever a checkpoint is given (docs/tracking.md#registry).

The weights are never copied: a version's source is the checkpoint's own URI, and its tags
record what it is (code version, weights id, config). Resolution happens each time a
reference is used, so a moved alias is what the next deploy or swap serves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hrem_ray import storage, tracking

PREFIX = "models:/"
CHECKPOINTS_TAG = "hrem.checkpoints"  # JSON list of the version's checkpoint URIs, in order
MODEL_ID_TAG = "hrem.model_id"  # the served model id (embed.model_id; an ensemble's digest)
CONFIG_TAG = "hrem.config"  # the first checkpoint's resolved config, JSON
ENSEMBLE_JSON = "ensemble.json"  # tune --ensemble-top's folder: members member1/, member2/, ...
_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
DEFAULT_STORAGE = "runs"  # where the embedded store is with no tracking URI, as for train


class RegistryError(ValueError):
    """A registered model, alias or version that does not exist, or a malformed reference."""


@dataclass(frozen=True)
class Registered:
    """One resolved registry reference: the model's name, its version, and the checkpoints."""

    name: str
    version: str
    checkpoints: tuple[str, ...]


def is_model_ref(ref: object) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


def _client(uri: str):
    tracking.quiet()
    from mlflow.tracking import MlflowClient

    tracking.check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_name(name: str, alias: str | None = None) -> None:
    """A model name and alias that fit in a ``models:/NAME@ALIAS`` reference (checked before
    a sweep starts, so that its end does not fail)."""
    for what, value in (("model name", name), ("alias", alias)):
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
            raise RegistryError(f"bad {what} {value!r}: letters, digits, '_', '.', '-' only")
    if alias is not None and alias.isdigit():
        raise RegistryError(f"bad alias {alias!r}: an alias cannot be a version number")


def ensemble_members(path: str) -> list[str] | None:
    """The member checkpoints of an ensemble folder (``tune --ensemble-top``), best first, or
    None when ``path`` is a plain checkpoint."""
    local = storage.fetch_dir(path, "checkpoint")
    if not (local / ENSEMBLE_JSON).is_file():
        return None
    record = json.loads((local / ENSEMBLE_JSON).read_text())
    return [storage.join(storage.absolute(path), m["dir"]) for m in record["members"]]


def register(
    checkpoints: str | Sequence[str],
    name: str,
    *,
    alias: str | None = None,
    tracking_uri: str | None = None,
) -> Registered:
    """Register one checkpoint, an ensemble folder, or several checkpoints (an ensemble, in
    its gallery's order) as a new version of ``name``; point ``alias`` at it."""
    from hrem_ray.checkpoint import load_checkpoint
    from hrem_ray.embed import model_id, served_model_id

    refs = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    if not refs:
        raise RegistryError("register: no checkpoint given")
    check_name(name, alias)
    source = storage.absolute(str(refs[0]))
    uri = tracking.resolve_uri(tracking_uri, DEFAULT_STORAGE)
    if tracking.is_server(uri) and not storage.is_remote(source):
        raise RegistryError(
            f"register {source}: the tracking server {uri} takes a checkpoint by URI only; put "
            "it in object storage (s3://...) or register it in a local store"
        )
    if len(refs) == 1 and (members := ensemble_members(source)):
        refs = members
    refs = [storage.absolute(str(r)) for r in refs]
    loaded = [load_checkpoint(r) for r in refs]  # checks each is complete before any write
    ids = [model_id(ck.model) for ck in loaded]
    record = json.loads((loaded[0].path / "config.json").read_text())
    tags = {
        CHECKPOINTS_TAG: json.dumps(refs),
        MODEL_ID_TAG: served_model_id(ids),
        CONFIG_TAG: json.dumps(record.get("config", {}), sort_keys=True),
        **{f"hrem.code.{k}": str(v) for k, v in record.get("code", {}).items()},
    }
    client = _client(uri)
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(name, source, tags=tags)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return Registered(name, str(version.version), tuple(refs))


def resolve(ref: str, *, tracking_uri: str | None = None) -> Registered:
    """The version ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names, now."""
    match = _REF.match(ref)
    if not match:
        raise RegistryError(f"{ref}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    from mlflow.exceptions import MlflowException

    name, alias, version = match["name"], match["alias"], match["version"]
    client = _client(tracking.resolve_uri(tracking_uri, DEFAULT_STORAGE))
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"{ref}: no registered model named {name!r}") from None
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise RegistryError(f"{ref}: registered model {name!r} has no {what}") from None
    listed = mv.tags.get(CHECKPOINTS_TAG)
    checkpoints = tuple(json.loads(listed)) if listed else (mv.source,)
    return Registered(name, str(mv.version), checkpoints)


def resolve_checkpoints(
    refs: str | Sequence[str], *, tracking_uri: str | None = None
) -> tuple[tuple[str, ...], tuple[Registered, ...]]:
    """Checkpoint references with every ``models:/`` one replaced by its checkpoints (an
    ensemble's expand in order), and the registry versions that were resolved."""
    refs = [refs] if isinstance(refs, (str, Path)) else list(refs)
    out: list[str] = []
    found: list[Registered] = []
    for ref in refs:
        if is_model_ref(ref):
            reg = resolve(ref, tracking_uri=tracking_uri)
            out.extend(reg.checkpoints)
            found.append(reg)
        else:
            out.append(str(ref))
    return tuple(out), tuple(found)


def describe(reg: Registered) -> dict[str, Any]:
    """What ``/readyz`` shows of a served registry version."""
    return {"name": reg.name, "version": reg.version}
