"""The ``self-audit`` subcommand of ``alignfl-audit``: its arguments and its handler (the training stack
is imported only when the command runs)."""
from __future__ import annotations

import argparse


def add_self_audit(sub) -> None:
    sa = sub.add_parser(
        "self-audit", help="white-box audit of this package's DP-SGD: a proven epsilon lower bound from Dirac canaries",
        description="Train one client through the DP-SGD trainer of real runs (book-keeping clipping, adaptive "
                    "clip bound) with Dirac gradient canaries beside real MNIST records, read every released "
                    "gradient, and compute the one-run lower bound epsilon_lb (Steinke, Nasr, Jagielski 2023). "
                    "It is printed beside the accountants' epsilon, which a sound implementation never falls "
                    "below, and the bound an ideal auditor gets against the Gaussian mechanism itself. Exit code "
                    "1 when epsilon_lb exceeds the accountant's epsilon.")
    sa.add_argument("--epsilon", type=float, required=True, metavar="E", help="target epsilon (> 0)")
    sa.add_argument("--delta", type=float, default=1e-5, metavar="D", help="delta (default 1e-5)")
    sa.add_argument("--canaries", type=int, default=20000, metavar="M", help="Dirac canaries (default 20000)")
    sa.add_argument("--records", type=int, default=3000, metavar="N",
                    help="real MNIST training records beside them (default 3000, the embedded subset)")
    sa.add_argument("--epochs", type=int, default=20, help="epochs of 1/q steps (default 20)")
    sa.add_argument("--sampling-rate", type=float, default=0.2, metavar="Q", help="Poisson sampling rate (default 0.2)")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--data-root", metavar="DIR", help="folder holding MNIST/raw (default: the usual search)")
    sa.add_argument("--json", action="store_true", help="print JSON")
    sa.set_defaults(func=_self_audit)


def _self_audit(args: argparse.Namespace) -> int:
    import json

    from alignfl_audit.self_audit import SelfAuditRecipe, describe, run_self_audit

    recipe = SelfAuditRecipe(canaries=args.canaries, records=args.records, epochs=args.epochs,
                             sampling_rate=args.sampling_rate)
    res = run_self_audit(args.epsilon, args.delta, recipe, seed=args.seed, data_root=args.data_root)
    print(json.dumps(res, indent=2) if args.json else describe(res))
    return 1 if res["flagged"] else 0
