"""Reader of the IDX files MNIST ships in (plain or gzipped), with checks that name the problem.

IDX layout (big-endian): magic = 0x0000 | type code | number of dimensions, then one uint32
per dimension, then the values. MNIST uses unsigned bytes (type 0x08):
  images: magic 2051 (0x00000803), dims (N, rows, cols), N·rows·cols bytes;
  labels: magic 2049 (0x00000801), dims (N,), N bytes.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


class DataFileError(ValueError):
    """A data file is missing, unreadable, or not what its name says."""


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataFileError(f"data file not found: {path}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataFileError(f"cannot read {path}: {e} (truncated or corrupt gzip?)") from e


def _parse(path: Path, expected_magic: int, ndim: int) -> np.ndarray:
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFileError(f"{path} is {len(raw)} bytes long, shorter than its IDX header "
                            f"({header} bytes)")
    magic = struct.unpack(">i", raw[:4])[0]
    if magic != expected_magic:
        kind = "images" if expected_magic == IMAGES_MAGIC else "labels"
        raise DataFileError(f"{path}: bad magic number {magic}, expected {expected_magic} "
                            f"(MNIST {kind} file)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    need = int(np.prod(dims, dtype=np.int64))
    have = len(raw) - header
    if have != need:
        raise DataFileError(f"{path}: header says shape {tuple(dims)} = {need} bytes of data, "
                            f"the file holds {have}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_images(path: str | Path) -> np.ndarray:
    """(N, rows, cols) uint8 images of an IDX images file (magic 2051)."""
    return _parse(Path(path), IMAGES_MAGIC, 3)


def read_idx_labels(path: str | Path, num_classes: int = 10) -> np.ndarray:
    """(N,) uint8 labels of an IDX labels file (magic 2049), each checked to be < num_classes."""
    labels = _parse(Path(path), LABELS_MAGIC, 1)
    if labels.size and int(labels.max()) >= num_classes:
        i = int(np.argmax(labels >= num_classes))
        raise DataFileError(f"{path}: label {int(labels[i])} at index {i} is not a digit "
                            f"in [0, {num_classes})")
    return labels
