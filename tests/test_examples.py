"""The recipes under examples/ run on this CPU and show what they claim (docs/recipes.md):
each one's main() on its bundled or generated data, with the checks its text makes."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def _examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def _main(name: str, *argv: str):
    module = importlib.import_module(name)
    return module.main(list(argv))


def test_robust_classifier_resists_fgsm_better(capsys):
    res = _main("robust_classifier", "--epochs", "15")
    assert res["gradreg"][1] > res["undefended"][1] + 0.1   # FGSM accuracy
    assert res["gradreg"][0] > 0.9                          # clean accuracy kept
    assert "runs fused on the 'cpu' backend" in capsys.readouterr().out


def test_right_for_the_right_reasons_ignores_the_confounder():
    res = _main("right_for_right_reasons")
    assert res["masked penalty"][1] < 0.01 < res["plain"][1]      # saliency on the corner
    assert res["masked penalty"][0] > res["plain"][0] + 0.3       # accuracy, corner random


def test_gan_r1_fused_and_converted_match_autograd():
    res = _main("gan_r1", "--steps", "20")
    assert set(res["grads"]) == {"fused", "converted", "autograd"}  # compared inside, 1e-4


def test_pinn_gradient_penalty_fits_the_clean_field_better():
    res = _main("pinn_gradient_penalty")
    assert res["with the gradient penalty"] < res["mse alone"]


def test_lightning_style_module_trains(capsys):
    res = _main("lightning_style")
    assert res["acc"] > 0.85
    assert res["logged"]["train/penalty"] > 0
    assert "runs fused on the 'cpu' backend" in capsys.readouterr().out


def test_every_example_is_tested():
    scripts = {p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_")}
    text = Path(__file__).read_text()
    assert all(f'"{s}"' in text for s in scripts), scripts
