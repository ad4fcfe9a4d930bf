"""Where a replica runs its towers: the CPU by default, its GPU when given one
(``hrem-ray serve --num-gpus``), its exact gallery there too when it fits. The GPU answers
must equal the CPU's (``-m gpu``; skipped without CUDA, bench/gpu_check.sh runs it)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from hrem_ray.cli import main
from hrem_ray.serving.app import replica_device
from hrem_ray.serving.service import RetrievalService
from hrem_ray.testing import tiny_data_and_checkpoint

GPU_TOL = 1e-4


@pytest.fixture
def gallery(tmp_path, tiny_bert):
    data, ckpt = tiny_data_and_checkpoint(tmp_path, tiny_bert)
    main(["index", "--checkpoint", str(ckpt), "--data-path", str(data), "--dataset", "f30k",
          "--split", "test", "--out", str(tmp_path / "gallery")])  # fmt: skip
    return ckpt, tmp_path / "gallery"


def test_replicas_default_to_the_cpu():
    """Outside a Ray actor with GPUs (no ``num_gpus``), the towers stay on the CPU."""
    assert replica_device() == "cpu"


def test_negative_gpu_share_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--checkpoint", str(tmp_path / "c"), "--gallery", str(tmp_path / "g"),
              "--num-gpus", "-1"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err == "hrem-ray serve: error: --num-gpus -1: give 0 (CPU replicas) or a GPU share > 0"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_service_equals_the_cpu_service(gallery):
    ckpt, gallery = gallery
    cpu, gpu = (RetrievalService(ckpt, gallery, device=d) for d in ("cpu", "cuda"))
    assert gpu.gallery.device_embs[0].device.type == "cuda"  # the exact gallery is searched there
    assert cpu.gallery.device_embs is None  # the CPU keeps the memory map
    queries = ["a dog runs on the grass", "two people", "x"]
    assert np.allclose(gpu.embed_texts(queries), cpu.embed_texts(queries), atol=GPU_TOL)
    for q in queries:
        g, c = (asyncio.run(s.search_text(q, k=5)).body["results"] for s in (gpu, cpu))
        assert [h["id"] for h in g] == [h["id"] for h in c]
        assert np.allclose([h["score"] for h in g], [h["score"] for h in c], atol=GPU_TOL)
    g, c = (asyncio.run(s.search_image(image_id=3, k=7)).body["results"] for s in (gpu, cpu))
    assert [h["id"] for h in g] == [h["id"] for h in c]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gallery_too_large_for_the_gpu_stays_on_the_cpu(gallery, monkeypatch):
    """Only ``GPU_GALLERY_SHARE`` of the free memory goes to the gallery (100 bytes here)."""
    ckpt, gallery = gallery
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (200, 10**9))
    gpu = RetrievalService(ckpt, gallery, device="cuda")
    assert gpu.gallery.device_embs is None
    results = asyncio.run(gpu.search_text("two people", k=3)).body["results"]
    assert len(results) == 3
