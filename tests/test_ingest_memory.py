"""Streaming ingest keeps memory bounded over a region-feature file ten times the memory limit.

A sparse 30 GB ``train_ims.npy`` (102,000 images of 36x2048 float32; holes cost no disk) goes
through the real pipeline: ``pairs_dataset`` tokenises the 510,000 captions in Ray tasks, every
Ray Train worker reads all their token rows once, and two workers draw a thousand augmented
batches each from the training source, gathering their features from the file. Meanwhile a
thread samples the anonymous memory (RssAnon: the page cache that the reads fill is file-backed
and does not count) of the driver and of every process of the test's own Ray cluster, all of
which are its descendants; each peak must stay
under 3 GB.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch
from numpy.lib.format import open_memmap
from ray.train import DataConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from hrem_ray.backbone import write_tiny_bert
from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE, open_split, split_paths
from hrem_ray.data.ray_data import pairs_dataset
from hrem_ray.data.source import open_source, token_lookup
from hrem_ray.data.tokenize import CaptionTokenizer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

N_IMAGES, REGIONS, DIM = 102_000, 36, 2048  # 30.08 GB of float32
MARK_EVERY = 1_000  # these rows (and the last) hold ``image id + 1``; the rest stay holes
WORKERS, LOCAL_BATCH, STEPS = 2, 32, 1_000  # 2,000 batches, 64,000 pairs, 18.9 GB gathered
MAX_TOKENS = 32
LIMIT = 3 << 30  # bytes of RssAnon per process
WORDS = ["a", "the", "man", "dog", "cat", "two", "red", "runs", "sits", "on", "in", "park"]

# Train workers unpickle the loop below; this module is not importable there.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _marker(image_ids: np.ndarray) -> np.ndarray:
    """The value every feature of each image holds: ``id + 1`` on marked rows, else 0."""
    marked = (image_ids % MARK_EVERY == 0) | (image_ids == N_IMAGES - 1)
    return np.where(marked, image_ids + 1, 0).astype(np.float32)


def _write_split(root: Path) -> Path:
    ims, caps = split_paths(root, "big", "train")
    ims.parent.mkdir(parents=True)
    features = open_memmap(ims, mode="w+", dtype=np.float32, shape=(N_IMAGES, REGIONS, DIM))
    for image in [*range(0, N_IMAGES, MARK_EVERY), N_IMAGES - 1]:
        features[image] = image + 1
    features.flush()
    del features
    rng = np.random.default_rng(0)
    words = np.array(WORDS)[rng.integers(0, len(WORDS), size=(N_IMAGES * CAPTIONS_PER_IMAGE, 6))]
    caps.write_text("\n".join(" ".join(w) for w in words) + "\n", encoding="utf-8")
    assert ims.stat().st_size > 30e9
    assert ims.stat().st_blocks * 512 < 200e6, "the feature file should be sparse"
    return ims


def _ingest_loop(config: dict) -> None:
    """A train worker that only draws batches: no model, the real per-worker data path."""
    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    # Opening reads no feature: only what the batches need is read.
    source = open_source(config["root"], "big", "train")
    tokenizer = CaptionTokenizer.from_dir(config["bert"], max_tokens=MAX_TOKENS)
    rows = ray.train.get_dataset_shard("train").iter_batches(batch_format="numpy")
    tokens = token_lookup(rows, source.n_captions)
    seen, marked, start, first = [], 0, time.perf_counter(), None
    batches = source.batches(tokens, tokenizer, LOCAL_BATCH, seed=0, epoch=0, rank=rank,
                             workers=WORKERS)  # fmt: skip
    for _, batch in zip(range(config["steps"]), batches, strict=False):
        first = first or time.perf_counter() - start
        ids = batch.caption_ids.numpy()
        images, lengths = batch.images.numpy(), batch.image_lengths.numpy()
        expected = _marker(ids // CAPTIONS_PER_IMAGE)
        rows = np.arange(len(ids))
        # Each pair's regions come from its own image row; the padding is zeros.
        assert np.array_equal(images[rows, 0, 0], expected)
        assert np.array_equal(images[rows, lengths - 1, DIM - 1], expected)
        assert not images[lengths < images.shape[1], -1].any()
        marked += int(np.count_nonzero(expected))
        seen.append(ids)
    batches.close()
    ids = np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64)
    stats = {
        "rank": rank,
        "batches": len(seen),
        "pairs": int(ids.size),
        "marked_pairs": marked,
        "distinct_images": int(np.unique(ids // CAPTIONS_PER_IMAGE).size),
        "max_caption": int(ids.max(initial=-1)),
        "min_caption": int(ids.min(initial=N_IMAGES * CAPTIONS_PER_IMAGE)),
        "first_batch_s": round(first or 0.0, 2),
        "seconds": round(time.perf_counter() - start, 2),
    }
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(stats))
    ray.train.report({"batches": len(seen)})


def _status(pid: int) -> dict[str, str]:
    """``/proc/<pid>/status`` as a dict; empty once the process has exited."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except (FileNotFoundError, ProcessLookupError):
        return {}


def _descendants(root: int) -> list[int]:
    """Every live descendant of ``root``, from the parent ids in ``/proc/<pid>/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _name(pid: int) -> str:
    """Short process name: Ray's title (``ray::RayTrainWorker...``), binary or script."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().replace(b"\0", b" ").decode(errors="replace").split()
    except (FileNotFoundError, ProcessLookupError):
        return "?"
    if not words:
        return "?"
    name = os.path.basename(words[0])
    if name.startswith("python") and len(words) > 1:  # Ray's agents and monitors
        name = os.path.basename(words[2] if words[1] == "-m" and len(words) > 2 else words[1])
    return name[:60]


@dataclass
class Peak:
    rss_anon: int = 0
    names: set[str] = field(default_factory=set)  # Ray retitles its workers as they run


class AnonMemorySampler(threading.Thread):
    """Peak RssAnon of a process and all its descendants (an in-process Ray cluster's
    GCS, raylet, workers and agents all descend from the driver), sampled every ``interval``."""

    def __init__(self, root_pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.root = root_pid
        self.interval = interval
        self.peaks: dict[int, Peak] = {}
        self.samples = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        for pid in [self.root, *_descendants(self.root)]:
            anon = _status(pid).get("RssAnon")
            if anon is None:
                continue
            peak = self.peaks.setdefault(pid, Peak())
            peak.rss_anon = max(peak.rss_anon, int(anon.split()[0]) * 1024)
            peak.names.add(_name(pid))
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


def _table(peaks: dict[int, Peak]) -> str:
    rows = sorted(peaks.items(), key=lambda kv: -kv[1].rss_anon)
    return "\n".join(
        f"  {p.rss_anon / 2**20:8.1f} MiB  pid {pid:<7d} {', '.join(sorted(p.names))}"
        for pid, p in rows
    )


@pytest.mark.timeout(240)
def test_streaming_ingest_bounded_anon_memory(tmp_path: Path, monkeypatch) -> None:
    clock = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(what: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[what] = round(now - clock, 1)
        clock = now

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # never join someone else's cluster
    ims = _write_split(tmp_path / "data")
    bert = str(write_tiny_bert(tmp_path / "bert"))
    out = tmp_path / "stats"
    out.mkdir()
    lap("write data")
    sampler = AnonMemorySampler(os.getpid())
    sampler.start()
    # address="local": a new instance, never another user's cluster; the workers' own logs
    # (Ray Data and Train chatter) stay in the session folder.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    lap("ray.init")
    try:
        split = open_split(tmp_path / "data", "big", "train")
        ds = pairs_dataset(str(split.caps_path), split.n_captions, bert, MAX_TOKENS)
        assert ds.count() == N_IMAGES * CAPTIONS_PER_IMAGE
        del split
        lap("tokenise")
        trainer = TorchTrainer(
            _ingest_loop,
            train_loop_config={
                "root": str(tmp_path / "data"),
                "bert": bert,
                "out": str(out),
                "steps": STEPS,
            },
            scaling_config=ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name="ingest", storage_path=str(tmp_path / "runs")),
            datasets={"train": ds},
            dataset_config=DataConfig(datasets_to_split=[]),
        )
        result = trainer.fit()
        lap("fit")
        assert result.error is None
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)  # placement groups are released asynchronously
        assert ray.available_resources().get("CPU", 0) == 2, "leaked placement group"
    finally:
        sampler.stop()
        ray.shutdown()
        ims.unlink()  # drops its page cache too (up to ~14 GB of zero pages)
        lap("shutdown")

    stats = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORKERS)]
    peaks = sampler.peaks
    print(
        f"\n{sum(s['batches'] for s in stats)} batches of {LOCAL_BATCH} pairs; seconds {seconds} "
        f"({sum(seconds.values()):.1f} in all, {sampler.samples} memory samples)\nper rank: "
        f"{stats}\npeak RssAnon per process:\n{_table(peaks)}"
    )
    assert [s["batches"] for s in stats] == [STEPS] * WORKERS
    n_captions = N_IMAGES * CAPTIONS_PER_IMAGE
    # Batches sample the whole file, not just the blocks that arrive first.
    assert max(s["max_caption"] for s in stats) >= n_captions * 0.99
    assert min(s["min_caption"] for s in stats) < n_captions * 0.01
    assert all(s["distinct_images"] > 0.5 * s["pairs"] for s in stats)
    assert sum(s["marked_pairs"] for s in stats) > 10  # the content check saw non-zero rows
    names = [name for p in peaks.values() for name in p.names]
    assert sum("RayTrainWorker" in "".join(p.names) for p in peaks.values()) >= WORKERS, names
    assert any("raylet" in n for n in names) and any("gcs_server" in n for n in names), names
    over = {pid: p for pid, p in peaks.items() if p.rss_anon >= LIMIT}
    assert not over, f"processes over {LIMIT / 2**30:.0f} GiB of RssAnon:\n{_table(over)}"
