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

from alignfl_audit.accounting import ledger_epsilons
from alignfl_audit.checkpoint import load_checkpoint, restore, save_checkpoint
from alignfl_audit.config import ExperimentConfig, dump_config
from alignfl_audit.provenance import provenance
from alignfl_audit.rundir import RunDir
from federation.client import Client
from federation.data.partition import Partition, make_partition
from federation.data.sources import Split, load_split, resolve_source
from federation.errors import DataError
from federation.metrics.domain_cnn import domain_cnn
from federation.metrics.tstr import class_owner
from federation.metrics.utility import evaluate, probe
from federation.privacy.budget import calibrate_noise, check_adaptive
from federation.privacy.dp_sgd import DPPlan, make_plan
from federation.privacy.ledger import PrivacyLedger
from federation.privacy.spec import NO_GUARANTEE
from federation.strategies import STRATEGY_CLASSES
from federation.training import to_tensor


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


@dataclass
class TrainingUnit:
    """What one client (or the centralized reference's pooled data) trains with."""

    spec: dict
    data: torch.Tensor
    settings: object
    dp_plan: DPPlan | None = None


def training_units(cfg: ExperimentConfig, data: LoadedData, partition: Partition) -> list[TrainingUnit]:
    tensors = client_tensors(data, partition)
    specs = cfg.client_specs()
    if cfg.strategy.name == "centralized":
        settings = dataclasses.replace(cfg.training, rounds=1, local_epochs=cfg.strategy.epochs)
        units = [TrainingUnit(specs[0], torch.cat(tensors), settings)]
    else:
        units = [TrainingUnit(spec, x, cfg.training) for spec, x in zip(specs, tensors)]
    if cfg.privacy.is_dp:
        for k, unit in enumerate(units):
            n = len(unit.data)
            cfg.privacy.check_client(k, n)
            plan = make_plan(cfg.privacy, n, unit.settings.batch_size, 0.0)
            total = unit.settings.rounds * unit.settings.local_epochs * plan.steps_per_epoch
            plan.noise_multiplier = calibrate_noise(cfg.privacy, plan.sample_rate, total)
            if plan.unclipped_num_std is not None:
                check_adaptive(cfg.privacy, plan.noise_multiplier, plan.unclipped_num_std)
            unit.dp_plan = plan
    return units


def new_ledger(cfg: ExperimentConfig, units: list[TrainingUnit]) -> PrivacyLedger:
    p = cfg.privacy
    formal, note = p.formal_guarantee(), p.guarantee_note()
    if formal and cfg.server.sampling == "gmm":
        formal, note = False, (f"{NO_GUARANTEE}: DP-SGD covers the decoders, but each client also shares a "
                               "latent GMM fitted on its private latents, which no mechanism covers")
    return PrivacyLedger(
        mechanism=p.mechanism, formal_guarantee=formal, note=note,
        delta=p.delta if formal else None, target_epsilon=p.target_epsilon if formal else None,
        clients={str(k): {"n": len(u.data), **({"sample_rate": u.dp_plan.sample_rate,
                                                  "noise_multiplier": u.dp_plan.noise_multiplier,
                                                  "planned_steps": u.settings.rounds * u.settings.local_epochs
                                                  * u.dp_plan.steps_per_epoch} if u.dp_plan else {})}
                 for k, u in enumerate(units)})


def build_strategy(cfg: ExperimentConfig, clients: list[Client]):
    cls = STRATEGY_CLASSES[cfg.strategy.name]
    return cls(clients, cfg.training, cfg.server_spec(), cfg.seed,
               samples_per_client=cfg.server.samples_per_client, server_epochs=cfg.server.epochs,
               sampling=cfg.server.sampling, gmm_components=cfg.server.gmm_components,
               prox_mu=cfg.strategy.mu if cfg.strategy.name == "fedprox" else 0.0, epochs=cfg.strategy.epochs,
               participation=cfg.server.participation)


def _digest(files: dict) -> str:
    return hashlib.sha256("|".join(f"{k}:{v}" for k, v in sorted(files.items())).encode()).hexdigest()


def run_experiment(cfg: ExperimentConfig, data_root: str | Path | None = None, out: str | Path | None = None,
                   quiet: bool = False) -> RunDir:
    """Everything that can fail on bad input fails before the run directory is made."""
    started = time.perf_counter()
    data = load_data(cfg, data_root)
    partition = make_partition(cfg.partition, data.train.labels,
                               data.outlier_train.labels if data.outlier_train is not None else np.zeros(0),
                               cfg.data.dataset, cfg.outlier_dataset, cfg.seed)
    units = training_units(cfg, data, partition)  # refuses impossible privacy budgets before training
    run = RunDir.create(out, cfg.name, cfg.seed)
    try:
        run.file("config.resolved.yaml").write_text(dump_config(cfg))
        run.write_json("partition.json", partition.to_json())
        _train_and_evaluate(cfg, data, partition, units, run, quiet, started)
    except BaseException as err:
        run.set_status("failed", error=f"{type(err).__name__}: {err}")
        raise
    return run


def resume_experiment(run_dir: str | Path, data_root: str | Path | None = None, quiet: bool = False):
    """Continue a crashed or interrupted run from its last checkpoint, in its own directory, with its own
    resolved config. The result equals an uninterrupted run with the same seed."""
    import yaml

    from alignfl_audit.config import from_dict
    from federation.errors import ConfigError

    run = RunDir(run_dir)
    if not run.file("config.resolved.yaml").is_file():
        raise ConfigError(f"{run.path} is not a run directory (no config.resolved.yaml)")
    if run.is_complete():
        raise ConfigError(f"{run.path} is already complete; nothing to resume")
    try:
        cfg = from_dict(yaml.safe_load(run.file("config.resolved.yaml").read_text()))
    except yaml.YAMLError as err:
        raise ConfigError(f"{run.path}/config.resolved.yaml is not valid YAML: {err}") from None
    started = time.perf_counter()
    data = load_data(cfg, data_root)
    partition = make_partition(cfg.partition, data.train.labels,
                               data.outlier_train.labels if data.outlier_train is not None else np.zeros(0),
                               cfg.data.dataset, cfg.outlier_dataset, cfg.seed)
    if run.file("partition.json").is_file() and run.read_json("partition.json") != partition.to_json():
        raise DataError(f"the data found now do not give the partition recorded in {run.path}/partition.json; "
                        "pass the run's data with --data-root")
    units = training_units(cfg, data, partition)
    run.write_json("partition.json", partition.to_json())
    run.set_status("running", resumed=True)
    try:
        _train_and_evaluate(cfg, data, partition, units, run, quiet, started, resume=True)
    except BaseException as err:
        run.set_status("failed", error=f"{type(err).__name__}: {err}")
        raise
    return cfg, run


def _train_and_evaluate(cfg, data, partition, units, run: RunDir, quiet: bool, started: float,
                        resume: bool = False) -> None:
    torch.manual_seed(cfg.seed)
    ledger = new_ledger(cfg, units)
    clients = [Client(i, u.spec, u.data, u.settings, cfg.seed, cfg.privacy, u.dp_plan, ledger)
               for i, u in enumerate(units)]
    strategy = build_strategy(cfg, clients)
    test_x, test_y = to_tensor(data.test.images), data.test.labels
    steps = strategy.rounds * (len(clients) + 1) if strategy.rounds and cfg.strategy.name != "centralized" else 1
    rows, rejected, first = [], [], 0
    state = load_checkpoint(run, cfg.digest()) if resume else None
    if state is not None:
        first, rows, rejected = restore(state, clients, strategy, ledger, run.file("shared"))
        run.log(f"resumed after round {first - 1} from checkpoints/latest.pt")
    with tqdm(total=steps, initial=min(steps, first * (len(clients) + 1)), disable=quiet, desc=cfg.name,
              unit="step", leave=False) as bar:
        def tick(msg: str) -> None:
            bar.set_postfix_str(msg)
            bar.update(1)

        for rnd in range(first, strategy.rounds):
            record = strategy.run_round(rnd, run.shared_round(rnd), tick)
            rejected += [{"round": rnd, "client": c, "reason": r} for c, r in record.pop("rejected").items()]
            if cfg.metrics.probe_every_round:
                record.update(probe(strategy.global_vae, test_x, test_y, cfg.seed, cfg.metrics.probe_max_iter))
            rows.append(record)
            run.log(f"round {rnd}: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in record.items() if k != "round"))
            run.write_csv("rounds.csv", rows)
            run.write_json("privacy_ledger.json", ledger.to_json())
            save_checkpoint(run, rnd, cfg.digest(), clients, strategy, ledger, rows, rejected)
    train_seconds = time.perf_counter() - started
    cnn = domain_cnn(cfg.data.dataset, to_tensor(data.train.images), torch.as_tensor(data.train.labels),
                     _digest(data.train.files), cfg.seed, cfg.metrics.domain_cnn_epochs)
    utility, notes = evaluate(strategy, test_x, test_y, cnn,
                              class_owner([s.class_counts for s in partition.shards]), cfg.seed,
                              cfg.metrics.fid_samples, cfg.metrics.tstr_epochs, cfg.metrics.probe_max_iter,
                              run.file("figures") if cfg.metrics.figures else None)
    shared = strategy.shared_artifacts
    metrics = {
        "name": cfg.name, "strategy": strategy.name, "seed": cfg.seed, "config_sha256": cfg.digest(),
        "utility": utility, "notes": notes,
        "shared_artifacts": shared,
        "privacy": privacy_block(ledger, shared),
        "rejected_uploads": rejected,
        "participation": {"probability": cfg.server.participation,
                          "rounds_per_client": {str(c.id): sum(bool(r.get(f"client{c.id}_participated", True))
                                                               for r in rows) for c in clients}},
        "data": data.provenance,
        "partition": {"clients": [{"client": s.client, "classes": s.classes,
                                   "class_counts": {str(k): v for k, v in s.class_counts.items()},
                                   "outliers": int(len(s.outlier_ids)), "holdout": int(len(s.holdout_ids)),
                                   "canaries_included": int(len(s.canary_ids))}
                                  for s in partition.shards],
                      "outlier_controls": int(len(partition.outlier_control_ids))},
        "timing_seconds": {"train": round(train_seconds, 2),
                           "total": round(time.perf_counter() - started, 2)},
        "torch_threads": torch.get_num_threads(),
        "provenance": provenance(),
    }
    run.write_json("metrics.json", metrics)
    run.set_status("complete")
    # resume state holds every encoder and RNG state: it has no use once the run is complete, and a run
    # directory handed to an auditor must not carry what the threat model keeps from the adversary
    shutil.rmtree(run.file("checkpoints"), ignore_errors=True)


def run_pipeline(cfg: ExperimentConfig, data_root: str | Path | None = None, out: str | Path | None = None,
                 quiet: bool = False) -> RunDir:
    """Train; then, as the config asks, audit the run (``audit: true``) and write report.html
    (``report: true``). A failing audit or report leaves the finished run as it is."""
    return after_run(cfg, run_experiment(cfg, data_root, out, quiet), data_root, quiet)


def after_run(cfg: ExperimentConfig, run: RunDir, data_root=None, quiet: bool = False) -> RunDir:
    """The audit and report a config asks for, on a finished run."""
    if cfg.audit.enabled:
        from alignfl_audit.audit import run_audit

        run.log("audit started")
        run_audit(run.path, data_root=data_root, quiet=quiet)
        run.log("audit written: audit.json")
    if cfg.report:
        from reports.render import render_report

        render_report([run.path], run.file("report.html"))
        run.log("report written: report.html")
    return run


def privacy_block(ledger: PrivacyLedger, shared: list[str]) -> dict:
    """metrics.json's privacy block: epsilon per client and accountant, only where it is formal."""
    block = ledger_epsilons(ledger.to_json())
    if "latent_gmm" in shared:
        block["extra_artifacts"] = {"latent_gmm": "a Gaussian mixture fitted on each client's private latents is "
                                                  "shared with no DP treatment: no formal guarantee covers it"}
    return block
