"""Ingest: what the training source delivers to one train worker, epoch by epoch, from a precomp
folder (memory map), local shards and shards in S3 (moto behind a byte-counting proxy), with a
node cache that holds the split and one that holds half of it.

    .venv/bin/python bench/ingest.py                          # about 6 minutes on 2 CPUs
    .venv/bin/python bench/ingest.py --images 400 --no-train  # delivery only, quick

Writes a synthetic f30k train split of ``--images`` images of 36x2048 float32 features, shards
it into a local folder and a bucket, then, in one run, for each source:

- **delivery**: a Ray actor (one "train worker", 0.5 CPU) reads the token rows from Ray Data
  once, then draws ``--epochs`` epochs of augmented batches of ``--batch`` pairs
  (``TrainingSource.batches``) and does nothing else: pairs/s and the first-batch wait of every
  epoch, and the bytes the S3 server sent in each epoch, counted at the proxy. Epoch 1 of the
  S3 source starts with an empty node cache (cold: a train worker starts the download while
  it builds its model, which the actor does not), later epochs find it filled (warm). Warm
  figures are the mean of epochs 2 on; cold is compared with the memory map's epoch 1.
- **object store**: the MB/s the S3 server delivers the split at, downloaded as the cache
  does, and the bound it puts on a cold epoch.
- **copies**: what one pair costs per step of the path (read from the cache file into the batch,
  region dropout and padding, tokens) against putting the same rows into Ray's object store,
  the copy a pipeline that moves features through Ray Data pays at least once.
- **data-wait** (unless ``--no-train``): ``train_ray`` with 1 worker, 2 epochs of
  ``--train-images`` images with the offline MiniLM backbone: the share of each epoch the loop
  waited for its next batch, and the first-batch wait of each epoch.
- **memory**: the peak RssAnon of every process of the machine but the S3 server's.

Targets: warm shards (local or S3) reach 90% of the memory map's pairs/s and a cold cache 60%;
an epoch reads at most 1.05x the split from the object store when the cache holds it, and the
next epoch reads nothing; epoch 2 waits at most 0.5 s for its first batch; no process's
RssAnon exceeds 3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from hrem_ray.synth import write_synthetic  # noqa: E402
from hrem_ray.testing import start_moto, stop_group  # noqa: E402
from hrem_ray.testing.s3proxy import FaultProxy  # noqa: E402

BUCKET = "bench"
TARGETS = {"warm": 0.9, "cold": 0.6, "read_x": 1.05, "wait2_s": 0.5, "rss_gb": 3.0}


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


@ray.remote(num_cpus=0.5)
class Consumer:
    """One train worker's view of the data: the token rows once, then epochs of batches."""

    def __init__(self, cfg: dict, cache: str) -> None:
        import torch

        os.environ["HREM_CACHE"] = cache  # a cold node cache of this source's own
        from hrem_ray.data.ray_data import pairs_dataset
        from hrem_ray.data.source import open_source, token_lookup
        from hrem_ray.data.tokenize import CaptionTokenizer

        torch.set_num_threads(1)
        c = self.cfg = HREMConfig.from_dict(cfg)
        self.source = open_source(c.data.data_path, c.data.dataset, "train", c.data.cache_limit)
        self.tokenizer = CaptionTokenizer.from_dir(c.model.bert_path, max_tokens=c.data.max_tokens)
        ds = pairs_dataset(self.source.caps_path, self.source.n_captions, c.model.bert_path,
                           c.data.max_tokens)  # fmt: skip
        self.tokens = token_lookup(ds.iter_batches(batch_format="numpy"), self.source.n_captions)

    def describe(self) -> str:
        return self.source.describe()

    def epoch(self, epoch: int) -> dict:
        fetched = self.source.bytes_fetched
        start, pairs, first = time.perf_counter(), 0, None
        batch = self.cfg.train.batch_size
        for b in self.source.batches(self.tokens, self.tokenizer, batch, seed=0, epoch=epoch):
            pairs += len(b)
            first = first or time.perf_counter() - start
        seconds = time.perf_counter() - start
        return {"pairs": pairs, "seconds": seconds, "first_s": first,
                "pairs_per_s": pairs / seconds,
                "fetched": self.source.bytes_fetched - fetched}  # fmt: skip

    def copies(self, steps: int) -> dict:
        """Microseconds per pair of each copy on the path, and of an object-store put."""
        import numpy as np

        from hrem_ray.data.batches import _dropout_and_pad, collate

        plan = self.source.plan(self.cfg.train.batch_size, seed=0, epoch=99)[:steps]
        rng = np.random.default_rng(0)
        t = dict.fromkeys(("read", "dropout_pad", "collate", "object_store_put"), 0.0)
        for ids in plan:
            a = time.perf_counter()
            feats = self.source.gather(ids // 5)
            b = time.perf_counter()
            _dropout_and_pad(feats, rng, 0.8)
            c = time.perf_counter()
            collate(feats, self.tokens(ids), ids, self.tokenizer, train=True, rng=rng)
            d = time.perf_counter()
            ref = ray.put(feats)
            e = time.perf_counter()
            del ref
            t["read"] += b - a
            t["dropout_pad"] += c - b
            t["collate"] += d - c
            t["object_store_put"] += e - d
        pairs = plan.size
        return {k: 1e6 * v / pairs for k, v in t.items()}


def config(data_path: str, bert: str, batch: int, cache_limit: str = "auto") -> dict:
    cfg = HREMConfig()
    cfg.data.data_path, cfg.data.dataset, cfg.data.cache_limit = data_path, "f30k", cache_limit
    cfg.model.bert_path = bert
    cfg.train.batch_size, cfg.train.epochs, cfg.train.log_every = batch, 1, 10_000
    return cfg.to_dict()


def delivery(sources: dict, bert: str, a: argparse.Namespace, proxy: FaultProxy) -> list[dict]:
    rows = []
    for name, (path, limit, split_bytes) in sources.items():
        with PeakRss() as rss:
            cache = str(Path(os.environ["HREM_CACHE"]) / name.replace(" ", "-").replace("/", ""))
            consumer = Consumer.remote(config(path, bert, a.batch, limit), cache)
            where = ray.get(consumer.describe.remote())
            epochs = []
            for e in range(a.epochs):
                proxy.reset_counters()
                row = ray.get(consumer.epoch.remote(e))
                row["read_x"] = proxy.bytes_down / split_bytes if path.startswith("s3") else 0
                row["fetched_x"] = row.pop("fetched") / split_bytes  # the cache's own count
                epochs.append(row)
                print(f"{name} epoch {e + 1}: {row['pairs_per_s']:.0f} pairs/s, first batch "
                      f"{row['first_s']:.2f} s, read {row['read_x']:.2f}x the split (the "
                      f"cache counted {row['fetched_x']:.2f}x)", flush=True)  # fmt: skip
            copies = ray.get(consumer.copies.remote(a.copy_steps)) if name == "memmap" else None
        ray.kill(consumer)
        gb, process = rss.largest()
        rows.append({"source": name, "describe": where, "epochs": epochs, "copies": copies,
                     "rss_gb": gb, "rss_process": process})  # fmt: skip
    return rows


def data_wait(sources: dict, bert: str, work: Path) -> list[dict]:
    from hrem_ray.checkpoint import load_train_state
    from hrem_ray.options import RayRunOptions
    from hrem_ray.storage import fetch_dir
    from hrem_ray.train.ray_train import train_ray

    rows = []
    for name, (path, limit, _) in sources.items():
        cfg = HREMConfig.from_dict(config(path, bert, 64, limit))
        cfg.train.epochs = 2
        options = RayRunOptions(storage_path=str(work / "runs"), name=f"wait-{name}",
                                num_workers=1, cpus_per_worker=0.5, max_failures=0)  # fmt: skip
        with PeakRss() as rss:
            best = train_ray(cfg, options, log=lambda _: None)
        history = load_train_state(fetch_dir(best))["state"]["history"]
        gb, process = rss.largest()
        row = {"source": name, "epochs": [
            {"data_wait_frac": h["data_wait_frac"], "first_batch_s": h["first_batch_s"],
             "step_s": h["epoch_seconds"] / max(h["steps"], 1)} for h in history],
            "rss_gb": gb, "rss_process": process}  # fmt: skip
        rows.append(row)
        parts = [f"epoch {i + 1} data-wait {100 * e['data_wait_frac']:.2f}% (first batch "
                 f"{e['first_batch_s']:.2f} s)" for i, e in enumerate(row["epochs"])]  # fmt: skip
        print(f"training {name}: " + ", ".join(parts), flush=True)
    return rows


def warm(epochs: list[dict]) -> float:
    """Pairs/s of the warm epochs (2 on), their mean: one epoch of a small split is noisy."""
    return sum(e["pairs_per_s"] for e in epochs[1:]) / len(epochs[1:])


def link_rate(uri: str, work: Path) -> float:
    """MB/s the object store delivers a split's shards at, downloaded as the cache does
    (``FETCHERS`` at once): what bounds a cold epoch."""
    from concurrent.futures import ThreadPoolExecutor

    from hrem_ray import storage
    from hrem_ray.data.shards import open_sharded
    from hrem_ray.data.source import FETCHERS

    split = open_sharded(uri, "f30k", "train")
    start = time.perf_counter()
    with ThreadPoolExecutor(FETCHERS) as pool:
        sizes = pool.map(lambda s: storage.download(split.path(s), work / f"link-{s.file}")["size"],
                         split.shards)  # fmt: skip
        total = sum(sizes)
    return total / 1e6 / (time.perf_counter() - start)


def verdicts(deliver: list[dict], wait: list[dict]) -> list[tuple[str, str, bool]]:
    by = {r["source"]: r["epochs"] for r in deliver}
    base = warm(by["memmap"])
    out = []
    for name in ("local shards", "S3 shards"):
        ratio = warm(by[name]) / base
        out.append((f"warm {name} >= {TARGETS['warm']:.0%} of memmap pairs/s", f"{ratio:.0%}",
                    ratio >= TARGETS["warm"]))  # fmt: skip
    cold = by["S3 shards"][0]["pairs_per_s"] / by["memmap"][0]["pairs_per_s"]
    out.append((f"cold S3 cache >= {TARGETS['cold']:.0%} of memmap pairs/s (epoch 1 each)",
                f"{cold:.0%}", cold >= TARGETS["cold"]))  # fmt: skip
    s3 = by["S3 shards"]
    out.append((f"S3 epoch 1 reads <= {TARGETS['read_x']}x the split", f"{s3[0]['read_x']:.3f}x",
                s3[0]["read_x"] <= TARGETS["read_x"]))  # fmt: skip
    later = max(e["read_x"] for e in s3[1:])
    out.append(("S3 epoch 2 reads nothing", f"{later:.3f}x", later == 0))
    waits = [e["first_s"] for r in deliver for e in r["epochs"][1:]]
    waits += [e["first_batch_s"] for r in wait for e in r["epochs"][1:]]
    out.append((f"epoch 2 first-batch wait <= {TARGETS['wait2_s']} s", f"{max(waits):.2f} s",
                max(waits) <= TARGETS["wait2_s"]))  # fmt: skip
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
    p.add_argument("--epochs", type=int, default=3, help="delivery epochs per source (>= 2)")
    p.add_argument("--copy-steps", type=int, default=10, help="steps timed for the copies")
    p.add_argument("--bert", default="minilm", help="minilm (offline default), tiny, a folder")
    p.add_argument("--no-train", action="store_true", help="skip the data-wait runs")
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args()
    if a.epochs < 2:
        p.error("--epochs must be >= 2: epoch 2 is the warm cache")

    from hrem_ray.ray_runtime import free_port

    work = Path(tempfile.mkdtemp(prefix="hrem-ingest-"))
    os.environ["HREM_CACHE"] = str(work / "cache")  # cold node caches for this run
    port = free_port()
    moto = start_moto(port)
    PeakRss.exclude = {moto.pid, *(c.pid for c in psutil.Process(moto.pid).children(True))}
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    try:
        with FaultProxy("127.0.0.1", port, seed=0, reset=0.0, delay=0.0) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
            import boto3

            boto3.client("s3").create_bucket(Bucket=BUCKET)
            bert = str(default_bert_path()) if a.bert == "minilm" else a.bert
            if a.bert == "tiny":
                bert = str(write_tiny_bert(work / "bert"))
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            load = [os.getloadavg()[0]]
            sources = _sources(work, a, a.images, "d")
            deliver = delivery(sources, bert, a, proxy)
            link = link_rate(sources["S3 shards"][0], work)
            trained = {k: v for k, v in _sources(work, a, a.train_images, "w").items()
                       if "1/2" not in k} if not a.no_train else {}  # fmt: skip
            wait = data_wait(trained, bert, work) if trained else []
            load.append(os.getloadavg()[0])
        from hrem_ray.data.source import FETCHERS

        results = {"args": vars(a), "delivery": deliver, "data_wait": wait,
                   "verdicts": verdicts(deliver, wait), "load": load, "link_mb_s": link,
                   "split_bytes": sources["S3 shards"][2], "fetchers": FETCHERS}  # fmt: skip
        print_table(results)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        stop_group(moto)
        shutil.rmtree(work, ignore_errors=True)


def _sources(work: Path, a: argparse.Namespace, images: int, tag: str) -> dict:
    """The same synthetic split four ways: name -> (data path, cache limit, split bytes)."""
    src = work / f"precomp-{tag}"
    write_synthetic(src, train_images=images, dev_images=20, test_images=5, progress=None)
    for split in ("train", "dev"):
        for out in (work / f"shards-{tag}", f"s3://{BUCKET}/shards-{tag}"):
            write_shards(src, "f30k", split, out, rows_per_shard=a.rows_per_shard, dtype=a.dtype)
    from hrem_ray.data.shards import open_sharded

    split_bytes = sum(s.bytes for s in open_sharded(work / f"shards-{tag}", "f30k", "train").shards)
    uri = f"s3://{BUCKET}/shards-{tag}"
    return {"memmap": (str(src), "auto", split_bytes),
            "local shards": (str(work / f"shards-{tag}"), "auto", split_bytes),
            "S3 shards": (uri, "auto", split_bytes),
            "S3 shards, cache 1/2 split": (uri, str(split_bytes // 2), split_bytes)}  # fmt: skip


def print_table(r: dict) -> None:
    a = r["args"]
    print(f"\n{a['images']} images of 36x2048 ({a['dtype']} shards of {a['rows_per_shard']}), "
          f"batch {a['batch']}, one consumer at 0.5 CPU; load average "
          f"{r['load'][0]:.1f} -> {r['load'][-1]:.1f}")  # fmt: skip
    base = warm(r["delivery"][0]["epochs"])
    n = a["epochs"]
    print("| source | " + " | ".join(f"pairs/s e{i + 1}" for i in range(n)) + " | warm vs memmap | "
          + " | ".join(f"1st batch e{i + 1}" for i in range(n)) + " | "
          + " | ".join(f"S3 read e{i + 1}" for i in range(n)) + " | peak RssAnon |")  # fmt: skip
    print("|---|" + "---:|" * (3 * n + 2))
    for d in r["delivery"]:
        e = d["epochs"]
        cells = [*(f"{x['pairs_per_s']:.0f}" for x in e), f"{warm(e) / base:.0%}",
                 *(f"{x['first_s']:.2f} s" for x in e), *(f"{x['read_x']:.2f}x" for x in e),
                 f"{d['rss_gb']:.2f} GB"]  # fmt: skip
        print(f"| {d['source']} | " + " | ".join(cells) + " |")
    copies = r["delivery"][0]["copies"]
    print("\nper pair: " + ", ".join(f"{k} {v:.0f} us" for k, v in copies.items()))
    epoch_s = r["delivery"][0]["epochs"][0]["pairs"] / base
    split_mb = r["split_bytes"] / 1e6
    bound = epoch_s / (epoch_s + split_mb / r["link_mb_s"])
    print(f"object store: {r['link_mb_s']:.0f} MB/s with {r['fetchers']} downloads at once; a "
          f"cold epoch that downloads the {split_mb:.0f} MB split before its first batch can "
          f"reach at most {bound:.0%} of the memory map's {epoch_s:.1f} s epoch")  # fmt: skip
    if r["data_wait"]:
        print(f"\nMiniLM training, 1 worker, batch 64, {a['train_images']} images:")
        print("| source | data-wait e1 | data-wait e2 | 1st batch e1 | 1st batch e2 | step | "
              "peak RssAnon |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|")
        for w in r["data_wait"]:
            e = w["epochs"]
            print(f"| {w['source']} | {e[0]['data_wait_frac']:.2%} | {e[1]['data_wait_frac']:.2%} "
                  f"| {e[0]['first_batch_s']:.2f} s | {e[1]['first_batch_s']:.2f} s "
                  f"| {e[1]['step_s']:.2f} s | {w['rss_gb']:.2f} GB |")  # fmt: skip
    print("\n| target | measured | verdict |")
    print("|---|---:|---|")
    for name, value, ok in r["verdicts"]:
        print(f"| {name} | {value} | {'PASS' if ok else 'FAIL'} |")


if __name__ == "__main__":
    main()
