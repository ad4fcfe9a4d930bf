"""Metrics and encode helpers checked against plain reference computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hrem_ray.cli import main
from hrem_ray.embed import encode
from hrem_ray.eval import metrics
from hrem_ray.eval.evaluate import save_sims
from hrem_ray.eval.metrics import (
    evaluate_fold5,
    evaluate_sims,
    format_table,
    i2t_ranks,
    recall_summary,
    similarity,
    t2i_ranks,
)
from hrem_ray.testing import TINY_MODEL, tiny_data_and_checkpoint
from tests.helpers import run_err

SIZES = [1, 2, 5, 13, 40]


def reference_i2t(sims: np.ndarray) -> np.ndarray:
    """Min over the image's 5 captions of their position in the descending argsort."""
    ranks = []
    for i in range(sims.shape[0]):
        order = list(np.argsort(-sims[i], kind="stable"))
        ranks.append(min(order.index(c) for c in range(5 * i, 5 * i + 5)))
    return np.array(ranks)


def reference_t2i(sims: np.ndarray) -> np.ndarray:
    """Position of the caption's image in the descending argsort of image scores."""
    ranks = []
    for c in range(sims.shape[1]):
        order = list(np.argsort(-sims[:, c], kind="stable"))
        ranks.append(order.index(c // 5))
    return np.array(ranks)


def reference_summary(ranks: np.ndarray) -> dict[str, float]:
    n = len(ranks)
    return {
        "r1": 100.0 * sum(r < 1 for r in ranks) / n,
        "r5": 100.0 * sum(r < 5 for r in ranks) / n,
        "r10": 100.0 * sum(r < 10 for r in ranks) / n,
        "medr": np.floor(np.median(ranks)) + 1,
        "meanr": sum(ranks) / n + 1,
    }


def random_sims(n_images: int, seed: int, signal: float = 1.0) -> np.ndarray:
    """Random scores with the ground-truth pairs lifted, so ranks span small and large values."""
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((n_images, 5 * n_images)).astype(np.float32)
    for i in range(n_images):
        sims[i, 5 * i : 5 * i + 5] += signal * rng.random(5, dtype=np.float32)
    return sims


def assert_summary_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == {"r1", "r5", "r10", "medr", "meanr"}
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


@pytest.mark.parametrize("n_images", SIZES)
def test_ranks_match_argsort_reference(n_images: int) -> None:
    sims = random_sims(n_images, seed=n_images)
    np.testing.assert_array_equal(i2t_ranks(sims), reference_i2t(sims))
    np.testing.assert_array_equal(t2i_ranks(sims), reference_t2i(sims))


def test_ranks_are_chunk_size_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    sims = random_sims(40, seed=7)
    want_i2t, want_t2i = reference_i2t(sims), reference_t2i(sims)
    for chunk in (1, 200, 350, 5 * 40 * 3 + 1):
        monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", chunk)
        np.testing.assert_array_equal(i2t_ranks(sims), want_i2t)
        np.testing.assert_array_equal(t2i_ranks(sims), want_t2i)


def test_ranks_with_wide_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of more than 255 rows and rows of more than 255 captions need 16-bit counters."""
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 1 << 30)
    sims = random_sims(300, seed=11, signal=0.0)
    want_i2t, want_t2i = reference_i2t(sims), reference_t2i(sims)
    assert want_i2t.max() > 255 and want_t2i.max() > 255
    np.testing.assert_array_equal(i2t_ranks(sims), want_i2t)
    np.testing.assert_array_equal(t2i_ranks(sims), want_t2i)


@pytest.mark.parametrize("n_images", SIZES)
def test_evaluate_sims_matches_reference(n_images: int) -> None:
    sims = random_sims(n_images, seed=100 + n_images)
    result = evaluate_sims(sims)
    i2t = reference_summary(reference_i2t(sims))
    t2i = reference_summary(reference_t2i(sims))
    assert_summary_close(result["i2t"], i2t)
    assert_summary_close(result["t2i"], t2i)
    recalls = [d[k] for d in (i2t, t2i) for k in ("r1", "r5", "r10")]
    assert result["rsum"] == pytest.approx(sum(recalls))
    assert (result["n_images"], result["n_captions"]) == (n_images, 5 * n_images)


def test_recall_summary_formulas() -> None:
    assert_summary_close(
        recall_summary(np.array([0, 1, 2, 3])),
        {"r1": 25.0, "r5": 100.0, "r10": 100.0, "medr": 2.0, "meanr": 2.5},
    )
    ranks = np.array([0, 4, 5, 9, 10, 30, 2])
    assert_summary_close(recall_summary(ranks), reference_summary(ranks))


def test_recall_summary_rejects_empty() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        recall_summary(np.array([], dtype=np.int64))


def test_perfect_sims() -> None:
    n = 20
    sims = np.repeat(np.eye(n, dtype=np.float32), 5, axis=1)
    result = evaluate_sims(sims)
    for direction in ("i2t", "t2i"):
        assert result[direction] == {
            "r1": 100.0,
            "r5": 100.0,
            "r10": 100.0,
            "medr": 1.0,
            "meanr": 1.0,
        }
    assert result["rsum"] == 600.0


def test_hand_made_ranks() -> None:
    # Each image's best own caption is beaten by all 5 of the other's; each caption prefers the
    # other image.
    sims = np.array(
        [
            [0.1, 0.0, 0.0, 0.0, 0.0, 0.5, 0.6, 0.7, 0.8, 0.9],
            [0.9, 0.9, 0.9, 0.9, 0.9, 0.2, 0.3, 0.0, 0.0, 0.0],
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(i2t_ranks(sims), [5, 5])
    np.testing.assert_array_equal(t2i_ranks(sims), [1, 1, 1, 1, 1, 1, 1, 1, 1, 1])


def test_ties_favour_ground_truth() -> None:
    sims = np.zeros((2, 10), dtype=np.float32)
    np.testing.assert_array_equal(i2t_ranks(sims), [0, 0])
    np.testing.assert_array_equal(t2i_ranks(sims), np.zeros(10))


def test_fold5_is_mean_of_fold_results() -> None:
    n = 25
    sims = random_sims(n, seed=3, signal=2.0)
    folds = [evaluate_sims(sims[k * 5 : (k + 1) * 5, k * 25 : (k + 1) * 25]) for k in range(5)]
    result = evaluate_fold5(sims)
    for direction in ("i2t", "t2i"):
        for key in ("r1", "r5", "r10", "medr", "meanr"):
            want = np.mean([f[direction][key] for f in folds])
            assert result[direction][key] == pytest.approx(want)
    assert result["rsum"] == pytest.approx(np.mean([f["rsum"] for f in folds]))
    assert (result["n_images"], result["n_captions"]) == (5, 25)
    assert result["rsum"] != pytest.approx(evaluate_sims(sims)["rsum"])


def test_fold5_rejects_indivisible() -> None:
    with pytest.raises(ValueError, match="divisible by 5"):
        evaluate_fold5(random_sims(12, seed=0))


def with_value(value: float, row: int, col: int) -> np.ndarray:
    """A 5 x 25 matrix, valid but for one entry inside a fold5 block."""
    sims = np.zeros((5, 25), dtype=np.float32)
    sims[row, col] = value
    return sims


@pytest.mark.parametrize(
    ("sims", "match"),
    [
        (np.zeros(10, dtype=np.float32), "2-D"),
        (np.zeros((2, 3, 10), dtype=np.float32), "2-D"),
        (np.zeros((2, 9), dtype=np.float32), "expected 5"),
        (np.zeros((0, 0), dtype=np.float32), "no images"),
        (with_value(np.nan, 0, 3), "NaN or infinite"),
        (with_value(np.inf, 4, 22), "NaN or infinite"),
        (with_value(-np.inf, 2, 10), "NaN or infinite"),
        (np.zeros((1, 5), dtype=bool), "real-valued"),
    ],
)
def test_bad_sims_raise(sims: np.ndarray, match: str) -> None:
    for fn in (i2t_ranks, t2i_ranks, evaluate_sims, evaluate_fold5):
        with pytest.raises(ValueError, match=match):
            fn(sims)


def test_format_table_mentions_every_metric() -> None:
    table = format_table(evaluate_sims(random_sims(5, seed=1)))
    for word in ("i2t", "t2i", "R@1", "R@5", "R@10", "medr", "meanr", "rsum"):
        assert word in table


def fake_embed(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Row-independent fake: the embedding is the first feature scaled by the length."""
    return torch.stack([x[:, 0], lengths.float()], dim=1)


def make_batches(order: list[list[int]]) -> list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    return [
        (np.array(ids), torch.tensor(ids, dtype=torch.float32)[:, None], torch.tensor(ids) * 2)
        for ids in order
    ]


def test_encode_orders_rows_by_id() -> None:
    messages: list[str] = []
    out = encode(
        fake_embed,
        make_batches([[7, 2], [0, 9, 4], [1], [8, 3, 6, 5]]),
        10,
        progress=messages.append,
        desc="images",
    )
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.stack([np.arange(10), 2 * np.arange(10)], axis=1))
    assert messages and messages[-1].startswith("images [####################] 100% 10/10")
    assert all("rows/s" in m for m in messages)


def test_encode_runs_without_grad() -> None:
    def embed(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        assert torch.is_inference_mode_enabled()
        return x

    assert encode(embed, make_batches([[0, 1]]), 2).shape == (2, 1)


def test_encode_missing_id_raises() -> None:
    with pytest.raises(ValueError, match=r"1 ids never encoded \(first: \[3\]\)"):
        encode(fake_embed, make_batches([[0, 1], [2, 4]]), 5)


def test_encode_duplicate_or_out_of_range_id_raises() -> None:
    with pytest.raises(ValueError, match="more than once"):
        encode(fake_embed, make_batches([[0, 1], [1, 2]]), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        encode(fake_embed, make_batches([[0, 1, 3]]), 3)


def test_similarity_is_float32_dot_product() -> None:
    rng = np.random.default_rng(0)
    img, cap = rng.standard_normal((3, 4)), rng.standard_normal((15, 4))
    sims = similarity(img, cap)
    assert sims.dtype == np.float32 and sims.shape == (3, 15)
    np.testing.assert_allclose(sims, img @ cap.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="incompatible"):
        similarity(img, cap[:, :3])


def reference_result(sims: np.ndarray) -> dict:
    i2t = reference_summary(reference_i2t(sims))
    t2i = reference_summary(reference_t2i(sims))
    return {"i2t": i2t, "t2i": t2i, "rsum": sum(i2t[k] + t2i[k] for k in ("r1", "r5", "r10"))}


def assert_result_close(got: dict, want: dict) -> None:
    for direction in ("i2t", "t2i"):
        assert_summary_close(got[direction], want[direction])
    assert got["rsum"] == pytest.approx(want["rsum"])


def test_ensemble_eval_scores_the_mean_matrix(tmp_path, tiny_bert, capsys):
    """Two seeds of a tiny model: ``--checkpoint A --checkpoint B`` scores (S_A + S_B) / 2,
    fold5 included; ``--sims`` of the saved single matrices gives the same JSON."""
    data, ck_a = tiny_data_and_checkpoint(tmp_path, tiny_bert)
    ck_b = tmp_path / "ckpt_b"
    main(["init-checkpoint", "--out", str(ck_b), "--bert-path", tiny_bert, "--seed", "1",
          *TINY_MODEL])  # fmt: skip
    split = ["--data-path", str(data), "--dataset", "f30k", "--split", "test"]

    def run_eval(*argv: str) -> dict:
        out = tmp_path / "result.json"
        main(["eval", *split, "--fold5", "--json", str(out), *argv])
        return json.loads(out.read_text())

    alone = {}
    for name, ck in (("a", ck_a), ("b", ck_b)):
        alone[name] = run_eval("--checkpoint", str(ck), "--save-sims", str(tmp_path / name))
    s_a, s_b = np.load(tmp_path / "a"), np.load(tmp_path / "b")
    assert s_a.shape == (10, 50) and not np.allclose(s_a, s_b)
    assert_result_close(alone["a"], reference_result(s_a))

    ens = run_eval("--checkpoint", str(ck_a), "--checkpoint", str(ck_b),
                   "--save-sims", str(tmp_path / "ens.npy"))  # fmt: skip
    mean = (s_a.astype(np.float64) + s_b) / 2
    np.testing.assert_allclose(np.load(tmp_path / "ens.npy"), mean, rtol=0, atol=1e-6)
    assert_result_close(ens, reference_result(mean))
    folds = [reference_result(mean[2 * f : 2 * f + 2, 10 * f : 10 * f + 10]) for f in range(5)]
    assert ens["fold5"]["rsum"] == pytest.approx(np.mean([f["rsum"] for f in folds]))
    assert ens["fold5"]["i2t"]["r1"] == pytest.approx(np.mean([f["i2t"]["r1"] for f in folds]))
    assert run_eval("--sims", str(tmp_path / "a"), str(tmp_path / "b")) == ens
    assert run_eval("--sims", str(tmp_path / "a"), "--checkpoint", str(ck_b)) == ens
    capsys.readouterr()

    np.save(tmp_path / "wrong.npy", s_a[:, :45])
    line = run_err(capsys, "eval", *split, "--sims", str(tmp_path / "wrong.npy"))
    assert "shape (10, 45)" in line and "(10, 50)" in line
    (tmp_path / "junk.npy").write_text("not numpy")
    assert "not a saved similarity matrix" in run_err(
        capsys, "eval", *split, "--sims", str(tmp_path / "junk.npy")
    )
    assert "give --checkpoint or --sims" in run_err(capsys, "eval", *split)


def test_save_sims_is_atomic(tmp_path, monkeypatch):
    """A failed write leaves the old matrix and no temporary file."""
    path = tmp_path / "s.npy"
    save_sims(path, np.ones((1, 5), dtype=np.float32))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(OSError):
        save_sims(path, np.zeros((1, 5), dtype=np.float32))
    monkeypatch.undo()
    assert np.load(path).sum() == 5 and sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]
