"""The fused loss in a trainer-style module: a ``LightningModule``-shaped class with
``training_step(batch, batch_idx)`` returning the loss and ``configure_optimizers()``,
driven by a minimal fit loop of the kind such trainers run (no trainer library needed:
the same class drops into one, since gradreg_loss is an ordinary differentiable loss whose
``.backward()`` the trainer calls). The penalty's weight follows a warm-up schedule, and
the step's parts are logged as a trainer's ``self.log`` would.

    python examples/lightning_style.py [--epochs 8]
"""

from __future__ import annotations

import argparse

import torch
from _timing import eager_ce_step, report, side_by_side
from torch import nn

from gradreg_kernels import GradRegLoss
from gradreg_kernels.data import load_dataset


class RobustClassifier(nn.Module):
    """What a LightningModule holds: the network, the loss, the step and the optimizer."""

    def __init__(self, lam: float = 0.5, warmup_steps: int = 50) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))
        self.loss_fn = GradRegLoss(self.net, lam=0.0)
        self.lam, self.warmup_steps, self.global_step = lam, warmup_steps, 0
        self.logged: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def log(self, name: str, value: torch.Tensor) -> None:
        self.logged[name] = float(value)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        # λ ramps up over the first steps; λ = 0 runs the data term alone
        self.loss_fn.lam = self.lam * min(1.0, self.global_step / self.warmup_steps)
        out = self.loss_fn(x, y)
        self.log("train/ce", out.ce)
        self.log("train/penalty", out.penalty)
        self.log("train/acc", (out.logits.argmax(1) == y).float().mean())
        self.backend = out.backend
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def fit(module: RobustClassifier, loader, epochs: int) -> None:
    """The part of a trainer's fit loop that touches the module."""
    opt = module.configure_optimizers()
    module.train()
    for _ in range(epochs):
        for i, batch in enumerate(loader()):
            opt.zero_grad(set_to_none=True)
            loss = module.training_step(batch, i)
            loss.backward()
            opt.step()
            module.global_step += 1


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    args = p.parse_args(argv)
    ds = load_dataset("digits")

    def loader():
        order = torch.randperm(len(ds.train_y))
        for i in range(0, len(order) - 63, 64):
            idx = order[i:i + 64]
            yield ds.train_x[idx], ds.train_y[idx]

    module = RobustClassifier()
    fit(module, loader, args.epochs)
    module.eval()
    with torch.no_grad():
        acc = float((module(ds.test_x).argmax(1) == ds.test_y).float().mean())
    print(f"after {module.global_step} steps: logged {module.logged}; held-out accuracy "
          f"{acc:.3f}")
    x, y = ds.train_x[:64], ds.train_y[:64]
    module.train()

    def fused():
        module.zero_grad(set_to_none=True)
        module.training_step((x, y), 0).backward()

    def eager():
        eager_ce_step(module, x, y, module.lam)

    print(f"runs fused on the {module.backend!r} backend; "
          + report(side_by_side({"fused": fused, "eager": eager}), "fused", "eager"))
    return {"acc": acc, "logged": module.logged}


if __name__ == "__main__":
    main()
