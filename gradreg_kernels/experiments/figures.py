"""PNG figures of the paper experiment (matplotlib, Agg backend), written atomically.

- accuracy_vs_eps_{fgsm,tgsm}.png: one panel per defended model, one line per source model
  (solid: white-box, dashed: transferred), accuracy against ε;
- white_vs_black_box.png: per model, accuracy under FGSM, PGD (an example counts as robust
  only if it survives both the CE and the margin loss), PGD with restarts and a cosine
  step-size schedule on the survivors, and the black-box random search,
  at ε ∈ {0.1, 0.2, 0.3};
- saliency.png: the test inputs, then each model's input gradient ∇_x log p_y (red raises
  the true class, blue lowers it; each map scaled to its own largest magnitude);
- adversarial_tgsm.png, adversarial_jsma.png: each model's iterated-TGSM / JSMA examples
  towards (y + 1) mod K, with the model's prediction in red in each tile's corner.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402


def _save(fig, path: Path) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=80, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path.name


def accuracy_vs_eps(result: dict, path: Path, title: str) -> str:
    names, eps = result["names"], result["eps"]
    acc = torch.tensor(result["accuracy"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), sharey=True)
    axes = axes if len(names) > 1 else [axes]
    for ti, (ax, dst) in enumerate(zip(axes, names, strict=True)):
        for si, src in enumerate(names):
            ax.plot(eps, acc[si, ti].tolist(), "-" if si == ti else "--", marker=".",
                    label=f"from {src}" + (" (white-box)" if si == ti else ""))
        ax.set_title(f"defended: {dst}", fontsize=9)
        ax.set_xlabel("ε")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10, y=1.04)
    return _save(fig, path)


def white_vs_black(results: dict, path: Path) -> str:
    names = list(results["white_box"])
    eps = results["white_box_eps"]
    fgsm = torch.tensor(results["fgsm"]["accuracy"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), sharey=True)
    for i, (ax, name) in enumerate(zip(axes, names, strict=True)):
        wb = results["white_box"][name]
        cols = [results["fgsm"]["eps"].index(e) for e in eps]
        ax.plot(eps, fgsm[i, i, cols].tolist(), marker="o", label="FGSM (white-box)")
        ax.plot(eps, wb["pgd"], marker="s", label="PGD (white-box)")
        if "pgd_strong" in wb:
            ax.plot(eps, wb["pgd_strong"], marker="D", label="PGD with restarts (white-box)")
        ax.plot(eps, wb["black_box"], marker="^", label="random search (black-box)")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("ε")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=7)
    return _save(fig, path)


def _grid(rows: list[tuple[str, Tensor]], path: Path, signed: bool,
          titles: list[list[str] | None] | None = None) -> str:
    """One mosaic image (one axes: fast): a row of tiles per entry of rows. Signed rows are
    coloured with RdBu_r, each tile scaled to its own largest magnitude; others are gray."""
    import numpy as np

    ncol = max(r[1].shape[0] for r in rows)
    h, w = rows[0][1].shape[-2:]
    pad = 2
    canvas = np.ones(((h + pad) * len(rows), (w + pad) * ncol, 3))
    cmap = plt.get_cmap("RdBu_r")
    for r, (label, imgs) in enumerate(rows):
        for c in range(imgs.shape[0]):
            img = imgs[c].sum(0).float().numpy()
            if signed and label != "input":
                v = float(abs(img).max()) or 1.0
                rgb = cmap((img / v + 1) / 2)[..., :3]
            else:
                rgb = np.repeat(np.clip(img, 0, 1)[..., None], 3, axis=2)
            top, left = r * (h + pad), c * (w + pad)
            canvas[top:top + h, left:left + w] = rgb
    fig, ax = plt.subplots(figsize=(0.75 * ncol + 1.2, 0.8 * len(rows)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(h + pad) * r + h / 2 for r in range(len(rows))])
    ax.set_yticklabels([label for label, _ in rows], fontsize=8)
    for r, row_titles in enumerate(titles or []):
        for c, text in enumerate(row_titles or []):
            ax.text(c * (w + pad) + w - 1, r * (h + pad) + 1, text, color="red", fontsize=6,
                    ha="right", va="top")
    for side in ax.spines.values():
        side.set_visible(False)
    return _save(fig, path)


def write_figures(results: dict, pictures: dict, out: Path) -> list[str]:
    """Write every figure into out; returns their file names."""
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in pictures if n != "input"]
    files = [
        accuracy_vs_eps(results["fgsm"], out / "accuracy_vs_eps_fgsm.png",
                        "FGSM: accuracy of each defended model on examples from each source"),
        accuracy_vs_eps(results["tgsm"], out / "accuracy_vs_eps_tgsm.png",
                        "TGSM (target (y+1) mod 10): accuracy on the true label"),
        white_vs_black(results, out / "white_vs_black_box.png"),
    ]
    inp = pictures["input"]
    rows = [("input", inp["x"])] + [(n, pictures[n]["saliency"]) for n in names]
    files.append(_grid(rows, out / "saliency.png", signed=True))
    for kind, src in (("tgsm", inp["x"]), ("jsma", inp.get("jsma_x", inp["x"]))):
        rows = [("input", src)] + [(n, pictures[n][kind]) for n in names]
        titles = [None] + [[str(int(p)) for p in pictures[n][kind + "_pred"]] for n in names]
        files.append(_grid(rows, out / f"adversarial_{kind}.png", signed=False, titles=titles))
    return files
