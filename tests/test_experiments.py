"""The paper experiment end to end on tiny synthetic data: seconds, no trainer needed for the
analysis path; the training path runs when the trainer is installed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gradreg_kernels.experiments import DEFENSES, PaperConfig, run_paper
from gradreg_kernels.experiments.__main__ import main


def tiny_data(n_train=60, n_test=30, side=10, classes=10, seed=0):
    """Bright class-specific bars on dark noise, so that the models can learn something."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.arange(n) % classes
        x = torch.rand(n, 1, side, side, generator=g) * 0.2
        for i, c in enumerate(y.tolist()):
            x[i, 0, c % side, :] = 0.9
        return x, y

    tx, ty = make(n_train)
    vx, vy = make(n_test)
    return SimpleNamespace(train_x=tx, train_y=ty, test_x=vx, test_y=vy, num_classes=classes,
                           name="tiny-bars")


def tiny_models(side=10, classes=10):
    torch.manual_seed(0)
    return {name: nn.Sequential(nn.Flatten(), nn.Linear(side * side, 16), nn.ReLU(),
                                nn.Linear(16, classes)) for name in DEFENSES}


def test_analysis_path_writes_report_results_and_figures(tmp_path):
    cfg = PaperConfig(data="unused", out=str(tmp_path), quick=True,
                      overrides={"pgd_steps": 3, "bb_queries": 10, "tgsm_steps": 5})
    res = run_paper(cfg, data=tiny_data(), models=tiny_models(), log=lambda s: None)
    report = (tmp_path / "report.md").read_text()
    for claim in ("**1.", "**2.", "**3."):
        assert claim in report
    assert sum(report.count(f": {v}") for v in (
        "holds.", "partly holds.", "does not hold.", "inconclusive")) == 3
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["fgsm"]["names"] == list(DEFENSES)
    acc = torch.tensor(saved["fgsm"]["accuracy"])
    assert acc.shape == (5, 5, 8)
    for ti in range(5):  # ε = 0: the clean accuracy of the defended model, whatever the source
        assert torch.allclose(acc[:, ti, 0], acc[0, ti, 0].expand(5))
    for name in res["figures"]:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert len(res["figures"]) == 6
    j = saved["jsma"]["normal"]
    assert j["attacks"] == 10 and 0 <= j["success"] <= 1
    m = saved["white_box"]["gradreg"]["masking"]
    assert 0 <= m["zero_examples"] <= 1
    for name in DEFENSES:  # the restarted search only attacks PGD's survivors
        wb = saved["white_box"][name]
        assert all(s <= p for s, p in zip(wb["pgd_strong"], wb["pgd"], strict=True))
    # the per-image outcomes reproduce every mean of the matrices
    from gradreg_kernels.experiments.per_image import unpack_bits
    correct = unpack_bits(saved["per_image"]["fgsm_correct"])
    assert correct.shape == (5, 5, 8, 30)
    assert torch.allclose(correct.float().mean(-1), acc)
    assert len(saved["seed_runs"]) == 1 and len(saved["seed_runs"][0]["parts"]) == len(
        saved["parts"])


def test_models_must_cover_every_defense(tmp_path):
    models = tiny_models()
    del models["gradreg"]
    with pytest.raises(ValueError, match="models lacks \\['gradreg'\\]"):
        run_paper(PaperConfig(out=str(tmp_path), quick=True), data=tiny_data(), models=models)


def test_cli_trains_and_reports_on_digits(tmp_path):
    out = tmp_path / "run"
    tiny = ["--set", "n_eval=12", "--set", "pgd_steps=2", "--set", "bb_queries=3",
            "--set", "bb_n=12", "--set", "tgsm_steps=3"]
    main(["paper", "--data", "digits", "--out", str(out), "--quick", "--epochs", "1",
          "--model", "mlp", *tiny])
    assert (out / "report.md").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["train"]) == set(DEFENSES)
    assert all(not v["reused"] for v in saved["train"].values())
    # the trained models are on disk and can be reused without training
    main(["paper", "--data", "digits", "--out", str(out), "--quick", "--epochs", "1",
          "--model", "mlp", "--reuse-models", *tiny])
    saved = json.loads((out / "results.json").read_text())
    assert all(v["reused"] for v in saved["train"].values())


def test_lambda_cli_chooses_on_validation_images_and_feeds_the_paper_run(tmp_path):
    grid_dir = tmp_path / "grid"
    main(["lambda", "--data", "digits", "--model", "mlp", "--out", str(grid_dir),
          "--epochs", "1", "--n-val", "100", "--grid", "2,5"])
    saved = json.loads((grid_dir / "results.json").read_text())
    assert saved["dataset"]["validation"] == 100
    assert [round(r["log10_lam_paper"], 6) for r in saved["grid"]] == [2.0, 5.0]
    assert saved["chosen"]["lam"] == saved["grid"][saved["chosen"]["index"]]["lam"]
    assert (grid_dir / "lambda.png").read_bytes()[:4] == b"\x89PNG"
    assert "**Chosen: λ_paper" in (grid_dir / "report.md").read_text()
    # a rerun reuses the trained models (resume) and reproduces the numbers
    main(["lambda", "--data", "digits", "--model", "mlp", "--out", str(grid_dir),
          "--epochs", "1", "--n-val", "100", "--grid", "2,5"])
    again = json.loads((grid_dir / "results.json").read_text())
    assert again["grid"][1]["score"] == saved["grid"][1]["score"]
    # the paper run takes the chosen λ
    out = tmp_path / "paper"
    tiny = ["--set", "n_eval=12", "--set", "pgd_steps=2", "--set", "bb_queries=3",
            "--set", "bb_n=12", "--set", "tgsm_steps=3"]
    main(["paper", "--data", "digits", "--out", str(out), "--quick", "--epochs", "1",
          "--model", "mlp", "--lam-from", str(grid_dir), "--seeds", "2", *tiny])
    res = json.loads((out / "results.json").read_text())
    assert res["train"]["gradreg"]["lam"] == pytest.approx(saved["chosen"]["lam"])
    assert [s["seed"] for s in res["seed_runs"]] == [0, 1]
    assert "| seed 0 | seed 1 |" in (out / "report.md").read_text()
