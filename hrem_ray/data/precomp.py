"""Memory-mapped reader of the "precomp" region-feature format (spec section 1).

The reference loads the whole ``<split>_ims.npy`` into RAM (8.5 GB for f30k train, 33 GB for
coco); here it stays memory-mapped and a batch is gathered with one fancy-index read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CAPTIONS_PER_IMAGE = 5
SCAN_CHUNK_ROWS = 256  # rows per finiteness-scan read: bounds memory to ~75 MB for 36x2048
PROGRESS_MIN_ROWS = 10_000  # report scan progress only for files at least this large
_FEATURE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


class PrecompError(ValueError):
    """A precomp file that cannot be used; the message names the file and the problem."""


@dataclass
class PrecompSplit:
    """One split: memory-mapped features plus its captions.

    ``per_caption`` is the layout where each image's row is repeated for its 5 captions.
    The logical image id of caption ``c`` is ``c // 5`` in both layouts.
    """

    ims_path: Path
    caps_path: Path
    features: np.ndarray
    captions: list[str]
    per_caption: bool
    n_images: int
    n_captions: int

    def feature_rows(self, caption_ids: np.ndarray) -> np.ndarray:
        """Feature row holding the image of each caption."""
        caption_ids = np.asarray(caption_ids, dtype=np.int64)
        return caption_ids if self.per_caption else caption_ids // CAPTIONS_PER_IMAGE

    def image_rows(self) -> np.ndarray:
        """One feature row per unique image, in image-id order."""
        step = CAPTIONS_PER_IMAGE if self.per_caption else 1
        return np.arange(self.n_images, dtype=np.int64) * step

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """``features[rows]`` as a float32 copy, read from disk once per distinct row.

        Rows are sorted and de-duplicated first so the memmap read is sequential-ish and a
        repeated row (per-image layout, 5 captions of one image) is read only once.
        """
        rows = np.asarray(rows, dtype=np.int64)
        unique, inverse = np.unique(rows, return_inverse=True)
        block = np.asarray(self.features[unique], dtype=np.float32)
        if unique.size == rows.size and np.array_equal(unique, rows):
            return block
        return block[inverse.reshape(-1)]


def split_paths(data_path: str | Path, dataset: str, split: str) -> tuple[Path, Path]:
    """``<data_path>/<dataset>_precomp/<split>_ims.npy`` and ``<split>_caps.txt``."""
    folder = Path(data_path) / f"{dataset}_precomp"
    return folder / f"{split}_ims.npy", folder / f"{split}_caps.txt"


def open_split(
    data_path: str | Path,
    dataset: str,
    split: str,
    *,
    check_finite: bool = True,
    progress: Callable[[str], None] | None = None,
) -> PrecompSplit:
    """Validate and open one split; every problem is a ``PrecompError`` naming its file."""
    ims_path, caps_path = split_paths(data_path, dataset, split)
    for path, what in ((ims_path, "region features"), (caps_path, "captions")):
        if not path.is_file():
            raise PrecompError(f"{path}: {what} file not found")
    features = _open_features(ims_path)
    captions = _read_captions(caps_path)
    n_captions = len(captions)
    if n_captions % CAPTIONS_PER_IMAGE:
        raise PrecompError(
            f"{caps_path}: {n_captions} captions is not a multiple of {CAPTIONS_PER_IMAGE}"
        )
    n_images = n_captions // CAPTIONS_PER_IMAGE
    rows = features.shape[0]
    if rows not in (n_images, n_captions):
        raise PrecompError(
            f"{ims_path}: {rows} feature rows match neither the {n_images} images nor the "
            f"{n_captions} captions of {caps_path}"
        )
    if check_finite:
        _check_finite(ims_path, features, progress)
    return PrecompSplit(
        ims_path=ims_path,
        caps_path=caps_path,
        features=features,
        captions=captions,
        per_caption=rows == n_captions,
        n_images=n_images,
        n_captions=n_captions,
    )


def _open_features(path: Path) -> np.ndarray:
    """Memory-map the .npy (header read only) and check dtype and rank."""
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise PrecompError(f"{path}: not a readable .npy array ({e})") from None
    if not isinstance(features, np.ndarray):
        raise PrecompError(f"{path}: expected a single .npy array, got {type(features).__name__}")
    if features.dtype not in _FEATURE_DTYPES:
        raise PrecompError(f"{path}: dtype {features.dtype} is not float16 or float32")
    if features.ndim != 3:
        raise PrecompError(
            f"{path}: expected [rows, regions, dim] (3 dimensions), got shape {features.shape}"
        )
    return features


def _read_captions(path: Path) -> list[str]:
    """One caption per line; only the line ending is stripped (captions keep their spaces)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PrecompError(f"{path}: not valid UTF-8 ({e})") from None
    if not text:
        raise PrecompError(f"{path}: captions file is empty")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    captions = [line[:-1] if line.endswith("\r") else line for line in lines]
    for number, caption in enumerate(captions, start=1):
        if not caption.strip():
            raise PrecompError(f"{path}: line {number} is an empty caption")
    return captions


def _check_finite(path: Path, features: np.ndarray, progress: Callable[[str], None] | None) -> None:
    """Scan in bounded chunks (never the whole file at once) for NaN/inf; name the first bad row."""
    rows = features.shape[0]
    report_every = max(rows // 10, 1) if progress and rows > PROGRESS_MIN_ROWS else 0
    next_report = report_every
    for start in range(0, rows, SCAN_CHUNK_ROWS):
        chunk = np.asarray(features[start : start + SCAN_CHUNK_ROWS])
        bad = np.flatnonzero(~np.isfinite(chunk).all(axis=(1, 2)))
        if bad.size:
            raise PrecompError(f"{path}: row {start + int(bad[0])} has non-finite values")
        done = min(start + SCAN_CHUNK_ROWS, rows)
        if progress is not None and report_every and done >= next_report:
            progress(f"{path.name}: checked {done}/{rows} rows ({100 * done // rows}%) for NaN/inf")
            next_report += report_every
