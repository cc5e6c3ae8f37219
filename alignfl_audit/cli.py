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

    overrides = _parse_sets(args.set)
    if args.seed is not None:
        overrides["seed"] = args.seed
    cfg = load_config(args.config, overrides)
    from alignfl_audit.orchestrate import run_experiment  # the training stack loads only for a valid config
    run = run_experiment(cfg, data_root=args.data_root, out=args.out, quiet=args.quiet)
    metrics = run.read_json("metrics.json")
    u = metrics["utility"]
    tstr = "n/a" if u["tstr_accuracy"] is None else f"{u['tstr_accuracy']:.4f}"
    print(f"{run.path}: {metrics['strategy']} probe_accuracy={u['probe_accuracy']:.4f} "
          f"probe_f1={u['probe_f1']:.4f} fid={u['fid']:.2f} (domain-CNN) tstr_accuracy={tstr}")
    return 0


def _epsilon(args: argparse.Namespace) -> int:
    import json

    from alignfl_audit.accounting import epsilons, ledger_epsilons
    from federation.errors import ConfigError

    if args.ledger:
        from alignfl_audit.rundir import RunDir

        path = RunDir(args.ledger).file("privacy_ledger.json")
        try:
            result = ledger_epsilons(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"cannot read a privacy ledger at {path}: {err}") from None
    else:
        missing = [f for f, v in (("--sampling-rate", args.sampling_rate), ("--noise-multiplier", args.noise_multiplier),
                                  ("--steps", args.steps), ("--delta", args.delta)) if v is None]
        if missing:
            raise ConfigError(f"epsilon needs --ledger RUN_DIR, or all of {', '.join(missing)}")
        result = epsilons([(args.noise_multiplier, args.sampling_rate, args.steps)], args.delta)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if "accountants" in result:
        _print_accounting(result, args.delta)
        return 0
    print(f"mechanism: {result['mechanism']}; formal guarantee: {'yes' if result['formal_guarantee'] else 'NO'}")
    if not result["formal_guarantee"]:
        print(f"no epsilon: {result.get('epsilon_withheld') or result['note']}")
        return 0
    for cid, res in result["clients"].items():
        print(f"client {cid}:")
        _print_accounting(res, result["delta"])
    return 0


def _print_accounting(res: dict, delta: float) -> None:
    for name, r in res["accountants"].items():
        value = f"{r['epsilon']:.4f}" if r["epsilon"] is not None else f"failed ({r['error']})"
        print(f"  {name:<18} epsilon = {value}")
    h = res["headline"]
    print(f"  headline: epsilon = {h['epsilon']:.4f} at delta = {delta:g} ({h['accountant']}, the tightest valid)")
    for flag in res["flags"]:
        print(f"  WARNING: {flag}")


def _inspect_upload(args: argparse.Namespace) -> int:
    import json

    from federation.messages import load_upload, parameter_count

    up = load_upload(args.path)  # validates; a rejected upload exits nonzero with the reason
    encoder = [k for k in up.tensors if k.startswith("encoder")]
    info = {"path": str(args.path), "client": up.client, "round": up.round, "kind": up.kind, "spec": up.spec,
            "num_samples": up.num_samples, "parameters": parameter_count(up.tensors),
            "tensors": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                        for k, v in up.tensors.items()],
            "extra_artifacts": {name: {k: list(v.shape) for k, v in t.items()} for name, t in up.extras.items()},
            "encoder_present": bool(encoder)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.path}: valid {up.kind} upload from client {up.client}, round {up.round}")
    print(f"  architecture: {json.dumps(up.spec)}")
    print(f"  declares {up.num_samples} training records; {info['parameters']} parameters in {len(up.tensors)} tensors")
    for t in info["tensors"]:
        print(f"    {t['name']:<40} {str(tuple(t['shape'])):<16} {t['dtype']}")
    for name, shapes in info["extra_artifacts"].items():
        print(f"  EXTRA shared artifact {name!r}: {shapes} (no formal privacy guarantee covers it)")
    if encoder:
        print(f"  encoder present: YES ({len(encoder)} encoder tensors: this upload shares the whole VAE)")
    else:
        print("  encoder present: no (no encoder tensor in this upload)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="ALIGN-FL federated learning with decoder-only sharing, and an audit of what the "
                    "shared decoders leak.",
        epilog="examples:\n"
               "  alignfl-audit run configs/quickstart.yaml                  offline, on the embedded subset\n"
               "  alignfl-audit run configs/paper-mnist.yaml --data-root DIR [--out DIR] [--seed N] [--quiet]\n"
               "  alignfl-audit epsilon --sampling-rate 0.01 --noise-multiplier 1.0 --steps 1000 --delta 1e-5\n"
               "  alignfl-audit epsilon --ledger RUN_DIR\n"
               "'alignfl-audit COMMAND --help' describes each command.")
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

    eps = sub.add_parser(
        "epsilon", help="epsilon from every accountant, for given DP-SGD parameters or a run's ledger",
        description="Compute epsilon with Opacus RDP, Opacus PRV, dp-accounting RDP and dp-accounting PLD, "
                    "either for one Poisson-subsampled Gaussian mechanism (--sampling-rate, --noise-multiplier, "
                    "--steps, --delta) or per client from a run's privacy_ledger.json (--ledger RUN_DIR).")
    eps.add_argument("--ledger", metavar="RUN_DIR", help="a run directory holding privacy_ledger.json")
    eps.add_argument("--sampling-rate", type=float, metavar="Q")
    eps.add_argument("--noise-multiplier", type=float, metavar="SIGMA")
    eps.add_argument("--steps", type=int, metavar="T")
    eps.add_argument("--delta", type=float, metavar="D")
    eps.add_argument("--json", action="store_true", help="print JSON")
    eps.set_defaults(func=_epsilon)

    insp = sub.add_parser(
        "inspect-upload", help="show exactly what a client shared, after validating it",
        description="Validate one upload (shared/round-R/client-K.safetensors and its .json sidecar) as the "
                    "server does, then show the architecture, parameter count, every tensor, any extra "
                    "artifact, and whether an encoder is present. Exits nonzero on an invalid upload.")
    insp.add_argument("path", help="a client-K.safetensors file (its client-K.json sidecar beside it)")
    insp.add_argument("--json", action="store_true", help="print JSON")
    insp.set_defaults(func=_inspect_upload)
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
    except BrokenPipeError:  # output piped into a command that stopped reading (e.g. head)
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
