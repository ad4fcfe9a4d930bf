"""Training throughput and data-wait: the plain loop against Ray Train with 1 and 2 workers.

    .venv/bin/python bench/train_throughput.py                    # offline MiniLM backbone
    .venv/bin/python bench/train_throughput.py --bert tiny --epochs 2 --images 500   # quick

Writes a synthetic f30k split (``--images`` train images of 36x2048 float32 features), then
trains the same model with the same global batch in each setting, torch on 1 thread per
process:

- ``plain``: ``train_local`` in this process, no Ray (``train_batches`` over the memmap);
- ``ray-1w`` / ``ray-2w``: ``build_trainer`` + ``fit`` (Ray Data ``pairs_dataset``,
  ``shard_batches`` per worker, DDP and the global-batch all-gather with 2 workers).

The figures are the LAST epoch's ``samples_per_s`` and ``data_wait_frac`` from ``train_epoch``
(the first includes warm-up); for Ray runs they come from the epoch history saved with the final
checkpoint (rank 0). A worker counts its own samples, so with ``n`` workers the global rate is
rank 0's times ``n`` (every rank takes the same number of equal batches). Data-wait is the share
of the epoch spent waiting for the next batch (gather, augmentation, Ray Data iteration).

Denormal floats: after the first epoch, CPU steps of this model ran 2x slower (6.5 s instead of
3.1 s per MiniLM step) unless ``torch.set_flush_denormal(True)``, by how much depending on the
run's trajectory. Training flushes them by default (``train.flush_denormal``);
``--keep-denormals`` turns that off to see the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hrem_ray.ray_runtime import set_env_defaults

set_env_defaults()  # before Ray or transformers start

import torch  # noqa: E402

from hrem_ray.backbone import default_bert_path, write_tiny_bert  # noqa: E402
from hrem_ray.checkpoint import load_train_state  # noqa: E402
from hrem_ray.config import HREMConfig  # noqa: E402
from hrem_ray.synth import write_synthetic  # noqa: E402

SETTINGS = ("plain", "ray-1w", "ray-2w")


@dataclass
class Row:
    setting: str
    workers: int
    samples_per_s: float
    data_wait_frac: float
    epoch_seconds: float
    history: list[dict]
    load: str = ""  # 1-minute load average before and after: other work skews wall-clock rates


def make_config(data: Path, bert: str, args: argparse.Namespace) -> HREMConfig:
    cfg = HREMConfig()
    cfg.model.bert_path = bert
    cfg.model.warmup = 0  # the relation module runs from the first step, as in a long run
    cfg.data.data_path = str(data)
    cfg.data.dataset = "f30k"
    cfg.train.epochs = args.epochs
    cfg.train.batch_size = args.batch
    cfg.train.lr_decay_epochs = []
    cfg.train.log_every = 10**9
    cfg.train.seed = args.seed
    cfg.train.flush_denormal = not args.keep_denormals
    return cfg.validate()


def run_plain(cfg: HREMConfig, out: Path) -> Row:
    from hrem_ray.train.local import train_local

    run = out / "plain"
    train_local(cfg, run, log=lambda _: None)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return _row("plain", history, 1)


def run_ray(cfg: HREMConfig, out: Path, workers: int, cpus: float) -> Row:
    import ray

    # A fresh local instance per setting (address="local": never another user's cluster).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        return _fit(cfg, out, workers, cpus)
    finally:
        ray.shutdown()


def _fit(cfg: HREMConfig, out: Path, workers: int, cpus: float) -> Row:
    import ray

    from hrem_ray.options import RayRunOptions
    from hrem_ray.train.ray_train import build_trainer

    options = RayRunOptions(
        storage_path=str(out / "ray"),
        name=f"w{workers}-{time.strftime('%H%M%S')}",  # never resume an older run
        num_workers=workers,
        cpus_per_worker=cpus,
        max_failures=0,
        keep_checkpoints=1,
    )
    result = build_trainer(cfg, options).fit()
    if result.error is not None:
        raise result.error
    history = load_train_state(result.checkpoint.path)["state"]["history"]
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)  # the trainer's placement group is released asynchronously
    return _row(f"ray-{workers}w", history, workers)


def _row(setting: str, history: list[dict], workers: int) -> Row:
    last = history[-1]
    return Row(
        setting=setting,
        workers=workers,
        samples_per_s=last["samples_per_s"] * workers,
        data_wait_frac=last["data_wait_frac"],
        epoch_seconds=last["epoch_seconds"],
        history=history,
    )


def print_table(rows: list[Row], args: argparse.Namespace, bert: str) -> None:
    plain = next((r.samples_per_s for r in rows if r.setting == "plain"), None)
    print(
        f"\n{args.images} train images ({5 * args.images} pairs), global batch {args.batch}, "
        f"{args.epochs} epochs, backbone {bert}, denormals "
        f"{'kept' if args.keep_denormals else 'flushed'}; figures of the last epoch"
    )
    print(
        f"{'setting':<8} {'samples/s':>10} {'data-wait':>10} {'epoch s':>8} {'vs plain':>9}"
        f"  {'load avg':>10}"
    )
    for r in rows:
        ratio = f"{r.samples_per_s / plain:.2f}x" if plain else "-"
        print(
            f"{r.setting:<8} {r.samples_per_s:>10.1f} {100 * r.data_wait_frac:>9.1f}% "
            f"{r.epoch_seconds:>8.1f} {ratio:>9}  {r.load:>10}"
        )
    for r in rows:
        per_epoch = ", ".join(
            f"{h['samples_per_s'] * r.workers:.1f}/s wait {100 * h['data_wait_frac']:.1f}%"
            for h in r.history
        )
        print(f"  {r.setting} per epoch: {per_epoch}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bert", default="minilm", help="minilm (offline default), tiny, or a folder")
    p.add_argument("--images", type=int, default=1000, help="synthetic train images")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="global batch in every setting")
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"subset of {SETTINGS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retries", type=int, default=1, help="re-runs of a failed Ray setting")
    p.add_argument(
        "--keep-denormals", action="store_true", help="do not flush denormals (see the docstring)"
    )
    p.add_argument("--work-dir", help="keep data and runs here (default: a temporary folder)")
    p.add_argument("--json", help="also write the figures here (bench/run_all.py)")
    args = p.parse_args()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        p.error(f"unknown settings {sorted(unknown)}; choose from {SETTINGS}")

    torch.set_num_threads(1)  # as every Ray Train worker (train_worker's torch_threads)
    with tempfile.TemporaryDirectory(prefix="hrem-bench-") as tmp:
        out = Path(args.work_dir or tmp).resolve()
        out.mkdir(parents=True, exist_ok=True)
        data = out / "data"
        if not (data / "f30k_precomp" / "train_ims.npy").is_file():
            write_synthetic(
                data, train_images=args.images, dev_images=100, test_images=100, progress=None
            )
        if args.bert == "minilm":
            bert = default_bert_path()
        elif args.bert == "tiny":
            bert = str(write_tiny_bert(out / "tiny_bert"))
        else:
            bert = str(Path(args.bert).resolve())
        rows = []
        if "plain" in settings:
            started, load = time.perf_counter(), os.getloadavg()[0]
            rows.append(run_plain(make_config(data, bert, args), out / f"run-{time.time_ns()}"))
            rows[-1].load = f"{load:.1f}-{os.getloadavg()[0]:.1f}"
            print(f"plain: {time.perf_counter() - started:.0f} s", flush=True)
        os.environ.pop("RAY_ADDRESS", None)
        for s in [s for s in settings if s != "plain"]:
            workers = int(s.removeprefix("ray-").removesuffix("w"))
            for attempt in range(1 + args.retries):
                started, load = time.perf_counter(), os.getloadavg()[0]
                try:
                    row = run_ray(make_config(data, bert, args), out / f"run-{time.time_ns()}",
                                  workers, args.cpus_per_worker)  # fmt: skip
                except Exception as e:  # e.g. a `ray stop` elsewhere on a shared machine
                    print(f"{s}: attempt {attempt + 1} failed: {type(e).__name__}", flush=True)
                    if attempt == args.retries:
                        raise
                    continue
                row.load = f"{load:.1f}-{os.getloadavg()[0]:.1f}"
                rows.append(row)
                print(f"{s}: {time.perf_counter() - started:.0f} s", flush=True)
                break
        print_table(rows, args, bert if args.bert != "minilm" else "MiniLM (offline)")
    if args.json:
        keep = ("setting", "workers", "samples_per_s", "data_wait_frac", "epoch_seconds")
        with open(args.json, "w") as f:
            json.dump({"bert": args.bert, "rows": [{k: getattr(r, k) for k in keep}
                                                   for r in rows]}, f)  # fmt: skip


if __name__ == "__main__":
    main()
