"""Choosing the gradreg λ the paper's way: a grid, scored on adversarial validation examples.

    python -m gradreg_kernels.experiments lambda --data mnist:PATH --model paper-cnn
                                                 --out DIR [--quick]

1. The last ``n_val`` images of the training split are held out as validation images; the
   models train on the rest, and the experiment's test images are never touched.
2. A normal (undefended) model trains on that split, then one gradreg model per grid point
   λ_paper ∈ logspace(2, 5, 13) (the package's λ = λ_paper / (2B), B = 256), each with the
   fused step, the same seed, epochs and optimizer.
3. Each model is scored on the validation images: clean accuracy, and the *score*
   s = mean over ε ∈ VAL_EPS of the accuracy on FGSM examples crafted on the normal model
   (the paper's transfer setting, the one its claim 1 is about); white-box FGSM accuracy is
   reported beside it. Every number carries a bootstrap interval over the images.
4. The chosen λ maximizes s among the *eligible* grid points, those whose clean validation
   accuracy is within UNDERFIT_GAP of the normal model's (a model that has not learned the
   task is not a defense); ties go to the smaller λ. Grid points whose paired score
   difference to the chosen one has an interval holding 0 are reported as
   indistinguishable from it.

Writes DIR/results.json, DIR/report.md and DIR/lambda.png; trained models stay under
DIR/models/ and a rerun resumes or reuses them (``fit`` with resume), so a killed grid
loses at most the epoch in progress.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..attacks import fgsm
from ..data import Dataset
from ..transfer import write_json
from .bootstrap import Interval, mean_interval, paired_difference
from .paper import _predict

#: λ_paper of the paper's grid, logspace(2, 5, 13)
PAPER_GRID = [10 ** (2 + 0.25 * i) for i in range(13)]
VAL_EPS = [0.1, 0.2, 0.3]
UNDERFIT_GAP = 0.05
BATCH = 256


def package_lam(lam_paper: float, in_shape: tuple[int, ...] = (1, 28, 28),
                batch_size: int = BATCH) -> float:
    """The package's per-example λ for the paper's λ_paper: λ_paper / (2B), scaled by
    (H·W / 784)² for images other than MNIST's (as defenses.default_lam)."""
    pixels = int(in_shape[-1]) * int(in_shape[-2])
    return lam_paper / (2 * batch_size) * (pixels / (28 * 28)) ** 2


@dataclass
class LambdaConfig:
    """What to run; None fields take the mode's default (see ``plan``)."""

    data: str = "mnist:../shared/data/mnist"
    out: str = "runs/lambda"
    model: str = "paper-cnn"
    quick: bool = False
    epochs: int | None = None
    n_val: int | None = None
    grid: list[float] | None = None   # λ_paper values; None: the mode's
    device: str = "cpu"
    seed: int = 0
    lr: float = 1e-3
    overrides: dict = field(default_factory=dict)


def plan(cfg: LambdaConfig) -> dict:
    """Sizes of the mode. Full: the 13-point grid at the paper experiment's 8 epochs;
    quick: every third point (5: 10^2, 10^2.75, …, 10^5), 2 epochs, 500 validation images."""
    q = cfg.quick
    return {"epochs": cfg.epochs if cfg.epochs is not None else (2 if q else 8),
            "n_val": cfg.n_val if cfg.n_val is not None else (500 if q else 1000),
            "grid": list(cfg.grid) if cfg.grid else (PAPER_GRID[::3] if q else PAPER_GRID)}


def validation_split(data: Dataset, n_val: int) -> tuple[Dataset, Tensor, Tensor]:
    """(data with the last n_val training images as its held-out part, their x, their y)."""
    n = len(data.train_y)
    if not 0 < n_val < n:
        raise ValueError(f"n_val must be in [1, {n - 1}] for {n} training images, got {n_val}")
    tx, ty = data.train_x[:n - n_val], data.train_y[:n - n_val]
    vx, vy = data.train_x[n - n_val:], data.train_y[n - n_val:]
    return Dataset(tx, ty, vx, vy, data.num_classes, data.name + " (validation split)"), vx, vy


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(N,) float: 1 where the model classifies the image right."""
    return (_predict(model, x) == y).float()


def _fgsm_examples(model: nn.Module, x: Tensor, y: Tensor, eps: float,
                   batch: int = 500) -> Tensor:
    return torch.cat([fgsm(model, x[i:i + batch], y[i:i + batch], eps)
                      for i in range(0, len(x), batch)])


def per_image_scores(model: nn.Module, x: Tensor, y: Tensor, transfer_x: list[Tensor]
                     ) -> dict[str, Tensor]:
    """Per validation image: clean correctness, the score (mean over VAL_EPS of correctness
    on the normal model's FGSM examples ``transfer_x``) and white-box FGSM correctness."""
    transfer = torch.stack([_correct(model, xa, y) for xa in transfer_x], 1).mean(1)
    white = torch.stack([_correct(model, _fgsm_examples(model, x, y, e), y)
                         for e in VAL_EPS], 1).mean(1)
    return {"clean": _correct(model, x, y), "score": transfer, "white_box": white}


@dataclass
class Choice:
    """The selection: chosen grid index, eligible indices, indistinguishable indices."""

    index: int
    eligible: list[int]
    indistinguishable: list[int]
    score_vs_chosen: list[Interval | None]


def choose_lambda(scores: list[Tensor], clean: list[Tensor], normal_clean: Tensor,
                  gap: float = UNDERFIT_GAP) -> Choice:
    """The grid point to use, from per-image validation scores and clean correctness
    (one (N,) tensor per grid point, in grid order) and the normal model's clean
    correctness: argmax of the mean score over the points whose mean clean accuracy is at
    least normal's − gap, the first (smallest λ) among equal means. Raises ValueError when
    no point is eligible."""
    if not scores or len(scores) != len(clean):
        raise ValueError(f"need one score and one clean vector per grid point, got "
                         f"{len(scores)} and {len(clean)}")
    floor = float(normal_clean.float().mean()) - gap
    eligible = [i for i, c in enumerate(clean) if float(c.float().mean()) >= floor]
    if not eligible:
        best_clean = max(float(c.float().mean()) for c in clean)
        raise ValueError(f"no grid point trains: the best clean validation accuracy "
                         f"{best_clean:.3f} is below normal's {floor + gap:.3f} − {gap:g}; "
                         "train longer or extend the grid to smaller λ")
    means = [float(s.float().mean()) for s in scores]
    best = max(eligible, key=lambda i: (means[i], -i))
    vs = [paired_difference(scores[i], scores[best]) if i != best else None
          for i in range(len(scores))]
    same = [i for i in eligible if i != best and vs[i] is not None and not vs[i].excludes_zero()]
    return Choice(best, eligible, same, vs)


def run_lambda(cfg: LambdaConfig, data: Dataset | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Train and score the grid; returns the results written to DIR/results.json."""
    from ..data import load_dataset
    from ..train import TrainConfig, fit

    t_all = time.perf_counter()
    sizes = plan(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = load_dataset(cfg.data, seed=cfg.seed)
    split, vx, vy = validation_split(data, sizes["n_val"])
    vx, vy = vx.to(cfg.device), vy.to(cfg.device)

    def train(name: str, defense: str, lam: float | None) -> tuple[nn.Module, float]:
        t0 = time.perf_counter()
        tc = TrainConfig(data=cfg.data, model=cfg.model, defense=defense,
                         epochs=sizes["epochs"], lam=lam, lr=cfg.lr, seed=cfg.seed,
                         device=cfg.device, out=str(out / "models" / name), resume=True,
                         progress=False)
        model = fit(tc, split).model.eval()
        return model, time.perf_counter() - t0

    normal, normal_s = train("normal", "none", None)
    normal_clean = _correct(normal, vx, vy)
    log(f"[lambda] normal: {normal_s:.0f} s, clean validation accuracy "
        f"{float(normal_clean.mean()):.4f}")
    transfer_x = [_fgsm_examples(normal, vx, vy, e) for e in VAL_EPS]
    rows, per_image = [], []
    for lp in sizes["grid"]:
        lam = package_lam(lp, data.in_shape)
        model, secs = train(f"gradreg_lam_paper_{lp:.4g}", "gradreg", lam)
        s = per_image_scores(model, vx, vy, transfer_x)
        per_image.append(s)
        row = {"lam_paper": lp, "log10_lam_paper": math.log10(lp), "lam": lam,
               "train_seconds": secs,
               **{k: mean_interval(v).to_dict() for k, v in s.items()}}
        rows.append(row)
        log(f"[lambda] λ_paper = 10^{math.log10(lp):.2f} (λ = {lam:.4g}): {secs:.0f} s, "
            f"clean {row['clean']['mean']:.4f}, score {row['score']['mean']:.4f}, "
            f"white-box FGSM {row['white_box']['mean']:.4f}")
    choice = choose_lambda([s["score"] for s in per_image], [s["clean"] for s in per_image],
                           normal_clean)
    for i, row in enumerate(rows):
        d = choice.score_vs_chosen[i]
        row["score_minus_chosen"] = None if d is None else d.to_dict()
        row["eligible"] = i in choice.eligible
    chosen = rows[choice.index]
    results = {
        "config": asdict(cfg), "plan": sizes, "val_eps": VAL_EPS, "underfit_gap": UNDERFIT_GAP,
        "dataset": {"name": data.name, "train": len(split.train_y), "validation": len(vy)},
        "normal": {"clean": mean_interval(normal_clean).to_dict(), "train_seconds": normal_s},
        "grid": rows,
        "chosen": {"index": choice.index, "lam_paper": chosen["lam_paper"],
                   "lam": chosen["lam"],
                   "indistinguishable_lam_paper": [rows[i]["lam_paper"]
                                                   for i in choice.indistinguishable]},
        "seconds": time.perf_counter() - t_all,
    }
    from .lambda_report import write_lambda_figure, write_lambda_report

    results["figure"] = write_lambda_figure(results, out / "lambda.png")
    write_json(results, out / "results.json")
    write_lambda_report(results, out / "report.md")
    log(f"[lambda] chosen λ_paper = 10^{math.log10(chosen['lam_paper']):.2f} "
        f"(λ = {chosen['lam']:.4g}); {results['seconds']:.0f} s; report at {out / 'report.md'}")
    return results


def chosen_lam(path: str | Path) -> float:
    """The package λ chosen by a finished grid: DIR/results.json (or that file)."""
    import json

    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no λ-grid results at {path} (run the 'lambda' experiment)")
    blob = json.loads(path.read_text())
    if "chosen" not in blob or "lam" not in blob["chosen"]:
        raise ValueError(f"{path} is not the results of a λ grid (no 'chosen' entry)")
    return float(blob["chosen"]["lam"])
