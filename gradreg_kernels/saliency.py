"""Input-gradient saliency maps and the numbers used to judge them and adversarial
perturbations on digit images.

Maps. s_n = ∇_x log p(y_n | x_n) (the negative cross-entropy gradient: where a pixel change
raises the true class), or ∇_x Z_y for a logit map. x, s: (B, C, H, W).

Measures (each per example, shape (B,)), chosen because each has a chance level and needs
no human labels:

- stroke energy share:  Σ_{i∈S} s_i² / Σ_i s_i², S = the digit's stroke pixels (x > 0.5)
  grown by one pixel (3 × 3 max filter) so that stroke edges count. This is the
  "energy-based pointing game" of saliency evaluation (Wang et al., Score-CAM, 2020) with
  the stroke as the object mask. Its chance level is the area share |S|/D; a map that
  ignores the digit scores near it, a map on the digit near 1.
- spatial coherence:  the correlation of s with its right and lower neighbours (lag-1
  autocorrelation, mean of both). Noise-like maps (the normal model's speckle) score near
  0; maps made of strokes and blobs, as the paper shows for regularized models, near 1.
- perturbation stroke share:  Σ_{i∈S} |δ_i| / Σ_i |δ_i| for a perturbation δ = x_adv − x:
  is the attack editing the digit, or spraying noise on the background?
- class-mean alignment:  cos(δ, μ_t − μ_y), μ_k the training mean image of class k: does
  the perturbation move the image towards what the target class looks like on average?
  Chance level 0 (a random-sign δ is nearly orthogonal to it). A model-free proxy for the
  paper's "adversarial examples look like the target class".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import eval_mode


def input_gradients(model: nn.Module, x: Tensor, y: Tensor, *, kind: str = "logprob",
                    batch_size: int = 256) -> Tensor:
    """Per-example ∇_x log p_y ("logprob") or ∇_x Z_y ("logit"), shape of x, eval mode."""
    if kind not in ("logprob", "logit"):
        raise ValueError(f"kind must be 'logprob' or 'logit', got {kind!r}")
    out = []
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].detach().requires_grad_(True)
            yb = y[i:i + batch_size].long()
            with torch.enable_grad():
                z = model(xb)
                score = z.log_softmax(1) if kind == "logprob" else z
                (g,) = torch.autograd.grad(score.gather(1, yb[:, None]).sum(), xb)
            out.append(g)
    return torch.cat(out)


def stroke_mask(x: Tensor, threshold: float = 0.5, grow: int = 1) -> Tensor:
    """Boolean (B, 1, H, W): pixels brighter than threshold in any channel, grown by `grow`."""
    if x.dim() != 4:
        raise ValueError(f"x must be images (B, C, H, W), got shape {tuple(x.shape)}")
    m = (x > threshold).any(dim=1, keepdim=True).to(x.dtype)
    if grow > 0:
        m = F.max_pool2d(m, 2 * grow + 1, stride=1, padding=grow)
    return m > 0


def _per_example(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


def stroke_energy_share(saliency: Tensor, mask: Tensor) -> Tensor:
    """(B,) share of Σ s² on the mask; NaN where the map is all zero."""
    e = saliency.pow(2).sum(1, keepdim=True)
    total = _per_example(e)
    return torch.where(total > 0, _per_example(e * mask) / total.clamp_min(1e-300),
                       torch.full_like(total, float("nan")))


def area_share(mask: Tensor) -> Tensor:
    """(B,) fraction of pixels in the mask: the chance level of the share measures."""
    return mask.flatten(1).float().mean(1)


def perturbation_stroke_share(delta: Tensor, mask: Tensor) -> Tensor:
    """(B,) share of Σ|δ| on the mask; NaN where δ = 0."""
    a = delta.abs().sum(1, keepdim=True)
    total = _per_example(a)
    return torch.where(total > 0, _per_example(a * mask) / total.clamp_min(1e-300),
                       torch.full_like(total, float("nan")))


def spatial_coherence(saliency: Tensor) -> Tensor:
    """(B,) mean of the horizontal and vertical lag-1 autocorrelations of each map."""
    s = saliency.sum(1)  # (B, H, W)
    s = s - s.mean(dim=(1, 2), keepdim=True)
    var = s.pow(2).mean(dim=(1, 2))
    h = (s[:, :, 1:] * s[:, :, :-1]).mean(dim=(1, 2))
    v = (s[:, 1:, :] * s[:, :-1, :]).mean(dim=(1, 2))
    return torch.where(var > 0, (h + v) / 2 / var.clamp_min(1e-300),
                       torch.full_like(var, float("nan")))


def class_means(x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """(K, ...) mean image of each class."""
    flat = x.flatten(1)
    sums = torch.zeros(num_classes, flat.shape[1], dtype=flat.dtype, device=flat.device)
    sums.index_add_(0, y.long(), flat)
    counts = torch.bincount(y.long(), minlength=num_classes).clamp_min(1).to(flat.dtype)
    return (sums / counts[:, None]).view((num_classes,) + tuple(x.shape[1:]))


def class_mean_alignment(delta: Tensor, y: Tensor, target: Tensor, means: Tensor) -> Tensor:
    """(B,) cos(δ_n, μ_{t_n} − μ_{y_n}); NaN where δ_n = 0."""
    direction = (means[target.long()] - means[y.long()]).flatten(1)
    d = delta.flatten(1)
    cos = F.cosine_similarity(d, direction, dim=1, eps=1e-30)
    return torch.where(d.abs().sum(1) > 0, cos, torch.full_like(cos, float("nan")))


def gradient_masking_stats(model: nn.Module, x: Tensor, y: Tensor,
                           tiny: float = 1e-8) -> dict[str, float]:
    """Signs of vanishing cross-entropy gradients on (x, y):
    zero_examples: share of examples whose ∇_x CE is exactly 0 everywhere;
    tiny_examples: share with ‖∇_x CE‖₂ < tiny (numerically vanishing);
    zero_entries: share of all gradient entries exactly 0;
    median_norm: median ‖∇_x CE‖₂."""
    g = -input_gradients(model, x, y, kind="logprob")
    norms = g.flatten(1).norm(dim=1)
    return {
        "zero_examples": float((g.flatten(1) == 0).all(1).float().mean()),
        "tiny_examples": float((norms < tiny).float().mean()),
        "zero_entries": float((g == 0).float().mean()),
        "median_norm": float(norms.median()),
    }


def nanmean(t: Tensor) -> float:
    """Mean over the non-NaN entries (NaN if none)."""
    ok = ~torch.isnan(t)
    return float(t[ok].mean()) if bool(ok.any()) else float("nan")
