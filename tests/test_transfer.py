"""Transfer matrices: every cell against a direct computation; the table and JSON forms."""

from __future__ import annotations

import pytest
import torch
from attack_models import images, tiny_cnn

from gradreg_kernels.attacks import fgsm, tgsm
from gradreg_kernels.transfer import TransferResult, format_table, transfer_matrix


def models3():
    return {f"m{i}": tiny_cnn(side=5, classes=4, seed=i).eval() for i in range(3)}


def test_every_cell_matches_a_direct_computation_and_diagonal_is_white_box():
    models = models3()
    x, y = images(23, side=5, seed=4), torch.arange(23) % 4
    eps = [0.0, 0.1, 0.3]
    res = transfer_matrix(models, x, y, eps, "fgsm", batch_size=12)
    assert res.accuracy.shape == (3, 3, 3) and res.target_rate is None
    names = list(models)
    for si, s in enumerate(names):
        for ei, e in enumerate(eps):
            adv = fgsm(models[s], x, y, e)
            for ti, t in enumerate(names):
                with torch.no_grad():
                    acc = (models[t](adv).argmax(1) == y).double().mean()
                assert abs(float(res.accuracy[si, ti, ei]) - float(acc)) < 1e-6
    clean = torch.tensor([float((m(x).argmax(1) == y).double().mean()) for m in models.values()])
    assert torch.allclose(res.accuracy[:, :, 0], clean.expand(3, 3).float())
    assert torch.equal(res.white_box(), res.accuracy[[0, 1, 2], [0, 1, 2]])


def test_targeted_rate_counts_the_next_class():
    models = models3()
    x, y = images(17, side=5, seed=5), torch.arange(17) % 4
    res = transfer_matrix(models, x, y, [0.2], "tgsm")
    adv = tgsm(models["m1"], x, y, 0.2)
    with torch.no_grad():
        rate = (models["m2"](adv).argmax(1) == (y + 1) % 4).float().mean()
    assert abs(float(res.target_rate[1, 2, 0]) - float(rate)) < 1e-6


def test_custom_attack_json_round_trip_and_table():
    models = models3()
    x, y = images(9, side=5, seed=6), torch.arange(9) % 4

    def blank(model, xb, yb, e):
        return torch.zeros_like(xb)

    res = transfer_matrix(models, x, y, [0.1, 0.2], blank)
    assert res.attack == "blank"
    back = TransferResult.from_dict(res.to_dict())
    assert back.names == res.names and torch.allclose(back.accuracy, res.accuracy)
    table = format_table(res, [0.2])
    assert table.count("\n") == 4 and "from m0" in table and "**" in table


def test_bad_arguments():
    models = models3()
    x, y = images(3, side=5), torch.arange(3)
    with pytest.raises(ValueError, match="unknown attack"):
        transfer_matrix(models, x, y, [0.1], "cw")
    with pytest.raises(ValueError, match="at least one model"):
        transfer_matrix({}, x, y, [0.1])
    with pytest.raises(ValueError, match="x has 3 examples but y has 2"):
        transfer_matrix(models, x, y[:2], [0.1])


def test_cli_writes_the_matrix_for_saved_models(tmp_path):
    import json

    from gradreg_kernels.transfer import load_model, main

    torch.manual_seed(0)
    paths = []
    for i in range(2):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        path = tmp_path / f"m{i}.pt"
        torch.save(model, path)
        paths.append(path)
    assert isinstance(load_model(paths[0]), torch.nn.Module)
    out = tmp_path / "matrix.json"
    main(["--data", "digits", "--model", f"a={paths[0]}", "--model", f"b={paths[1]}",
          "--attack", "tgsm", "--eps", "0,0.2", "--n", "20", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["names"] == ["a", "b"] and saved["n"] == 20
    assert torch.tensor(saved["accuracy"]).shape == (2, 2, 2)
    assert torch.tensor(saved["target_rate"]).shape == (2, 2, 2)
    with pytest.raises(FileNotFoundError, match="no model file"):
        load_model(tmp_path / "missing")
