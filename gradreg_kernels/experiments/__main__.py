"""CLI of the experiments.

    python -m gradreg_kernels.experiments paper --data SPEC --out DIR [--quick]
    python -m gradreg_kernels.experiments lambda --data SPEC --model paper-cnn --out DIR [--quick]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .lambda_grid import LambdaConfig, chosen_lam, run_lambda
from .paper import PaperConfig, run_paper


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gradreg_kernels.experiments")
    sub = ap.add_subparsers(dest="experiment", required=True)
    p = sub.add_parser("paper", help="train the defenses, attack them, write DIR/report.md",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = PaperConfig()
    p.add_argument("--data", default=d.data, help="'digits' or 'mnist:PATH'")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true",
                   help="fewer epochs, examples and attack steps (minutes on a CPU)")
    p.add_argument("--model", default=None,
                   help="architecture (default: paper-cnn, with --quick mlp)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per defense")
    p.add_argument("--device", default=d.device)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                   help="override one stage size of the plan (e.g. n_eval=64); repeatable")
    p.add_argument("--lam", action="append", default=[], metavar="DEFENSE=LAM",
                   help="λ of a penalized defense (gradreg, insensitive) in the per-example "
                        "convention λ_paper/(2B); unset: gradreg the λ the grid chose for "
                        "paper-cnn, 1000/512 for the MLP (see docs/paper_reproduction), "
                        "insensitive the paper's")
    p.add_argument("--lam-from", default=None, metavar="DIR",
                   help="take gradreg's λ from a finished 'lambda' run's DIR/results.json")
    p.add_argument("--seeds", type=int, default=None,
                   help="training seeds (default 3, with --quick 1); the first gets every "
                        "attack, the others the measures the claims rest on")
    p.add_argument("--reuse-models", action="store_true",
                   help="load DIR/models/NAME/model.pt where present instead of training")
    g = sub.add_parser("lambda", help="train gradreg on the paper's λ grid, score each model "
                       "on adversarial validation examples, write DIR/report.md",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dl = LambdaConfig()
    g.add_argument("--data", default=dl.data, help="'digits' or 'mnist:PATH'")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--model", default=dl.model, help="architecture")
    g.add_argument("--quick", action="store_true",
                   help="5 grid points (every third), 2 epochs, 500 validation images")
    g.add_argument("--epochs", type=int, default=None, help="training epochs per model")
    g.add_argument("--n-val", type=int, default=None, help="validation images")
    g.add_argument("--grid", default=None,
                   help="comma-separated log10 λ_paper values (default: 2, 2.25, …, 5)")
    g.add_argument("--device", default=dl.device)
    g.add_argument("--seed", type=int, default=dl.seed)
    args = ap.parse_args(argv)
    if args.experiment == "lambda":
        grid = None if args.grid is None else [
            10 ** float(v) for v in args.grid.split(",") if v.strip()]
        lc = LambdaConfig(data=args.data, out=args.out, model=args.model, quick=args.quick,
                          epochs=args.epochs, n_val=args.n_val, grid=grid,
                          device=args.device, seed=args.seed)
        run_lambda(lc, log=lambda s: print(s, flush=True))
        return 0
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    lam = {}
    for item in args.lam:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--lam takes DEFENSE=VALUE, got {item!r}")
        lam[key] = float(value)
    if args.lam_from is not None:
        lam.setdefault("gradreg", chosen_lam(args.lam_from))
    cfg = PaperConfig(data=args.data, out=args.out, quick=args.quick, model=args.model,
                      epochs=args.epochs, device=args.device, seed=args.seed,
                      reuse_models=args.reuse_models, overrides=overrides, lam=lam or None,
                      seeds=args.seeds)
    run_paper(cfg, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
