"""``alignfl-audit sweep SWEEP.yaml``: a grid of runs from one base config, each trained and audited,
then one comparison report.

    name: sweep-dp-vs-lcd
    base: quickstart.yaml            # relative to the sweep file
    out: runs/sweep-dp-vs-lcd        # relative to the working directory
    seeds: [0]
    set: {training.rounds: 4}        # applied to every run
    runs:
      - {label: no-dp}
      - {label: dp-eps1, set: {privacy.mechanism: dp-sgd, privacy.target_epsilon: 1}}
      - {label: fedavg, base: quickstart-fedavg.yaml}   # a run may name its own base config
    reference_cache: runs/refs       # optional; default OUT/reference-cache; false: train every reference

The audits share reference decoders through ``reference_cache`` (``attacks.reference_cache``): runs with
the same seed, classes, model and recipe train each reference once; every audit.json records, per client,
whether its reference was trained there or read from the cache, and under which key. One progress bar
covers the whole sweep, with an estimate of the time left (``alignfl_audit.progress``).

Resumable. A run directory made from the same config (its digest) keeps its work: complete and audited,
it is skipped; complete but not audited, it is only audited; stopped before its training finished
(interrupted or failed), it continues from its last round's checkpoint, as ``alignfl-audit run --resume``
does, when that checkpoint was written by the same code (package version and git commit) on the
in-process engine. Any other directory is moved aside (``<label>.replaced-N``) and the run redone; a
resume that fails leaves its directory, and the reason says how to redo it. A failing run is recorded
and the others carry on; the report covers every run that finished, and the command exits nonzero if
any failed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignfl_audit.checkpoint import checkpoint_header
from alignfl_audit.config import load_config
from alignfl_audit.provenance import code_identity
from alignfl_audit.progress import run_steps, sweep_progress
from alignfl_audit.rundir import RunDir, atomic_write
from federation import run_layout as layout
from federation.errors import ConfigError, FederationError

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class SweepPlan:
    name: str
    base: Path
    out: Path
    seeds: list[int]
    common: dict
    runs: list[tuple[str, dict, Path | None]]  # (label, overrides, its own base config or None)
    reference_cache: Path | None = None


@dataclass
class SweepResult:
    report: Path | None
    finished: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _mapping(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{what} must be a mapping of dotted keys to values")
    return value


def load_sweep(path: str | Path) -> SweepPlan:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read sweep file {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"malformed YAML in sweep file {path}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a sweep file must be a YAML mapping")
    allowed = {"name", "base", "out", "seeds", "set", "runs", "reference_cache"}
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")
    if not isinstance(data.get("base"), str):
        raise ConfigError(f"{path}: 'base' must name the base config file")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _LABEL.match(name):
        raise ConfigError(f"{path}: name {name!r} must be letters, digits, '.', '_' or '-'")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of distinct integers")
    if not isinstance(data.get("out", ""), str):
        raise ConfigError(f"{path}: 'out' must be a folder path")
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{path}: 'runs' must be a non-empty list of {{label, set}} entries")
    plan_runs, seen = [], set()
    for i, entry in enumerate(runs):
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str) or not _LABEL.match(entry["label"]):
            raise ConfigError(f"{path}: runs[{i}] needs a label of letters, digits, '.', '_' or '-'")
        if set(entry) - {"label", "set", "base"}:
            raise ConfigError(f"{path}: runs[{i}] has unknown keys {sorted(set(entry) - {'label', 'set', 'base'})}")
        if "base" in entry and not isinstance(entry["base"], str):
            raise ConfigError(f"{path}: runs[{i}].base must name a config file")
        if entry["label"] in seen:
            raise ConfigError(f"{path}: label {entry['label']!r} appears twice")
        seen.add(entry["label"])
        plan_runs.append((entry["label"], _mapping(entry.get("set"), f"runs[{i}].set"),
                          path.parent / entry["base"] if "base" in entry else None))
    out = Path(data.get("out", f"runs/{name}"))
    cache = data.get("reference_cache", str(out / "reference-cache"))
    if cache is not False and not isinstance(cache, str):
        raise ConfigError(f"{path}: reference_cache must be a folder path or false")
    return SweepPlan(name, (path.parent / data["base"]), out, seeds, _mapping(data.get("set"), "set"), plan_runs,
                     Path(cache) if cache is not False else None)


def _configs(plan: SweepPlan, extra: dict) -> list[tuple[str, object]]:
    """Every run's validated config, before anything runs: a bad entry fails the sweep up front. ``extra``:
    overrides for every run, after the sweep's own (``sweep --set``)."""
    out = []
    for label, overrides, base in plan.runs:
        for seed in plan.seeds:
            tag = f"{label}-seed{seed}"
            try:
                cfg = load_config(base or plan.base, {**plan.common, **overrides, **extra, "seed": seed,
                                                      "audit.enabled": True, "report": False})
            except ConfigError as err:
                raise ConfigError(f"sweep run {tag}: {err}") from None
            out.append((tag, cfg))
    return out


SKIP, AUDIT, RESUME, REDO = "skip", "audit", "resume", "redo"
_DONE = {REDO: "trained and audited", RESUME: "continued from its checkpoint, trained and audited",
         AUDIT: "training found complete, audited"}


def _next_step(path: Path, cfg) -> tuple[str, int]:
    """What a run's directory still needs, and how many of its rounds are already trained. Work is kept
    only when it was made from this very config (an edited sweep entry is redone): a complete run by the
    digest its metrics.json records, an interrupted one by the digest and code its checkpoint records."""
    run = RunDir(path)
    if not path.exists():
        return REDO, 0
    if run.is_complete():
        try:
            same = run.read_json(layout.METRICS).get("config_sha256") == cfg.digest()
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            return REDO, 0
        return (SKIP if (path / layout.AUDIT).is_file() else AUDIT), cfg.training.rounds
    header = checkpoint_header(run) if cfg.engine.name == "inprocess" else None
    if header is not None and header["config_sha256"] == cfg.digest() and header["code"] == code_identity():
        return RESUME, header["round"] + 1
    return REDO, 0


def _move_aside(path: Path) -> None:
    n = 1
    while path.with_name(f"{path.name}.replaced-{n}").exists():
        n += 1
    path.rename(path.with_name(f"{path.name}.replaced-{n}"))


def run_sweep(path: str | Path, data_root=None, quiet: bool = False, echo=print, overrides: dict | None = None,
              out: str | Path | None = None) -> SweepResult:
    """``overrides``: dotted keys set in every run (after the sweep file's); ``out``: instead of the sweep
    file's output folder (the default reference cache moves with it)."""
    from alignfl_audit.orchestrate import after_run, resume_experiment, run_pipeline
    from reports.render import render_report

    plan = load_sweep(path)
    if out is not None:
        if plan.reference_cache == plan.out / "reference-cache":
            plan.reference_cache = Path(out) / "reference-cache"
        plan.out = Path(out)
    configs = _configs(plan, overrides or {})
    plan.out.mkdir(parents=True, exist_ok=True)
    result = SweepResult(None)
    with sweep_progress(sum(run_steps(cfg) for _, cfg in configs), quiet) as bar:
        for tag, cfg in configs:
            run_path = plan.out / tag
            planned = run_steps(cfg)
            bar.start_run(tag)
            step = REDO
            try:
                step, trained = _next_step(run_path, cfg)
                if step == SKIP:
                    result.skipped.append(tag)
                    result.finished.append(run_path)
                    bar.drop(planned)
                    planned = 0
                    bar.say(echo, f"{tag}: finished before, skipped")
                    continue
                if step == REDO and run_path.exists():
                    _move_aside(run_path)
                if trained:  # its rounds done before: the bar expects only what is left
                    bar.drop(trained + (step == AUDIT))  # (+ the metrics step of a complete run)
                    planned -= trained + (step == AUDIT)
                if step == REDO:
                    run_pipeline(cfg, data_root=data_root, out=run_path, quiet=quiet,
                                 reference_cache=plan.reference_cache)
                else:
                    run = resume_experiment(run_path, data_root, quiet)[1] if step == RESUME else RunDir(run_path)
                    after_run(cfg, run, data_root, quiet, plan.reference_cache)
                result.finished.append(run_path)
                bar.say(echo, f"{tag}: {_DONE[step]}")
            except Exception as err:  # noqa: BLE001 - one failed run must not lose the others; it is recorded
                reason = str(err) if isinstance(err, FederationError) else f"{type(err).__name__}: {err}"
                if step != REDO:
                    reason += f" (the sweep keeps {run_path} as it is: move it aside to train this run anew)"
                result.failed[tag] = reason
                bar.say(echo, f"{tag}: FAILED: {reason}")
            finally:
                bar.end_run(planned)
    status = {"sweep": plan.name, "finished": [p.name for p in result.finished], "failed": result.failed,
              "skipped": result.skipped}
    atomic_write(plan.out / "sweep-status.yaml", yaml.safe_dump(status, sort_keys=False))
    if result.finished:
        result.report = render_report(result.finished, plan.out / layout.REPORT, title=f"Sweep {plan.name}")
    return result
