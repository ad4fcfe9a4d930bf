"""The model registry on one machine, in an embedded MLflow store (SQLite, no server):
registering checkpoints and ensembles, aliases and versions, ``models:/`` references in the
commands and the service, and the one-line errors of references that name nothing."""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Any

import numpy as np
import pytest

from hrem_ray.checkpoint import load_checkpoint
from hrem_ray.cli import main
from hrem_ray.embed import model_id
from hrem_ray.registry import CHECKPOINTS_TAG, CONFIG_TAG, MODEL_ID_TAG, resolve
from hrem_ray.serving.service import RetrievalService
from hrem_ray.testing import TINY_MODEL, tiny_data_and_checkpoint
from tests.helpers import run_err


@pytest.fixture(scope="module")
def reg(tmp_path_factory, tiny_bert) -> dict[str, Any]:
    """Tiny data, checkpoints A and B (another seed), a copy of A elsewhere, A's gallery, and
    an embedded store where A is models:/hrem/1 (alias champion), B version 2 and the
    ensemble A+B version 3."""
    root = tmp_path_factory.mktemp("registry")
    data, a = tiny_data_and_checkpoint(root, tiny_bert)
    b = root / "ckpt_b"
    main(["init-checkpoint", "--out", str(b), "--bert-path", tiny_bert, "--seed", "1",
          *TINY_MODEL])  # fmt: skip
    a_copy = root / "copy_of_a"
    shutil.copytree(a, a_copy)
    gallery = root / "gallery_a"
    main(["index", "--checkpoint", str(a), "--data-path", str(data), "--dataset", "f30k",
          "--split", "test", "--out", str(gallery)])  # fmt: skip
    uri = f"sqlite:///{root / 'mlflow.db'}"
    flags = ["--tracking-uri", uri]
    main(["register", str(a), "--name", "hrem", "--alias", "champion", *flags])
    main(["register", str(b), "--name", "hrem", *flags])
    main(["register", str(a), str(b), "--name", "hrem", "--alias", "pair", *flags])
    return {"root": root, "data": data, "a": a, "b": b, "a_copy": a_copy,
            "gallery": gallery, "uri": uri, "flags": flags}  # fmt: skip


def test_versions_and_aliases_resolve_to_their_checkpoints(reg):
    uri = reg["uri"]
    assert resolve("models:/hrem@champion", tracking_uri=uri).checkpoints == (str(reg["a"]),)
    v2 = resolve("models:/hrem/2", tracking_uri=uri)
    assert (v2.version, v2.checkpoints) == ("2", (str(reg["b"]),))
    pair = resolve("models:/hrem@pair", tracking_uri=uri)
    assert (pair.version, pair.checkpoints) == ("3", (str(reg["a"]), str(reg["b"])))


def test_version_records_source_ids_and_config_without_copying(reg):
    from mlflow.tracking import MlflowClient

    mv = MlflowClient(tracking_uri=reg["uri"], registry_uri=reg["uri"]).get_model_version(
        "hrem", "1"
    )
    assert mv.source == str(reg["a"])  # by URI: the weights stay where they are
    ck = load_checkpoint(reg["a"])
    assert mv.tags[MODEL_ID_TAG] == model_id(ck.model)
    assert json.loads(mv.tags[CHECKPOINTS_TAG]) == [str(reg["a"])]
    assert json.loads(mv.tags[CONFIG_TAG])["model"]["embed_size"] == ck.config.model.embed_size
    assert mv.tags["hrem.code.hrem_ray"]


def test_commands_take_models_refs(reg, tmp_path):
    caps = tmp_path / "caps.txt"
    caps.write_text("a red car\ntwo dogs on grass\n")
    common = ["--captions", str(caps), *reg["flags"]]
    main(["embed", "--checkpoint", "models:/hrem@champion", "--out", str(tmp_path / "r.npy"),
          *common])  # fmt: skip
    main(["embed", "--checkpoint", str(reg["a"]), "--out", str(tmp_path / "p.npy"), *common])
    np.testing.assert_array_equal(np.load(tmp_path / "r.npy"), np.load(tmp_path / "p.npy"))
    split = ["--data-path", str(reg["data"]), "--dataset", "f30k", "--split", "test"]
    for ref, out in (("models:/hrem@pair", "by_ref"), (None, "by_path")):
        ckpts = ["--checkpoint", ref] if ref else ["--checkpoint", str(reg["a"]),
                                                   "--checkpoint", str(reg["b"])]  # fmt: skip
        main(["eval", *ckpts, *split, "--json", str(tmp_path / f"{out}.json"), *reg["flags"]])
    by_ref, by_path = (
        json.loads((tmp_path / f"{n}.json").read_text()) for n in ("by_ref", "by_path")
    )  # noqa: E501
    assert by_ref["rsum"] == by_path["rsum"] and by_ref["n_images"] == 10


@pytest.mark.parametrize(
    "ref, message",
    [
        ("models:/nope@champion", "no registered model named 'nope'"),
        ("models:/hrem@nope", "registered model 'hrem' has no alias 'nope'"),
        ("models:/hrem/99", "registered model 'hrem' has no version 99"),
        ("models:/hrem", "expected models:/NAME@ALIAS or models:/NAME/VERSION"),
    ],
)
def test_refs_that_name_nothing_are_one_line_errors(reg, capsys, ref, message):
    line = run_err(capsys, "eval", "--checkpoint", ref, "--data-path", str(reg["data"]),
                   "--dataset", "f30k", *reg["flags"])  # fmt: skip
    assert line.endswith(f"{ref}: {message}"), line


def test_register_rejects_bad_names_incomplete_and_local_on_a_server(reg, capsys, tmp_path):
    line = run_err(capsys, "register", str(reg["a"]), "--name", "a/b", *reg["flags"])
    assert "bad model name 'a/b'" in line
    line = run_err(capsys, "register", str(tmp_path), "--name", "x", *reg["flags"])
    assert "incomplete" in line
    line = run_err(capsys, "register", str(reg["a"]), "--name", "x",
                   "--tracking-uri", "http://127.0.0.1:9")  # fmt: skip
    assert "takes a checkpoint by URI only" in line  # a server refuses local sources


def test_service_names_its_version_and_swaps_when_the_alias_moves(reg, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reg["uri"])  # what a replica reads
    svc = RetrievalService("models:/hrem@champion", reg["gallery"])
    body = asyncio.run(svc.status()).body
    assert body["registry"] == [{"name": "hrem", "version": "1"}]
    assert body["model_id"] == model_id(load_checkpoint(reg["a"]).model)
    old = svc.current
    svc.swap("models:/hrem@champion", reg["gallery"])  # same ref, alias unmoved: no reload
    assert svc.current is old
    # the alias moves to a new version (the same weights at another URI, so A's gallery fits)
    main(["register", str(reg["a_copy"]), "--name", "hrem", "--alias", "champion",
          *reg["flags"]])  # fmt: skip
    svc.swap("models:/hrem@champion", reg["gallery"])
    assert svc.current.checkpoints == (str(reg["a_copy"]),)
    assert asyncio.run(svc.status()).body["registry"] == [{"name": "hrem", "version": "4"}]
