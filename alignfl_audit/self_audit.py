"""``alignfl-audit self-audit``: a white-box one-run audit of this package's own DP-SGD.

The auditor controls one client. Its records are real MNIST training images plus m Dirac gradient
canaries (``attacks.dirac_canaries``), each included with probability 1/2. The client trains through
the trainer real runs use (``DPTrainer``: Poisson sampling, book-keeping clipping, the default
adaptive clip bound, Gaussian noise, Adam), planned and calibrated to the target epsilon as a run's
client is. The auditor reads every released gradient, scores each canary by its exact likelihood
ratio, guesses, and turns its correct guesses into the one-run lower bound epsilon_lb (Steinke, Nasr,
Jagielski 2023; ``attacks.empirical_epsilon``). Beside it: the accountants' epsilon of the recorded
steps, which a sound mechanism never falls below (up to the bound's 5% error), and the bound the same
auditor gets against the Gaussian mechanism itself (``attacks.self_audit``), which a faithful
implementation should come close to.

The sampling rate and the expected batch size are planned from the public count records + m/2, so
that nothing the trainer does depends on which canaries were drawn in (the one-run bound needs each
canary's inclusion to be its own secret).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from alignfl_audit.accounting import epsilons
from attacks.dirac_canaries import DiracCanaryVAE, WhiteBoxAuditor, canary_images
from attacks.empirical_epsilon import one_run_epsilon
from attacks.self_audit import SimulationSettings, choose_guesses, ideal_epsilon_lb
from federation.data.sources import load_split, resolve_source
from federation.errors import ConfigError
from federation.models import PIXELS
from federation.privacy.budget import calibrate_noise, check_adaptive
from federation.privacy.clipping import adjusted_noise_multiplier
from federation.privacy.dp_sgd import DPTrainer, make_plan
from federation.privacy.spec import PrivacySpec
from federation.rng import CLIENT_DP_NOISE, CLIENT_INIT, CLIENT_TRAIN, seeded_generator
from federation.training import to_tensor

FORMAT = "alignfl-self-audit/1"


@dataclass
class SelfAuditRecipe:
    """What the audited client trains: the paper's MLP VAE on ``records`` MNIST training images beside
    ``canaries`` Dirac canaries, for ``epochs`` epochs of 1/q Poisson steps."""

    canaries: int = 20000
    records: int = 3000  # the embedded subset holds 3000 MNIST training images
    sampling_rate: float = 0.2
    epochs: int = 20
    model: dict = field(default_factory=lambda: {"arch": "mlp", "latent_dim": 2, "hidden": [512, 256, 128]})
    lr: float = 1e-3
    lambda_kl: float = 1.0
    beta: float = 0.05  # the bound holds with probability 1 - beta
    selection_repeats: int = 11  # simulated runs that choose the number of guesses r
    repeats: int = 20  # simulated runs behind ideal_epsilon_lb (their median)

    def check(self) -> "SelfAuditRecipe":
        for name in ("canaries", "records", "epochs", "selection_repeats", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "canaries" else 1):
                raise ConfigError(f"self-audit {name} must be an integer >= {2 if name == 'canaries' else 1}, "
                                  f"got {value!r}")
        if self.canaries > PIXELS * PIXELS:
            raise ConfigError(f"self-audit canaries must be at most {PIXELS * PIXELS} (one probe coordinate each), "
                              f"got {self.canaries}")
        if not 0 < self.sampling_rate < 1:
            raise ConfigError(f"self-audit sampling rate must be in (0, 1), got {self.sampling_rate}")
        if not 0 < self.beta < 1:
            raise ConfigError(f"self-audit beta must be in (0, 1), got {self.beta}")
        return self


def check_target(target_epsilon, delta) -> tuple[float, float]:
    try:
        eps, d = float(target_epsilon), float(delta)
    except (TypeError, ValueError):
        raise ConfigError(f"the self-audit needs numbers for epsilon and delta, got {target_epsilon!r}, "
                          f"{delta!r}") from None
    if not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"the self-audit's target epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not 0 < d < 1:
        raise ConfigError(f"the self-audit's delta must be in (0, 1), got {delta!r}")
    return eps, d


def _real_records(count: int, seed: int, data_root) -> torch.Tensor:
    split = load_split(resolve_source("mnist", data_root), "mnist", "train")
    if count > len(split):
        raise ConfigError(f"the self-audit asks for {count} MNIST training records but the data hold "
                          f"{len(split)}; lower --records or give --data-root with the full dataset")
    pick = np.random.default_rng([seed, 3]).permutation(len(split))[:count]
    return to_tensor(split.images[np.sort(pick)])


def _per_reading(sums: np.ndarray, canaries: np.ndarray, steps: int) -> float | None:
    """Mean over the chosen canaries and the steps, from per-canary sums over the steps."""
    n = int(canaries.sum()) * steps
    return float(sums[canaries].sum() / n) if n else None


def run_self_audit(target_epsilon: float, delta: float = 1e-5, recipe: SelfAuditRecipe | None = None,
                   seed: int = 0, data_root=None, fault: str | None = None) -> dict:
    """Train one audited client through ``DPTrainer`` and audit it; returns the JSON-ready result.
    ``fault`` (tests only) breaks the trainer on purpose (``federation.privacy.spec.TEST_ONLY_FAULTS``)."""
    start = time.perf_counter()
    target_epsilon, delta = check_target(target_epsilon, delta)
    recipe = (recipe or SelfAuditRecipe()).check()
    spec = PrivacySpec(mechanism="dp-sgd", target_epsilon=target_epsilon, delta=delta,
                       grad_sample_mode="bk").validate()
    m = recipe.canaries
    n_plan = recipe.records + m // 2  # public: what the client is planned for, whichever canaries are in
    spec.check_client(0, n_plan)
    plan = make_plan(spec, n_plan, max(1, round(recipe.sampling_rate * n_plan)), 0.0)
    planned_steps = recipe.epochs * plan.steps_per_epoch
    plan.noise_multiplier = calibrate_noise(spec, plan.sample_rate, planned_steps)
    check_adaptive(spec, plan.noise_multiplier, plan.unclipped_num_std)
    grad_sigma = adjusted_noise_multiplier(plan.noise_multiplier, plan.unclipped_num_std)

    rng = np.random.default_rng([seed, 4])
    included = rng.random(m) < 0.5
    at_bound = rng.random(m) < spec.target_quantile  # canaries the adaptive rule counts as unclipped
    data = torch.cat([_real_records(recipe.records, seed, data_root), canary_images(m)[torch.as_tensor(included)]])

    model = DiracCanaryVAE(recipe.model, seeded_generator(seed, CLIENT_INIT, 0), m)
    trainer = DPTrainer(model, spec, plan, recipe.lr, recipe.lambda_kl, n_plan,
                        seeded_generator(seed, CLIENT_TRAIN, 0, 0), seeded_generator(seed, CLIENT_DP_NOISE, 0, 0),
                        fault=fault)
    auditor = WhiteBoxAuditor(trainer, model, at_bound, plan.sample_rate, grad_sigma,
                              over_norm=10.0 * spec.max_clipbound)
    bound_start = trainer.clip_bound
    _, steps = trainer.train_epochs(data, recipe.epochs)
    auditor.detach()
    trained = time.perf_counter()

    # the guesses and the ideal come from simulations of the mechanism as claimed, never from this run
    sim = SimulationSettings(m, plan.sample_rate, plan.noise_multiplier, steps, delta, recipe.beta,
                             recipe.selection_repeats, recipe.repeats)
    k = choose_guesses(sim, seed)
    bound = one_run_epsilon(auditor.scores, included, k, 0, delta, beta=recipe.beta, seed=seed)
    ideal = ideal_epsilon_lb(sim, k, seed)
    simulated = time.perf_counter()

    # add/remove: the canaries' game, and nothing the client does depends on how many were drawn in
    accounting = epsilons([(plan.noise_multiplier, plan.sample_rate, steps)], delta, relation="add-remove")
    headline = accounting["headline"]
    out = ~included
    observed_sigma = _per_reading(auditor.squares, out, steps)
    return {
        "format": FORMAT,
        "target_epsilon": target_epsilon, "delta": delta,
        "epsilon_lb": bound["epsilon_lb"],
        "accountant_epsilon": headline["epsilon"], "accountant": headline["accountant"],
        "accountant_relation": "add-remove (a canary is drawn in or not; the sampling rate and the expected "
                               "batch size are planned from records + m/2, whatever was drawn)",
        "ideal_epsilon_lb": ideal["median"],
        "ideal_epsilon_lb_p10": ideal["p10"], "ideal_epsilon_lb_p90": ideal["p90"],
        "ideal_statistic": ideal["statistic"] + " of the Gaussian mechanism (same m, r, q, sigma, steps)",
        "ratio_to_ideal": bound["epsilon_lb"] / ideal["median"] if ideal["median"] > 0 else None,
        "epsilon_ceiling": bound["epsilon_ceiling"],
        "flagged": bound["epsilon_lb"] > headline["epsilon"],
        "m": m, "r": bound["r"], "v": bound["v"], "guesses": "in (the r highest scores); no out guesses",
        "beta": recipe.beta,
        "canaries_included": int(included.sum()), "canaries_at_bound": int(at_bound.sum()),
        "records": recipe.records, "planned_records": n_plan,
        "steps": steps, "sampling_rate": plan.sample_rate, "noise_multiplier": plan.noise_multiplier,
        "gradient_noise_multiplier": grad_sigma, "unclipped_num_std": plan.unclipped_num_std,
        "observed_noise_multiplier": None if observed_sigma is None else math.sqrt(observed_sigma),
        "mean_reading_included": _per_reading(auditor.readings, included, steps),
        "mean_reading_excluded": _per_reading(auditor.readings, out, steps),
        "clipping": spec.clipping, "grad_sample_mode": trainer.mode,
        "clip_bound_start": bound_start, "clip_bound_end": trainer.clip_bound,
        "clip_bound_min": min(auditor.bounds), "clip_bound_max": max(auditor.bounds),
        "model": model.spec, "recipe": dataclasses.asdict(recipe), "seed": seed, "fault": fault,
        "threads": torch.get_num_threads(),
        "seconds": {"training": trained - start, "simulation": simulated - trained,
                    "total": time.perf_counter() - start},
    }


def describe(res: dict) -> str:
    """The self-audit's result in a few lines of text."""
    ratio = "n/a" if res["ratio_to_ideal"] is None else f"{res['ratio_to_ideal']:.2f}"
    verdict = ("FLAGGED: epsilon_lb exceeds the accountant's epsilon; the DP-SGD code (or its accounting) leaks "
               "more than it claims" if res["flagged"] else "not flagged: epsilon_lb <= the accountant's epsilon")
    fault = f" [test-only fault: {res['fault']}]" if res["fault"] else ""
    noise = "n/a" if res["observed_noise_multiplier"] is None else f"{res['observed_noise_multiplier']:.4g}"
    return "\n".join([
        f"self-audit of DP-SGD ({res['grad_sample_mode']}, {res['clipping']} clipping){fault}: target epsilon "
        f"{res['target_epsilon']:g}, delta {res['delta']:g}",
        f"  {res['m']} Dirac canaries ({res['canaries_included']} drawn in) beside {res['records']} MNIST records; "
        f"{res['steps']} steps at sampling rate {res['sampling_rate']:.4g}, noise multiplier "
        f"{res['noise_multiplier']:.4g} (gradient {res['gradient_noise_multiplier']:.4g}), clip bound "
        f"{res['clip_bound_start']:.4g} -> {res['clip_bound_end']:.4g}",
        f"  epsilon_lb = {res['epsilon_lb']:.3f} ({res['v']} of {res['r']} 'in' guesses right, {1 - res['beta']:.0%} "
        f"confidence; the most these guesses could show: {res['epsilon_ceiling']:.3f})",
        f"  ideal auditor against the Gaussian mechanism (same m, r, q, sigma, steps): {res['ideal_epsilon_lb']:.3f}, "
        f"median of {res['recipe']['repeats']} simulated runs (10-90%: {res['ideal_epsilon_lb_p10']:.3f}-"
        f"{res['ideal_epsilon_lb_p90']:.3f}); ratio {ratio}",
        f"  accountant epsilon = {res['accountant_epsilon']:.3f} ({res['accountant']}): {verdict}",
        f"  noise read on excluded canaries' coordinates: {noise} x clip bound "
        f"(claimed {res['gradient_noise_multiplier']:.4g}); wall time {res['seconds']['total']:.0f} s",
    ])
