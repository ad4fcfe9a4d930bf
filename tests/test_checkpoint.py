"""Checkpoint round trip, atomic writes, and the authors' checkpoint importer."""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from hrem_ray.authors_import import (
    AuthorsCheckpointError,
    config_from_authors,
    import_authors_checkpoint,
)
from hrem_ray.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_train_state,
    save_checkpoint,
)
from hrem_ray.config import HREMConfig
from hrem_ray.model import build_model


@pytest.fixture
def cfg(small_cfg) -> HREMConfig:
    return HREMConfig(model=small_cfg).validate()


def embeddings(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 6, model.cfg.img_dim, generator=g)
    tokens = torch.tensor([[101, 1037, 3899, 102, 0], [101, 2048, 2111, 2652, 102]] * 2)[:3]
    with torch.no_grad():
        return (
            model.embed_images(images, torch.tensor([6, 4, 6])),
            model.embed_texts(tokens, (tokens != 0).sum(1)),
        )


def test_round_trip_gives_identical_embeddings(cfg, tmp_path):
    model = build_model(cfg.model, pretrained=False).eval()
    train_state = {"epoch": 3, "iteration": 42, "rng": torch.get_rng_state(), "opt": {"lr": 0.1}}
    path = save_checkpoint(
        tmp_path / "ck", model, cfg, meta={"rsum": 12.5}, train_state=train_state
    )
    loaded = load_checkpoint(path)
    for a, b in zip(embeddings(model), embeddings(loaded.model), strict=True):
        assert torch.equal(a, b)
    assert loaded.meta == {"rsum": 12.5}
    assert loaded.config.model.margin == cfg.model.margin
    assert (loaded.backbone_dir / "vocab.txt").is_file()
    record = json.loads((path / "config.json").read_text())
    assert record["code"]["hrem_ray"] and record["format_version"] == 1
    state = load_train_state(path)
    assert state["iteration"] == 42 and torch.equal(state["rng"], train_state["rng"])


def test_write_is_atomic_and_replaces(cfg, tmp_path, monkeypatch):
    model = build_model(cfg.model, pretrained=False)
    path = save_checkpoint(tmp_path / "ck", model, cfg, meta={"v": 1})

    import hrem_ray.checkpoint as ck

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, model, cfg, meta={"v": 2}, train_state={"x": 1})
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temp folder left behind
    assert load_checkpoint(path).meta == {"v": 1}  # the old checkpoint is intact
    monkeypatch.undo()
    save_checkpoint(path, model, cfg, meta={"v": 3})
    assert load_checkpoint(path).meta == {"v": 3}
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_load_errors_are_clear(cfg, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    path = save_checkpoint(tmp_path / "ck", build_model(cfg.model, pretrained=False), cfg)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_checkpoint(path)


def authors_state(model):
    """The model's towers the way the authors' DDP runs saved them."""
    img = {f"module.{k}": v for k, v in model.img_enc.state_dict().items()}
    txt = {f"module.{k}": v for k, v in model.txt_enc.state_dict().items()}
    txt["module.bert.embeddings.position_ids"] = torch.arange(512)[None]
    hidden = model.txt_enc.bert.config.hidden_size
    txt["module.bert.pooler.dense.weight"] = torch.randn(hidden, hidden)
    txt["module.bert.pooler.dense.bias"] = torch.zeros(hidden)
    return [img, txt]


AUTHORS_OPT = json.loads((Path(__file__).parent / "data" / "authors_opt.json").read_text())
AUTHORS_OPT.pop("_about")


def authors_opt(cfg: HREMConfig, **changes) -> argparse.Namespace:
    """The authors' saved Namespace: their defaults, the tiny model's widths, ``changes``."""
    widths = {"embed_size": cfg.model.embed_size, "img_dim": cfg.model.img_dim}
    return argparse.Namespace(**{**AUTHORS_OPT, **widths, **changes})


def save_authors(path, model, opt, epoch=7):
    state = {"model": authors_state(model), "opt": opt, "epoch": epoch, "best_rsum": 500.1}
    torch.save({**state, "Eiters": 9}, path)
    return path


@pytest.mark.parametrize(
    ("source", "opt_changes"),
    [
        ({"num_heads": 8, "dropout": 0.0}, {"nhead": 8, "dropout": 0.0}),
        ({"num_heads": 16, "img_norm": False, "txt_norm": False},
         {"no_imgnorm": True, "no_txtnorm": True}),
        ({"num_heads": 16, "mask_weight": 1.5},
         {"dataset": "coco", "batch_size": 256, "mask_weight": 1.5}),
    ],
    ids=["heads", "no-norm", "coco"],
)  # fmt: skip
def test_import_gives_the_source_models_embeddings(cfg, tmp_path, tiny_bert, source, opt_changes):
    for key, value in source.items():
        setattr(cfg.model, key, value)
    model = build_model(cfg.model, pretrained=False).eval()
    src = save_authors(tmp_path / "model_best.pth", model, authors_opt(cfg, **opt_changes))
    ck = load_checkpoint(import_authors_checkpoint(src, tiny_bert, tmp_path / "imported"))
    for a, b in zip(embeddings(model), embeddings(ck.model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        norms = a.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms)) == cfg.model.img_norm
    for key, value in source.items():
        assert getattr(ck.config.model, key) == value
    assert ck.meta["best_rsum"] == 500.1 and ck.meta["epoch"] == 7
    coco = opt_changes.get("dataset") == "coco"
    assert ck.config.data.dataset == ("coco" if coco else "f30k")
    assert ck.config.model.cutoff == (1.9 if coco else 1.7)
    assert ck.config.train.batch_size == (256 if coco else 128)


def test_defaults_import_as_our_recipe(cfg):
    """The authors' defaults are our defaults, key for key (the towers' widths aside)."""
    model = build_model(cfg.model, pretrained=False)
    raw = {"model": authors_state(model), "opt": authors_opt(cfg), "epoch": 3}
    got = config_from_authors(raw, "bert").to_dict()
    want = HREMConfig().validate().to_dict()
    for key in ("bert_path", "embed_size", "img_dim", "mlp_hidden", "ff_dim"):
        del got["model"][key], want["model"][key]
    assert got == want


@pytest.mark.parametrize(
    ("field", "value", "key", "expected"),
    [
        ("dataset", "coco_precomp", "data.dataset", "coco"),
        ("num_epochs", 12, "train.epochs", 12),
        ("batch_size", 64, "train.batch_size", 64),
        ("learning_rate", 2e-4, "train.lr", 2e-4),
        ("grad_clip", 1.0, "train.grad_clip", 1.0),
        ("lr_schedules", [5, 9], "train.lr_decay_epochs", [5, 9]),
        ("decay_rate", 0.5, "train.lr_decay", 0.5),
        ("graph_lr_factor", 2.0, "train.relation_lr_factor", 2.0),
        ("no_imgnorm", True, "model.img_norm", False),
        ("no_txtnorm", True, "model.txt_norm", False),
        ("residual_weight", 0.6, "model.residual_weight", 0.6),
        ("nhead", 8, "model.num_heads", 8),
        ("dropout", 0.2, "model.dropout", 0.2),
        ("num_layers_enc", 3, "model.num_layers_enc", 3),
        ("warmup", 100, "model.warmup", 100),
        ("mask_weight", 1.5, "model.mask_weight", 1.5),
        ("threshold", 0.25, "model.threshold", 0.25),
        ("topk", 5, "model.frag_topk", 5),
        ("reg_loss_weight", 3, "model.kl_weight", 3.0),
        ("cross_loss", 0, "model.cross_loss", False),
        ("base_loss", "vse", "model.base_loss", "vse"),
        ("gnn_loss", "vse", "model.relation_loss", "vse"),
        ("mask_repeat", 0, "model.mask_repeat", False),
        ("size_augment", 0, "data.region_keep", 1.0),
        ("vse_mean_warmup_epochs", 3, "model.vse_mean_warmup_epochs", 3),
        ("margin", 0.7, "model.margin", 0.2),  # both losses 'trip': margin 0.2 is fixed
    ],
)
def test_each_field_maps_to_our_config(cfg, field, value, key, expected):
    model = build_model(cfg.model, pretrained=False)
    raw = {"model": authors_state(model), "opt": authors_opt(cfg, **{field: value})}
    section, name = key.split(".")
    assert getattr(getattr(config_from_authors(raw, "bert"), section), name) == expected


@pytest.mark.parametrize(
    ("changes", "epoch", "margin", "vse_warmup"),
    [
        ({"base_loss": "vse", "gnn_loss": "vse", "margin": 0.5}, 7, 0.5, 1),
        ({"base_loss": "vse", "max_violation": True}, 7, 0.2, 1),  # flipped by the warm-up
        ({"base_loss": "vse", "max_violation": True, "vse_mean_warmup_epochs": 5}, 2, 0.2, 0),
    ],
)
def test_vse_margin_and_schedule(cfg, changes, epoch, margin, vse_warmup):
    model = build_model(cfg.model, pretrained=False)
    raw = {"model": authors_state(model), "opt": authors_opt(cfg, **changes), "epoch": epoch}
    got = config_from_authors(raw, "bert").model
    assert (got.margin, got.vse_mean_warmup_epochs, got.max_violation) == (
        margin, vse_warmup, True
    )  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"norm_input": 0}, "opt field 'norm_input' = 0: .*not supported"),
        ({"data_name": "coco"}, "opt field 'data_name' is not in the authors' parser"),
        ({"base_loss": "vse", "margin": 0.5}, "opt field 'margin': .*one margin"),
        ({"embed_size": 1024}, "opt field 'embed_size' = 1024 disagrees"),
        ({"cross_loss": 2}, "opt field 'cross_loss' = 2: expects 0 or 1"),
        ({"gnn_loss": "infonce"}, "opt field 'gnn_loss' = 'infonce': .*'model.relation_loss'"),
        ({"nhead": 5}, "opt field 'nhead' = 5: .*divisible"),
    ],
)
def test_unrepresentable_fields_are_named(cfg, tmp_path, tiny_bert, changes, message):
    model = build_model(cfg.model, pretrained=False)
    src = save_authors(tmp_path / "m.pth", model, authors_opt(cfg, **changes))
    with pytest.raises(AuthorsCheckpointError, match=message):
        import_authors_checkpoint(src, tiny_bert, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_importer_refuses_arbitrary_pickles(tmp_path, tiny_bert, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "evil.pth"
    with open(src, "wb") as f:
        pickle.dump({"model": [{}, {}], "opt": Evil()}, f)
    with pytest.raises(AuthorsCheckpointError, match="refused"):
        import_authors_checkpoint(src, tiny_bert, tmp_path / "out")
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out").exists()


def test_importer_rejects_mismatched_backbone(cfg, tmp_path, tiny_bert):
    model = build_model(cfg.model, pretrained=False)
    state = authors_state(model)
    del state[1]["module.linear.weight"]
    src = tmp_path / "m.pth"
    torch.save({"model": state, "opt": argparse.Namespace()}, src)
    with pytest.raises(AuthorsCheckpointError, match="missing"):
        import_authors_checkpoint(src, tiny_bert, tmp_path / "out")
