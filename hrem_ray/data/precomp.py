"""Memory-mapped reader of the "precomp" region-feature format (docs/data.md).

The reference loads the whole ``<split>_ims.npy`` into RAM (8.5 GB for f30k train, 33 GB for
coco); here it stays memory-mapped and a batch is gathered with one fancy-index read.
Opening a split reads only the ``.npy`` header and the captions, so a driver that opens a
split never reads the features: non-finite values are found where rows are read
(``check_finite`` on every gathered batch), and ``scan_finite`` (``hrem-ray check-data``)
reads a whole file on purpose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from hrem_ray.fileio import write_files_atomic
from hrem_ray.progress import Progress

CAPTIONS_PER_IMAGE = 5
SCAN_CHUNK_ROWS = 256  # rows per finiteness-scan read: bounds memory to ~75 MB for 36x2048
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


def write_split(
    data_path: str | Path,
    dataset: str,
    split: str,
    chunks: Iterable[tuple[list[str], np.ndarray]],
    shape: tuple[int, int, int],
    *,
    dtype: str = "float32",
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, Path]:
    """Write a split in the precomp format from ``(captions, features)`` chunks of consecutive
    images (5 captions each): ``<split>_ims.npy`` and ``<split>_caps.txt``, both or neither.

    The features are written through a mapping reopened for every chunk, so a split of any
    size never holds more than one chunk of pages in this process.
    """
    n = shape[0]
    name = f"{dataset}_precomp/{split}"
    if progress:
        progress(f"{name}: {n} images, {n * CAPTIONS_PER_IMAGE} captions")

    def write(tmps: list[Path]) -> None:
        ims_tmp, caps_tmp = tmps
        np.lib.format.open_memmap(ims_tmp, mode="w+", dtype=dtype, shape=shape)  # header
        done, reported = 0, 0
        with open(caps_tmp, "w", encoding="utf-8", newline="\n") as caps:
            for captions, feats in chunks:
                ims = np.lib.format.open_memmap(ims_tmp, mode="r+")
                ims[done : done + len(feats)] = feats
                ims.flush()
                del ims
                caps.writelines(c + "\n" for c in captions)
                done += len(feats)
                if progress and done < n and done * 10 // n > reported:
                    reported = done * 10 // n
                    progress(f"{name}: {done}/{n} images")
        if done != n:
            raise ValueError(f"{name}: {done} images written, {n} expected")

    ims, caps = write_files_atomic(split_paths(data_path, dataset, split), write)
    return ims, caps


def open_split(data_path: str | Path, dataset: str, split: str) -> PrecompSplit:
    """Validate and open one split from its header and captions; every problem is a
    ``PrecompError`` naming its file. The features are not read (see ``scan_finite``)."""
    ims_path, caps_path = split_paths(data_path, dataset, split)
    for path, what in ((ims_path, "region features"), (caps_path, "captions")):
        if not path.is_file():
            raise PrecompError(f"{path}: {what} file not found")
    features = open_features(ims_path)
    captions = read_captions(caps_path)
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
    return PrecompSplit(
        ims_path=ims_path,
        caps_path=caps_path,
        features=features,
        captions=captions,
        per_caption=rows == n_captions,
        n_images=n_images,
        n_captions=n_captions,
    )


def open_features(path: str | Path) -> np.ndarray:
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


def npy_header(f: BinaryIO, name: str | Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of the C-ordered ``.npy`` whose start ``f`` reads."""
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)  # fmt: skip
        if read is None:
            raise ValueError(f".npy format version {version} is not 1.0 or 2.0")
        shape, fortran, dtype = read(f)
    except (ValueError, OSError, SyntaxError, EOFError) as e:
        raise PrecompError(f"{name}: not an .npy array ({e})") from None
    if fortran:
        raise PrecompError(f"{name}: Fortran-ordered array")
    return tuple(shape), np.dtype(dtype), f.tell()


def read_captions(path: str | Path) -> list[str]:
    """One caption per line; only the line ending is stripped (captions keep their spaces)."""
    return parse_captions(Path(path).read_bytes(), path)


def parse_captions(data: bytes, name: str | Path) -> list[str]:
    """The captions of a captions file's bytes; ``name`` names the file in errors."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrecompError(f"{name}: not valid UTF-8 ({e})") from None
    if not text:
        raise PrecompError(f"{name}: captions file is empty")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # universal newlines
    if lines[-1] == "":
        lines.pop()
    captions = lines
    for number, caption in enumerate(captions, start=1):
        if not caption.strip():
            raise PrecompError(f"{name}: line {number} is an empty caption")
    return captions


def check_finite(block: np.ndarray, name: str | Path, rows: np.ndarray | None = None) -> None:
    """Raise naming the first row of ``block`` with a NaN or inf; ``rows`` are the file rows
    that ``block`` holds (default: its own row numbers)."""
    bad = np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))
    if bad.size:
        row = int(bad[0]) if rows is None else int(np.asarray(rows).reshape(-1)[bad[0]])
        raise PrecompError(f"{name}: row {row} has non-finite values")


def scan_finite(
    features: np.ndarray, name: str | Path, progress: Callable[[str], None] | None = None
) -> None:
    """Read every row in bounded chunks (never the whole file at once) and check it is finite."""
    rows = features.shape[0]
    bar = Progress(f"{Path(name).name}: NaN/inf scan", rows, progress)
    for start in range(0, rows, SCAN_CHUNK_ROWS):
        chunk = np.asarray(features[start : start + SCAN_CHUNK_ROWS])
        check_finite(chunk, name, np.arange(start, start + len(chunk)))
        bar.update(len(chunk))
