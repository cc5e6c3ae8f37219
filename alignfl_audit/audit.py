"""``alignfl-audit audit RUN_DIR``: attack a finished run from what it shared, without retraining it.

The attacks see the run's shared decoders (``shared/``), its partition record (``partition.json``)
and the public datasets, nothing else. This module only wires them together: it locates and checks
the public data, assembles each client's membership game, runs the attacks, and writes
``audit.json`` plus the raw evidence (scores, ROC arrays, reconstructions) under ``audit/``.
The recipe used for reference models (architecture spec, epochs, KL weight) comes from the resolved
config: the recipe is treated as public, the data as private.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from alignfl_audit import progress
from alignfl_audit.audit_summary import audit_summary
from alignfl_audit.config import ExperimentConfig, canary_guesses, from_dict, migrate_config
from alignfl_audit.rundir import RunDir
from federation import run_layout as layout
from attacks.empirical_epsilon import clopper_pearson_epsilon, one_run_ceiling, one_run_epsilon
from attacks.latent_fit import fit_latents
from attacks.lipschitz import lipschitz_bracket
from attacks.membership import (LatentFitAttack, MonteCarloAttack, NearestSampleAttack, membership_game,
                                membership_scores)
from attacks.mia_metrics import membership_metrics, roc_arrays
from attacks.outlier_reconstruction import domain_classifier, reconstruct_groups
from attacks.outlier_verdicts import outlier_verdicts
from attacks.reference_cache import ReferenceCache, key_material
from attacks.reference_models import ReferenceRecipe, train_reference_decoder
from attacks.selection import largest_ceiling
from attacks.sensitivity import audit_sensitivity
from alignfl_audit.audit_hyper import THREAT_MODEL as HYPER_THREAT_MODEL, UPDATE_ATTACK
from attacks.shared_artifacts import SharedRun, load_shared_run
from federation.rng import seeded_generator
from federation.data.sources import EMBEDDED_ROOT, DataSource, _has_dataset, load_split, resolve_source
from federation.errors import ConfigError, DataError
from federation.training import to_tensor

AUDIT_FORMAT = layout.AUDIT_FORMAT


def _config(run: RunDir, overrides: dict) -> ExperimentConfig:
    path = run.file(layout.CONFIG)
    try:
        data = run.resolved_config_data()
    except ConfigError as err:
        raise DataError(str(err)) from None
    for dotted, value in overrides.items():
        if not dotted.startswith("audit."):
            raise ConfigError(f"audit --set only takes audit.* keys, got {dotted!r}")
        data.setdefault("audit", {})[dotted.split(".", 1)[1]] = value
    try:
        return from_dict(migrate_config(data))  # read by its recorded format
    except ConfigError as err:
        if any(k.startswith("audit.") for k in overrides):
            raise
        raise DataError(f"{path} cannot be read by this version: {err}") from None


def _check_run_format(run: RunDir) -> None:
    try:
        fmt = layout.run_format(run.read_json(layout.METRICS))
    except (OSError, ValueError):
        return  # not finished: refused below with its own message
    if fmt not in layout.READABLE_RUN_FORMATS:
        raise DataError(f"{run.path} was written in run format {fmt!r}; this version reads "
                        f"{', '.join(layout.READABLE_RUN_FORMATS)} (upgrade alignfl-audit)")


def _read_json(run: RunDir, name: str) -> dict:
    try:
        value = run.read_json(name)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {run.file(name)}: {err}") from None
    if not isinstance(value, dict):
        raise DataError(f"{run.file(name)} is not a JSON object")
    return value


def _check_ids(ids, split, what: str) -> None:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= len(split)):
        raise DataError(f"{what} ids reach {int(ids.max())} but the {split.dataset} {split.split} split has "
                        f"{len(split)} records: these are not the data the run used (pass --data-root)")


def _source(dataset: str, provenance: dict | None, data_root, cfg: ExperimentConfig) -> DataSource:
    if data_root is not None:
        return resolve_source(dataset, data_root)
    if provenance and provenance.get("source") == "embedded":
        return DataSource(EMBEDDED_ROOT, "embedded")
    if provenance and provenance.get("root") and _has_dataset(Path(provenance["root"]), dataset):
        return DataSource(Path(provenance["root"]), "data-root")
    return resolve_source(dataset, cfg.data.root, allow_embedded=cfg.data.allow_embedded)


def _load(dataset: str, split: str, provenance: dict, data_root, cfg: ExperimentConfig):
    """A public split, checked against the sha256 the run recorded: record ids index into exactly
    the files the run used."""
    prov = provenance.get(dataset)
    data = load_split(_source(dataset, prov, data_root, cfg), dataset, split)
    for name, digest in data.files.items():
        recorded = (prov or {}).get("files", {}).get(name)
        if recorded is not None and recorded != digest:
            raise DataError(f"{dataset} {name} differs from the file the run used (sha256 {digest[:12]} vs "
                            f"{recorded[:12]}); pass --data-root with the run's data")
    return data


def _latent_options(a) -> dict:
    return dict(lam=a.latent_fit_lambda, init=a.latent_fit_init, restarts=a.latent_fit_restarts,
                steps=a.latent_fit_steps, precision=a.latent_fit_precision)


def _attacks(a) -> dict:
    """name -> a function making a fresh attack, for FedHypeVAE, whose decoders the code search generates per
    class (the reference-calibrated attacks do not apply: no decoder is shared)."""
    return {LatentFitAttack.name: lambda: LatentFitAttack(**_latent_options(a)),
            MonteCarloAttack.name: lambda: MonteCarloAttack(a.generated_samples),
            NearestSampleAttack.name: lambda: NearestSampleAttack(a.generated_samples)}


def run_audit(run_dir: str | Path, data_root=None, overrides: dict | None = None, seed: int | None = None,
              quiet: bool = False, reference_cache: str | Path | None = None) -> Path:
    """Audit a finished run; ``reference_cache``: a folder of reference decoders shared across audits
    (``attacks.reference_cache``; None: every reference is trained here)."""
    started = time.perf_counter()
    run = RunDir(run_dir)
    shared = load_shared_run(run.path)
    _check_run_format(run)
    if not run.is_complete():
        raise DataError(f"{run.path} is not a finished run (status is not complete): its shared decoders may "
                        "stop mid-way and its data provenance is not recorded; finish it with 'alignfl-audit run "
                        "--resume' first")
    if seed is not None and seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    cfg = _config(run, overrides or {})
    a = cfg.audit
    seed = cfg.seed if seed is None else seed
    provenance = _read_json(run, layout.METRICS).get("data", {})
    part = shared.partition
    main_ds, out_ds = part["dataset"], part["outlier_dataset"]
    train = _load(main_ds, "train", provenance, data_root, cfg)
    test = _load(main_ds, "test", provenance, data_root, cfg)
    needs_outlier_source = bool(part.get("outliers", {}).get("ids") or part.get("canaries", {}).get("ids"))
    out_train = _load(out_ds, "train", provenance, data_root, cfg) if needs_outlier_source else None
    for c in part["clients"]:
        _check_ids(np.r_[c["train_ids"], c["holdout_ids"]], train, f"client {c['client']}")
    if out_train is not None:
        _check_ids(np.r_[part.get("outliers", {}).get("ids", []), part.get("outliers", {}).get("control_ids", []),
                         part.get("canaries", {}).get("ids", [])], out_train, "outlier/canary")
    images = to_tensor(train.images)

    clients = [c for c in part["clients"] if c["client"] in shared.decoders]
    hyper = None
    if shared.hypernetworks:  # FedHypeVAE: decoders are generated at a code the adversary searches for
        from alignfl_audit.audit_hyper import HyperView
        from alignfl_audit.orchestrate import label_sets

        hyper = HyperView.search_codes(shared, clients, train.labels, images, a, seed, label_sets(cfg),
                                       cfg.strategy.anchor_weight)
    calibrated = a.reference_models and hyper is None
    steps = len(clients) * (2 if calibrated else 1) + 3
    bar = tqdm(total=steps, disable=quiet, desc="audit", unit="step", leave=False)

    def tick(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1)
        progress.advance()

    timing: dict[str, float] = {}

    def timed(phase: str, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        timing[phase] = round(time.perf_counter() - t0, 2)
        return result

    cache = ReferenceCache(reference_cache) if reference_cache is not None else None
    references, reference_origin = timed("references", _references, shared, clients, cfg, test, seed, tick, cache,
                                         run.path) if calibrated else (None, None)
    evidence: dict[str, np.ndarray] = {}
    mia, games = timed("membership", _membership, shared, clients, images, train.labels, a, references, seed,
                       evidence, tick, hyper)
    delta = cfg.privacy.delta
    eps = _empirical_epsilon(evidence, list(mia), delta, a.alpha, seed)
    tick("outliers")
    outliers = None
    if out_train is not None and part.get("outliers", {}).get("ids") \
            and part["outliers"]["client"] in shared.decoders:
        out_test = _load(out_ds, "test", provenance, data_root, cfg)
        outliers = timed("outliers", _outliers, shared, part, images, train.labels, test, out_train, out_test, a,
                         seed, run, hyper)
    tick("lipschitz")
    lipschitz = timed("lipschitz", _lipschitz, shared, clients, images, train.labels, a, seed, hyper)
    tick("canaries")
    canaries = timed("canaries", _canaries, shared, part, out_train, a, delta, seed, evidence, hyper)
    bar.close()

    audit = {
        "format": AUDIT_FORMAT, "run": str(run.path), "seed": seed, "settings": vars(a).copy(),
        "threat_model": "white-box access to every shared decoder (and declared extra artifacts) plus "
                        "candidate records; no encoder, no private training state (docs/threat-model.md)"
                        if hyper is None else HYPER_THREAT_MODEL,
        "shared_artifacts": sorted({k for c in shared.decoders.values() for d in c.values()
                                    for k in [d.kind, *d.extra_artifacts]}),
        **({} if hyper is None else {
            "code_search": {"clients": hyper.search,
                            "method": "from each client's public anchor, jointly with one latent per candidate record "
                                      "of its membership game (attacks/hyper_code.py)"}}),
        "downlinks": {"messages": len(shared.downlinks),
                      "kinds": sorted({d.kind for d in shared.downlinks}),
                      "carry_a_decoder": any(d.decoder is not None for d in shared.downlinks)},
        "rejected_uploads": shared.rejected,
        "mia": mia,
        "reference_models": reference_origin if hyper is None else (
            "not applicable: the reference-calibrated attacks train a reference of a shared decoder's recipe; "
            "FedHypeVAE shares no decoder"),
        "membership_game": {
            "design": "class-matched: members are a seeded random subset of each client's training records; "
                      "for every class, as many non-members of that class come from the client's held-out "
                      "records of that class",
            "shrunk": "where a class's held-out records are fewer than its members, that class's members are cut "
                      "at random to the held-out count (listed per client under shrunk_classes: drawn, holdout, "
                      "kept)",
            "clients": games},
        "empirical_epsilon": eps["headline"],
        "empirical_epsilon_kind": "estimate: Clopper-Pearson on the membership game of one training run "
                                  "(records are not independent trials); not a proof",
        "empirical_epsilon_ceiling": eps["ceiling"],
        "empirical_epsilon_proven": (canaries or {}).get("epsilon_lb"),
        "empirical_epsilon_proven_ceiling": (canaries or {}).get("epsilon_ceiling"),
        "empirical_epsilon_detail": eps,
        "sensitivity": audit_sensitivity(mia, eps, canaries, a.alpha),
        "outliers": outliers,
        "lipschitz": lipschitz,
        "canaries": canaries,
        "accountant": _accountant(run),
        "timing_seconds": {**timing, "audit": round(time.perf_counter() - started, 2)},
    }
    audit["summary"] = audit_summary(audit)
    folder = run.file("audit")
    folder.mkdir(exist_ok=True)
    np.savez_compressed(folder / "scores.npz", **evidence)
    run.write_json(layout.AUDIT, audit)
    return run.file(layout.AUDIT)


def _references(shared: SharedRun, clients, cfg, test, seed, tick, cache: ReferenceCache | None,
                run_path) -> tuple[dict, dict]:
    """One reference decoder per client: the client's recipe on the public test split's records of the
    client's classes (population data the client never held). With a ``cache``, a reference trained
    before from exactly the same material is read from it; where each came from is recorded."""
    t = cfg.training
    recipe = ReferenceRecipe(cfg.audit.reference_epochs or t.rounds * t.local_epochs, t.batch_size, t.lr,
                             t.lambda_kl, cfg.privacy.lcd_lambda if cfg.privacy.mechanism == "lcd" else 0.0,
                             t.precision)
    refs, origin = {}, {}
    for c in clients:
        k = c["client"]
        mask = np.isin(test.labels, c["classes"]) if c["classes"] else np.ones(len(test.labels), bool)
        spec, population = shared.final(k).spec, to_tensor(test.images[mask])
        stream = (seed, 71, k)
        t0 = time.perf_counter()
        material = key_material(test.dataset, c["classes"], population, spec, recipe, stream) if cache else None
        decoder, record = cache.load(material) if cache else (None, {"cache": None, "hit": False})
        if decoder is None:
            decoder = train_reference_decoder(spec, population, recipe, seeded_generator(*stream))
            if cache:
                cache.store(material, decoder, str(run_path))
        refs[k] = decoder
        origin[str(k)] = {**record, "source": "cache" if record["hit"] else "trained here",
                          "seconds": round(time.perf_counter() - t0, 2)}
        tick(f"reference {k}")
    return refs, origin


def _membership(shared: SharedRun, clients, images, labels_of, a, references, seed, evidence, tick, hyper=None):
    """(per-attack metrics, per-client class counts of the game); ``labels_of``: the train split's labels."""
    per_attack: dict[str, dict] = {}
    games: dict[str, dict] = {}
    pooled: dict[str, list] = {}
    labels_all, clients_all, ids_all = [], [], []
    for c in clients:
        k = c["client"]
        game = membership_game(c, a.members_per_client, seed, labels_of)
        games[str(k)] = game.to_json()
        if not len(game.member_ids):
            continue
        target = shared.final(k)
        records = images[game.ids]
        if hyper is None:
            scored = membership_scores(target.decoder, target.latent_dim, records, lambda: seeded_generator(seed, 72, k),
                                       latent_options=_latent_options(a), samples=a.generated_samples,
                                       reference=references[k] if references else None)
        else:
            scored = {name: hyper.score(k, make, records, labels_of[game.ids], seeded_generator(seed, 72, k))
                      for name, make in _attacks(a).items()}
            scored[UPDATE_ATTACK] = hyper.update_alignment(k, records, labels_of[game.ids], a, seed)
        for name, scores in scored.items():
            pooled.setdefault(name, []).append(scores)
            per_attack.setdefault(name, {"clients": {}})["clients"][str(k)] = membership_metrics(
                scores, game.labels, a.bootstrap, seed)
        labels_all.append(game.labels)
        clients_all.append(np.full(len(game.ids), k))
        ids_all.append(game.ids)
        tick(f"membership {k}")
    if not labels_all:
        raise DataError("no client has both training records and a held-out pool: no membership game to play")
    labels = np.concatenate(labels_all)
    evidence.update(labels=labels, client=np.concatenate(clients_all), record_id=np.concatenate(ids_all))
    for name, chunks in pooled.items():
        scores = np.concatenate(chunks)
        evidence[f"{name}__scores"] = scores
        per_attack[name].update(membership_metrics(scores, labels, a.bootstrap, seed))
        per_attack[name]["roc"] = {k: v.tolist() for k, v in roc_arrays(scores, labels).items()
                                   if k != "thresholds"}
    return per_attack, games


def _empirical_epsilon(evidence: dict, attacks: list[str], delta: float, alpha: float, seed: int) -> dict:
    """Clopper-Pearson lower bound per attack on the pooled game; each at alpha / (number of attacks), so
    the headline (the max) holds with probability >= 1 - alpha."""
    labels = evidence["labels"]
    level = alpha / len(attacks)
    per = {}
    for name in attacks:
        s = evidence[f"{name}__scores"]
        per[name] = clopper_pearson_epsilon(s[labels], s[~labels], delta, alpha=level, seed=seed)
    best = max(per, key=lambda n: per[n]["epsilon_lb"])
    return {"headline": per[best]["epsilon_lb"], "attack": best, "delta": delta, "alpha": alpha,
            "ceiling": largest_ceiling(per),  # the most the estimate could show
            "per_attack_alpha": level, "per_attack": per,
            "method": "Clopper-Pearson (Jagielski et al. 2020) on a held-out half, Bonferroni over attacks",
            "validity": "treats each candidate as an independent trial; members and non-members come from one "
                        "training run, so this is an estimate, not a proof. The canary audit (canaries.epsilon_lb, "
                        "with partition.canaries.count > 0) is the one-run bound with a proof."}


def _outliers(shared, part, images, labels_of, test, out_train, out_test, a, seed, run, hyper=None) -> dict:
    o = part["outliers"]
    k = o["client"]
    target = shared.final(k)
    client = next(c for c in part["clients"] if c["client"] == k)
    rng = np.random.default_rng([seed, 0x0171])
    inlier_ids = np.sort(rng.choice(client["train_ids"], min(a.inliers, len(client["train_ids"])), replace=False))
    groups = {"outliers": to_tensor(out_train.images[o["ids"]]),
              "controls": to_tensor(out_train.images[o["control_ids"]]) if o.get("control_ids") else torch.zeros(0),
              "inliers": images[inlier_ids]}
    typical, other = to_tensor(test.images), to_tensor(out_test.images)
    classifier = domain_classifier(typical, other, seed)
    fit_options = _latent_options(a)
    generator = seeded_generator(seed, 73, k)
    fitter = None
    if hyper is not None:  # each record fitted by the decoder of the class training gave it
        labels = {"outliers": hyper.rule_labels(k, o["ids"]), "controls": hyper.rule_labels(k, o["control_ids"]),
                  "inliers": labels_of[inlier_ids]}

        def fitter(name, records):
            return hyper.fit(k, records, labels[name], generator, **fit_options)
    # neighbours from both public test splits: a reconstruction counts only if it is much closer to its
    # own record than to any public image of either dataset, not merely unlike the main dataset
    summary, recons = reconstruct_groups(target.decoder, target.latent_dim, groups, torch.cat([typical, other]),
                                         classifier, generator, threshold=a.reconstruction_threshold,
                                         fit_options=fit_options, fitter=fitter)
    from federation.metrics.figures import sample_grid

    figures = {}
    for name in ("outliers", "controls"):
        if name in recons:
            pair = torch.stack([groups[name][:32].flatten(1), recons[name][:32]], 1).reshape(-1, 1, 28, 28)
            path = sample_grid(pair, run.file("audit", "figures", f"{name}_reconstructions.png"), nrow=8)
            figures[name] = str(path.relative_to(run.path))
    comparison = summary.get("comparison", {})
    return {"client": k, "reconstruction_rate": summary["outliers"]["reconstruction_rate"],
            "control_rate": comparison.get("control_rate"),
            **outlier_verdicts(summary, a.alpha, a.typical_mapping_rate),
            "reconstruction_threshold": a.reconstruction_threshold,
            "normalized_distance_percentiles": {name: {q: g["normalized"][q] for q in ("p05", "p25", "median",
                                                                                       "p75", "p95")}
                                                for name, g in summary.items() if name != "comparison"},
            "groups": summary, "figures": figures,
            "figure_layout": "pairs: original, reconstruction (left to right, row by row)"}


def _lipschitz(shared: SharedRun, clients, images, labels_of, a, seed, hyper=None) -> dict:
    out = {}
    for c in clients:
        k = c["client"]
        member_ids = membership_game(c, min(64, a.members_per_client), seed, labels_of).member_ids
        rounds = sorted(shared.decoders[k])
        chosen = bracketed_rounds(rounds, a.lipschitz_rounds)
        if hyper is not None:
            out[str(k)] = {**hyper.lipschitz(k, member_ids, images, labels_of, a, seed, chosen),
                           "rounds_not_bracketed": [r for r in rounds if r not in chosen]}
            continue
        per_round = {}
        for rnd in chosen:
            d = shared.decoders[k][rnd]
            latents = None
            if len(member_ids):
                latents = fit_latents(d.decoder, images[member_ids], d.latent_dim, seeded_generator(seed, 74, k, rnd),
                                      **{**_latent_options(a), "restarts": 1}).latents
            per_round[str(rnd)] = lipschitz_bracket(d.decoder, d.latent_dim, candidate_latents=latents,
                                                    n_prior=a.lipschitz_prior_points,
                                                    ascent_steps=a.lipschitz_ascent_steps, seed=seed)
        final = per_round[str(max(shared.decoders[k]))]
        out[str(k)] = {"lower": final["lower"], "upper": final["upper"],
                       "reference_grad_sum_max": final["reference_grad_sum_max"], "rounds": per_round,
                       "rounds_not_bracketed": [r for r in rounds if r not in chosen]}
    return out


def bracketed_rounds(rounds: list[int], count: int | None) -> list[int]:
    """``count`` of the sorted ``rounds``, evenly spaced, first and last included (all when None)."""
    if count is None or count >= len(rounds):
        return list(rounds)
    if count == 1:
        return [rounds[-1]]
    return sorted({rounds[round(i * (len(rounds) - 1) / (count - 1))] for i in range(count)})


def _canaries(shared: SharedRun, part, out_train, a, delta, seed, evidence, hyper=None) -> dict | None:
    c = part.get("canaries") or {}
    if not c.get("ids"):
        return None
    m = len(c["ids"])
    guesses = canary_guesses(m, a) // 2  # on each side
    if c["client"] not in shared.decoders:
        return {"client": c["client"], "epsilon_lb": None, "m": m, "r": 2 * guesses, "delta": delta, "beta": a.alpha,
                "epsilon_ceiling": one_run_ceiling(m, 2 * guesses, delta, a.alpha),
                "note": "the canary client shared no decoder"}
    k = c["client"]
    target = shared.final(k)
    included = np.asarray(c["included"], bool)
    attack = LatentFitAttack(**_latent_options(a))
    records = to_tensor(out_train.images[np.asarray(c["ids"])])
    if hyper is None:
        scores = attack.fit(target.decoder, target.latent_dim, seeded_generator(seed, 75, k)).score(records)
    else:  # each canary against the decoder of the class it would have been trained with
        scores = hyper.score(k, lambda: LatentFitAttack(**_latent_options(a)), records, hyper.rule_labels(k, c["ids"]),
                             seeded_generator(seed, 75, k))
    evidence.update(canary_scores=scores, canary_included=included)
    result = one_run_epsilon(scores, included, guesses, guesses, delta, beta=a.alpha)
    return {"client": k, "attack": attack.name, **result,
            "kind": "lower bound with proof at confidence 1 - beta (Steinke, Nasr, Jagielski 2023)",
            "ceiling": "epsilon_ceiling: the most this audit could have shown (all r guesses right)"}


def _accountant(run: RunDir) -> dict:
    """The formal claim next to the empirical one: epsilon only where a real guarantee exists, under the
    headline relation (replace-one) and under add/remove."""
    from alignfl_audit.accounting import HEADLINE_REASON, ledger_epsilons

    if not run.file(layout.LEDGER).is_file():
        return {"formal_guarantee": False, "epsilon": None, "note": "no privacy ledger in the run"}
    block = ledger_epsilons(run.read_json(layout.LEDGER))
    if not block["formal_guarantee"]:
        return {"formal_guarantee": False, "epsilon": None, "mechanism": block["mechanism"], "note": block["note"]}
    top = block["headline"] or {}
    return {"formal_guarantee": True, "mechanism": block["mechanism"], "delta": block["delta"],
            "relation": block["relation"], "relation_reason": HEADLINE_REASON, "epsilon": top.get("epsilon"),
            "epsilon_add_remove": top.get("add_remove_epsilon"),
            "per_client": {cid: r["headline"]["epsilon"] for cid, r in block["clients"].items()},
            "per_client_add_remove": {cid: r["relations"]["add-remove"]["headline"]["epsilon"]
                                      for cid, r in block["clients"].items()},
            "note": block["note"]}
