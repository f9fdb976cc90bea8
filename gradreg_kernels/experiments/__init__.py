"""Experiments that reproduce the paper (Ross & Doshi-Velez, AAAI 2018) with this package.

    python -m gradreg_kernels.experiments paper --data mnist:../shared/data/mnist --out DIR

trains the compared defenses, attacks every model with FGSM, TGSM, PGD, JSMA and a
black-box random search, and writes DIR/report.md, DIR/results.json and PNG figures.
"""

from .paper import DEFENSES, PaperConfig, run_paper

__all__ = ["DEFENSES", "PaperConfig", "run_paper"]
