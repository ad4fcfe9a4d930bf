"""Where a replica runs its towers: the CPU by default, its GPU when given one
(``hrem-ray serve --num-gpus``). The GPU answers must equal the CPU's (``-m gpu``; skipped
without CUDA, bench/gpu_check.sh runs it)."""

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
def test_gpu_service_equals_the_cpu_service(tmp_path, tiny_bert):
    data, ckpt = tiny_data_and_checkpoint(tmp_path, tiny_bert)
    gallery = tmp_path / "gallery"
    main(["index", "--checkpoint", str(ckpt), "--data-path", str(data), "--dataset", "f30k",
          "--split", "test", "--out", str(gallery)])  # fmt: skip
    cpu, gpu = (RetrievalService(ckpt, gallery, device=d) for d in ("cpu", "cuda"))
    queries = ["a dog runs on the grass", "two people", "x"]
    assert np.allclose(gpu.embed_texts(queries), cpu.embed_texts(queries), atol=GPU_TOL)
    for q in queries:
        g, c = (asyncio.run(s.search_text(q, k=5)).body["results"] for s in (gpu, cpu))
        assert [h["id"] for h in g] == [h["id"] for h in c]
        assert np.allclose([h["score"] for h in g], [h["score"] for h in c], atol=GPU_TOL)
