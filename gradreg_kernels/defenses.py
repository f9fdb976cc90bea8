"""The training objectives compared in the paper, one function per defense.

For a batch (x, y) of B examples, with ℓ_n = CE(f(x_n), y_n) and g = ∇_X Σ_n ℓ_n:

- ``none``:        mean_n ℓ_n.
- ``gradreg``:     mean_n ℓ_n + λ · mean_n ‖g_n‖², exact, fused (gradreg_loss, head "ce").
- ``insensitive``: mean_n ℓ_n + λ · mean_n ‖∇_{x_n} ℓ'_n‖², ℓ'_n = −(1/K) Σ_k log p_k(x_n)
                   (gradreg_loss, head "logprob_sum").
- ``gradreg-fd``:  mean_n ℓ_n + λ · mean_n d_n², the finite-difference approximation of
                   Finlay & Oberman (2019): v_n = g_n/‖g_n‖ (held constant), and
                   d_n = (ℓ_n(X + h V) − ℓ_n(X))/h with h = 0.01, so d_n ≈ ‖g_n‖. Both
                   forwards use the same dropout mask; the perturbed one leaves BatchNorm's
                   running statistics alone. Gradients reach θ through both ℓ evaluations.
- ``advtrain``:    (mean_n ℓ_n(x) + mean_n ℓ_n(x_adv))/2, FGSM x_adv = clip(x + ε sign(∇_x
                   CE(f(x), ŷ)), 0, 1), ε = 0.3, ŷ = argmax f(x) (the model's own
                   predictions, so no label leaking); x_adv is held constant.
- ``advtrain+gradreg``: (mean ℓ(x) + λ · mean_n ‖g_n‖² + mean ℓ(x_adv))/2, the gradreg
                   objective averaged with the adversarial CE as the paper's code does
                   (penalty fused, on the clean batch); x_adv crafted as for advtrain by a
                   forward that leaves BatchNorm's running statistics alone.
- ``distill``:     defensive distillation at T = 50 in two phases: the teacher minimises
                   CE(f(x)/T, y); the student, a fresh model, minimises the cross-entropy
                   −Σ_k q_k log softmax(f(x)/T)_k to the teacher's soft labels
                   q = softmax(f_teacher(x)/T) (teacher in eval mode). The trained student is
                   used at T = 1: its raw logits f(x).

λ defaults to λ_paper/(2B) · ((H·W)/(28·28))², λ_paper = 10^4.75 (gradreg, gradreg-fd,
advtrain+gradreg) or 1000 (insensitive): the paper's MNIST values in this package's
convention, exactly, at 28×28. The size factor is an empirical rule for smaller images,
measured on the 8×8 digits (paper CNN, B = 256, lr 1e-3, held-out accuracy): λ = 110
(unscaled) peaks at 0.79 and ends at 0.57 after 20 epochs; over 12 epochs λ = 9.0 (the
factor (H·W)/784, which would keep the penalty of the same picture at another resolution)
peaks at 0.83 then falls to 0.71 as the penalty dominates, and λ = 1.0 reaches 0.98
(λ = 0: 0.99). The squared factor gives λ = 0.73 there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .loss import gradreg_loss

DEFENSES = ("none", "gradreg", "insensitive", "gradreg-fd", "advtrain", "distill",
            "advtrain+gradreg")
PAPER_LAMBDA = {"gradreg": 10 ** 4.75, "gradreg-fd": 10 ** 4.75,
                "advtrain+gradreg": 10 ** 4.75, "insensitive": 1000.0}
FGSM_EPS = 0.3
FD_STEP = 0.01
DISTILL_T = 50.0
MNIST_PIXELS = 28 * 28


@dataclass
class StepLoss:
    """One training step's objective: ``loss`` carries gradients, ``parts`` are detached."""

    loss: Tensor
    logits: Tensor                      # (B, K) detached clean logits (for train accuracy)
    parts: dict[str, Tensor] = field(default_factory=dict)   # "ce", "penalty", "ce_adv", ...
    backend: str = "autograd"           # which path computed the input-gradient penalty


def uses_penalty(defense: str) -> bool:
    """Whether the defense has an input-gradient penalty weighted by λ."""
    return defense in PAPER_LAMBDA


def default_lam(defense: str, batch_size: int, in_shape: tuple[int, ...] = (1, 28, 28)
                ) -> float:
    """λ_paper/(2B) · ((H·W)/784)² for the penalized defenses, 0 for the others."""
    if not uses_penalty(defense):
        return 0.0
    pixels = int(in_shape[-1]) * int(in_shape[-2])
    return PAPER_LAMBDA[defense] / (2 * batch_size) * (pixels / MNIST_PIXELS) ** 2


def check_defense(defense: str) -> str:
    if defense not in DEFENSES:
        raise ValueError(f"unknown defense {defense!r}; choose one of {DEFENSES}")
    return defense


@contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Forwards inside leave BatchNorm running statistics (and counters) as they were."""
    saved = [(b, b.detach().clone()) for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _rng_state(device: torch.device) -> Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def fgsm_on_predictions(model: nn.Module, x: Tensor, eps: float = FGSM_EPS
                        ) -> tuple[Tensor, Tensor]:
    """(x_adv, clean logits z): x_adv = clip(x + ε sign(∇_x CE(z, argmax z)), 0, 1), detached.

    ``z`` stays attached to the graph of the clean forward (so it can also be trained on).
    """
    xg = x.detach().requires_grad_(True)
    z = model(xg)
    pred = z.detach().argmax(1)
    (g,) = torch.autograd.grad(F.cross_entropy(z, pred, reduction="sum"), xg,
                               retain_graph=True)
    return (x + eps * g.sign()).clamp_(0.0, 1.0).detach(), z


def loss_none(model: nn.Module, x: Tensor, y: Tensor) -> StepLoss:
    z = model(x)
    ce = F.cross_entropy(z, y)
    return StepLoss(ce, z.detach(), {"ce": ce.detach()})


#: the heads the trainer offers for defense "gradreg": the paper's softmax cross-entropy,
#: and squared error or binary cross-entropy on the one-hot labels
TRAIN_HEADS = ("ce", "mse", "bce")


def loss_gradreg(model: nn.Module, x: Tensor, y: Tensor, lam: float, head: str = "ce",
                 label_smoothing: float = 0.0, num_classes: int | None = None) -> StepLoss:
    """The fused gradreg_loss with ``head``; "mse" / "bce" read the labels as one-hot
    targets over ``num_classes``; ``label_smoothing`` smooths the cross-entropy's labels
    (its data term, for head "logprob_sum")."""
    target = y
    if head in ("mse", "bce"):
        if num_classes is None:
            raise ValueError(f"head {head!r} needs num_classes for its one-hot targets")
        target = F.one_hot(y, num_classes).to(x.dtype)
    opts = {"label_smoothing": label_smoothing} if label_smoothing else {}
    out = gradreg_loss(model, x, target, lam, head=head, **opts)
    return StepLoss(out.loss, out.logits, {"ce": out.ce, "penalty": out.penalty}, out.backend)


def loss_gradreg_fd(model: nn.Module, x: Tensor, y: Tensor, lam: float, h: float = FD_STEP
                    ) -> StepLoss:
    xg = x.detach().requires_grad_(True)
    before = _rng_state(x.device)
    z = model(xg)
    ell = F.cross_entropy(z, y, reduction="none")
    (g,) = torch.autograd.grad(ell.sum(), xg, retain_graph=True)
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (x.dim() - 1))
    v = g / norm
    after = _rng_state(x.device)
    _set_rng_state(x.device, before)          # same dropout mask in both forwards
    with frozen_batchnorm_stats(model):
        z_h = model(x.detach() + h * v)
    _set_rng_state(x.device, after)
    d = (F.cross_entropy(z_h, y, reduction="none") - ell) / h
    penalty = d.pow(2).mean()
    ce = ell.mean()
    return StepLoss(ce + lam * penalty, z.detach(), {"ce": ce.detach(),
                                                     "penalty": penalty.detach()})


def loss_advtrain(model: nn.Module, x: Tensor, y: Tensor, eps: float = FGSM_EPS) -> StepLoss:
    x_adv, z = fgsm_on_predictions(model, x, eps)
    ce = F.cross_entropy(z, y)
    ce_adv = F.cross_entropy(model(x_adv), y)
    return StepLoss((ce + ce_adv) / 2, z.detach(), {"ce": ce.detach(), "ce_adv": ce_adv.detach()})


def loss_advtrain_gradreg(model: nn.Module, x: Tensor, y: Tensor, lam: float,
                          eps: float = FGSM_EPS) -> StepLoss:
    with frozen_batchnorm_stats(model):
        x_adv, _ = fgsm_on_predictions(model, x, eps)
    out = gradreg_loss(model, x, y, lam / 2, value_weight=0.5)
    ce_adv = F.cross_entropy(model(x_adv), y)
    return StepLoss(out.loss + 0.5 * ce_adv, out.logits,
                    {"ce": out.ce, "penalty": out.penalty, "ce_adv": ce_adv.detach()},
                    out.backend)


def loss_distill_teacher(model: nn.Module, x: Tensor, y: Tensor, t: float = DISTILL_T
                         ) -> StepLoss:
    z = model(x)
    ce_t = F.cross_entropy(z / t, y)
    return StepLoss(ce_t, z.detach(), {"ce": ce_t.detach()})


def loss_distill_student(model: nn.Module, x: Tensor, soft: Tensor, t: float = DISTILL_T
                         ) -> StepLoss:
    """Cross-entropy to the teacher's soft labels ``soft`` (B, K), at temperature t.

    Also reports KL(q ‖ softmax(z/t)) = CE − H(q), which reaches 0 when the student matches.
    """
    z = model(x)
    ce_t = -(soft * F.log_softmax(z / t, dim=1)).sum(1).mean()
    entropy = -(soft * soft.clamp_min(1e-30).log()).sum(1).mean()
    return StepLoss(ce_t, z.detach(), {"ce": ce_t.detach(), "kl": (ce_t - entropy).detach()})


@torch.no_grad()
def soft_labels(teacher: nn.Module, x: Tensor, t: float = DISTILL_T, batch: int = 1000
                ) -> Tensor:
    """softmax(f_teacher(x)/t) for all of x (N, K), the teacher in eval mode."""
    was_training = teacher.training
    teacher.eval()
    out = torch.cat([F.softmax(teacher(x[i:i + batch]) / t, dim=1)
                     for i in range(0, x.shape[0], batch)])
    teacher.train(was_training)
    return out


def step_loss(defense: str, phase: str, model: nn.Module, x: Tensor, y: Tensor, lam: float,
              soft: Tensor | None = None, head: str = "ce", label_smoothing: float = 0.0,
              num_classes: int | None = None) -> StepLoss:
    """The objective of ``defense`` (in its ``phase``) on one batch; ``head`` and
    ``label_smoothing`` for the gradreg defenses (TRAIN_HEADS; "insensitive" penalises
    logprob_sum and smooths its CE data term)."""
    if defense == "none":
        return loss_none(model, x, y)
    if defense == "gradreg":
        return loss_gradreg(model, x, y, lam, head, label_smoothing, num_classes)
    if defense == "insensitive":
        return loss_gradreg(model, x, y, lam, "logprob_sum", label_smoothing)
    if defense == "gradreg-fd":
        return loss_gradreg_fd(model, x, y, lam)
    if defense == "advtrain":
        return loss_advtrain(model, x, y)
    if defense == "advtrain+gradreg":
        return loss_advtrain_gradreg(model, x, y, lam)
    if defense == "distill":
        if phase == "teacher":
            return loss_distill_teacher(model, x, y)
        if soft is None:
            raise ValueError("the distillation student needs the teacher's soft labels")
        return loss_distill_student(model, x, soft)
    raise ValueError(f"unknown defense {defense!r}; choose one of {DEFENSES}")


def phase_epochs(defense: str, epochs: int) -> list[tuple[str, int]]:
    """The training phases and their epochs: distill gives ⌊epochs/2⌋ to the teacher and
    the rest to the student; every other defense has one phase, "main"."""
    if defense != "distill":
        return [("main", epochs)]
    if epochs < 2:
        raise ValueError("defense 'distill' trains a teacher then a student: it needs "
                         f"epochs >= 2, got {epochs}")
    return [("teacher", epochs // 2), ("student", epochs - epochs // 2)]
