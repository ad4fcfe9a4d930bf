"""Precomp reader: both row layouts, ordered gathers, validation errors, memory mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hrem_ray.data.batches import gather_features
from hrem_ray.data.precomp import PrecompError, open_split, scan_finite, split_paths

N_IMAGES, REGIONS, DIM = 4, 3, 6


def _features(n_images: int = N_IMAGES) -> np.ndarray:
    """Image i's regions are filled with distinct values so rows are easy to identify."""
    base = np.arange(n_images * REGIONS * DIM, dtype=np.float32)
    return base.reshape(n_images, REGIONS, DIM)


def _captions(n_images: int = N_IMAGES) -> list[str]:
    return [f"image {i} caption {j}" for i in range(n_images) for j in range(5)]


def write_split(
    root: Path,
    *,
    features: np.ndarray | None = None,
    captions: list[str] | None = None,
    per_caption: bool = False,
    split: str = "test",
) -> tuple[Path, Path]:
    """Write ``<root>/toy_precomp/<split>_ims.npy`` and ``_caps.txt``."""
    features = _features() if features is None else features
    if per_caption:
        features = np.repeat(features, 5, axis=0)
    ims, caps = split_paths(root, "toy", split)
    ims.parent.mkdir(parents=True, exist_ok=True)
    np.save(ims, features)
    caps.write_text("\n".join(_captions() if captions is None else captions) + "\n")
    return ims, caps


@pytest.mark.parametrize("per_caption", [False, True])
def test_layouts_gather_same_features(tmp_path: Path, per_caption: bool) -> None:
    write_split(tmp_path, per_caption=per_caption)
    split = open_split(tmp_path, "toy", "test")
    assert split.per_caption is per_caption
    assert (split.n_images, split.n_captions) == (N_IMAGES, 5 * N_IMAGES)
    caption_ids = np.array([19, 0, 7, 8, 3])
    got = split.gather(split.feature_rows(caption_ids))
    np.testing.assert_array_equal(got, _features()[caption_ids // 5])
    np.testing.assert_array_equal(split.gather(split.image_rows()), _features())
    assert split.captions[7] == "image 1 caption 2"


def test_gather_order_and_duplicates(tmp_path: Path) -> None:
    write_split(tmp_path)
    split = open_split(tmp_path, "toy", "test")
    rows = np.array([3, 1, 3, 0, 1, 1])
    got = split.gather(rows)
    assert got.dtype == np.float32 and got.flags.writeable
    np.testing.assert_array_equal(got, _features()[rows])
    np.testing.assert_array_equal(split.gather(np.array([0, 2])), _features()[[0, 2]])


def test_float16_accepted(tmp_path: Path) -> None:
    write_split(tmp_path, features=_features().astype(np.float16))
    got = open_split(tmp_path, "toy", "test").gather(np.array([2]))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, _features()[[2]].astype(np.float16).astype(np.float32))


def test_features_are_memory_mapped(tmp_path: Path) -> None:
    ims, _ = write_split(tmp_path)
    split = open_split(tmp_path, "toy", "test")
    assert isinstance(split.features, np.memmap)
    assert Path(split.features.filename) == ims.resolve()
    assert not split.features.flags.writeable


def test_captions_keep_spaces_and_tolerate_crlf(tmp_path: Path) -> None:
    _, caps = write_split(tmp_path)
    lines = _captions()
    lines[0] = "  padded caption  "
    caps.write_bytes(("\r\n".join(lines)).encode())  # CRLF, no final newline
    split = open_split(tmp_path, "toy", "test")
    assert split.captions[0] == "  padded caption  "
    assert split.captions[-1] == lines[-1]


def _expect_error(tmp_path: Path, file_name: str, *fragments: str) -> None:
    with pytest.raises(PrecompError) as info:
        open_split(tmp_path, "toy", "test")
    message = str(info.value)
    assert file_name in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_files(tmp_path: Path) -> None:
    ims, caps = write_split(tmp_path)
    caps.unlink()
    _expect_error(tmp_path, "test_caps.txt", "not found")
    ims.unlink()
    _expect_error(tmp_path, "test_ims.npy", "not found")


def test_bad_npy(tmp_path: Path) -> None:
    ims, _ = write_split(tmp_path)
    ims.write_bytes(b"not an npy file at all")
    _expect_error(tmp_path, "test_ims.npy", ".npy")


def test_bad_ndim(tmp_path: Path) -> None:
    write_split(tmp_path, features=_features().reshape(N_IMAGES, -1))
    _expect_error(tmp_path, "test_ims.npy", "3 dimensions")


def test_bad_dtype(tmp_path: Path) -> None:
    write_split(tmp_path, features=_features().astype(np.int32))
    _expect_error(tmp_path, "test_ims.npy", "int32")


def test_row_count_mismatch(tmp_path: Path) -> None:
    write_split(tmp_path, features=_features(3))
    _expect_error(tmp_path, "test_ims.npy", "3 feature rows", "4 images", "20 captions")


def test_not_multiple_of_five(tmp_path: Path) -> None:
    write_split(tmp_path, captions=_captions()[:-1])
    _expect_error(tmp_path, "test_caps.txt", "19 captions", "multiple of 5")


def test_empty_caption_line(tmp_path: Path) -> None:
    lines = _captions()
    lines[6] = "   "
    write_split(tmp_path, captions=lines)
    _expect_error(tmp_path, "test_caps.txt", "line 7")


def test_empty_captions_file(tmp_path: Path) -> None:
    _, caps = write_split(tmp_path)
    caps.write_text("")
    _expect_error(tmp_path, "test_caps.txt", "empty")


def _expect_scan_error(tmp_path: Path, *fragments: str) -> None:
    split = open_split(tmp_path, "toy", "test")  # opening reads no feature
    with pytest.raises(PrecompError) as info:
        scan_finite(split.features, split.ims_path)
    message = str(info.value)
    assert "test_ims.npy" in message
    for fragment in fragments:
        assert fragment in message, message


def test_non_finite_row(tmp_path: Path) -> None:
    feats = _features()
    feats[2, 1, 4] = np.nan
    write_split(tmp_path, features=feats)
    _expect_scan_error(tmp_path, "row 2")


@pytest.mark.parametrize("per_caption", [False, True])
def test_non_finite_row_found_when_its_batch_is_read(tmp_path: Path, per_caption: bool) -> None:
    """The driver never scans: a batch that gathers a bad row names the file and the row."""
    feats = _features()
    feats[2, 0, 0] = np.inf
    write_split(tmp_path, features=feats, per_caption=per_caption)
    split = open_split(tmp_path, "toy", "test")
    bad_row = 2 * 5 + 3 if per_caption else 2
    gather_features(split, np.array([0, 1]))  # rows without it read fine
    with pytest.raises(PrecompError, match=rf"test_ims.npy: row {bad_row} has non-finite"):
        gather_features(split, np.array([5 * 3, 5 * 2 + 3]) if per_caption else np.array([3, 2]))


def test_non_finite_found_past_first_chunk(tmp_path: Path) -> None:
    n = 600
    feats = np.zeros((n, 1, 2), dtype=np.float32)
    feats[517, 0, 1] = np.inf
    write_split(tmp_path, features=feats, captions=[f"c {i}" for i in range(5 * n)])
    _expect_scan_error(tmp_path, "row 517")


def test_progress_reported_for_large_files(tmp_path: Path) -> None:
    n = 10_240
    write_split(
        tmp_path,
        features=np.zeros((n, 1, 1), dtype=np.float32),
        captions=[f"c {i}" for i in range(5 * n)],
    )
    messages: list[str] = []
    split = open_split(tmp_path, "toy", "test")
    scan_finite(split.features, split.ims_path, progress=messages.append)
    assert 5 <= len(messages) <= 11
    assert "test_ims.npy" in messages[-1] and "100%" in messages[-1]
    assert f"{n}/{n}" in messages[-1]
