"""A run's metrics: live while it goes (``LiveMetrics``: TensorBoard events and the MLflow
run), and per epoch at its end, written as JSON, CSV, TensorBoard events and a PNG.

The end-of-run files are written from the history stored with the run's latest checkpoint,
so files of resumed or restarted runs list every epoch exactly once; the live curves
skip steps they already hold (``tracking.Tracker``).
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from hrem_ray import storage, tracking
from hrem_ray.config import HREMConfig


def write_history(history: list[dict[str, Any]], out_dir: str) -> list[str]:
    """metrics.json, metrics.csv, curves.png and tensorboard/ in ``out_dir``, a local folder
    or a URI (written locally first, then each file put in place whole)."""
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    with tempfile.TemporaryDirectory(prefix="hrem-history-") as tmp:
        out = Path(tmp)
        (out / "metrics.json").write_text(json.dumps(history, indent=2))
        (out / "metrics.csv").write_text(table.getvalue())
        _plot(history, out / "curves.png")
        _tensorboard(history, out / "tensorboard")
        storage.put_files(out, out_dir)
    names = ["metrics.json", "metrics.csv", "curves.png", "tensorboard"]
    return [storage.join(out_dir, name) for name in names]


def _plot(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] + 1 for row in history]
    fig, (ax_loss, ax_rsum) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [row.get("train_loss", float("nan")) for row in history], "o-")
    ax_loss.set(xlabel="epoch", ylabel="training loss (sum over the batch)", title="loss")
    ax_rsum.plot(epochs, [row.get("rsum", float("nan")) for row in history], "o-", color="C1")
    ax_rsum.set(xlabel="epoch", ylabel="rsum", title="dev rsum")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _tensorboard(history: list[dict[str, Any]], path: Path) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(path)) as writer:
        for row in history:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, row["epoch"] + 1)


class LiveMetrics:
    """The driver's end of rank 0's live points: each goes to ``<run>/tensorboard/`` (a URI
    run's events are uploaded at every epoch) and, unless tracking is off, to the MLflow run,
    which a resumed run (``--resume``) reattaches to."""

    def __init__(self, run_dir: str, tracker: tracking.Tracker | None) -> None:
        from tensorboardX import SummaryWriter

        self.run_dir, self.tracker = run_dir, tracker
        self._tmp = tempfile.TemporaryDirectory(prefix="hrem-live-") if storage.is_remote(
            run_dir) else None  # fmt: skip
        self._events = Path(self._tmp.name) if self._tmp else Path(run_dir, "tensorboard")
        self._writer = SummaryWriter(str(self._events), filename_suffix=".live")

    @classmethod
    def open(
        cls,
        run_dir: str,
        cfg: HREMConfig,
        options: dict[str, Any],
        *,
        uri: str | None,
        data_id: str,
        workers: int,
        devices: str,
        resume: bool,
        run_name: str,
    ) -> LiveMetrics:
        """Start (or reattach to) the run's MLflow run at ``uri`` (None: tracking off) with
        the resolved config and run options as params and the run's identity as tags."""
        tracker = None
        if uri is not None:
            run_id = tracking.saved_run_id(run_dir, uri) if resume else None
            tags = tracking.run_tags(dataset=cfg.data.dataset, data_id=data_id,
                                     workers=workers, devices=devices)  # fmt: skip
            tracker = tracking.Tracker.start(uri, run_name=run_name, run_id=run_id, tags=tags)
            if run_id is None:
                tracker.set_tags({"run_dir": run_dir})
                tracker.log_params(tracking.flatten(cfg.to_dict())
                                   | tracking.flatten(options, "run."))  # fmt: skip
                tracking.save_run_ref(run_dir, tracker)
        return cls(run_dir, tracker)

    def point(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if key != "epoch":
                self._writer.add_scalar(key, value, step)
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)
        if "epoch" in metrics:  # an epoch's end: its events reach a URI run now
            self._publish()

    def finish(self, best: str | None, files: list[str], status: str = "FINISHED") -> None:
        """Close the events; record the best checkpoint by URI and the metrics files."""
        self._writer.close()
        self._publish()
        if self._tmp:
            self._tmp.cleanup()
        if self.tracker is not None:
            if best is not None:
                self.tracker.set_tags({"best_checkpoint": best})
            self.tracker.log_artifacts(files)
            self.tracker.end(status)

    def _publish(self) -> None:
        self._writer.flush()
        if self._tmp:
            storage.put_files(self._events, storage.join(self.run_dir, "tensorboard"))
