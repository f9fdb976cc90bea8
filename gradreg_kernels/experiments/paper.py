"""The paper experiment: train the defenses, attack them every way, measure, report.

Stages (each timed; results land in DIR/results.json, figures and DIR/report.md):
1. train normal, distilled, adv-trained, insensitive and gradreg models (train.fit);
2. FGSM and TGSM transfer matrices over ε ∈ {0, 0.1, …, 0.7} on the first n_eval test images
   (model × model × ε; diagonal white-box);
3. white-box PGD at ε ∈ {0.1, 0.2, 0.3}: cross-entropy and logit-margin losses from one
   random start at a constant step, then, on the examples that survive, both losses again
   with a cosine step-size schedule and ``pgd_restarts`` random restarts (an example is
   robust only if it survives all four); a black-box random-search attack; zero /
   vanishing input-gradient rates;
4. JSMA (θ = 1, γ = 0.25) towards every other class on k images per class: success rate
   and mean L0;
5. interpretability: input-gradient saliency maps with their stroke-energy share and
   spatial coherence; iterated-TGSM and JSMA examples with the share of the perturbation on
   the strokes, its alignment with the class-mean difference and how often they fool the
   other models (see saliency.py for why these measures);
6. for each further training seed (``seeds``): the five defenses trained again and the
   measures the claims rest on (FGSM matrix, iterated TGSM, saliency) recomputed.

Every per-image outcome is kept in results.json ("per_image"), and every verdict rests on
bootstrap intervals over the attacked images for each seed (claims.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..attacks import eval_mode, iterated_tgsm, jsma, next_class_target, pgd, random_search
from ..saliency import (
    area_share,
    class_mean_alignment,
    class_means,
    gradient_masking_stats,
    input_gradients,
    nanmean,
    perturbation_stroke_share,
    spatial_coherence,
    stroke_energy_share,
    stroke_mask,
)
from ..transfer import transfer_matrix, write_json
from .claims import ClaimData, part_intervals
from .per_image import floats, pack_bits

# report name -> trainer defense
DEFENSES: dict[str, str] = {
    "normal": "none",
    "distilled": "distill",
    "adv-trained": "advtrain",
    "insensitive": "insensitive",
    "gradreg": "gradreg",
}
CHOSEN_LAM_PAPER_CNN = 10 ** 3.75 / (2 * 256)  # λ_paper = 10^3.75, chosen by the grid
#: the gradreg λ (per-example convention, λ_paper/(2B)) of each model unless PaperConfig.lam
#: or --lam-from says otherwise. paper-cnn: the λ chosen by the paper's grid on adversarial
#: validation accuracy (``python -m gradreg_kernels.experiments lambda --model paper-cnn``,
#: docs/paper_reproduction/lambda/). mlp and lenet: λ_paper = 10^3, which trains the MLP
#: to the normal model's accuracy at these budgets (the paper's 10^4.75 collapses it,
#: docs/paper_reproduction/README.md).
GRADREG_LAM = {"paper-cnn": CHOSEN_LAM_PAPER_CNN, "mlp": 1e3 / (2 * 256),
               "lenet": 1e3 / (2 * 256)}
EPS_GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
WHITE_BOX_EPS = [0.1, 0.2, 0.3]


@dataclass
class PaperConfig:
    """What to run. None fields take the mode's default (see `plan`)."""

    data: str = "mnist:../shared/data/mnist"
    out: str = "runs/paper"
    quick: bool = False
    model: str | None = None
    epochs: int | None = None
    device: str = "cpu"
    seed: int = 0
    reuse_models: bool = False
    lr: float = 1e-3
    overrides: dict | None = None   # replaces entries of plan(), e.g. {"n_eval": 20} in tests
    lam: dict | None = None         # trainer defense -> λ (per-example); None: GRADREG_LAM
    seeds: int | None = None        # training seeds (the first gets every attack)


def plan(cfg: PaperConfig) -> dict:
    """The sizes of every stage for the mode (quick: minutes on 2 CPU cores)."""
    q = cfg.quick
    sizes = {
        "model": cfg.model or ("mlp" if q else "paper-cnn"),
        "epochs": cfg.epochs if cfg.epochs is not None else (3 if q else 8),
        "n_eval": 100 if q else 256,            # the paper's FGSM tables use 256 images
        "pgd_steps": 10 if q else 40,
        "pgd_restarts": 2 if q else 3,          # of the cosine-schedule search
        "seeds": cfg.seeds if cfg.seeds is not None else (1 if q else 3),
        "bb_queries": 100 if q else 500,
        "bb_n": 100 if q else 256,
        "jsma_per_class": 1 if q else 2,
        "jsma_all_targets": not q,              # quick: target (y + 1) mod K only
        "tgsm_step": 0.1, "tgsm_steps": 26,     # the paper's iterated TGSM
        "n_pictures": 10,                       # one test image per class in the figures
    }
    unknown = set(cfg.overrides or {}) - set(sizes)
    if unknown:
        raise ValueError(f"unknown plan entries {sorted(unknown)}; known: {sorted(sizes)}")
    sizes.update(cfg.overrides or {})
    return sizes


def _predict(model: nn.Module, x: Tensor, batch: int = 500) -> Tensor:
    with eval_mode(model), torch.no_grad():
        return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((_predict(model, x) == y).float().mean())


def _per_class(y: Tensor, k: int, num_classes: int) -> Tensor:
    """Indices of the first k examples of each class, class by class."""
    idx = [(y == c).nonzero()[:k, 0] for c in range(num_classes)]
    return torch.cat(idx)


def _training_record(folder: Path) -> dict:
    """λ, backend and training seconds from the last line of a trained model's metrics.jsonl."""
    path = folder / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    last = json.loads(lines[-1]) if lines else {}
    return {"lam": last.get("lam"), "backend": last.get("backend"),
            "seconds": float(last.get("elapsed_seconds", 0.0))}


def train_models(cfg: PaperConfig, sizes: dict, data, log: Callable[[str], None],
                 seed: int | None = None) -> tuple[dict[str, nn.Module], dict]:
    """The five defenses trained with ``seed`` (default cfg.seed) into DIR/models/NAME
    (DIR/models/seedS/NAME for another seed), or reused from there with reuse_models."""
    from ..train import TrainConfig, fit, load_trained_model

    seed = cfg.seed if seed is None else seed
    root = Path(cfg.out) / "models" / ("" if seed == cfg.seed else f"seed{seed}")
    models, info = {}, {}
    for name, defense in DEFENSES.items():
        out = root / name
        start = time.perf_counter()
        if cfg.reuse_models and (out / "model.pt").is_file():
            models[name] = load_trained_model(out / "model.pt", cfg.device)
            info[name] = {"defense": defense, "reused": True, **_training_record(out)}
            log(f"[train] {name} (seed {seed}): reused {out / 'model.pt'}")
            continue
        # distillation trains a teacher, then a student: each gets the epochs of one model
        epochs = sizes["epochs"] * (2 if defense == "distill" else 1)
        lam = gradreg_lam(cfg, sizes["model"]).get(defense)
        tc = TrainConfig(data=cfg.data, model=sizes["model"], defense=defense, epochs=epochs,
                         lam=lam, lr=cfg.lr, out=str(out), seed=seed, device=cfg.device,
                         progress=False)
        result = fit(tc, data)
        models[name] = result.model.eval()
        last = result.metrics[-1] if result.metrics else {}
        info[name] = {"defense": defense, "reused": False, "lam": last.get("lam"),
                      "backend": last.get("backend"),
                      "seconds": time.perf_counter() - start}
        log(f"[train] {name} ({defense}, seed {seed}): {info[name]['seconds']:.0f} s, "
            f"test acc {last.get('test_acc')}")
    return models, info


def gradreg_lam(cfg: PaperConfig, model: str) -> dict[str, float]:
    """trainer defense → λ: GRADREG_LAM's for the model, then cfg.lam's entries."""
    return {"gradreg": GRADREG_LAM.get(model, GRADREG_LAM["mlp"]), **(cfg.lam or {})}


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (_predict(model, x) == y).cpu()


def white_box(models: dict[str, nn.Module], x: Tensor, y: Tensor, sizes: dict, seed: int,
              log: Callable[[str], None]) -> tuple[dict, dict[str, Tensor]]:
    """Per model: PGD and black-box accuracies at WHITE_BOX_EPS, masking statistics; and
    per model the (E, N) bool robustness to all four PGD searches."""
    out, robust_all = {}, {}
    nb = min(sizes["bb_n"], len(y))
    for name, m in models.items():
        row: dict = {"pgd_ce": [], "pgd_margin": [], "pgd": [], "pgd_strong": [],
                     "black_box": []}
        per_eps = []
        for e in WHITE_BOX_EPS:
            g = torch.Generator().manual_seed(seed)
            robust = torch.ones(len(y), dtype=torch.bool)
            for loss in ("ce", "margin"):
                adv = pgd(m, x, y, e, steps=sizes["pgd_steps"], loss=loss, generator=g)
                correct = _correct(m, adv, y)
                robust &= correct
                row[f"pgd_{loss}"].append(float(correct.float().mean()))
            row["pgd"].append(float(robust.float().mean()))
            for loss in ("ce", "margin"):  # the survivors, searched harder
                keep = robust.nonzero()[:, 0]
                if keep.numel() == 0:
                    break
                kx, ky = x[keep.to(x.device)], y[keep.to(y.device)]
                adv = pgd(m, kx, ky, e, steps=sizes["pgd_steps"], loss=loss,
                          schedule="cosine", restarts=sizes["pgd_restarts"], generator=g)
                robust[keep] = _correct(m, adv, ky)
            row["pgd_strong"].append(float(robust.float().mean()))
            per_eps.append(robust)
            adv = random_search(m, x[:nb], y[:nb], e, queries=sizes["bb_queries"],
                                generator=torch.Generator().manual_seed(seed))
            row["black_box"].append(_accuracy(m, adv, y[:nb]))
        row["masking"] = gradient_masking_stats(m, x, y)
        out[name] = row
        robust_all[name] = torch.stack(per_eps)
        log(f"[white-box] {name}: PGD {row['pgd']}, PGD with restarts {row['pgd_strong']}, "
            f"black-box {row['black_box']}, masking {row['masking']}")
    return out, robust_all


def measures(models: dict[str, nn.Module], x: Tensor, y: Tensor, means: Tensor,
             sizes: dict, k: int) -> tuple[dict[str, dict[str, Tensor]], Tensor]:
    """Per model, per attacked image: saliency stroke share and coherence, and the
    iterated-TGSM examples towards (y + 1) mod K with their perturbation's stroke share and
    class-mean alignment; and hit (S, T, N): model t predicts the target on s's examples."""
    mask = stroke_mask(x)
    target = next_class_target(y, k)
    per: dict[str, dict[str, Tensor]] = {}
    for name, m in models.items():
        sal = input_gradients(m, x, y)
        adv = iterated_tgsm(m, x, target, step=sizes["tgsm_step"], steps=sizes["tgsm_steps"])
        delta = adv - x
        per[name] = {
            "saliency_stroke_share": stroke_energy_share(sal, mask).cpu(),
            "saliency_coherence": spatial_coherence(sal).cpu(),
            "tgsm_adv": adv,
            "tgsm_stroke_share": perturbation_stroke_share(delta, mask).cpu(),
            "tgsm_class_alignment": class_mean_alignment(delta, y, target, means).cpu(),
        }
    names = list(models)
    hit = torch.zeros(len(names), len(names), len(y), dtype=torch.bool)
    for si, s in enumerate(names):
        for ti, t in enumerate(names):
            hit[si, ti] = (_predict(models[t], per[s]["tgsm_adv"]) == target).cpu()
    return per, hit


def claim_data(fgsm_res, per: dict[str, dict[str, Tensor]], hit: Tensor) -> ClaimData:
    """The per-image outcomes the claims rest on, from the FGSM matrix and ``measures``."""
    return ClaimData(
        names=list(fgsm_res.names), eps=list(fgsm_res.eps), fgsm_correct=fgsm_res.correct,
        tgsm_hit=hit,
        alignment={n: v["tgsm_class_alignment"] for n, v in per.items()},
        stroke_share={n: v["saliency_stroke_share"] for n, v in per.items()},
        coherence={n: v["saliency_coherence"] for n, v in per.items()})


def replicate(cfg: PaperConfig, sizes: dict, data, seed: int, x: Tensor, y: Tensor,
              means: Tensor, log: Callable[[str], None]) -> dict:
    """Train the five defenses with another seed and recompute the claims' parts on the
    same attacked images: {"seed", "clean_test", "train", "parts": [Interval dicts]}."""
    models, info = train_models(cfg, sizes, data, log, seed=seed)
    for m in models.values():
        m.to(cfg.device).eval()
    tx, ty = data.test_x.to(cfg.device), data.test_y.to(cfg.device)
    fg = transfer_matrix(models, x, y, EPS_GRID, "fgsm")
    per, hit = measures(models, x, y, means, sizes, data.num_classes)
    parts = part_intervals(claim_data(fg, per, hit))
    return {"seed": seed, "train": info,
            "clean_test": {n: _accuracy(m, tx, ty) for n, m in models.items()},
            "parts": [iv.to_dict() for _, iv in parts]}


def run_paper(cfg: PaperConfig, data=None, log: Callable[[str], None] = print,
              models: dict[str, nn.Module] | None = None) -> dict:
    """Run every stage; returns the results dict also written to DIR/results.json.

    data: a Dataset (train_x, train_y, test_x, test_y, num_classes, name), loaded from
    cfg.data when None. models: already trained models under the names of DEFENSES, which
    skips training and the further seeds (for re-analysis, and for tests that need no
    trainer).
    """
    from ..data import load_dataset
    from .figures import write_figures
    from .report import write_report

    t_all = time.perf_counter()
    torch.manual_seed(cfg.seed)
    sizes = plan(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = load_dataset(cfg.data, seed=cfg.seed)
    dev = cfg.device
    k = data.num_classes
    timing: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        timing[name] = time.perf_counter() - t0
        log(f"[{name}] {timing[name]:.1f} s")

    t0 = time.perf_counter()
    trained_here = models is None
    if models is None:
        models, train_info = train_models(cfg, sizes, data, log)
    else:
        missing = set(DEFENSES) - set(models)
        if missing:
            raise ValueError(f"models lacks {sorted(missing)}; it needs {list(DEFENSES)}")
        models = {name: models[name] for name in DEFENSES}
        train_info = {name: {"defense": d, "given": True, "seconds": 0.0}
                      for name, d in DEFENSES.items()}
    for m in models.values():
        m.to(dev).eval()
    stage("train", t0)

    test_x, test_y = data.test_x.to(dev), data.test_y.to(dev)
    n = min(sizes["n_eval"], len(test_y))
    x, y = test_x[:n], test_y[:n]
    clean_correct = {name: _correct(m, test_x, test_y) for name, m in models.items()}
    clean = {name: float(v.float().mean()) for name, v in clean_correct.items()}
    clean_eval = {name: float(v[:n].float().mean()) for name, v in clean_correct.items()}
    log("[clean] " + ", ".join(f"{a}: {v:.4f}" for a, v in clean.items()))

    t0 = time.perf_counter()
    fgsm_res = transfer_matrix(models, x, y, EPS_GRID, "fgsm")
    stage("fgsm", t0)
    t0 = time.perf_counter()
    tgsm_res = transfer_matrix(models, x, y, EPS_GRID, "tgsm")
    stage("tgsm", t0)

    t0 = time.perf_counter()
    white, pgd_robust = white_box(models, x, y, sizes, cfg.seed, log)
    nb = min(sizes["bb_n"], n)
    stage("white_box", t0)

    t0 = time.perf_counter()
    pick = _per_class(test_y, sizes["jsma_per_class"], k)
    xs, ys = test_x[pick], test_y[pick]
    if sizes["jsma_all_targets"]:
        reps = torch.arange(1, k, device=dev)
        xj = xs.repeat_interleave(k - 1, 0)
        yj = ys.repeat_interleave(k - 1, 0)
        tj = (yj + reps.repeat(len(ys))) % k
    else:
        xj, yj, tj = xs, ys, next_class_target(ys, k)
    # one attack per picked image towards (y + 1) mod K, first image of each class: pictures
    first = tj == (yj + 1) % k
    per = sizes["jsma_per_class"]
    jsma_out: dict[str, dict] = {}
    jsma_examples: dict[str, Tensor] = {}
    for name, m in models.items():
        res = jsma(m, xj, tj, theta=1.0, gamma=0.25)
        d = xj[0].numel()
        ok = res.success
        jsma_out[name] = {
            "attacks": len(tj), "success": float(ok.float().mean()),
            "mean_l0": float(res.l0[ok].float().mean()) if bool(ok.any()) else float("nan"),
            "mean_l0_fraction": (float(res.l0[ok].float().mean()) / d if bool(ok.any())
                                 else float("nan")),
        }
        jsma_examples[name] = res.x_adv[first][::per][:sizes["n_pictures"]]
        log(f"[jsma] {name}: {jsma_out[name]}")
    jsma_sources = (xj[first][::per][:sizes["n_pictures"]],
                    yj[first][::per][:sizes["n_pictures"]])
    stage("jsma", t0)

    t0 = time.perf_counter()
    means = class_means(data.train_x.to(dev), data.train_y.to(dev), k)
    mask = stroke_mask(x)
    interp: dict[str, dict] = {"chance_area_share": float(area_share(mask).mean())}
    pic_idx = _per_class(test_y, 1, k)[:sizes["n_pictures"]]
    px, py = test_x[pic_idx], test_y[pic_idx]
    pt = next_class_target(py, k)
    pictures: dict[str, dict[str, Tensor]] = {"input": {"x": px.cpu(), "y": py.cpu()}}
    per, hit = measures(models, x, y, means, sizes, k)
    names = list(models)
    for i, (name, m) in enumerate(models.items()):
        v = per[name]
        delta = v["tgsm_adv"] - x
        jx = jsma_examples[name]
        jmask = stroke_mask(jsma_sources[0])
        jdelta = jx - jsma_sources[0]
        jt = next_class_target(jsma_sources[1], k)
        interp[name] = {
            "saliency_stroke_share": nanmean(v["saliency_stroke_share"]),
            "saliency_coherence": nanmean(v["saliency_coherence"]),
            "tgsm_target_rate_self": float(hit[i, i].float().mean()),
            "tgsm_linf": float(delta.flatten(1).abs().amax(1).mean()),
            "tgsm_l2": float(delta.flatten(1).norm(dim=1).mean()),
            "tgsm_stroke_share": nanmean(v["tgsm_stroke_share"]),
            "tgsm_class_alignment": nanmean(v["tgsm_class_alignment"]),
            "jsma_stroke_share": nanmean(perturbation_stroke_share(jdelta, jmask)),
            "jsma_class_alignment": nanmean(class_mean_alignment(
                jdelta, jsma_sources[1], jt, means)),
        }
        pictures[name] = {
            "saliency": input_gradients(m, px, py).cpu(),
            "tgsm": iterated_tgsm(m, px, pt, step=sizes["tgsm_step"],
                                  steps=sizes["tgsm_steps"]).cpu(),
            "jsma": jx.cpu(),
        }
        for kind in ("tgsm", "jsma"):
            with torch.no_grad():
                pictures[name][kind + "_pred"] = m(pictures[name][kind].to(dev)).argmax(1).cpu()
    pictures["input"]["jsma_x"] = jsma_sources[0].cpu()
    stage("interpretability", t0)

    parts = part_intervals(claim_data(fgsm_res, per, hit))
    seed_runs = [{"seed": cfg.seed, "clean_test": clean,
                  "parts": [iv.to_dict() for _, iv in parts]}]
    if trained_here:
        t0 = time.perf_counter()
        for extra in range(1, sizes["seeds"]):
            seed_runs.append(replicate(cfg, sizes, data, cfg.seed + extra, x, y, means, log))
        stage("seeds", t0)

    per_image = {
        "clean_test": pack_bits(torch.stack([clean_correct[nm] for nm in names])),
        "fgsm_correct": pack_bits(fgsm_res.correct),
        "tgsm_correct": pack_bits(tgsm_res.correct), "tgsm_hit": pack_bits(tgsm_res.hit),
        "iterated_tgsm_hit": pack_bits(hit),
        "pgd_robust": pack_bits(torch.stack([pgd_robust[nm] for nm in names])),
        **{key: {nm: floats(per[nm][key]) for nm in names}
           for key in ("saliency_stroke_share", "saliency_coherence", "tgsm_stroke_share",
                       "tgsm_class_alignment")},
    }
    results = {
        "config": asdict(cfg), "plan": sizes, "dataset": {
            "name": data.name, "train": len(data.train_y), "test": len(data.test_y)},
        "train": train_info, "clean_test": clean, "clean_eval": clean_eval,
        "fgsm": fgsm_res.to_dict(), "tgsm": tgsm_res.to_dict(),
        "white_box_eps": WHITE_BOX_EPS, "white_box": white, "black_box_n": nb,
        "jsma": jsma_out, "interpretability": interp,
        "iterated_tgsm_target_rate": {"names": names,
                                      "rate": hit.float().mean(-1).tolist()},
        "parts": [{"claim": p.claim, "text": p.text} for p, _ in parts],
        "seed_runs": seed_runs, "per_image": per_image,
        "timing": timing,
    }
    t0 = time.perf_counter()
    figures = write_figures(results, pictures, out)
    stage("figures", t0)
    results["figures"] = figures
    timing["total"] = time.perf_counter() - t_all
    write_json(results, out / "results.json")
    write_report(results, out / "report.md")
    log(f"[done] {timing['total']:.0f} s; report at {out / 'report.md'}")
    return results

