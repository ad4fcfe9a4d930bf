"""Checkpoint round trip, atomic writes, and the authors' checkpoint importer."""

from __future__ import annotations

import argparse
import json
import os
import pickle

import pytest
import torch

from hrem_ray.authors_import import AuthorsCheckpointError, import_authors_checkpoint
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


def test_import_authors_checkpoint(cfg, tmp_path, tiny_bert):
    cfg.model.num_heads = 16  # the released runs' head count; it is not in the weights
    model = build_model(cfg.model, pretrained=False).eval()
    opt = argparse.Namespace(
        margin=0.3, mask_weight=1.5, num_layers_enc=2, data_name="coco_precomp"
    )
    src = tmp_path / "model_best.pth"
    torch.save(
        {"model": authors_state(model), "opt": opt, "epoch": 7, "best_rsum": 500.1, "Eiters": 9},
        src,
    )
    ck = load_checkpoint(import_authors_checkpoint(src, tiny_bert, tmp_path / "imported"))
    for a, b in zip(embeddings(model), embeddings(ck.model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert ck.config.model.mask_weight == 1.5 and ck.config.model.num_layers_enc == 2
    assert ck.config.model.embed_size == cfg.model.embed_size
    assert ck.config.data.dataset == "coco"
    assert ck.meta["best_rsum"] == 500.1 and ck.meta["epoch"] == 7


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
