"""From a validated config to a finished run directory: data, partition, training, metrics."""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from alignfl_audit import progress
from alignfl_audit.accounting import ledger_epsilons
from alignfl_audit.checkpoint import load_checkpoint, restore, save_checkpoint
from alignfl_audit.config import ExperimentConfig, dump_config
from alignfl_audit.provenance import code_identity, provenance
from alignfl_audit.rundir import RunDir
from federation import run_layout as layout
from federation.client import ClientSetup
from federation.data.partition import NUM_CLASSES, Partition, make_partition
from federation.data.sources import Split, load_split, resolve_source
from federation.engines.base import Engine
from federation.engines.inprocess import InProcessEngine, InProcessSettings
from federation.errors import ConfigError, DataError
from federation.metrics.domain_cnn import domain_cnn
from federation.metrics.tstr import class_owner
from federation.metrics.utility import evaluate, probe
from federation.privacy.budget import calibrate_noise, check_adaptive
from federation.privacy.dp_sgd import DPPlan, make_plan
from federation.privacy.ledger import PrivacyLedger
from federation.privacy.spec import NO_GUARANTEE
from federation.rounds import DELIVERED, STATUSES, RoundRecord, accept_arrivals, run_round, unreported_dp_rounds
from federation.strategies.base import ServerContext, Strategy, departures
from federation.training import TrainSettings, to_tensor


@dataclass
class LoadedData:
    train: Split
    test: Split
    outlier_train: Split | None
    provenance: dict


def load_data(cfg: ExperimentConfig, data_root: str | Path | None = None) -> LoadedData:
    root = data_root if data_root is not None else cfg.data.root
    args = dict(data_root=root, download=cfg.data.download, allow_embedded=cfg.data.allow_embedded)
    source = resolve_source(cfg.data.dataset, **args)
    train, test = load_split(source, cfg.data.dataset, "train"), load_split(source, cfg.data.dataset, "test")
    provenance = {cfg.data.dataset: {"source": source.kind, "root": str(source.root),
                                     "files": {**train.files, **test.files},
                                     "checksums": {**train.checksums, **test.checksums}}}
    outlier_train = None
    o = cfg.partition.outliers
    if o.count + o.holdout + cfg.partition.canaries.count > 0:
        osource = resolve_source(cfg.outlier_dataset, **args)
        if osource.kind != source.kind:
            raise DataError(f"{cfg.data.dataset} comes from the {source.kind} source but {cfg.outlier_dataset} "
                            f"from the {osource.kind} source; put both under one data root")
        outlier_train = load_split(osource, cfg.outlier_dataset, "train")
        provenance[cfg.outlier_dataset] = {"source": osource.kind, "root": str(osource.root),
                                           "files": outlier_train.files, "checksums": outlier_train.checksums}
    return LoadedData(train, test, outlier_train, provenance)


def client_tensors(data: LoadedData, partition: Partition) -> list[torch.Tensor]:
    out = []
    for shard in partition.shards:
        images = data.train.images[shard.train_ids]
        extra = np.concatenate([shard.outlier_ids, shard.canary_ids])
        if len(extra):
            images = np.concatenate([images, data.outlier_train.images[extra]])
        out.append(to_tensor(images))
    return out


def label_sets(cfg: ExperimentConfig) -> dict[int, list[int]]:
    """Each client's label set as the partition config gives it (public): its classes under a class-disjoint
    partition; every class under a Dirichlet one, which may give any client any class."""
    p = cfg.partition
    if p.scheme == "class_disjoint":
        return {k: sorted(c) for k, c in enumerate(p.client_classes)}
    return {k: list(range(NUM_CLASSES)) for k in range(p.n_clients)}


def client_labels(data: LoadedData, partition: Partition, sets: dict[int, list[int]]) -> list[torch.Tensor]:
    """Each client's record labels, in ``client_tensors``' order. A cross-domain record (an outlier or a
    canary) carries one of the client's own labels, chosen by its record id (id mod the label set's size),
    as a mislabelled record would: the rule is public, and no record's label depends on another's."""
    out = []
    for shard in partition.shards:
        own = sets[shard.client]
        extra = np.concatenate([shard.outlier_ids, shard.canary_ids]).astype(np.int64)
        labels = np.concatenate([data.train.labels[shard.train_ids], np.asarray(own)[extra % len(own)]])
        out.append(torch.as_tensor(labels, dtype=torch.long))
    return out


def client_setups(cfg: ExperimentConfig, data: LoadedData, partition: Partition,
                  only: int | None = None) -> list[ClientSetup]:
    """Every client's setup (or the pooled reference's, for a strategy without federation), with its
    DP plan. ``only``: build just that client's (a Flower node builds its own). Impossible privacy plans
    are refused here, before training."""
    cls = cfg.strategy_class
    units = cls.training_units(cfg.strategy, cfg.training, cfg.client_specs(), client_tensors(data, partition))
    sets = label_sets(cfg)
    labels = client_labels(data, partition, sets) if cls.federated() else [None] * len(units)
    setups = []
    for k, (spec, x, settings) in enumerate(units):
        if only is not None and k != only:
            continue
        plan = None
        if cfg.privacy.is_dp:
            plan = dp_plan(cfg, k, len(x), settings)
        setups.append(ClientSetup(k, x, spec, settings, cfg.seed, cfg.privacy, plan, labels=labels[k],
                                  label_set=sets.get(k) if cls.federated() else None))
    return setups


def dp_plan(cfg: ExperimentConfig, client: int, n: int, settings: TrainSettings) -> DPPlan:
    cfg.privacy.check_client(client, n)
    plan = make_plan(cfg.privacy, n, settings.batch_size, 0.0)
    total = settings.rounds * settings.local_epochs * plan.steps_per_epoch
    plan.noise_multiplier = calibrate_noise(cfg.privacy, plan.sample_rate, total)
    if plan.unclipped_num_std is not None:
        check_adaptive(cfg.privacy, plan.noise_multiplier, plan.unclipped_num_std)
    return plan


def new_ledger(cfg: ExperimentConfig, setups: list[ClientSetup], shared_artifacts: list[str]) -> PrivacyLedger:
    p = cfg.privacy
    formal, note = p.formal_guarantee(), p.guarantee_note()
    if formal and "latent_gmm" in shared_artifacts:
        formal, note = False, (f"{NO_GUARANTEE}: DP-SGD covers the decoders, but each client also shares a "
                               "latent GMM fitted on its private latents, which no mechanism covers")
    return PrivacyLedger(
        mechanism=p.mechanism, formal_guarantee=formal, note=note,
        delta=p.delta if formal else None, target_epsilon=p.target_epsilon if formal else None,
        clients={str(s.client): {"n": s.num_samples, **({"sample_rate": s.dp_plan.sample_rate,
                                                        "noise_multiplier": s.dp_plan.noise_multiplier,
                                                        "planned_steps": s.settings.rounds * s.settings.local_epochs
                                                        * s.dp_plan.steps_per_epoch} if s.dp_plan else {})}
                 for s in setups})


def build_strategy(cfg: ExperimentConfig, setups: list[ClientSetup] | None = None) -> Strategy:
    cls = cfg.strategy_class
    specs = cfg.client_specs()
    pooled = None if cls.federated() else (setups[0] if setups else None)
    ctx = ServerContext(cfg.seed, cfg.training, list(range(len(specs))) if cls.federated() else [],
                        dict(enumerate(specs)), cfg.server_spec(), pooled, label_sets(cfg))
    return cls(cfg.strategy, cfg.server, ctx)


def inprocess_engine(cfg: ExperimentConfig, setups: list[ClientSetup]) -> Engine:
    cls = cfg.strategy_class
    if not cls.federated():
        return InProcessEngine(InProcessSettings(), {}, None, cfg.seed)
    return InProcessEngine(cfg.engine, {s.client: s for s in setups}, cls.client_handler(cfg.strategy, cfg.server),
                           cfg.seed)


def _digest(files: dict) -> str:
    return hashlib.sha256("|".join(f"{k}:{v}" for k, v in sorted(files.items())).encode()).hexdigest()


def prepare(cfg: ExperimentConfig, data_root=None) -> tuple[LoadedData, Partition, list[ClientSetup]]:
    """Data, partition and client setups: everything that can fail on bad input, before a run directory."""
    data = load_data(cfg, data_root)
    partition = make_partition(cfg.partition, data.train.labels,
                               data.outlier_train.labels if data.outlier_train is not None else np.zeros(0),
                               cfg.data.dataset, cfg.outlier_dataset, cfg.seed)
    return data, partition, client_setups(cfg, data, partition)


def run_experiment(cfg: ExperimentConfig, data_root: str | Path | None = None, out: str | Path | None = None,
                   quiet: bool = False) -> RunDir:
    """Everything that can fail on bad input fails before the run directory is made."""
    if cfg.engine.name == "flower":
        from alignfl_audit.flower_launch import run_on_flower

        return run_on_flower(cfg, data_root, out, quiet)
    started = time.perf_counter()
    data, partition, setups = prepare(cfg, data_root)
    run = RunDir.create(out, cfg.name, cfg.seed)
    try:
        write_run_header(run, cfg, partition)
        train_and_evaluate(cfg, data, partition, setups, run, inprocess_engine(cfg, setups), quiet, started)
    except BaseException as err:
        run.set_status("failed", error=f"{type(err).__name__}: {err}")
        raise
    return run


def write_run_header(run: RunDir, cfg: ExperimentConfig, partition: Partition) -> None:
    run.file(layout.CONFIG).write_text(dump_config(cfg))
    run.write_json(layout.PARTITION, {"format": layout.PARTITION_FORMAT, **partition.to_json()})


def read_run_config(run: RunDir) -> ExperimentConfig:
    """A run's resolved config, read by its recorded format (an earlier version's config is migrated)."""
    from alignfl_audit.config import from_dict, migrate_config

    data = run.resolved_config_data()
    path = run.file(layout.CONFIG)
    try:
        return from_dict(migrate_config(data))
    except ConfigError as err:
        raise ConfigError(f"{path} cannot be read by this version: {err}") from None


def resume_experiment(run_dir: str | Path, data_root: str | Path | None = None, quiet: bool = False):
    """Continue a crashed or interrupted run from its last checkpoint, in its own directory, with its own
    resolved config. The result equals an uninterrupted run with the same seed."""
    run = RunDir(run_dir)
    cfg = read_run_config(run)
    if run.is_complete():
        raise ConfigError(f"{run.path} is already complete; nothing to resume")
    if cfg.engine.name != "inprocess":
        raise ConfigError(f"{run.path} ran on the {cfg.engine.name} engine, whose client state lives on the "
                          "clients' nodes; only in-process runs can be resumed")
    started = time.perf_counter()
    data, partition, setups = prepare(cfg, data_root)
    recorded = run.read_json(layout.PARTITION) if run.file(layout.PARTITION).is_file() else None
    if recorded is not None and {k: v for k, v in recorded.items() if k != "format"} != partition.to_json():
        raise DataError(f"the data found now do not give the partition recorded in {run.path}/{layout.PARTITION}; "
                        "pass the run's data with --data-root")
    run.write_json(layout.PARTITION, {"format": layout.PARTITION_FORMAT, **partition.to_json()})
    run.set_status("running", resumed=True)
    try:
        train_and_evaluate(cfg, data, partition, setups, run, inprocess_engine(cfg, setups), quiet, started,
                           resume=True)
    except BaseException as err:
        run.set_status("failed", error=f"{type(err).__name__}: {err}")
        raise
    return cfg, run


def train_and_evaluate(cfg: ExperimentConfig, data: LoadedData, partition: Partition, setups: list[ClientSetup],
                       run: RunDir, engine: Engine, quiet: bool, started: float, resume: bool = False) -> None:
    """The federation, round by round, on any engine; then the utility metrics and metrics.json."""
    strategy = build_strategy(cfg, setups)
    ledger = new_ledger(cfg, setups, strategy.shared_artifacts)
    client_ids = strategy.ctx.client_ids
    departures_ = departures(cfg.server)
    test_x, test_y = to_tensor(data.test.images), data.test.labels
    records: list[RoundRecord] = []
    phases: dict[str, float] = {}  # seconds of this process's rounds: clients, server, probes
    first = 0
    state = load_checkpoint(run, cfg.digest()) if resume else None
    if state is not None:
        first, records = restore(state, strategy, engine, ledger, run.file(layout.SHARED))
        run.log(f"resumed after round {first - 1} from {layout.CHECKPOINTS}/{layout.CHECKPOINT}")
    code = code_identity()  # recorded in every checkpoint: a sweep resumes only under the same code
    engine.start()
    for k, facts in engine.client_facts().items():  # e.g. where each client's DP noise comes from
        if str(k) in ledger.clients:
            ledger.clients[str(k)].update(facts)
    try:
        with tqdm(total=strategy.rounds, initial=first, disable=quiet, desc=cfg.name, unit="round",
                  leave=False) as bar:
            for rnd in range(first, strategy.rounds):
                bar.set_postfix_str(f"round {rnd}")
                record, accepted = run_round(rnd, strategy, engine, run.shared_round(rnd), departures_, client_ids,
                                             phases)
                ledger.merge(accepted.dp_events, accepted.unaccounted)
                if cfg.metrics.probe_every_round:
                    t0 = time.perf_counter()
                    record.probe = probe(strategy.global_vae, test_x, test_y, cfg.seed, cfg.metrics.probe_max_iter)
                    phases["probes"] = phases.get("probes", 0.0) + time.perf_counter() - t0
                records.append(record)
                run.log(f"round {rnd}: " + _summary(record))
                _write_round_files(run, records, ledger)
                save_checkpoint(run, rnd, cfg.digest(), strategy, engine, ledger, records, code)
                bar.update(1)
                progress.advance()
        late = engine.drain(strategy.rounds - 1)
        if late:  # replies that arrived after the last round: what they carry was shared, and is recorded
            statuses = {}
            accepted = accept_arrivals(late, run.shared_round(strategy.rounds), strategy.uplink_kinds, statuses,
                                       strategy.rounds, strategy.check_uplink)
            ledger.merge(accepted.dp_events, accepted.unaccounted)
            records.append(RoundRecord(strategy.rounds, statuses))
            run.log(f"after the last round: {_summary(records[-1])} (not used by the server)")
        if cfg.privacy.is_dp:
            ledger.merge([], unreported_dp_rounds(records, ledger.events, client_ids))
        _write_round_files(run, records, ledger)
    finally:
        engine.close()
    train_seconds = time.perf_counter() - started
    cnn = domain_cnn(cfg.data.dataset, to_tensor(data.train.images), torch.as_tensor(data.train.labels),
                     _digest(data.train.files), cfg.seed, cfg.metrics.domain_cnn_epochs)
    utility, notes = evaluate(strategy, test_x, test_y, cnn,
                              class_owner([s.class_counts for s in partition.shards]), cfg.seed,
                              cfg.metrics.fid_samples, cfg.metrics.tstr_epochs, cfg.metrics.probe_max_iter,
                              run.file(layout.FIGURES) if cfg.metrics.figures else None)
    shared = strategy.shared_artifacts
    metrics = {
        "format": layout.METRICS_FORMAT, "run_format": layout.RUN_FORMAT,
        "name": cfg.name, "strategy": strategy.name, "seed": cfg.seed, "config_sha256": cfg.digest(),
        "engine": dataclasses.asdict(cfg.engine),
        "utility": utility, "notes": notes,
        "shared_artifacts": shared,
        "privacy": privacy_block(ledger, shared),
        "rejected_uploads": [{"round": r.round, "client": k, "reason": reason}
                             for r in records for k, reason in sorted(r.rejected.items())],
        "participation": participation_summary(cfg, records, client_ids),
        "data": data.provenance,
        "partition": {"clients": [{"client": s.client, "classes": s.classes,
                                   "class_counts": {str(k): v for k, v in s.class_counts.items()},
                                   "outliers": int(len(s.outlier_ids)), "holdout": int(len(s.holdout_ids)),
                                   "canaries_included": int(len(s.canary_ids))}
                                  for s in partition.shards],
                      "outlier_controls": int(len(partition.outlier_control_ids))},
        "timing_seconds": {"train": round(train_seconds, 2),
                           **{k: round(v, 2) for k, v in phases.items()},  # within train (a resumed run: its part)
                           "metrics": round(time.perf_counter() - started - train_seconds, 2),
                           "total": round(time.perf_counter() - started, 2)},
        # a run continued from a checkpoint: its timing_seconds cover only the rounds after this one
        "resumed_after_round": first - 1 if first else None,
        "torch_threads": torch.get_num_threads(),
        "provenance": provenance(),
    }
    run.write_json(layout.METRICS, metrics)
    run.set_status("complete")
    progress.advance()
    # resume state holds every encoder and client state: it has no use once the run is complete, and a run
    # directory handed to an auditor must not carry what the threat model keeps from the adversary
    shutil.rmtree(run.file(layout.CHECKPOINTS), ignore_errors=True)


def _write_round_files(run: RunDir, records: list[RoundRecord], ledger: PrivacyLedger) -> None:
    run.write_csv(layout.ROUNDS, [r.row() for r in records])
    run.write_json(layout.LEDGER, ledger.to_json())


def _summary(record: RoundRecord) -> str:
    parts = [f"client{k}={c.status}" + (f"(staleness {c.staleness})" if c.staleness else "")
             + (f" loss={c.loss:.4g}" if c.loss is not None else "") for k, c in sorted(record.clients.items())]
    if record.server_loss is not None:
        parts.append(f"server_loss={record.server_loss:.4g}")
    parts += [f"{k}={v:.4g}" for k, v in record.probe.items() if isinstance(v, float)]
    return " ".join(parts) or "no clients"


def participation_summary(cfg: ExperimentConfig, records: list[RoundRecord], client_ids: list[int]) -> dict:
    """Per client: rounds in which a message reached it, and how often each status occurred."""
    return {"probability": getattr(cfg.server, "participation", None),
            "departures": [vars(d) for d in departures(cfg.server)],
            "stale_policy": getattr(cfg.server, "stale_policy", None),
            "rounds_per_client": {str(k): sum(r.clients[k].status in DELIVERED for r in records if k in r.clients)
                                  for k in client_ids},
            "statuses": {str(k): {st: n for st in STATUSES
                                  if (n := sum(r.clients.get(k) is not None and r.clients[k].status == st
                                               for r in records))}
                         for k in client_ids}}


def run_pipeline(cfg: ExperimentConfig, data_root: str | Path | None = None, out: str | Path | None = None,
                 quiet: bool = False, reference_cache: str | Path | None = None) -> RunDir:
    """Train; then, as the config asks, audit the run (``audit: true``) and write report.html
    (``report: true``). A failing audit or report leaves the finished run as it is. ``reference_cache``:
    the audit's folder of reference decoders shared across runs (a sweep's)."""
    return after_run(cfg, run_experiment(cfg, data_root, out, quiet), data_root, quiet, reference_cache)


def after_run(cfg: ExperimentConfig, run: RunDir, data_root=None, quiet: bool = False,
              reference_cache: str | Path | None = None) -> RunDir:
    """The audit and report a config asks for, on a finished run."""
    if cfg.audit.enabled:
        from alignfl_audit.audit import run_audit

        run.log("audit started")
        run_audit(run.path, data_root=data_root, quiet=quiet, reference_cache=reference_cache)
        run.log(f"audit written: {layout.AUDIT}")
    if cfg.report:
        from reports.render import render_report

        render_report([run.path], run.file(layout.REPORT))
        run.log(f"report written: {layout.REPORT}")
    return run


def privacy_block(ledger: PrivacyLedger, shared: list[str]) -> dict:
    """metrics.json's privacy block: epsilon per client and accountant, only where it is formal."""
    block = ledger_epsilons(ledger.to_json())
    if "latent_gmm" in shared:
        block["extra_artifacts"] = {"latent_gmm": "a Gaussian mixture fitted on each client's private latents is "
                                                  "shared with no DP treatment: no formal guarantee covers it"}
    return block
