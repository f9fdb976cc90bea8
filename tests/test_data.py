"""Data loading: scikit-learn digits, the MNIST IDX reader and its errors, the splits."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gradreg_kernels.data import DataFileError, Dataset, load_dataset
from gradreg_kernels.mnist_idx import read_idx_images, read_idx_labels

SHARED_MNIST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(f">i{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _write(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _mnist_folder(folder: Path, prefix: str, n: int, size: int = 4, gz: bool = True,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    ext = ".gz" if gz else ""
    _write(folder / f"{prefix}-images-idx3-ubyte{ext}", _idx_bytes(2051, images))
    _write(folder / f"{prefix}-labels-idx1-ubyte{ext}", _idx_bytes(2049, labels))
    return images, labels


def test_digits_is_real_scaled_and_split():
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    for x in (ds.train_x, ds.test_x):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(ds.train_y.tolist()) == set(range(10))
    # the split is a partition of the 1 797 images, the same for the same seed
    from sklearn.datasets import load_digits
    all_x = torch.from_numpy(load_digits().images.astype(np.float32) / 16)
    together = torch.cat([ds.train_x, ds.test_x]).squeeze(1)
    assert torch.equal(together.sum(0), all_x.sum(0))
    again, other = load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(again.train_x, ds.train_x)
    assert not torch.equal(other.train_x, ds.train_x)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images, labels = _mnist_folder(tmp_path, "t10k", 7, size=5, gz=gz)
    ext = ".gz" if gz else ""
    assert np.array_equal(read_idx_images(tmp_path / f"t10k-images-idx3-ubyte{ext}"), images)
    assert np.array_equal(read_idx_labels(tmp_path / f"t10k-labels-idx1-ubyte{ext}"), labels)


def test_idx_errors_name_the_problem(tmp_path):
    imgs = np.zeros((3, 4, 4), np.uint8) + 7
    with pytest.raises(DataFileError, match="not found"):
        read_idx_images(tmp_path / "nothing-idx3-ubyte")
    bad_magic = _write(tmp_path / "a-idx3-ubyte", _idx_bytes(2049, imgs))
    with pytest.raises(DataFileError, match="bad magic number 2049, expected 2051"):
        read_idx_images(bad_magic)
    short = _write(tmp_path / "b-idx3-ubyte", _idx_bytes(2051, imgs)[:-5])
    with pytest.raises(DataFileError, match=r"shape \(3, 4, 4\) = 48 bytes.*holds 43"):
        read_idx_images(short)
    tiny = _write(tmp_path / "c-idx3-ubyte", b"\x00\x00")
    with pytest.raises(DataFileError, match="shorter than its IDX header"):
        read_idx_images(tiny)
    good_gz = gzip.compress(_idx_bytes(2051, imgs))
    torn = _write(tmp_path / "d-idx3-ubyte.gz", b"")
    torn.write_bytes(good_gz[: len(good_gz) // 2])
    with pytest.raises(DataFileError, match="corrupt gzip"):
        read_idx_images(torn)
    bad_label = _write(tmp_path / "e-idx1-ubyte", _idx_bytes(2049, np.array([1, 12, 3])))
    with pytest.raises(DataFileError, match="label 12 at index 1"):
        read_idx_labels(bad_label)


def test_mnist_test_set_alone_is_split_8000_2000(tmp_path):
    images, labels = _mnist_folder(tmp_path, "t10k", 10000, size=4, gz=False)
    ds = load_dataset(f"mnist:{tmp_path}", seed=3)
    assert len(ds.train_y) == 8000 and len(ds.test_y) == 2000
    assert ds.train_x.shape[1:] == (1, 4, 4)
    assert torch.equal(torch.sort(torch.cat([ds.train_y, ds.test_y])).values,
                       torch.sort(torch.from_numpy(labels.astype(np.int64))).values)
    assert float(ds.train_x.max()) <= 1.0 and float(ds.train_x.min()) >= 0.0
    assert torch.equal(load_dataset(f"mnist:{tmp_path}", seed=3).test_x, ds.test_x)


def test_mnist_with_training_files_uses_standard_split(tmp_path):
    _mnist_folder(tmp_path, "train", 30, gz=True, seed=1)
    test_images, test_labels = _mnist_folder(tmp_path, "t10k", 11, gz=False, seed=2)
    ds = load_dataset(f"mnist:{tmp_path}")
    assert len(ds.train_y) == 30 and len(ds.test_y) == 11
    assert torch.equal(ds.test_x.squeeze(1) * 255, torch.from_numpy(test_images).float())


def test_mnist_folder_errors(tmp_path):
    with pytest.raises(DataFileError, match="MNIST folder not found"):
        load_dataset(f"mnist:{tmp_path / 'missing'}")
    with pytest.raises(DataFileError, match="no t10k images or labels"):
        load_dataset(f"mnist:{tmp_path}")
    _mnist_folder(tmp_path, "t10k", 20, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(2049, np.arange(5) % 10))
    with pytest.raises(DataFileError, match="20 images but .* 5 labels"):
        load_dataset(f"mnist:{tmp_path}")
    with pytest.raises(ValueError, match="unknown data spec"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="needs a folder"):
        load_dataset("mnist:")


def test_dataset_checks_its_fields():
    x, y = torch.rand(4, 1, 3, 3), torch.arange(4)
    with pytest.raises(ValueError, match="train_y must be int64"):
        Dataset(x, y.int(), x, y, 10, "t")


@pytest.mark.skipif(not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="the shared MNIST test set is not beside the checkout")
def test_shared_mnist_test_set():
    ds = load_dataset(f"mnist:{SHARED_MNIST}")
    assert ds.train_x.shape == (8000, 1, 28, 28) and ds.test_x.shape == (2000, 1, 28, 28)
    assert float(ds.train_x.max()) == 1.0 and float(ds.train_x.min()) == 0.0
    assert torch.bincount(ds.test_y, minlength=10).min() > 100
