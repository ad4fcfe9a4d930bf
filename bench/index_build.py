"""``hrem-ray index`` on one process vs on Ray Data with W model replicas, in images/s.

    .venv/bin/python bench/index_build.py --images 2000 --workers 2

The tiny model (``hrem_ray.testing``) on a synthetic test split of IMAGES images of 36
regions; both builds encode the same batches and are checked byte-identical. The Ray figure
counts the build from its start (actors loading the model included), not ``ray.init``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from hrem_ray.backbone import write_tiny_bert
from hrem_ray.cli import main as cli
from hrem_ray.index.distributed import build_gallery_distributed
from hrem_ray.index.gallery import CAPTION_EMBS, IMAGE_EMBS, build_gallery
from hrem_ray.testing import TINY_MODEL


def run(images: int, workers: int, batch_size: int) -> dict:
    import ray

    load_before = os.getloadavg()[0]  # other jobs on the machine move both figures
    root = Path(tempfile.mkdtemp(prefix="bench-index-"))
    bert = write_tiny_bert(root / "bert")
    data, ckpt = root / "data", root / "ckpt"
    cli(["synth", "--out", str(data), "--train-images", "5", "--dev-images", "5",
         "--test-images", str(images), "--regions", "36", "--dim", "24"])  # fmt: skip
    cli(["init-checkpoint", "--out", str(ckpt), "--bert-path", str(bert), *TINY_MODEL])
    start = time.perf_counter()
    build_gallery(ckpt, data, "f30k", "test", root / "single", batch_size=batch_size)
    single_s = time.perf_counter() - start
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        build_gallery_distributed(ckpt, data, "f30k", "test", root / "ray", num_workers=workers,
                                  batch_size=batch_size, progress=print)  # fmt: skip
        ray_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    same = all((root / "single" / f).read_bytes() == (root / "ray" / f).read_bytes()
               for f in (IMAGE_EMBS, CAPTION_EMBS))  # fmt: skip
    return {"images": images, "workers": workers, "batch_size": batch_size,
            "single_images_per_s": images / single_s, "ray_images_per_s": images / ray_s,
            "byte_identical": same,
            "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args()
    f = run(a.images, a.workers, a.batch_size)
    print(
        f"single process: {f['single_images_per_s']:.0f} images/s; Ray Data, {a.workers} "
        f"workers: {f['ray_images_per_s']:.0f} images/s; byte-identical: {f['byte_identical']}; "
        f"load average {f['load_average'][0]} -> {f['load_average'][1]}"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(f, indent=2))


if __name__ == "__main__":
    main()
