"""The demo's report: one static HTML page (``report/index.html``) plus the PNGs it shows.

Built from the stage records of ``demo.json`` and the plots the commands already write
(``curves.png`` of each training run, ``sweep.png`` of the sweep), copied next to the page
so the folder can be moved or attached as it is.
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path
from typing import Any

from hrem_ray.fileio import write_text_atomic

MODELS = {  # stage -> label in the recall table
    "fresh": "freshly initialised",
    "frozen": "frozen backbone (baseline)",
    "train": "trained (Ray Train, 2 workers)",
    "sweep": "best sweep trial",
}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child, table.queries :is(td, th):last-child { text-align: left; }
tr.best td { font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; }
.hit { color: #070; }
"""


def write_report(out: Path, stages: dict[str, dict[str, Any]], profile: str) -> Path:
    """Write ``out/report/index.html`` and copy the plots it embeds; returns its path."""
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    body = [f"<h1>hrem-ray demo ({html.escape(profile)})</h1>", _timings(stages)]
    if "eval" in stages:
        body.append(_recall(stages["eval"]))
    for name, title in (("train", "Training curves"), ("frozen", "Frozen-backbone baseline")):
        if name in stages:
            png = _copy(Path(stages[name]["run"]) / "curves.png", report, f"{name}_curves.png")
            body.append(f"<h2>{title}</h2>" + _img(png, f"loss and dev rsum per epoch: {name}"))
    if "sweep" in stages:
        png = _copy(Path(stages["sweep"]["checkpoint"]).parent / "sweep.png", report, "sweep.png")
        body.append(
            "<h2>Sweep</h2>" + _trials(stages["sweep"]["trials"], stages["sweep"]["params"])
        )
        body.append(_img(png, "best dev rsum against each searched parameter"))
    if "serve" in stages:
        body.append(_queries(stages["serve"]))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>hrem-ray demo</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
    return write_text_atomic(report / "index.html", page)


def _copy(src: Path, report: Path, name: str) -> str | None:
    if not src.is_file():
        return None
    shutil.copyfile(src, report / name)
    return name


def _img(name: str | None, alt: str) -> str:
    return f"<p><img src='{name}' alt='{html.escape(alt)}'></p>" if name else "<p>(no plot)</p>"


def _table(
    head: list[str], rows: list[list[str]], classes: list[str] | None = None, kind: str = ""
) -> str:
    classes = classes or [""] * len(rows)
    th = "".join(f"<th>{h}</th>" for h in head)
    trs = "".join(
        f"<tr class='{c}'>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
        for row, c in zip(rows, classes, strict=True)
    )
    return f"<table class='{kind}'><tr>{th}</tr>{trs}</table>"


def _timings(stages: dict[str, dict[str, Any]]) -> str:
    rows = [[name, f"{s['seconds']:.0f}"] for name, s in stages.items()]
    rows.append(["total", f"{sum(s['seconds'] for s in stages.values()):.0f}"])
    return "<h2>Stages</h2>" + _table(["stage", "seconds"], rows)


def _recall(ev: dict[str, Any]) -> str:
    head = ["model", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "rsum"]
    rows, classes = [], []
    for name, label in MODELS.items():
        m = ev["test"][name]
        cells = [f"{m[d][k]:.1f}" for d in ("i2t", "t2i") for k in ("r1", "r5", "r10")]
        rows.append([label, *cells, f"{m['rsum']:.1f}"])
        classes.append("best" if name == ev["best"] else "")
    dev = ", ".join(f"{MODELS[n]} {v:.1f}" for n, v in ev["dev_rsum"].items())
    note = (
        "<p>Test split. The served model (bold) is the trained model with the highest dev "
        f"rsum ({html.escape(dev)}).</p>"
    )
    return "<h2>Recall</h2>" + _table(head, rows, classes) + note


def _trials(trials: list[dict[str, Any]], params: list[str]) -> str:
    head = ["trial", *params, "best dev rsum", "epochs run", "stopped early"]
    rows = []
    for t in trials:
        rsum = t.get("best_rsum")
        rows.append([t["trial"], *(_fmt(t.get(p)) for p in params),
                     "-" if rsum is None else f"{rsum:.1f}", str(t["epochs_run"]),
                     "yes" if t["stopped_early"] else "no"])  # fmt: skip
    return _table(head, rows)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else html.escape(str(v))


def _queries(serve: dict[str, Any]) -> str:
    parts = [f"<h2>Example queries</h2><p>Asked over HTTP at {html.escape(serve['url'])}.</p>"]
    for q in serve["queries"]:
        if q["kind"] == "text":
            title = f"text: “{html.escape(q['query'])}” (its image: {q['target']})"
            rows = [[str(i), str(h["id"]), f"{h['score']:.3f}",
                     html.escape((h.get("captions") or [""])[0])]
                    for i, h in enumerate(q["results"], 1)]  # fmt: skip
            hits = [h["id"] == q["target"] for h in q["results"]]
            head = ["rank", "image", "score", "a caption of it"]
        else:
            title = f"image {q['target']} → captions"
            rows = [[str(i), str(h["image_id"]), f"{h['score']:.3f}", html.escape(h["caption"])]
                    for i, h in enumerate(q["results"], 1)]  # fmt: skip
            hits = [h["image_id"] == q["target"] for h in q["results"]]
            head = ["rank", "image", "score", "caption"]
        parts.append(f"<h3>{title}</h3>")
        parts.append(_table(head, rows, ["hit" if h else "" for h in hits], kind="queries"))
    return "".join(parts)
