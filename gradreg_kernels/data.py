"""Data sets for training and evaluation: images (N, 1, H, W) float32 in [0, 1], int64 labels.

Specs accepted by ``load_dataset``:
- ``digits``: scikit-learn's bundled handwritten digits (1 797 real 8×8 images, pixel
  values 0..16 scaled to [0, 1]), kept at 8×8; split 80 / 20 (1 437 train / 360 held out).
- ``mnist:PATH``: a folder of the standard MNIST IDX files, gzipped or not. With the
  training files (train-images-idx3-ubyte, train-labels-idx1-ubyte) the standard 60 000 /
  10 000 split is used; with the test files alone (t10k-*) the 10 000 images are split
  8 000 train / 2 000 held out.
Splits are a random permutation drawn from ``torch.Generator().manual_seed(seed)``: the same
seed gives the same split on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .mnist_idx import DataFileError, read_idx_images, read_idx_labels

__all__ = ["DataFileError", "Dataset", "load_dataset"]

MNIST_TEST_ONLY_TRAIN = 8000  # train / held-out split of the 10 000 MNIST test images


@dataclass
class Dataset:
    """A train / held-out split. x: (N, 1, H, W) float32 in [0, 1]; y: (N,) int64."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    name: str

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return tuple(self.train_x.shape[1:])

    def __post_init__(self) -> None:
        for part in ("train", "test"):
            x, y = getattr(self, f"{part}_x"), getattr(self, f"{part}_y")
            if x.dim() != 4 or x.dtype != torch.float32:
                raise ValueError(f"{part}_x must be float32 of shape (N, C, H, W), got "
                                 f"{x.dtype} {tuple(x.shape)}")
            if y.shape != (x.shape[0],) or y.dtype != torch.int64:
                raise ValueError(f"{part}_y must be int64 of shape ({x.shape[0]},), got "
                                 f"{y.dtype} {tuple(y.shape)}")
            if x.shape[0] == 0:
                raise ValueError(f"{part} split is empty")


def _split(x: Tensor, y: Tensor, n_train: int, seed: int) -> tuple[Tensor, ...]:
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(), y[te].contiguous()


def _as_tensors(images: np.ndarray, labels: np.ndarray, scale: float) -> tuple[Tensor, Tensor]:
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / scale).unsqueeze(1)
    return x.contiguous(), torch.from_numpy(np.asarray(labels, dtype=np.int64))


def load_digits_dataset(seed: int = 0) -> Dataset:
    """scikit-learn's 8×8 digits, pixels /16, split 1 437 / 360 by ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the 'digits' data set comes with scikit-learn: pip install "
                          "'gradreg-kernels[train]'") from e

    bunch = load_digits()
    x, y = _as_tensors(bunch.images, bunch.target, 16.0)
    n_train = int(0.8 * x.shape[0])
    return Dataset(*_split(x, y, n_train, seed), num_classes=10, name="digits")


def _find(folder: Path, prefix: str, kind: str) -> Path | None:
    """The IDX file of one part (e.g. prefix 't10k', kind 'images'), gzipped or not."""
    ext = "idx3-ubyte" if kind == "images" else "idx1-ubyte"
    for stem in (f"{prefix}-{kind}-{ext}", f"{prefix}-{kind}.{ext}"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _read_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    img_path, lab_path = _find(folder, prefix, "images"), _find(folder, prefix, "labels")
    missing = [k for k, p in (("images", img_path), ("labels", lab_path)) if p is None]
    if missing:
        raise DataFileError(f"{folder}: no {prefix} {' or '.join(missing)} file "
                            f"({prefix}-{missing[0]}-idx?-ubyte[.gz])")
    images, labels = read_idx_images(img_path), read_idx_labels(lab_path)
    if images.shape[0] != labels.shape[0]:
        raise DataFileError(f"{img_path} holds {images.shape[0]} images but {lab_path} holds "
                            f"{labels.shape[0]} labels")
    return images, labels


def load_mnist(folder: str | Path, seed: int = 0) -> Dataset:
    """MNIST from a folder of IDX files: the standard split, or the test set split 8 000/2 000."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataFileError(f"MNIST folder not found: {folder}")
    test_images, test_labels = _read_pair(folder, "t10k")
    tx, ty = _as_tensors(test_images, test_labels, 255.0)
    has_train = _find(folder, "train", "images") or _find(folder, "train", "labels")
    if has_train:
        train_images, train_labels = _read_pair(folder, "train")
        if train_images.shape[1:] != test_images.shape[1:]:
            raise DataFileError(f"{folder}: train images are {train_images.shape[1:]} but test "
                                f"images are {test_images.shape[1:]}")
        x, y = _as_tensors(train_images, train_labels, 255.0)
        return Dataset(x, y, tx, ty, num_classes=10, name="mnist")
    if tx.shape[0] <= MNIST_TEST_ONLY_TRAIN:
        raise DataFileError(f"{folder}: the test set holds {tx.shape[0]} images, too few for "
                            f"an {MNIST_TEST_ONLY_TRAIN}-image training split")
    return Dataset(*_split(tx, ty, MNIST_TEST_ONLY_TRAIN, seed), num_classes=10,
                   name="mnist-t10k")


def load_dataset(spec: str, seed: int = 0) -> Dataset:
    """The data set named by ``spec``: "digits" or "mnist:PATH" (see the module docstring)."""
    if not isinstance(spec, str):
        raise TypeError(f"data spec must be a string, got {type(spec).__name__}")
    if spec == "digits":
        return load_digits_dataset(seed)
    if spec.startswith("mnist:"):
        path = spec[len("mnist:"):]
        if not path:
            raise ValueError("data spec 'mnist:' needs a folder, e.g. mnist:../shared/data/mnist")
        return load_mnist(path, seed)
    raise ValueError(f"unknown data spec {spec!r}; use 'digits' or 'mnist:PATH'")
