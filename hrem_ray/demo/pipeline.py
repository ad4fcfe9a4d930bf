"""``hrem-ray demo``: from nothing to a tuned model behind an HTTP endpoint, in one command.

Every stage calls the library functions behind one of the project's commands, with configs
built here, and prints the ``hrem-ray`` command line that makes the same call (rendered from
the same config and options, so the line shown is what ran). The demo teaches the tools it
composes:

    data -> fresh -> train -> frozen -> sweep -> eval -> index -> serve (+ example queries)

Finished stages are recorded in ``<out>/demo.json`` with their timings and reused by the next
run (``--fresh`` starts over); the service is always started anew. One Ray instance, started
here, serves every Ray stage. ``report/index.html`` gathers the results.
"""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hrem_ray.config import HREMConfig
from hrem_ray.fileio import write_text_atomic
from hrem_ray.serving.client import wait_ready

STATE_FILE = "demo.json"


@dataclass(frozen=True)
class Profile:
    """Sizes of one demo flavour: the real one (MiniLM) or ``--tiny`` (CI, a tiny BERT)."""

    name: str
    train_images: int
    eval_images: int  # dev and test each
    epochs: int
    sweep_epochs: int
    sweep_samples: int
    sweep_params: dict[str, Any]
    model_sets: tuple[str, ...] = ()
    tiny_bert: bool = False
    batch_size: int = 64
    num_queries: int = 3


SWEEP_PARAMS = {  # HREM's instance-relation knobs (tune_spaces/default.yaml, fewer depths)
    "model.mask_weight": {"uniform": [0.5, 2.5]},
    "model.margin": {"uniform": [0.1, 0.4]},
    "model.num_layers_enc": {"choice": [1, 2]},
}

PROFILES = {
    "demo": Profile(
        name="demo",
        train_images=500,
        eval_images=100,
        epochs=2,
        sweep_epochs=2,
        sweep_samples=4,
        sweep_params=SWEEP_PARAMS,
        # a narrower joint space than the paper's 1024 (2x faster steps on CPU; the MiniLM
        # backbone is then most of the cost)
        model_sets=("model.embed_size=256", "model.ff_dim=512", "model.mlp_hidden=256"),
    ),
    "tiny": Profile(
        name="tiny",
        train_images=64,
        eval_images=20,
        epochs=1,
        sweep_epochs=1,
        sweep_samples=2,
        sweep_params=SWEEP_PARAMS,
        model_sets=(
            "model.embed_size=32",
            "model.num_heads=4",
            "model.ff_dim=64",
            "model.mlp_hidden=32",
            "model.dw_dim=16",
        ),  # fmt: skip
        tiny_bert=True,
        batch_size=32,
    ),
}


@dataclass
class DemoOptions:
    out: str = "work/demo"
    tiny: bool = False
    fresh: bool = False
    serve: bool = True  # keep the service up after the example queries (Ctrl-C stops it)
    port: int = 8000
    verbose: bool = False  # Ray's own logs on the console too


@dataclass
class DemoState:
    """What ``<out>/demo.json`` holds: the profile and every finished stage's record."""

    profile: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


class Demo:
    """The stages, in order; ``run()`` executes or reuses each one."""

    def __init__(self, options: DemoOptions, log: Callable[[str], None] = print):
        self.options = options
        self.profile = PROFILES["tiny" if options.tiny else "demo"]
        self.out = Path(options.out).resolve()
        self.log = log
        self.state = DemoState(self.profile.name)

    # ------------------------------------------------------------------ paths and settings

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    def bert(self) -> str:
        if self.profile.tiny_bert:
            return str(self.out / "tiny_bert")
        from hrem_ray.backbone import default_bert_path

        return default_bert_path()

    def config(self, epochs: int, *sets: str) -> HREMConfig:
        """The config every training command of the demo shares, plus ``sets``."""
        p = self.profile
        cfg = HREMConfig()
        cfg.data.data_path, cfg.data.dataset = str(self.data), "f30k"
        cfg.model.bert_path = self.bert()
        cfg.train.epochs, cfg.train.batch_size = epochs, p.batch_size
        # The relation module from the first step (the recipe waits 8,000): in 2-epoch runs
        # it learned faster (dev rsum 407 vs 354 with it switched on after epoch 1), and the
        # sweep's ASHA cut after epoch 1 then compares the relation knobs it searches.
        sets = ("model.warmup=0", "train.log_every=10", f"train.lr_decay_epochs=[{epochs + 1}]",
                *p.model_sets, *sets)  # fmt: skip
        return cfg.override(list(sets))

    def show(self, command: str, cfg: HREMConfig | None = None, **flags: Any) -> None:
        """Print the command line of the call about to run."""
        self.log("$ " + shlex.join(["hrem-ray", *command_argv(command, cfg, **flags)]))

    # ------------------------------------------------------------------ the run

    def run(self) -> None:
        _check_port_free(self.options.port)  # not after minutes of training
        self._prepare_out()
        stages: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
            ("data", "synthetic data in the precomp format", self.stage_data),
            ("fresh", "a freshly initialised model (no training)", self.stage_fresh),
            ("train", "Ray Data + Ray Train, 2 workers", self.stage_train),
            ("frozen", "baseline: the same training with the backbone frozen", self.stage_frozen),
            (
                "sweep",
                "Ray Tune sweep of the relation knobs (ASHA, backbone frozen)",
                self.stage_sweep,
            ),
            ("eval", "test-split recall of every model", self.stage_eval),
            ("index", "gallery of the test split for the best model", self.stage_index),
        ]
        total = len(stages) + 1
        try:
            for i, (name, title, fn) in enumerate(stages, 1):
                self._stage(i, total, name, title, fn)
            self._stage(total, total, "serve", "Ray Serve endpoint + example queries",
                        self.stage_serve, reuse=False)  # fmt: skip
            self.write_report()
            if self.options.serve:
                from hrem_ray.serving.app import wait_until_interrupted

                self.log(f"service up at {self.url}/ (search page); Ctrl-C stops it")
                wait_until_interrupted()
        finally:
            self._stop_ray()

    def _prepare_out(self) -> None:
        state_path = self.out / STATE_FILE
        if self.options.fresh and self.out.exists():
            if any(self.out.iterdir()) and not state_path.is_file():
                raise FileExistsError(f"{self.out} is not a demo folder; not deleting it")
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if state_path.is_file():
            saved = DemoState(**json.loads(state_path.read_text()))
            if saved.profile != self.profile.name:
                raise ValueError(
                    f"{self.out} holds a '{saved.profile}' demo; pass --fresh or another --out"
                )
            self.state = saved
        elif any(self.out.iterdir()):
            raise FileExistsError(f"{self.out} is not empty and holds no demo: choose --out")

    def _stage(self, i: int, total: int, name: str, title: str,
               fn: Callable[[], dict[str, Any]], reuse: bool = True) -> None:  # fmt: skip
        done = self.state.stages.get(name)
        if reuse and done is not None:
            self.log(f"== [{i}/{total}] {name}: reusing ({done['seconds']:.0f} s earlier)")
            return
        self.log(f"== [{i}/{total}] {name}: {title}")
        start = time.perf_counter()
        record = fn()
        record["seconds"] = time.perf_counter() - start
        self.state.stages[name] = record
        self._save_state()
        self.log(f"== {name} done in {record['seconds']:.0f} s")

    def _save_state(self) -> None:
        write_text_atomic(self.out / STATE_FILE, json.dumps(asdict(self.state), indent=2))

    # ------------------------------------------------------------------ stages

    def stage_data(self) -> dict[str, Any]:
        from hrem_ray.backbone import write_tiny_bert
        from hrem_ray.synth import write_synthetic

        p = self.profile
        if p.tiny_bert:
            self.show("tiny-bert", out=self.bert())
            write_tiny_bert(self.bert())
        sizes = dict(train_images=p.train_images, dev_images=p.eval_images,
                     test_images=p.eval_images)  # fmt: skip
        self.show("synth", out=str(self.data), **sizes)
        write_synthetic(self.data, **sizes, progress=None)
        return {"train_images": p.train_images, "eval_images": p.eval_images}

    def stage_fresh(self) -> dict[str, Any]:
        from hrem_ray.train.setup import init_checkpoint

        path = str(self.out / "fresh")
        cfg = self.config(self.profile.epochs)
        self.show("init-checkpoint", cfg, out=path)
        init_checkpoint(cfg, path)
        return {"checkpoint": path}

    def train_call(self, name: str, *sets: str) -> tuple[HREMConfig, dict[str, Any]]:
        """The config and run options of a training stage (an interrupted one resumes)."""
        options = dict(storage_path=str(self.runs), name=name, num_workers=2,
                       cpus_per_worker=0.5, resume=(self.runs / name).exists())  # fmt: skip
        return self.config(self.profile.epochs, *sets), options

    def _train(self, name: str, *sets: str) -> dict[str, Any]:
        from hrem_ray.options import RayRunOptions
        from hrem_ray.train.ray_train import train_ray

        self._start_ray()
        cfg, options = self.train_call(name, *sets)
        self.show("train", cfg, **options)
        best = train_ray(cfg, RayRunOptions(**options), log=self.log)
        return {"checkpoint": best, "run": str(self.runs / name)}

    def stage_train(self) -> dict[str, Any]:
        return self._train("train")

    def stage_frozen(self) -> dict[str, Any]:
        return self._train("frozen", "train.bert_lr_factor=0")

    def sweep_call(self) -> tuple[HREMConfig, dict[str, Any]]:
        """The config and sweep options of the sweep stage (its space is written first).

        The backbone is frozen: 2.4x faster steps, and in these short runs the frozen recipe
        learned faster than fine-tuning (docs/demo.md)."""
        p = self.profile
        options = dict(space=str(self.out / "space.yaml"), storage_path=str(self.runs),
                       name="sweep", num_workers=1, cpus_per_worker=0.5,
                       resume=(self.runs / "sweep").exists())  # fmt: skip
        return self.config(p.sweep_epochs, "train.bert_lr_factor=0"), options

    def stage_sweep(self) -> dict[str, Any]:
        from hrem_ray.options import RayRunOptions, SweepOptions
        from hrem_ray.tune.space import load_space
        from hrem_ray.tune.sweep import run_sweep

        self._start_ray()
        p = self.profile
        raw = {"num_samples": p.sweep_samples, "search": "random", "params": p.sweep_params,
               "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}}  # fmt: skip
        cfg, options = self.sweep_call()
        write_text_atomic(options["space"], yaml.safe_dump(raw, sort_keys=False))
        self.show("tune", cfg, **options)
        space = load_space(options.pop("space"), base=cfg)
        options = SweepOptions(run=RayRunOptions(**options))
        summary = run_sweep(cfg, space, options, log=self.log)
        return {"checkpoint": summary["best"], "trials": summary["trials"],
                "params": list(p.sweep_params)}  # fmt: skip

    def stage_eval(self) -> dict[str, Any]:
        """Test recall of the fresh, frozen-backbone, trained and sweep-best models; the
        best model (served next) is the trained one with the highest dev rsum, whichever
        recipe it came from (test is only reported, never used to choose)."""
        from hrem_ray.checkpoint import read_record
        from hrem_ray.eval.evaluate import evaluate_checkpoint

        models = {name: self.state.stages[name]["checkpoint"]
                  for name in ("fresh", "frozen", "train", "sweep")}  # fmt: skip
        trained = ("train", "frozen", "sweep")
        dev = {n: read_record(models[n])["meta"]["metrics"]["rsum"] for n in trained}
        best = max(dev, key=dev.get)
        results = {}
        for name, ckpt in models.items():
            call = dict(checkpoint=ckpt, data_path=str(self.data), dataset="f30k", split="test")
            self.show("eval", **call)
            results[name] = evaluate_checkpoint(**call)
            self.log(f"{name}: test rsum {results[name]['rsum']:.1f}")
        scores = ", ".join(f"{n} {v:.1f}" for n, v in dev.items())
        self.log(f"best model: {best} (dev rsum: {scores})")
        return {"test": results, "dev_rsum": dev, "best": best, "checkpoint": models[best]}

    def stage_index(self) -> dict[str, Any]:
        from hrem_ray.index.gallery import build_gallery

        call = dict(checkpoint=self.state.stages["eval"]["checkpoint"], data_path=str(self.data),
                    dataset="f30k", split="test", out=str(self.out / "gallery"))  # fmt: skip
        self.show("index", **call)
        build_gallery(**call)
        return {"gallery": call["out"]}

    def stage_serve(self) -> dict[str, Any]:
        from hrem_ray.serving.app import run_service

        self._start_ray()
        stages = self.state.stages
        call = dict(checkpoint=stages["eval"]["checkpoint"], gallery=stages["index"]["gallery"],
                    port=self.options.port)  # fmt: skip
        self.show("serve", **call)
        self.url = run_service(**call)
        wait_ready(self.url)
        return {"url": self.url, "queries": self.example_queries()}

    def example_queries(self) -> list[dict[str, Any]]:
        """A few test captions as text queries (is their own image found?) and one image
        query, over HTTP like any client."""
        from hrem_ray.data.precomp import open_split

        test = open_split(self.data, "f30k", "test")
        step = max(1, test.n_images // self.profile.num_queries)
        queries = []
        for image in range(0, step * self.profile.num_queries, step):
            text = test.captions[5 * image]
            hits = _post(f"{self.url}/search/text", {"query": text, "k": 5})["results"]
            queries.append({"kind": "text", "query": text, "target": image, "results": hits})
            self.log(f'text "{text}" (image {image}):')
            for rank, h in enumerate(hits, 1):
                mark = "  <- its image" if h["id"] == image else ""
                self.log(f"  {rank}. image {h['id']} score {h['score']:.3f}: "
                         f"{(h.get('captions') or [''])[0]}{mark}")  # fmt: skip
        hits = _post(f"{self.url}/search/image", {"image_id": 0, "k": 5})["results"]
        queries.append({"kind": "image", "query": "image 0", "target": 0, "results": hits})
        self.log("image 0 -> captions:")
        for rank, h in enumerate(hits, 1):
            mark = "  <- one of its captions" if h["image_id"] == 0 else ""
            self.log(f"  {rank}. {h['caption']} (score {h['score']:.3f}){mark}")
        return queries

    def write_report(self) -> None:
        from hrem_ray import tracking
        from hrem_ray.demo.report import write_report

        path = write_report(self.out, self.state.stages, self.profile.name)
        self.log(f"report: {path}")
        uri = tracking.resolve_uri(None, str(self.runs))  # where train_ray and run_sweep log
        self.log(f"runs and sweep tracked in MLflow; its UI: {tracking.ui_command(uri)}")

    # ------------------------------------------------------------------ Ray

    def _start_ray(self) -> None:
        import ray

        from hrem_ray.ray_runtime import init_ray

        if not ray.is_initialized():
            self.log("starting a local Ray instance")
            init_ray(None, verbose=self.options.verbose)

    def _stop_ray(self) -> None:
        import ray

        if ray.is_initialized():
            from ray import serve

            serve.shutdown()
            ray.shutdown()


def command_argv(command: str, cfg: HREMConfig | None = None, **flags: Any) -> list[str]:
    """``hrem-ray`` argv for a library call: the config's flags, then each keyword as
    ``--keyword value`` (True: a bare switch; False and None: left out)."""
    argv = [command, *(cfg.to_flags() if cfg is not None else [])]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def _check_port_free(port: int) -> None:
    with socket.socket() as s:
        # as servers do: connections of an earlier run in TIME_WAIT do not block the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ValueError(f"port {port} is in use: pass --port with a free one") from None


def _post(url: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_demo(options: DemoOptions, log: Callable[[str], None] = print) -> Path:
    """Run the demo; returns the report's path."""
    demo = Demo(options, log)
    demo.run()
    return demo.out / "report" / "index.html"
