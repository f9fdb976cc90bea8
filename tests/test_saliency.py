"""Saliency maps and interpretability measures: values on constructed cases with known answers."""

from __future__ import annotations

import math

import torch
from attack_models import images, tiny_cnn

from gradreg_kernels.saliency import (
    area_share,
    class_mean_alignment,
    class_means,
    gradient_masking_stats,
    input_gradients,
    perturbation_stroke_share,
    spatial_coherence,
    stroke_energy_share,
    stroke_mask,
)


def test_input_gradients_match_per_example_autograd():
    model = tiny_cnn(side=5, classes=4, seed=1)
    x, y = images(7, side=5), torch.arange(7) % 4
    g = input_gradients(model, x, y, batch_size=3)
    for n in range(7):
        xn = x[n:n + 1].clone().requires_grad_(True)
        lp = model.eval()(xn).log_softmax(1)[0, y[n]]
        (ref,) = torch.autograd.grad(lp, xn)
        assert torch.allclose(g[n:n + 1], ref, atol=1e-12)
    z = input_gradients(model, x, y, kind="logit")
    assert not torch.allclose(z, g)


def test_stroke_mask_grows_by_one_pixel():
    x = torch.zeros(1, 1, 7, 7)
    x[0, 0, 3, 3] = 0.9
    m = stroke_mask(x)
    assert int(m.sum()) == 9 and bool(m[0, 0, 2:5, 2:5].all())
    assert int(stroke_mask(x, grow=0).sum()) == 1
    assert abs(float(area_share(m)[0]) - 9 / 49) < 1e-7


def test_shares_are_one_on_mask_and_area_level_for_uniform():
    x = torch.zeros(2, 1, 6, 6)
    x[:, :, 2:4, 2:4] = 1.0
    m = stroke_mask(x, grow=0)
    on = torch.zeros(2, 1, 6, 6)
    on[:, :, 2:4, 2:4] = torch.randn(2, 1, 2, 2)
    assert torch.allclose(stroke_energy_share(on, m), torch.ones(2))
    assert torch.allclose(perturbation_stroke_share(on, m), torch.ones(2))
    flat = torch.ones(2, 1, 6, 6)
    assert torch.allclose(stroke_energy_share(flat, m), area_share(m))
    assert torch.allclose(perturbation_stroke_share(flat, m), area_share(m))
    assert math.isnan(float(stroke_energy_share(torch.zeros(2, 1, 6, 6), m)[0]))


def test_spatial_coherence_separates_smooth_from_noise():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(8, 1, 28, 28, generator=g)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(8, 1, 34, 34, generator=g), 7, stride=1)
    checker = (torch.arange(28)[:, None] + torch.arange(28)[None]) % 2 * 2.0 - 1
    assert spatial_coherence(noise).abs().max() < 0.1
    assert spatial_coherence(smooth).min() > 0.7
    assert torch.allclose(spatial_coherence(checker.expand(1, 1, 28, 28)), torch.tensor([-1.0]))


def test_class_mean_alignment():
    x = torch.rand(30, 1, 4, 4)
    y = torch.arange(30) % 3
    means = class_means(x, y, 3)
    assert torch.allclose(means[1], x[y == 1].mean(0))
    t = (y + 1) % 3
    toward = means[t] - means[y]
    assert torch.allclose(class_mean_alignment(toward * 0.3, y, t, means), torch.ones(30))
    assert torch.allclose(class_mean_alignment(-toward, y, t, means), -torch.ones(30))


def test_masking_stats_flag_saturated_softmax():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(25, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 4))
    x = images(16, side=5, dtype=torch.float32)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    healthy = gradient_masking_stats(model, x, y)
    assert healthy["zero_examples"] == 0 and healthy["median_norm"] > 0
    saturated = torch.nn.Sequential(model, Scale(1e5))
    masked = gradient_masking_stats(saturated, x, y)
    assert masked["zero_examples"] > 0.5 and masked["zero_entries"] > 0.5


class Scale(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, z):
        return z * self.c
