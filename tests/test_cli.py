"""``hrem-ray`` end to end, in-process: synth -> init-checkpoint -> embed -> eval.

Every user error must end in exit status 2 with exactly one ``hrem-ray <cmd>: error: ...``
line on stderr (no traceback) and must leave no output file behind. Metrics printed by
``eval`` are checked against an independent, deliberately naive computation from the
embeddings that ``embed`` writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hrem_ray.checkpoint import load_checkpoint
from hrem_ray.cli import main
from hrem_ray.embed import embed_captions, embed_features
from hrem_ray.testing import SYNTH, TINY_MODEL
from tests.helpers import run_err

METRIC_KEYS = {"r1", "r5", "r10", "medr", "meanr"}
RESULT_KEYS = {"i2t", "t2i", "rsum", "n_images", "n_captions"}


def run_ok(capsys, *argv: str) -> str:
    main(list(argv))
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert) -> dict[str, Path]:
    """Tiny f30k and coco data plus a freshly initialised tiny checkpoint, built via the CLI."""
    root = tmp_path_factory.mktemp("cli")
    for dataset in ("f30k", "coco"):
        main(["synth", "--out", str(root / "data"), "--dataset", dataset, *SYNTH])
    ckpt = root / "ckpt"
    main(["init-checkpoint", "--out", str(ckpt), "--bert-path", tiny_bert, *TINY_MODEL])
    return {"root": root, "data": root / "data", "ckpt": ckpt}


@pytest.fixture(scope="module")
def loaded(world):
    ck = load_checkpoint(world["ckpt"])
    return ck, ck.tokenizer()


# --------------------------------------------------------------------------------------------
# synth, init-checkpoint
# --------------------------------------------------------------------------------------------


def test_synth_writes_every_split(world):
    f30k, coco = world["data"] / "f30k_precomp", world["data"] / "coco_precomp"
    sizes = {"train": 20, "dev": 5, "test": 10}
    for split, n in sizes.items():
        assert np.load(f30k / f"{split}_ims.npy").shape == (n, 6, 24)
        assert len((f30k / f"{split}_caps.txt").read_text().splitlines()) == 5 * n
    for split, n in {**sizes, "testall": 10, "test": 2}.items():
        assert np.load(coco / f"{split}_ims.npy").shape == (n, 6, 24)
        assert len((coco / f"{split}_caps.txt").read_text().splitlines()) == 5 * n
    np.testing.assert_array_equal(
        np.load(coco / "test_ims.npy"), np.load(coco / "testall_ims.npy")[:2]
    )


@pytest.mark.parametrize(
    "args, word",
    [
        (["--train-images", "0"], "train_images"),
        (["--test-images", "-3"], "test_images"),
        (["--regions", "0"], "regions"),
        (["--dim", "4"], "dim"),
        (["--seed", "-1"], "seed"),
    ],
)
def test_synth_bad_arguments(capsys, tmp_path, args, word):
    line = run_err(capsys, "synth", "--out", str(tmp_path / "d"), *args)
    assert word in line
    assert not list((tmp_path / "d").glob("*/*.npy"))


def test_init_checkpoint_records_config(world):
    cfg = json.loads((world["ckpt"] / "config.json").read_text())["config"]["model"]
    assert (cfg["img_dim"], cfg["embed_size"], cfg["num_heads"]) == (24, 32, 4)
    assert (world["ckpt"] / "model.safetensors").is_file()
    assert (world["ckpt"] / "backbone" / "vocab.txt").is_file()


@pytest.mark.parametrize(
    "pair, word",
    [
        ("model.bogus=1", "model.bogus"),
        ("nosection.margin=1", "nosection.margin"),
        ("model.embed_size=abc", "model.embed_size"),
        ("model.embed_size=30", "model.embed_size"),  # not divisible by num_heads=4
    ],
)
def test_config_errors_name_the_key(capsys, tmp_path, tiny_bert, pair, word):
    out = tmp_path / "c"
    line = run_err(
        capsys, "init-checkpoint", "--out", str(out), "--bert-path", tiny_bert, "--set", pair
    )
    assert word in line
    assert not out.exists()


def test_tiny_bert_shape_options(capsys, tmp_path):
    """``tiny-bert --heads/--intermediate`` (bench/serve_load.py's bert-base shape) reach the
    config, and the model built from it has that shape."""
    from hrem_ray.backbone import build_bert

    out = tmp_path / "b"
    run_ok(capsys, "tiny-bert", "--out", str(out), "--hidden", "48", "--layers", "1",
           "--heads", "3", "--intermediate", "80")  # fmt: skip
    bert = build_bert(out, pretrained=True)
    cfg = bert.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (48, 1, 3)
    assert bert.encoder.layer[0].intermediate.dense.out_features == 80
    default = tmp_path / "d"
    run_ok(capsys, "tiny-bert", "--out", str(default), "--hidden", "48")
    assert json.loads((default / "config.json").read_text())["intermediate_size"] == 96


def test_init_checkpoint_missing_backbone(capsys, tmp_path):
    line = run_err(
        capsys, "init-checkpoint", "--out", str(tmp_path / "c"), "--bert-path", str(tmp_path / "x")
    )
    assert "config.json" in line


def test_import_checkpoint_errors(capsys, tmp_path, tiny_bert):
    out = tmp_path / "imported"
    line = run_err(
        capsys, "import-checkpoint", str(tmp_path / "nope.pth"), "--bert-path", tiny_bert,
        "--out", str(out),
    )  # fmt: skip
    assert "nope.pth" in line
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file at all")
    run_err(capsys, "import-checkpoint", str(garbage), "--bert-path", tiny_bert, "--out", str(out))
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# embed
# --------------------------------------------------------------------------------------------


def embed_cli(capsys, ckpt: Path, flag: str, src: Path, out: Path, *extra: str) -> np.ndarray:
    run_ok(capsys, "embed", "--checkpoint", str(ckpt), flag, str(src), "--out", str(out), *extra)
    return np.load(out)


def assert_embeddings(embs: np.ndarray, n: int) -> None:
    assert embs.dtype == np.float32
    assert embs.shape == (n, 32)
    np.testing.assert_allclose(np.linalg.norm(embs, axis=1), 1.0, atol=1e-5)


@pytest.mark.filterwarnings("error")  # e.g. torch on tensors over read-only memmaps
def test_embed_images_matches_library(capsys, world, loaded, tmp_path):
    ck, _ = loaded
    feats = np.load(world["data"] / "f30k_precomp" / "test_ims.npy")
    embs = embed_cli(capsys, world["ckpt"], "--images", world["data"] / "f30k_precomp" /
                     "test_ims.npy", tmp_path / "img.npy", "--batch-size", "3")  # fmt: skip
    assert_embeddings(embs, 10)
    np.testing.assert_allclose(embs, embed_features(ck.model, feats), atol=1e-6)
    # input order: each row is that image embedded alone, and a permutation permutes the rows
    for i in (0, 4, 9):
        np.testing.assert_allclose(
            embs[i], embed_features(ck.model, feats[i : i + 1])[0], atol=1e-5
        )
    perm = np.random.default_rng(0).permutation(10)
    np.save(tmp_path / "perm.npy", feats[perm])
    permuted = embed_cli(capsys, world["ckpt"], "--images", tmp_path / "perm.npy",
                         tmp_path / "perm_out.npy")  # fmt: skip
    np.testing.assert_allclose(permuted, embs[perm], atol=1e-5)
    # rows are distinct: the model does not collapse different images
    assert np.abs(embs[0] - embs[1]).max() > 1e-4


def test_embed_captions_matches_library(capsys, world, loaded, tmp_path):
    ck, tok = loaded
    captions = ["A dog runs on the beach.", "two women in red sitting in a park", "a cat"]
    path = tmp_path / "caps.txt"
    path.write_text("\n".join(captions) + "\n", encoding="utf-8")
    embs = embed_cli(capsys, world["ckpt"], "--captions", path, tmp_path / "caps.npy")
    assert_embeddings(embs, 3)
    np.testing.assert_allclose(embs, embed_captions(ck.model, tok, captions), atol=1e-6)
    for i, caption in enumerate(captions):
        one = tmp_path / f"one{i}.txt"
        one.write_text(caption + "\n", encoding="utf-8")
        alone = embed_cli(capsys, world["ckpt"], "--captions", one, tmp_path / f"one{i}.npy")
        np.testing.assert_allclose(embs[i], alone[0], atol=1e-5)
    assert np.abs(embs[0] - embs[2]).max() > 1e-4
    # CRLF line endings and no final newline read the same captions
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes("\r\n".join(captions).encode())
    np.testing.assert_allclose(
        embed_cli(capsys, world["ckpt"], "--captions", crlf, tmp_path / "crlf.npy"), embs, atol=1e-6
    )


def test_embed_caption_rows_follow_file_lines(capsys, world, tmp_path):
    """Only newlines separate captions: a U+2028 or form feed inside a line is not a break."""
    path = tmp_path / "odd.txt"
    path.write_text("a dog\u2028running\nred\x0cbus\nthe cat\n", encoding="utf-8")
    embs = embed_cli(capsys, world["ckpt"], "--captions", path, tmp_path / "odd.npy")
    assert embs.shape == (3, 32)


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[str, Path, str]]:
    """name -> (flag, file, a word the error must contain)."""
    rng = np.random.default_rng(0)
    ok = rng.random((3, 6, 24), dtype=np.float32)
    files: dict[str, tuple[str, Path, str]] = {}

    def npy(name: str, array: np.ndarray, word: str) -> None:
        np.save(tmp_path / f"{name}.npy", array)
        files[name] = ("--images", tmp_path / f"{name}.npy", word)

    def txt(name: str, data: bytes, word: str) -> None:
        (tmp_path / f"{name}.txt").write_bytes(data)
        files[name] = ("--captions", tmp_path / f"{name}.txt", word)

    npy("wrong_dim", rng.random((3, 6, 23), dtype=np.float32), "24")
    npy("ndim2", rng.random((3, 24), dtype=np.float32), "shape")
    nan = ok.copy()
    nan[2, 1, 5] = np.nan
    npy("nan", nan, "non-finite")
    inf = ok.copy()
    inf[0, 0, 0] = np.inf
    npy("inf", inf, "non-finite")
    npy("no_rows", np.zeros((0, 6, 24), np.float32), "no images")
    npy("strings", np.array([["a", "b"]]), "dtype")
    np.savez(tmp_path / "archive.npz", a=ok)
    files["npz"] = ("--images", tmp_path / "archive.npz", "archive.npz")
    (tmp_path / "text.npy").write_text("not numpy")
    files["not_npy"] = ("--images", tmp_path / "text.npy", "text.npy")
    files["missing_npy"] = ("--images", tmp_path / "missing.npy", "missing.npy")
    txt("empty_line", b"a dog runs\n\na cat sleeps\n", "line 2")
    txt("blank_line", b"a dog runs\n   \n", "line 2")
    txt("empty_file", b"", "empty")
    txt("bad_utf8", b"a dog \xff runs\n", "UTF-8")
    files["missing_txt"] = ("--captions", tmp_path / "missing.txt", "missing.txt")
    return files


BAD_INPUTS = [
    "wrong_dim", "ndim2", "nan", "inf", "no_rows", "strings", "npz", "not_npy", "missing_npy",
    "empty_line", "blank_line", "empty_file", "bad_utf8", "missing_txt",
]  # fmt: skip


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_embed_bad_input(capsys, world, tmp_path, name):
    flag, src, word = _bad_inputs(tmp_path)[name]
    out = tmp_path / "out" / "embs.npy"
    line = run_err(capsys, "embed", "--checkpoint", str(world["ckpt"]), flag, str(src),
                   "--out", str(out))  # fmt: skip
    assert word in line
    assert not out.exists()
    assert not list(tmp_path.glob("out/*"))  # no temporary left behind either


@pytest.mark.parametrize("size", ["0", "-2"])
def test_embed_bad_batch_size(capsys, world, tmp_path, size):
    caps = tmp_path / "c.txt"
    caps.write_text("a dog\n")
    out = tmp_path / "o.npy"
    line = run_err(capsys, "embed", "--checkpoint", str(world["ckpt"]), "--captions", str(caps),
                   "--out", str(out), "--batch-size", size)  # fmt: skip
    assert "batch size" in line
    assert not out.exists()


def test_embed_missing_or_broken_checkpoint(capsys, world, tmp_path):
    caps = tmp_path / "c.txt"
    caps.write_text("a dog\n")
    out = tmp_path / "o.npy"
    args = ["--captions", str(caps), "--out", str(out)]
    line = run_err(capsys, "embed", "--checkpoint", str(tmp_path / "nope"), *args)
    assert "nope" in line
    broken = tmp_path / "broken"
    shutil.copytree(world["ckpt"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    run_err(capsys, "embed", "--checkpoint", str(broken), *args)
    (broken / "model.safetensors").unlink()
    line = run_err(capsys, "embed", "--checkpoint", str(broken), *args)
    assert "model.safetensors" in line
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------


def naive_metrics(img: np.ndarray, cap: np.ndarray) -> dict:
    """Spec section 8 by the book: argsort each query's scores, find the ground truth."""
    sims = img @ cap.T
    n = len(img)
    i2t = np.empty(n)
    for i in range(n):
        order = np.argsort(-sims[i])
        i2t[i] = min(np.where(order == j)[0][0] for j in range(5 * i, 5 * i + 5))
    t2i = np.empty(5 * n)
    for j in range(5 * n):
        order = np.argsort(-sims[:, j])
        t2i[j] = np.where(order == j // 5)[0][0]

    def summary(ranks: np.ndarray) -> dict:
        out = {f"r{k}": 100.0 * np.mean(ranks < k) for k in (1, 5, 10)}
        out["medr"] = np.floor(np.median(ranks)) + 1
        out["meanr"] = ranks.mean() + 1
        return out

    a, b = summary(i2t), summary(t2i)
    rsum = sum(a[f"r{k}"] + b[f"r{k}"] for k in (1, 5, 10))
    return {"i2t": a, "t2i": b, "rsum": rsum, "n_images": n, "n_captions": 5 * n}


def naive_fold5(img: np.ndarray, cap: np.ndarray) -> dict:
    f = len(img) // 5
    folds = [naive_metrics(img[k * f : (k + 1) * f], cap[5 * k * f : 5 * (k + 1) * f])
             for k in range(5)]  # fmt: skip
    out = {d: {m: np.mean([x[d][m] for x in folds]) for m in METRIC_KEYS} for d in ("i2t", "t2i")}
    out.update(rsum=np.mean([x["rsum"] for x in folds]), n_images=f, n_captions=5 * f)
    return out


def assert_same_metrics(got: dict, want: dict) -> None:
    assert set(got) == RESULT_KEYS
    for d in ("i2t", "t2i"):
        assert set(got[d]) == METRIC_KEYS
        for m in METRIC_KEYS:
            assert got[d][m] == pytest.approx(want[d][m], abs=1e-6), (d, m)
    assert got["rsum"] == pytest.approx(want["rsum"], abs=1e-6)
    assert (got["n_images"], got["n_captions"]) == (want["n_images"], want["n_captions"])
    assert isinstance(got["n_images"], int) and isinstance(got["n_captions"], int)


@pytest.mark.parametrize("dataset, split", [("f30k", "test"), ("f30k", "dev"), ("coco", "testall")])
def test_eval_json_matches_naive_metrics(capsys, world, tmp_path, dataset, split):
    folder = world["data"] / f"{dataset}_precomp"
    ckpt = str(world["ckpt"])
    img = embed_cli(capsys, world["ckpt"], "--images", folder / f"{split}_ims.npy",
                    tmp_path / "img.npy")  # fmt: skip
    cap = embed_cli(capsys, world["ckpt"], "--captions", folder / f"{split}_caps.txt",
                    tmp_path / "cap.npy")  # fmt: skip
    common = ["--checkpoint", ckpt, "--data-path", str(world["data"]), "--dataset", dataset,
              "--split", split]  # fmt: skip

    out = run_ok(capsys, "eval", *common, "--json", str(tmp_path / "plain.json"))
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert set(plain) == RESULT_KEYS
    assert_same_metrics(plain, naive_metrics(img, cap))
    for token in ("i2t", "t2i", "R@1", "R@5", "R@10", "medr", "meanr", "rsum"):
        assert token in out
    assert f"rsum  {plain['rsum']:.1f}" in out

    out = run_ok(capsys, "eval", *common, "--fold5", "--json", str(tmp_path / "fold5.json"))
    result = json.loads((tmp_path / "fold5.json").read_text())
    assert set(result) == RESULT_KEYS | {"fold5"}
    assert_same_metrics({k: v for k, v in result.items() if k != "fold5"}, naive_metrics(img, cap))
    assert_same_metrics(result["fold5"], naive_fold5(img, cap))
    assert "5-fold" in out
    assert f"rsum  {result['fold5']['rsum']:.1f}" in out


def test_eval_without_json_prints_table_only(capsys, world):
    out = run_ok(capsys, "eval", "--checkpoint", str(world["ckpt"]), "--data-path",
                 str(world["data"]), "--dataset", "f30k")  # fmt: skip
    assert "10 images, 50 captions" in out
    assert "rsum" in out


def _corrupt(data: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(data / "f30k_precomp", copy / "f30k_precomp")
    caps = copy / "f30k_precomp" / "test_caps.txt"
    lines = caps.read_text().splitlines()
    if how == "short":
        caps.write_text("\n".join(lines[:-1]) + "\n")
    elif how == "blank":
        lines[7] = ""
        caps.write_text("\n".join(lines) + "\n")
    elif how == "binary":
        caps.write_bytes(b"\xff\xfe" + caps.read_bytes())
    elif how == "empty":
        caps.write_text("")
    elif how == "extra_image":
        caps.write_text("\n".join(lines + lines[:5]) + "\n")
    elif how == "nan":
        ims = np.load(copy / "f30k_precomp" / "test_ims.npy")
        ims[3, 0, 0] = np.nan
        np.save(copy / "f30k_precomp" / "test_ims.npy", ims)
    return copy


@pytest.mark.parametrize("how", ["short", "blank", "binary", "empty", "extra_image", "nan"])
def test_eval_corrupted_split(capsys, world, tmp_path, how):
    data = _corrupt(world["data"], tmp_path, how)
    out = tmp_path / "m.json"
    line = run_err(capsys, "eval", "--checkpoint", str(world["ckpt"]), "--data-path", str(data),
                   "--dataset", "f30k", "--json", str(out))  # fmt: skip
    assert "test_" in line  # names the file
    assert not out.exists()


def test_eval_missing_inputs(capsys, world, tmp_path):
    out = tmp_path / "m.json"
    base = ["--data-path", str(world["data"]), "--json", str(out)]
    line = run_err(capsys, "eval", "--checkpoint", str(tmp_path / "no_ckpt"),
                   "--dataset", "f30k", *base)  # fmt: skip
    assert "no_ckpt" in line
    line = run_err(capsys, "eval", "--checkpoint", str(world["ckpt"]), "--dataset", "f30k",
                   "--split", "nosuch", *base)  # fmt: skip
    assert "nosuch_ims.npy" in line
    line = run_err(capsys, "eval", "--checkpoint", str(world["ckpt"]), "--dataset", "cc3m", *base)
    assert "cc3m_precomp" in line
    assert not out.exists()


def test_eval_mismatched_data_and_bad_options(capsys, world, tmp_path):
    other = tmp_path / "d32"
    run_ok(capsys, "synth", "--out", str(other), "--train-images", "1", "--dev-images", "1",
           "--test-images", "5", "--regions", "4", "--dim", "32")  # fmt: skip
    out = tmp_path / "m.json"
    common = ["--checkpoint", str(world["ckpt"]), "--dataset", "f30k", "--json", str(out)]
    line = run_err(capsys, "eval", *common, "--data-path", str(other))
    assert "img_dim=24" in line
    # coco's test split here has 2 images: no 5-fold protocol
    coco = ["--data-path", str(world["data"]), "--dataset", "coco", "--fold5"]
    line = run_err(capsys, "eval", "--checkpoint", str(world["ckpt"]), *coco, "--json", str(out))
    assert "divisible by 5" in line
    line = run_err(capsys, "eval", *common, "--data-path", str(world["data"]), "--batch-size", "0")
    assert "batch size" in line
    assert not out.exists()


def test_run_flags_are_the_options_dataclasses():
    """train's and tune's flags and defaults come from RayRunOptions and SweepOptions."""
    from dataclasses import asdict

    from hrem_ray.cli import build_parser
    from hrem_ray.options import SWEEP_RUN_SKIPS, RayRunOptions, SweepOptions, from_args

    parser = build_parser()
    train = from_args(parser.parse_args(["train"]), RayRunOptions)
    assert train == RayRunOptions()
    a = parser.parse_args(["tune", "--name", "s2", "--ensemble-top", "3", "--use-gpu"])
    sweep = from_args(a, SweepOptions, run=from_args(a, RayRunOptions))
    want = SweepOptions(RayRunOptions(name="s2", num_workers=1, use_gpu=True), ensemble_top=3)
    assert asdict(sweep) == asdict(want)
    for skipped in SWEEP_RUN_SKIPS:
        with pytest.raises(SystemExit):
            parser.parse_args(["tune", f"--{skipped.replace('_', '-')}", "1"])
