"""CLI: python -m gradreg_kernels.experiments paper --data SPEC --out DIR [--quick]."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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
    p.add_argument("--model", default=None, help="architecture (default: mlp)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per defense")
    p.add_argument("--device", default=d.device)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                   help="override one stage size of the plan (e.g. n_eval=64); repeatable")
    p.add_argument("--lam", action="append", default=[], metavar="DEFENSE=LAM",
                   help="λ of a penalized defense (gradreg, insensitive) in the per-example "
                        "convention λ_paper/(2B); unset: gradreg 1000/512 (λ_paper = 10^3, "
                        "see docs/paper_reproduction), insensitive the paper's")
    p.add_argument("--reuse-models", action="store_true",
                   help="load DIR/models/NAME/model.pt where present instead of training")
    args = ap.parse_args(argv)
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
    cfg = PaperConfig(data=args.data, out=args.out, quick=args.quick, model=args.model,
                      epochs=args.epochs, device=args.device, seed=args.seed,
                      reuse_models=args.reuse_models, overrides=overrides, lam=lam or None)
    run_paper(cfg, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
