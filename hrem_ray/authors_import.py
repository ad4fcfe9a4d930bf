"""Import the authors' released ``model_best.pth`` into an hrem-ray checkpoint (spec section 9).

The file is a pickle holding an ``argparse.Namespace``. It is read with
``torch.load(weights_only=True)`` and an allow-list of exactly that class, so no
arbitrary code from the file can run. The architecture is read off the weights'
shapes; hyperparameters come from the Namespace where it has them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from hrem_ray.checkpoint import save_checkpoint
from hrem_ray.config import HREMConfig
from hrem_ray.model import build_model

# Keys of the authors' BERT that our text tower does not hold (no pooler, buffer ids).
_DROPPED_BERT_KEYS = ("bert.embeddings.position_ids", "bert.pooler.")

# argparse name in the authors' runs -> our config key
_OPT_KEYS = {
    "margin": "model.margin",
    "max_violation": "model.max_violation",
    "mask_weight": "model.mask_weight",
    "num_layers_enc": "model.num_layers_enc",
    "threshold": "model.threshold",
    "residual_weight": "model.residual_weight",
    "warmup": "model.warmup",
    "batch_size": "train.batch_size",
    "learning_rate": "train.lr",
    "num_epochs": "train.epochs",
    "grad_clip": "train.grad_clip",
}


class AuthorsCheckpointError(ValueError):
    """The source file is not a usable authors' checkpoint."""


def read_authors_file(src: str | Path) -> dict[str, Any]:
    """Unpickle with an allow-list: tensors, containers and argparse.Namespace only."""
    src = Path(src)
    if not src.is_file():
        raise AuthorsCheckpointError(f"checkpoint file not found: {src}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            raw = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a refusal
        raise AuthorsCheckpointError(f"{src}: refused to load ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), (list, tuple)):
        raise AuthorsCheckpointError(
            f"{src}: expected a dict with 'model' = [image, text] state dicts"
        )
    if len(raw["model"]) < 2:
        raise AuthorsCheckpointError(
            f"{src}: 'model' holds {len(raw['model'])} state dicts, expected 2"
        )
    return raw


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop DDP's ``module.`` and unused BERT keys; put the tower's prefix in front."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(_DROPPED_BERT_KEYS):
            continue
        out[prefix + key] = value
    return out


def config_from_authors(raw: dict[str, Any], bert_path: str | Path) -> HREMConfig:
    cfg = HREMConfig()
    cfg.model.bert_path = str(bert_path)
    img = {k.removeprefix("module."): v for k, v in raw["model"][0].items()}
    try:
        cfg.model.embed_size, cfg.model.img_dim = img["fc.fc.weight"].shape
        cfg.model.mlp_hidden = img["fc.mlp.layers.0.weight"].shape[0]
        cfg.model.ff_dim = img["aggr.layers.0.linear1.weight"].shape[0]
    except KeyError as e:
        raise AuthorsCheckpointError(
            f"image tower state dict lacks {e}: not an HREM checkpoint"
        ) from None
    opt = raw.get("opt")
    opt = vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt or {})
    for name, key in _OPT_KEYS.items():
        if name in opt:
            cfg.set(key, opt[name])
    if "data_name" in opt:
        cfg.data.dataset = str(opt["data_name"]).removesuffix("_precomp")
    return cfg.validate()


def import_authors_checkpoint(src: str | Path, bert_path: str | Path, out: str | Path) -> Path:
    """Convert ``src`` (authors' format) into an hrem-ray checkpoint folder at ``out``.

    The relation module is not in the released files (inference does not use it), so
    it starts freshly initialised; the towers must match exactly or this fails.
    """
    raw = read_authors_file(src)
    cfg = config_from_authors(raw, bert_path)
    model = build_model(cfg.model, pretrained=False)
    state = {**_strip(raw["model"][0], "img_enc."), **_strip(raw["model"][1], "txt_enc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise AuthorsCheckpointError(
            f"{src} does not fit the backbone {bert_path}: {str(e).splitlines()[-1].strip()}"
        ) from None
    missing = [k for k in missing if not k.startswith("relation.")]
    if missing or unexpected:
        raise AuthorsCheckpointError(
            f"{src} does not fit an HREM with backbone {bert_path}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(is --bert-path the backbone the checkpoint was trained with?)"
        )
    meta = {
        "source": str(src),
        "imported_from": "authors",
        **{k: raw[k] for k in ("epoch", "best_rsum", "Eiters") if k in raw},
    }
    return save_checkpoint(out, model, cfg, meta=meta)
