"""Training with the paper's defenses, resumable bit for bit after a crash.

    python -m gradreg_kernels.train --data mnist:../shared/data/mnist --defense gradreg \\
        --epochs 30 --out runs/mnist-gradreg

or, from Python, ``fit(TrainConfig(...))``. With an output folder DIR, each finished epoch
appends one line to DIR/metrics.jsonl and atomically rewrites DIR/checkpoint.pt (model,
optimizer, generator states, epoch, step); SIGINT / SIGTERM write the checkpoint after the
step in flight and stop. ``resume=True`` (``--resume``) continues from DIR/checkpoint.pt and
ends with the same weights as an uninterrupted run of the same settings (bit for bit on the
CPU with the same thread count): the batch order of each epoch is drawn from a generator
seeded by (seed, epoch), and the global generator (dropout masks) is restored.
The trained model is written to DIR/model.pt (see ``load_trained_model``).

Under torchrun (``torchrun --nproc-per-node N -m gradreg_kernels.train ...``) each process
takes an equal contiguous shard of every global batch of B (B divisible by N), the
gradients are averaged over the processes after each backward (one all-reduce), the step
sums behind the metrics are added over them, and rank 0 writes the metrics, checkpoints
and model; ``--resume`` restarts every process from rank 0's checkpoint. The result is the
one-process run's up to the order of floating-point sums (distributed.py; models with
batch norm see their shard's statistics unless converted to SyncBatchNorm).

Each epoch takes ⌊N/B⌋ batches of B shuffled training examples (the last partial batch is
dropped, so every step sees B examples and λ = λ_paper/(2B) holds; with N < B one batch of
all N). Optimizer: Adam(lr, eps = 1e-4 as in the paper).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    from tqdm.auto import tqdm
except ImportError as e:  # a core install: the trainer is the [train] extra
    raise ImportError("gradreg_kernels.train needs tqdm: pip install "
                      "'gradreg-kernels[train]'") from e

from .checkpoint import (
    CHECKPOINT_FORMAT,
    MODEL_FORMAT,
    CheckpointError,
    atomic_torch_save,
    atomic_write_jsonl,
    check_same_run,
    load_checkpoint,
    remove_stale_temp_files,
    rng_states,
    set_rng_states,
)
from .data import Dataset, load_dataset
from .defenses import (
    DEFENSES,
    TRAIN_HEADS,
    StepLoss,
    check_defense,
    default_lam,
    phase_epochs,
    soft_labels,
    step_loss,
    uses_penalty,
)
from .distributed import Processes
from .models import MODEL_NAMES, make_model

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Settings of one training run (the CLI flags of ``python -m gradreg_kernels.train``)."""

    data: str = "digits"            # "digits" or "mnist:PATH"
    model: str = "paper-cnn"        # "paper-cnn", "lenet" or "mlp"
    defense: str = "gradreg"        # one of defenses.DEFENSES
    lam: float | None = None        # None: λ_paper/(2B)·(H·W/784)² (0 without a penalty)
    epochs: int = 20
    batch_size: int = 256
    lr: float = 2e-4
    out: str | None = None          # output folder; None writes nothing
    resume: bool = False
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    max_steps: int | None = None    # stop after this many optimizer steps in all
    width: int | None = None        # hidden width of the model (None: its default)
    adam_eps: float = 1e-4
    head: str = "ce"                # defense "gradreg": one of defenses.TRAIN_HEADS
    label_smoothing: float = 0.0    # the cross-entropy's (defenses gradreg, insensitive)

    def resolved_lam(self, in_shape: tuple[int, int, int] = (1, 28, 28)) -> float:
        """λ in the package's convention; when ``lam`` is None, λ_paper/(2B) scaled by
        (H·W/784)², 1 for MNIST (see defenses.default_lam)."""
        if self.lam is None:
            return default_lam(self.defense, self.batch_size, in_shape)
        return float(self.lam)


@dataclass
class FitResult:
    """The trained model (student at T = 1 for distill), per-epoch metrics, output folder."""

    model: nn.Module
    metrics: list[dict]
    out: Path | None


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after writing a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped by signal {signum}; checkpoint: {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


# Settings that must match for a checkpoint to be resumed.
_RUN_KEYS = ("data", "dataset", "model", "width", "defense", "lam", "batch_size", "lr",
             "adam_eps", "seed", "head", "label_smoothing")


def _validate(cfg: TrainConfig) -> torch.device:
    check_defense(cfg.defense)
    if cfg.model not in MODEL_NAMES:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {MODEL_NAMES}")
    for name in ("epochs", "batch_size"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {cfg.max_steps}")
    if not cfg.lr > 0 or not cfg.adam_eps > 0:
        raise ValueError(f"lr and adam_eps must be > 0, got {cfg.lr} and {cfg.adam_eps}")
    if cfg.lam is not None:
        if not uses_penalty(cfg.defense) and cfg.lam != 0:
            raise ValueError(f"defense {cfg.defense!r} has no input-gradient penalty, so lam "
                             f"({cfg.lam}) would have no effect")
        if not cfg.lam >= 0:
            raise ValueError(f"lam must be >= 0, got {cfg.lam}")
    if cfg.head not in TRAIN_HEADS:
        raise ValueError(f"unknown head {cfg.head!r}; choose one of {TRAIN_HEADS}")
    if cfg.head != "ce" and cfg.defense != "gradreg":
        raise ValueError(f"head {cfg.head!r} applies to defense 'gradreg', not "
                         f"{cfg.defense!r}")
    if not 0.0 <= cfg.label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {cfg.label_smoothing}")
    if cfg.label_smoothing and (cfg.defense not in ("gradreg", "insensitive")
                                or cfg.head != "ce"):
        raise ValueError("label_smoothing applies to the cross-entropy of defenses 'gradreg' "
                         "(head 'ce') and 'insensitive'")
    phase_epochs(cfg.defense, cfg.epochs)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    return device


@dataclass
class _State:
    """Everything a checkpoint restores."""

    model: nn.Module
    opt: torch.optim.Optimizer
    phase: str
    epoch: int = 0                  # epochs completed, over all phases
    step: int = 0                   # optimizer steps taken
    step_in_epoch: int = 0
    sums: dict[str, float] = field(default_factory=dict)    # running sums of this epoch
    metrics: list[dict] = field(default_factory=list)       # records of completed epochs
    teacher_state: dict[str, Tensor] | None = None          # distill: the trained teacher
    seconds: float = 0.0            # wall time spent training and evaluating, all sessions


def _new_model(cfg: TrainConfig, ds: Dataset, device: torch.device) -> nn.Module:
    return make_model(cfg.model, ds.in_shape, ds.num_classes, cfg.width).to(device)


def _new_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps)


def _fresh_state(cfg: TrainConfig, ds: Dataset, device: torch.device) -> _State:
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(cfg.seed)
    model = _new_model(cfg, ds, device)
    return _State(model, _new_optimizer(cfg, model), phase_epochs(cfg.defense, cfg.epochs)[0][0])


def _run_settings(cfg: TrainConfig, ds: Dataset) -> dict[str, Any]:
    settings = asdict(cfg)
    settings["lam"] = cfg.resolved_lam(ds.in_shape)
    settings["dataset"] = (f"{ds.name} {len(ds.train_y)}/{len(ds.test_y)} "
                           f"{'x'.join(map(str, ds.in_shape))}")
    return settings


def _checkpoint(state: _State, cfg: TrainConfig, ds: Dataset, device: torch.device) -> dict:
    return {
        "format": CHECKPOINT_FORMAT, "config": _run_settings(cfg, ds),
        "model": state.model.state_dict(), "optimizer": state.opt.state_dict(),
        "rng": rng_states(device), "epoch": state.epoch, "step": state.step,
        "step_in_epoch": state.step_in_epoch, "phase": state.phase, "sums": dict(state.sums),
        "metrics": list(state.metrics), "teacher": state.teacher_state,
        "seconds": state.seconds,
    }


def _restore(ckpt: dict, cfg: TrainConfig, ds: Dataset, device: torch.device, path: Path
             ) -> _State:
    keys = _RUN_KEYS + (("epochs",) if cfg.defense == "distill" else ())
    check_same_run(ckpt["config"], _run_settings(cfg, ds), keys, path)
    state = _fresh_state(cfg, ds, device)
    try:
        if ckpt["phase"] == "student":
            state.model = _new_model(cfg, ds, device)
            state.opt = _new_optimizer(cfg, state.model)
        state.model.load_state_dict(ckpt["model"])
        state.opt.load_state_dict(ckpt["optimizer"])
        set_rng_states(ckpt["rng"], device)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {e}") from e
    state.phase, state.epoch, state.step = ckpt["phase"], ckpt["epoch"], ckpt["step"]
    state.step_in_epoch, state.sums = ckpt["step_in_epoch"], dict(ckpt["sums"])
    state.metrics, state.teacher_state = list(ckpt["metrics"]), ckpt.get("teacher")
    state.seconds = float(ckpt.get("seconds", 0.0))
    return state


def _start_student(state: _State, cfg: TrainConfig, ds: Dataset, device: torch.device) -> None:
    """Keep the trained teacher and replace it by a fresh student with a fresh optimizer."""
    state.teacher_state = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
    torch.manual_seed(cfg.seed + 1)
    state.model = _new_model(cfg, ds, device)
    state.opt = _new_optimizer(cfg, state.model)
    state.phase = "student"


def _teacher_soft_labels(state: _State, cfg: TrainConfig, ds: Dataset, train_x: Tensor,
                         device: torch.device) -> Tensor:
    if state.teacher_state is None:
        raise CheckpointError("the distillation student phase has no stored teacher")
    teacher = _new_model(cfg, ds, device)
    teacher.load_state_dict(state.teacher_state)
    return soft_labels(teacher, train_x)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode, logits read at T = 1."""
    was_training = model.training
    model.eval()
    correct, ce = 0, 0.0
    for i in range(0, x.shape[0], batch):
        z = model(x[i:i + batch])
        correct += int((z.argmax(1) == y[i:i + batch]).sum())
        ce += float(torch.nn.functional.cross_entropy(z, y[i:i + batch], reduction="sum"))
    model.train(was_training)
    return correct / x.shape[0], ce / x.shape[0]


class _StopOnSignal:
    """Turns SIGINT / SIGTERM into a request to checkpoint and stop (a second one aborts)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    @contextmanager
    def installed(self, active: bool) -> Iterator[_StopOnSignal]:
        if not active or threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _add_step(sums: dict[str, float], sl: StepLoss, y: Tensor) -> None:
    b = y.shape[0]
    sums["loss"] = sums.get("loss", 0.0) + float(sl.loss.detach()) * b
    for k, v in sl.parts.items():
        sums[k] = sums.get(k, 0.0) + float(v) * b
    sums["correct"] = sums.get("correct", 0.0) + float((sl.logits.argmax(1) == y).sum())
    sums["count"] = sums.get("count", 0.0) + b


class _Trainer:
    """One run of ``fit``: the epoch loop over a _State, its files and its progress bar."""

    def __init__(self, cfg: TrainConfig, ds: Dataset, device: torch.device, out: Path | None,
                 state: _State, procs: Processes | None = None) -> None:
        self.cfg, self.ds, self.device, self.state = cfg, ds, device, state
        self.procs = procs or Processes()
        self.out = out if self.procs.leader else None  # rank 0 writes the files
        self.lam = cfg.resolved_lam(ds.in_shape)
        self.num_classes = ds.num_classes
        self.train_x, self.train_y = ds.train_x.to(device), ds.train_y.to(device)
        self.test_x, self.test_y = ds.test_x.to(device), ds.test_y.to(device)
        n, b = self.train_x.shape[0], cfg.batch_size
        self.batch = min(b, n)
        self.batches = max(1, n // b)
        self.phase_end = []
        end = 0
        for phase, e in phase_epochs(cfg.defense, cfg.epochs):
            end += e
            self.phase_end.append((phase, end))
        self.soft: Tensor | None = None
        self.backend = "-"
        self.partial: dict | None = None

    def _phase_of(self, epoch: int) -> str:
        return next(p for p, end in self.phase_end if epoch < end)

    def _steps_left(self) -> bool:
        return self.cfg.max_steps is None or self.state.step < self.cfg.max_steps

    def save_checkpoint(self) -> None:
        if self.out is not None:
            atomic_torch_save(_checkpoint(self.state, self.cfg, self.ds, self.device),
                              self.out / CHECKPOINT_NAME)

    def run(self, stop: _StopOnSignal) -> None:
        st = self.state
        while st.epoch < self.cfg.epochs and self._steps_left():
            phase = self._phase_of(st.epoch)
            if phase == "student" and st.phase != "student":
                _start_student(st, self.cfg, self.ds, self.device)
            if st.phase == "student" and self.soft is None:
                self.soft = _teacher_soft_labels(st, self.cfg, self.ds, self.train_x,
                                                 self.device)
            self._epoch(stop)
            if stop.signum is not None:
                raise TrainingInterrupted(stop.signum, self._ckpt_path())

    def _ckpt_path(self) -> Path | None:
        return None if self.out is None else self.out / CHECKPOINT_NAME

    def _epoch(self, stop: _StopOnSignal) -> None:
        st, cfg = self.state, self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st.epoch)
        order = torch.randperm(self.train_x.shape[0], generator=gen).to(self.device)
        t0, steps = time.perf_counter(), 0
        bar = tqdm(total=self.batches, initial=st.step_in_epoch, unit="step", leave=False,
                   desc=f"epoch {st.epoch + 1}/{cfg.epochs} {st.phase}",
                   disable=not cfg.progress, dynamic_ncols=True)
        with bar:
            while st.step_in_epoch < self.batches and self._steps_left():
                i = st.step_in_epoch * self.batch
                idx = self.procs.shard(order[i:i + self.batch])
                x, y = self.train_x[idx], self.train_y[idx]
                st.model.train()
                st.opt.zero_grad(set_to_none=True)
                sl = step_loss(cfg.defense, st.phase, st.model, x, y, self.lam,
                               None if self.soft is None else self.soft[idx], cfg.head,
                               cfg.label_smoothing, self.num_classes)
                sl.loss.backward()
                self.procs.average_gradients(st.model)
                st.opt.step()
                step_sums: dict[str, float] = {}
                _add_step(step_sums, sl, y)
                for k, v in self.procs.add_up(step_sums).items():
                    st.sums[k] = st.sums.get(k, 0.0) + v
                st.step, st.step_in_epoch, steps = st.step + 1, st.step_in_epoch + 1, steps + 1
                self.backend = sl.backend
                bar.update(1)
                if cfg.progress:
                    bar.set_postfix(self._postfix(), refresh=False)
                if stop.signum is not None:
                    self.save_checkpoint()
                    raise TrainingInterrupted(stop.signum, self._ckpt_path())
        self._end_epoch(t0, steps)

    def _postfix(self) -> dict[str, str]:
        s = self.state.sums
        out = {"loss": f"{s['loss'] / s['count']:.4f}"}
        if "penalty" in s:
            out["pen"] = f"{s['penalty'] / s['count']:.3g}"
        out["acc"] = f"{s['correct'] / s['count']:.3f}"
        return out

    def _end_epoch(self, t0: float, steps: int) -> None:
        st, cfg = self.state, self.cfg
        complete = st.step_in_epoch >= self.batches
        seconds = time.perf_counter() - t0
        test_acc, test_ce = evaluate(st.model, self.test_x, self.test_y)
        st.seconds += time.perf_counter() - t0
        n = st.sums.get("count", 0.0) or 1.0
        record = {"epoch": st.epoch + 1, "phase": st.phase, "step": st.step,
                  "complete": complete, "lam": self.lam, "backend": self.backend}
        record.update({f"train_{k}": v / n for k, v in st.sums.items()
                       if k not in ("correct", "count")})
        record.update({"train_acc": st.sums.get("correct", 0.0) / n, "test_acc": test_acc,
                       "test_ce": test_ce, "epoch_seconds": seconds,
                       "elapsed_seconds": st.seconds,
                       "steps_per_second": steps / seconds if seconds > 0 else None})
        if complete:
            st.epoch, st.step_in_epoch, st.sums = st.epoch + 1, 0, {}
            st.metrics.append(record)
        else:
            self.partial = record
        if cfg.progress:
            tqdm.write(_summary(record, cfg.epochs), file=sys.stderr)
        if self.out is not None:
            with open(self.out / METRICS_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.save_checkpoint()


def _summary(r: dict, epochs: int) -> str:
    pen = f" penalty {r['train_penalty']:.4g}" if "train_penalty" in r else ""
    sps = r["steps_per_second"]
    return (f"epoch {r['epoch']}/{epochs} [{r['phase']}] step {r['step']}: loss "
            f"{r.get('train_loss', float('nan')):.4f}{pen} train acc {r['train_acc']:.4f} "
            f"held-out acc {r['test_acc']:.4f} ({sps or 0:.1f} steps/s, {r['backend']})")


def _prepare_out(cfg: TrainConfig) -> tuple[Path | None, dict | None]:
    """The output folder and the checkpoint to resume from (None to start afresh)."""
    if cfg.out is None:
        if cfg.resume:
            raise ValueError("resume needs an output folder (out / --out)")
        return None, None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _resume_checkpoint(cfg, out)
    for name in (CHECKPOINT_NAME, MODEL_NAME, METRICS_NAME):
        remove_stale_temp_files(out, name)
    return out, ckpt


def _resume_checkpoint(cfg: TrainConfig, out: Path) -> dict | None:
    """OUT/checkpoint.pt when resuming and it exists, else None (start afresh)."""
    path = out / CHECKPOINT_NAME
    return load_checkpoint(path) if cfg.resume and path.exists() else None


def fit(cfg: TrainConfig, dataset: Dataset | None = None) -> FitResult:
    """Train ``cfg.model`` with ``cfg.defense`` on ``dataset`` (default: load_dataset(cfg.data)).

    Files (when cfg.out is set): metrics.jsonl, checkpoint.pt, model.pt. The data and any
    checkpoint to resume are checked before anything is written, so a bad file never
    replaces a good checkpoint. Raises TrainingInterrupted after SIGINT / SIGTERM (with the
    checkpoint written).
    """
    device = _validate(cfg)
    ds = dataset if dataset is not None else load_dataset(cfg.data)
    procs = Processes.from_env(device)
    try:
        result = _fit(cfg, ds, device, procs)
        procs.barrier()  # no rank's collective still in flight when the group is destroyed
        return result
    finally:
        procs.close()


def _fit(cfg: TrainConfig, ds: Dataset, device: torch.device, procs: Processes) -> FitResult:
    if cfg.batch_size % procs.world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the "
                         f"{procs.world} processes (each takes an equal shard)")
    if procs.leader:
        out, ckpt = _prepare_out(cfg)
    procs.barrier()
    if not procs.leader:  # the leader prepared the folder; the others read its checkpoint
        out = None if cfg.out is None else Path(cfg.out)
        ckpt = None if out is None else _resume_checkpoint(cfg, out)
    if ckpt is not None and out is not None:
        state = _restore(ckpt, cfg, ds, device, out / CHECKPOINT_NAME)
        if procs.leader:
            atomic_write_jsonl(state.metrics, out / METRICS_NAME)
    else:
        state = _fresh_state(cfg, ds, device)
        if out is not None and procs.leader:
            atomic_write_jsonl([], out / METRICS_NAME)
    trainer = _Trainer(cfg, ds, device, out, state, procs)
    with _StopOnSignal().installed(out is not None) as stop:
        trainer.run(stop)
    state.model.eval()
    if out is not None and procs.leader:
        atomic_torch_save(_model_file(state.model, cfg, ds), out / MODEL_NAME)
    metrics = state.metrics + ([trainer.partial] if trainer.partial else [])
    return FitResult(state.model, metrics, out)


def _model_file(model: nn.Module, cfg: TrainConfig, ds: Dataset) -> dict[str, Any]:
    return {"format": MODEL_FORMAT, "model": cfg.model, "width": cfg.width,
            "in_shape": list(ds.in_shape), "num_classes": ds.num_classes,
            "defense": cfg.defense, "lam": cfg.resolved_lam(ds.in_shape), "temperature": 1.0,
            "state_dict": model.state_dict()}


def load_trained_model(path: str | Path, device: str = "cpu") -> nn.Sequential:
    """The model saved as DIR/model.pt by ``fit``, in eval mode (logits read at T = 1)."""
    blob = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a {MODEL_FORMAT} file")
    model = make_model(blob["model"], tuple(blob["in_shape"]), blob["num_classes"],
                       blob["width"]).to(device)
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m gradreg_kernels.train",
        description="Train a classifier with one of the paper's defenses. With no arguments: "
                    "the paper CNN with gradreg on the bundled 8x8 digits, into runs/default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=d.data,
                   help="'digits' (scikit-learn's 8x8 digits, 1437 train / 360 held out) or "
                        "'mnist:PATH' (folder of MNIST IDX files, .gz or plain; the t10k files "
                        "alone are split 8000 / 2000)")
    p.add_argument("--model", default=d.model, choices=MODEL_NAMES, help="architecture")
    p.add_argument("--width", type=int, default=d.width,
                   help="hidden width (paper-cnn FC 1024, lenet FC 120, mlp 512 when unset)")
    p.add_argument("--defense", default=d.defense, choices=DEFENSES,
                   help="training objective (see docs/training.md)")
    p.add_argument("--lam", type=float, default=d.lam,
                   help="penalty weight λ = λ_paper/(2B); unset: λ_paper = 10^4.75 "
                        "(gradreg, gradreg-fd, advtrain+gradreg) or 1000 (insensitive), "
                        "times (H*W/784)^2 for images other than 28x28")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="passes over the training set (distill: half teacher, half student)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size B")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--adam-eps", type=float, default=d.adam_eps, help="Adam epsilon")
    p.add_argument("--out", default="runs/default",
                   help="output folder: metrics.jsonl, checkpoint.pt, model.pt")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (starts afresh if there is none)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of initialization, batch order and dropout")
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    p.add_argument("--max-steps", type=int, default=d.max_steps,
                   help="stop after this many optimizer steps in all (unset: no limit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or epoch lines")
    p.add_argument("--head", default=d.head, choices=TRAIN_HEADS,
                   help="defense gradreg: the penalised loss at the logits (ce; mse or bce "
                        "on one-hot labels)")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="label smoothing of the cross-entropy (defenses gradreg, insensitive)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(data=args.data, model=args.model, defense=args.defense, lam=args.lam,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      out=args.out, resume=args.resume, seed=args.seed, device=args.device,
                      progress=not args.no_progress, max_steps=args.max_steps,
                      width=args.width, adam_eps=args.adam_eps, head=args.head,
                      label_smoothing=args.label_smoothing)
    t0 = time.perf_counter()
    try:
        result = fit(cfg)
    except TrainingInterrupted as e:
        print(f"\nstopped by signal {e.signum}; checkpoint written to {e.checkpoint}; "
              "continue with --resume", file=sys.stderr)
        return 128 + e.signum
    except (ValueError, OSError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = result.metrics[-1] if result.metrics else {}
    print(f"done in {time.perf_counter() - t0:.1f} s: held-out accuracy "
          f"{last.get('test_acc', float('nan')):.4f} after {last.get('step', 0)} steps "
          f"({cfg.defense}, {last.get('backend', '-')}); model: "
          f"{'-' if result.out is None else result.out / MODEL_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
