"""Shuffle quality: does the windowed epoch plan of a node cache smaller than the split cost model
quality against the whole-split permutation of the memory map? (docs/data.md)

    .venv/bin/python bench/shuffle_quality.py            # about 10 minutes on 2 CPUs

Writes a synthetic f30k split (``--images`` train and 100 test images of 12x64 features), shards
its train split into an S3 bucket (moto) in ``--shards`` shards, then trains the same toy-width
model with ``train --local`` for ``--epochs`` epochs per seed, from the precomp folder (one
permutation of the split each epoch) and from the S3 shards with a node cache of half the
split (windows of ``shards // 4`` shards) and of a quarter (windows of one shard), and reports
each run's test rsum.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from hrem_ray.ray_runtime import set_env_defaults

set_env_defaults()

from hrem_ray.backbone import write_tiny_bert  # noqa: E402
from hrem_ray.cli import main as cli  # noqa: E402
from hrem_ray.data.shards import write_shards  # noqa: E402
from hrem_ray.synth import write_synthetic  # noqa: E402
from hrem_ray.testing import free_port, start_moto, stop_group  # noqa: E402

BUCKET = "quality"
MODEL = dict(img_dim=64, embed_size=32, num_heads=4, ff_dim=64, mlp_hidden=32, dropout=0.0,
             warmup=1000)  # fmt: skip
TRAIN = dict(batch_size=32, lr=2e-3, bert_lr_factor=1.0, lr_decay_epochs=[], log_every=10_000)


def run(work: Path, data: str, limit: str, seed: int, a: argparse.Namespace, bert: str) -> float:
    sets = [*(f"model.{k}={v}" for k, v in MODEL.items()),
            *(f"train.{k}={v}" for k, v in TRAIN.items()), f"data.cache_limit={limit}"]  # fmt: skip
    name = f"run-{limit}-{seed}"
    out = work / name
    cli(["train", "--local", "--data-path", data, "--dataset", "f30k", "--bert-path", bert,
         "--epochs", str(a.epochs), "--seed", str(seed), "--storage-path", str(out.parent),
         "--name", out.name, *[x for s in sets for x in ("--set", s)]])  # fmt: skip
    result = work / f"{name}.json"
    cli(["eval", "--checkpoint", str(out / "best"), "--data-path", str(work / "data"),
         "--dataset", "f30k", "--split", "test", "--json", str(result)])  # fmt: skip
    return json.loads(result.read_text())["rsum"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hrem-quality-"))
    os.environ["HREM_CACHE"] = str(work / "cache")
    port = free_port()
    moto = start_moto(port)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="q",
                      AWS_SECRET_ACCESS_KEY="q", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        write_synthetic(work / "data", train_images=a.images, dev_images=100, test_images=100,
                        regions=12, dim=64, progress=None)  # fmt: skip
        uri = f"s3://{BUCKET}/sharded"
        train = write_shards(work / "data", "f30k", "train", uri,
                             rows_per_shard=-(-a.images // a.shards))  # fmt: skip
        write_shards(work / "data", "f30k", "dev", uri, rows_per_shard=100)
        split_bytes = sum(s.bytes for s in train.shards)
        bert = str(write_tiny_bert(work / "bert"))
        sources = {"precomp (one permutation)": (str(work / "data"), "auto"),
                   f"S3, cache 1/2 (windows of {a.shards // 4} shards)": (uri, split_bytes // 2),
                   "S3, cache 1/4 (windows of 1 shard)": (uri, split_bytes // 4)}  # fmt: skip
        rows = {name: [run(work, data, str(limit), seed, a, bert) for seed in range(a.seeds)]
                for name, (data, limit) in sources.items()}  # fmt: skip
        print(f"\n{a.images} train images of 12x64 in {a.shards} shards, {a.epochs} epochs, "
              f"batch {TRAIN['batch_size']}, test rsum (100 images):")  # fmt: skip
        print("| source | " + " | ".join(f"seed {s}" for s in range(a.seeds)) + " | mean |")
        print("|---|" + "---:|" * (a.seeds + 1))
        for name, values in rows.items():
            cells = " | ".join(f"{v:.1f}" for v in values)
            print(f"| {name} | {cells} | {statistics.mean(values):.1f} |")
    finally:
        stop_group(moto)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
