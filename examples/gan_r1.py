"""The R1 penalty of a GAN discriminator, (γ/2) · mean ‖∇ₓ D(x)‖² on real images, two ways:
fused with ``head="output"`` (D's score is the head, ``value_weight`` weighs the score
term: here the non-saturating loss is computed by the user and only the penalty comes from
gradreg_loss with value_weight=0), and with ``gradreg_kernels.nn.convert(D)`` in the user's
own double-backprop loop (the drop-in layers make autograd's second backward fast). Both
give the same gradients; a short training run on 8×8 digits against a tiny generator.

    python examples/gan_r1.py [--steps 60]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from _timing import report, side_by_side
from torch import nn

from gradreg_kernels import gradreg_loss
from gradreg_kernels.data import load_dataset
from gradreg_kernels.nn import convert

GAMMA = 10.0


def discriminator() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.LeakyReLU(0.2),
                         nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 1))


def r1_fused(d: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """(γ/2) mean ‖∇ₓ D(x)‖², fused: head "output", the penalty alone."""
    return gradreg_loss(d, real, None, GAMMA / 2, head="output", value_weight=0.0).loss


def r1_user(d: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """The same penalty as users write it (double backprop through autograd)."""
    xg = real.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(d(xg).sum(), xg, create_graph=True)
    return GAMMA / 2 * g.pow(2).flatten(1).sum(1).mean()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args(argv)
    ds = load_dataset("digits")
    real_all = ds.train_x
    d = discriminator()
    gen = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Sigmoid(),
                        nn.Unflatten(1, (1, 8, 8)))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.0, 0.99))
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.0, 0.99))
    torch.manual_seed(1)
    for _ in range(args.steps):
        real = real_all[torch.randint(0, len(real_all), (32,))]
        fake = gen(torch.randn(32, 16))
        opt_d.zero_grad(set_to_none=True)
        loss_d = F.softplus(d(fake.detach())).mean() + F.softplus(-d(real)).mean()
        (loss_d + r1_fused(d, real)).backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        F.softplus(-d(gen(torch.randn(32, 16)))).mean().backward()
        opt_g.step()
    print(f"after {args.steps} steps: D loss {loss_d.item():.3f}, R1 "
          f"{r1_fused(d, real).item():.4f}")

    # the same gradients three ways: fused, the user's loop on the converted D, plain autograd
    real = real_all[:32]
    grads = {}
    d_conv = convert(copy.deepcopy(d))
    for name, model, fn in (("fused", d, r1_fused), ("converted", d_conv, r1_user),
                            ("autograd", d, r1_user)):
        model.zero_grad(set_to_none=True)
        fn(model, real).backward()
        grads[name] = torch.cat([(torch.zeros_like(q) if q.grad is None else q.grad).flatten()
                                 for q in model.parameters()])  # a last bias has no R1 term
    for name in ("fused", "converted"):
        err = float((grads[name] - grads["autograd"]).norm() / grads["autograd"].norm())
        print(f"{name} R1 gradient vs autograd: relative difference {err:.2e}")
        assert err < 1e-4

    def fused():
        d.zero_grad(set_to_none=True)
        r1_fused(d, real).backward()

    def converted():
        d_conv.zero_grad(set_to_none=True)
        r1_user(d_conv, real).backward()

    def eager():
        d.zero_grad(set_to_none=True)
        r1_user(d, real).backward()

    ms = side_by_side({"fused": fused, "converted": converted, "eager": eager})
    print(report(ms, "fused", "eager") + "; " + report(ms, "converted", "eager"))
    return {"grads": grads, "ms": ms}


if __name__ == "__main__":
    main()
