"""``hrem-ray``: one command line over the library's plain functions.

Each sub-command parses arguments and calls one function; errors a user can fix (bad
arguments, missing or malformed files) end in a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from hrem_ray.errors import one_line
from hrem_ray.index.faiss_index import DEFAULT_EF_SEARCH, DEFAULT_NPROBE, DEFAULT_REFINE, SPEC_HELP
from hrem_ray.options import (
    CLI_FLAGS,
    DATASETS,
    FEATURE_DTYPES,
    SWEEP_RUN_SKIPS,
    EncodeOptions,
    FailoverOptions,
    RayRunOptions,
    SweepOptions,
    add_config_flags,
    add_flags,
    from_args,
)

# One line per problem a user can fix; anything else is a bug and keeps its traceback.
ADDRESS_HELP = (
    "Ray cluster to join; default: RAY_ADDRESS, else a new local instance ('auto': the "
    "cluster started with `ray start` on this machine)"
)
VERBOSE_HELP = "also show Ray's own logs (default: they stay in /tmp/ray/session_latest/logs)"
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def _log(msg: str) -> None:
    print(msg, flush=True)


def cmd_synth(a: argparse.Namespace) -> None:
    from hrem_ray.synth import write_synthetic

    folder = write_synthetic(
        a.out, dataset=a.dataset, train_images=a.train_images, dev_images=a.dev_images,
        test_images=a.test_images, regions=a.regions, dim=a.dim, seed=a.seed, progress=_log,
    )  # fmt: skip
    _log(f"wrote {folder}")


def cmd_tiny_bert(a: argparse.Namespace) -> None:
    from hrem_ray.backbone import write_tiny_bert

    out = write_tiny_bert(
        a.out,
        hidden=a.hidden,
        layers=a.layers,
        heads=a.heads,
        intermediate=a.intermediate,
        seed=a.seed,
    )
    _log(f"wrote {out}")


def _config(a: argparse.Namespace):
    """``--config``, then the dedicated flags (``CLI_FLAGS``), then ``--set`` overrides."""
    from hrem_ray.config import load_config

    sets = []
    for key in CLI_FLAGS:
        value = getattr(a, key.partition(".")[2], None)
        if value is not None:
            sets.append(f"{key}={value}")
    return load_config(getattr(a, "config", None), sets + list(getattr(a, "set", None) or []))


def cmd_init_checkpoint(a: argparse.Namespace) -> None:
    from hrem_ray.train.setup import init_checkpoint

    _log(f"wrote {init_checkpoint(_config(a), a.out, pretrained=not a.random_bert)}")


def cmd_import_checkpoint(a: argparse.Namespace) -> None:
    from hrem_ray.authors_import import import_authors_checkpoint

    _log(f"wrote {import_authors_checkpoint(a.src, a.bert_path, a.out)}")


def cmd_check_data(a: argparse.Namespace) -> None:
    from hrem_ray.data.source import open_source

    for split in a.split or ["train", "dev", "test"]:
        source = open_source(a.data_path, a.dataset, split)
        source.check(progress=_log)
        _log(f"{source.describe()}: ok")


def cmd_shard(a: argparse.Namespace) -> None:
    from hrem_ray.data.shards import write_shards

    split = write_shards(
        a.data_path, a.dataset, a.split, a.out, rows_per_shard=a.rows_per_shard,
        dtype=a.dtype, progress=_log,
    )  # fmt: skip
    size = sum(s.bytes for s in split.shards) / 2**20
    _log(f"wrote {split.root}: {len(split.shards)} shards, {split.n_images} images, "
         f"{size:.1f} MiB")  # fmt: skip


def cmd_embed(a: argparse.Namespace) -> None:
    from hrem_ray.checkpoint import load_checkpoint
    from hrem_ray.data.precomp import open_features, read_captions
    from hrem_ray.devices import check_device
    from hrem_ray.embed import embed_captions, embed_features
    from hrem_ray.fileio import save_npy_atomic

    device = check_device(a.device)
    (checkpoint,) = _checkpoints(a, [a.checkpoint], one=True)
    ck = load_checkpoint(checkpoint, device=device)
    kw = dict(batch_size=a.batch_size, device=device, bf16=a.bf16, progress=_log)
    if a.images:
        embs = embed_features(ck.model, open_features(a.images), **kw)
    else:
        embs = embed_captions(ck.model, ck.tokenizer(), read_captions(a.captions), **kw)
    save_npy_atomic(a.out, embs)
    _log(f"wrote {a.out}: {embs.shape[0]} x {embs.shape[1]} float32")


def cmd_eval(a: argparse.Namespace) -> None:
    from hrem_ray.eval.evaluate import evaluate_ensemble
    from hrem_ray.eval.metrics import format_table

    start = time.perf_counter()
    result = evaluate_ensemble(
        _checkpoints(a, a.checkpoint or []), a.data_path, a.dataset, a.split,
        sims_files=a.sims or [],
        save_to=a.save_sims, batch_size=a.batch_size, device=a.device, bf16=a.bf16,
        fold5=a.fold5, progress=_log,
    )  # fmt: skip
    _log(f"{a.dataset} {a.split} ({time.perf_counter() - start:.1f}s)")
    _log(format_table(result))
    if a.fold5:
        _log("5-fold 1K average:")
        _log(format_table(result["fold5"]))
    if a.json:
        from hrem_ray import storage

        storage.write_text(a.json, json.dumps(result, indent=2))  # a local path or a URI


def cmd_index(a: argparse.Namespace) -> None:
    from hrem_ray.index.distributed import build_gallery_distributed, wants_ray
    from hrem_ray.index.gallery import build_gallery

    if wants_ray(a.data_path, a.dataset, a.split, a.num_workers):
        from hrem_ray.ray_runtime import init_ray

        (checkpoint,) = _checkpoints(a, a.checkpoint, one=True)
        init_ray(verbose=a.verbose)
        out = build_gallery_distributed(
            checkpoint, a.data_path, a.dataset, a.split, a.out, num_workers=a.num_workers,
            num_gpus=a.num_gpus, dtype=a.dtype, batch_size=a.batch_size, bf16=a.bf16,
            index=_index_spec(a), nprobe=a.nprobe, ef_search=a.ef_search, refine=a.refine,
            progress=_log,
        )  # fmt: skip
        _log(f"wrote {out}")
        return
    out = build_gallery(
        _checkpoints(a, a.checkpoint), a.data_path, a.dataset, a.split, a.out, dtype=a.dtype,
        batch_size=a.batch_size, device=a.device, bf16=a.bf16, index=_index_spec(a),
        nprobe=a.nprobe, ef_search=a.ef_search, refine=a.refine, progress=_log,
    )  # fmt: skip
    _log(f"wrote {out}")


def _index_spec(a: argparse.Namespace) -> str:
    """``--index SPEC``, or ``--ivf N`` as its short form ``IVFN,Flat``; Flat by default."""
    if a.ivf and a.index:
        raise ValueError("give --index or its short form --ivf, not both")
    if a.ivf < 0:
        raise ValueError(f"--ivf (nlist; 0 = exact search only) must be a positive integer, "
                         f"got {a.ivf}")  # fmt: skip
    return f"IVF{a.ivf},Flat" if a.ivf else a.index or "Flat"


def _search_params(a: argparse.Namespace) -> dict[str, int]:
    """The serve flags that override the gallery's FAISS search knobs."""
    given = {"nprobe": a.nprobe, "efSearch": a.ef_search, "refine": a.refine}
    return {name: value for name, value in given.items() if value is not None}


def cmd_serve(a: argparse.Namespace) -> None:
    from hrem_ray.ray_runtime import haproxy_env, init_ray, set_env_defaults
    from hrem_ray.serving.api import check_api_key
    from hrem_ray.serving.app import run_service, wait_until_interrupted
    from hrem_ray.serving.service import check_served

    if a.num_gpus < 0:
        raise ValueError(f"--num-gpus {a.num_gpus:g}: give 0 (CPU replicas) or a GPU share > 0")
    if a.haproxy and (a.address or os.environ.get("RAY_ADDRESS")):
        raise ValueError("--haproxy applies to the Ray that serve starts; on a running cluster "
                         "set it in ray start's environment (docs/serving.md)")  # fmt: skip
    api_key = a.api_key or os.environ.get("HREM_API_KEY")
    if api_key:
        check_api_key(api_key)  # before the minutes of starting Ray
    # the models are the gallery's, in its order; a models:/ reference is resolved here to
    # check it, and again by each replica (whose /readyz then names its registry version)
    check_served(_checkpoints(a, a.checkpoint), a.gallery)
    if a.tracking_uri:
        from hrem_ray.tracking import URI_ENV

        os.environ[URI_ENV] = a.tracking_uri  # the replicas' registry, on this machine's Ray
    if a.haproxy:
        set_env_defaults(haproxy_env())  # before Ray starts: every Serve process reads it
    init_ray(a.address, verbose=a.verbose)
    url = run_service(
        a.checkpoint, a.gallery, host=a.host, port=a.port,
        api_key=api_key, min_replicas=a.min_replicas, max_replicas=a.max_replicas, check=False,
        search_params=_search_params(a), num_gpus=a.num_gpus, bf16=a.bf16,
    )  # fmt: skip
    _log(f"serving on {url} (search page at {url}/, API docs at {url}/docs); Ctrl-C stops")
    try:
        wait_until_interrupted()
    finally:
        from ray import serve

        serve.shutdown()


def _tracking_uri(a: argparse.Namespace) -> str | None:
    """The run's tracking URI, its server checked before Ray starts (None: --no-tracking)."""
    from hrem_ray import tracking

    uri = tracking.run_uri(a)
    if uri is not None:
        tracking.check_reachable(uri)
    return uri


def cmd_train(a: argparse.Namespace) -> None:
    cfg = _config(a)
    uri = _tracking_uri(a)
    if a.local:
        from hrem_ray import storage
        from hrem_ray.devices import check_device
        from hrem_ray.train.local import train_local

        check_device(a.device)

        run = storage.join(a.storage_path, a.name)
        best = train_local(cfg, run, resume=a.resume, device=a.device, tracking_uri=uri)
    else:
        from hrem_ray.ray_runtime import init_ray
        from hrem_ray.train.ray_train import train_ray

        init_ray(a.address, verbose=a.verbose)
        best = train_ray(cfg, from_args(a, RayRunOptions), log=_log)
    _log(f"best checkpoint: {best}")


def cmd_tune(a: argparse.Namespace) -> None:
    from hrem_ray.ray_runtime import init_ray
    from hrem_ray.tune.space import load_space
    from hrem_ray.tune.sweep import check_ensemble_top, max_trials, run_sweep

    for flag in ("num_samples", "max_concurrent_trials"):
        value = getattr(a, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    cfg = _config(a)
    space = load_space(a.space, base=cfg)  # fails before Ray starts
    if a.num_samples is not None:
        space.num_samples = a.num_samples
    if a.ensemble_top is not None:
        check_ensemble_top(a.ensemble_top, max_trials(space))
    options = from_args(a, SweepOptions, run=from_args(a, RayRunOptions))
    if a.register:
        from hrem_ray.registry import check_name

        check_name(a.register, a.alias)
    elif a.alias:
        raise ValueError("--alias needs --register NAME")
    _tracking_uri(a)
    init_ray(a.address, verbose=a.verbose)
    summary = run_sweep(cfg, space, options, log=_log)
    _log(f"best checkpoint: {summary['best']}")
    if a.register:  # in the store the sweep was tracked in (the same with --no-tracking)
        from hrem_ray.tracking import resolve_uri

        best = summary["ensemble"]["path"] if summary.get("ensemble") else summary["best"]
        _register(best, a.register, a.alias, resolve_uri(a.tracking_uri, a.storage_path))


def cmd_register(a: argparse.Namespace) -> None:
    _register(a.checkpoint, a.name, a.alias, a.tracking_uri)


def _register(checkpoints, name: str, alias: str | None, tracking_uri: str | None) -> None:
    from hrem_ray.registry import register

    reg = register(checkpoints, name, alias=alias, tracking_uri=tracking_uri)
    at = f" (alias {alias}: models:/{name}@{alias})" if alias else ""
    _log(f"registered models:/{name}/{reg.version}{at}: {', '.join(reg.checkpoints)}")


def _checkpoints(a: argparse.Namespace, refs: list[str], *, one: bool = False) -> list[str]:
    """``--checkpoint`` values with each ``models:/`` reference resolved (before Ray starts)."""
    from hrem_ray.registry import resolve_checkpoints

    checkpoints = list(resolve_checkpoints(refs, tracking_uri=a.tracking_uri)[0])
    if one and len(checkpoints) != 1:
        raise ValueError(f"{refs[0]} is an ensemble of {len(checkpoints)} models: embed one")
    return checkpoints


def cmd_demo(a: argparse.Namespace) -> None:
    from hrem_ray.demo.pipeline import DemoOptions, run_demo

    run_demo(DemoOptions(out=a.out, tiny=a.tiny, fresh=a.fresh, serve=not a.no_serve,
                         port=a.port, verbose=a.verbose), log=_log)  # fmt: skip


def _add_split_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-path", required=True, help="data root holding <dataset>_precomp/")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default="test")


def _add_tracking_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        help="MLflow registry of models:/ references (default: $MLFLOW_TRACKING_URI, else "
        "./runs/mlflow.db)",
    )  # fmt: skip


def _add_search_flags(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument(
        "--nprobe", type=int,
        help=f"IVF lists searched per query (default {DEFAULT_NPROBE}, capped at nlist)"
        + default_help,
    )  # fmt: skip
    p.add_argument(
        "--ef-search", type=int,
        help=f"HNSW candidates per query (default {DEFAULT_EF_SEARCH})" + default_help,
    )  # fmt: skip
    p.add_argument(
        "--refine", type=int,
        help=f"PQ candidates per query rescored exactly, the best k kept (default "
        f"{DEFAULT_REFINE})" + default_help,
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hrem-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write learnable synthetic data in the precomp format")
    p.add_argument("--out", required=True)
    p.add_argument("--dataset", choices=DATASETS, default=DATASETS[0])
    p.add_argument("--train-images", type=int, default=1000)
    p.add_argument("--dev-images", type=int, default=100)
    p.add_argument("--test-images", type=int, default=100)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "tiny-bert",
        help="write a small random BERT (tests, CI; bert-base's shape for benchmarks)",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, help="feed-forward width (default 2 x hidden)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_bert)

    p = sub.add_parser("init-checkpoint", help="a freshly initialised model as a checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--random-bert", action="store_true", help="do not load backbone weights")
    add_config_flags(p)
    p.set_defaults(func=cmd_init_checkpoint)

    p = sub.add_parser("import-checkpoint", help="convert the authors' model_best.pth")
    p.add_argument("src")
    p.add_argument("--bert-path", required=True, help="the backbone it was trained with")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_import_checkpoint)

    p = sub.add_parser(
        "check-data", help="read every feature of splits (precomp or sharded) and check them"
    )
    p.add_argument("--data-path", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", action="append", help="repeatable (default: train, dev, test)")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser(
        "shard", help="write a precomp split as a sharded dataset (local or object storage)"
    )
    p.add_argument("--data-path", required=True, help="the precomp data root")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--out", required=True,
                   help="data root (folder or URI) for OUT/<dataset>_precomp/<split>/")  # fmt: skip
    p.add_argument("--rows-per-shard", type=int,
                   help="images per shard (default 256, 75 MB of float32 36x2048)")  # fmt: skip
    p.add_argument("--dtype", choices=FEATURE_DTYPES, default=FEATURE_DTYPES[0],
                   help="stored feature type; float16 halves storage (docs/data.md)")  # fmt: skip
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("embed", help="embed region features or captions")
    p.add_argument("--checkpoint", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help=".npy of [n, regions, img_dim] features")
    src.add_argument("--captions", help="text file, one caption per line")
    p.add_argument("--out", required=True, help=".npy of [n, D] float32")
    add_flags(p, EncodeOptions())
    _add_tracking_flag(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("eval", help="R@K, medr, meanr, rsum on a precomp split")
    p.add_argument(
        "--checkpoint", action="append",
        help="a model; repeat it to evaluate the ensemble (the mean similarity matrix)",
    )  # fmt: skip
    p.add_argument("--sims", nargs="+", metavar="FILE", help="saved matrices to average in")
    p.add_argument("--save-sims", metavar="FILE", help="save the (mean) similarity matrix, .npy")
    _add_split_flags(p)
    p.add_argument("--fold5", action="store_true", help="also the COCO 5-fold 1K average")
    p.add_argument("--json", help="write the metrics here")
    add_flags(p, EncodeOptions())
    _add_tracking_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("index", help="encode a split once into a searchable gallery")
    p.add_argument(
        "--checkpoint", action="append", required=True,
        help="a model; repeat it for an ensemble gallery (scores: the models' mean)",
    )  # fmt: skip
    _add_split_flags(p)
    p.add_argument("--out", required=True, help="gallery folder")
    p.add_argument("--dtype", choices=FEATURE_DTYPES, default=FEATURE_DTYPES[0])
    add_flags(p, EncodeOptions())
    p.add_argument(
        "--index", metavar="SPEC",
        help=f"FAISS index of each side, a factory string: {SPEC_HELP} (needs "
        "hrem-ray[faiss]; docs/serving.md); default Flat: exact search only",
    )  # fmt: skip
    p.add_argument(
        "--ivf", type=int, default=0, metavar="NLIST", help="short for --index IVFNLIST,Flat"
    )
    _add_search_flags(p, "; recall@1/5/10 vs exact is measured and printed")
    p.add_argument(
        "--num-workers", type=int, metavar="N",
        help="encode on Ray Data with N model replicas (default for a sharded split: one per "
        "CPU of the cluster; docs/serving.md)",
    )  # fmt: skip
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (with Ray)")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    _add_tracking_flag(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("serve", help="Ray Serve retrieval endpoint over a gallery")
    p.add_argument(
        "--checkpoint", action="append", required=True,
        help="a model; repeat it, in the gallery's order, to serve an ensemble gallery",
    )  # fmt: skip
    p.add_argument("--gallery", required=True, help="folder written by hrem-ray index")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require this x-api-key header (or set HREM_API_KEY)")
    p.add_argument("--max-replicas", type=int, default=2)
    add_flags(p, FailoverOptions())
    p.add_argument(
        "--num-gpus", type=float, default=0.0,
        help="GPU share per replica (0.5: two replicas a card); 0, the default: CPU replicas",
    )  # fmt: skip
    _add_search_flags(p, "; default: the gallery's")
    add_flags(p, EncodeOptions(), skip=("batch_size", "device"))
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    _add_tracking_flag(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("register", help="register a checkpoint (or an ensemble) in MLflow")
    p.add_argument(
        "checkpoint", nargs="+",
        help="a checkpoint, an ensemble folder (tune --ensemble-top), or several checkpoints "
        "of an ensemble in its gallery's order; recorded by URI, never copied",
    )  # fmt: skip
    p.add_argument("--name", required=True, help="the registered model: models:/NAME/...")
    p.add_argument("--alias", help="point this alias (e.g. champion) at the new version")
    _add_tracking_flag(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("train", help="train HREM on Ray Train (or --local: one process)")
    add_flags(p, RayRunOptions())
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--local", action="store_true", help="single process, no Ray")
    p.add_argument("--device", default="cpu", help="with --local: cpu or cuda")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="Ray Tune sweep; every trial is a Ray Train run")
    p.add_argument("--space", default="tune_spaces/default.yaml", help="search space YAML")
    p.add_argument("--num-samples", type=int, help="override the space's num_samples")
    add_flags(p, SweepOptions().run, skip=SWEEP_RUN_SKIPS)
    add_flags(p, SweepOptions())
    p.add_argument(
        "--register", metavar="NAME",
        help="register the best checkpoint (the ensemble with --ensemble-top)",
    )  # fmt: skip
    p.add_argument("--alias", help="with --register: point this alias at the new version")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    add_config_flags(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "demo", help="synthetic data -> Ray Train -> Ray Tune -> eval -> Ray Serve, one command"
    )
    p.add_argument("--out", default="work/demo", help="the demo's folder (reused on re-runs)")
    p.add_argument("--tiny", action="store_true", help="a tiny BERT and tiny sizes (CI)")
    p.add_argument("--fresh", action="store_true", help="delete --out and start over")
    p.add_argument("--no-serve", action="store_true",
                   help="stop the service after the example queries")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="the service's port (127.0.0.1)")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"hrem-ray {args.command}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
