"""The trainer and the defenses: each trains and lowers its loss; the pieces compute what
docs/training.md says."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gradreg_kernels import gradreg_loss
from gradreg_kernels.data import Dataset, load_dataset
from gradreg_kernels.defenses import (
    DEFENSES,
    default_lam,
    fgsm_on_predictions,
    frozen_batchnorm_stats,
    loss_gradreg_fd,
    phase_epochs,
    soft_labels,
    uses_penalty,
)
from gradreg_kernels.models import make_model
from gradreg_kernels.train import TrainConfig, build_parser, fit, load_trained_model, main


@pytest.fixture(scope="module")
def small_digits() -> Dataset:
    """256 training and 200 held-out real digits: 4 steps per epoch at B = 64."""
    ds = load_dataset("digits")
    return Dataset(ds.train_x[:256], ds.train_y[:256], ds.test_x[:200], ds.test_y[:200], 10,
                   "digits-small")


@pytest.mark.parametrize("defense", DEFENSES)
def test_every_defense_lowers_its_loss(defense, small_digits):
    """24 steps on real digits. λ = 0.5 for the penalized defenses (the size-scaled paper λ
    at B = 64 is 2.9, which learns slowly in so few steps); distill at T = 50 with a larger
    lr, its student judged by KL to the teacher's soft labels (the soft-label CE cannot go
    below their entropy)."""
    lam = 0.5 if uses_penalty(defense) else None
    cfg = TrainConfig(model="mlp", width=32, defense=defense, lam=lam, epochs=6, batch_size=64,
                      lr=5e-2 if defense == "distill" else 1e-2, progress=False, seed=1)
    result = fit(cfg, small_digits)
    m = result.metrics
    assert len(m) == 6 and all(r["complete"] for r in m)
    for phase, _ in phase_epochs(defense, 6):
        key = "train_kl" if phase == "student" else "train_loss"
        losses = [r[key] for r in m if r["phase"] == phase]
        shrink = 0.98 if phase == "teacher" else 0.9   # T = 50 moves the teacher's CE slowly
        assert losses[-1] < shrink * losses[0], (phase, losses)
    if defense != "distill":
        assert m[-1]["test_acc"] > 0.3, m[-1]          # chance: 0.1
    if uses_penalty(defense):
        assert m[-1]["lam"] == 0.5 and m[-1]["train_penalty"] > 0
    if defense in ("gradreg", "insensitive", "advtrain+gradreg"):
        assert m[-1]["backend"] != "autograd"
    if defense in ("advtrain", "advtrain+gradreg"):
        assert "train_ce_adv" in m[-1]


def test_default_lam_is_the_papers_at_28x28():
    assert default_lam("gradreg", 256) == pytest.approx(10 ** 4.75 / 512)
    assert default_lam("insensitive", 100) == pytest.approx(1000 / 200)
    assert default_lam("gradreg", 256, (1, 8, 8)) == pytest.approx(
        10 ** 4.75 / 512 * (64 / 784) ** 2)
    assert default_lam("advtrain", 256) == 0.0


@pytest.mark.parametrize("defense", ["gradreg", "insensitive", "advtrain+gradreg"])
def test_paper_cnn_trains_fused(defense, small_digits):
    cfg = TrainConfig(model="paper-cnn", width=32, defense=defense, epochs=1, batch_size=64,
                      progress=False, max_steps=2)
    result = fit(cfg, small_digits)
    assert result.metrics[-1]["backend"] not in ("autograd", "-")
    assert result.metrics[-1]["step"] == 2 and not result.metrics[-1]["complete"]


def test_finite_difference_penalty_approximates_the_exact_one():
    """Same dropout mask: ((ℓ(x + h v) − ℓ(x))/h)² ≈ ‖∇ℓ‖², to O(h)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(30, 17), nn.Tanh(), nn.Dropout(0.3),
                          nn.Linear(17, 5)).double()
    x, y = torch.rand(9, 1, 5, 6, dtype=torch.float64), torch.randint(0, 5, (9,))
    torch.manual_seed(3)
    exact = gradreg_loss(model, x, y, lam=1.0).penalty
    torch.manual_seed(3)
    fd = loss_gradreg_fd(model, x, y, lam=1.0, h=1e-4).parts["penalty"]
    assert float(abs(fd - exact) / exact) < 1e-3
    torch.manual_seed(3)
    fd_paper = loss_gradreg_fd(model, x, y, lam=1.0).parts["penalty"]   # h = 0.01
    assert float(abs(fd_paper - exact) / exact) < 0.1


def test_fgsm_steps_along_the_sign_of_the_prediction_gradient():
    torch.manual_seed(0)
    model = make_model("mlp", (1, 8, 8), 10, width=16)
    x = torch.rand(7, 1, 8, 8)
    x_adv, z = fgsm_on_predictions(model, x, 0.3)
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    xg = x.clone().requires_grad_(True)
    pred = model(x).argmax(1)
    torch.nn.functional.cross_entropy(model(xg), pred).backward()
    inside = ((x + 0.3 * xg.grad.sign()) - x_adv).abs() < 1e-6
    clipped = (x_adv == 0) | (x_adv == 1)
    assert bool((inside | clipped).all())


def test_frozen_batchnorm_stats_restores_running_statistics():
    model = make_model("paper-cnn", (1, 8, 8), 10, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with frozen_batchnorm_stats(model):
        model(torch.rand(4, 1, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model(torch.rand(4, 1, 8, 8))
    assert not torch.equal(before["0.1.running_mean"], model.state_dict()["0.1.running_mean"])


def test_soft_labels_are_tempered_probabilities():
    torch.manual_seed(0)
    teacher = make_model("mlp", (1, 8, 8), 10, width=8)
    q = soft_labels(teacher, torch.rand(5, 1, 8, 8), t=50.0)
    assert torch.allclose(q.sum(1), torch.ones(5))
    assert float(q.max()) < 0.2          # T = 50 flattens the distribution


def test_files_and_the_saved_model(tmp_path, small_digits):
    cfg = TrainConfig(model="lenet", width=16, defense="gradreg", epochs=2, batch_size=64,
                      progress=False, out=str(tmp_path / "run"))
    result = fit(cfg, small_digits)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2]
    blob = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert blob["model"] == "lenet" and blob["temperature"] == 1.0
    loaded = load_trained_model(tmp_path / "run" / "model.pt")
    x = small_digits.test_x[:9]
    assert torch.equal(loaded(x), result.model.eval()(x))
    assert not list(tmp_path.glob("run/.*.tmp"))


def test_distilled_student_is_a_fresh_model_read_at_t1(small_digits):
    cfg = TrainConfig(model="mlp", width=16, defense="distill", epochs=2, batch_size=64,
                      progress=False)
    result = fit(cfg, small_digits)
    assert [r["phase"] for r in result.metrics] == ["teacher", "student"]
    z = result.model(small_digits.test_x)
    acc = float((z.argmax(1) == small_digits.test_y).float().mean())
    assert acc == pytest.approx(result.metrics[-1]["test_acc"])


@pytest.mark.parametrize("head,smoothing", [("mse", 0.0), ("bce", 0.0), ("ce", 0.1)])
def test_gradreg_trains_with_other_heads(head, smoothing, small_digits):
    """--head mse / bce (one-hot targets) and --label-smoothing run fused and learn (bce
    first pushes every logit of its one-hot targets down: its accuracy rises later, with or
    without the penalty, so only its loss is judged in 24 steps)."""
    cfg = TrainConfig(model="mlp", width=32, defense="gradreg", lam=0.5, epochs=6,
                      batch_size=64, lr=1e-2, progress=False, seed=1, head=head,
                      label_smoothing=smoothing)
    m = fit(cfg, small_digits).metrics
    assert m[-1]["train_loss"] < 0.9 * m[0]["train_loss"], [r["train_loss"] for r in m]
    assert m[-1]["backend"] != "autograd"
    if head != "bce":
        assert m[-1]["test_acc"] > 0.3, m[-1]


def test_bad_settings_are_refused(small_digits):
    with pytest.raises(ValueError, match="unknown head 'huber'"):
        fit(TrainConfig(head="huber"), small_digits)
    with pytest.raises(ValueError, match="applies to defense 'gradreg'"):
        fit(TrainConfig(defense="insensitive", head="mse"), small_digits)
    with pytest.raises(ValueError, match="label_smoothing applies"):
        fit(TrainConfig(head="mse", label_smoothing=0.1), small_digits)
    with pytest.raises(ValueError, match="unknown defense"):
        fit(TrainConfig(defense="magic"), small_digits)
    with pytest.raises(ValueError, match="no input-gradient penalty"):
        fit(TrainConfig(defense="none", lam=3.0), small_digits)
    with pytest.raises(ValueError, match="epochs >= 2"):
        fit(TrainConfig(defense="distill", epochs=1), small_digits)
    with pytest.raises(ValueError, match="resume needs an output folder"):
        fit(TrainConfig(resume=True), small_digits)


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--model", "--defense", "--lam", "--epochs", "--batch-size",
                 "--lr", "--out", "--resume", "--seed", "--device", "--max-steps", "--head",
                 "--label-smoothing"):
        assert flag in text
    assert "runs/default" in text and "default: 256" in text


def test_cli_runs_and_reports_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--model", "mlp", "--width", "8", "--epochs", "1", "--max-steps", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert (out / "model.pt").exists()
    assert "held-out accuracy" in capsys.readouterr().out
    assert main(["--data", f"mnist:{tmp_path / 'nowhere'}", "--out", str(out)]) == 2
    assert "MNIST folder not found" in capsys.readouterr().err
