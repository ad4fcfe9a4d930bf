"""What live MLflow tracking costs: samples/s of the same run with tracking off and on.

    .venv/bin/python bench/tracking_overhead.py                        # offline MiniLM backbone
    .venv/bin/python bench/tracking_overhead.py --bert tiny --images 300   # quick

Trains the same model on the same synthetic split with ``train_local`` (the plain loop, so
the figure is not drowned in Ray's start-up), once with ``tracking_uri=None`` and once into
the embedded store, alternating ``--pairs`` times; ``train.log_every`` keeps its default
(about 20 live points an epoch, each an MLflow batch write and a TensorBoard event). The
figure is each setting's best last-epoch ``samples_per_s`` (the first epoch includes
warm-up; the best of the repeats is the least disturbed by other work on the machine),
and, measured directly, the share of the tracked runs' wall time spent inside the live
points. Target: under 2% overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from hrem_ray.ray_runtime import set_env_defaults

set_env_defaults()  # before transformers starts

import torch  # noqa: E402

from hrem_ray import tracking  # noqa: E402
from hrem_ray.backbone import default_bert_path, write_tiny_bert  # noqa: E402
from hrem_ray.config import HREMConfig  # noqa: E402
from hrem_ray.synth import write_synthetic  # noqa: E402
from hrem_ray.train.history import LiveMetrics  # noqa: E402
from hrem_ray.train.local import train_local  # noqa: E402


def make_config(data: Path, bert: str, args: argparse.Namespace) -> HREMConfig:
    cfg = HREMConfig()
    cfg.model.bert_path = bert
    cfg.model.warmup = 0  # the relation module runs from the first step, as in a long run
    cfg.data.data_path = str(data)
    cfg.train.epochs = args.epochs
    cfg.train.batch_size = args.batch
    cfg.train.lr_decay_epochs = []
    return cfg.validate()


class PointClock:
    """Wall time spent inside ``LiveMetrics.point`` (the MLflow write and the TensorBoard
    event of each live point): the overhead measured directly, which the samples/s
    comparison cannot resolve below the machine's run-to-run noise."""

    def __init__(self) -> None:
        self.seconds, self.points = 0.0, 0
        self._point = LiveMetrics.point

        def timed(live: LiveMetrics, step: int, metrics: dict[str, float]) -> None:
            start = time.perf_counter()
            self._point(live, step, metrics)
            self.seconds += time.perf_counter() - start
            self.points += 1

        LiveMetrics.point = timed


def samples_per_s(cfg: HREMConfig, runs: Path, tracked: bool) -> tuple[float, float]:
    """The last epoch's samples/s and the whole run's wall seconds."""
    run = runs / f"run-{time.time_ns()}"
    uri = tracking.resolve_uri(None, str(runs)) if tracked else None
    start = time.perf_counter()
    train_local(cfg, run, tracking_uri=uri, log=lambda _: None)
    wall = time.perf_counter() - start
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return history[-1]["samples_per_s"], wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bert", default="minilm", help="minilm (offline default), tiny, or a folder")
    p.add_argument("--images", type=int, default=300, help="synthetic train images")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pairs", type=int, default=2, help="off/on runs, alternating")
    p.add_argument("--json", help="also write the figures here (bench/run_all.py)")
    args = p.parse_args()
    torch.set_num_threads(1)  # as every Ray Train worker
    with tempfile.TemporaryDirectory(prefix="hrem-bench-") as tmp:
        out = Path(tmp)
        write_synthetic(out / "data", train_images=args.images, dev_images=50, test_images=10,
                        progress=None)  # fmt: skip
        bert = {"minilm": default_bert_path, "tiny": lambda: str(write_tiny_bert(out / "bert"))}
        bert_path = bert[args.bert]() if args.bert in bert else str(Path(args.bert).resolve())
        cfg = make_config(out / "data", bert_path, args)
        rates: dict[str, list[float]] = {"off": [], "on": []}
        clock, tracked_wall = PointClock(), 0.0
        for i in range(args.pairs):
            for setting in ("off", "on") if i % 2 == 0 else ("on", "off"):
                rate, wall = samples_per_s(cfg, out / "runs", setting == "on")
                rates[setting].append(rate)
                tracked_wall += wall if setting == "on" else 0.0
                print(f"tracking {setting}: {rate:.1f} samples/s", flush=True)
    off, on = max(rates["off"]), max(rates["on"])
    overhead = 100 * (off - on) / off
    inside = 100 * clock.seconds / tracked_wall
    print(f"\n{args.bert} BERT, {5 * args.images} pairs, batch {args.batch}, load "
          f"{os.getloadavg()[0]:.1f}\n| tracking | samples/s |\n|---|---:|\n| off | {off:.1f} |\n"
          f"| on | {on:.1f} |\noverhead from samples/s: {overhead:.2f}%; time inside the "
          f"{clock.points} live points: {clock.seconds:.2f} s of {tracked_wall:.0f} s tracked "
          f"({inside:.2f}%, {1000 * clock.seconds / max(clock.points, 1):.1f} ms a point); "
          "target < 2%")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"bert": args.bert, "off": off, "on": on,
                                               "overhead_pct": overhead,
                                               "inside_pct": inside}))  # fmt: skip


if __name__ == "__main__":
    main()
