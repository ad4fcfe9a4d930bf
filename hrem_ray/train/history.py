"""Per-epoch metrics of a run, written as JSON, CSV, TensorBoard events and a PNG.

Written from the history stored with the run's latest checkpoint, so files of resumed or
restarted runs list every epoch exactly once.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from hrem_ray import storage


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
