"""Ingest: pairs/s to one train worker, data-wait share of a training step, memory, spilling,
for the memmap path and for sharded datasets on local disk and on an S3 server (moto).

    .venv/bin/python bench/ingest.py                          # about 8 minutes on 2 CPUs
    .venv/bin/python bench/ingest.py --images 400 --no-train  # delivery only, quick

Writes a synthetic f30k train split of ``--images`` images of 36x2048 float32 features, shards
it (``--rows-per-shard``, ``--dtype``) into a local folder and into a bucket of a moto server
started here, then, in one run, for each source:

- **delivery**: a Ray actor (one "train worker", 0.5 CPU) draws one epoch of augmented,
  padded batches of ``--batch`` pairs and does nothing else: pairs/s, and the time to the
  first batch. memmap = ``pairs_dataset`` + ``shard_batches`` (the default path); shards =
  ``sharded_batches`` (Ray Data read tasks, ``iter_torch_batches``).
- **data-wait** (unless ``--no-train``): ``train_ray`` with 1 worker, 1 epoch of
  ``--train-images`` images with the offline MiniLM backbone (``--bert``): the share of the
  epoch the loop waited for its next batch, and the time per step.
- **memory**: the peak RssAnon of every process of the machine but the S3 server, sampled
  every 0.2 s (the largest is reported, with its name), and the object store's spilled bytes
  (``ray memory``).

Targets: local shards reach >= 50% of the memmap path's pairs/s; data-wait from S3 stays under
5% of a MiniLM step; no process's RssAnon exceeds 3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from hrem_ray.ray_runtime import set_env_defaults

set_env_defaults()  # before Ray or transformers start

import psutil  # noqa: E402
import ray  # noqa: E402

from hrem_ray.backbone import default_bert_path, write_tiny_bert  # noqa: E402
from hrem_ray.config import HREMConfig  # noqa: E402
from hrem_ray.data.shards import write_shards  # noqa: E402
from hrem_ray.data.synth import write_synthetic  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test world: tests/helpers.py
from tests.helpers import start_moto, stop_group  # noqa: E402

BUCKET = "bench"
TARGETS = {"shards_vs_memmap": 0.5, "s3_wait": 0.05, "rss_gb": 3.0}


class PeakRss:
    """The peak RssAnon of every process on the machine while it runs (sampled), except the
    S3 server's (moto keeps every object in memory: a stand-in for S3, not part of ours)."""

    exclude: set[int] = set()

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak, self.stop = every, {}, threading.Event()

    def __enter__(self) -> PeakRss:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            for p in psutil.process_iter(["pid", "name", "cmdline"]):
                rss = None if p.info["pid"] in self.exclude else _rss_anon(p.info["pid"])
                if rss is not None:
                    name = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])[:60]
                    key = (p.info["pid"], name)
                    self.peak[key] = max(self.peak.get(key, 0), rss)

    def largest(self) -> tuple[float, str]:
        (pid, name), rss = max(self.peak.items(), key=lambda kv: kv[1])
        return rss / 2**30, f"{name} (pid {pid})"


def _rss_anon(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def spilled_mib() -> float:
    """MiB the object store has spilled to disk so far (``ray memory --stats-only``)."""
    from ray._private.internal_api import memory_summary

    address = ray.get_runtime_context().gcs_address
    found = re.search(r"Spilled (\d+) MiB", memory_summary(address, stats_only=True))
    return float(found.group(1)) if found else 0.0


@ray.remote(num_cpus=0.5)
class Consumer:
    """One train worker's view of the data: draw an epoch of batches, time it."""

    def epoch(self, source: str, cfg: dict, batch: int) -> dict:
        import torch

        from hrem_ray.data.ray_data import pairs_dataset, shard_batches, sharded_batches
        from hrem_ray.data.shards import ShardedSplit, open_training_split
        from hrem_ray.data.tokenize import CaptionTokenizer

        torch.set_num_threads(1)
        c = HREMConfig.from_dict(cfg)
        split = open_training_split(c.data.data_path, c.data.dataset, "train")
        start = time.perf_counter()
        if isinstance(split, ShardedSplit):
            batches = sharded_batches(split, c.model.bert_path, c.data.max_tokens, batch,
                                      seed=0, epoch=0, rank=0, workers=1)  # fmt: skip
        else:
            tok = CaptionTokenizer.from_dir(c.model.bert_path, max_tokens=c.data.max_tokens)
            ds = pairs_dataset(split, c.model.bert_path, c.data.max_tokens)
            steps = split.n_captions // batch
            batches = shard_batches(ds.iterator(), split, tok, batch, steps, seed=0, epoch=0,
                                    rank=0)  # fmt: skip
        pairs, first = 0, None
        for b in batches:
            pairs += len(b)
            first = first or time.perf_counter() - start
        seconds = time.perf_counter() - start
        steady = (pairs - batch) / (seconds - first) if seconds > first else float("nan")
        return {"source": source, "pairs": pairs, "seconds": seconds, "first_s": first,
                "pairs_per_s": pairs / seconds, "steady_per_s": steady}  # fmt: skip


def config(data_path: str, bert: str, batch: int) -> dict:
    cfg = HREMConfig()
    cfg.data.data_path, cfg.data.dataset = data_path, "f30k"
    cfg.model.bert_path = bert
    cfg.train.batch_size, cfg.train.epochs, cfg.train.log_every = batch, 1, 10_000
    return cfg.to_dict()


def delivery(sources: dict[str, str], bert: str, batch: int) -> list[dict]:
    rows = []
    for name, path in sources.items():
        consumer = Consumer.remote()
        spilled = spilled_mib()
        with PeakRss() as rss:
            row = ray.get(consumer.epoch.remote(name, config(path, bert, batch), batch))
        row["rss_gb"], row["rss_process"] = rss.largest()
        row["spilled_mib"] = spilled_mib() - spilled
        ray.kill(consumer)
        rows.append(row)
        print(f"delivery {name}: {row['pairs_per_s']:.0f} pairs/s, first batch "
              f"{row['first_s']:.1f} s, peak RssAnon {row['rss_gb']:.2f} GB "
              f"({row['rss_process']}), spilled {row['spilled_mib']:.0f} MiB")  # fmt: skip
    return rows


def data_wait(sources: dict[str, str], bert: str, batch: int, work: Path) -> list[dict]:
    from hrem_ray.checkpoint import load_train_state
    from hrem_ray.storage import fetch_dir
    from hrem_ray.train.ray_train import RayRunOptions, train_ray

    rows = []
    for name, path in sources.items():
        cfg = HREMConfig.from_dict(config(path, bert, batch))
        options = RayRunOptions(storage_path=str(work / "runs"), name=f"wait-{name}",
                                num_workers=1, cpus_per_worker=0.5, max_failures=0)  # fmt: skip
        with PeakRss() as rss:
            best = train_ray(cfg, options, log=lambda _: None)
        h = load_train_state(fetch_dir(best))["state"]["history"][-1]
        seconds, first = h["epoch_seconds"], h["first_batch_s"]
        steady = (h["data_wait_frac"] * seconds - first) / (seconds - first)
        row = {"source": name, "data_wait_frac": h["data_wait_frac"], "first_batch_s": first,
               "steady_wait_frac": steady, "step_s": seconds / max(h["steps"], 1),
               "steps": h["steps"]}  # fmt: skip
        row["rss_gb"], row["rss_process"] = rss.largest()
        rows.append(row)
        print(
            f"training {name}: data-wait {100 * row['data_wait_frac']:.2f}% of "
            f"{row['step_s']:.2f} s steps, peak RssAnon {row['rss_gb']:.2f} GB",
            flush=True,
        )
    return rows


def verdicts(deliver: list[dict], wait: list[dict]) -> list[tuple[str, str, bool]]:
    by = {r["source"]: r for r in deliver}
    ratio = by["local shards"]["pairs_per_s"] / by["memmap"]["pairs_per_s"]
    out = [(f"local shards >= {TARGETS['shards_vs_memmap']:.0%} of memmap pairs/s",
            f"{ratio:.0%}", ratio >= TARGETS["shards_vs_memmap"])]  # fmt: skip
    waits = {r["source"]: r for r in wait}
    if "S3 shards" in waits:
        w, limit = waits["S3 shards"], TARGETS["s3_wait"]
        out.append((f"S3 data-wait < {limit:.0%} of the epoch", f"{w['data_wait_frac']:.2%}",
                    w["data_wait_frac"] < limit))  # fmt: skip
        out.append((f"S3 data-wait < {limit:.0%} after the 1st batch",
                    f"{w['steady_wait_frac']:.2%}", w["steady_wait_frac"] < limit))  # fmt: skip
    peak = max(r["rss_gb"] for r in deliver + wait)
    out.append((f"every process's RssAnon < {TARGETS['rss_gb']:.0f} GB", f"{peak:.2f} GB",
                peak < TARGETS["rss_gb"]))  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="train images for delivery")
    p.add_argument("--train-images", type=int, default=200, help="train images for data-wait")
    p.add_argument("--rows-per-shard", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--bert", default="minilm", help="minilm (offline default), tiny, a folder")
    p.add_argument("--no-train", action="store_true", help="skip the data-wait runs")
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args()

    from hrem_ray.ray_runtime import free_port

    work = Path(tempfile.mkdtemp(prefix="hrem-ingest-"))
    port = free_port()
    moto = start_moto(port)
    PeakRss.exclude = {moto.pid, *(c.pid for c in psutil.Process(moto.pid).children(True))}
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        bert = str(default_bert_path()) if a.bert == "minilm" else a.bert
        if a.bert == "tiny":
            bert = str(write_tiny_bert(work / "bert"))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        load = [os.getloadavg()[0]]
        deliver = delivery(_sources(work, a, a.images, "d"), bert, a.batch)
        wait = [] if a.no_train else data_wait(
            _sources(work, a, a.train_images, "w"), bert, 64, work
        )  # fmt: skip
        load.append(os.getloadavg()[0])
        results = {"args": vars(a), "delivery": deliver, "data_wait": wait,
                   "verdicts": verdicts(deliver, wait), "load": load}  # fmt: skip
        print_table(results)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        stop_group(moto)
        shutil.rmtree(work, ignore_errors=True)


def _sources(work: Path, a: argparse.Namespace, images: int, tag: str) -> dict[str, str]:
    """The same synthetic split three ways: precomp folder, local shards, S3 shards."""
    src = work / f"precomp-{tag}"
    write_synthetic(src, train_images=images, dev_images=20, test_images=5, progress=None)
    for split in ("train", "dev"):
        for out in (work / f"shards-{tag}", f"s3://{BUCKET}/shards-{tag}"):
            write_shards(src, "f30k", split, out, rows_per_shard=a.rows_per_shard, dtype=a.dtype)
    return {"memmap": str(src), "local shards": str(work / f"shards-{tag}"),
            "S3 shards": f"s3://{BUCKET}/shards-{tag}"}  # fmt: skip


def print_table(r: dict) -> None:
    a = r["args"]
    print(f"\n{a['images']} images of 36x2048 ({a['dtype']} shards of {a['rows_per_shard']}), "
          f"batch {a['batch']}, one consumer at 0.5 CPU; load average "
          f"{r['load'][0]:.1f} -> {r['load'][-1]:.1f}")  # fmt: skip
    print("| source | pairs/s (epoch) | vs memmap | after 1st batch | first batch | "
          "peak RssAnon | spilled |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = r["delivery"][0]["pairs_per_s"]
    for d in r["delivery"]:
        print(f"| {d['source']} | {d['pairs_per_s']:.0f} | {d['pairs_per_s'] / base:.0%} | "
              f"{d['steady_per_s']:.0f} | {d['first_s']:.1f} s | {d['rss_gb']:.2f} GB | "
              f"{d['spilled_mib']:.0f} MiB |")  # fmt: skip
    if r["data_wait"]:
        print(f"\nMiniLM training, 1 worker, batch 64, {a['train_images']} images:")
        print("| source | data-wait | after 1st batch | 1st batch | step | peak RssAnon |")
        print("|---|---:|---:|---:|---:|---:|")
        for w in r["data_wait"]:
            print(
                f"| {w['source']} | {w['data_wait_frac']:.2%} | {w['steady_wait_frac']:.2%} "
                f"| {w['first_batch_s']:.1f} s | {w['step_s']:.2f} s | {w['rss_gb']:.2f} GB |"
            )
    print("\n| target | measured | verdict |")
    print("|---|---:|---|")
    for name, value, ok in r["verdicts"]:
        print(f"| {name} | {value} | {'PASS' if ok else 'FAIL'} |")


if __name__ == "__main__":
    main()
