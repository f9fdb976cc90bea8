"""The paper's three claims as paired comparisons on the attacked images, with verdicts.

Each claim is split into *parts*; a part is one prediction "d̄ > 0" about a paired
per-image difference d_n between two models (or two sources of examples) on the same
images, e.g. d_n = 1[gradreg right on FGSM(normal, x_n)] − 1[normal right on it]. A part's
interval is the bootstrap interval of d̄ over the images (bootstrap.py), computed for every
training seed. A part

- *supports* its claim when the interval lies above 0 for every seed,
- *contradicts* it when the interval lies below 0 for every seed,
- is *inconclusive* otherwise (an interval holds 0, or the seeds disagree);

and a claim's verdict follows from its parts (bootstrap.claim_verdict). Claims 1 and 2
compare robust accuracies, which mean nothing for a model that has not learned the task:
when gradreg's clean accuracy trails normal's by more than UNDERFIT_GAP, their verdict is
"inconclusive" whatever the parts say.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .bootstrap import Interval, claim_verdict, mean_interval, part_verdict

LOW_EPS = [0.1, 0.2, 0.3]
HIGH_EPS = [0.4, 0.5, 0.6, 0.7]
UNDERFIT_GAP = 0.05


@dataclass
class ClaimData:
    """Per-image outcomes of one trained set of models on the N attacked images.

    names: the models (DEFENSES order); eps: the FGSM budgets of ``fgsm_correct``;
    fgsm_correct: (S, T, E, N) bool, model t right on FGSM examples crafted on model s;
    tgsm_hit: (S, T, N) bool, model t predicts the target (y + 1) mod K on iterated-TGSM
    examples crafted on s; alignment, stroke_share, coherence: name → (N,) float (NaN where
    undefined): cos(δ, μ_t − μ_y) of s's iterated-TGSM perturbation, and the saliency map's
    stroke share and spatial coherence.
    """

    names: list[str]
    eps: list[float]
    fgsm_correct: Tensor
    tgsm_hit: Tensor
    alignment: dict[str, Tensor]
    stroke_share: dict[str, Tensor]
    coherence: dict[str, Tensor]

    def _i(self, name: str) -> int:
        return self.names.index(name)

    def _e(self, eps: float) -> int:
        return self.eps.index(eps)

    def correct(self, src: str, dst: str, eps: float) -> Tensor:
        return self.fgsm_correct[self._i(src), self._i(dst), self._e(eps)].double()

    def others_correct(self, src: str, eps: list[float]) -> Tensor:
        """(N,) mean over the models other than src and over eps of their correctness on
        src's FGSM examples."""
        rows = [self.correct(src, d, e) for d in self.names if d != src for e in eps]
        return torch.stack(rows).mean(0)

    def others_hit(self, src: str) -> Tensor:
        """(N,) share of the models other than src predicting the target on src's
        iterated-TGSM examples."""
        s = self._i(src)
        keep = [t for t in range(len(self.names)) if t != s]
        return self.tgsm_hit[s, keep].double().mean(0)


@dataclass(frozen=True)
class Part:
    """One prediction d̄ > 0 of a claim, and how d is formed."""

    claim: int
    text: str


def claim_parts(d: ClaimData) -> list[tuple[Part, Tensor]]:
    """Every part of the three claims with its per-image difference d (N,) (predicted > 0)."""
    out: list[tuple[Part, Tensor]] = []
    for e in LOW_EPS:
        out.append((Part(1, f"FGSM from normal at ε = {e:g}: gradreg right more often than "
                           "normal itself (white-box)"),
                    d.correct("normal", "gradreg", e) - d.correct("normal", "normal", e)))
    hi = torch.stack([d.correct("normal", "gradreg", e) - d.correct("normal", "adv-trained", e)
                      for e in HIGH_EPS]).mean(0)
    out.append((Part(1, "FGSM from normal past the adversarial-training ε (mean over ε = "
                        + "/".join(f"{e:g}" for e in HIGH_EPS) + "): gradreg right more often "
                        "than adv-trained"), hi))
    out.append((Part(2, "FGSM at ε = 0.1/0.2/0.3: the other models are wrong more often on "
                        "examples crafted on gradreg than on examples crafted on normal"),
                d.others_correct("normal", LOW_EPS) - d.others_correct("gradreg", LOW_EPS)))
    out.append((Part(2, "iterated TGSM: the other models predict the target more often on "
                        "gradreg's examples than on normal's"),
                d.others_hit("gradreg") - d.others_hit("normal")))
    out.append((Part(2, "iterated TGSM: gradreg's perturbations align better with the "
                        "class-mean difference μ_t − μ_y than normal's"),
                d.alignment["gradreg"] - d.alignment["normal"]))
    for name in ("gradreg", "insensitive"):
        out.append((Part(3, f"saliency energy on the strokes: {name} above normal"),
                    d.stroke_share[name] - d.stroke_share["normal"]))
        out.append((Part(3, f"saliency spatial coherence: {name} above normal"),
                    d.coherence[name] - d.coherence["normal"]))
    return out


def part_intervals(d: ClaimData) -> list[tuple[Part, Interval]]:
    return [(p, mean_interval(v)) for p, v in claim_parts(d)]


def seeds_verdict(intervals: list[Interval]) -> str:
    """supports / contradicts only where every seed's interval agrees, else inconclusive."""
    verdicts = {part_verdict(iv) for iv in intervals}
    return verdicts.pop() if len(verdicts) == 1 else "inconclusive"


CLAIMS = {
    1: "Gradient-regularized models resist transferred FGSM examples and degrade more "
       "gradually than adversarial training past its ε",
    2: "Adversarial examples crafted on gradient-regularized models are more interpretable "
       "and fool the other models",
    3: "Regularized models' input gradients are cleaner saliency maps",
}


def verdicts(per_seed: list[list[tuple[Part, Interval]]], moot: bool
             ) -> list[tuple[int, str, list[tuple[Part, list[Interval], str]]]]:
    """(claim, verdict, [(part, its interval per seed, part verdict)]) for the claims, from
    the part intervals of each seed (same parts in the same order); ``moot``: gradreg is
    under-trained, so claims 1 and 2 are inconclusive."""
    if not per_seed:
        raise ValueError("need the part intervals of at least one seed")
    out = []
    for c in CLAIMS:
        rows = []
        for j, (part, _) in enumerate(per_seed[0]):
            if part.claim != c:
                continue
            ivs = [seed[j][1] for seed in per_seed]
            rows.append((part, ivs, seeds_verdict(ivs)))
        verdict = claim_verdict([v for _, _, v in rows])
        if moot and c in (1, 2):
            verdict = f"inconclusive (gradreg under-trained; the parts alone give: {verdict})"
        out.append((c, verdict, rows))
    return out
