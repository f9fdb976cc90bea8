"""DIR/report.md of the paper experiment: tables like PAPER.md's, checks, and verdicts.

Every verdict is computed from the numbers in results.json by the rules written next to
it, so a reader can check it and a rerun cannot quietly keep an outdated conclusion.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from ..transfer import TransferResult, format_table
from .bootstrap import Interval, mean_interval, mean_intervals
from .claims import CLAIMS, UNDERFIT_GAP, Part, verdicts
from .per_image import from_floats, unpack_bits


def _f(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _pct(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}%"


def _acc(res: TransferResult, src: str, dst: str, eps: float) -> float:
    return float(res.accuracy[res.names.index(src), res.names.index(dst), res.eps.index(eps)])


MASK_GAP = 0.05  # white-box accuracy above a weaker attack's by more than this: masking flag


def underfit(r: dict) -> list[str]:
    """Models whose clean test accuracy trails normal's by more than UNDERFIT_GAP."""
    ref = r["clean_test"]["normal"]
    return [n for n, v in r["clean_test"].items() if v < ref - UNDERFIT_GAP]


def claim_checks(r: dict) -> list[tuple[int, str, list]]:
    """(claim, verdict, [(part, interval per seed, part verdict)]) from results.json's
    part intervals of every seed (claims.verdicts; gradreg under-trained → claims 1 and 2
    inconclusive)."""
    parts = [Part(p["claim"], p["text"]) for p in r["parts"]]
    per_seed = [[(p, Interval.from_dict(iv)) for p, iv in zip(parts, run["parts"], strict=True)]
                for run in r["seed_runs"]]
    return verdicts(per_seed, moot="gradreg" in underfit(r))


def claim_lines(r: dict) -> list[str]:
    seeds = [run["seed"] for run in r["seed_runs"]]
    lines = [f"Each claim is tested by the paired comparisons below, on the same attacked "
             f"images, for each training seed ({', '.join(map(str, seeds))}). A comparison "
             "predicts a positive mean difference; the brackets are its 95 % bootstrap "
             "interval over the images. It *supports* the claim where the interval is "
             "above 0 for every seed, *contradicts* it where it is below 0 for every seed, "
             "and is *inconclusive* otherwise. A claim holds when every comparison supports "
             "it, does not hold when every one contradicts it, is inconclusive when every "
             "one is, and partly holds otherwise (claims.py).", ""]
    for c, verdict, rows in claim_checks(r):
        lines += [f"**{c}. {CLAIMS[c]}: {verdict}.**", "",
                  "| comparison (predicted > 0) | " + " | ".join(f"seed {s}" for s in seeds)
                  + " | verdict |", "|---" * (len(seeds) + 2) + "|"]
        for part, ivs, v in rows:
            lines.append(f"| {part.text} | " + " | ".join(iv.text() for iv in ivs)
                         + f" | {v} |")
        lines.append("")
    weak = underfit(r)
    if weak:
        lines += [f"Under-trained (clean accuracy more than {UNDERFIT_GAP:.0%} below "
                  f"normal's): {', '.join(weak)}.", ""]
    if len(seeds) > 1:
        lines += ["Clean test accuracy per seed: " + "; ".join(
            f"seed {run['seed']}: " + ", ".join(f"{n} {_pct(v)}"
                                                for n, v in run["clean_test"].items())
            for run in r["seed_runs"]) + ".", ""]
    return lines


def interval_lines(r: dict) -> list[str]:
    """Bootstrap intervals of the headline accuracies and measures (seed 0), and the
    largest half-width over every cell of the transfer matrices."""
    pi = r["per_image"]
    names = r["fgsm"]["names"]
    eps = r["fgsm"]["eps"]
    fg = unpack_bits(pi["fgsm_correct"]).double()
    tg = unpack_bits(pi["tgsm_correct"]).double()
    clean = unpack_bits(pi["clean_test"]).double()
    pgd = unpack_bits(pi["pgd_robust"]).double()
    low = [eps.index(e) for e in (0.1, 0.2, 0.3)]
    src = names.index("normal")
    lines = ["## Intervals", "",
             "95 % bootstrap intervals over the images (seed 0): clean accuracy over the "
             f"{clean.shape[1]} held-out images, the rest over the {fg.shape[-1]} attacked "
             "images. PGD: robust to all four searches (see the masking checks).", "",
             "| model | clean | FGSM from normal, ε = 0.1 / 0.2 / 0.3 | PGD, ε = 0.1 / 0.2 / "
             "0.3 | saliency stroke share | saliency coherence |", "|---|---|---|---|---|---|"]
    for i, n in enumerate(names):
        fgc = " / ".join(mean_interval(fg[src, i, e]).text() for e in low)
        pg = " / ".join(mean_interval(pgd[i, j]).text() for j in range(pgd.shape[1]))
        sh = mean_interval(from_floats(pi["saliency_stroke_share"][n])).text()
        co = mean_interval(from_floats(pi["saliency_coherence"][n])).text()
        lines.append(f"| {n} | {mean_interval(clean[i]).text()} | {fgc} | {pg} | {sh} | {co} |")
    widest = 0.0
    for t in (fg, tg):
        flat = t.reshape(-1, t.shape[-1])
        for iv in mean_intervals(flat.t()):
            widest = max(widest, (iv.hi - iv.lo) / 2)
    lines += ["", f"Every cell of the FGSM and TGSM matrices below has an interval of "
              f"half-width at most {widest:.3f} (per-image outcomes: results.json, "
              "`per_image`).", ""]
    return lines


def render(r: dict) -> str:
    fg = TransferResult.from_dict(r["fgsm"])
    tg = TransferResult.from_dict(r["tgsm"])
    p, ds = r["plan"], r["dataset"]
    lines = [
        f"# Reproducing Ross & Doshi-Velez (2018) on {ds['name']}",
        "",
        f"Mode: {'quick' if r['config']['quick'] else 'full'}. Data: {ds['name']} "
        f"({ds['train']} train / {ds['test']} test images). Model: `{p['model']}`, "
        f"{p['epochs']} epochs per defense, batch 256, Adam lr {r['config']['lr']:g}, "
        f"device {r['config']['device']}. Attacks on the first {fg.n} test images. "
        f"Total time {r['timing']['total'] / 60:.1f} min (shared CPU: times are indicative).",
        "",
        "Generated by `python -m gradreg_kernels.experiments paper`; every number below is "
        "in results.json.",
        "",
        "## Verdicts on the paper's claims",
        "",
    ]
    lines += claim_lines(r)
    lines += interval_lines(r)
    lines += ["## Clean accuracy", "",
              "| model | defense | λ (per-example convention) | test accuracy | on the attacked "
              "subset | training s |", "|---|---|---|---|---|---|"]
    for name, info in r["train"].items():
        lam = info.get("lam")
        lines.append(f"| {name} | {info['defense']} | {_f(lam, 1) if lam else '-'} | "
                     f"{_pct(r['clean_test'][name])} | {_pct(r['clean_eval'][name])} | "
                     f"{info['seconds']:.0f} |")
    lines += ["", "## FGSM, ε = 0.1 / 0.2 / 0.3 (rows: defended model; columns: where the "
              "examples were crafted; bold: white-box)", "", format_table(fg, [0.1, 0.2, 0.3]),
              "", "Larger ε, ε = 0.4 / 0.5 / 0.6 / 0.7:", "",
              format_table(fg, [0.4, 0.5, 0.6, 0.7]), "",
              "![FGSM accuracy against ε](accuracy_vs_eps_fgsm.png)", "",
              "## TGSM towards (y + 1) mod 10, ε = 0.1 / 0.2 / 0.3 (accuracy on the true label)",
              "", format_table(tg, [0.1, 0.2, 0.3]), ""]
    if tg.target_rate is not None:
        rate = TransferResult(tg.names, tg.eps, tg.attack, tg.target_rate, None, tg.n)
        lines += ["Rate at which the defended model predicts the target:", "",
                  format_table(rate, [0.1, 0.2, 0.3]), ""]
    lines += ["![TGSM accuracy against ε](accuracy_vs_eps_tgsm.png)", ""]

    lines += ["## Gradient-masking checks", "",
              f"White-box FGSM; PGD ({p['pgd_steps']} steps, random start, constant step "
              "2.5ε/steps; an example counts as robust only if it survives both the "
              "cross-entropy and the logit-margin loss); PGD with restarts (the survivors "
              f"searched again with both losses, a cosine step-size schedule from ε/4 and "
              f"{p.get('pgd_restarts', 1)} random restarts: robust only if it survives all "
              "four searches); the best transfer attack (lowest accuracy over the other "
              f"sources' FGSM); and a black-box random search ({p['bb_queries']} queries, "
              f"logits only, on {r['black_box_n']} images). Masking shows as a black-box or "
              "transfer attack beating a white-box one, or as zero input gradients.", "",
              "| model | ε | FGSM white-box | PGD | PGD with restarts | best transfer | "
              "black-box | flag |", "|---|---|---|---|---|---|---|---|"]
    flags = []
    for name in fg.names:
        wb = r["white_box"][name]
        for i, e in enumerate(r["white_box_eps"]):
            f_wb = _acc(fg, name, name, e)
            best_tr = min(_acc(fg, s, name, e) for s in fg.names if s != name)
            bb, pg = wb["black_box"][i], wb["pgd"][i]
            strong = wb.get("pgd_strong", wb["pgd"])[i]
            why = [what for what, gap in (("FGSM > black-box", f_wb - bb),
                                          ("FGSM > transfer", f_wb - best_tr),
                                          ("PGD > black-box", strong - bb),
                                          ("PGD > transfer", strong - best_tr),
                                          ("restarts find more", pg - strong))
                   if gap > MASK_GAP]
            lines.append(f"| {name} | {e:g} | {_f(f_wb)} | {_f(pg)} | {_f(strong)} | "
                         f"{_f(best_tr)} | {_f(bb)} | {', '.join(why)} |")
            if why:
                flags.append(f"{name} at ε = {e:g} ({', '.join(why)})")
    lines += ["", "| model | examples with ∇ₓCE exactly 0 | with ‖∇ₓCE‖ < 1e-8 | zero entries "
              "| median ‖∇ₓCE‖ |", "|---|---|---|---|---|"]
    for name in fg.names:
        m = r["white_box"][name]["masking"]
        lines.append(f"| {name} | {_pct(m['zero_examples'])} | {_pct(m['tiny_examples'])} | "
                     f"{_pct(m['zero_entries'])} | {m['median_norm']:.2e} |")
    for name in fg.names:
        m = r["white_box"][name]["masking"]
        if m["tiny_examples"] > 0.01:
            flags.append(f"{name}: ∇ₓCE vanishes on {_pct(m['tiny_examples'])} of the examples")
    lines += ["", f"Flagged (a gradient-free or transfer attack beats a white-box gradient "
              f"attack by more than {MASK_GAP:g}, or vanishing gradients on more than 1% of "
              "the examples: signs that the white-box number overstates robustness): "
              + ("; ".join(flags) if flags else "none") + ".", "",
              "![white-box vs black-box](white_vs_black_box.png)", ""]

    lines += ["## JSMA (θ = 1, γ = 0.25)", "",
              f"{p['jsma_per_class']} image(s) per class, "
              + ("every other class as target" if p["jsma_all_targets"] else
                 "target (y + 1) mod 10") + "; L0 counted over successful attacks.", "",
              "| model | attacks | success rate | mean L0 (pixels) | mean L0 (% of pixels) |",
              "|---|---|---|---|---|"]
    for name, j in r["jsma"].items():
        lines.append(f"| {name} | {j['attacks']} | {_pct(j['success'])} | {_f(j['mean_l0'], 1)} "
                     f"| {_pct(j['mean_l0_fraction'])} |")
    lines += ["", "![JSMA examples](adversarial_jsma.png)", ""]

    it = r["interpretability"]
    lines += ["## Interpretability", "",
              "Saliency: ∇ₓ log p_y on the attacked images. *Stroke share*: share of the map's "
              "energy Σs² on the digit's strokes (pixels > 0.5 grown by one pixel), the "
              "energy-based pointing game of saliency evaluation with the stroke as the object; "
              f"chance (the strokes' area share) is {_f(it['chance_area_share'])}. *Coherence*: "
              "lag-1 spatial autocorrelation of the map, near 0 for pixel noise, near 1 for "
              "strokes and blobs. Perturbations δ = x_adv − x: share of |δ| on the strokes, and "
              "cos(δ, μ_t − μ_y) with the class means μ of the training set, chance 0, which "
              "asks whether the attack paints the target class's average shape (a model-free "
              "proxy for \"looks like the target\").", "",
              "| model | saliency stroke share | saliency coherence | iterated TGSM: reaches "
              "target | mean ‖δ‖∞ | mean ‖δ‖₂ | δ stroke share | δ·(μ_t−μ_y) cos | JSMA δ "
              "stroke share | JSMA cos |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in fg.names:
        v = it[name]
        lines.append(
            f"| {name} | {_f(v['saliency_stroke_share'])} | {_f(v['saliency_coherence'])} | "
            f"{_pct(v['tgsm_target_rate_self'])} | {_f(v['tgsm_linf'], 2)} | "
            f"{_f(v['tgsm_l2'], 2)} | {_f(v['tgsm_stroke_share'])} | "
            f"{_f(v['tgsm_class_alignment'])} | {_f(v['jsma_stroke_share'])} | "
            f"{_f(v['jsma_class_alignment'])} |")
    rate = r["iterated_tgsm_target_rate"]
    lines += ["", "Iterated-TGSM examples: rate at which each model (column) predicts the "
              "target on examples crafted on each model (row):", "",
              "| crafted on | " + " | ".join(rate["names"]) + " |",
              "|" + "---|" * (len(rate["names"]) + 1)]
    for name, row in zip(rate["names"], rate["rate"], strict=True):
        lines.append(f"| {name} | " + " | ".join(_pct(v) for v in row) + " |")
    lines += ["", "![saliency maps](saliency.png)", "",
              "![iterated TGSM examples](adversarial_tgsm.png)", "",
              "## Time per stage (s)", "",
              ", ".join(f"{k}: {v:.0f}" for k, v in r["timing"].items()), ""]
    return "\n".join(lines)


def atomic_write_text(text: str, path: Path) -> None:
    """Write text to path atomically (temp file + rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(results: dict, path: str | Path) -> None:
    """Render and write report.md atomically."""
    atomic_write_text(render(results), Path(path))
