"""Transfer evaluation: accuracy of every model on adversarial examples crafted on every model.

    acc[s, t, e] = mean_n 1[argmax f_t(A(f_s, x_n, y_n, ε_e)) = y_n]

for source models s, target (defended) models t, budgets ε_e and attack A. The diagonal
s = t is the white-box accuracy; off-diagonal entries are transfer (black-box-by-proxy)
accuracies. For targeted attacks (TGSM) the rate at which t predicts the attack's target
is kept as well. Examples are crafted once per (s, ε) and evaluated on every t.

CLI:  python -m gradreg_kernels.transfer --data mnist:PATH --model normal=runs/normal
          --model gradreg=runs/gradreg/model.pt --attack fgsm
          --eps 0,0.1,0.2,0.3 --n 256 --out matrix.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .attacks import eval_mode, fgsm, next_class_target, pgd, tgsm

AttackFn = Callable[[nn.Module, Tensor, Tensor, float], Tensor]

ATTACKS: dict[str, tuple[AttackFn, bool]] = {
    # name: (attack(model, x, y, eps) -> x_adv, targeted at (y + 1) mod K)
    "fgsm": (lambda m, x, y, e: fgsm(m, x, y, e), False),
    "tgsm": (lambda m, x, y, e: tgsm(m, x, y, e), True),
    "pgd": (lambda m, x, y, e: pgd(m, x, y, e, steps=20,
                                   generator=torch.Generator().manual_seed(0)), False),
}


@dataclass
class TransferResult:
    """accuracy: (S, T, E) float; target_rate: (S, T, E) or None (untargeted attacks).
    Rows are source models (where examples were crafted), columns defended models.
    correct / hit: the per-image outcomes (S, T, E, N) bool behind accuracy / target_rate
    (None when read back from a dict: ``to_dict`` keeps the means only)."""

    names: list[str]
    eps: list[float]
    attack: str
    accuracy: Tensor
    target_rate: Tensor | None
    n: int
    correct: Tensor | None = None
    hit: Tensor | None = None

    def white_box(self) -> Tensor:
        """(M, E): accuracy of each model on examples crafted on itself."""
        idx = torch.arange(len(self.names))
        return self.accuracy[idx, idx]

    def to_dict(self) -> dict:
        return {"names": self.names, "eps": self.eps, "attack": self.attack, "n": self.n,
                "accuracy": self.accuracy.tolist(),
                "target_rate": None if self.target_rate is None else self.target_rate.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> TransferResult:
        rate = d.get("target_rate")
        return cls(names=list(d["names"]), eps=[float(e) for e in d["eps"]], attack=d["attack"],
                   accuracy=torch.tensor(d["accuracy"]), n=int(d["n"]),
                   target_rate=None if rate is None else torch.tensor(rate))


def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    with eval_mode(model), torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).argmax(1)
                          for i in range(0, x.shape[0], batch_size)])


def transfer_matrix(models: Mapping[str, nn.Module], x: Tensor, y: Tensor,
                    eps: Sequence[float], attack: str | AttackFn = "fgsm", *,
                    targeted: bool | None = None, batch_size: int = 256,
                    progress: Callable[[str], None] | None = None) -> TransferResult:
    """Craft with every model at every ε, evaluate on every model. x: (N, ...) in [0, 1]."""
    if not models:
        raise ValueError("models must name at least one model")
    if isinstance(attack, str):
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose one of {sorted(ATTACKS)} "
                             "or pass a callable")
        fn, is_targeted = ATTACKS[attack]
        name = attack
    else:
        fn, is_targeted, name = attack, bool(targeted), getattr(attack, "__name__", "custom")
    eps = [float(e) for e in eps]
    if not eps:
        raise ValueError("eps must hold at least one budget")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    names = list(models)
    s_count, e_count = len(names), len(eps)
    n = x.shape[0]
    correct = torch.zeros(s_count, s_count, e_count, n, dtype=torch.bool)
    hit = torch.zeros(s_count, s_count, e_count, n, dtype=torch.bool) if is_targeted else None
    num_classes = None
    for si, src in enumerate(names):
        for ei, e in enumerate(eps):
            parts = [fn(models[src], x[i:i + batch_size], y[i:i + batch_size], e)
                     for i in range(0, x.shape[0], batch_size)]
            x_adv = torch.cat(parts)
            for ti, dst in enumerate(names):
                pred = _predict(models[dst], x_adv, batch_size)
                correct[si, ti, ei] = (pred == y).cpu()
                if hit is not None:
                    if num_classes is None:
                        with eval_mode(models[dst]), torch.no_grad():
                            num_classes = int(models[dst](x[:1]).shape[1])
                    t = next_class_target(y, num_classes)
                    hit[si, ti, ei] = (pred == t).cpu()
            if progress is not None:
                progress(f"{name}: crafted on {src} at eps={e:g}: white-box acc "
                         f"{float(correct[si, si, ei].float().mean()):.3f}")
    return TransferResult(names=names, eps=eps, attack=name,
                          accuracy=correct.float().mean(-1),
                          target_rate=None if hit is None else hit.float().mean(-1),
                          n=int(n), correct=correct, hit=hit)


def format_table(result: TransferResult, eps: Sequence[float] | None = None) -> str:
    """Markdown table like the paper's: rows defended models, columns source models, cells
    accuracies at the chosen ε joined by '/'."""
    chosen = result.eps if eps is None else [float(e) for e in eps]
    cols = [result.eps.index(e) for e in chosen]
    head = "| defended model | " + " | ".join(f"from {n}" for n in result.names) + " |"
    lines = [head, "|" + "---|" * (len(result.names) + 1)]
    for ti, dst in enumerate(result.names):
        cells = []
        for si in range(len(result.names)):
            vals = "/".join(f"{float(result.accuracy[si, ti, c]):.3f}".lstrip("0") for c in cols)
            cells.append(f"**{vals}**" if si == ti else vals)
        lines.append(f"| {dst} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(obj: dict, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_model(path: str | Path, device: str = "cpu") -> nn.Module:
    """A trained model: DIR/model.pt (or that file) as written by train.fit, read with
    train.load_trained_model; otherwise a whole pickled nn.Module (torch.save(model))."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        from .train import load_trained_model
    except ImportError:
        load_trained_model = None
    if load_trained_model is not None:
        try:
            return load_trained_model(path, device)
        except (ValueError, pickle.UnpicklingError):
            pass  # not the trainer's format: try a pickled module
    obj = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{path} holds neither a trained-model file nor an nn.Module "
                         f"(got {type(obj).__name__})")
    return obj.eval()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gradreg_kernels.transfer",
                                 description="model x model x eps adversarial accuracy tensor")
    ap.add_argument("--data", default="digits", help="data set spec for load_dataset")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                    help="a model to attack and defend with (repeat): a training output "
                         "folder, its model.pt, or a torch.save'd nn.Module")
    ap.add_argument("--attack", default="fgsm", choices=sorted(ATTACKS))
    ap.add_argument("--eps", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--n", type=int, default=256, help="test examples used")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    from .data import load_dataset

    data = load_dataset(args.data)
    x = data.test_x[:args.n].to(args.device)
    y = data.test_y[:args.n].to(args.device)
    models = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"--model takes NAME=PATH, got {spec!r}")
        models[name] = load_model(path, args.device)
    eps = [float(e) for e in args.eps.split(",") if e.strip()]
    result = transfer_matrix(models, x, y, eps, args.attack, progress=print)
    print(format_table(result))
    if args.out:
        write_json(result.to_dict(), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
