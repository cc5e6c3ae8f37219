"""The ``alignfl-audit`` command line."""
from __future__ import annotations

import argparse
import sys

from alignfl_audit.self_audit_cli import add_self_audit
from federation import run_layout as layout
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

    from federation.errors import ConfigError

    if args.resume:
        if args.config or args.set or args.seed is not None or args.out:
            raise ConfigError("--resume RUN_DIR continues a run with its own config: give no CONFIG, --set, "
                              "--seed or --out")
        from alignfl_audit.orchestrate import after_run, resume_experiment

        cfg, run = resume_experiment(args.resume, data_root=args.data_root, quiet=args.quiet)
        _apply_run_flags(cfg, args)
        return _finish(cfg, after_run(cfg, run, args.data_root, args.quiet))
    if not args.config:
        raise ConfigError("run needs a CONFIG file (or --resume RUN_DIR)")
    overrides = _parse_sets(args.set)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.no_audit:  # as overrides, so validation sees them (a centralized run needs audit off)
        overrides["audit.enabled"] = False
    if args.no_report:
        overrides["report"] = False
    cfg = load_config(args.config, overrides)
    from alignfl_audit.orchestrate import run_pipeline  # the training stack loads only for a valid config
    return _finish(cfg, run_pipeline(cfg, data_root=args.data_root, out=args.out, quiet=args.quiet))


def _apply_run_flags(cfg, args) -> None:
    if args.no_audit:
        cfg.audit.enabled = False
    if args.no_report:
        cfg.report = False


def _finish(cfg, run) -> int:
    metrics = run.read_json(layout.METRICS)
    u = metrics["utility"]
    tstr = "n/a" if u["tstr_accuracy"] is None else f"{u['tstr_accuracy']:.4f}"
    print(f"{run.path}: {metrics['strategy']} probe_accuracy={u['probe_accuracy']:.4f} "
          f"probe_f1={u['probe_f1']:.4f} fid={u['fid']:.2f} (domain-CNN) tstr_accuracy={tstr}")
    if cfg.audit.enabled:
        _print_audit(run.file(layout.AUDIT))
    if cfg.report:
        print(f"report: {run.file('report.html')}")
    return 0


def _epsilon(args: argparse.Namespace) -> int:
    import json

    from alignfl_audit.accounting import HEADLINE_REASON, client_epsilons, ledger_epsilons
    from federation.errors import ConfigError

    if args.ledger:
        from alignfl_audit.rundir import RunDir

        path = RunDir(args.ledger).file(layout.LEDGER)
        try:
            result = ledger_epsilons(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"cannot read a privacy ledger at {path}: {err}") from None
    else:
        missing = [f for f, v in (("--sampling-rate", args.sampling_rate), ("--noise-multiplier", args.noise_multiplier),
                                  ("--steps", args.steps), ("--delta", args.delta)) if v is None]
        if missing:
            raise ConfigError(f"epsilon needs --ledger RUN_DIR, or all of {', '.join(missing)}")
        result = {**client_epsilons([(args.noise_multiplier, args.sampling_rate, args.steps)], args.delta),
                  "relation_reason": HEADLINE_REASON}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if "relations" in result:
        _print_accounting(result, args.delta)
        print(f"  why {result['relation_reason']}")
        return 0
    print(f"mechanism: {result['mechanism']}; formal guarantee: {'yes' if result['formal_guarantee'] else 'NO'}")
    if not result["formal_guarantee"]:
        print(f"no epsilon: {result.get('epsilon_withheld') or result['note']}")
        return 0
    for cid, res in result["clients"].items():
        print(f"client {cid}:")
        _print_accounting(res, result["delta"])
    print(f"why {result['relation_reason']}")
    return 0


def _print_accounting(res: dict, delta: float) -> None:
    """One client's epsilon under each relation (each accountant, the tightest, flags and notes), then the
    headline."""
    for relation, rel in res["relations"].items():
        print(f"  {relation}{' (the headline relation)' if relation == res['headline']['relation'] else ''}:")
        for name, r in rel["accountants"].items():
            value = (f"{r['epsilon']:.4f}" if r["epsilon"] is not None else r["error"]
                     if r["error"].startswith("not computed") else f"failed ({r['error']})")
            print(f"    {name:<30} epsilon = {value}")
        print(f"    tightest: epsilon = {rel['headline']['epsilon']:.4f} ({rel['headline']['accountant']})")
        for flag in rel["flags"]:
            print(f"    WARNING: {flag}")
        for note in rel["notes"]:
            print(f"    note: {note}")
    h = res["headline"]
    print(f"  headline: epsilon = {h['epsilon']:.4f} at delta = {delta:g} ({h['relation']}, {h['accountant']}, "
          f"the tightest valid)")


def _inspect_upload(args: argparse.Namespace) -> int:
    import json

    from federation.messages import KIND_DESCRIPTIONS, Uplink, load_message, parameter_count

    msg = load_message(args.path)  # validates; a rejected message exits nonzero with the reason
    p = msg.payload
    encoder = [k for k in p.tensors if k.startswith("encoder")]
    info = {"path": str(args.path), "direction": msg.direction, "round": msg.round, "kind": p.kind,
            "kind_description": KIND_DESCRIPTIONS.get(p.kind), "spec": p.spec,
            "parameters": parameter_count(p.tensors),
            "tensors": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                        for k, v in p.tensors.items()],
            "extra_artifacts": {name: {k: list(v.shape) for k, v in t.items()} for name, t in p.extras.items()},
            "encoder_present": bool(encoder)}
    if isinstance(msg, Uplink):
        info.update(client=msg.client, num_samples=msg.num_samples, report=msg.report.to_json())
    else:
        info.update(recipients=list(msg.recipients))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if isinstance(msg, Uplink):
        print(f"{args.path}: valid {p.kind} uplink from client {msg.client}, round {msg.round}")
        loss = msg.report.loss
        print(f"  declares {msg.num_samples} training records; report: {msg.report.status}, loss "
              f"{'withheld' if loss is None else f'{loss:.4g}'}, {len(msg.report.dp_events)} DP event(s)")
    else:
        print(f"{args.path}: valid {p.kind} downlink from the server to client(s) "
              f"{', '.join(map(str, msg.recipients))}, round {msg.round}")
    if info["kind_description"]:
        print(f"  what it is: {info['kind_description']}")
    if p.spec is not None:
        print(f"  architecture: {json.dumps(p.spec)}")
    print(f"  {info['parameters']} parameters in {len(p.tensors)} tensors")
    for t in info["tensors"]:
        print(f"    {t['name']:<40} {str(tuple(t['shape'])):<16} {t['dtype']}")
    for name, shapes in info["extra_artifacts"].items():
        print(f"  EXTRA shared artifact {name!r}: {shapes} (no formal privacy guarantee covers it)")
    if encoder:
        print(f"  encoder present: YES ({len(encoder)} encoder tensors: this message carries the whole VAE)")
    else:
        print("  encoder present: no (no encoder tensor in this message)")
    return 0


def _audit(args: argparse.Namespace) -> int:
    overrides = _parse_sets(args.set)
    from alignfl_audit.audit import run_audit  # the attack stack loads only when asked for

    path = run_audit(args.run_dir, data_root=args.data_root, overrides=overrides, seed=args.seed, quiet=args.quiet,
                     reference_cache=args.reference_cache)
    _print_audit(path)
    return 0


def _print_audit(path) -> None:
    import json

    from alignfl_audit.audit_summary import read_summary

    s = read_summary(json.loads(path.read_text()))
    best, game, o, acc, c = s["best_attack"], s["chance_band"], s["outliers"], s["accountant"], s["canary"]
    outl = ""
    if o:
        if o["control_rate"] is not None:
            outl = f", outliers reconstructed {o['reconstruction_rate']:.3f} vs controls {o['control_rate']:.3f}"
        outl += (f", outlier memorisation: {o['memorisation']}, outliers mapped to typical points: "
                 f"{o['typical_mapping']}")
    formal = "no formal guarantee"
    if acc["formal_guarantee"] and acc["epsilon"] is not None:
        formal = (f"accountant epsilon={acc['epsilon']:.3f} ({acc['relation']}; add/remove "
                  f"{acc['epsilon_add_remove']:.3f})")
    canary = f"{s['canary_note']}, "
    if c:
        canary = (f"canary lower bound epsilon>={c['epsilon_lb']:.3f} (the most this audit could have shown: "
                  f"{c['epsilon_ceiling']:.3f}; {c['m']} canaries, {c['r']} guesses), ")
    warning = ("; WARNING: the canary bound exceeds the accountant's add/remove epsilon: the DP implementation or "
               "its accounting is wrong" if s["canary_above_accountant"] else "")
    print(f"{path}: best AUC {best['auc']:.3f} ({best['name']}; chance band 0.5 +- {game['auc_half_width']:.3f} at "
          f"{game['n_members']} members and {game['n_nonmembers']} non-members), {canary}membership-game epsilon "
          f"estimate {s['estimate']['epsilon']:.3f} (the most this audit could have shown: "
          f"{s['estimate']['ceiling']:.3f}; not a proof; {formal}){outl}{warning}")


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from reports.render import render_report

    out = args.output or (Path(args.run_dirs[0]) / layout.REPORT if len(args.run_dirs) == 1 else Path(layout.REPORT))
    path = render_report(args.run_dirs, out, title=args.title)
    print(f"{path} (with {path.with_suffix('.metrics.csv').name} and {path.with_suffix('.metrics.json').name})")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from alignfl_audit.sweep import run_sweep

    result = run_sweep(args.sweep, data_root=args.data_root, quiet=args.quiet, overrides=_parse_sets(args.set),
                       out=args.out)
    if result.report:
        print(f"report: {result.report}")
    if result.failed:
        print(f"{len(result.failed)} run(s) failed: {', '.join(result.failed)} (see sweep-status.yaml)",
              file=sys.stderr)
        return 1
    return 0


def _empirical_epsilon(args: argparse.Namespace) -> int:
    from attacks.empirical_epsilon import clopper_pearson_epsilon, load_scores

    res = clopper_pearson_epsilon(load_scores(args.member_scores, "member scores"),
                                  load_scores(args.nonmember_scores, "non-member scores"),
                                  args.delta, alpha=args.alpha, selection=args.selection, seed=args.seed)
    return _result(args, res, [
        f"empirical epsilon >= {res['epsilon_lb']:.4f} at delta = {res['delta']:g}, "
        f"{1 - res['alpha']:.0%} confidence (Clopper-Pearson, {res['selection']} threshold selection); "
        f"the most these counts could have shown: {res['epsilon_ceiling']:.4f}",
        f"  threshold {res['threshold']:.6g}: FPR {res['fpr']:.4f} (upper {res['fpr_ub']:.4f}), "
        f"FNR {res['fnr']:.4f} (upper {res['fnr_ub']:.4f}) on the held-out half: "
        f"{res['n_members_eval']} members, {res['n_nonmembers_eval']} non-members"])


def _canary_bound(args: argparse.Namespace) -> int:
    from attacks.empirical_epsilon import one_run_bound
    from federation.errors import ConfigError

    if not 0 < args.alpha < 1:
        raise ConfigError(f"--alpha must be in (0, 1), got {args.alpha:g}")
    res = one_run_bound(args.canaries, args.guesses, args.correct, args.delta, beta=args.alpha)
    return _result(args, res, [
        f"one-run epsilon >= {res['epsilon_lb']:.4f} at delta = {res['delta']:g}, {1 - res['beta']:.0%} confidence "
        f"(Steinke, Nasr, Jagielski 2023): {res['v']} of {res['r']} guesses right on {res['m']} canaries; the most "
        f"these counts could have shown (all {res['r']} right): {res['epsilon_ceiling']:.4f}"])


def _result(args: argparse.Namespace, res: dict, lines: list[str]) -> int:
    """A bound command's output: the result as JSON with --json, else its lines."""
    import json

    print(json.dumps(res, indent=2) if args.json else "\n".join(lines))
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
               "  alignfl-audit report RUN_DIR [RUN_DIR...] -o report.html\n"
               "  alignfl-audit sweep configs/sweep-dp-vs-lcd.yaml\n"
               "  alignfl-audit audit RUN_DIR                                attack a finished run's shared decoders\n"
               "  alignfl-audit empirical-epsilon --member-scores IN.npy --nonmember-scores OUT.npy --delta 1e-5\n"
               "  alignfl-audit canary-bound --canaries 200 --guesses 80 --correct 80 --delta 1e-5\n"
               "  alignfl-audit self-audit --epsilon 2                       audit the DP-SGD code itself\n"
               "'alignfl-audit COMMAND --help' describes each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="train a federation from a YAML config and write a run directory",
        description="Train the federation described by CONFIG and write a run directory: the resolved "
                    "config, partition.json, every shared upload (shared/round-R/client-K.*), metrics.json, "
                    "rounds.csv and figures/. Data is searched in this order: --data-root (or data.root), "
                    "$ALIGNFL_DATA_DIR, torchvision's download (only with data.download: true), then the "
                    "embedded subset.")
    run.add_argument("config", nargs="?", help="YAML experiment config, e.g. configs/quickstart.yaml")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its last checkpoint (same result as an uninterrupted run)")
    run.add_argument("--data-root", metavar="DIR",
                     help="folder holding MNIST/raw and FashionMNIST/raw (IDX files, .gz or raw)")
    run.add_argument("--out", metavar="DIR", help="run directory to create (default: runs/NAME-seedN[-K])")
    run.add_argument("--seed", type=int, help="override the config's seed")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config value, e.g. --set training.rounds=5 (repeatable)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--no-audit", action="store_true", help="do not audit the run even if the config says audit: true")
    run.add_argument("--no-report", action="store_true", help="do not write report.html even if the config asks")
    run.set_defaults(func=_run)

    eps = sub.add_parser(
        "epsilon", help="epsilon from every accountant, for given DP-SGD parameters or a run's ledger",
        description="Compute epsilon under both neighbouring relations, either for one Poisson-subsampled "
                    "Gaussian mechanism (--sampling-rate, --noise-multiplier, --steps, --delta) or per client from "
                    "a run's privacy_ledger.json (--ledger RUN_DIR). Replace-one, the headline (each upload "
                    "releases the client's record count): dp-accounting PLD, and dp-accounting RDP through group "
                    "privacy. Add/remove (the record count treated as public): Opacus RDP, Opacus PRV, "
                    "dp-accounting RDP and dp-accounting PLD.")
    eps.add_argument("--ledger", metavar="RUN_DIR", help="a run directory holding privacy_ledger.json")
    eps.add_argument("--sampling-rate", type=float, metavar="Q")
    eps.add_argument("--noise-multiplier", type=float, metavar="SIGMA")
    eps.add_argument("--steps", type=int, metavar="T")
    eps.add_argument("--delta", type=float, metavar="D")
    eps.add_argument("--json", action="store_true", help="print JSON")
    eps.set_defaults(func=_epsilon)

    insp = sub.add_parser(
        "inspect-upload", help="show exactly what crossed the boundary (an uplink or a downlink), after validating it",
        description="Validate one message of shared/round-R/ (client-K.safetensors: what client K sent; "
                    "server-to-client-K / server-to-clients.safetensors: what the server sent down), with its "
                    ".json sidecar, as the federation does, then show the architecture, parameter count, every "
                    "tensor, any extra artifact, the client's report, and whether an encoder is present. Exits "
                    "nonzero on an invalid message.")
    insp.add_argument("path", help="a .safetensors message file (its .json sidecar beside it)")
    insp.add_argument("--json", action="store_true", help="print JSON")
    insp.set_defaults(func=_inspect_upload)

    aud = sub.add_parser(
        "audit", help="attack a finished run's shared decoders and write audit.json",
        description="Play the adversary of docs/threat-model.md against a finished run, from its shared decoders "
                    "(shared/round-R/), its partition record and the public datasets only, without retraining "
                    "the system: membership inference (white-box latent fit, Monte-Carlo, nearest generated "
                    "sample, reference-calibrated variants), outlier reconstruction against controls, the "
                    "Lipschitz bracket of every shared decoder, and empirical epsilon lower bounds. Writes "
                    "RUN_DIR/audit.json and RUN_DIR/audit/ (raw scores, figures). Settings come from the run's "
                    "audit section; override them with --set audit.KEY=VALUE.")
    aud.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by 'alignfl-audit run'")
    aud.add_argument("--data-root", metavar="DIR", help="where the public datasets are (default: where the run "
                                                        "found them); files must match the run's sha256")
    aud.add_argument("--seed", type=int, help="audit seed (default: the run's seed)")
    aud.add_argument("--set", action="append", metavar="audit.KEY=VALUE", help="override an audit setting")
    aud.add_argument("--quiet", action="store_true", help="no progress bars")
    aud.add_argument("--reference-cache", metavar="DIR",
                     help="read reference decoders trained before from the same material from DIR, and keep new "
                          "ones there (audit.json records each one's source and cache key; default: train all)")
    aud.set_defaults(func=_audit)

    rep = sub.add_parser(
        "report", help="one self-contained HTML privacy-utility report for one or more runs",
        description="Render RUN_DIR... (metrics.json, and audit.json, privacy_ledger.json and figures when "
                    "present) into one self-contained HTML file: inline CSS, embedded figures, no scripts, nothing "
                    "fetched. Tidy CSV and JSON exports of every number are written beside it.")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("-o", "--output", metavar="FILE",
                     help="output HTML (default: RUN_DIR/report.html for one run, ./report.html for several)")
    rep.add_argument("--title", help="report title")
    rep.set_defaults(func=_report)

    swp = sub.add_parser(
        "sweep", help="train and audit a grid of runs, then write one comparison report",
        description="Run every entry of a sweep file (a base config plus per-run overrides, see "
                    "configs/sweep-dp-vs-lcd.yaml) for every seed, audit each run, and write one comparison "
                    "report into the sweep's output folder. Finished runs are skipped on a rerun; a failed run is "
                    "recorded in sweep-status.yaml and the others carry on.")
    swp.add_argument("sweep", metavar="SWEEP.yaml")
    swp.add_argument("--data-root", metavar="DIR")
    swp.add_argument("--quiet", action="store_true", help="no progress bars")
    swp.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config key in every run, after the sweep file's own (repeatable)")
    swp.add_argument("--out", metavar="DIR", help="output folder instead of the sweep file's 'out'")
    swp.set_defaults(func=_sweep)

    emp = sub.add_parser(
        "empirical-epsilon", help="a lower bound on epsilon from membership-attack scores (Clopper-Pearson)",
        description="Turn the scores of a membership attack (higher = member) into a lower bound on epsilon "
                    "that holds with confidence 1 - alpha (Jagielski et al. 2020): half of each score set picks "
                    "the threshold, the other half bounds its FPR (over non-members) and FNR (over members) with "
                    "Clopper-Pearson. Each score is taken as an independent trial of the mechanism.")
    emp.add_argument("--member-scores", required=True, metavar="A.npy", help="1-D .npy array, scores of members")
    emp.add_argument("--nonmember-scores", required=True, metavar="B.npy",
                     help="1-D .npy array, scores of non-members")
    emp.add_argument("--delta", type=float, required=True, metavar="D")
    emp.add_argument("--alpha", type=float, default=0.05, help="1 - confidence (default 0.05)")
    emp.add_argument("--selection", choices=("split", "bonferroni"), default="split",
                     help="threshold selection: split (default), or bonferroni over a grid of 20 candidates")
    emp.add_argument("--seed", type=int, default=0, help="seed of the selection/evaluation split (default 0)")
    emp.add_argument("--json", action="store_true", help="print JSON")
    emp.set_defaults(func=_empirical_epsilon)

    cb = sub.add_parser(
        "canary-bound", help="the one-run canary lower bound on epsilon from its counts, to check a report by hand",
        description="The one-run lower bound on epsilon (Steinke, Nasr, Jagielski 2023) that the audit reports for "
                    "its canaries, from the counts alone: M canaries, each included with probability 1/2, R guesses "
                    "(in for the highest scores, out for the lowest), V of them right. Prints the bound at confidence "
                    "1 - A and the most these counts could have shown (all R guesses right).")
    cb.add_argument("--canaries", type=int, required=True, metavar="M", help="number of canaries m (>= 2)")
    cb.add_argument("--guesses", type=int, required=True, metavar="R", help="guesses made, r (1 <= r <= m)")
    cb.add_argument("--correct", type=int, required=True, metavar="V", help="correct guesses, v (0 <= v <= r)")
    cb.add_argument("--delta", type=float, required=True, metavar="D")
    cb.add_argument("--alpha", type=float, default=0.05, metavar="A", help="1 - confidence (default 0.05)")
    cb.add_argument("--json", action="store_true", help="print JSON")
    cb.set_defaults(func=_canary_bound)
    add_self_audit(sub)
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
