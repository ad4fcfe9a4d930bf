"""A model swap that fails keeps the running model: ``RetrievalService.try_swap`` (what a
replica's ``reconfigure`` calls) refuses it, keeps answering with the current model, and
says why in ``/readyz`` and the log. No Ray: the Serve path is in test_serve_ray.py and the
swap from faulty object storage in test_chaos.py."""

from __future__ import annotations

import asyncio
import logging
import shutil

import pytest

from hrem_ray.cli import main
from hrem_ray.serving.service import RetrievalService
from hrem_ray.testing import TINY_MODEL, tiny_data_and_checkpoint


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("swap")
    data, ckpt = tiny_data_and_checkpoint(root, tiny_bert)
    gallery = root / "gallery"
    main(["index", "--checkpoint", str(ckpt), "--data-path", str(data), "--dataset", "f30k",
          "--split", "test", "--out", str(gallery)])  # fmt: skip
    return {"root": root, "ckpt": ckpt, "gallery": gallery}


def _answer(service: RetrievalService) -> dict:
    return asyncio.run(service.search_text("a dog on the grass", k=5)).body


def _status(service: RetrievalService) -> dict:
    return asyncio.run(service.status()).body


def _corrupt_copy(ckpt, dst):
    shutil.copytree(ckpt, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return dst


@pytest.mark.parametrize("bad", ["missing", "corrupt", "gallery"])
def test_refused_swap_keeps_serving_and_says_why(world, bad, caplog):
    service = RetrievalService(world["ckpt"], world["gallery"])
    before, status = _answer(service), _status(service)
    assert status["swap_refused"] is None
    root = world["root"]
    ckpt, gallery = {
        "missing": (root / "no-such-checkpoint", world["gallery"]),
        "corrupt": (_corrupt_copy(world["ckpt"], root / f"torn-{bad}"), world["gallery"]),
        "gallery": (world["ckpt"], root / "no-such-gallery"),
    }[bad]
    with caplog.at_level(logging.WARNING, logger="hrem_ray.serving.service"):
        assert service.try_swap(ckpt, gallery) is False
    refused = _status(service)["swap_refused"]
    assert refused["reason"] and "\n" not in refused["reason"]
    assert str(root) not in refused["reason"]  # /readyz shows no storage locations
    logged = [r.getMessage() for r in caplog.records if "swap refused" in r.getMessage()]
    assert len(logged) == 1 and (str(ckpt) in logged[0] or str(gallery) in logged[0])
    # still the old model, answering as before
    assert {k: v for k, v in _status(service).items() if k != "swap_refused"} == {
        k: v for k, v in status.items() if k != "swap_refused"
    }
    assert _answer(service) == before


def test_a_later_swap_clears_the_refusal(world):
    service = RetrievalService(world["ckpt"], world["gallery"])
    assert not service.try_swap(world["root"] / "no-such-checkpoint", world["gallery"])
    copy = world["root"] / "gallery-copy"
    if not copy.exists():
        shutil.copytree(world["gallery"], copy)
    assert service.try_swap(world["ckpt"], copy) is True
    assert _status(service)["swap_refused"] is None
    assert service.current.gallery_ref == str(copy)


def test_a_swap_that_changes_shapes_is_refused_too(world, tiny_bert):
    """The dims check of ``swap`` (a new app, not a swap) keeps the service up as well."""
    root = world["root"]
    other = root / "other-dims"
    sets = [s.replace("img_dim=24", "img_dim=16") for s in TINY_MODEL]
    main(["init-checkpoint", "--out", str(other), "--bert-path", tiny_bert, *sets])
    service = RetrievalService(world["ckpt"], world["gallery"])
    assert not service.try_swap(other, world["gallery"])
    assert "application" in _status(service)["swap_refused"]["reason"]
