"""The one checkpoint format of hrem-ray: a folder, written atomically, loaded without pickle.

    CKPT/
      model.safetensors   every weight of HREM (towers and relation module)
      config.json         format version, code version, the full run config, metadata
      backbone/           BERT config + tokenizer files: rebuilds the text tower offline
      train_state.pt      optional: optimizer, schedule, RNG, epoch, iteration (for resume);
                          tensors and plain containers only, read with weights_only=True

A folder (rather than one file) is what Ray Train checkpoints are, so a checkpoint
reported to Ray is exactly what ``hrem-ray eval`` and Ray Serve load. Every function takes a
local path or a URI (``s3://...``): a remote checkpoint is read from this node's cache and
written with a completeness marker (``hrem_ray.storage``, docs/storage.md).
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hrem_ray import __version__, storage
from hrem_ray.backbone import copy_backbone_files
from hrem_ray.config import HREMConfig
from hrem_ray.data.tokenize import CaptionTokenizer
from hrem_ray.model import HREM, build_model

FORMAT = "hrem-ray-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "config.json"
BACKBONE = "backbone"
TRAIN_STATE = "train_state.pt"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or of another format."""


@dataclass
class Checkpoint:
    model: HREM
    config: HREMConfig  # model.bert_path points at the checkpoint's backbone/ folder
    meta: dict[str, Any]
    path: Path

    @property
    def backbone_dir(self) -> Path:
        return self.path / BACKBONE

    def tokenizer(self) -> CaptionTokenizer:
        """The tokenizer the model was trained with: the checkpoint's own vocabulary and
        caption length, so every consumer tokenises as training did."""
        return CaptionTokenizer.from_dir(self.backbone_dir, max_tokens=self.config.data.max_tokens)


def code_version() -> dict[str, str]:
    """Package version and, when run from a git checkout, the commit."""
    version = {"hrem_ray": __version__, "torch": torch.__version__}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if commit.returncode == 0:
            version["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def save_checkpoint(
    path: str | Path,
    model: HREM,
    config: HREMConfig,
    *,
    meta: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path | str:
    """Write a checkpoint folder; readers never see a half-written one.

    Everything goes to a temporary folder that is renamed into place (or, for a URI,
    uploaded with its marker last) at the end; an existing checkpoint at ``path`` is
    replaced only once the new one is complete.
    """

    def fill(tmp: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        copy_backbone_files(config.model.bert_path, tmp / BACKBONE)
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "code": code_version(),
            "config": config.to_dict(),
            "meta": meta or {},
        }
        (tmp / META).write_text(json.dumps(record, indent=2, default=str))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)

    return storage.write_dir(path, fill)


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path | str:
    """Copy a checkpoint folder to ``dst`` (e.g. a sweep's ``best/``), atomically; either
    may be a URI."""
    read_record(src)
    return storage.copy_dir(src, dst)


def read_record(path: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json, after checking that the folder is a complete checkpoint."""
    return _record(storage.fetch_dir(path, "checkpoint"), str(path))


def _record(local: Path, shown: str) -> dict[str, Any]:
    """``read_record`` of the local folder ``local``, naming it ``shown`` (its URI) in errors."""
    if not local.is_dir():
        raise CheckpointError(f"checkpoint not found: {shown} (expected a folder)")
    for name in (META, WEIGHTS, f"{BACKBONE}/config.json", f"{BACKBONE}/vocab.txt"):
        if not (local / name).is_file():
            raise CheckpointError(f"checkpoint {shown} is incomplete: missing {name}")
    try:
        record = json.loads((local / META).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{shown}/{META}: not valid JSON ({e})") from None
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{shown} is not an {FORMAT} (format={record.get('format')!r})")
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{shown} has format version {record['format_version']}; "
            f"this hrem-ray reads up to {FORMAT_VERSION}: upgrade hrem-ray"
        )
    return record


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from a checkpoint folder, in eval mode, on ``device``; the returned
    ``Checkpoint.path`` is the local folder (this node's cached copy for a URI)."""
    shown, path = str(path), storage.fetch_dir(path, "checkpoint")
    record = _record(path, shown)
    if not isinstance(record.get("config"), dict):
        raise CheckpointError(f"{shown}/{META} has no 'config' section")
    config = HREMConfig.from_dict(record["config"])
    config.model.bert_path = str(path / BACKBONE)
    model = build_model(config.model, pretrained=False)
    try:
        state = load_file(str(path / WEIGHTS), device="cpu")
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (SafetensorError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{shown}/{WEIGHTS}: unreadable or wrong shapes ({msg})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{shown}/{WEIGHTS} does not match the model its config describes: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return Checkpoint(model.to(device).eval(), config, record.get("meta", {}), path)


def load_weights(path: str | Path, model: HREM) -> None:
    """Load a checkpoint's weights into an existing model (resume), strictly."""
    local = storage.fetch_dir(path, "checkpoint")
    _record(local, str(path))
    model.load_state_dict(load_file(str(local / WEIGHTS), device="cpu"))


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    """Optimizer/schedule/RNG state for resuming, or None when the checkpoint has none."""
    file = storage.fetch_dir(path, "checkpoint") / TRAIN_STATE
    if not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=True)
