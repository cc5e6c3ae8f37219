"""The ``alignfl-audit`` command line."""
from __future__ import annotations

import argparse
import sys

from federation.errors import FederationError

PROG = "alignfl-audit"


def _parse_sets(items: list[str] | None) -> dict:
    import yaml

    from federation.errors import ConfigError

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes KEY=VALUE (dotted key), got {item!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: value {value!r} is not valid YAML") from None
    return out


def _run(args: argparse.Namespace) -> int:
    from alignfl_audit.config import load_config
    from alignfl_audit.orchestrate import run_experiment

    overrides = _parse_sets(args.set)
    if args.seed is not None:
        overrides["seed"] = args.seed
    cfg = load_config(args.config, overrides)
    run = run_experiment(cfg, data_root=args.data_root, out=args.out, quiet=args.quiet)
    metrics = run.read_json("metrics.json")
    u = metrics["utility"]
    tstr = "n/a" if u["tstr_accuracy"] is None else f"{u['tstr_accuracy']:.4f}"
    print(f"{run.path}: {metrics['strategy']} probe_accuracy={u['probe_accuracy']:.4f} "
          f"probe_f1={u['probe_f1']:.4f} fid={u['fid']:.2f} (domain-CNN) tstr_accuracy={tstr}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="ALIGN-FL federated learning with decoder-only sharing, and an audit of what the "
                    "shared decoders leak.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="train a federation from a YAML config and write a run directory",
        description="Train the federation described by CONFIG and write a run directory: the resolved "
                    "config, partition.json, every shared upload (shared/round-R/client-K.*), metrics.json, "
                    "rounds.csv and figures/. Data is searched in this order: --data-root (or data.root), "
                    "$ALIGNFL_DATA_DIR, torchvision's download (only with data.download: true), then the "
                    "embedded subset.")
    run.add_argument("config", help="YAML experiment config, e.g. configs/quickstart.yaml")
    run.add_argument("--data-root", metavar="DIR",
                     help="folder holding MNIST/raw and FashionMNIST/raw (IDX files, .gz or raw)")
    run.add_argument("--out", metavar="DIR", help="run directory to create (default: runs/NAME-seedN[-K])")
    run.add_argument("--seed", type=int, help="override the config's seed")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config value, e.g. --set training.rounds=5 (repeatable)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FederationError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
