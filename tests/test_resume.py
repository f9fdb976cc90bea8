"""Checkpoints: resume after kill -9 or a signal gives the uninterrupted run's weights bit for
bit; a corrupt checkpoint or data file is reported and never overwrites the last good one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gradreg_kernels import checkpoint as ckpt_mod
from gradreg_kernels.checkpoint import CheckpointError
from gradreg_kernels.data import DataFileError, Dataset, load_dataset
from gradreg_kernels.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_digits() -> Dataset:
    ds = load_dataset("digits")
    return Dataset(ds.train_x[:200], ds.train_y[:200], ds.test_x[:50], ds.test_y[:50], 10,
                   "digits-small")


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("model,defense,stop_at", [
    ("paper-cnn", "gradreg", 6),        # BN + dropout, stopped mid-epoch
    ("mlp", "distill", 6),              # stopped in the student phase (epochs 2-3)
    ("mlp", "gradreg-fd", 4),           # stopped at an epoch boundary
])
def test_resume_in_process_is_bit_exact(tmp_path, small_digits, model, defense, stop_at):
    base = dict(model=model, width=16, defense=defense, epochs=3 if model == "mlp" else 2,
                batch_size=50, progress=False, seed=3)
    full = fit(TrainConfig(**base, out=str(tmp_path / "full")), small_digits)
    part = fit(TrainConfig(**base, out=str(tmp_path / "cut"), max_steps=stop_at), small_digits)
    assert part.metrics[-1]["step"] == stop_at
    resumed = fit(TrainConfig(**base, out=str(tmp_path / "cut"), resume=True), small_digits)
    _same_weights(full.model.state_dict(), resumed.model.state_dict())
    strip = ("epoch_seconds", "steps_per_second", "elapsed_seconds")
    assert ([{k: v for k, v in r.items() if k not in strip} for r in full.metrics]
            == [{k: v for k, v in r.items() if k not in strip} for r in resumed.metrics])
    saved = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    _same_weights(full.model.state_dict(), saved)


# Long enough that a signal sent once the first checkpoint exists lands mid-training even
# on the C++ backend, where an epoch of this tiny run takes milliseconds.
CLI_EPOCHS = 60


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gradreg_kernels.train", "--data", "digits", "--model", "mlp",
            "--width", "12", "--defense", "gradreg", "--epochs", str(CLI_EPOCHS),
            "--batch-size", "256",
            "--lr", "3e-3", "--seed", "5", "--no-progress", "--out", str(out), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.005)


def test_cli_resume_after_kill_9_and_sigterm_is_bit_exact(tmp_path):
    """Three CLI runs side by side: one uninterrupted, one killed with SIGKILL and one
    stopped with SIGTERM once their first checkpoint exists; both resume to its weights."""
    ref = subprocess.Popen(_cli(tmp_path / "ref"), env=_env(), stderr=subprocess.PIPE)
    victims = {sig: subprocess.Popen(_cli(tmp_path / sig.name), env=_env(),
                                     stderr=subprocess.PIPE)
               for sig in (signal.SIGKILL, signal.SIGTERM)}
    for sig, proc in victims.items():
        _wait_for(tmp_path / sig.name / "checkpoint.pt", proc)
        proc.send_signal(sig)
    for sig, proc in victims.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == (-9 if sig == signal.SIGKILL else 128 + signal.SIGTERM), err
        assert not (tmp_path / sig.name / "model.pt").exists(), "the run ended before the kill"
        stopped = torch.load(tmp_path / sig.name / "checkpoint.pt", weights_only=True)
        assert 0 < stopped["step"] < CLI_EPOCHS * 5
    resumed = {sig: subprocess.Popen(_cli(tmp_path / sig.name, "--resume"), env=_env(),
                                     stderr=subprocess.PIPE) for sig in victims}
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    a = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)["state_dict"]
    for sig, proc in resumed.items():
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
        b = torch.load(tmp_path / sig.name / "model.pt", weights_only=True)["state_dict"]
        _same_weights(a, b)
        lines = (tmp_path / sig.name / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == CLI_EPOCHS


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path, small_digits):
    cfg = TrainConfig(model="mlp", width=8, epochs=1, batch_size=50, progress=False,
                      out=str(tmp_path), resume=True)
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="unreadable.*left as is"):
        fit(cfg, small_digits)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not (tmp_path / "model.pt").exists()


def test_checkpoint_of_another_run_is_refused(tmp_path, small_digits):
    base = dict(model="mlp", width=8, epochs=2, batch_size=50, progress=False, out=str(tmp_path))
    fit(TrainConfig(**base, max_steps=1), small_digits)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.0002, now 0.01"):
        fit(TrainConfig(**base, lr=1e-2, resume=True), small_digits)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_corrupt_data_never_touches_the_checkpoint(tmp_path):
    data = tmp_path / "mnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10000, 4, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, size=10000, dtype=np.uint8)
    head = np.array([2051, 10000, 4, 4], ">i4").tobytes()
    (data / "t10k-images-idx3-ubyte").write_bytes(head + images.tobytes())
    (data / "t10k-labels-idx1-ubyte").write_bytes(np.array([2049, 10000], ">i4").tobytes()
                                                   + labels.tobytes())
    cfg = dict(data=f"mnist:{data}", model="mlp", width=8, epochs=1, batch_size=1000,
               progress=False, out=str(tmp_path / "run"), max_steps=2)
    fit(TrainConfig(**cfg))
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    (data / "t10k-images-idx3-ubyte").write_bytes(head + images.tobytes()[:-100])
    with pytest.raises(DataFileError, match="holds 159900"):
        fit(TrainConfig(**{**cfg, "max_steps": None}, resume=True))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_a_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch, small_digits):
    cfg = dict(model="mlp", width=8, epochs=3, batch_size=50, progress=False, out=str(tmp_path))
    fit(TrainConfig(**cfg, max_steps=1), small_digits)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        fit(TrainConfig(**cfg, resume=True), small_digits)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
