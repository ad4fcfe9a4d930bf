"""Import the authors' released ``model_best.pth`` into an hrem-ray checkpoint.

The file is a pickle holding an ``argparse.Namespace``. It is read with
``torch.load(weights_only=True)`` and an allow-list of exactly that class, so no
arbitrary code from the file can run. The architecture is read off the weights'
shapes; every other field of the Namespace maps to our config or is refused
(docs/deviations.md lists the table).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hrem_ray.checkpoint import save_checkpoint
from hrem_ray.config import ConfigError, HREMConfig
from hrem_ray.model import build_model

# Keys of the authors' BERT that our text tower does not hold (no pooler, buffer ids).
_DROPPED_BERT_KEYS = ("bert.embeddings.position_ids", "bert.pooler.")


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


def _flag(value: Any) -> bool:
    """The authors' switches are store_true booleans or 0/1 integers."""
    if value not in (0, 1):  # True == 1 and False == 0 as well
        raise ConfigError(f"expects 0 or 1, got {value!r}")
    return bool(value)


def _to(key: str, convert: Callable[[Any], Any] = lambda x: x) -> Callable[[Any], dict]:
    return lambda value: {key: convert(value)}


def _only(default: Any, what: str) -> Callable[[Any], dict]:
    """A setting hrem-ray implements only at the authors' default value."""

    def check(value: Any) -> dict:
        if value != default:
            raise ConfigError(f"not supported by hrem-ray ({what})")
        return {}

    return check


def _dataset(value: Any) -> dict:
    return {"data.dataset": str(value).removesuffix("_precomp")}


# Every field of the authors' parser (docs/deviations.md, "Importing the authors'
# checkpoints"): a function giving our config keys for its value, or None for run
# settings that change neither the model, the losses nor the optimisation.
# ``margin``, ``max_violation`` and ``vse_mean_warmup_epochs`` depend on other fields
# (``_margin_keys``, ``_schedule_keys``); ``embed_size``/``img_dim`` are checked against the
# weights.
_FIELDS: dict[str, Callable[[Any], dict] | None] = {
    **dict.fromkeys(
        (
            "data_path",
            "workers",
            "log_step",
            "val_step",
            "logger_name",
            "model_name",
            "multi_gpu",
            "gpu_id",
            "bert_path",
            "save_results",
        ),
        None,
    ),
    "dataset": _dataset,
    "num_epochs": _to("train.epochs"),
    "batch_size": _to("train.batch_size"),
    "learning_rate": _to("train.lr"),
    "grad_clip": _to("train.grad_clip"),
    "lr_schedules": _to("train.lr_decay_epochs", list),
    "decay_rate": _to("train.lr_decay"),
    "graph_lr_factor": _to("train.relation_lr_factor"),
    "no_imgnorm": _to("model.img_norm", lambda v: not _flag(v)),
    "no_txtnorm": _to("model.txt_norm", lambda v: not _flag(v)),
    "residual_weight": _to("model.residual_weight"),
    "nhead": _to("model.num_heads"),
    "dropout": _to("model.dropout"),
    "num_layers_enc": _to("model.num_layers_enc"),
    "warmup": _to("model.warmup"),
    "mask_weight": _to("model.mask_weight"),
    "threshold": _to("model.threshold"),
    "topk": _to("model.frag_topk"),
    "reg_loss_weight": _to("model.kl_weight"),
    "norm_input": _only(1, "the relation module always takes the normalised embeddings"),
    "cross_loss": _to("model.cross_loss", _flag),
    "base_loss": _to("model.base_loss"),
    "gnn_loss": _to("model.relation_loss"),
    "mask_repeat": _to("model.mask_repeat", _flag),
    "size_augment": _to("data.region_keep", lambda v: 0.8 if _flag(v) else 1.0),
}
_RESOLVED = ("margin", "max_violation", "vse_mean_warmup_epochs", "embed_size", "img_dim")
# The authors' defaults of the fields the loss settings depend on, for files that predate them.
_LOSS_DEFAULTS = {
    "base_loss": "trip",
    "gnn_loss": "trip",
    "margin": 0.2,
    "max_violation": False,
    "vse_mean_warmup_epochs": 1,
}
_TRIP_MARGIN = 0.2  # the authors' triplet loss hard-codes its margin


def _margin_keys(opt: dict[str, Any]) -> dict[str, Any]:
    """The authors' triplet loss ignores ``margin`` (0.2 is fixed); hrem-ray has one margin
    for both losses, so a 'vse' margin other than 0.2 next to a 'trip' loss cannot be
    represented."""
    kinds = {opt["base_loss"], opt["gnn_loss"]}
    margin = float(opt["margin"])
    if "vse" not in kinds:
        return {"model.margin": _TRIP_MARGIN}
    if "trip" in kinds and margin != _TRIP_MARGIN:
        raise ConfigError(
            f"{margin} next to a 'trip' loss, which hard-codes {_TRIP_MARGIN}: "
            "hrem-ray uses one margin for both losses"
        )
    return {"model.margin": margin}


def _schedule_keys(opt: dict[str, Any], epoch: int | None) -> dict[str, Any]:
    """The saved ``max_violation`` is True either because the run asked for it (then it
    held from epoch 0) or because the VSE++ warm-up flipped it; a checkpoint saved before
    the warm-up ended tells the two apart."""
    warm = opt["vse_mean_warmup_epochs"]
    from_start = _flag(opt["max_violation"]) and epoch is not None and epoch < warm
    return {"model.max_violation": True, "model.vse_mean_warmup_epochs": 0 if from_start else warm}


def config_from_authors(raw: dict[str, Any], bert_path: str | Path) -> HREMConfig:
    """Our config for an authors' checkpoint: the architecture from the weights' shapes,
    everything else from the saved ``opt``. A field hrem-ray cannot represent, or one
    the authors' parser does not have, is an error naming it."""
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
    unknown = sorted(set(opt) - set(_FIELDS) - set(_RESOLVED))
    if unknown:
        raise AuthorsCheckpointError(
            f"opt field '{unknown[0]}' is not in the authors' parser: hrem-ray cannot tell "
            "what it changed"
        )
    for name in ("embed_size", "img_dim"):
        shape = getattr(cfg.model, name)
        if name in opt and opt[name] != shape:
            raise AuthorsCheckpointError(
                f"opt field '{name}' = {opt[name]!r} disagrees with the weights ({shape})"
            )
    steps = [(f"'{n}' = {opt[n]!r}", _FIELDS[n], opt[n]) for n in opt if _FIELDS.get(n)]
    loss_opt = {**_LOSS_DEFAULTS, **{k: v for k, v in opt.items() if k in _LOSS_DEFAULTS}}
    steps += [
        ("'margin'", _margin_keys, loss_opt),
        ("'max_violation'/'vse_mean_warmup_epochs'",
         lambda o: _schedule_keys(o, raw.get("epoch")), loss_opt),
    ]  # fmt: skip
    for label, keys_of, value in steps:
        try:
            for key, v in keys_of(value).items():
                cfg.set(key, v)
            cfg.validate()
        except ConfigError as e:
            raise AuthorsCheckpointError(f"opt field {label}: {e}") from None
    return cfg


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
